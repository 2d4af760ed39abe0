//! [`Qcow2File`]: an image (with its backing chain) as a file of its virtual size, for Rust programs.
//!
//! It implements [`std::io::Read`], [`Write`] and [`Seek`] over the guest view, plus positional
//! [`read_at`](Qcow2File::read_at) / [`write_at`](Qcow2File::write_at) and the block operations a file lacks
//! ([`write_zeroes`](Qcow2File::write_zeroes), [`discard`](Qcow2File::discard)). It is built on the same
//! layers as the command-line tool: [`open::open_disk`] / [`open::open_disk_writable_cache`] open the image
//! and resolve its chain, and the handle drives the resulting [`VirtualDiskWrite`]. [`SharedDisk`], the
//! thread-safe handle, is that same disk behind a mutex: `SharedDisk::from(file)` turns a `Qcow2File` into
//! one.
//!
//! Errors are [`DiskError`]s (one line in QEMU's words, and an [`ErrorKind`]); the `std::io` traits return
//! them as [`std::io::Error`]s of the matching kind, from which `DiskError::from` recovers the original.
//!
//! [`SharedDisk`]: crate::shared::SharedDisk
//! [`VirtualDiskWrite`]: crate::disk::VirtualDiskWrite

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// What [`Qcow2File::create_with`] takes: `qemu-img create -f qcow2`'s options.
pub use qcow2_core::create::{Compat, CreateOptions, Preallocation};
pub use qcow2_core::format::CompressionType;

use crate::cache::CacheMode;
use crate::disk::{
    DiskError, ErrorKind, ImageInfo, MapExtent, VirtualDisk, VirtualDiskWrite,
    write_compressed_range,
};
use crate::file::FileDevice;
use crate::open;

/// Which format to open a file as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageFormat {
    /// qcow2; any other file fails with [`ErrorKind::InvalidImage`] (the default).
    #[default]
    Qcow2,
    /// A raw image: the file's bytes are the disk.
    Raw,
    /// qcow2 if the file starts with qcow2's magic, raw otherwise (as `qemu-img` without `-f`). A raw image
    /// opened this way refuses writes that would make its first sector look like an image header. Do not
    /// probe files whose content a guest controls: a guest could make its disk look like a qcow2 image
    /// that names a host file as its backing file.
    Probe,
}

impl ImageFormat {
    fn name(self) -> Option<&'static str> {
        match self {
            ImageFormat::Qcow2 => Some("qcow2"),
            ImageFormat::Raw => Some("raw"),
            ImageFormat::Probe => None,
        }
    }
}

/// How to open a [`Qcow2File`]: read-only or read-write, the format, and the cache mode.
///
/// The backing chain is opened the way the `qcow2` tool (and QEMU) opens it, read-only whatever the top
/// image's mode:
/// - a stored backing (or data file) name is resolved against the directory of the image that stores it;
///   absolute names are used as they are;
/// - protocol names (`nbd://...`, `json:{...}`, anything with a `:` before its first `/`) are refused
///   ([`ErrorKind::Unsupported`]): only plain files are opened;
/// - a backing file's format is the one its image declares, probed when it declares none; the backing name
///   of a qcow2 image whose format was probed is never followed (so a guest's raw disk that imitates a
///   qcow2 header cannot name a host file);
/// - a chain that names a file twice, or is deeper than the engine's limit, is refused.
///
/// A missing backing file fails the open with [`ErrorKind::Io`]`(NotFound)`.
///
/// ```
/// use qcow2_hosted::{CacheMode, ImageFormat, Qcow2File};
///
/// let path = std::env::temp_dir().join(format!("qcow2-doc-{}-options.qcow2", std::process::id()));
/// Qcow2File::create(&path, 1 << 20)?.close()?;
///
/// let mut image = Qcow2File::options()
///     .read_write(true)
///     .format(ImageFormat::Qcow2)
///     .cache(CacheMode::WRITETHROUGH)
///     .open(&path)?;
/// image.write_at(4096, b"durable before write_at returns")?;
/// image.close()?;
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenOptions {
    read_write: bool,
    format: ImageFormat,
    cache: CacheMode,
    passphrase: Option<Vec<u8>>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions::new()
    }
}

impl OpenOptions {
    /// Read-only, qcow2, [`CacheMode::WRITEBACK`].
    pub fn new() -> OpenOptions {
        OpenOptions {
            read_write: false,
            format: ImageFormat::Qcow2,
            cache: CacheMode::WRITEBACK,
            passphrase: None,
        }
    }

