//! What the command-line tool needs from an image, whatever its format.
//!
//! The commands (`info`, `map`, `convert`, `compare`, `io`) only see a [`VirtualDisk`] and [`ImageInfo`]s, so
//! they do not depend on the engine's API. `raw_disk` implements the trait for raw files; `qcow2_disk`
//! implements it on top of `qcow2-core`. Writers (`io`'s write commands, a conversion's output) see a
//! [`VirtualDiskWrite`], implemented by both.

use std::fmt;

use qcow2_core::create::Preallocation;

/// What kind of failure a [`DiskError`] is, for programs that react to it (the message is for people).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The host refused or failed an operation on a file (open, read, write, sync); the OS error's kind,
    /// e.g. [`std::io::ErrorKind::NotFound`] for a missing image or backing file.
    Io(std::io::ErrorKind),
    /// The file is not an image of the expected format, or its header (or a header extension) holds a
    /// value no valid image has.
    InvalidImage,
    /// Metadata found while working is inconsistent (QEMU would mark the image corrupt), or the image's
    /// corrupt bit is set and it was asked for writing.
    Corrupt,
    /// A valid image, or a request, that uses something this library does not do (a feature bit, a
    /// compression method, a protocol name, a backing chain deeper than the engine's limit, ...).
    Unsupported,
    /// A request outside the virtual disk (images do not grow by writing past their end).
    OutOfRange,
    /// A write to an image opened read-only (or that may only be opened read-only).
    ReadOnly,
    /// The image cannot grow any further (host offsets or the refcount table past their limits).
    NoSpace,
    /// A request or option that is malformed (a misaligned compressed write, an unknown format name, ...).
    InvalidArgument,
    /// Something asked for by name or ID that the image does not have (an internal snapshot).
    NotFound,
    /// Anything else (the message says what).
    Other,
}

impl ErrorKind {
    /// The [`std::io::ErrorKind`] a [`std::io::Error`] made from this kind carries.
    pub fn io_kind(self) -> std::io::ErrorKind {
        use std::io::ErrorKind as Io;
        match self {
            ErrorKind::Io(kind) => kind,
            ErrorKind::InvalidImage | ErrorKind::Corrupt => Io::InvalidData,
            ErrorKind::Unsupported => Io::Unsupported,
            ErrorKind::NotFound => Io::NotFound,
            ErrorKind::OutOfRange | ErrorKind::InvalidArgument => Io::InvalidInput,
            ErrorKind::ReadOnly => Io::PermissionDenied,
            ErrorKind::NoSpace => Io::StorageFull,
            ErrorKind::Other => Io::Other,
        }
    }
}

/// An error from an image: a one-line message in QEMU's words (for example "Could not open 'x': No such
/// file or directory"), which is what it displays, and its [`ErrorKind`].
///
/// The message is the public field `.0` (also [`DiskError::message`]); the kind is set by the constructor
/// and read with [`DiskError::kind`]. It converts into a [`std::io::Error`] of the matching
/// [`std::io::ErrorKind`] (see [`ErrorKind::io_kind`]) that displays the same message and gives the
/// `DiskError` back through [`std::io::Error::get_ref`]; converting that back yields the original error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskError(pub String, ErrorKind);

impl DiskError {
    /// Wraps a message, of kind [`ErrorKind::Other`].
    pub fn new(msg: impl Into<String>) -> DiskError {
        DiskError(msg.into(), ErrorKind::Other)
    }

    /// Wraps a message of the given kind.
    pub fn with_kind(kind: ErrorKind, msg: impl Into<String>) -> DiskError {
        DiskError(msg.into(), kind)
    }

    /// An OS error with `msg` as its message, of kind [`ErrorKind::Io`] with the error's own kind.
    pub fn io(e: &std::io::Error, msg: impl Into<String>) -> DiskError {
        DiskError(msg.into(), ErrorKind::Io(e.kind()))
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.1
    }

    /// The one-line message (what [`fmt::Display`] prints).
    pub fn message(&self) -> &str {
        &self.0
    }

    /// The same error with its message replaced by `f(message)` (a context prefix, say); the kind stays.
    pub fn map_message(self, f: impl FnOnce(String) -> String) -> DiskError {
        DiskError(f(self.0), self.1)
    }

