//! Amending an image's options in place (`qemu-img amend`): the lazy-refcounts bit, the version (upgrade to
//! `compat=1.1`; the downgrade is in `downgrade`), and the names the first cluster holds: the backing file
//! (`qemu-img rebase -u`) and the external data file. (The size goes through [`Image::resize`].)

use super::header::{BackingFile, Cluster0Change};
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

    /// Makes a version 2 image a version 3 one (`compat=1.1`) as QEMU's amend does: when a snapshot entry
    /// lacks the extra data version 3 requires, the snapshot table is rewritten first (every entry with
    /// QEMU's 24 bytes of extra data); then the first cluster is rewritten with the version 3 header (and
    /// the feature name table for clusters over 4 KiB). A version 3 image is left alone.
    pub fn upgrade_to_v3(&mut self) -> Result<(), Error<D::Error>> {
        if self.meta()?.header.version >= 3 {
            return Ok(());
        }
        self.begin_write()?;
        self.finish()?;
        let mut m = self.meta()?;
        if m.snapshot_lacks_extra_data()? {
            m.rewrite_snapshot_table(None, None)?;
        }
        let mut new = *m.header;
        new.version = 3;
        new.incompatible_features = IncompatibleFeatures::empty();
        new.compatible_features = CompatibleFeatures::empty();
        new.autoclear_features = AutoclearFeatures::empty();
        new.refcount_order = 4;
        new.compression_type = crate::format::CompressionType::Deflate;
        m.rewrite_cluster0(&mut new, &Cluster0Change::default())?;
        self.reload_meta()
    }

    /// Names another backing file, or none (`qemu-img rebase -u`): the backing file name and the backing
    /// format extension rewritten in the first cluster, nothing else. Whether the guest sees the same disk
    /// through the new backing file is the caller's matter. The open image keeps reading through the chain
    /// it was opened with; open it again to read through the new one.
    pub fn set_backing_file(
        &mut self,
        backing: Option<BackingFile<'_>>,
    ) -> Result<(), Error<D::Error>> {
        if let Some(b) = backing {
            if b.name.len() > crate::format::MAX_BACKING_NAME_LEN {
                return Err(Error::Unsupported {
                    what: "a backing file name longer than 1023 bytes",
                    value: b.name.len() as u64,
                });
            }
            if b.format
                .is_some_and(|f| f.len() > crate::format::MAX_BACKING_FORMAT_LEN)
            {
                return Err(Error::Unsupported {
                    what: "a backing format name longer than 15 bytes",
                    value: b.format.map_or(0, str::len) as u64,
                });
            }
            let m = self.meta()?;
            if m.header.external_data_file()
                && m.header
                    .autoclear_features
                    .contains(AutoclearFeatures::DATA_FILE_RAW)
            {
                return Err(Error::Unsupported {
                    what: "a backing file for an image whose external data file is raw",
                    value: 0,
                });
            }
        }
        self.begin_write()?;
        self.finish()?;
        let mut m = self.meta()?;
        let mut new = *m.header;
        m.rewrite_cluster0(
            &mut new,
            &Cluster0Change {
                backing: Some(backing),
                ..Cluster0Change::default()
            },
        )?;
        self.reload_meta()
    }

    /// Changes the external data file's name as the header stores it (`Some(None)`: no name; `None`: kept),
    /// and turns
    /// `data_file_raw` off when `raw` is false (QEMU does not turn it on for an existing image). Only for
    /// images with an external data file.
    pub fn set_data_file(
        &mut self,
        name: Option<Option<&str>>,
        raw: bool,
    ) -> Result<(), Error<D::Error>> {
        let m = self.meta()?;
        if !m.header.external_data_file() {
            return Err(Error::Unsupported {
                what: "a data file name for an image without an external data file",
                value: 0,
            });
        }
        let is_raw = m
            .header
            .autoclear_features
            .contains(AutoclearFeatures::DATA_FILE_RAW);
        if raw && !is_raw {
            return Err(Error::Unsupported {
                what: "turning data_file_raw on for an existing image",
                value: 1,
            });
        }
        if let Some(Some(n)) = name
            && n.len() > crate::engine::MAX_DATA_FILE_NAME_LEN
        {
            return Err(Error::Unsupported {
                what: "a data file name longer than 1023 bytes",
                value: n.len() as u64,
            });
        }
        self.begin_write()?;
        self.finish()?;
        let mut m = self.meta()?;
        let mut new = *m.header;
        if !raw {
            new.autoclear_features
                .remove(AutoclearFeatures::DATA_FILE_RAW);
        }
        m.rewrite_cluster0(
            &mut new,
            &Cluster0Change {
                data_file: name,
                ..Cluster0Change::default()
            },
        )?;
        self.reload_meta()
    }

    /// Reads the top image's header and extensions again after the first cluster was rewritten.
    pub(super) fn reload_meta(&mut self) -> Result<(), Error<D::Error>> {
        let Image { layers, bounce, .. } = self;
        let layer = layers.first_mut().ok_or(Error::ReadOnly)?;
        let meta = crate::engine::open_qcow2(&mut layer.dev, bounce.as_mut(), layer.file_size)?;
        layer.meta = Some(meta);
        Ok(())
    }
}

impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// Whether a snapshot entry has less extra data than version 3 requires (the 64-bit vm state size and
    /// the disk size).
    fn snapshot_lacks_extra_data(&mut self) -> Result<bool, Error<D::Error>> {
        let mut at = self.header.snapshots_offset;
        for _ in 0..self.header.nb_snapshots {
            let s = self.entry_at(at)?;
            if s.extra_len < 16 {
                return Ok(true);
            }
            at = at.saturating_add(s.entry_len());
        }
        Ok(false)
    }
}
