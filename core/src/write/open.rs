//! Opening for writing (a corrupt image is refused, a dirty one repaired or refused) and the life of a
//! request: begin (checks, verification before the first write, header preparation), end, flush, close.

use super::*;

/// Refuses a corrupt image and repairs (or, without `dirty-repair`, refuses) a dirty one, for
/// [`Image::open_writable`]. Returns whether lazy refcounts are in effect for the writer.
fn make_writable<
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
    const DEPTH: usize,
    const SLICES: usize,
>(
    layers: &mut Vec<Layer<D>, DEPTH>,
    bounce: &mut [u8],
    cache: &mut SliceCache<B, SLICES>,
) -> Result<bool, Error<D::Error>> {
    let layer = layers.first_mut().ok_or(Error::ReadOnly)?;
    let header = &layer.meta.as_ref().ok_or(Error::ReadOnly)?.header;
    let incompatible = header.incompatible_features;
    let lazy = header
        .compatible_features
        .contains(CompatibleFeatures::LAZY_REFCOUNTS);
    if incompatible.contains(IncompatibleFeatures::CORRUPT) {
        return Err(corrupt(
            "the image is marked corrupt; repair it (check -r all) before writing",
            0,
        ));
    }
    if incompatible.contains(IncompatibleFeatures::DIRTY) {
        #[cfg(feature = "dirty-repair")]
        rebuild_refcounts(layer, bounce, cache)?;
        #[cfg(not(feature = "dirty-repair"))]
        return Err(Error::NeedsRepair {
            what: "the image is dirty (lazy refcounts were not written back); repair it (check -r all) \
                   before writing",
        });
    }
    #[cfg(not(feature = "dirty-repair"))]
    let _ = (bounce, cache);
    // Without `dirty-repair` a dirty image could not be reopened for writing: keep refcounts eager.
    Ok(lazy && cfg!(feature = "dirty-repair"))
}

/// Rebuilds the refcounts of a dirty image (after a crash with lazy refcounts) and re-reads its header.
#[cfg(feature = "dirty-repair")]
fn rebuild_refcounts<D: BlockDeviceWrite, B: AsRef<[u8]> + AsMut<[u8]>, const SLICES: usize>(
    layer: &mut Layer<D>,
    bounce: &mut [u8],
    cache: &mut SliceCache<B, SLICES>,
) -> Result<(), Error<D::Error>> {
    // The metadata cache is empty at this point: its buffer is the repair's scratch memory.
    let scratch = cache.scratch()?;
    let report = crate::check::repair(
        &mut layer.dev,
        bounce,
        scratch,
        crate::check::RepairMode::All,
        &mut crate::check::NoSink,
    )?;
    if report.corruptions != 0 {
        return Err(corrupt(
            "the dirty image's refcounts could not be rebuilt",
            report.corruptions,
        ));
    }
    cache.invalidate(None);
    let size = layer.dev.size()?;
    let meta = crate::engine::open_qcow2(&mut layer.dev, bounce, size)?;
    layer.meta = Some(meta);
    layer.file_size = size;
    Ok(())
}

