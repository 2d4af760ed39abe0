//! A host file as a qcow2-core block device, and the SEEK_DATA/SEEK_HOLE probe shared with raw images.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use qcow2_core::device::{BlockDevice, BlockDeviceWrite, DeviceExtent};

/// Block size [`FileDevice`] reports.
pub const FILE_BLOCK_SIZE: usize = 512;

/// Why [`open_image_file`] did not give a file.
#[derive(Debug)]
pub enum OpenImageError {
    /// The name is not a regular file (a FIFO, directory, socket or device): it is not read as an image.
    NotRegular,
    /// The open itself failed (no such file, permission denied, ...).
    Io(io::Error),
}

impl OpenImageError {
    /// QEMU's text for the problem with `path`: "'file' driver requires 'x' to be a regular file", or the
    /// system's reason ("No such file or directory").
    pub fn text(&self, path: &str) -> String {
        match self {
            OpenImageError::NotRegular => {
                format!("'file' driver requires '{path}' to be a regular file")
            }
            OpenImageError::Io(e) => crate::disk::DiskError::os_text(e),
        }
    }
}

/// Opens the image, backing or data file `path` (read-only, or read-write when `write`) as a regular file,
/// and never blocks doing so: a FIFO would block an open until a writer comes (and every read after it), and
/// a device or directory is no image. A name that does not stat as a regular file is refused before it is
/// opened (opening some devices has effects of its own); the open itself is non-blocking and the opened file
/// is checked again (`fstat`), so a name swapped for a FIFO between the two is refused too. The file is
/// returned in blocking mode.
pub fn open_image_file(path: impl AsRef<Path>, write: bool) -> Result<File, OpenImageError> {
    use rustix::fs::OFlags;
    use std::os::unix::fs::OpenOptionsExt;
    let path = path.as_ref();
    let not_regular = |path: &Path| std::fs::metadata(path).is_ok_and(|m| !m.is_file());
    if not_regular(path) {
        return Err(OpenImageError::NotRegular);
    }
    let nonblock = OFlags::NONBLOCK | OFlags::NOCTTY;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(nonblock.bits() as i32)
        .open(path)
        .map_err(|e| {
            // EISDIR, ENXIO (a socket) and the like: the name changed kind since the stat above.
            if not_regular(path) {
                OpenImageError::NotRegular
            } else {
                OpenImageError::Io(e)
            }
        })?;
    if !file.metadata().map_err(OpenImageError::Io)?.is_file() {
        return Err(OpenImageError::NotRegular);
    }
    let flags = rustix::fs::fcntl_getfl(&file).map_err(|e| OpenImageError::Io(e.into()))?;
    rustix::fs::fcntl_setfl(&file, flags - OFlags::NONBLOCK)
        .map_err(|e| OpenImageError::Io(e.into()))?;
    Ok(file)
}

/// Whether the bytes of `file` starting at `offset` are data or a hole, and for how many bytes (at most `len`,
/// at least 1 when `len > 0`). Bytes at or past `file_len` are a hole. Filesystems that cannot tell report data.
pub fn probe_extent(file: &File, offset: u64, len: u64, file_len: u64) -> io::Result<(bool, u64)> {
    use rustix::fs::{SeekFrom, seek};
    if len == 0 {
        return Ok((true, 0));
    }
    if offset >= file_len {
        return Ok((false, len));
    }
    match seek(file, SeekFrom::Data(offset)) {
        Ok(data) if data <= offset => {
            // Data here: it runs to the next hole (EOF counts as one).
            let hole = match seek(file, SeekFrom::Hole(offset)) {
                Ok(h) if h > offset => h,
                Ok(_) => file_len,
                Err(_) => file_len,
            };
            Ok((true, (hole - offset).min(len)))
        }
        Ok(data) => Ok((false, (data - offset).min(len))),
        // No data at or after `offset`: a hole to the end.
        Err(rustix::io::Errno::NXIO) => Ok((false, len)),
        // SEEK_DATA unsupported: everything is data.
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::OPNOTSUPP) => {
            Ok((true, (file_len - offset).min(len)))
        }
        Err(e) => Err(e.into()),
    }
}

