//! Reading: a guest range mapped run by run and each run read straight into the caller's buffer (data),
//! zero-filled, or streamed through the decompressor (compressed clusters).

use super::*;

/// The parts of an [`Image`] that reading needs, borrowed one by one so that a writer can lend the rest of
/// the bounce buffer out as a copy buffer while it reads.
pub(crate) struct Reader<'a, D, B, C, const SLICES: usize> {
    pub(crate) layers: &'a mut [Layer<D>],
    pub(crate) bounce: &'a mut [u8],
    pub(crate) cache: &'a mut SliceCache<B, SLICES>,
    pub(crate) decompressor: &'a mut C,
}

/// Reads the compressed bytes of one cluster from a device.
pub(super) struct DeviceSource<'a, D: BlockDevice> {
    dev: &'a mut D,
    bounce: &'a mut [u8],
    pos: u64,
    remaining: u64,
    error: Option<D::Error>,
}

impl<D: BlockDevice> CompressedSource for DeviceSource<'_, D> {
    fn remaining(&self) -> u64 {
        self.remaining
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, DecompressError> {
        let n = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let dst = buf.get_mut(..n).ok_or(DecompressError::Source)?;
        match read_bytes(self.dev, self.bounce, self.pos, dst) {
            Ok(()) => {}
            Err(Error::Io(e)) => {
                self.error = Some(e);
                return Err(DecompressError::Source);
            }
            Err(_) => return Err(DecompressError::Corrupt("unreadable compressed data")),
        }
        self.pos = self.pos.saturating_add(n as u64);
        self.remaining = self.remaining.saturating_sub(n as u64);
        Ok(n)
    }
}

/// Reads the encrypted bytes at host offset `host` into `out` and decrypts them, the IV of each 512-byte
/// sector made from `iv_at` (the host or guest offset of `out`'s first byte, which has the same place in
/// its sector). A run that starts or ends inside a sector decrypts that whole sector on the stack.
#[cfg(any(feature = "luks", feature = "aes-legacy"))]
pub(crate) fn read_decrypted<D: BlockDevice>(
    dev: &mut D,
    bounce: &mut [u8],
    key: &crate::crypto::DiskKey,
    host: u64,
    iv_at: u64,
    out: &mut [u8],
) -> Result<(), Error<D::Error>> {
    use crate::crypto::{Direction, SECTOR};
    let mut done = 0usize;
    while done < out.len() {
        let h = host.saturating_add(done as u64);
        let at = iv_at.saturating_add(done as u64);
        let skip = (h & crate::crypto::SECTOR_MASK) as usize;
        let rest = out.len().saturating_sub(done);
        if skip == 0 && rest >= SECTOR {
            let n = rest & !(SECTOR.wrapping_sub(1));
            let part = out.get_mut(done..done.saturating_add(n)).unwrap_or(&mut []);
            read_bytes(dev, bounce, h, part)?;
            key.apply_at(at, part, Direction::Decrypt);
            done = done.saturating_add(n);
        } else {
            let mut whole = [0u8; SECTOR];
            read_bytes(dev, bounce, h.saturating_sub(skip as u64), &mut whole)?;
            key.apply_at(
                at.saturating_sub(skip as u64),
                &mut whole,
                Direction::Decrypt,
            );
            let n = SECTOR.saturating_sub(skip).min(rest);
            let src = whole.get(skip..skip.saturating_add(n)).unwrap_or(&[]);
            crate::format::copy_prefix(out.get_mut(done..).unwrap_or(&mut []), src);
            done = done.saturating_add(n.max(1));
        }
    }
    Ok(())
}

impl<D, B, C, const DEPTH: usize, const SLICES: usize, W> Image<D, B, C, DEPTH, SLICES, W>
where
    D: BlockDevice,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<(), Error<D::Error>> {
        let size = self.virtual_size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    /// Reads `buf.len()` guest bytes at `offset`.
    ///
    /// Each run of contiguous allocated clusters is one device read straight into `buf`; zero and
    /// unallocated runs are filled; compressed clusters stream through the decompressor into `buf`.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Error<D::Error>> {
        self.check_range(offset, buf.len() as u64)?;
        self.reader().read(offset, buf)
    }

    pub(crate) fn reader(&mut self) -> Reader<'_, D, B, C, SLICES> {
        Reader {
            layers: &mut self.layers,
            bounce: self.bounce.as_mut(),
            cache: &mut self.cache,
            decompressor: &mut self.decompressor,
        }
    }
}

