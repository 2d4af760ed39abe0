//! The engine's errors as [`DiskError`]s, and QEMU's refusal of an encrypted image opened without its
//! secret.

use super::*;

/// The engine's error as a [`DiskError`]: the engine's message (device errors carry their own text and
/// kind) and the [`ErrorKind`] of the variant ([`engine_error_kind`]).
pub fn engine_error(e: Error<io::Error>) -> DiskError {
    match e {
        Error::Io(e) => DiskError::from(e),
        other => DiskError::with_kind(engine_error_kind(&other), other.to_string()),
    }
}

/// The [`ErrorKind`] of an engine error ([`ErrorKind::Other`] for a device error, whose kind only the
/// device knows: [`engine_error`] takes it from there).
pub fn engine_error_kind<E>(e: &Error<E>) -> ErrorKind {
    match e {
        Error::NotQcow2 { .. } | Error::InvalidHeader { .. } => ErrorKind::InvalidImage,
        Error::UnsupportedVersion(_)
        | Error::UnknownIncompatibleFeature { .. }
        | Error::Unsupported { .. }
        | Error::BadBlockSize(_)
        | Error::ChainTooDeep { .. }
        | Error::NeedsRepair { .. } => ErrorKind::Unsupported,
        Error::Corrupt { .. } | Error::Decompress { .. } => ErrorKind::Corrupt,
        Error::OutOfRange { .. } => ErrorKind::OutOfRange,
        Error::BufferTooSmall { .. } => ErrorKind::InvalidArgument,
        Error::ReadOnly => ErrorKind::ReadOnly,
        Error::NoSpace { .. } => ErrorKind::NoSpace,
        Error::Io(_) | Error::Unavailable { .. } => ErrorKind::Other,
        Error::Encryption(e) => {
            use qcow2_core::format::luks::LuksError;
            match e {
                LuksError::Unsupported(_) | LuksError::TooManyIterations { .. } => {
                    ErrorKind::Unsupported
                }
                LuksError::WrongPassphrase | LuksError::Locked => ErrorKind::InvalidArgument,
                _ => ErrorKind::InvalidImage,
            }
        }
    }
}

/// QEMU's refusal to open an encrypted image without its secret (a backing file's, when it is not the
/// top image of `image` that is locked).
pub(super) fn secret_required(image: &HeapImage<FileDevice>) -> DiskError {
    let backing = !image.layers().first().is_some_and(|l| l.locked());
    DiskError::with_kind(
        ErrorKind::InvalidArgument,
        format!(
            "{}Parameter 'encrypt.key-secret' is required for cipher",
            if backing {
                "Could not open backing file: "
            } else {
                ""
            }
        ),
    )
}
