//! Resizing a qcow2 image: qemu-img's refusals first, with its messages, then the engine's resize and its
//! preallocation (space reserved in the file for `falloc`).

use super::*;

impl Qcow2Disk {
    /// qemu-img's refusals first (with its messages), then the engine's resize (and its preallocation).
    pub(super) fn resize_checked(
        &mut self,
        size: u64,
        prealloc: Preallocation,
    ) -> Result<(), DiskError> {
        self.check_writable()?;
        let unsupported = |m: &str| DiskError::with_kind(ErrorKind::Unsupported, m);
        if !size.is_multiple_of(512) {
            return Err(DiskError::with_kind(
                ErrorKind::InvalidArgument,
                "The new size must be a multiple of 512",
            ));
        }
        let Some(meta) = self.image.layers().first().and_then(|l| l.qcow2()) else {
            return Err(unsupported(ENOTSUP));
        };
        let h = meta.header;
        if h.nb_snapshots != 0 && h.version < 3 {
            return Err(unsupported("Can't resize a v2 image which has snapshots"));
        }
        self.resizable_bitmaps()?;
        if h.external_data_file() {
            return Err(unsupported(
                "Resizing an image with an external data file is not supported",
            ));
        }
        let backing = self.image.layers().get(1).map_or(0, |l| l.virtual_size());
        let preallocated = matches!(prealloc, Preallocation::Falloc | Preallocation::Full);
        if h.version < 3 && backing > h.size && size > h.size && !preallocated {
            return Err(unsupported(
                "Failed to zero out new clusters: Operation not supported",
            ));
        }
        let old = self.image.virtual_size();
        if preallocated {
            if size <= old {
                return Err(unsupported(
                    "Preallocation can only be used for growing images",
                ));
            }
            let (host, len) = self
                .image
                .resize_preallocated(size, prealloc == Preallocation::Full)
                .map_err(engine_error)?;
            if prealloc == Preallocation::Falloc && len > 0 {
                // Reserved, as QEMU's falloc reserves it (where the file system can).
                let file = self.image.layers().first().map(|l| l.device().file());
                if let Some(file) = file {
                    let _ = rustix::fs::fallocate(
                        file,
                        rustix::fs::FallocateFlags::KEEP_SIZE,
                        host,
                        len,
                    );
                }
            }
            return Ok(());
        }
        self.image.resize(size).map_err(|e| match e {
            Error::NoSpace { .. } if size > self.image.virtual_size() => DiskError::with_kind(
                ErrorKind::NoSpace,
                "Failed to grow the L1 table: File too large",
            ),
            other => engine_error(other),
        })?;
        if prealloc == Preallocation::Metadata && size > old {
            self.image
                .preallocate_metadata(old, size - old)
                .map_err(engine_error)?;
        }
        Ok(())
    }
}
