//! Raw image files as [`VirtualDisk`]s.

use std::fs::File;

use std::os::unix::fs::FileExt;

use rustix::fs::{FallocateFlags, fallocate};

use qcow2_core::create::Preallocation;

use crate::disk::{
    DiskError, EIO, ENOTSUP, ErrorKind, MapExtent, ParallelWriter, Reservation, Reserve,
    VirtualDisk, VirtualDiskWrite,
};
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
    /// Opened for writing.
    writable: bool,
    /// The format was probed, not given: writes must not make the first sector look like another format.
    probed: bool,
    /// Flushes do nothing (`cache=unsafe`).
    no_flush: bool,
}

/// The first bytes of image formats that a probe would take a raw disk for (QEMU's drivers' probes, by
/// magic): qcow and qcow2, QED, VMDK (sparse and descriptor), VHDX, VPC, LUKS.
const FOREIGN_MAGICS: [&[u8]; 8] = [
    b"QFI\xfb",
    b"QED\0",
    b"KDMV",
    b"COWD",
    b"# Disk DescriptorFile",
    b"vhdxfile",
    b"conectix",
    b"LUKS\xba\xbe",
];

/// Bytes at the start of a raw disk that a format probe looks at (QEMU's BLOCK_PROBE_BUF_SIZE).
const PROBE_SIZE: u64 = 512;

impl RawDisk {
    /// Wraps an open raw file; `name` is how the user named it.
    pub fn new(file: File, name: &str) -> Result<RawDisk, DiskError> {
        let file_len = file.metadata().map_err(DiskError::from)?.len();
        Ok(RawDisk {
            file,
            name: name.to_string(),
            file_len,
            size: file_len.div_ceil(512) * 512,
            writable: false,
            probed: false,
            no_flush: false,
        })
    }

    /// With `no_flush`, [`VirtualDiskWrite::flush`] (and closing) never asks the host to make the file
    /// durable (QEMU's `cache=unsafe`).
    pub fn set_no_flush(&mut self, no_flush: bool) {
        self.no_flush = no_flush;
    }

    /// Restricts writes the way QEMU does for a raw image whose format was probed: a write that would make
    /// the first sector start like another image format (so that the next probe would take the guest's
    /// data for an image header, possibly naming host files) fails with "Operation not permitted".
    pub fn set_probed(&mut self, probed: bool) {
        self.probed = probed;
    }

    /// Refuses a write of `buf` at `offset` that would make the first sector look like another format.
    fn check_probe(&self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        if !self.probed || offset >= PROBE_SIZE || buf.is_empty() {
            return Ok(());
        }
        let mut first = [0u8; PROBE_SIZE as usize];
        read_zero_filled(&self.file, 0, &mut first).map_err(RawDisk::os_err)?;
        let start = offset as usize;
        let n = buf.len().min(first.len() - start);
        first[start..start + n].copy_from_slice(&buf[..n]);
        if FOREIGN_MAGICS.iter().any(|m| first.starts_with(m)) {
            return Err(DiskError::with_kind(
                ErrorKind::Io(std::io::ErrorKind::PermissionDenied),
                "Operation not permitted",
            ));
        }
        Ok(())
    }

    /// Wraps a raw file opened read-write.
    pub fn new_writable(file: File, name: &str) -> Result<RawDisk, DiskError> {
        let mut disk = RawDisk::new(file, name)?;
        disk.writable = true;
        Ok(disk)
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if !self.writable {
            return Err(DiskError::with_kind(
                ErrorKind::ReadOnly,
                "Bad file descriptor",
            ));
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(DiskError::with_kind(ErrorKind::OutOfRange, EIO));
        }
        Ok(())
    }

    fn os_err(e: std::io::Error) -> DiskError {
        DiskError::from(e)
    }

    /// Writes zeros the slow way, in pieces of at most 1 MiB.
    fn write_zero_bytes(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], offset + done)
                .map_err(RawDisk::os_err)?;
            done += n as u64;
        }
        self.grown_to(offset + len);
        Ok(())
    }

    fn grown_to(&mut self, end: u64) {
        self.file_len = self.file_len.max(end);
    }
}

impl VirtualDiskWrite for RawDisk {
    /// The file's new length (any length: raw images need no sector multiple); `falloc` reserves the new
    /// area, `full` writes zeros into it.
    fn resize(&mut self, size: u64, prealloc: Preallocation) -> Result<(), DiskError> {
        if !self.writable {
            return Err(DiskError::with_kind(
                ErrorKind::ReadOnly,
                "Bad file descriptor",
            ));
        }
        let old = self.file_len;
        if prealloc == Preallocation::Metadata {
            return Err(DiskError::with_kind(
                ErrorKind::Unsupported,
                "Unsupported preallocation mode: metadata",
            ));
        }
        self.file.set_len(size).map_err(RawDisk::os_err)?;
        self.file_len = size;
        self.size = size.div_ceil(512) * 512;
        if size > old {
            match prealloc {
                Preallocation::Falloc => {
                    fallocate(&self.file, FallocateFlags::empty(), old, size - old)
                        .map_err(|e| RawDisk::os_err(e.into()))?;
                }
                Preallocation::Full => self.write_zero_bytes(old, size - old)?,
                Preallocation::Off | Preallocation::Metadata => {}
            }
        }
        Ok(())
    }

