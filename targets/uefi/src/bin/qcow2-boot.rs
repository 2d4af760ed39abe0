//! Boots the EFI program inside a qcow2 disk image, with qcow2-core as the only code that reads qcow2.
//!
//! 1. Reads its settings: `qcow2-boot.cfg` next to this program on its file system, then its load options
//!    (see [`Settings`]): `mode=ro` (the default) or `mode=rw`, and `snapshot=NAME` (boot an internal
//!    snapshot, read-only) or `rollback=NAME` (with `mode=rw`: make the snapshot the disk, then boot it: an
//!    A/B rollback without a second partition).
//! 2. Finds the disks (firmware Block I/O, whole disks) whose content is a qcow2 image. The top image is
//!    one with a backing file (or the only qcow2 disk); backing files are the other qcow2 disks, handed out
//!    in the firmware's handle order (firmware has no file names: the resolver ignores the stored name).
//! 3. Opens the top image with `Image::open` (read-only) or `Image::open_writable` (read-write; the backing
//!    files stay read-only) over the firmware's Block I/O, with `Inflate` for deflate-compressed clusters.
//!    With `snapshot=` the snapshot's L1 table stands in for the active one (`Image::view_snapshot`); with
//!    `rollback=` the snapshot is applied (`Image::apply_snapshot`: one header write switches the disk, so
//!    a power cut leaves the old disk or the rolled-back one) and the image flushed before anything else.
//!    An encrypted image (LUKS, or legacy AES) is unlocked with the settings' `passphrase=`; without one, or
//!    when it is wrong, the passphrase is asked for at the console (not echoed), three times at most.
//! 4. Installs a Block I/O protocol (512-byte blocks; read-only unless `mode=rw`) for the virtual disk on a
//!    new handle with a vendor-defined hardware device path, and connects controllers recursively, so that
//!    the firmware's own partition and FAT drivers bind to it.
//! 5. Loads `\EFI\BOOT\BOOTX64.EFI` from a file system on that disk and starts it.
//! 6. If it returns, disconnects and removes the virtual disk and closes the image.
//!
//! Writes are write-through: every WriteBlocks call ends with the engine's `flush` (its metadata written
//! back and the firmware disk flushed), so the media reports no write caching and data is durable when the
//! call returns. The image is closed (which also clears the dirty bit of a lazy-refcounts image) when the
//! payload resets the machine (a reset notification), when it calls ExitBootServices (which is wrapped
//! while the payload runs), or when it returns.

#![no_std]
#![no_main]

use core::ffi::c_void;
use core::fmt::Write as _;
use core::ptr::{NonNull, addr_of, addr_of_mut};
use core::sync::atomic::{AtomicBool, Ordering};

use qcow2_core::format::luks::LuksError;
use qcow2_core::{
    BlockDevice, BlockDeviceWrite, Buffers, Error, FileRequest, Image, Inflate, Resolver,
    WriteState,
};
use uefi::boot::{self, LoadImageSource, MemoryType, OpenProtocolAttributes};
use uefi::boot::{OpenProtocolParams, ScopedProtocol, SearchType, Tpl};
use uefi::prelude::*;
use uefi::proto::console::text::Key;
use uefi::proto::device_path::{DevicePath, DeviceSubType, DeviceType};
use uefi::proto::loaded_image::LoadedImage;
use uefi::proto::media::block::BlockIO;
use uefi::proto::media::file::{File, FileAttribute, FileMode, RegularFile};
use uefi::proto::media::fs::SimpleFileSystem;
use uefi::proto::misc::ResetNotification;
use uefi::{CStr16, Guid, Identify, guid};
use uefi_raw::Boolean;
use uefi_raw::protocol::block::{BlockIoMedia, BlockIoProtocol};
use uefi_raw::table::runtime::ResetType;

/// The vendor GUID of the virtual disk's device path node.
const VENDOR: Guid = guid!("5f0c2c1e-7a43-4d4b-9c35-71d0f7a1c0b2");
/// Block size of the virtual disk.
const SECTOR: usize = 512;
/// Images in a chain at most.
const DEPTH: usize = 4;
/// Metadata cache slices.
const SLICES: usize = 8;
/// Largest firmware block size this program handles (the bounce buffer).
const MAX_BLOCK: usize = 4096;
/// qcow2 disks looked at, at most.
const MAX_DISKS: usize = 8;
/// The settings file, in the directory this program was loaded from.
const CONFIG_NAME: &str = "qcow2-boot.cfg";
/// Longest settings file or load option string read.
const MAX_SETTINGS: usize = 1024;
/// Longest path (UCS-2 code units, with the NUL) of the settings file.
const MAX_PATH: usize = 260;
/// The program started from the virtual disk.
const LOADER: &CStr16 = cstr16!("\\EFI\\BOOT\\BOOTX64.EFI");

type Disk = Image<FwDisk, &'static mut [u8], Inflate<&'static mut [u8]>, DEPTH, SLICES, WriteState>;

static mut BOUNCE: [u8; MAX_BLOCK] = [0; MAX_BLOCK];
static mut METADATA: [u8; SLICES * 4096] = [0; SLICES * 4096];
/// One whole 64 KiB cluster: the last compressed cluster is kept inflated.
static mut WINDOW: [u8; 64 * 1024] = [0; 64 * 1024];
static mut INPUT: [u8; 4096] = [0; 4096];
static mut PROBE: [u8; MAX_BLOCK] = [0; MAX_BLOCK];
/// The open image, used by the Block I/O callbacks and the shutdown hooks.
static mut DISK: Option<Disk> = None;
/// Set while a callback or hook uses `DISK` or `MEDIA`: a nested call (from an event at a higher TPL) is
/// refused instead of touching the image halfway through a request.
static BUSY: AtomicBool = AtomicBool::new(false);
static mut MEDIA: BlockIoMedia = BlockIoMedia {
    media_id: 1,
    removable_media: Boolean::FALSE,
    media_present: Boolean::TRUE,
    logical_partition: Boolean::FALSE,
    read_only: Boolean::TRUE,
    write_caching: Boolean::FALSE,
    block_size: SECTOR as u32,
    io_align: 0,
    last_block: 0,
    lowest_aligned_lba: 0,
    logical_blocks_per_physical_block: 1,
    optimal_transfer_length_granularity: 0,
};
static mut BLOCK_IO: BlockIoProtocol = BlockIoProtocol {
    revision: 0x0001_0000,
    media: core::ptr::null(),
    reset: vd_reset,
    read_blocks: vd_read,
    write_blocks: vd_write,
    flush_blocks: vd_flush,
};