    /// The message for an OS error the way C's `strerror` words it ("No such file or directory"), without
    /// Rust's " (os error N)" suffix.
    pub fn os_text(e: &std::io::Error) -> String {
        let s = e.to_string();
        match s.find(" (os error") {
            Some(pos) => s[..pos].to_string(),
            None => s,
        }
    }
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DiskError {}

impl From<std::io::Error> for DiskError {
    /// An OS error: its strerror text and [`ErrorKind::Io`]; a `std::io::Error` made from a `DiskError`
    /// gives that error back.
    fn from(e: std::io::Error) -> DiskError {
        let kind = ErrorKind::Io(e.kind());
        let text = DiskError::os_text(&e);
        match e.into_inner().map(|inner| inner.downcast::<DiskError>()) {
            Some(Ok(disk)) => *disk,
            Some(Err(_)) | None => DiskError(text, kind),
        }
    }
}

impl From<DiskError> for std::io::Error {
    /// An I/O error of [`ErrorKind::io_kind`] that displays the message and holds the `DiskError`.
    fn from(e: DiskError) -> std::io::Error {
        std::io::Error::new(e.kind().io_kind(), e)
    }
}

/// One extent of a guest range as `qemu-img map` sees it (QEMU's block status of the whole chain). Extents are
/// reported unmerged; the `map` command merges neighbours the way qemu-img does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapExtent {
    /// Guest offset of the first byte.
    pub start: u64,
    /// Length in bytes (> 0).
    pub length: u64,
    /// Which image of the backing chain decides the content: 0 the image itself, 1 its backing file, ...
    /// For an extent allocated nowhere, the depth of the last image of the chain.
    pub depth: u32,
    /// Allocated somewhere in the chain (QEMU's BDRV_BLOCK_ALLOCATED).
    pub present: bool,
    /// Known to read as zeros.
    pub zero: bool,
    /// Holds data in the image that decides it (QEMU's BDRV_BLOCK_DATA).
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset of the first byte in `file`, when the data sits there uncompressed (BDRV_BLOCK_OFFSET_VALID).
    pub offset: Option<u64>,
    /// The host file `offset` refers to, as given to open it (shown by the human map output).
    pub file: Option<String>,
}

/// An opened image, read side.
pub trait VirtualDisk {
    /// Guest-visible size in bytes.
    fn virtual_size(&self) -> u64;

    /// Reads `buf.len()` bytes at guest `offset`. The range must lie within [`VirtualDisk::virtual_size`].
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError>;

    /// The extent that starts at `offset`: `length` is at least 1 and at most `max_len` (which is > 0 and does
    /// not reach past the virtual size); it may be shorter than the whole run of same-status bytes.
    fn map_extent(&mut self, offset: u64, max_len: u64) -> Result<MapExtent, DiskError>;

    /// From now on, reads the disk as the image's internal snapshot with this ID and/or name (both must
    /// match when both are given) holds it, as `qemu-img convert -l` does; the virtual size stays. Refused
    /// by formats without internal snapshots.
    fn load_snapshot(&mut self, id: Option<&str>, name: Option<&str>) -> Result<(), DiskError> {
        let _ = (id, name);
        Err(DiskError::new(
            "this format does not support temporarily loading internal snapshots",
        ))
    }

    /// Calls `f` with each run of dirty guest bytes `(offset, length)` of the image's persistent bitmap
    /// `name`, in order. Refused with QEMU's messages when there is no such bitmap ("Dirty bitmap 'NAME' not
    /// found", also for formats without bitmaps) or it is inconsistent.
    fn bitmap_dirty_runs(&mut self, name: &str, f: &mut DirtyRunSink<'_>) -> Result<(), DiskError> {
        let _ = f;
        Err(DiskError::new(format!("Dirty bitmap '{name}' not found")))
    }
}

/// Receives the dirty runs of a persistent bitmap ([`VirtualDisk::bitmap_dirty_runs`]).
pub type DirtyRunSink<'a> = dyn FnMut(u64, u64) -> Result<(), DiskError> + 'a;

/// Feeds dirty runs to a sink (for [`BitmapChange::MergeRuns`]).
pub type DirtyRunSource<'a> = dyn FnMut(&mut DirtyRunSink<'_>) -> Result<(), DiskError> + 'a;

