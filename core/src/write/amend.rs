//! Amending an image's options in place (`qemu-img amend`): the lazy-refcounts bit. (The size goes through
//! [`Image::resize`].)

use super::*;

impl<D, B, C, const DEPTH: usize, const SLICES: usize> Image<D, B, C, DEPTH, SLICES, WriteState>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// Turns lazy refcounts on or off (the compatible-features bit, one header write). Version 3 images
    /// only, as QEMU requires. Everything cached is written back first, and a dirty bit this writer set is
    /// cleared before the bit goes off; the writer keeps writing refcounts back eagerly until the image is
    /// opened again.
    pub fn set_lazy_refcounts(&mut self, on: bool) -> Result<(), Error<D::Error>> {
        if self.meta()?.header.version < 3 {
            return Err(Error::Unsupported {
                what: "lazy refcounts need a version 3 image (compat=1.1)",
                value: 2,
            });
        }
        self.begin_write()?;
        self.finish()?;
        let mut m = self.meta()?;
        let bits = if on {
            m.header.compatible_features | CompatibleFeatures::LAZY_REFCOUNTS
        } else {
            m.header.compatible_features & !CompatibleFeatures::LAZY_REFCOUNTS
        };
        if bits != m.header.compatible_features {
            m.write_header(field::COMPATIBLE_FEATURES, &bits.bits().to_be_bytes())?;
            m.header.compatible_features = bits;
        }
        m.w.lazy = false;
        Ok(())
    }
}
