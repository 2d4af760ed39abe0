//! The format's own error: what is wrong with an on-disk structure, found by a pure parser. The engine's
//! [`crate::Error`] takes it in (`Error::from_format`, in the error module above this one), so parsers stay
//! free of the device's error type and format imports nothing above it.

/// What is wrong with an on-disk structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FormatError {
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
    /// A valid header that asks for something this engine does not do (encryption, say).
    Unsupported {
        /// What is not supported.
        what: &'static str,
        /// The value that selected it.
        value: u64,
    },
}