/// A change to a persistent bitmap, as `qemu-img bitmap` makes them.
pub enum BitmapChange<'a> {
    /// A new empty bitmap, enabled (`granularity`: bytes per bit, `None`: the default for the image).
    Add {
        /// Bytes per bit as given (QEMU keeps the low 32 bits), or `None` for the default.
        granularity: Option<u64>,
    },
    /// The bitmap removed.
    Remove,
    /// Every bit cleared.
    Clear,
    /// Writes set its bits from now on.
    Enable,
    /// Writes no longer set its bits.
    Disable,
    /// The bits of another bitmap of the same image set in it.
    Merge(&'a str),
    /// The bits of the dirty runs that the source feeds set in it (a bitmap of another image).
    MergeRuns(&'a mut DirtyRunSource<'a>),
}

impl fmt::Debug for BitmapChange<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BitmapChange::Add { granularity } => write!(f, "Add({granularity:?})"),
            BitmapChange::Remove => f.write_str("Remove"),
            BitmapChange::Clear => f.write_str("Clear"),
            BitmapChange::Enable => f.write_str("Enable"),
            BitmapChange::Disable => f.write_str("Disable"),
            BitmapChange::Merge(source) => write!(f, "Merge({source})"),
            BitmapChange::MergeRuns(_) => f.write_str("MergeRuns"),
        }
    }
}

/// One internal snapshot, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotInfo {
    /// Unique ID string.
    pub id: String,
    /// Name (tag).
    pub name: String,
    /// Size of the saved VM state in bytes.
    pub vm_state_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: u64,
    /// Nanoseconds part of the creation time.
    pub date_nsec: u32,
    /// Guest clock at the snapshot, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count, if the snapshot entry stores one.
    pub icount: Option<u64>,
}

/// One persistent dirty bitmap, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BitmapInfo {
    /// Bitmap name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Flag names in QEMU's words: "in-use", "auto".
    pub flags: Vec<String>,
}

/// qcow2's part of `qemu-img info` ("Format specific information").
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Qcow2Specific {
    /// "0.10" for version 2, "1.1" for version 3.
    pub compat: String,
    /// External data file name (v3 only).
    pub data_file: Option<String>,
    /// Raw external data file (shown whenever there is a data file).
    pub data_file_raw: Option<bool>,
    /// Extended L2 entries (v3).
    pub extended_l2: Option<bool>,
    /// Lazy refcounts (v3).
    pub lazy_refcounts: Option<bool>,
    /// Corrupt bit (v3).
    pub corrupt: Option<bool>,
    /// Refcount width in bits.
    pub refcount_bits: u64,
    /// The encryption of an encrypted image.
    pub encrypt: Option<EncryptInfo>,
    /// Persistent bitmaps; `None` (not printed) when the image has none.
    pub bitmaps: Option<Vec<BitmapInfo>>,
    /// "zlib" or "zstd".
    pub compression_type: String,
}

impl Qcow2Specific {
    /// What QEMU reports for a version `version` image with default v3 flags cleared.
    pub fn new(version: u32, refcount_bits: u64, compression_type: &str) -> Qcow2Specific {
        let v3 = version >= 3;
        Qcow2Specific {
            compat: if v3 { "1.1" } else { "0.10" }.to_string(),
            data_file: None,
            data_file_raw: None,
            extended_l2: v3.then_some(false),
            lazy_refcounts: v3.then_some(false),
            corrupt: v3.then_some(false),
            refcount_bits,
            encrypt: None,
            bitmaps: None,
            compression_type: compression_type.to_string(),
        }
    }
}

/// How an image is encrypted, as `qemu-img info` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncryptInfo {
    /// Legacy AES (`encrypt.format=aes`).
    Aes,
    /// LUKS, with its header.
    Luks(Box<qcow2_core::format::luks::LuksHeader>),
}

/// The protocol ("file") node under a format node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChildInfo {
    /// File name as given.
    pub filename: String,
    /// File length rounded up to 512 bytes, as QEMU reports it.
    pub length: u64,
    /// Bytes allocated on the host (`st_blocks * 512`), if known.
    pub actual_size: Option<u64>,
}