impl<D, B, C, const DEPTH: usize, const SLICES: usize> Image<D, B, C, DEPTH, SLICES, WriteState>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// Opens the qcow2 image on `dev` for reading and writing (its backing chain stays read-only; an
    /// external data file, which the resolver supplies, is written too).
    ///
    /// Refuses images with the corrupt bit set, and metadata caches of fewer than [`MIN_WRITE_SLICES`] slices.
    /// A dirty image (lazy refcounts after a crash) has its refcounts rebuilt before this returns (feature
    /// `dirty-repair`, on by default); without that feature it is refused with [`Error::NeedsRepair`] and
    /// left as it is: [`crate::check::repair`] it (mode `All`), then open it again. Before the first write,
    /// unknown autoclear bits are cleared and enabled persistent bitmaps are marked in use; writes set their
    /// bits, and [`Image::close`] marks them consistent again (see `write::bitmaps`).
    ///
    /// Writes keep QEMU's crash-safety rules (see [`crate::write`]): after a power loss
    /// the image may leak clusters but never loses flushed data or references a cluster whose refcount is too
    /// low. [`Image::flush`] makes everything written before it durable; [`Image::close`] also clears the
    /// dirty bit of a lazy-refcounts image. Without `dirty-repair` the engine never sets the dirty bit: it
    /// writes the refcounts of a lazy-refcounts image back as it does for any other, so that whatever it
    /// leaves behind (even after a power loss) opens for writing again.
    pub fn open_writable<R: Resolver<D>>(
        dev: D,
        buffers: Buffers<B>,
        decompressor: C,
        resolver: &mut R,
    ) -> Result<Self, Error<D::Error>> {
        if resolver.skip_backing() {
            return Err(Error::Unsupported {
                what: "writing an image opened without its backing file",
                value: 0,
            });
        }
        if SLICES < MIN_WRITE_SLICES {
            return Err(Error::BufferTooSmall {
                what: "metadata slice count for writing",
                need: MIN_WRITE_SLICES as u64,
                have: SLICES as u64,
            });
        }
        // As `open_as`, with the checks and the repair in between: the image value is built once, where it is
        // returned.
        let Buffers {
            mut bounce,
            metadata,
        } = buffers;
        let mut cache = SliceCache::new(metadata)?;
        let mut layers = Vec::new();
        Self::open_chain(&mut layers, dev, Format::Qcow2, bounce.as_mut(), resolver)?;
        // An encrypted image is written only with its key (its data could not be read or written).
        #[cfg(any(feature = "luks", feature = "aes-legacy"))]
        if let Some(top) = layers.first() {
            crate::engine::key_of::<D::Error>(&top.key, top.encrypted())?;
        }
        let lazy = make_writable(&mut layers, bounce.as_mut(), &mut cache)?;
        Ok(Image {
            layers,
            bounce,
            cache,
            decompressor,
            w: WriteState {
                writable: true,
                lazy,
                free_hint: 1,
                ..WriteState::default()
            },
        })
    }

    /// Whether the image was opened for writing (and has not been stopped by a corruption).
    pub fn is_writable(&self) -> bool {
        self.w.writable
    }

    /// Checks that writing is allowed and prepares the header on the first write.
    pub(super) fn begin_write(&mut self) -> Result<(), Error<D::Error>> {
        self.begin_write_over(0, 0)
    }

    /// Checks that writing is allowed, verifies the metadata before the first write, refuses a request over
    /// guest bytes `[offset, offset + len)` whose entries name metadata ([`Self::guard_guest_range`]), and
    /// prepares the header on the first write: in that order, so that a refusal changes nothing but the
    /// corrupt bit.
    pub(super) fn begin_write_over(
        &mut self,
        offset: u64,
        len: u64,
    ) -> Result<(), Error<D::Error>> {
        if !self.w.writable {
            return Err(Error::ReadOnly);
        }
        if !self.w.verified {
            // Nothing has been written yet: a refusal sets the corrupt bit and changes nothing else.
            let verified = self.meta()?.verify_metadata();
            let verified = match verified {
                Ok(()) => self.meta()?.verify_references().map(|_| ()),
                Err(e) => Err(e),
            };
            match verified {
                Ok(()) => self.w.verified = true,
                Err(Error::Corrupt { what, offset }) => {
                    return Err(self.meta()?.mark_corrupt(what, offset));
                }
                Err(e) => return Err(e),
            }
        }
        if len != 0 {
            self.guard_guest_range(offset, len)?;
        }
        if !self.w.started {
            self.start_writing()?;
        }
        if len != 0 && self.w.tracks_bitmaps() {
            self.meta()?.mark_bitmaps(offset, len)?;
        }
        Ok(())
    }

    /// Prepares the header for the first write: unknown autoclear bits cleared, the bitmaps kept up to date
    /// from now on (or disowned when their directory is not valid), the dirty bit set for lazy refcounts.
    fn start_writing(&mut self) -> Result<(), Error<D::Error>> {
        let bitmaps = self.layers.first().and_then(|l| l.meta).and_then(|m| {
            m.header
                .autoclear_features
                .contains(AutoclearFeatures::BITMAPS)
                .then_some(m.bitmaps)
                .flatten()
        });
        let mut m = self.meta()?;
        if m.header.version >= 3 {
            let mut known = AutoclearFeatures::DATA_FILE_RAW;
            if bitmaps.is_some() {
                known |= AutoclearFeatures::BITMAPS;
            }
            let keep = m.header.autoclear_features & known;
            let raw = m.header.autoclear_features.bits();
            if raw != keep.bits() {
                m.write_header(field::AUTOCLEAR_FEATURES, &keep.bits().to_be_bytes())?;
                m.header.autoclear_features = keep;
            }
            if let Some(b) = bitmaps
                && !m.start_bitmaps(b)?
            {
                m.disown_bitmaps()?;
            }
            if m.w.lazy && !m.w.dirty_bit {
                let bits = m.header.incompatible_features | IncompatibleFeatures::DIRTY;
                m.write_header(field::INCOMPATIBLE_FEATURES, &bits.bits().to_be_bytes())?;
                m.header.incompatible_features = bits;
                m.w.dirty_bit = true;
            }
        }
        m.w.started = true;
        Ok(())
    }

    /// Ends a request: frees what it dropped and keeps the cache from filling with dirty slices.
    pub(super) fn end_write(&mut self) -> Result<(), Error<D::Error>> {
        let mut m = self.meta()?;
        m.commit_frees()?;
        if m.cache.dirty_count().saturating_mul(2) > SLICES {
            m.writeback_all()?;
        }
        Ok(())
    }

    /// Writes back every cached metadata change in crash-safe order and flushes the device.
    pub fn flush(&mut self) -> Result<(), Error<D::Error>> {
        if !self.w.writable {
            return Ok(());
        }
        let mut m = self.meta()?;
        m.commit_frees()?;
        m.writeback_all()?;
        m.flush_dev()
    }

    /// Flushes, clears the dirty bit (lazy refcounts) and gives the device back.
    pub fn close(mut self) -> Result<D, Error<D::Error>> {
        self.finish()?;
        // Taken out in place: the backing images are dropped, the top one popped.
        self.layers.truncate(1);
        self.layers.pop().map(|l| l.dev).ok_or(Error::ReadOnly)
    }

    /// What [`Image::close`] writes: everything cached, then the cleared dirty bit.
    #[inline(never)]
    pub(super) fn finish(&mut self) -> Result<(), Error<D::Error>> {
        if self.w.writable {
            self.flush()?;
            let mut m = self.meta()?;
            m.end_bitmaps()?;
            // A later write prepares the header (and the bitmaps) again.
            m.w.started = false;
            if m.w.dirty_bit {
                let bits = m.header.incompatible_features & !IncompatibleFeatures::DIRTY;
                m.write_header(field::INCOMPATIBLE_FEATURES, &bits.bits().to_be_bytes())?;
                m.header.incompatible_features = bits;
                m.w.dirty_bit = false;
            }
        }
        Ok(())
    }
}