    /// The passphrase of an encrypted image (LUKS or legacy AES; the image's encrypted backing files too).
    /// Without one an encrypted image fails to open ("Parameter 'encrypt.key-secret' is required for
    /// cipher", as in QEMU); a wrong one fails with "Invalid password, cannot unlock any keyslot". The file
    /// keeps it for the rest of the process ([`crate::chain::add_chain_passphrase`]).
    pub fn passphrase(&mut self, passphrase: &[u8]) -> &mut OpenOptions {
        self.passphrase = Some(passphrase.to_vec());
        self
    }

    /// Opens the image for writing too (its backing chain stays read-only). An image whose corrupt bit is
    /// set then fails to open with [`ErrorKind::Corrupt`], as in QEMU; open it read-only to read it.
    pub fn read_write(&mut self, read_write: bool) -> &mut OpenOptions {
        self.read_write = read_write;
        self
    }

    /// The format to open the file as (default [`ImageFormat::Qcow2`]).
    pub fn format(&mut self, format: ImageFormat) -> &mut OpenOptions {
        self.format = format;
        self
    }

    /// When writes become durable (see [`crate::cache`]): [`CacheMode::WRITEBACK`] (the default, like a
    /// `std::fs::File`: durable after [`Qcow2File::flush`] or [`Qcow2File::close`]),
    /// [`CacheMode::WRITETHROUGH`] (each write is flushed before it returns) or [`CacheMode::UNSAFE`] (flushes
    /// write cached metadata to the file but never wait for the host to make it durable). The host page
    /// cache is never bypassed.
    pub fn cache(&mut self, cache: CacheMode) -> &mut OpenOptions {
        self.cache = cache;
        self
    }

    /// Opens the image at `path` (a UTF-8 path: names stored in the image are resolved against it).
    pub fn open(&self, path: impl AsRef<Path>) -> Result<Qcow2File, DiskError> {
        let path = utf8_path(path.as_ref())?;
        if let Some(p) = &self.passphrase {
            crate::chain::add_chain_passphrase(path, p);
        }
        let format = self.format.name();
        let (disk, chain): (Box<dyn VirtualDiskWrite + Send>, _) = if self.read_write {
            let opened = open::open_disk_writable_cache(path, format, self.cache)?;
            (opened.disk, opened.chain)
        } else {
            let opened = open::open_disk(path, format)?;
            (Box::new(ReadOnly(opened.disk)), opened.chain)
        };
        let corrupt = chain
            .first()
            .and_then(|image| image.qcow2.as_ref())
            .is_some_and(|q| q.corrupt == Some(true));
        if self.read_write && corrupt {
            // The engine opened it read-only; nothing was written.
            return Err(DiskError::with_kind(
                ErrorKind::Corrupt,
                "qcow2: Image is corrupt; cannot be opened read/write",
            ));
        }
        Ok(Qcow2File {
            size: disk.virtual_size(),
            disk: Some(disk),
            chain,
            position: 0,
            writable: self.read_write,
            write_through: self.cache.writethrough,
        })
    }
}

fn utf8_path(path: &Path) -> Result<&str, DiskError> {
    path.to_str().ok_or_else(|| {
        DiskError::with_kind(
            ErrorKind::InvalidArgument,
            format!("'{}': the file name is not valid UTF-8", path.display()),
        )
    })
}

/// An image opened as a file of its virtual size (see the [module documentation](self)).
///
/// Reading and writing through [`Read`], [`Write`] and [`Seek`] moves a position, like a file's. Reads at or
/// past the end return 0 bytes and reads across it are short; writes never grow the image: a write that does
/// not fit within [`virtual_size`](Qcow2File::virtual_size) fails ([`ErrorKind::OutOfRange`]) and writes
/// nothing. The positional methods neither use nor move the position, and their whole range must lie
/// within the disk.
///
/// Close a written image with [`close`](Qcow2File::close), which returns what went wrong; dropping it
/// closes it too, ignoring errors.
///
/// ```
/// use std::io::{Read, Seek, SeekFrom, Write};
/// use qcow2_hosted::Qcow2File;
///
/// let path = std::env::temp_dir().join(format!("qcow2-doc-{}-type.qcow2", std::process::id()));
/// let mut image = Qcow2File::create(&path, 16 << 20)?;
/// image.seek(SeekFrom::Start(1 << 20))?;
/// image.write_all(b"hello, qcow2")?;
/// image.close()?;
///
/// let mut image = Qcow2File::open(&path)?; // read-only
/// assert_eq!(image.virtual_size(), 16 << 20);
/// image.seek(SeekFrom::Start(1 << 20))?;
/// let mut text = [0u8; 12];
/// image.read_exact(&mut text)?;
/// assert_eq!(&text, b"hello, qcow2");
///
/// // Past the end a read returns nothing; the image is not written.
/// image.seek(SeekFrom::End(0))?;
/// assert_eq!(image.read(&mut text)?, 0);
/// assert!(image.write(b"x").is_err());
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Qcow2File {
    /// `None` once closed or handed to a [`SharedDisk`].
    disk: Option<Box<dyn VirtualDiskWrite + Send>>,
    chain: Vec<ImageInfo>,
    size: u64,
    position: u64,
    writable: bool,
    write_through: bool,
}