/// Vendor-defined hardware node (type 1, subtype 4, 20 bytes: header and GUID), then the end node.
static mut DEVICE_PATH: [u8; 24] = [0; 24];
/// The full device path of the started program: the file system's path and a file path node.
static mut LOADER_PATH: [u8; 512] = [0; 512];

/// Prints one line on the console; a console that fails is ignored (nothing here may panic).
macro_rules! say {
    ($($arg:tt)*) => {
        uefi::system::with_stdout(|out| {
            let _ = writeln!(out, "qcow2-boot: {}", format_args!($($arg)*));
        })
    };
}

/// How the virtual disk is served.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    ReadOnly,
    ReadWrite,
}

/// Longest snapshot name (or id) a setting names.
const MAX_SNAPSHOT_NAME: usize = 64;
/// Longest passphrase (from the settings or typed at the console).
const MAX_PASSPHRASE: usize = 128;
/// Passphrases typed at the console before giving up.
const PASSPHRASE_TRIES: usize = 3;

/// What to do with an internal snapshot before booting.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SnapshotUse {
    /// Boot the active disk.
    None,
    /// Boot the snapshot, read-only (`snapshot=NAME`).
    Boot,
    /// Apply the snapshot, then boot the disk (`rollback=NAME`, `mode=rw`).
    Rollback,
}

/// The settings: `key=value` words separated by white space, `#` to the end of the line a comment.
/// Read from `qcow2-boot.cfg` in the directory this program was loaded from, then from its load options
/// (a UCS-2 string, as the UEFI shell or a `Boot####` entry's optional data gives it), which override the
/// file. Keys: `mode` = `ro` / `read-only` (the default) or `rw` / `read-write`; `snapshot` = the id or
/// name of an internal snapshot to boot (read-only); `rollback` = the id or name of one to apply first
/// (needs `mode=rw`). An id is matched first, then a name, as `qemu-img snapshot -a` does; `passphrase` =
/// the passphrase of an encrypted disk (one word; without it an encrypted disk's passphrase is asked for at
/// the console).
struct Settings {
    mode: Mode,
    snapshot: SnapshotUse,
    name: [u8; MAX_SNAPSHOT_NAME],
    name_len: usize,
    passphrase: [u8; MAX_PASSPHRASE],
    passphrase_len: usize,
}