impl FileChildInfo {
    /// Stats `path` the way QEMU's file driver does.
    pub fn from_path(
        display_name: &str,
        path: &std::path::Path,
    ) -> Result<FileChildInfo, DiskError> {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(path).map_err(DiskError::from)?;
        Ok(FileChildInfo {
            filename: display_name.to_string(),
            length: md.len().div_ceil(512) * 512,
            actual_size: Some(md.blocks() * 512),
        })
    }
}

/// Everything `qemu-img info` prints about one image (one element of a backing chain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// File name as given (for a backing file: as QEMU opened it, i.e. the full backing file name).
    pub filename: String,
    /// "qcow2" or "raw".
    pub format: String,
    /// Guest-visible size.
    pub virtual_size: u64,
    /// Host bytes allocated to the image file (`st_blocks * 512`), if known.
    pub actual_size: Option<u64>,
    /// qcow2 dirty bit.
    pub dirty_flag: bool,
    /// Cluster size (qcow2 only).
    pub cluster_size: Option<u64>,
    /// Shown (as `"encrypted": true`) only for encrypted images.
    pub encrypted: bool,
    /// Backing file name exactly as stored in the image.
    pub backing_filename: Option<String>,
    /// Backing file name resolved against the image's directory.
    pub full_backing_filename: Option<String>,
    /// Backing file format from the header extension.
    pub backing_filename_format: Option<String>,
    /// Internal snapshots (not printed when empty).
    pub snapshots: Vec<SnapshotInfo>,
    /// qcow2 format-specific data.
    pub qcow2: Option<Qcow2Specific>,
    /// The "file" child node.
    pub file: Option<FileChildInfo>,
}

impl ImageInfo {
    /// Info for a raw image file.
    pub fn raw(filename: &str, file: FileChildInfo) -> ImageInfo {
        ImageInfo {
            filename: filename.to_string(),
            format: "raw".to_string(),
            virtual_size: file.length,
            actual_size: file.actual_size,
            dirty_flag: false,
            cluster_size: None,
            encrypted: false,
            backing_filename: None,
            full_backing_filename: None,
            backing_filename_format: None,
            snapshots: Vec::new(),
            qcow2: None,
            file: Some(file),
        }
    }
}

/// The message QEMU gives for a request it refuses as malformed (`EINVAL`).
pub const EINVAL: &str = "Invalid argument";
/// The message QEMU gives for a request outside the disk (`EIO`).
pub const EIO: &str = "Input/output error";
/// The message QEMU gives for an operation the driver does not do (`ENOTSUP`).
pub const ENOTSUP: &str = "Operation not supported";

/// An opened image, write side (the image at the top of the chain; backing files are never written).
///
/// Ranges are guest ranges within [`VirtualDisk::virtual_size`]; callers check that, as QEMU's block layer
/// does, before calling. Messages are QEMU's strerror words where QEMU would fail with an errno.
pub trait VirtualDiskWrite: VirtualDisk {
    /// Writes `buf` at guest `offset`.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError>;

    /// Makes `len` bytes at `offset` read as zeros; with `unmap` the storage behind them may be released.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError>;

    /// Discards `len` bytes at `offset` (a hint: what is not released keeps its content or reads as zeros,
    /// as the format decides).
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError>;

    /// With `on`, the space that discards and unmapping zero writes give back inside the image file is
    /// released in the file too (qemu-io's default; a raw file releases it anyway).
    fn pass_discards(&mut self, on: bool) {
        let _ = on;
    }

    /// The unit of compressed writes (the cluster size), or why this image takes no compressed writes.
    fn compressed_cluster_size(&self) -> Result<u64, DiskError>;