impl<D, B, C, const SLICES: usize> Reader<'_, D, B, C, SLICES>
where
    D: BlockDevice,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    pub(super) fn virtual_size(&self) -> u64 {
        self.layers.first().map_or(0, |l| l.size)
    }

    /// Reads guest bytes (the range must lie inside the virtual disk).
    pub(crate) fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Error<D::Error>> {
        let mut pos = offset;
        let mut rest = buf;
        while !rest.is_empty() {
            let m = self.map_from(0, pos, rest.len() as u64)?;
            let n = usize::try_from(m.len).unwrap_or(usize::MAX).min(rest.len());
            let (head, tail) = rest.split_at_mut(n);
            self.read_run(m, pos, head)?;
            pos = pos.saturating_add(n as u64);
            rest = tail;
        }
        Ok(())
    }

    /// Reads the run `m` of guest bytes starting at guest offset `guest` into `out`.
    pub(super) fn read_run(
        &mut self,
        m: Mapping,
        guest: u64,
        out: &mut [u8],
    ) -> Result<(), Error<D::Error>> {
        let Reader {
            layers,
            bounce,
            decompressor,
            ..
        } = self;
        match m.source {
            Source::Zero { .. } | Source::PastEnd { .. } | Source::Unallocated { .. } => {
                out.fill(0);
                Ok(())
            }
            Source::Data { host, external } => {
                let layer = layers.get_mut(m.depth).ok_or(corrupt("chain", 0))?;
                #[cfg(any(feature = "luks", feature = "aes-legacy"))]
                {
                    let encrypted = layer.encrypted();
                    let Layer { dev, data, key, .. } = layer;
                    if let Some(key) = key_of(key, encrypted)? {
                        let at = if key.physical() { host } else { guest };
                        let dev = match data.as_mut() {
                            Some(d) if external => d,
                            _ => dev,
                        };
                        return read_decrypted(dev, bounce, key, host, at, out);
                    }
                }
                #[cfg(not(any(feature = "luks", feature = "aes-legacy")))]
                let _ = guest;
                let dev = if external {
                    layer.data.as_mut().ok_or(corrupt("data file", host))?
                } else {
                    &mut layer.dev
                };
                read_bytes(dev, bounce, host, out)
            }
            Source::Compressed { descriptor, skip } => {
                let layer = layers.get_mut(m.depth).ok_or(corrupt("chain", 0))?;
                let meta = layer
                    .meta
                    .ok_or(corrupt("compressed cluster in a raw image", 0))?;
                let cluster_size = meta.header.cluster_size() as usize;
                // Bytes past the end of the device read as zeros (as QEMU reads them); the descriptor's length is at
                // most two clusters, so this stays bounded.
                let available = descriptor.len;
                let mut src = DeviceSource {
                    dev: &mut layer.dev,
                    bounce,
                    pos: descriptor.offset,
                    remaining: available,
                    error: None,
                };
                let key = (m.depth as u8, descriptor.offset);
                let ty = meta.header.compression_type;
                let res =
                    decompressor.decompress(ty, key, &mut src, cluster_size, skip as usize, out);
                match res {
                    Ok(()) => Ok(()),
                    Err(DecompressError::Source) => match src.error.take() {
                        Some(e) => Err(Error::Io(e)),
                        None => Err(Error::Decompress {
                            offset: descriptor.offset,
                            problem: "unreadable",
                        }),
                    },
                    Err(DecompressError::Corrupt(problem)) => Err(Error::Decompress {
                        offset: descriptor.offset,
                        problem,
                    }),
                    Err(DecompressError::Unsupported(what)) => Err(Error::Unsupported {
                        what,
                        value: match ty {
                            CompressionType::Deflate => 0,
                            CompressionType::Zstd => 1,
                        },
                    }),
                }
            }
        }
    }
}