impl Settings {
    /// Applies the words of `text`. In the load options a word without `=` is skipped (the shell passes the
    /// program's own name first); in the file it is an error, as is any unknown key or value.
    fn apply(&mut self, text: &[u8], words_without_eq: bool) -> Result<(), &'static str> {
        for line in text.split(|&b| b == b'\n') {
            let line = line.split(|&b| b == b'#').next().unwrap_or(&[]);
            for word in line.split(|b| b.is_ascii_whitespace()) {
                if word.is_empty() {
                    continue;
                }
                let mut kv = word.splitn(2, |&b| b == b'=');
                let (key, value) = (kv.next().unwrap_or(&[]), kv.next());
                let Some(value) = value else {
                    if words_without_eq {
                        continue;
                    }
                    return Err("a word without '=' (settings are key=value)");
                };
                match (key, value) {
                    (b"mode", b"ro" | b"read-only") => self.mode = Mode::ReadOnly,
                    (b"mode", b"rw" | b"read-write") => self.mode = Mode::ReadWrite,
                    (b"mode", _) => return Err("mode must be ro or rw"),
                    (b"passphrase", p) => {
                        if p.is_empty() || p.len() > MAX_PASSPHRASE {
                            return Err("a passphrase must have 1 to 128 characters");
                        }
                        self.passphrase
                            .get_mut(..p.len())
                            .ok_or("passphrase")?
                            .copy_from_slice(p);
                        self.passphrase_len = p.len();
                    }
                    (b"snapshot" | b"rollback", name) => {
                        if name.is_empty() || name.len() > MAX_SNAPSHOT_NAME {
                            return Err("a snapshot name must have 1 to 64 characters");
                        }
                        self.name
                            .get_mut(..name.len())
                            .ok_or("name")?
                            .copy_from_slice(name);
                        self.name_len = name.len();
                        self.snapshot = if key == b"snapshot" {
                            SnapshotUse::Boot
                        } else {
                            SnapshotUse::Rollback
                        };
                    }
                    _ => {
                        return Err(
                            "unknown setting (the keys are mode, snapshot, rollback and passphrase)",
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The settings that do not go together.
    fn check(&self) -> Result<(), &'static str> {
        match (self.snapshot, self.mode) {
            (SnapshotUse::Boot, Mode::ReadWrite) => {
                Err("snapshot= boots a snapshot read-only (mode=ro); rollback= makes it the disk")
            }
            (SnapshotUse::Rollback, Mode::ReadOnly) => {
                Err("rollback= changes the disk: it needs mode=rw")
            }
            _ => Ok(()),
        }
    }

    /// The snapshot name (or id) the settings give.
    fn name(&self) -> &[u8] {
        self.name.get(..self.name_len).unwrap_or(&[])
    }

    /// The settings file, then the load options.
    fn read() -> Result<Self, Status> {
        let mut s = Settings {
            mode: Mode::ReadOnly,
            snapshot: SnapshotUse::None,
            name: [0; MAX_SNAPSHOT_NAME],
            name_len: 0,
            passphrase: [0; MAX_PASSPHRASE],
            passphrase_len: 0,
        };
        let image = boot::open_protocol_exclusive::<LoadedImage>(boot::image_handle())
            .map_err(|e| e.status())?;
        let mut text = [0u8; MAX_SETTINGS];
        let mut path = [0u16; MAX_PATH];
        if let (Some(device), Some(name)) = (image.device(), config_path(&image, &mut path)) {
            match read_small_file(device, name, &mut text) {
                Ok(n) => {
                    s.apply(text.get(..n).unwrap_or(&[]), false).map_err(|e| {
                        say!("{name}: {e}");
                        Status::INVALID_PARAMETER
                    })?;
                    say!("settings read from {name}");
                }
                Err(Status::NOT_FOUND) | Err(Status::UNSUPPORTED) => {}
                Err(e) => {
                    say!("reading {name}: {e:?}");
                    return Err(e);
                }
            }
        }
        if let Some(n) = image
            .load_options_as_bytes()
            .and_then(|o| ucs2_text(o, &mut text))
        {
            s.apply(text.get(..n).unwrap_or(&[]), true).map_err(|e| {
                say!("load options: {e}");
                Status::INVALID_PARAMETER
            })?;
        }
        s.check().map_err(|e| {
            say!("settings: {e}");
            Status::INVALID_PARAMETER
        })?;
        Ok(s)
    }
}

/// The load options as ASCII text in `out` (its length), when they are a UCS-2 string of printable ASCII
/// (up to a NUL or their end) that fits in `out`. Anything else (binary optional data of a boot entry,
/// which OVMF's auto-created entries carry) is not meant for this program: `None`.
fn ucs2_text(options: &[u8], out: &mut [u8]) -> Option<usize> {
    if !options.len().is_multiple_of(2) {
        return None;
    }
    let mut n = 0;
    for pair in options.chunks_exact(2) {
        let c = u16::from_le_bytes([*pair.first()?, *pair.get(1)?]);
        if c == 0 {
            break;
        }
        let b = u8::try_from(c).ok()?;
        if !(b == b'\t' || b == b'\n' || b == b'\r' || (b' '..=b'~').contains(&b)) {
            return None;
        }
        *out.get_mut(n)? = b;
        n += 1;
    }
    Some(n)
}

/// `qcow2-boot.cfg` in the directory of this program's file path, as a NUL-terminated UCS-2 path in `buf`.
fn config_path<'a>(image: &LoadedImage, buf: &'a mut [u16; MAX_PATH]) -> Option<&'a CStr16> {
    let mut n = 0;
    for node in image.file_path()?.node_iter() {
        if node.full_type() != (DeviceType::MEDIA, DeviceSubType::MEDIA_FILE_PATH) {
            continue;
        }
        let mut first = true;
        for pair in node.data().chunks_exact(2) {
            let c = u16::from_le_bytes([*pair.first()?, *pair.get(1)?]);
            if c == 0 {
                break;
            }
            // Path nodes one after the other are joined with a backslash.
            if first && n > 0 && c != u16::from(b'\\') && buf.get(n - 1) != Some(&u16::from(b'\\'))
            {
                *buf.get_mut(n)? = u16::from(b'\\');
                n += 1;
            }
            first = false;
            *buf.get_mut(n)? = c;
            n += 1;
        }
    }
    let dir = buf
        .get(..n)?
        .iter()
        .rposition(|&c| c == u16::from(b'\\'))
        .map_or(0, |i| i + 1);
    let mut n = dir;
    if n == 0 {
        *buf.get_mut(0)? = u16::from(b'\\');
        n = 1;
    }
    for c in CONFIG_NAME.bytes() {
        *buf.get_mut(n)? = u16::from(c);
        n += 1;
    }
    *buf.get_mut(n)? = 0;
    CStr16::from_u16_with_nul(buf.get(..=n)?).ok()
}

/// Reads the file `name` (at most `buf.len()` bytes) from the file system on `device`.
fn read_small_file(device: Handle, name: &CStr16, buf: &mut [u8]) -> Result<usize, Status> {
    let mut fs =
        boot::open_protocol_exclusive::<SimpleFileSystem>(device).map_err(|e| e.status())?;
    let mut root = fs.open_volume().map_err(|e| e.status())?;
    let file = root
        .open(name, FileMode::Read, FileAttribute::empty())
        .map_err(|e| e.status())?;
    let Some(mut file) = file.into_regular_file() else {
        return Err(Status::NOT_FOUND);
    };
    let mut done = 0;
    loop {
        let rest = buf.get_mut(done..).unwrap_or(&mut []);
        if rest.is_empty() {
            let mut more = [0u8; 1];
            if file.read(&mut more).map_err(|e| e.status())? != 0 {
                say!("{name} is longer than {} bytes", buf.len());
                return Err(Status::BAD_BUFFER_SIZE);
            }
            return Ok(done);
        }
        match file.read(rest).map_err(|e| e.status())? {
            0 => return Ok(done),
            n => done += n,
        }
    }
}

/// A firmware Block I/O device (a whole disk) as a qcow2-core block device.
struct FwDisk {
    io: ScopedProtocol<BlockIO>,
    media_id: u32,
    block_size: usize,
    blocks: u64,
    /// Only the top image's disk, and only in read-write mode: backing disks refuse writes here too.
    writable: bool,
}

impl FwDisk {
    fn open(handle: Handle, writable: bool) -> uefi::Result<Self> {
        let io = boot::open_protocol_exclusive::<BlockIO>(handle)?;
        let m = io.media();
        let (media_id, block_size, blocks) = (
            m.media_id(),
            m.block_size() as usize,
            m.last_block().saturating_add(1),
        );
        if writable && m.is_read_only() {
            say!("the disk that holds the top image is read-only");
            return Err(Status::WRITE_PROTECTED.into());
        }
        Ok(FwDisk {
            io,
            media_id,
            block_size,
            blocks,
            writable,
        })
    }
}

impl BlockDevice for FwDisk {
    type Error = Status;
    fn block_size(&self) -> usize {
        self.block_size
    }
    fn size(&mut self) -> Result<u64, Status> {
        Ok(self.blocks.saturating_mul(self.block_size as u64))
    }
    fn read_blocks(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), Status> {
        self.io
            .read_blocks(self.media_id, lba, buf)
            .map_err(|e| e.status())
    }
}

impl BlockDeviceWrite for FwDisk {
    /// A firmware disk cannot grow: clusters allocated past its end fail (with the firmware's
    /// INVALID_PARAMETER), so the disk that holds the top image needs room after the image's data. Without
    /// it the virtual disk's WriteBlocks returns DEVICE_ERROR and the image stays consistent (qcow2-core
    /// gives the cluster it allocated for the failed write back).
    fn write_blocks(&mut self, lba: u64, buf: &[u8]) -> Result<(), Status> {
        if !self.writable {
            return Err(Status::WRITE_PROTECTED);
        }
        self.io
            .write_blocks(self.media_id, lba, buf)
            .map_err(|e| e.status())
    }
    fn flush(&mut self) -> Result<(), Status> {
        if !self.writable {
            return Ok(());
        }
        self.io.flush_blocks().map_err(|e| e.status())
    }
}

/// Backing files: the other qcow2 disks, in order; and the passphrase of every encrypted one.
struct OtherDisks<'a> {
    handles: [Option<Handle>; MAX_DISKS],
    passphrase: Option<&'a [u8]>,
}

impl Resolver<FwDisk> for OtherDisks<'_> {
    fn backing_file(&mut self, _request: FileRequest<'_>) -> Result<FwDisk, Error<Status>> {
        let next = self
            .handles
            .iter_mut()
            .find_map(|h| h.take())
            .ok_or(Error::Unavailable {
                what: "no qcow2 disk left for the backing file",
            })?;
        FwDisk::open(next, false).map_err(|e| Error::Io(e.status()))
    }
    fn data_file(&mut self, _request: FileRequest<'_>) -> Result<FwDisk, Error<Status>> {
        Err(Error::Unavailable {
            what: "external data files are not supported",
        })
    }
    fn passphrase(&mut self, _depth: usize) -> Option<&[u8]> {
        self.passphrase
    }
}