    /// Writes one cluster at the cluster-aligned `offset`, compressed if it compresses and as plain data
    /// otherwise. `data` is the whole cluster, or less for the last cluster of a disk whose size is not a
    /// multiple of the cluster size (the rest of that cluster counts as zeros).
    fn write_compressed(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError>;

    /// The compression [`VirtualDiskWrite::write_compressed`] applies, as a function any thread may run, so
    /// that a caller can compress clusters in parallel and store them with
    /// [`VirtualDiskWrite::write_precompressed`]. `None` when the disk takes no compressed writes or its
    /// compressor cannot leave its thread.
    fn thread_compressor(&self) -> Option<ThreadCompressor> {
        None
    }

    /// A handle that stores data at host offsets of this disk's file from any thread, several at once, for
    /// [`VirtualDiskWrite::reserve`]; `None` when the disk takes no reservations.
    fn parallel_writer(&self) -> Option<ParallelWriter> {
        None
    }

    /// Starts a write at guest `offset` of `len` bytes whose data the caller stores itself, from any
    /// thread, with the [`VirtualDiskWrite::parallel_writer`] at [`Reservation::host`], while this disk
    /// serves other requests; then [`VirtualDiskWrite::commit`] makes the guest see it. The reservation may
    /// cover less than `len` from `offset` (the rest is asked for again), or the disk may ask for the first
    /// bytes to be written with [`VirtualDiskWrite::write_at`] ([`Reserve::WriteFirst`]). A raw file
    /// reserves any range (host offsets are guest offsets); a qcow2 image reserves whole clusters that need
    /// new host clusters.
    fn reserve(&mut self, offset: u64, len: u64) -> Result<Reserve, DiskError> {
        let _ = offset;
        Ok(Reserve::WriteFirst(len))
    }

    /// Makes the guest see a reservation whose data has been stored.
    fn commit(&mut self, r: Reservation) -> Result<(), DiskError> {
        let _ = r;
        Ok(())
    }

    /// Drops a reservation whose data could not be stored.
    fn cancel(&mut self, r: Reservation) {
        let _ = r;
    }

    /// Stores one cluster at the cluster-aligned `offset` as [`VirtualDiskWrite::write_compressed`] would:
    /// `compressed` is what [`VirtualDiskWrite::thread_compressor`]'s compressor made of `data` (`None`: it
    /// does not compress, and `data` is written plain). The default compresses `data` again.
    fn write_precompressed(
        &mut self,
        offset: u64,
        data: &[u8],
        compressed: Option<&[u8]>,
    ) -> Result<(), DiskError> {
        let _ = compressed;
        self.write_compressed(offset, data)
    }

    /// Changes the virtual size to `size` bytes: a larger disk reads as zeros past the old end (preallocated
    /// as `prealloc` says, where the format can), a smaller one loses everything past the new end. Refusals
    /// carry qemu-img's messages.
    fn resize(&mut self, size: u64, prealloc: Preallocation) -> Result<(), DiskError> {
        let _ = (size, prealloc);
        Err(DiskError::with_kind(ErrorKind::Unsupported, ENOTSUP))
    }

    /// Creates an internal snapshot of the disk named `name`, dated `date` (seconds and nanoseconds since the
    /// epoch), with the next numeric id.
    fn create_snapshot(&mut self, name: &str, date: (u32, u32)) -> Result<(), DiskError> {
        let _ = (name, date);
        Err(DiskError::with_kind(ErrorKind::Unsupported, ENOTSUP))
    }

    /// Makes the internal snapshot `name` (its id first, else the first with that name) the active disk.
    fn apply_snapshot(&mut self, name: &str) -> Result<(), DiskError> {
        let _ = name;
        Err(DiskError::with_kind(ErrorKind::Unsupported, ENOTSUP))
    }

    /// Deletes the first internal snapshot named `name`.
    fn delete_snapshot(&mut self, name: &str) -> Result<(), DiskError> {
        let _ = name;
        Err(DiskError::with_kind(ErrorKind::Unsupported, ENOTSUP))
    }

    /// Turns the image's lazy refcounts on or off (qemu-img amend's `lazy_refcounts`).
    fn set_lazy_refcounts(&mut self, on: bool) -> Result<(), DiskError> {
        let _ = on;
        Err(DiskError::with_kind(ErrorKind::Unsupported, ENOTSUP))
    }

    /// Changes the image's refcount width (qemu-img amend's `refcount_bits`: 1 to 64, a power of two).
    fn set_refcount_bits(&mut self, bits: u64) -> Result<(), DiskError> {
        let _ = bits;
        Err(DiskError::with_kind(ErrorKind::Unsupported, ENOTSUP))
    }

    /// Changes the image's format version (qemu-img amend's `compat`: 2 for 0.10, 3 for 1.1).
    fn set_compat(&mut self, version: u32) -> Result<(), DiskError> {
        let _ = version;
        Err(DiskError::with_kind(ErrorKind::Unsupported, ENOTSUP))
    }

    /// Names another backing file (and its format), or none, without touching the data (qemu-img
    /// rebase's unsafe mode).
    fn set_backing_file(&mut self, backing: Option<(&str, Option<&str>)>) -> Result<(), DiskError> {
        let _ = backing;
        Err(DiskError::with_kind(ErrorKind::Unsupported, ENOTSUP))
    }

    /// Changes the external data file's stored name (`Some(None)`: no name; `None`: kept) and turns
    /// `data_file_raw` off when `raw` is false (qemu-img amend's `data_file` and `data_file_raw`).
    fn set_data_file(&mut self, name: Option<Option<&str>>, raw: bool) -> Result<(), DiskError> {
        let _ = (name, raw);
        Err(DiskError::with_kind(ErrorKind::Unsupported, ENOTSUP))
    }

    /// Drops everything the image holds, so that it reads as its backing file (after a commit).
    fn make_empty(&mut self) -> Result<(), DiskError> {
        Err(DiskError::with_kind(ErrorKind::Unsupported, ENOTSUP))
    }

    /// The image's format as QEMU names it ("qcow2", "raw") and whether it can hold persistent bitmaps
    /// (qcow2 version 3).
    fn bitmap_support(&self) -> (&'static str, bool) {
        ("raw", false)
    }

    /// Changes the persistent bitmap `name` (errors in QEMU's words, without the "Operation ... failed: "
    /// that `qemu-img bitmap` puts before them; `node` names the image in them).
    fn bitmap_change(
        &mut self,
        name: &str,
        node: &str,
        change: BitmapChange<'_>,
    ) -> Result<(), DiskError> {
        match change {
            BitmapChange::Add { .. } => Err(DiskError::with_kind(
                ErrorKind::Unsupported,
                format!("Can't store persistent bitmaps to {node}: Operation not supported"),
            )),
            _ => Err(DiskError::new(format!("Dirty bitmap '{name}' not found"))),
        }
    }

    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<(), DiskError>;

    /// Flushes and closes the image (for qcow2: metadata written back, dirty bit cleared).
    fn close(self: Box<Self>) -> Result<(), DiskError>;
}

/// QEMU's view of the disk length for requests: the size in whole 512-byte sectors.
pub fn request_limit(disk: &dyn VirtualDisk) -> u64 {
    disk.virtual_size().div_ceil(512).saturating_mul(512)
}

/// Whether `offset .. offset + len` lies within the disk as QEMU's block layer checks it.
pub fn in_range(disk: &dyn VirtualDisk, offset: u64, len: u64) -> bool {
    let size = request_limit(disk);
    offset <= size && size - offset >= len
}

/// What [`VirtualDiskWrite::reserve`] made of a request.
#[derive(Debug)]
pub enum Reserve {
    /// The first bytes of the range (perhaps all of it), for data stored from any thread.
    Reserved(Reservation),
    /// Write this many bytes from the start of the range with [`VirtualDiskWrite::write_at`] instead,
    /// then ask for the rest.
    WriteFirst(u64),
}

/// A range of a disk reserved for data stored from another thread ([`VirtualDiskWrite::reserve`]): used up
/// by [`VirtualDiskWrite::commit`] or [`VirtualDiskWrite::cancel`] on the disk that made it.
#[derive(Debug)]
pub enum Reservation {
    /// Bytes of a raw file: host offsets are guest offsets.
    Raw {
        /// Guest (and host) offset of the first byte.
        offset: u64,
        /// Bytes reserved.
        len: u64,
    },
    /// New clusters of a qcow2 image (the engine's reservation).
    Qcow2(qcow2_core::write::Reservation),
}

impl Reservation {
    /// Guest offset of the first byte.
    pub fn guest(&self) -> u64 {
        match self {
            Reservation::Raw { offset, .. } => *offset,
            Reservation::Qcow2(r) => r.guest(),
        }
    }
    /// Where the data goes in the disk's file.
    pub fn host(&self) -> u64 {
        match self {
            Reservation::Raw { offset, .. } => *offset,
            Reservation::Qcow2(r) => r.host(),
        }
    }
    /// Bytes reserved (never 0).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u64 {
        match self {
            Reservation::Raw { len, .. } => *len,
            Reservation::Qcow2(r) => r.len(),
        }
    }
}

