//! The first cluster rewritten as QEMU's `qcow2_update_header` lays it out: the header, then the backing
//! format, external data file, encryption, feature name table, bitmaps and unknown extensions in that
//! order, the end marker and the backing file name, zeros after. A version change, a new backing file or a
//! new data file name leaves the bytes qemu-img leaves.
//!
//! QEMU writes the whole cluster at once; here a power loss at any moment leaves the old header or the new
//! one. Everything the engine reads to open an image is in the first 512-byte sector when the layout is
//! short, and a device writes a sector whole. When the old extensions or backing file name reach past that
//! sector, an interim header goes first: the old fields and extensions packed into sector 0 (without the
//! feature name table, which only names bits), the backing file name in sector 0 or past both layouts. Then
//! the new layout's bytes after sector 0, then its sector 0, each step after a flush.

use super::*;
use crate::format::{
    Extension, ExtensionHeader, ExtensionWalk, FEATURE_NAME_ENTRY_LEN, FEATURE_NAMES, FeatureName,
    V3_HEADER_LEN, extension,
};

/// The sector a device writes whole.
const SECTOR: usize = 512;
/// Most bytes of the first cluster a rewrite lays out (header, extensions, backing file name).
const MAX_LAYOUT: usize = 4096;

/// A backing file as the header names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackingFile<'a> {
    /// The file name, as stored (at most 1023 bytes).
    pub name: &'a str,
    /// The format name for the backing format extension (at most 15 bytes), if any.
    pub format: Option<&'a str>,
}

/// What a rewrite of the first cluster changes besides the header's fields; `None` keeps what the image
/// has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cluster0Change<'a> {
    /// The backing file (`Some(None)`: none).
    pub backing: Option<Option<BackingFile<'a>>>,
    /// The external data file name (`Some(None)`: no name stored).
    pub data_file: Option<Option<&'a str>>,
    /// The bitmaps extension (`Some(None)`: none; the header's autoclear bit must agree).
    pub bitmaps: Option<Option<BitmapsExtension>>,
    /// The full-disk-encryption extension: host offset and length of the LUKS area (`Some(None)`: none).
    #[cfg(feature = "luks")]
    pub encryption: Option<Option<(u64, u64)>>,
}

/// Bytes of the first cluster being laid out in a buffer that starts zeroed.
struct Layout<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl Layout<'_> {
    /// The next `n` bytes, or `None` when they do not fit.
    fn slot(&mut self, n: usize) -> Option<&mut [u8]> {
        let start = self.len;
        let end = start.checked_add(n)?;
        let slot = self.buf.get_mut(start..end)?;
        self.len = end;
        Some(slot)
    }

    fn put(&mut self, bytes: &[u8]) -> Option<()> {
        self.slot(bytes.len())?.copy_from_slice(bytes);
        Some(())
    }

    /// An extension's 8-byte header, its data left to the caller, and the padding to 8 bytes.
    fn extension(&mut self, magic: u32, len: usize) -> Option<(usize, usize)> {
        self.put(
            &ExtensionHeader {
                magic,
                len: u32::try_from(len).ok()?,
            }
            .emit(),
        )?;
        let at = self.len;
        self.slot(len.next_multiple_of(8))?;
        Some((at, len))
    }

    fn extension_with(&mut self, magic: u32, data: &[u8]) -> Option<()> {
        let (at, len) = self.extension(magic, data.len())?;
        self.buf
            .get_mut(at..at.checked_add(len)?)?
            .copy_from_slice(data);
        Some(())
    }
}

/// Which old extensions a layout keeps.
#[derive(Clone, Copy)]
enum Keep {
    /// Extensions of this type.
    Magic(u32),
    /// Extensions QEMU does not know (kept in their order).
    Unknown,
    /// Everything but the feature name table (the interim header).
    AllButFeatureNames,
}

impl Keep {
    fn keeps(self, magic: u32) -> bool {
        match self {
            Keep::Magic(m) => magic == m,
            Keep::Unknown => !matches!(
                magic,
                extension::END
                    | extension::BACKING_FORMAT
                    | extension::FEATURE_NAME_TABLE
                    | extension::BITMAPS
                    | extension::ENCRYPTION
                    | extension::DATA_FILE
            ),
            Keep::AllButFeatureNames => magic != extension::FEATURE_NAME_TABLE,
        }
    }
}