/// The current task priority level.
fn current_tpl() -> Tpl {
    // SAFETY: raising to TPL_HIGH_LEVEL is valid from any level, and the guard, dropped at once, restores
    // the level it found.
    unsafe { boot::raise_tpl(Tpl::HIGH_LEVEL) }.old_tpl()
}

/// Runs `f` with the image (`None` once closed) and the media, at TPL_CALLBACK or above (the firmware's
/// level for block I/O, so that no event at TPL_CALLBACK interrupts a request), never nested: a call made
/// while another is in progress gets DEVICE_ERROR.
fn with_disk(f: impl FnOnce(&mut Option<Disk>, &mut BlockIoMedia) -> Status) -> Status {
    let _tpl = if current_tpl() <= Tpl::CALLBACK {
        // SAFETY: raising from TPL_CALLBACK or below to TPL_CALLBACK; the guard restores the level.
        Some(unsafe { boot::raise_tpl(Tpl::CALLBACK) })
    } else {
        None
    };
    if BUSY.swap(true, Ordering::Acquire) {
        return Status::DEVICE_ERROR;
    }
    // SAFETY: `BUSY` makes this the only user of the statics until it is cleared below; `main` sets them
    // up before the protocol is installed, and the hooks and the teardown go through this function too.
    let status = unsafe { f(&mut *addr_of_mut!(DISK), &mut *addr_of_mut!(MEDIA)) };
    BUSY.store(false, Ordering::Release);
    status
}

/// The byte offset of a request of `size` bytes at `lba` checked against the media, as the UEFI spec's
/// ReadBlocks and WriteBlocks check it: `Ok(None)` for an empty request (nothing to do).
fn request(
    media: &BlockIoMedia,
    lba: u64,
    size: usize,
    buffer_null: bool,
) -> Result<Option<u64>, Status> {
    if size == 0 {
        return Ok(None);
    }
    if !size.is_multiple_of(SECTOR) {
        return Err(Status::BAD_BUFFER_SIZE);
    }
    let blocks = (size / SECTOR) as u64;
    if buffer_null
        || lba > media.last_block
        || blocks.saturating_sub(1) > media.last_block.saturating_sub(lba)
    {
        return Err(Status::INVALID_PARAMETER);
    }
    lba.checked_mul(SECTOR as u64)
        .map(Some)
        .ok_or(Status::INVALID_PARAMETER)
}

unsafe extern "efiapi" fn vd_reset(_this: *mut BlockIoProtocol, _ext: Boolean) -> Status {
    Status::SUCCESS
}

unsafe extern "efiapi" fn vd_read(
    _this: *const BlockIoProtocol,
    media_id: u32,
    lba: u64,
    size: usize,
    buffer: *mut c_void,
) -> Status {
    with_disk(|disk, media| {
        let Some(disk) = disk.as_mut() else {
            return Status::NO_MEDIA;
        };
        if media_id != media.media_id {
            return Status::MEDIA_CHANGED;
        }
        let offset = match request(media, lba, size, buffer.is_null()) {
            Ok(Some(offset)) => offset,
            Ok(None) => return Status::SUCCESS,
            Err(s) => return s,
        };
        // SAFETY: the caller gives a buffer of `size` bytes.
        let out = unsafe { core::slice::from_raw_parts_mut(buffer.cast::<u8>(), size) };
        match disk.read_at(offset, out) {
            Ok(()) => Status::SUCCESS,
            Err(e) => {
                say!("reading {size} bytes at block {lba}: {e:?}");
                Status::DEVICE_ERROR
            }
        }
    })
}

unsafe extern "efiapi" fn vd_write(
    _this: *mut BlockIoProtocol,
    media_id: u32,
    lba: u64,
    size: usize,
    buffer: *const c_void,
) -> Status {
    with_disk(|disk, media| {
        let Some(disk) = disk.as_mut() else {
            return Status::NO_MEDIA;
        };
        if media_id != media.media_id {
            return Status::MEDIA_CHANGED;
        }
        if media.read_only.into() {
            return Status::WRITE_PROTECTED;
        }
        let offset = match request(media, lba, size, buffer.is_null()) {
            Ok(Some(offset)) => offset,
            Ok(None) => return Status::SUCCESS,
            Err(s) => return s,
        };
        // SAFETY: the caller gives a buffer of `size` bytes.
        let data = unsafe { core::slice::from_raw_parts(buffer.cast::<u8>(), size) };
        // Write-through: the engine's metadata and the firmware disk are flushed before this returns.
        match disk.write_at(offset, data).and_then(|()| disk.flush()) {
            Ok(()) => Status::SUCCESS,
            Err(e) => {
                say!("writing {size} bytes at block {lba}: {e:?}");
                Status::DEVICE_ERROR
            }
        }
    })
}

