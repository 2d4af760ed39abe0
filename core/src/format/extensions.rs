//! The header extension area: the one walk over it that every reader of the image uses (the engine's open, the
//! check, and anything else that looks for an extension), so that they all see the same extensions.
//!
//! The area runs from the end of the header (`header_length`) to the backing file name, or to the end of the
//! first cluster when there is none ([`Header::extensions_end`]). Like QEMU's `qcow2_read_extensions`, the walk
//! has no count limit of its own: it goes on until an end marker or the end of the area, and an extension
//! header or data that does not fit in the area is an error. Each extension takes at least 8 bytes, so a walk
//! takes at most `cluster_size / 8` steps (262144 with 2 MiB clusters).
//!
//! [`ExtensionWalk`] is the walk as a state machine that does no I/O: the caller reads the 8 bytes at
//! [`ExtensionWalk::next_at`] however it reads the image and hands them to [`ExtensionWalk::advance`].
//! [`Extensions`] runs the same walk over the bytes of the first cluster when the caller holds them.

use super::Header;

/// One header extension found by the walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Extension {
    /// Extension type ([`super::extension`]).
    pub magic: u32,
    /// Length of the data (without padding).
    pub len: u32,
    /// Host offset of the extension's own 8-byte header (in the first cluster).
    pub header_at: u64,
    /// Host offset of the extension's data.
    pub data_at: u64,
}

/// The 8-byte header of one header extension, as a writer emits it (the walk below parses it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtensionHeader {
    /// Extension type ([`super::extension`]).
    pub magic: u32,
    /// Length of the data that follows (without padding).
    pub len: u32,
}

impl ExtensionHeader {
    /// The 8 bytes on disk: type, then length, big-endian.
    pub fn emit(self) -> [u8; 8] {
        ((u64::from(self.magic) << 32) | u64::from(self.len)).to_be_bytes()
    }
}

/// The walk over the header extension area: where to read next, and what the 8 bytes read there mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ExtensionWalk {
    at: u64,
    end: u64,
    done: bool,
}

impl ExtensionWalk {
    /// The walk over the extension area of the image whose header is `header`.
    pub fn new(header: &Header) -> ExtensionWalk {
        ExtensionWalk {
            at: u64::from(header.header_length),
            end: header.extensions_end(),
            done: false,
        }
    }

    /// Host offset of the next 8-byte extension header to read, or `None` when the walk is over (an end
    /// marker was read, or the area is exhausted).
    pub fn next_at(&self) -> Option<u64> {
        (!self.done && self.at < self.end).then_some(self.at)
    }

    /// Decodes the 8 bytes read at [`ExtensionWalk::next_at`]: the extension, or `None` at the end marker.
    /// An extension whose header or data runs past the end of the area is an error (QEMU's "Header extension
    /// too large").
    pub fn advance(&mut self, raw: [u8; 8]) -> Result<Option<Extension>, super::FormatError> {
        let header_at = self.at;
        let [a, b, c, d, e, f, g, h] = raw;
        let magic = u32::from_be_bytes([a, b, c, d]);
        let len = u32::from_be_bytes([e, f, g, h]);
        self.done = true;
        let data_at = header_at.checked_add(8).filter(|&d| d <= self.end).ok_or(
            super::FormatError::InvalidHeader {
                field: "header extension",
                value: header_at,
                problem: "extension header past the end of the extension area",
            },
        )?;
        if u64::from(len) > self.end.saturating_sub(data_at) {
            return Err(super::FormatError::InvalidHeader {
                field: "header extension length",
                value: len.into(),
                problem: "extension runs past the end of the extension area",
            });
        }
        if magic == super::extension::END {
            return Ok(None);
        }
        self.at = data_at.saturating_add(u64::from(len).next_multiple_of(8));
        self.done = false;
        Ok(Some(Extension {
            magic,
            len,
            header_at,
            data_at,
        }))
    }
}

/// The walk over the bytes of the first cluster (`cluster0` starts at host offset 0). Bytes past the end of
/// `cluster0` read as zeros (an end marker), as QEMU reads past the end of a short file.
#[derive(Debug)]
pub struct Extensions<'a> {
    walk: ExtensionWalk,
    cluster0: &'a [u8],
}

impl<'a> Extensions<'a> {
    /// The extensions of the image whose header is `header` and whose first bytes are `cluster0`.
    pub fn new(header: &Header, cluster0: &'a [u8]) -> Extensions<'a> {
        Extensions {
            walk: ExtensionWalk::new(header),
            cluster0,
        }
    }
}

impl Iterator for Extensions<'_> {
    type Item = Result<Extension, super::FormatError>;

    fn next(&mut self) -> Option<Self::Item> {
        let at = self.walk.next_at()?;
        let mut raw = [0u8; 8];
        let start = usize::try_from(at).unwrap_or(usize::MAX);
        for (i, b) in raw.iter_mut().enumerate() {
            *b = self
                .cluster0
                .get(start.saturating_add(i))
                .copied()
                .unwrap_or(0);
        }
        self.walk.advance(raw).transpose()
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::format::extension;

    /// The tiny image's header as if its clusters were 64 KiB, and a first cluster holding `exts`.
    fn image(exts: &[(u32, &[u8])]) -> (Header, Vec<u8>) {
        let tiny = crate::testimage::tiny_qcow2();
        let mut header = Header::parse(&tiny[..]).unwrap_or_else(|_| unreachable!());
        header.cluster_bits = 16;
        let mut img = tiny[..512].to_vec();
        img.resize(64 * 1024, 0);
        let mut at = header.header_length as usize;
        for (magic, data) in exts {
            img[at..at + 4].copy_from_slice(&magic.to_be_bytes());
            img[at + 4..at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
            img[at + 8..at + 8 + data.len()].copy_from_slice(data);
            at += 8 + data.len().next_multiple_of(8);
        }
        img[at..at + 8].fill(0);
        (header, img)
    }

    #[test]
    fn walks_to_the_end_marker_without_a_count_limit() {
        // 5000 empty unknown extensions, then a backing format extension: all seen.
        let mut exts: Vec<(u32, &[u8])> = vec![(0x1234_5678, &[]); 5000];
        exts.push((extension::BACKING_FORMAT, b"raw"));
        let (header, img) = image(&exts);
        let found: Vec<_> = Extensions::new(&header, &img)
            .collect::<Result<_, _>>()
            .unwrap_or_else(|_| unreachable!());
        assert_eq!(found.len(), 5001);
        assert_eq!(found[5000].magic, extension::BACKING_FORMAT);
        assert_eq!(found[5000].len, 3);
    }

    #[test]
    fn an_extension_past_the_area_is_an_error() {
        let (mut header, img) = image(&[(0x1234_5678, &[0; 16])]);
        assert_eq!(Extensions::new(&header, &img).count(), 1);
        // The backing name starts inside the extension's data.
        header.backing_file_offset = u64::from(header.header_length) + 16;
        let r: Result<Vec<_>, _> = Extensions::new(&header, &img).collect();
        assert!(r.is_err());
        // An extension header cut by the end of the area is an error too (even an end marker).
        header.backing_file_offset = u64::from(header.header_length) + 4;
        let r: Result<Vec<_>, _> = Extensions::new(&header, &img).collect();
        assert!(r.is_err());
    }
}