/// Positional writes into a disk's file from several threads ([`VirtualDiskWrite::parallel_writer`]).
#[derive(Debug, Clone)]
pub struct ParallelWriter {
    file: std::sync::Arc<std::fs::File>,
    /// Writes end at or before this offset.
    size: u64,
}

impl ParallelWriter {
    /// Writes into `file`, up to `size` bytes.
    pub fn new(file: std::fs::File, size: u64) -> ParallelWriter {
        ParallelWriter {
            file: std::sync::Arc::new(file),
            size,
        }
    }

    /// Stores the data of reservation `r` (`buf` is `r.len()` bytes).
    pub fn store(&self, r: &Reservation, buf: &[u8]) -> Result<(), DiskError> {
        if buf.len() as u64 != r.len() {
            return Err(DiskError::with_kind(
                ErrorKind::InvalidArgument,
                "data does not match the reservation",
            ));
        }
        self.write_at(r.host(), buf)
    }

    /// Writes `buf` at `offset` of the file.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        use std::os::unix::fs::FileExt;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(DiskError::with_kind(ErrorKind::OutOfRange, EIO));
        }
        self.file.write_all_at(buf, offset).map_err(DiskError::from)
    }

    /// Makes what was written durable.
    pub fn sync(&self) -> Result<(), DiskError> {
        self.file.sync_data().map_err(DiskError::from)
    }
}