unsafe extern "efiapi" fn vd_flush(_this: *mut BlockIoProtocol) -> Status {
    with_disk(|disk, media| {
        let Some(disk) = disk.as_mut() else {
            return Status::NO_MEDIA;
        };
        if media.read_only.into() {
            return Status::SUCCESS;
        }
        match disk.flush() {
            Ok(()) => Status::SUCCESS,
            Err(e) => {
                say!("flush: {e:?}");
                Status::DEVICE_ERROR
            }
        }
    })
}

/// Flushes and closes the image (clearing a lazy-refcounts image's dirty bit); the virtual disk then has
/// no media. `why` names the occasion in the message.
fn close_image(why: &str) {
    let _ = with_disk(|disk, media| {
        let Some(image) = disk.take() else {
            return Status::SUCCESS;
        };
        media.media_present = Boolean::FALSE;
        let writable = image.is_writable();
        match image.close() {
            Ok(_dev) if writable => say!("{why}: the image is flushed and closed"),
            Ok(_dev) => {}
            Err(e) => say!("{why}: closing the image failed: {e:?}"),
        }
        Status::SUCCESS
    });
}

/// The payload resets the machine (before ExitBootServices: after it, firmware calls no notifications).
unsafe extern "efiapi" fn on_reset(
    _rt: ResetType,
    _status: Status,
    _size: usize,
    _data: *const u8,
) {
    close_image("ResetSystem");
}

/// The firmware's ExitBootServices, while [`exit_boot_services_hook`] stands in for it.
static mut FIRMWARE_EXIT_BOOT_SERVICES: Option<ExitBootServicesFn> = None;

type ExitBootServicesFn =
    unsafe extern "efiapi" fn(image: uefi_raw::Handle, map_key: usize) -> Status;

/// The payload exits boot services (an OS loader handing over): the image is closed while every boot
/// service and driver still works, then the firmware's ExitBootServices runs. Closing may change the
/// memory map, in which case that call fails with INVALID_PARAMETER and the loader, as it must, gets the
/// map again and calls again (the image is closed by then).
unsafe extern "efiapi" fn exit_boot_services_hook(
    image: uefi_raw::Handle,
    map_key: usize,
) -> Status {
    close_image("ExitBootServices");
    // SAFETY: set before the hook is installed, never changed after.
    match unsafe { *addr_of!(FIRMWARE_EXIT_BOOT_SERVICES) } {
        // SAFETY: the firmware's own function, with the caller's arguments.
        Some(f) => unsafe { f(image, map_key) },
        None => Status::UNSUPPORTED,
    }
}

/// Swaps the boot services table's ExitBootServices for `new` if it is `expected`, and recomputes the
/// table's CRC. Whether it swapped.
///
/// Why not an event: the `EFI_EVENT_GROUP_BEFORE_EXIT_BOOT_SERVICES` group would be the clean way, but not
/// all firmware signals it (the OVMF of Debian 12, edk2 2022.11, does not: the test showed it), and
/// `EVT_SIGNAL_EXIT_BOOT_SERVICES` handlers run after the memory map is final, may not use memory services,
/// and may run after the disk driver's own handler has stopped the disk. So, as boot loaders commonly do,
/// the table entry is wrapped while the payload runs.
fn swap_exit_boot_services(expected: ExitBootServicesFn, new: ExitBootServicesFn) -> bool {
    let Some(st) = uefi::table::system_table_raw() else {
        return false;
    };
    // SAFETY: the system table the firmware gave this program; boot services are running, and nothing
    // else runs while the TPL is raised to HIGH_LEVEL.
    unsafe {
        let bt = (*st.as_ptr()).boot_services;
        if bt.is_null() || !core::ptr::fn_addr_eq((*bt).exit_boot_services, expected) {
            return false;
        }
        let _tpl = boot::raise_tpl(Tpl::HIGH_LEVEL);
        (*bt).exit_boot_services = new;
        (*bt).header.crc = 0;
        let mut crc = 0u32;
        let size = (*bt).header.size as usize;
        if ((*bt).calculate_crc32)(bt.cast::<c_void>(), size, &mut crc).is_success() {
            (*bt).header.crc = crc;
        }
    }
    true
}

/// What is installed to close the image when the payload leaves without returning.
struct Hooks {
    exit_boot_services: bool,
    reset: bool,
}

impl Hooks {
    fn install() -> Hooks {
        let firmware = uefi::table::system_table_raw().and_then(|st| {
            // SAFETY: the firmware's system table; boot services are running.
            let bt = unsafe { (*st.as_ptr()).boot_services };
            // SAFETY: as above.
            (!bt.is_null()).then(|| unsafe { (*bt).exit_boot_services })
        });
        let exit_boot_services = firmware.is_some_and(|f| {
            // SAFETY: single-threaded; read by the hook only once it is installed.
            unsafe { *addr_of_mut!(FIRMWARE_EXIT_BOOT_SERVICES) = Some(f) };
            swap_exit_boot_services(f, exit_boot_services_hook)
        });
        if !exit_boot_services {
            say!("cannot hook ExitBootServices");
        }
        let reset = boot::get_handle_for_protocol::<ResetNotification>()
            .and_then(boot::open_protocol_exclusive::<ResetNotification>)
            .and_then(|mut rn| rn.register_reset_notify(on_reset));
        if let Err(e) = &reset {
            say!("no reset notification ({:?})", e.status());
        }
        Hooks {
            exit_boot_services,
            reset: reset.is_ok(),
        }
    }

