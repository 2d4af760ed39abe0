//! Boots the EFI program inside a qcow2 disk image, with qcow2-core as the only code that reads qcow2.
//!
//! 1. Finds the disks (firmware Block I/O, whole disks) whose content is a qcow2 image. The top image is
//!    one with a backing file (or the only qcow2 disk); backing files are the other qcow2 disks, handed out
//!    in the firmware's handle order (firmware has no file names: the resolver ignores the stored name).
//! 2. Opens the top image read-only with `Image::open` over the firmware's Block I/O, with `Inflate` for
//!    deflate-compressed clusters.
//! 3. Installs a Block I/O protocol (read-only, 512-byte blocks) for the virtual disk on a new handle with
//!    a vendor-defined hardware device path, and connects controllers recursively, so that the firmware's
//!    own partition and FAT drivers bind to it.
//! 4. Loads `\EFI\BOOT\BOOTX64.EFI` from a file system on that disk and starts it.

#![no_std]
#![no_main]

use core::ffi::c_void;
use core::ptr::{addr_of, addr_of_mut};

use qcow2_core::{BlockDevice, Buffers, Error, FileRequest, Image, Inflate, Resolver};
use uefi::boot::{self, LoadImageSource, MemoryType, OpenProtocolAttributes, OpenProtocolParams};
use uefi::boot::{ScopedProtocol, SearchType};
use uefi::prelude::*;
use uefi::proto::device_path::{DevicePath, DeviceSubType, DeviceType};
use uefi::proto::media::block::BlockIO;
use uefi::proto::media::file::{File, FileAttribute, FileMode, RegularFile};
use uefi::proto::media::fs::SimpleFileSystem;
use uefi::{Guid, Identify, guid};
use uefi_raw::Boolean;
use uefi_raw::protocol::block::{BlockIoMedia, BlockIoProtocol};

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

type Disk = Image<FwDisk, &'static mut [u8], Inflate<&'static mut [u8]>, DEPTH, SLICES>;

static mut BOUNCE: [u8; MAX_BLOCK] = [0; MAX_BLOCK];
static mut METADATA: [u8; SLICES * 4096] = [0; SLICES * 4096];
/// One whole 64 KiB cluster: the last compressed cluster is kept inflated.
static mut WINDOW: [u8; 64 * 1024] = [0; 64 * 1024];
static mut INPUT: [u8; 4096] = [0; 4096];
static mut PROBE: [u8; MAX_BLOCK] = [0; MAX_BLOCK];
/// The open image, used by the Block I/O callbacks.
static mut DISK: Option<Disk> = None;
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

/// A firmware Block I/O device (a whole disk) as a qcow2-core block device.
struct FwDisk {
    io: ScopedProtocol<BlockIO>,
    media_id: u32,
    block_size: usize,
    blocks: u64,
}