fn no_room<E>() -> Error<E> {
    Error::NoSpace {
        what: "the header, its extensions and the backing file name do not fit in the first cluster",
    }
}

fn interim_too_long<E>() -> Error<E> {
    Error::Unsupported {
        what: "rewriting a header whose extensions do not fit in its first 512 bytes",
        value: SECTOR as u64,
    }
}

fn too_long<E>() -> Error<E> {
    Error::Unsupported {
        what: "rewriting a header whose extensions and backing file name take more than 4 KiB",
        value: MAX_LAYOUT as u64,
    }
}

impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// The next extension of the image's (old) extension area.
    fn next_extension(
        &mut self,
        walk: &mut ExtensionWalk,
    ) -> Result<Option<Extension>, Error<D::Error>> {
        let Some(at) = walk.next_at() else {
            return Ok(None);
        };
        let mut raw = [0u8; 8];
        read_bytes(self.dev, bounce_of(self.bounce, 0), at, &mut raw)?;
        walk.advance(raw).map_err(Error::from_format)
    }

    /// Copies the old extensions `keep` selects into `out`, in their order. `Ok(false)`: no room.
    fn copy_extensions(
        &mut self,
        out: &mut Layout<'_>,
        keep: Keep,
    ) -> Result<bool, Error<D::Error>> {
        let mut walk = ExtensionWalk::new(self.header);
        while let Some(ext) = self.next_extension(&mut walk)? {
            if !keep.keeps(ext.magic) {
                continue;
            }
            let Some((at, len)) = out.extension(ext.magic, ext.len as usize) else {
                return Ok(false);
            };
            let dst = out
                .buf
                .get_mut(at..at.saturating_add(len))
                .ok_or(no_room())?;
            read_bytes(self.dev, bounce_of(self.bounce, 0), ext.data_at, dst)?;
        }
        Ok(true)
    }

    /// Where the old layout ends: the header, the extension area up to its end marker, the backing name.
    fn old_layout_end(&mut self) -> Result<u64, Error<D::Error>> {
        let mut end = u64::from(self.header.header_length);
        let mut walk = ExtensionWalk::new(self.header);
        loop {
            let at = walk.next_at();
            match self.next_extension(&mut walk)? {
                Some(ext) => {
                    end = end.max(
                        ext.data_at
                            .saturating_add(u64::from(ext.len).next_multiple_of(8)),
                    );
                }
                None => {
                    if let Some(at) = at {
                        end = end.max(at.saturating_add(8));
                    } else {
                        end = end.max(self.header.extensions_end());
                    }
                    break;
                }
            }
        }
        if self.header.backing_file_offset != 0 {
            end = end.max(
                self.header
                    .backing_file_offset
                    .saturating_add(self.header.backing_file_size.into()),
            );
        }
        Ok(end)
    }

    /// The fixed header `h` (with the old unknown header fields after it, when `h` is version 3).
    fn lay_out_header(
        &mut self,
        out: &mut Layout<'_>,
        h: &Header,
    ) -> Result<bool, Error<D::Error>> {
        let mut fixed = [0u8; V3_HEADER_LEN];
        let n = h.emit(&mut fixed).ok_or(no_room())?;
        if out.put(fixed.get(..n).unwrap_or(&[])).is_none() {
            return Ok(false);
        }
        let unknown = if self.header.version >= 3 {
            u64::from(self.header.header_length).saturating_sub(V3_HEADER_LEN as u64)
        } else {
            0
        };
        if h.version >= 3 && unknown > 0 {
            let Some(dst) = out.slot(usize::try_from(unknown).unwrap_or(usize::MAX)) else {
                return Ok(false);
            };
            read_bytes(
                self.dev,
                bounce_of(self.bounce, 0),
                V3_HEADER_LEN as u64,
                dst,
            )?;
        }
        Ok(true)
    }

    /// The old backing file name (read into `out` at its current end).
    fn lay_out_old_name(&mut self, out: &mut Layout<'_>) -> Result<bool, Error<D::Error>> {
        let (at, len) = (
            self.header.backing_file_offset,
            self.header.backing_file_size,
        );
        let Some(dst) = out.slot(len as usize) else {
            return Ok(false);
        };
        read_bytes(self.dev, bounce_of(self.bounce, 0), at, dst)?;
        Ok(true)
    }

    /// The new layout of the first cluster for header `new` (its backing name fields are set here).
    fn lay_out_new(
        &mut self,
        out: &mut Layout<'_>,
        new: &mut Header,
        change: &Cluster0Change<'_>,
    ) -> Result<bool, Error<D::Error>> {
        let header_len = out.len;
        if !self.lay_out_header(out, new)? {
            return Ok(false);
        }
        let fits = match change.backing {
            None => self.copy_extensions(out, Keep::Magic(extension::BACKING_FORMAT))?,
            Some(Some(BackingFile {
                format: Some(f), ..
            })) => out
                .extension_with(extension::BACKING_FORMAT, f.as_bytes())
                .is_some(),
            Some(_) => true,
        };
        if !fits {
            return Ok(false);
        }
        if new
            .incompatible_features
            .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE)
        {
            let fits = match change.data_file {
                None => self.copy_extensions(out, Keep::Magic(extension::DATA_FILE))?,
                Some(Some(name)) => out
                    .extension_with(extension::DATA_FILE, name.as_bytes())
                    .is_some(),
                Some(None) => true,
            };
            if !fits {
                return Ok(false);
            }
        }
        #[cfg(feature = "luks")]
        let fits = match change.encryption {
            None => self.copy_extensions(out, Keep::Magic(extension::ENCRYPTION))?,
            Some(Some((offset, len))) => {
                let mut data = [0u8; 16];
                let (a, b) = data.split_at_mut(8);
                a.copy_from_slice(&offset.to_be_bytes());
                b.copy_from_slice(&len.to_be_bytes());
                out.extension_with(extension::ENCRYPTION, &data).is_some()
            }
            Some(None) => true,
        };
        #[cfg(not(feature = "luks"))]
        let fits = self.copy_extensions(out, Keep::Magic(extension::ENCRYPTION))?;
        if !fits {
            return Ok(false);
        }
        if new.version >= 3 && self.g.tables.cluster_size > 4096 {
            let len = FEATURE_NAMES.len().saturating_mul(FEATURE_NAME_ENTRY_LEN);
            let Some((mut at, _)) = out.extension(extension::FEATURE_NAME_TABLE, len) else {
                return Ok(false);
            };
            for (kind, bit, name) in FEATURE_NAMES {
                let entry = FeatureName::emit_entry(kind, bit, name);
                let end = at.saturating_add(FEATURE_NAME_ENTRY_LEN);
                out.buf
                    .get_mut(at..end)
                    .ok_or(no_room())?
                    .copy_from_slice(&entry);
                at = end;
            }
        }
        if new.autoclear_features.contains(AutoclearFeatures::BITMAPS) {
            let fits = match change.bitmaps {
                None => self.copy_extensions(out, Keep::Magic(extension::BITMAPS))?,
                Some(Some(b)) => out.extension_with(extension::BITMAPS, &b.emit()).is_some(),
                Some(None) => true,
            };
            if !fits {
                return Ok(false);
            }
        }
        if !self.copy_extensions(out, Keep::Unknown)? || out.put(&[0u8; 8]).is_none() {
            return Ok(false);
        }
        let name_at = out.len as u64;
        let name_len = match change.backing {
            None if self.header.backing_file_offset != 0 => {
                if !self.lay_out_old_name(out)? {
                    return Ok(false);
                }
                self.header.backing_file_size
            }
            Some(Some(b)) => {
                if out.put(b.name.as_bytes()).is_none() {
                    return Ok(false);
                }
                u32::try_from(b.name.len()).map_err(|_| no_room())?
            }
            _ => 0,
        };
        (new.backing_file_offset, new.backing_file_size) = if name_len > 0 {
            (name_at, name_len)
        } else {
            (0, 0)
        };
        // The backing name's place is known only now: the fixed header again.
        let mut fixed = [0u8; V3_HEADER_LEN];
        let n = new.emit(&mut fixed).ok_or(no_room())?;
        out.buf
            .get_mut(header_len..header_len.saturating_add(n))
            .ok_or(no_room())?
            .copy_from_slice(fixed.get(..n).unwrap_or(&[]));
        Ok(true)
    }

    /// Rewrites the first cluster for header `new` (the caller's changed fields: version, feature bits,
    /// ...) and `change`, crash-safely (see the module's documentation). `new`'s `header_length` and
    /// backing name fields are set here; on success the in-memory header is `new`.
    pub(super) fn rewrite_cluster0(
        &mut self,
        new: &mut Header,
        change: &Cluster0Change<'_>,
    ) -> Result<(), Error<D::Error>> {
        let cs = self.g.tables.cluster_size;
        let limit = usize::try_from(cs).unwrap_or(usize::MAX).min(MAX_LAYOUT);
        if new.version >= 3 {
            new.header_length = self.header.header_length.max(V3_HEADER_LEN as u32);
            if self.header.version < 3 {
                new.header_length = V3_HEADER_LEN as u32;
            }
        } else {
            new.header_length = 72;
        }
        let mut buf = [0u8; MAX_LAYOUT];
        let mut out = Layout {
            buf: buf.get_mut(..limit).unwrap_or(&mut []),
            len: 0,
        };
        if !self.lay_out_new(&mut out, new, change)? {
            return Err(if limit < MAX_LAYOUT {
                no_room()
            } else {
                too_long()
            });
        }
        let new_end = out.len as u64;
        let old_end = self.old_layout_end()?;
        let sector = SECTOR as u64;

        // The interim header, when the old layout reaches past sector 0.
        let mut parked_name = None;
        if old_end > sector {
            let mut interim = [0u8; SECTOR];
            let mut out = Layout {
                buf: &mut interim,
                len: 0,
            };
            let old = *self.header;
            let header_len = out.len;
            if !self.lay_out_header(&mut out, &old)?
                || !self.copy_extensions(&mut out, Keep::AllButFeatureNames)?
                || out.put(&[0u8; 8]).is_none()
            {
                return Err(interim_too_long());
            }
            let mut h = old;
            if old.backing_file_offset != 0 {
                let len = u64::from(old.backing_file_size);
                h.backing_file_offset = if (out.len as u64).saturating_add(len) <= sector {
                    let at = out.len as u64;
                    if !self.lay_out_old_name(&mut out)? {
                        return Err(interim_too_long());
                    }
                    at
                } else {
                    // Past both layouts, written and flushed before the interim header names it.
                    let at = old_end.max(new_end).next_multiple_of(8);
                    if at.saturating_add(len) > cs {
                        return Err(Error::Unsupported {
                            what: "rewriting this header crash-safely: the first cluster has no room \
                                   to keep the backing file name meanwhile",
                            value: cs,
                        });
                    }
                    let mut name = [0u8; crate::format::MAX_BACKING_NAME_LEN];
                    let name = name.get_mut(..len as usize).ok_or(interim_too_long())?;
                    read_bytes(
                        self.dev,
                        bounce_of(self.bounce, 0),
                        old.backing_file_offset,
                        name,
                    )?;
                    self.write_dev(at, name)?;
                    self.flush_dev()?;
                    parked_name = Some((at, len));
                    at
                };
            }
            let mut fixed = [0u8; V3_HEADER_LEN];
            let n = h.emit(&mut fixed).ok_or(interim_too_long())?;
            interim
                .get_mut(header_len..header_len.saturating_add(n))
                .ok_or(interim_too_long())?
                .copy_from_slice(fixed.get(..n).unwrap_or(&[]));
            self.write_header(0, &interim)?;
        }

        // The new layout after sector 0, and zeros where the old one was.
        if new_end > sector {
            let tail = buf.get(SECTOR..out_len(new_end)).ok_or(no_room())?;
            self.write_dev(sector, tail)?;
        }
        let zero_from = new_end.max(sector);
        if old_end > zero_from {
            self.write_zeros(zero_from, old_end.saturating_sub(zero_from))?;
        }
        self.flush_dev()?;
        // The new sector 0 (zeros after a short layout).
        let first = buf.get(..SECTOR.min(limit)).ok_or(no_room())?;
        self.write_header(0, first)?;
        if let Some((at, len)) = parked_name {
            self.write_zeros(at, len)?;
            self.flush_dev()?;
        }
        *self.header = *new;
        Ok(())
    }
}

fn out_len(end: u64) -> usize {
    usize::try_from(end).unwrap_or(usize::MAX)
}