    /// Removes the hooks; `Err` if ExitBootServices was wrapped again by someone else since (this program
    /// must then not end: that wrapper would call into freed memory).
    fn remove(self) -> Result<(), Status> {
        if self.reset {
            let _ = boot::get_handle_for_protocol::<ResetNotification>()
                .and_then(boot::open_protocol_exclusive::<ResetNotification>)
                .and_then(|mut rn| rn.unregister_reset_notify(on_reset));
        }
        if self.exit_boot_services {
            // SAFETY: set by `install`.
            let Some(firmware) = (unsafe { *addr_of!(FIRMWARE_EXIT_BOOT_SERVICES) }) else {
                return Err(Status::ABORTED);
            };
            if !swap_exit_boot_services(exit_boot_services_hook, firmware) {
                return Err(Status::ACCESS_DENIED);
            }
        }
        Ok(())
    }
}

/// Whether the whole disk `handle` holds a qcow2 image: `Some(has a backing file)`.
fn probe_qcow2(handle: Handle) -> Option<bool> {
    // SAFETY: a non-exclusive look, closed before the function returns.
    let mut io = unsafe {
        boot::open_protocol::<BlockIO>(
            OpenProtocolParams {
                handle,
                agent: boot::image_handle(),
                controller: None,
            },
            OpenProtocolAttributes::GetProtocol,
        )
    }
    .ok()?;
    let m = io.media();
    let (bs, media_id) = (m.block_size() as usize, m.media_id());
    if m.is_logical_partition() || !m.is_media_present() || !(SECTOR..=MAX_BLOCK).contains(&bs) {
        return None;
    }
    // SAFETY: only used here.
    let probe = unsafe { &mut *addr_of_mut!(PROBE) };
    let block = probe.get_mut(..bs)?;
    io.read_blocks(media_id, 0, block).ok()?;
    if block.get(..4)? != b"QFI\xfb" {
        return None;
    }
    Some(block.get(8..16)?.iter().any(|&b| b != 0))
}

fn is_ours(handle: Handle) -> bool {
    // SAFETY: a non-exclusive look at the device path, closed before the function returns.
    let Ok(dp) = (unsafe {
        boot::open_protocol::<DevicePath>(
            OpenProtocolParams {
                handle,
                agent: boot::image_handle(),
                controller: None,
            },
            OpenProtocolAttributes::GetProtocol,
        )
    }) else {
        return false;
    };
    dp.node_iter().next().is_some_and(|n| {
        n.full_type() == (DeviceType::HARDWARE, DeviceSubType::HARDWARE_VENDOR)
            && n.data().get(..16) == Some(&VENDOR.to_bytes()[..])
    })
}

/// The device path of the file system `fs` followed by a file path node for [`LOADER`], in
/// `LOADER_PATH`: the started program's loaded image then names its device (the partition, whose file
/// system it can use) and its file.
fn loader_path(fs: Handle) -> Option<&'static DevicePath> {
    // SAFETY: a non-exclusive look at the device path, closed before the function returns.
    let dp = unsafe {
        boot::open_protocol::<DevicePath>(
            OpenProtocolParams {
                handle: fs,
                agent: boot::image_handle(),
                controller: None,
            },
            OpenProtocolAttributes::GetProtocol,
        )
    }
    .ok()?;
    // SAFETY: only used here, before the program is loaded (LoadImage copies the path).
    let buf = unsafe { &mut *addr_of_mut!(LOADER_PATH) };
    let mut n = 0;
    for node in dp.node_iter() {
        let data = node.data();
        let [l0, l1] = u16::try_from(4 + data.len()).ok()?.to_le_bytes();
        let header = [node.device_type().0, node.sub_type().0, l0, l1];
        buf.get_mut(n..n + 4)?.copy_from_slice(&header);
        buf.get_mut(n + 4..n + 4 + data.len())?
            .copy_from_slice(data);
        n += 4 + data.len();
    }
    let name = LOADER.as_slice_with_nul();
    let len = u16::try_from(4 + 2 * name.len()).ok()?;
    let [l0, l1] = len.to_le_bytes();
    buf.get_mut(n..n + 4)?
        .copy_from_slice(&[0x04, 0x04, l0, l1]);
    n += 4;
    for c in name {
        buf.get_mut(n..n + 2)?
            .copy_from_slice(&u16::from(*c).to_le_bytes());
        n += 2;
    }
    buf.get_mut(n..n + 4)?.copy_from_slice(&[0x7f, 0xff, 4, 0]);
    n += 4;
    <&DevicePath>::try_from(buf.get(..n)?).ok()
}

/// Reads [`LOADER`] from the file system on `handle` into pool memory.
fn read_loader(handle: Handle) -> uefi::Result<&'static [u8]> {
    let mut fs = boot::open_protocol_exclusive::<SimpleFileSystem>(handle)?;
    let mut root = fs.open_volume()?;
    let file = root.open(LOADER, FileMode::Read, FileAttribute::empty())?;
    let Some(mut file) = file.into_regular_file() else {
        return Err(Status::NOT_FOUND.into());
    };
    file.set_position(RegularFile::END_OF_FILE)?;
    let len = usize::try_from(file.get_position()?).map_err(|_| Status::BAD_BUFFER_SIZE)?;
    file.set_position(0)?;
    let mem = boot::allocate_pool(MemoryType::LOADER_DATA, len.max(1))?;
    // SAFETY: `len` bytes just allocated, freed by the caller once the image is loaded.
    let buf = unsafe { core::slice::from_raw_parts_mut(mem.as_ptr(), len) };
    let mut done = 0;
    while done < len {
        let rest = buf.get_mut(done..).unwrap_or(&mut []);
        let n = file.read(rest).map_err(|e| e.status())?;
        if n == 0 {
            return Err(Status::END_OF_FILE.into());
        }
        done += n;
    }
    Ok(buf)
}

/// Why the chain did not open.
enum OpenFailure {
    /// An encrypted image needs a (another) passphrase.
    Passphrase(LuksError),
    /// Anything else (reported).
    Other(Status),
}