impl std::fmt::Debug for Qcow2File {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2File")
            .field("file", &self.chain.first().map(|i| &i.filename))
            .field("virtual_size", &self.size)
            .field("position", &self.position)
            .field("writable", &self.writable)
            .finish_non_exhaustive()
    }
}

impl Qcow2File {
    /// Opens the qcow2 image at `path` read-only (see [`OpenOptions`] for everything else).
    ///
    /// ```
    /// use qcow2_hosted::{ErrorKind, Qcow2File};
    ///
    /// let missing = std::env::temp_dir().join("qcow2-doc-no-such-image.qcow2");
    /// let err = Qcow2File::open(&missing).unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::Io(std::io::ErrorKind::NotFound));
    /// ```
    pub fn open(path: impl AsRef<Path>) -> Result<Qcow2File, DiskError> {
        OpenOptions::new().open(path)
    }

    /// Options to open an image with: `Qcow2File::options().read_write(true).open(path)`.
    pub fn options() -> OpenOptions {
        OpenOptions::new()
    }

    /// Creates a qcow2 image of `size` bytes at `path` with `qemu-img create -f qcow2`'s defaults (version 3,
    /// 64 KiB clusters, 16-bit refcounts, no preallocation) and opens it read-write. An existing file is
    /// replaced, as [`File::create`] does.
    pub fn create(path: impl AsRef<Path>, size: u64) -> Result<Qcow2File, DiskError> {
        Qcow2File::create_with(
            path,
            &CreateOptions {
                size,
                ..CreateOptions::default()
            },
        )
    }