    fn parallel_writer(&self) -> Option<ParallelWriter> {
        // A probed raw file must not be made to look like another format: its first sector is checked on
        // every write, which only the disk itself does.
        if !self.writable || self.probed {
            return None;
        }
        let file = self.file.try_clone().ok()?;
        Some(ParallelWriter::new(file, self.file_len))
    }

    fn reserve(&mut self, offset: u64, len: u64) -> Result<Reserve, DiskError> {
        self.check(offset, len)?;
        // Inside the file (a last partial sector past its end goes through write_at, which grows it).
        let inside = self.file_len.saturating_sub(offset).min(len);
        if self.probed || inside == 0 {
            return Ok(Reserve::WriteFirst(len));
        }
        Ok(Reserve::Reserved(Reservation::Raw {
            offset,
            len: inside,
        }))
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        self.check(offset, buf.len() as u64)?;
        self.check_probe(offset, buf)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(RawDisk::os_err)?;
        self.grown_to(offset + buf.len() as u64);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // Inside the file: let the filesystem zero (or, with unmap, punch) the range; past its end the
        // bytes already read as zeros and the file keeps its length, as with QEMU's file driver.
        let inside = self.file_len.saturating_sub(offset).min(len);
        if inside > 0 {
            let mode = if unmap {
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
            } else {
                FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
            };
            if fallocate(&self.file, mode, offset, inside).is_err() {
                self.write_zero_bytes(offset, inside)?;
            }
        }
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check(offset, len)?;
        let inside = self.file_len.saturating_sub(offset).min(len);
        if inside > 0 {
            // Discarding is a hint: a filesystem that cannot punch holes keeps the data.
            let _ = fallocate(
                &self.file,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                offset,
                inside,
            );
        }
        Ok(())
    }

    fn compressed_cluster_size(&self) -> Result<u64, DiskError> {
        Err(DiskError::with_kind(ErrorKind::Unsupported, ENOTSUP))
    }

    fn write_compressed(&mut self, _offset: u64, _data: &[u8]) -> Result<(), DiskError> {
        Err(DiskError::with_kind(ErrorKind::Unsupported, ENOTSUP))
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        if !self.writable || self.no_flush {
            return Ok(());
        }
        self.file.sync_data().map_err(RawDisk::os_err)
    }

    fn close(self: Box<Self>) -> Result<(), DiskError> {
        let mut this = self;
        this.flush()
    }
}

impl VirtualDisk for RawDisk {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn load_snapshot(&mut self, _id: Option<&str>, _name: Option<&str>) -> Result<(), DiskError> {
        Err(DiskError::new(
            "Block format 'raw' used by device '' does not support temporarily loading internal snapshots",
        ))
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(DiskError::with_kind(ErrorKind::OutOfRange, EIO));
        }
        read_zero_filled(&self.file, offset, buf).map_err(DiskError::from)
    }

    fn map_extent(&mut self, offset: u64, max_len: u64) -> Result<MapExtent, DiskError> {
        let max_len = max_len.min(self.size.saturating_sub(offset));
        if max_len == 0 {
            return Err(DiskError::with_kind(ErrorKind::OutOfRange, EIO));
        }
        // The padding between the end of the file and the next 512-byte boundary is a hole, as in QEMU.
        let (data, len) =
            probe_extent(&self.file, offset, max_len, self.file_len).map_err(DiskError::from)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_writes_zeroes_and_discards() {
        let path = std::env::temp_dir().join(format!("qcow2-raw-write-{}", std::process::id()));
        std::fs::write(&path, vec![0x11u8; 1000]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut d = RawDisk::new_writable(file, "x").unwrap();
        assert_eq!(d.virtual_size(), 1024);
        d.write_at(990, &[0x22; 30]).unwrap();
        assert!(d.write_at(1000, &[0; 25]).is_err());
        d.write_zeroes(0, 100, false).unwrap();
        d.write_zeroes(100, 100, true).unwrap();
        d.discard(500, 10).unwrap();
        assert_eq!(d.compressed_cluster_size().unwrap_err().0, ENOTSUP);
        let mut buf = vec![0u8; 1024];
        d.read_at(0, &mut buf).unwrap();
        assert!(buf[..200].iter().all(|&b| b == 0));
        assert!(buf[200..500].iter().all(|&b| b == 0x11));
        // The discarded bytes keep their data or read as zeros.
        assert!(buf[500..510].iter().all(|&b| b == 0x11 || b == 0));
        assert!(buf[990..1020].iter().all(|&b| b == 0x22));
        Box::new(d).close().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1020);
        let rw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut probed = RawDisk::new_writable(rw, "x").unwrap();
        probed.set_probed(true);
        assert_eq!(
            probed.write_at(0, b"QFI\xfb").unwrap_err().0,
            "Operation not permitted"
        );
        probed.write_at(1, b"QFI\xfb").unwrap();
        probed.write_at(0, b"KDM").unwrap();
        assert!(probed.write_at(3, b"V").is_err());
        probed.write_at(512, b"QFI\xfb").unwrap();
        let mut ro = RawDisk::new(File::open(&path).unwrap(), "x").unwrap();
        assert!(ro.write_at(0, &[1]).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