/// Opens the qcow2 chain: the top image on `top`, backing files from `others`, every encrypted image
/// unlocked with `passphrase`.
fn open_image(
    top: Handle,
    others: [Option<Handle>; MAX_DISKS],
    mode: Mode,
    passphrase: Option<&[u8]>,
) -> Result<Disk, OpenFailure> {
    // SAFETY: the statics are borrowed here and live in the image returned; `open_chain` calls this again
    // only after the image of the previous call failed to open or was dropped, which ended those borrows.
    let (bounce, metadata, window, input) = unsafe {
        (
            &mut *addr_of_mut!(BOUNCE) as &mut [u8],
            &mut *addr_of_mut!(METADATA) as &mut [u8],
            &mut *addr_of_mut!(WINDOW) as &mut [u8],
            &mut *addr_of_mut!(INPUT) as &mut [u8],
        )
    };
    let dev =
        FwDisk::open(top, mode == Mode::ReadWrite).map_err(|e| OpenFailure::Other(e.status()))?;
    let mut resolver = OtherDisks {
        handles: others,
        passphrase,
    };
    let buffers = Buffers { bounce, metadata };
    let inflate = Inflate::new(window, input);
    let opened = match mode {
        Mode::ReadOnly => Image::open(dev, buffers, inflate, &mut resolver),
        Mode::ReadWrite => Image::open_writable(dev, buffers, inflate, &mut resolver),
    };
    match opened {
        // A read-only open without a passphrase leaves encrypted images locked.
        Ok(image) if image.layers().iter().any(|l| l.locked()) => {
            drop(image);
            Err(OpenFailure::Passphrase(LuksError::Locked))
        }
        Ok(image) => Ok(image),
        Err(Error::Encryption(e @ (LuksError::Locked | LuksError::WrongPassphrase))) => {
            Err(OpenFailure::Passphrase(e))
        }
        Err(e) => {
            say!("cannot open the image: {e:?}");
            Err(OpenFailure::Other(Status::LOAD_ERROR))
        }
    }
}

/// Opens the chain ([`open_image`]) with the settings' passphrase, if any; when an encrypted image needs
/// one (none given, or a wrong one), asks for it at the console, up to [`PASSPHRASE_TRIES`] times.
fn open_chain(
    top: Handle,
    others: [Option<Handle>; MAX_DISKS],
    settings: &Settings,
) -> Result<Disk, Status> {
    let given = settings
        .passphrase
        .get(..settings.passphrase_len)
        .unwrap_or(&[]);
    let mut why = match open_image(
        top,
        others,
        settings.mode,
        (!given.is_empty()).then_some(given),
    ) {
        Ok(image) => return Ok(image),
        Err(OpenFailure::Other(s)) => return Err(s),
        Err(OpenFailure::Passphrase(e)) => e,
    };
    let mut typed = [0u8; MAX_PASSPHRASE];
    for _ in 0..PASSPHRASE_TRIES {
        match why {
            LuksError::WrongPassphrase => say!("the passphrase does not unlock the disk"),
            _ => say!("the disk is encrypted"),
        }
        let n = ask_passphrase(&mut typed).ok_or(Status::ABORTED)?;
        let attempt = open_image(top, others, settings.mode, typed.get(..n));
        typed.fill(0);
        match attempt {
            Ok(image) => {
                say!("the disk is unlocked");
                return Ok(image);
            }
            Err(OpenFailure::Other(s)) => return Err(s),
            Err(OpenFailure::Passphrase(e)) => why = e,
        }
    }
    say!("no passphrase unlocked the disk");
    Err(Status::ACCESS_DENIED)
}

/// Reads a passphrase typed at the console (not echoed) into `buf`, up to Enter; Backspace takes back a
/// character. `None`: the console cannot be read.
fn ask_passphrase(buf: &mut [u8; MAX_PASSPHRASE]) -> Option<usize> {
    say!("passphrase:");
    let mut n = 0usize;
    loop {
        let key = uefi::system::with_stdin(|input| {
            let event = input.wait_for_key_event().ok()?;
            boot::wait_for_event(&[event]).ok()?;
            input.read_key().ok()
        })?;
        let Some(Key::Printable(c)) = key else {
            continue;
        };
        match u16::from(c) {
            0x0d | 0x0a => return Some(n),
            0x08 => n = n.saturating_sub(1),
            c @ 0x20..=0x7e if n < MAX_PASSPHRASE => {
                if let Some(slot) = buf.get_mut(n) {
                    *slot = c as u8;
                    n += 1;
                }
            }
            _ => {}
        }
    }
}

/// Boots snapshot `name` read-only, or applies it (rollback), as the settings say.
fn use_snapshot(image: &mut Disk, settings: &Settings) -> Result<(), Status> {
    let name = settings.name();
    let shown = core::str::from_utf8(name).unwrap_or("?");
    let at = match image.find_snapshot(name, true, true) {
        Ok(Some(at)) => at,
        Ok(None) => {
            say!("the image has no snapshot {shown}");
            return Err(Status::NOT_FOUND);
        }
        Err(e) => {
            say!("reading the snapshot table: {e:?}");
            return Err(Status::LOAD_ERROR);
        }
    };
    match settings.snapshot {
        SnapshotUse::Boot => {
            let (entry, _) = image.read_snapshot(0, at).map_err(|_| Status::LOAD_ERROR)?;
            image.view_snapshot(&entry).map_err(|e| {
                say!("snapshot {shown}: {e:?}");
                Status::LOAD_ERROR
            })?;
            say!("booting snapshot {shown} (read-only)");
        }
        SnapshotUse::Rollback => {
            say!("rolling back to snapshot {shown}");
            image
                .apply_snapshot(at)
                .and_then(|()| image.flush())
                .map_err(|e| {
                    say!("rolling back to snapshot {shown}: {e:?}");
                    Status::LOAD_ERROR
                })?;
            say!("rolled back to snapshot {shown}");
        }
        SnapshotUse::None => {}
    }
    Ok(())
}

