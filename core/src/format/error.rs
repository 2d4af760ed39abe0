//! The format's own error: what is wrong with an on-disk structure, found by a pure parser. The engine's
//! [`crate::Error`] takes it in ([`FormatError::into_error`]), so parsers stay free of the device's error
//! type.

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

impl FormatError {
    /// The engine's error for this problem (the same variant and fields).
    pub fn into_error<E>(self) -> crate::Error<E> {
        match self {
            FormatError::NotQcow2 { magic } => crate::Error::NotQcow2 { magic },
            FormatError::UnsupportedVersion(v) => crate::Error::UnsupportedVersion(v),
            FormatError::InvalidHeader {
                field,
                value,
                problem,
            } => crate::Error::InvalidHeader {
                field,
                value,
                problem,
            },
            FormatError::Unsupported { what, value } => crate::Error::Unsupported { what, value },
        }
    }
}