/// Reads `buf.len()` bytes at `offset`, filling whatever lies past the end of the file with zeros.
pub fn read_zero_filled(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A host file seen as a block device of 512-byte blocks (positional I/O, so it never moves a file cursor
/// that matters). Reads past the end of the file return zeros; writes past it grow the file.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    /// Flushes do nothing (QEMU's `cache=unsafe`): written data reaches the host's page cache only.
    no_flush: bool,
}

impl FileDevice {
    /// Wraps an open file (opened read-only or read-write as the caller needs).
    pub fn new(file: File) -> FileDevice {
        FileDevice {
            file,
            no_flush: false,
        }
    }

    /// With `no_flush`, [`BlockDeviceWrite::flush`] returns at once instead of asking the host to make the
    /// file durable (QEMU's `cache=unsafe`). Writes still reach the file as they are made.
    pub fn with_no_flush(mut self, no_flush: bool) -> FileDevice {
        self.no_flush = no_flush;
        self
    }

    /// The wrapped file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Gives the file back.
    pub fn into_inner(self) -> File {
        self.file
    }
}

impl BlockDevice for FileDevice {
    type Error = io::Error;

    fn block_size(&self) -> usize {
        FILE_BLOCK_SIZE
    }

    fn size(&mut self) -> Result<u64, io::Error> {
        Ok(self.file.metadata()?.len())
    }

    fn read_blocks(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), io::Error> {
        let offset = lba.checked_mul(FILE_BLOCK_SIZE as u64).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "block address out of range")
        })?;
        read_zero_filled(&self.file, offset, buf)
    }

    fn block_status(&mut self, offset: u64, len: u64) -> Result<DeviceExtent, io::Error> {
        let file_len = self.file.metadata()?.len();
        let (data, n) = probe_extent(&self.file, offset, len, file_len)?;
        Ok(DeviceExtent {
            data,
            len: n.max(u64::from(len > 0)),
        })
    }
}

impl BlockDeviceWrite for FileDevice {
    fn write_blocks(&mut self, lba: u64, buf: &[u8]) -> Result<(), io::Error> {
        let offset = lba.checked_mul(FILE_BLOCK_SIZE as u64).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "block address out of range")
        })?;
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> Result<(), io::Error> {
        if self.no_flush {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn set_size(&mut self, len: u64) -> Result<bool, io::Error> {
        self.file.set_len(len)?;
        Ok(true)
    }

    /// Punches a hole (the bytes read as zeros and take no space), as QEMU does for clusters it frees with
    /// discard passed through; a file system that cannot punch holes keeps the bytes.
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), io::Error> {
        use rustix::fs::{FallocateFlags, fallocate};
        match fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("qcow2-hosted-file-{}-{name}", std::process::id()))
    }

    #[test]
    fn image_files_open_regular_only_and_blocking() {
        let dir = temp_path("kinds");
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let st = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(st.success());
        let regular = dir.join("regular");
        std::fs::write(&regular, b"x").unwrap();
        for write in [false, true] {
            // A FIFO without a writer (or reader) would block a plain open; this returns at once.
            assert!(matches!(
                open_image_file(&fifo, write),
                Err(OpenImageError::NotRegular)
            ));
            assert!(matches!(
                open_image_file(&dir, write),
                Err(OpenImageError::NotRegular)
            ));
            assert!(matches!(
                open_image_file("/dev/null", write),
                Err(OpenImageError::NotRegular)
            ));
            assert!(matches!(
                open_image_file(dir.join("missing"), write),
                Err(OpenImageError::Io(_))
            ));
            let f = open_image_file(&regular, write).unwrap();
            let flags = rustix::fs::fcntl_getfl(&f).unwrap();
            assert!(!flags.contains(rustix::fs::OFlags::NONBLOCK));
        }
        assert_eq!(
            OpenImageError::NotRegular.text("a b"),
            "'file' driver requires 'a b' to be a regular file"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn device_reads_zeros_past_eof_and_reports_holes() {
        let path = temp_path("dev");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut dev = FileDevice::new(f);
        dev.write_blocks(0, &[0x5a; 512]).unwrap();
        dev.file().set_len(1 << 20).unwrap();
        dev.flush().unwrap();
        assert_eq!(dev.size().unwrap(), 1 << 20);
        let mut buf = [1u8; 1024];
        dev.read_blocks(2047, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        dev.read_blocks(0, &mut buf).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 0x5a));
        let first = dev.block_status(0, 1 << 20).unwrap();
        assert!(first.data);
        assert!(first.len >= 512 && first.len < 1 << 20);
        let tail = dev.block_status(512 * 1024, 4096).unwrap();
        assert_eq!(
            tail,
            DeviceExtent {
                data: false,
                len: 4096
            }
        );
        let past = dev.block_status(2 << 20, 512).unwrap();
        assert_eq!(
            past,
            DeviceExtent {
                data: false,
                len: 512
            }
        );
        std::fs::remove_file(&path).unwrap();
    }
}