    /// Creates a qcow2 image at `path` laid out as `qemu-img create -f qcow2` lays it out with `options`,
    /// and opens it read-write (writeback cache). An existing file is replaced. A backing file must exist (it
    /// is opened); an external data file is created (replaced) next to the image where the image will look
    /// for it, and sized to the virtual size.
    ///
    /// ```
    /// use qcow2_hosted::Qcow2File;
    /// use qcow2_hosted::qcow2_file::{Compat, CreateOptions};
    ///
    /// let path = std::env::temp_dir().join(format!("qcow2-doc-{}-create.qcow2", std::process::id()));
    /// let options = CreateOptions {
    ///     size: 64 << 20,
    ///     cluster_size: 4096,
    ///     compat: Compat::V2,
    ///     ..CreateOptions::default()
    /// };
    /// let image = Qcow2File::create_with(&path, &options)?;
    /// assert_eq!(image.image_info()[0].cluster_size, Some(4096));
    /// image.close()?;
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn create_with(
        path: impl AsRef<Path>,
        options: &CreateOptions<'_>,
    ) -> Result<Qcow2File, DiskError> {
        let name = utf8_path(path.as_ref())?;
        options.validate().map_err(|e| {
            DiskError::with_kind(ErrorKind::InvalidArgument, format!("{name}: {e}"))
        })?;
        let mut dev = FileDevice::new(create_file(name)?);
        let mut bounce = [0u8; crate::file::FILE_BLOCK_SIZE];
        let len = qcow2_core::create::create(&mut dev, &mut bounce, options).map_err(|e| {
            crate::qcow2_disk::engine_error(e).map_message(|m| format!("{name}: {m}"))
        })?;
        let file = dev.into_inner();
        let os = |e: io::Error| DiskError::io(&e, format!("{name}: {}", DiskError::os_text(&e)));
        file.set_len(len).map_err(os)?;
        let allocate = matches!(
            options.preallocation,
            Preallocation::Falloc | Preallocation::Full
        );
        if let Some(data) = options.data_file {
            let data_path = crate::qcow2_disk::combine(name, data);
            let data_file = create_file(&data_path)?;
            let data_len = options.size.next_multiple_of(512);
            data_file.set_len(data_len).map_err(os)?;
            if allocate {
                // Reserving space is best effort, as in qemu-img.
                let _ = rustix::fs::fallocate(
                    &data_file,
                    rustix::fs::FallocateFlags::empty(),
                    0,
                    data_len,
                );
            }
            data_file.sync_all().map_err(os)?;
        } else if options.preallocation == Preallocation::Falloc {
            let _ = rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, len);
        }
        file.sync_all().map_err(os)?;
        drop(file);
        Qcow2File::options().read_write(true).open(name)
    }

    /// The opened disk, for [`SharedDisk`]'s `From<Qcow2File>` (`None` if the file was closed).
    pub(crate) fn into_disk(mut self) -> Option<Box<dyn VirtualDiskWrite + Send>> {
        self.disk.take()
    }

    /// Guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.size
    }

    /// Whether the image was opened read-write.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// What `qemu-img info` shows about each image of the chain, this image first.
    pub fn image_info(&self) -> &[ImageInfo] {
        &self.chain
    }

    fn disk(&mut self) -> Result<&mut (dyn VirtualDiskWrite + Send), DiskError> {
        match self.disk.as_mut() {
            Some(disk) => Ok(disk.as_mut()),
            None => Err(DiskError::new("the image is closed")),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(DiskError::with_kind(
                ErrorKind::OutOfRange,
                format!(
                    "Request out of range: {len} bytes at offset {offset} (virtual size {})",
                    self.size
                ),
            ));
        }
        Ok(())
    }

    /// Flushes after a write when the cache mode writes through.
    fn written(&mut self) -> Result<(), DiskError> {
        if self.write_through {
            self.disk()?.flush()?;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at guest `offset`; the range must lie within the disk. Bytes no image of the
    /// chain holds read as zeros.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.disk()?.read_at(offset, buf)
    }

    /// Writes `buf` at guest `offset`; the range must lie within the disk.
    ///
    /// ```
    /// use qcow2_hosted::{ErrorKind, Qcow2File};
    ///
    /// let path = std::env::temp_dir().join(format!("qcow2-doc-{}-write-at.qcow2", std::process::id()));
    /// let mut image = Qcow2File::create(&path, 1 << 20)?;
    /// image.write_at(65536 - 3, b"across a cluster boundary")?;
    /// let mut back = [0u8; 25];
    /// image.read_at(65536 - 3, &mut back)?;
    /// assert_eq!(&back, b"across a cluster boundary");
    ///
    /// let err = image.write_at((1 << 20) - 1, b"no").unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::OutOfRange);
    /// image.close()?;
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.disk()?.write_at(offset, buf)?;
        self.written()
    }

    /// Makes `len` bytes at `offset` read as zeros. With `unmap` the clusters behind whole-cluster parts of
    /// the range may be freed (in an image with a backing file they still read as zeros).
    ///
    /// ```
    /// use qcow2_hosted::Qcow2File;
    ///
    /// let path = std::env::temp_dir().join(format!("qcow2-doc-{}-zeroes.qcow2", std::process::id()));
    /// let mut image = Qcow2File::create(&path, 1 << 20)?;
    /// image.write_at(0, &[0xaa; 8192])?;
    /// image.write_zeroes(100, 1000, false)?;
    /// let mut back = [0xffu8; 8192];
    /// image.read_at(0, &mut back)?;
    /// assert!(back[..100].iter().all(|&b| b == 0xaa));
    /// assert!(back[100..1100].iter().all(|&b| b == 0));
    /// assert!(back[1100..].iter().all(|&b| b == 0xaa));
    /// image.close()?;
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.disk()?.write_zeroes(offset, len, unmap)?;
        self.written()
    }

    /// Discards `len` bytes at `offset`: a hint that their content is no longer needed, treated as QEMU's
    /// qcow2 driver treats it. Clusters wholly inside the range are released and read as zeros afterwards
    /// (also over a backing file, in a version 3 image); bytes of partly covered clusters, and clusters of a
    /// version 2 image with a backing file, keep their content. Use [`write_zeroes`](Self::write_zeroes)
    /// for bytes that must read as zeros.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.disk()?.discard(offset, len)?;
        self.written()
    }

    /// Writes `buf` at `offset` compressed, cluster by cluster (a cluster that does not compress is
    /// written as it is). As in QEMU, `offset` must be cluster-aligned and `buf` whole clusters, except for
    /// a range that ends at the end of the disk; raw images and qcow2 images with an external data file
    /// refuse ([`ErrorKind::Unsupported`]).
    pub fn write_compressed_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        self.check_range(offset, buf.len() as u64)?;
        write_compressed_range(self.disk()?, offset, buf)?;
        self.written()
    }

    /// Where the data at `offset` comes from, for at most `max_len` bytes (the first extent of
    /// `qemu-img map`'s view: which image of the chain, allocated or not, zeros, compressed, host offset).
    pub fn map_extent(&mut self, offset: u64, max_len: u64) -> Result<MapExtent, DiskError> {
        if offset >= self.size || max_len == 0 {
            return Err(DiskError::with_kind(
                ErrorKind::OutOfRange,
                format!(
                    "Request out of range: offset {offset} (virtual size {})",
                    self.size
                ),
            ));
        }
        let max_len = max_len.min(self.size - offset);
        self.disk()?.map_extent(offset, max_len)
    }

    /// Makes every completed write durable: cached metadata is written to the file, and (except with
    /// [`CacheMode::UNSAFE`]) the host is asked to make the file durable. Does nothing on a read-only image.
    pub fn flush(&mut self) -> Result<(), DiskError> {
        self.disk()?.flush()
    }

    /// Flushes and closes the image: cached metadata is written back and the dirty bit cleared. The error
    /// says what could not be made durable; the image is closed either way.
    pub fn close(mut self) -> Result<(), DiskError> {
        match self.disk.take() {
            Some(disk) => disk.close(),
            None => Ok(()),
        }
    }
}

