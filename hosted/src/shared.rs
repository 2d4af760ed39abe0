//! A thread-safe image handle: several threads read and write one image (and its chain) at once.
//!
//! It is the single-threaded [`Qcow2File`]'s disk behind a mutex (`SharedDisk::from(file)`), without the
//! file position: requests are positional.
//!
//! The engine is single-threaded by design (firmware has one), so the handle serializes requests with a
//! mutex around the opened disk. Each request is atomic with respect to the others: a read never sees half of
//! a concurrent write to the same range, and the engine's metadata (its slice cache, the dirty slices and
//! their write-back order) is only ever touched by one request at a time. A request that fails leaves the
//! handle usable; a panic in another thread while it held the lock makes later requests fail with a clear
//! error instead of continuing on state that may be half updated.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::disk::{DiskError, ErrorKind, VirtualDiskWrite};
use crate::open::open_disk_writable;
use crate::qcow2_file::Qcow2File;

/// A cloneable, `Send + Sync` handle to an image opened for writing.
#[derive(Clone)]
pub struct SharedDisk {
    inner: Arc<Mutex<Option<Box<dyn VirtualDiskWrite + Send>>>>,
    size: u64,
}

impl std::fmt::Debug for SharedDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedDisk")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl SharedDisk {
    /// Opens `path` for reading and writing (`format` as with `-f`, probed when `None`).
    pub fn open(path: &str, format: Option<&str>) -> Result<SharedDisk, DiskError> {
        let opened = open_disk_writable(path, format)?;
        Ok(SharedDisk::new(opened.disk))
    }

    /// Wraps an opened disk.
    pub fn new(disk: Box<dyn VirtualDiskWrite + Send>) -> SharedDisk {
        let size = disk.virtual_size();
        SharedDisk {
            inner: Arc::new(Mutex::new(Some(disk))),
            size,
        }
    }

    /// Guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.size
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut dyn VirtualDiskWrite) -> Result<T, DiskError>,
    ) -> Result<T, DiskError> {
        let mut guard: MutexGuard<'_, _> = self.inner.lock().map_err(|_| {
            DiskError::new("the image handle is unusable: a thread failed while it was using it")
        })?;
        match guard.as_mut() {
            Some(disk) => f(disk.as_mut()),
            None => Err(DiskError::new("the image is closed")),
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(DiskError::with_kind(
                ErrorKind::OutOfRange,
                format!(
                    "request at offset {offset} of {len} bytes is outside the {} byte image",
                    self.size
                ),
            ));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at guest `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check(offset, buf.len() as u64)?;
        self.with(|d| d.read_at(offset, buf))
    }

    /// Writes `buf` at guest `offset`.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        self.check(offset, buf.len() as u64)?;
        self.with(|d| d.write_at(offset, buf))
    }

    /// Makes a range read as zeros (`unmap`: its clusters may be freed).
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        self.check(offset, len)?;
        self.with(|d| d.write_zeroes(offset, len, unmap))
    }

    /// Discards a range.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check(offset, len)?;
        self.with(|d| d.discard(offset, len))
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<(), DiskError> {
        self.with(|d| d.flush())
    }

    /// Flushes and closes the image; every handle's later requests fail with "the image is closed".
    pub fn close(&self) -> Result<(), DiskError> {
        let mut guard = self.inner.lock().map_err(|_| {
            DiskError::new("the image handle is unusable: a thread failed while it was using it")
        })?;
        match guard.take() {
            Some(disk) => disk.close(),
            None => Ok(()),
        }
    }
}

impl From<Qcow2File> for SharedDisk {
    /// The file's opened image behind the mutex, for use from several threads (the file's position is
    /// dropped). Writes are then durable when [`SharedDisk::flush`] or [`SharedDisk::close`] returns,
    /// whatever the file's cache mode; a read-only file gives a handle whose writes fail with
    /// [`ErrorKind::ReadOnly`].
    fn from(file: Qcow2File) -> SharedDisk {
        SharedDisk {
            size: file.virtual_size(),
            inner: Arc::new(Mutex::new(file.into_disk())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_disk_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<SharedDisk>();
    }
}
