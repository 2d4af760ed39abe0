//! On-disk types and nothing else: pure functions over byte slices, no I/O.
//!
//! Parsing validates fully once ([`Header::parse`], [`ExtensionWalk`]); the entry decoders
//! ([`L1Entry`], [`L2Entry`], [`CompressedDescriptor`], [`refcount_get`]) take raw words and report anything
//! invalid as a typed result, never a panic.

pub mod bitmap;
mod entry;
mod error;
mod extensions;
mod header;
pub mod luks;
mod snapshot;

pub use entry::*;
pub use error::FormatError;
pub use extensions::*;
pub use header::*;
pub(crate) use header::{be32, be64};
pub use snapshot::*;

use bitflags::bitflags;

/// Smallest `cluster_bits` (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest `cluster_bits` QEMU accepts (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need clusters of at least 16 KiB.
pub const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// Largest `refcount_order` (64-bit refcounts).
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// QEMU's `QCOW_MAX_L1_SIZE`: an L1 table is at most 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 * 1024 * 1024;
/// QEMU's `QCOW_MAX_REFTABLE_SIZE`: a refcount table is at most 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 * 1024 * 1024;
/// Largest host offset an entry can hold (bits 0..=55).
pub const MAX_HOST_OFFSET: u64 = (1 << 56) - 1;
/// QEMU's limit on the number of internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// QEMU's limit on a backing file name's length.
pub const MAX_BACKING_NAME_LEN: usize = 1023;
/// Longest backing format name QEMU accepts in the extension (its length must be below 16).
pub const MAX_BACKING_FORMAT_LEN: usize = 15;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

bitflags! {
    /// Incompatible feature bits (header offset 72). Unknown bits are kept: an image with any is refused.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct IncompatibleFeatures: u64 {
        /// Refcounts may be stale (lazy refcounts): a writer must repair before writing.
        const DIRTY = 1 << 0;
        /// The image is corrupt: read-only use only.
        const CORRUPT = 1 << 1;
        /// Guest data lives in an external data file.
        const EXTERNAL_DATA_FILE = 1 << 2;
        /// The `compression_type` field is not deflate.
        const COMPRESSION_TYPE = 1 << 3;
        /// L2 entries are 16 bytes with a subcluster bitmap.
        const EXTENDED_L2 = 1 << 4;
    }

    /// Compatible feature bits (header offset 80).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct CompatibleFeatures: u64 {
        /// Lazy refcounts: refcount updates may be delayed, the dirty bit carries the promise.
        const LAZY_REFCOUNTS = 1 << 0;
    }

    /// Autoclear feature bits (header offset 88): a writer that does not understand one clears it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct AutoclearFeatures: u64 {
        /// The bitmaps extension is consistent with the image.
        const BITMAPS = 1 << 0;
        /// The external data file is valid as a raw image on its own.
        const DATA_FILE_RAW = 1 << 1;
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for IncompatibleFeatures {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "{=u64:#x}", self.bits())
    }
}
#[cfg(feature = "defmt")]
impl defmt::Format for CompatibleFeatures {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "{=u64:#x}", self.bits())
    }
}
#[cfg(feature = "defmt")]
impl defmt::Format for AutoclearFeatures {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "{=u64:#x}", self.bits())
    }
}

/// The compression method of compressed clusters (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum CompressionType {
    /// Raw deflate (QEMU calls it zlib).
    Deflate = 0,
    /// Zstandard frames.
    Zstd = 1,
}

impl CompressionType {
    /// The name qemu-img prints.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Deflate => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// Header extension types.
pub mod extension {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_NAME_TABLE: u32 = 0x6803_f857;
    /// Bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const ENCRYPTION: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// Length of one feature name table entry.
pub const FEATURE_NAME_ENTRY_LEN: usize = 48;
/// Longest feature name.
pub const FEATURE_NAME_LEN: usize = 46;

/// The feature name table QEMU writes, in its order: `(type, bit, name)`, type 0 for incompatible, 1 for
/// compatible and 2 for autoclear features.
pub const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// A feature's name from the feature name table (empty when the table does not name it).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FeatureName {
    bytes: [u8; FEATURE_NAME_LEN],
    len: u8,
}

impl FeatureName {
    /// No name.
    pub const EMPTY: FeatureName = FeatureName {
        bytes: [0; FEATURE_NAME_LEN],
        len: 0,
    };

    /// Decodes a feature table entry: `(type, bit, name)`.
    pub fn parse_entry(entry: &[u8; FEATURE_NAME_ENTRY_LEN]) -> (u8, u8, FeatureName) {
        let [ty, bit, rest @ ..] = *entry;
        let len = rest
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(FEATURE_NAME_LEN);
        let mut bytes = rest;
        // Keep only printable ASCII so the name can be shown as it is.
        for c in bytes.iter_mut() {
            if !(0x20..0x7f).contains(c) {
                *c = b'?';
            }
        }
        (
            ty,
            bit,
            FeatureName {
                bytes,
                len: len as u8,
            },
        )
    }

    /// Encodes a feature table entry: `kind` (the type), `bit`, and `name` zero-padded (cut at
    /// [`FEATURE_NAME_LEN`] bytes).
    pub fn emit_entry(kind: u8, bit: u8, name: &str) -> [u8; FEATURE_NAME_ENTRY_LEN] {
        let mut entry = [0u8; FEATURE_NAME_ENTRY_LEN];
        for (dst, src) in entry
            .iter_mut()
            .zip([kind, bit].iter().chain(name.as_bytes()))
        {
            *dst = *src;
        }
        entry
    }

    /// Whether there is no name.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        let bytes = self.bytes.get(..usize::from(self.len)).unwrap_or(&[]);
        core::str::from_utf8(bytes).unwrap_or("?")
    }
}

impl core::fmt::Debug for FeatureName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// Copies `src` into `dst` when their lengths agree (callers make them agree), `None` otherwise. Unlike
/// `copy_from_slice`, which at opt-level "z" stays an outlined call with a panic in it, this leaves no panic
/// path (the zip becomes a `memcpy`).
#[inline]
/// Copies as many bytes as both slices have (no length check that could panic).
pub(crate) fn copy_prefix(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = *s;
    }
}

pub(crate) fn copy_exact(dst: &mut [u8], src: &[u8]) -> Option<()> {
    if dst.len() != src.len() {
        return None;
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = *s;
    }
    Some(())
}