impl Drop for Qcow2File {
    /// Closes the image, ignoring errors (use [`Qcow2File::close`] to see them).
    fn drop(&mut self) {
        if let Some(disk) = self.disk.take() {
            let _ = disk.close();
        }
    }
}

impl Read for Qcow2File {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.size.saturating_sub(self.position);
        let n = usize::try_from(left).map_or(buf.len(), |left| left.min(buf.len()));
        if n == 0 {
            return Ok(0);
        }
        self.read_at(self.position, &mut buf[..n])?;
        self.position += n as u64;
        Ok(n)
    }
}

impl Write for Qcow2File {
    /// Writes all of `buf` at the position, or nothing: a write that would reach past the end of the disk
    /// fails with [`io::ErrorKind::InvalidInput`] (an [`ErrorKind::OutOfRange`] [`DiskError`] inside).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.write_at(self.position, buf)?;
        self.position += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Qcow2File::flush(self).map_err(io::Error::from)
    }
}

impl Seek for Qcow2File {
    /// Moves the position; it may go past the end (reads there return 0 bytes, writes fail), not before the
    /// start.
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let (base, delta) = match pos {
            SeekFrom::Start(to) => {
                self.position = to;
                return Ok(to);
            }
            SeekFrom::End(delta) => (self.size, delta),
            SeekFrom::Current(delta) => (self.position, delta),
        };
        match base.checked_add_signed(delta) {
            Some(to) => {
                self.position = to;
                Ok(to)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "invalid seek to a negative or overflowing position",
            )),
        }
    }

    fn stream_position(&mut self) -> io::Result<u64> {
        Ok(self.position)
    }
}

/// Creates (or truncates) `path` for a new image.
fn create_file(path: &str) -> Result<File, DiskError> {
    FsOpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| {
            DiskError::io(
                &e,
                format!("Could not create '{path}': {}", DiskError::os_text(&e)),
            )
        })
}

fn read_only() -> DiskError {
    crate::qcow2_disk::engine_error(qcow2_core::Error::ReadOnly)
}

/// A disk opened read-only, seen as a [`VirtualDiskWrite`] whose writes fail.
struct ReadOnly(Box<dyn VirtualDisk + Send>);

impl VirtualDisk for ReadOnly {
    fn virtual_size(&self) -> u64 {
        self.0.virtual_size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.0.read_at(offset, buf)
    }
    fn map_extent(&mut self, offset: u64, max_len: u64) -> Result<MapExtent, DiskError> {
        self.0.map_extent(offset, max_len)
    }
}

impl VirtualDiskWrite for ReadOnly {
    fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> Result<(), DiskError> {
        Err(read_only())
    }
    fn write_zeroes(&mut self, _offset: u64, _len: u64, _unmap: bool) -> Result<(), DiskError> {
        Err(read_only())
    }
    fn discard(&mut self, _offset: u64, _len: u64) -> Result<(), DiskError> {
        Err(read_only())
    }
    fn compressed_cluster_size(&self) -> Result<u64, DiskError> {
        Err(read_only())
    }
    fn write_compressed(&mut self, _offset: u64, _data: &[u8]) -> Result<(), DiskError> {
        Err(read_only())
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
    fn close(self: Box<Self>) -> Result<(), DiskError> {
        Ok(())
    }
}