/// A disk's cluster compression as a plain function of the bytes, which any thread may run
/// ([`VirtualDiskWrite::thread_compressor`]).
#[derive(Debug, Clone, Copy)]
pub struct ThreadCompressor {
    /// Compresses one whole cluster with the given compression type (`None`: it does not compress).
    pub compress: fn(qcow2_core::format::CompressionType, &[u8]) -> Option<Vec<u8>>,
    /// The image's compression type.
    pub ty: qcow2_core::format::CompressionType,
    /// The image's cluster size.
    pub cluster: usize,
}

impl ThreadCompressor {
    /// The compressed form of one cluster (`data` is the cluster, or its start for the last cluster of a
    /// disk, the rest counting as zeros), or `None` when it does not compress into less than a cluster.
    pub fn compress(&self, data: &[u8]) -> Option<Vec<u8>> {
        let out = if data.len() == self.cluster {
            (self.compress)(self.ty, data)
        } else {
            let mut whole = vec![0u8; self.cluster];
            whole.get_mut(..data.len())?.copy_from_slice(data);
            (self.compress)(self.ty, &whole)
        };
        out.filter(|c| c.len() < self.cluster)
    }
}

/// A compressed write of `buf` at `offset` with QEMU's rules (`blk_pwrite_compressed` on qcow2): the range
/// must lie within the disk, start on a cluster boundary and cover whole clusters (or end at the end of the
/// disk); each cluster is written compressed, or plain if it does not compress. An empty write does
/// nothing.
pub fn write_compressed_range(
    disk: &mut dyn VirtualDiskWrite,
    offset: u64,
    buf: &[u8],
) -> Result<(), DiskError> {
    let len = buf.len() as u64;
    if !in_range(disk, offset, len) {
        return Err(DiskError::with_kind(ErrorKind::OutOfRange, EIO));
    }
    // A format without compression refuses even an empty request; qcow2 takes it as a no-op.
    let cluster = disk.compressed_cluster_size()?;
    if buf.is_empty() {
        return Ok(());
    }
    if cluster == 0 || !offset.is_multiple_of(cluster) {
        return Err(DiskError::with_kind(ErrorKind::InvalidArgument, EINVAL));
    }
    if !len.is_multiple_of(cluster) && offset + len != request_limit(disk) {
        return Err(DiskError::with_kind(ErrorKind::InvalidArgument, EINVAL));
    }
    let step = usize::try_from(cluster)
        .map_err(|_| DiskError::with_kind(ErrorKind::InvalidArgument, EINVAL))?;
    for (i, chunk) in buf.chunks(step).enumerate() {
        disk.write_compressed(offset + i as u64 * cluster, chunk)?;
    }
    Ok(())
}
