//! Raw image files as [`VirtualDisk`]s.

use std::fs::File;

use crate::disk::{DiskError, MapExtent, VirtualDisk};
use crate::file::{probe_extent, read_zero_filled};

/// A raw image: the guest sees the file's bytes, its length rounded up to 512 bytes as QEMU does.
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    /// Name the file was opened by, reported by `map`.
    name: String,
    /// Real length of the file.
    file_len: u64,
    /// Guest size: `file_len` rounded up to 512.
    size: u64,
}

impl RawDisk {
    /// Wraps an open raw file; `name` is how the user named it.
    pub fn new(file: File, name: &str) -> Result<RawDisk, DiskError> {
        let file_len = file
            .metadata()
            .map_err(|e| DiskError::new(DiskError::os_text(&e)))?
            .len();
        Ok(RawDisk {
            file,
            name: name.to_string(),
            file_len,
            size: file_len.div_ceil(512) * 512,
        })
    }
}

impl VirtualDisk for RawDisk {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(DiskError::new("Input/output error"));
        }
        read_zero_filled(&self.file, offset, buf)
            .map_err(|e| DiskError::new(DiskError::os_text(&e)))
    }

    fn map_extent(&mut self, offset: u64, max_len: u64) -> Result<MapExtent, DiskError> {
        let max_len = max_len.min(self.size.saturating_sub(offset));
        if max_len == 0 {
            return Err(DiskError::new("Input/output error"));
        }
        // The padding between the end of the file and the next 512-byte boundary is a hole, as in QEMU.
        let (data, len) = probe_extent(&self.file, offset, max_len, self.file_len)
            .map_err(|e| DiskError::new(DiskError::os_text(&e)))?;
        Ok(MapExtent {
            start: offset,
            length: len.max(1),
            depth: 0,
            present: true,
            zero: !data,
            data,
            compressed: false,
            offset: Some(offset),
            file: Some(self.name.clone()),
        })
    }
}
