//! The engine's one error type.

use core::fmt;

use crate::format::luks::LuksError;
use crate::format::{FeatureName, FormatError};

/// Everything that can go wrong, generic over the device's own error `E`.
///
/// Messages use qcow2's own terms and name the field or structure that failed, with its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error<E> {
    /// The block device (or a backing or data-file device) failed.
    Io(E),
    /// The first four bytes are not qcow2's magic `QFI\xfb`.
    NotQcow2 {
        /// The magic that was found.
        magic: u32,
    },
    /// A header version other than 2 or 3.
    UnsupportedVersion(u32),
    /// A header field (or header extension) that no valid image has.
    InvalidHeader {
        /// The field's name as the qcow2 specification spells it.
        field: &'static str,
        /// The value found.
        value: u64,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// An incompatible feature bit that this engine does not know; the image must not be opened.
    UnknownIncompatibleFeature {
        /// The lowest unknown bit.
        bit: u8,
        /// Its name from the image's feature name table, if the table names it.
        name: FeatureName,
    },
    /// A valid image that uses something this engine (or this build of it) does not do.
    Unsupported {
        /// What is not supported.
        what: &'static str,
        /// The value that selected it (a method number, a bit, ...).
        value: u64,
    },
    /// Metadata found while working is inconsistent (QEMU would mark the image corrupt).
    Corrupt {
        /// What is wrong.
        what: &'static str,
        /// Where: the host offset of the offending entry, or the offending value.
        offset: u64,
    },
    /// A guest request outside the virtual disk.
    OutOfRange {
        /// First byte requested.
        offset: u64,
        /// Length requested.
        len: u64,
        /// The virtual disk size.
        size: u64,
    },
    /// A caller-supplied buffer (or capacity) is too small or badly sized for this image or device.
    BufferTooSmall {
        /// Which buffer.
        what: &'static str,
        /// Bytes (or entries) needed.
        need: u64,
        /// Bytes (or entries) given.
        have: u64,
    },
    /// The device reports a block size that is not a power of two in 512..=65536.
    BadBlockSize(usize),
    /// The image needs a backing file or external data file that the caller could not or would not supply.
    Unavailable {
        /// Which file, and why.
        what: &'static str,
    },
    /// The backing chain is longer than the engine's capacity (or loops).
    ChainTooDeep {
        /// The capacity that was exceeded.
        limit: usize,
    },
    /// A compressed cluster does not decompress to exactly one cluster.
    Decompress {
        /// Host offset of the compressed data.
        offset: u64,
        /// What went wrong.
        problem: &'static str,
    },
    /// The image is open read-only (or may only be opened read-only: corrupt bit set).
    ReadOnly,
    /// The image must be repaired before it can be opened for writing (a dirty lazy-refcounts image, when
    /// the engine is built without the `dirty-repair` feature): [`crate::check::repair`] it and open again.
    NeedsRepair {
        /// What is wrong, and what to do.
        what: &'static str,
    },
    /// The image cannot grow any further (host offsets past 2^56, or a refcount table past QEMU's limit).
    NoSpace {
        /// What ran out.
        what: &'static str,
    },
    /// An encrypted image: its LUKS header is invalid or unsupported, no passphrase unlocks it, or it is
    /// locked (opened without a passphrase) and a request needs its data.
    Encryption(LuksError),
}

/// [`Error::Corrupt`]: metadata met while working is inconsistent.
pub(crate) fn corrupt<E>(what: &'static str, offset: u64) -> Error<E> {
    Error::Corrupt { what, offset }
}

impl<E> Error<E> {
    /// The engine's error for a problem the format's parsers found (the same variant and fields).
    pub fn from_format(e: FormatError) -> Self {
        match e {
            FormatError::NotQcow2 { magic } => Error::NotQcow2 { magic },
            FormatError::UnsupportedVersion(v) => Error::UnsupportedVersion(v),
            FormatError::InvalidHeader {
                field,
                value,
                problem,
            } => Error::InvalidHeader {
                field,
                value,
                problem,
            },
            FormatError::Unsupported { what, value } => Error::Unsupported { what, value },
        }
    }
}

impl<E> From<E> for Error<E> {
    fn from(e: E) -> Self {
        Error::Io(e)
    }
}

impl<E> Error<E> {
    /// Converts the device error with `f`, keeping every other variant.
    pub fn map_io<F, G: FnOnce(E) -> F>(self, g: G) -> Error<F> {
        match self {
            Error::Io(e) => Error::Io(g(e)),
            Error::NotQcow2 { magic } => Error::NotQcow2 { magic },
            Error::UnsupportedVersion(v) => Error::UnsupportedVersion(v),
            Error::InvalidHeader {
                field,
                value,
                problem,
            } => Error::InvalidHeader {
                field,
                value,
                problem,
            },
            Error::UnknownIncompatibleFeature { bit, name } => {
                Error::UnknownIncompatibleFeature { bit, name }
            }
            Error::Unsupported { what, value } => Error::Unsupported { what, value },
            Error::Corrupt { what, offset } => Error::Corrupt { what, offset },
            Error::OutOfRange { offset, len, size } => Error::OutOfRange { offset, len, size },
            Error::BufferTooSmall { what, need, have } => {
                Error::BufferTooSmall { what, need, have }
            }
            Error::BadBlockSize(s) => Error::BadBlockSize(s),
            Error::Unavailable { what } => Error::Unavailable { what },
            Error::ChainTooDeep { limit } => Error::ChainTooDeep { limit },
            Error::Decompress { offset, problem } => Error::Decompress { offset, problem },
            Error::ReadOnly => Error::ReadOnly,
            Error::NeedsRepair { what } => Error::NeedsRepair { what },
            Error::NoSpace { what } => Error::NoSpace { what },
            Error::Encryption(e) => Error::Encryption(e),
        }
    }
}