/// Installs the virtual disk's device path and Block I/O on a new handle.
fn install(image: Disk, mode: Mode) -> Result<Handle, Status> {
    let size = image.virtual_size();
    if size < SECTOR as u64 {
        say!("the virtual disk is smaller than one block");
        return Err(Status::LOAD_ERROR);
    }
    // SAFETY: single-threaded set-up before the protocol is installed.
    unsafe {
        *addr_of_mut!(DISK) = Some(image);
        let media = &mut *addr_of_mut!(MEDIA);
        media.last_block = size / SECTOR as u64 - 1;
        media.read_only = Boolean::from(mode == Mode::ReadOnly);
        media.media_present = Boolean::TRUE;
        (*addr_of_mut!(BLOCK_IO)).media = addr_of!(MEDIA);
        let dp = &mut *addr_of_mut!(DEVICE_PATH);
        dp[..4].copy_from_slice(&[0x01, 0x04, 20, 0]);
        dp[4..20].copy_from_slice(&VENDOR.to_bytes());
        dp[20..24].copy_from_slice(&[0x7f, 0xff, 4, 0]);
        let h =
            boot::install_protocol_interface(None, &DevicePath::GUID, addr_of!(DEVICE_PATH).cast())
                .map_err(|e| e.status())?;
        boot::install_protocol_interface(Some(h), &BlockIO::GUID, addr_of!(BLOCK_IO).cast())
            .map_err(|e| {
                let _ = boot::uninstall_protocol_interface(
                    h,
                    &DevicePath::GUID,
                    addr_of!(DEVICE_PATH).cast(),
                );
                e.status()
            })
    }
}

/// Removes the virtual disk: its drivers are stopped first (the FAT driver writes back what it caches),
/// then the protocols are uninstalled. The protocols point into this program, which the firmware frees
/// when it returns: if they cannot be removed, returning is not safe.
fn uninstall(handle: Handle) -> Result<(), Status> {
    let _ = boot::disconnect_controller(handle, None, None);
    // SAFETY: the interfaces installed by `install`, on that handle.
    unsafe {
        boot::uninstall_protocol_interface(handle, &BlockIO::GUID, addr_of!(BLOCK_IO).cast())
            .map_err(|e| e.status())?;
        boot::uninstall_protocol_interface(handle, &DevicePath::GUID, addr_of!(DEVICE_PATH).cast())
            .map_err(|e| e.status())
    }
}

/// Connects the firmware's drivers to the virtual disk and starts the program on it.
fn boot_payload(handle: Handle) -> Result<(), Status> {
    if let Err(e) = boot::connect_controller(handle, &[], None, true) {
        say!("connecting the virtual disk's drivers: {:?}", e.status());
    }
    say!("Block I/O installed and connected");
    let fss = boot::locate_handle_buffer(SearchType::ByProtocol(&SimpleFileSystem::GUID))
        .map_err(|e| e.status())?;
    let Some(fs) = fss.iter().copied().find(|&h| is_ours(h)) else {
        say!("no file system on the virtual disk ({} in all)", fss.len());
        return Err(Status::NOT_FOUND);
    };
    drop(fss);
    let program = read_loader(fs).map_err(|e| e.status())?;
    say!(
        "starting \\EFI\\BOOT\\BOOTX64.EFI ({} bytes) from the qcow2 disk",
        program.len()
    );
    let loaded = boot::load_image(
        boot::image_handle(),
        LoadImageSource::FromBuffer {
            buffer: program,
            file_path: loader_path(fs),
        },
    );
    // SAFETY: allocated by `read_loader`; LoadImage has copied it.
    let _ = unsafe { boot::free_pool(NonNull::from(program).cast()) };
    let child = loaded.map_err(|e| e.status())?;
    let started = boot::start_image(child).map_err(|e| e.status());
    say!(
        "the program returned ({:?})",
        started.err().unwrap_or(Status::SUCCESS)
    );
    started
}

fn run() -> Result<(), Status> {
    // 1. The settings.
    let settings = Settings::read()?;
    let mode = settings.mode;
    say!(
        "{}",
        match mode {
            Mode::ReadOnly => "read-only",
            Mode::ReadWrite => "read-write",
        }
    );

    // 2. The qcow2 disks.
    let handles = boot::locate_handle_buffer(SearchType::ByProtocol(&BlockIO::GUID))
        .map_err(|e| e.status())?;
    let mut disks: [Option<Handle>; MAX_DISKS] = [None; MAX_DISKS];
    let mut top = None;
    let mut n = 0;
    for &h in handles.iter() {
        if let Some(has_backing) = probe_qcow2(h) {
            if has_backing && top.is_none() {
                top = Some(h);
            } else if let Some(slot) = disks.get_mut(n) {
                *slot = Some(h);
                n += 1;
            }
        }
    }
    drop(handles);
    let top = match top {
        Some(t) => t,
        None => disks[0].take().ok_or(Status::NOT_FOUND)?,
    };
    say!("found a qcow2 disk; opening it");

    // 3. The image (and the snapshot the settings name).
    let mut image = open_chain(top, disks, &settings)?;
    if settings.snapshot != SnapshotUse::None
        && let Err(e) = use_snapshot(&mut image, &settings)
    {
        let _ = image.close();
        return Err(e);
    }
    say!(
        "virtual disk of {} bytes, {} image(s) in the chain",
        image.virtual_size(),
        image.layers().len()
    );

    // 4. The Block I/O protocol and its device path, and the hooks that close the image.
    let handle = match install(image, mode) {
        Ok(h) => h,
        Err(e) => {
            close_image("installing the Block I/O protocol failed");
            return Err(e);
        }
    };
    let hooks = (mode == Mode::ReadWrite).then(Hooks::install);

    // 5. The program.
    let result = boot_payload(handle);

    // 6. It returned (or never started): the virtual disk goes away, the image is closed.
    let unhooked = hooks.map_or(Ok(()), Hooks::remove);
    let removed = uninstall(handle);
    close_image("the program returned");
    if let Err(e) = unhooked.and(removed) {
        // The firmware would call into this program's freed memory: reset instead of returning.
        say!("the virtual disk or its hooks could not be removed ({e:?}); resetting");
        uefi::runtime::reset(uefi::runtime::ResetType::COLD, Status::ABORTED, None);
    }
    say!("the virtual disk is removed");
    result
}

#[entry]
fn main() -> Status {
    if uefi::helpers::init().is_err() {
        return Status::ABORTED;
    }
    match run() {
        Ok(()) => Status::SUCCESS,
        Err(s) => {
            say!("failed: {s:?}");
            s
        }
    }
}