impl FwDisk {
    fn open(handle: Handle) -> uefi::Result<Self> {
        let io = boot::open_protocol_exclusive::<BlockIO>(handle)?;
        let m = io.media();
        let (media_id, block_size, blocks) = (
            m.media_id(),
            m.block_size() as usize,
            m.last_block().saturating_add(1),
        );
        Ok(FwDisk {
            io,
            media_id,
            block_size,
            blocks,
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

/// Backing files: the other qcow2 disks, in order.
struct OtherDisks {
    handles: [Option<Handle>; MAX_DISKS],
}

impl Resolver<FwDisk> for OtherDisks {
    fn backing_file(&mut self, _request: FileRequest<'_>) -> Result<FwDisk, Error<Status>> {
        let next = self
            .handles
            .iter_mut()
            .find_map(|h| h.take())
            .ok_or(Error::Unavailable {
                what: "no qcow2 disk left for the backing file",
            })?;
        FwDisk::open(next).map_err(|e| Error::Io(e.status()))
    }
    fn data_file(&mut self, _request: FileRequest<'_>) -> Result<FwDisk, Error<Status>> {
        Err(Error::Unavailable {
            what: "external data files are not supported",
        })
    }
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
    // SAFETY: firmware calls are not reentrant at this TPL; the statics are only used here and in `main`
    // before the protocol is installed.
    let (disk, media) = unsafe { (&mut *addr_of_mut!(DISK), &*addr_of!(MEDIA)) };
    let Some(disk) = disk.as_mut() else {
        return Status::NO_MEDIA;
    };
    if media_id != media.media_id {
        return Status::MEDIA_CHANGED;
    }
    if !size.is_multiple_of(SECTOR) {
        return Status::BAD_BUFFER_SIZE;
    }
    if size == 0 {
        return Status::SUCCESS;
    }
    if buffer.is_null() {
        return Status::INVALID_PARAMETER;
    }
    let Some(offset) = lba.checked_mul(SECTOR as u64) else {
        return Status::INVALID_PARAMETER;
    };
    if offset.saturating_add(size as u64) > disk.virtual_size() {
        return Status::INVALID_PARAMETER;
    }
    // SAFETY: the caller gives a buffer of `size` bytes.
    let out = unsafe { core::slice::from_raw_parts_mut(buffer.cast::<u8>(), size) };
    match disk.read_at(offset, out) {
        Ok(()) => Status::SUCCESS,
        Err(_) => Status::DEVICE_ERROR,
    }
}

unsafe extern "efiapi" fn vd_write(
    _this: *mut BlockIoProtocol,
    _media_id: u32,
    _lba: u64,
    _size: usize,
    _buffer: *const c_void,
) -> Status {
    Status::WRITE_PROTECTED
}

unsafe extern "efiapi" fn vd_flush(_this: *mut BlockIoProtocol) -> Status {
    Status::SUCCESS
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
    let block = &mut probe[..bs];
    io.read_blocks(media_id, 0, block).ok()?;
    if block[..4] != *b"QFI\xfb" {
        return None;
    }
    Some(block[8..16].iter().any(|&b| b != 0))
}

fn say(msg: &str) {
    uefi::println!("qcow2-boot: {msg}");
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

/// Reads `\EFI\BOOT\BOOTX64.EFI` from the file system on `handle` into pool memory.
fn read_loader(handle: Handle) -> uefi::Result<&'static [u8]> {
    let mut fs = boot::open_protocol_exclusive::<SimpleFileSystem>(handle)?;
    let mut root = fs.open_volume()?;
    let file = root.open(
        cstr16!("\\EFI\\BOOT\\BOOTX64.EFI"),
        FileMode::Read,
        FileAttribute::empty(),
    )?;
    let Some(mut file) = file.into_regular_file() else {
        return Err(Status::NOT_FOUND.into());
    };
    file.set_position(RegularFile::END_OF_FILE)?;
    let len = usize::try_from(file.get_position()?).map_err(|_| Status::BAD_BUFFER_SIZE)?;
    file.set_position(0)?;
    let mem = boot::allocate_pool(MemoryType::LOADER_DATA, len.max(1))?;
    // SAFETY: `len` bytes just allocated, never freed (the program starts the image and ends).
    let buf = unsafe { core::slice::from_raw_parts_mut(mem.as_ptr(), len) };
    let mut done = 0;
    while done < len {
        let n = file.read(&mut buf[done..]).map_err(|e| e.status())?;
        if n == 0 {
            return Err(Status::END_OF_FILE.into());
        }
        done += n;
    }
    Ok(buf)
}

fn run() -> Result<(), Status> {
    // 1. The qcow2 disks.
    let handles = boot::locate_handle_buffer(SearchType::ByProtocol(&BlockIO::GUID))
        .map_err(|e| e.status())?;
    let mut disks: [Option<Handle>; MAX_DISKS] = [None; MAX_DISKS];
    let mut top = None;
    let mut n = 0;
    for &h in handles.iter() {
        if let Some(has_backing) = probe_qcow2(h) {
            if has_backing && top.is_none() {
                top = Some(h);
            } else if n < MAX_DISKS {
                disks[n] = Some(h);
                n += 1;
            }
        }
    }
    drop(handles);
    let top = match top {
        Some(t) => t,
        None => disks[0].take().ok_or(Status::NOT_FOUND)?,
    };
    say("found a qcow2 disk; opening it");

    // 2. The image.
    // SAFETY: the statics are borrowed once, here, and the image lives in `DISK` from now on.
    let (bounce, metadata, window, input) = unsafe {
        (
            &mut *addr_of_mut!(BOUNCE) as &mut [u8],
            &mut *addr_of_mut!(METADATA) as &mut [u8],
            &mut *addr_of_mut!(WINDOW) as &mut [u8],
            &mut *addr_of_mut!(INPUT) as &mut [u8],
        )
    };
    let dev = FwDisk::open(top).map_err(|e| e.status())?;
    let mut resolver = OtherDisks { handles: disks };
    let image: Disk = match Image::open(
        dev,
        Buffers { bounce, metadata },
        Inflate::new(window, input),
        &mut resolver,
    ) {
        Ok(i) => i,
        Err(e) => {
            uefi::println!("qcow2-boot: cannot open the image: {e:?}");
            return Err(Status::LOAD_ERROR);
        }
    };
    let size = image.virtual_size();
    uefi::println!(
        "qcow2-boot: virtual disk of {size} bytes, {} image(s) in the chain",
        image.layers().len()
    );

    // 3. The Block I/O protocol and its device path.
    // SAFETY: single-threaded set-up before the protocol is installed.
    let handle = unsafe {
        *addr_of_mut!(DISK) = Some(image);
        (*addr_of_mut!(MEDIA)).last_block = (size / SECTOR as u64).saturating_sub(1);
        (*addr_of_mut!(BLOCK_IO)).media = addr_of!(MEDIA);
        let dp = &mut *addr_of_mut!(DEVICE_PATH);
        dp[..4].copy_from_slice(&[0x01, 0x04, 20, 0]);
        dp[4..20].copy_from_slice(&VENDOR.to_bytes());
        dp[20..24].copy_from_slice(&[0x7f, 0xff, 4, 0]);
        let h =
            boot::install_protocol_interface(None, &DevicePath::GUID, addr_of!(DEVICE_PATH).cast())
                .map_err(|e| e.status())?;
        boot::install_protocol_interface(Some(h), &BlockIO::GUID, addr_of!(BLOCK_IO).cast())
            .map_err(|e| e.status())?
    };
    if let Err(e) = boot::connect_controller(handle, &[], None, true) {
        uefi::println!(
            "qcow2-boot: connecting the virtual disk's drivers: {:?}",
            e.status()
        );
    }
    say("Block I/O installed and connected");

    // 4. The file system on it, and the program.
    let fss = boot::locate_handle_buffer(SearchType::ByProtocol(&SimpleFileSystem::GUID))
        .map_err(|e| e.status())?;
    let Some(fs) = fss.iter().copied().find(|&h| is_ours(h)) else {
        uefi::println!(
            "qcow2-boot: no file system on the virtual disk ({} in all)",
            fss.len()
        );
        return Err(Status::NOT_FOUND);
    };
    drop(fss);
    let program = read_loader(fs).map_err(|e| e.status())?;
    uefi::println!(
        "qcow2-boot: starting \\EFI\\BOOT\\BOOTX64.EFI ({} bytes) from the qcow2 disk",
        program.len()
    );
    let child = boot::load_image(
        boot::image_handle(),
        LoadImageSource::FromBuffer {
            buffer: program,
            file_path: None,
        },
    )
    .map_err(|e| e.status())?;
    boot::start_image(child).map_err(|e| e.status())
}

#[entry]
fn main() -> Status {
    if uefi::helpers::init().is_err() {
        return Status::ABORTED;
    }
    match run() {
        Ok(()) => Status::SUCCESS,
        Err(s) => {
            uefi::println!("qcow2-boot: failed: {s:?}");
            s
        }
    }
}