impl<E: fmt::Display> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::NotQcow2 { magic } => {
                write!(f, "Image is not in qcow2 format (magic {magic:#010x})")
            }
            Error::UnsupportedVersion(v) => write!(f, "Unsupported qcow2 version {v}"),
            Error::InvalidHeader {
                field,
                value,
                problem,
            } => {
                write!(f, "Invalid qcow2 header: {field} = {value} ({problem})")
            }
            Error::UnknownIncompatibleFeature { bit, name } => {
                if name.is_empty() {
                    write!(
                        f,
                        "Unsupported qcow2 feature(s): unknown incompatible feature bit {bit}"
                    )
                } else {
                    write!(
                        f,
                        "Unsupported qcow2 feature(s): {} (incompatible feature bit {bit})",
                        name.as_str()
                    )
                }
            }
            Error::Unsupported { what, value } => write!(f, "Unsupported: {what} ({value})"),
            Error::Corrupt { what, offset } => {
                write!(f, "Image is corrupt: {what} (offset {offset:#x})")
            }
            Error::OutOfRange { offset, len, size } => {
                write!(
                    f,
                    "Request out of range: {len} bytes at offset {offset} (virtual size {size})"
                )
            }
            Error::BufferTooSmall { what, need, have } => {
                write!(f, "Buffer too small: {what} needs {need}, got {have}")
            }
            Error::BadBlockSize(s) => write!(f, "Unsupported device block size {s}"),
            Error::Unavailable { what } => write!(f, "{what}"),
            Error::ChainTooDeep { limit } => {
                write!(
                    f,
                    "Backing chain is too deep or loops (more than {limit} images)"
                )
            }
            Error::Decompress { offset, problem } => {
                write!(
                    f,
                    "Image is corrupt: compressed cluster at host offset {offset:#x}: {problem}"
                )
            }
            Error::ReadOnly => write!(f, "Image is read-only"),
            Error::NeedsRepair { what } => write!(f, "{what}"),
            Error::NoSpace { what } => write!(f, "No space left in the image: {what}"),
            Error::Encryption(e) => write!(f, "{e}"),
        }
    }
}

#[cfg(feature = "defmt")]
impl<E> defmt::Format for Error<E> {
    fn format(&self, f: defmt::Formatter<'_>) {
        match self {
            Error::Io(_) => defmt::write!(f, "device error"),
            Error::NotQcow2 { magic } => defmt::write!(f, "not qcow2 (magic {=u32:#x})", magic),
            Error::UnsupportedVersion(v) => defmt::write!(f, "unsupported version {=u32}", v),
            Error::InvalidHeader {
                field,
                value,
                problem,
            } => {
                defmt::write!(
                    f,
                    "invalid header {=str} = {=u64} ({=str})",
                    field,
                    value,
                    problem
                )
            }
            Error::UnknownIncompatibleFeature { bit, .. } => {
                defmt::write!(f, "unknown incompatible bit {=u8}", bit)
            }
            Error::Unsupported { what, value } => {
                defmt::write!(f, "unsupported {=str} ({=u64})", what, value)
            }
            Error::Corrupt { what, offset } => {
                defmt::write!(f, "corrupt: {=str} at {=u64:#x}", what, offset)
            }
            Error::OutOfRange { offset, len, .. } => {
                defmt::write!(f, "out of range {=u64}+{=u64}", offset, len)
            }
            Error::BufferTooSmall { what, need, have } => {
                defmt::write!(
                    f,
                    "buffer {=str} too small: {=u64} < {=u64}",
                    what,
                    have,
                    need
                )
            }
            Error::BadBlockSize(s) => defmt::write!(f, "bad block size {=usize}", s),
            Error::Unavailable { what } => defmt::write!(f, "unavailable: {=str}", what),
            Error::ChainTooDeep { limit } => defmt::write!(f, "chain deeper than {=usize}", limit),
            Error::Decompress { offset, problem } => {
                defmt::write!(
                    f,
                    "bad compressed cluster at {=u64:#x}: {=str}",
                    offset,
                    problem
                )
            }
            Error::ReadOnly => defmt::write!(f, "read-only"),
            Error::NeedsRepair { what } => defmt::write!(f, "needs repair: {=str}", what),
            Error::NoSpace { what } => defmt::write!(f, "no space: {=str}", what),
            Error::Encryption(e) => defmt::write!(f, "encryption: {}", e),
        }
    }
}
