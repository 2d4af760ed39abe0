//! The EFI program inside the qcow2 disk: prints a known line on the console (which OVMF mirrors to the
//! serial port) and powers the machine off.
//!
//! When the disk it was loaded from is writable (qcow2-boot in read-write mode), it first writes
//! [`FILE_NAME`] ([`LINES`] lines of [`line`]) into that disk's FAT file system through the firmware's
//! Simple File System, flushes and closes it; then it writes the first [`RAW_LINES`] lines straight into
//! the last 8 blocks of its partition (outside the file system's data) through Block I/O, without
//! FlushBlocks: qcow2-boot's Block I/O reports no write caching, so that write must be durable when it
//! returns. `\payload.cfg` on the file system says what it does then (one word; `reset` when the file is
//! missing):
//! - `reset`: ResetSystem(shutdown), as on a read-only disk;
//! - `exit-boot-services`: ExitBootServices, then ResetSystem(shutdown) (an OS loader's way out);
//! - `return`: returns to qcow2-boot, which removes the virtual disk and closes the image;
//! - `hang`: waits forever (the test cuts the power: the written data must already be durable);
//! - `disk-full`: writes neither the file nor the 8 blocks (the disk that holds the image has no room
//!   left): one block is written where the image has no cluster yet, which must fail with DEVICE_ERROR
//!   and leave that block readable as before; then as `reset`.
//!
//! On any disk, before its line, it calls ReadBlocks and WriteBlocks of the whole virtual disk (the Block
//! I/O that qcow2-boot installs, under the partition's) with requests the UEFI spec says must be refused
//! (see [`refusals`]) and prints each status; on a read-only disk WriteBlocks must say WRITE_PROTECTED.

#![no_std]
#![no_main]

use core::fmt::Write as _;

use uefi::Identify;
use uefi::boot::{self, OpenProtocolAttributes, OpenProtocolParams, ScopedProtocol, SearchType};
use uefi::prelude::*;
use uefi::proto::ProtocolPointer;
use uefi::proto::device_path::DevicePath;
use uefi::proto::loaded_image::LoadedImage;
use uefi::proto::media::block::BlockIO;
use uefi::proto::media::file::{File, FileAttribute, FileMode};
use uefi::runtime::ResetType;

/// What the test waits for on the serial output.
const LINE: &str = "qcow2-payload: booted from inside the qcow2 image";
/// The file written on a writable disk.
const FILE_NAME: &uefi::CStr16 = cstr16!("\\qcow2-rw.txt");
/// Lines in it.
const LINES: u32 = 5000;
/// Bytes per line.
const LINE_LEN: usize = 64;
/// Lines written through Block I/O: 4 KiB, 8 blocks.
const RAW_LINES: usize = 64;

macro_rules! say {
    ($($arg:tt)*) => {
        uefi::system::with_stdout(|out| {
            let _ = writeln!(out, "qcow2-payload: {}", format_args!($($arg)*));
        })
    };
}

/// What `\payload.cfg` asks for (see the module documentation).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Leave {
    Reset,
    ExitBootServices,
    Return,
    Hang,
    DiskFull,
}

/// Line `i` of the file: `qcow2-payload wrote line NNNNNN of a file on the qcow2 overlay.\n` (64 bytes;
/// the test makes the same with `seq -f`).
fn line(i: u32, out: &mut [u8; LINE_LEN]) {
    const HEAD: &[u8; 25] = b"qcow2-payload wrote line ";
    const TAIL: &[u8; 33] = b" of a file on the qcow2 overlay.\n";
    let (head, rest) = out.split_at_mut(HEAD.len());
    head.copy_from_slice(HEAD);
    let (digits, tail) = rest.split_at_mut(6);
    let mut v = i;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
    tail.copy_from_slice(TAIL);
}

/// Whether the Block I/O under the file system this program was loaded from accepts writes.
fn device_writable() -> bool {
    let Ok(image) = boot::open_protocol_exclusive::<LoadedImage>(boot::image_handle()) else {
        return false;
    };
    let Some(device) = image.device() else {
        return false;
    };
    get::<BlockIO>(device).is_ok_and(|io| !io.media().is_read_only())
}

/// `\payload.cfg` on the file system this program was loaded from: what to do.
fn how_to_leave() -> Result<Leave, Status> {
    let mut fs = boot::get_image_file_system(boot::image_handle()).map_err(|e| e.status())?;
    let mut root = fs.open_volume().map_err(|e| e.status())?;
    let Ok(file) = root.open(
        cstr16!("\\payload.cfg"),
        FileMode::Read,
        FileAttribute::empty(),
    ) else {
        return Ok(Leave::Reset);
    };
    let mut file = file.into_regular_file().ok_or(Status::NOT_FOUND)?;
    let mut buf = [0u8; 64];
    let n = file.read(&mut buf).map_err(|e| e.status())?;
    match buf.get(..n).unwrap_or(&[]).trim_ascii() {
        b"reset" => Ok(Leave::Reset),
        b"exit-boot-services" => Ok(Leave::ExitBootServices),
        b"return" => Ok(Leave::Return),
        b"hang" => Ok(Leave::Hang),
        b"disk-full" => Ok(Leave::DiskFull),
        _ => {
            say!("\\payload.cfg: unknown word");
            Err(Status::INVALID_PARAMETER)
        }
    }
}

/// Writes the file (replacing one that exists), flushes and closes it.
fn write_file() -> Result<(), Status> {
    let mut fs = boot::get_image_file_system(boot::image_handle()).map_err(|e| e.status())?;
    let mut root = fs.open_volume().map_err(|e| e.status())?;
    if let Ok(old) = root.open(FILE_NAME, FileMode::ReadWrite, FileAttribute::empty()) {
        old.delete().map_err(|e| e.status())?;
    }
    let file = root
        .open(FILE_NAME, FileMode::CreateReadWrite, FileAttribute::empty())
        .map_err(|e| e.status())?;
    let mut file = file.into_regular_file().ok_or(Status::NOT_FOUND)?;
    // Chunks of 61 lines (3904 bytes), so that writes start at many different offsets in the FAT's and the
    // qcow2 image's clusters.
    let mut chunk = [0u8; 61 * LINE_LEN];
    let mut i = 0;
    while i < LINES {
        let mut len = 0;
        for slot in chunk.chunks_exact_mut(LINE_LEN) {
            if i == LINES {
                break;
            }
            let mut l = [0u8; LINE_LEN];
            line(i, &mut l);
            slot.copy_from_slice(&l);
            len += LINE_LEN;
            i += 1;
        }
        file.write(chunk.get(..len).unwrap_or(&[]))
            .map_err(|e| e.status())?;
    }
    file.flush().map_err(|e| e.status())?;
    file.close();
    say!(
        "wrote {FILE_NAME} ({} bytes), flushed and closed it",
        LINES as usize * LINE_LEN
    );
    Ok(())
}

/// Writes lines 0 to [`RAW_LINES`] into the last 8 blocks of the partition this program was loaded from,
/// through its Block I/O, with no FlushBlocks after. Returns the first block written.
fn raw_write() -> Result<u64, Status> {
    let image = boot::open_protocol_exclusive::<LoadedImage>(boot::image_handle())
        .map_err(|e| e.status())?;
    let device = image.device().ok_or(Status::NOT_FOUND)?;
    // Non-exclusive: the FAT driver stays bound.
    let mut io = get::<BlockIO>(device)?;
    let (media_id, block_size, last) = {
        let m = io.media();
        (m.media_id(), m.block_size(), m.last_block())
    };
    if block_size != 512 || last < 7 {
        return Err(Status::UNSUPPORTED);
    }
    let mut buf = [0u8; RAW_LINES * LINE_LEN];
    for (i, slot) in (0..).zip(buf.chunks_exact_mut(LINE_LEN)) {
        let mut l = [0u8; LINE_LEN];
        line(i, &mut l);
        slot.copy_from_slice(&l);
    }
    let lba = last - 7;
    io.write_blocks(media_id, lba, &buf)
        .map_err(|e| e.status())?;
    Ok(lba)
}

/// Opens protocol `P` of `handle` without exclusivity (drivers stay bound); closed when dropped.
fn get<P: ProtocolPointer + ?Sized>(handle: Handle) -> Result<ScopedProtocol<P>, Status> {
    // SAFETY: GetProtocol disconnects nothing, and the interface is used only while the scoped protocol
    // lives, within this program's run.
    unsafe {
        boot::open_protocol::<P>(
            OpenProtocolParams {
                handle,
                agent: boot::image_handle(),
                controller: None,
            },
            OpenProtocolAttributes::GetProtocol,
        )
    }
    .map_err(|e| e.status())
}

/// The whole disk under the partition this program was loaded from (the virtual disk that qcow2-boot
/// serves): the Block I/O handle, not a logical partition, whose device path is the partition's without
/// its last node, a hard drive media node.
fn whole_disk() -> Result<Handle, Status> {
    let device = boot::open_protocol_exclusive::<LoadedImage>(boot::image_handle())
        .map_err(|e| e.status())?
        .device()
        .ok_or(Status::NOT_FOUND)?;
    let part = get::<DevicePath>(device)?;
    let part = part.as_bytes();
    let handles = boot::locate_handle_buffer(SearchType::ByProtocol(&BlockIO::GUID))
        .map_err(|e| e.status())?;
    for &h in handles.iter() {
        let Ok(path) = get::<DevicePath>(h) else {
            continue;
        };
        // Its nodes without the end node (4 bytes), then the partition's (type 4, subtype 1).
        let n = path.as_bytes().len().saturating_sub(4);
        if n == 0
            || part.get(..n) != path.as_bytes().get(..n)
            || part.get(n..n + 2) != Some(&[0x04, 0x01])
        {
            continue;
        }
        if get::<BlockIO>(h).is_ok_and(|io| !io.media().is_logical_partition()) {
            return Ok(h);
        }
    }
    say!("no whole disk under the partition found");
    Err(Status::NOT_FOUND)
}

/// The status of a Block I/O call.
fn status(r: uefi::Result) -> Status {
    r.err().map_or(Status::SUCCESS, |e| e.status())
}

/// The block that the refused requests aim at: the primary GPT header, outside the file system (the test
/// compares the disk outside the ESP with what it made).
const REFUSED_LBA: u64 = 1;
/// The block written on a full disk: between the partition table and the partition, zeros in the base
/// image, in a cluster the overlay does not have.
const FULL_LBA: u64 = 1000;

/// Requests the UEFI spec's ReadBlocks and WriteBlocks must refuse, or (the last) do nothing with: what
/// each is (as printed), whether its media id is wrong, where it starts and its size in bytes. Expected:
/// MEDIA_CHANGED three times (the spec: "even if LBA, BufferSize, or Buffer are invalid"),
/// BAD_BUFFER_SIZE, INVALID_PARAMETER three times, SUCCESS.
const PROBES: [(&str, bool, Lba, usize); 8] = [
    ("with a wrong media id", true, Lba::At(REFUSED_LBA), 512),
    (
        "with a wrong media id and 0 bytes",
        true,
        Lba::At(REFUSED_LBA),
        0,
    ),
    (
        "with a wrong media id, of 520 bytes after the last block",
        true,
        Lba::AfterLast,
        520,
    ),
    ("of 520 bytes", false, Lba::At(REFUSED_LBA), 520),
    ("at the block after the last", false, Lba::AfterLast, 512),
    ("of 2 blocks at the last block", false, Lba::Last, 1024),
    ("at block 2^64-1", false, Lba::At(u64::MAX), 512),
    ("of 0 bytes", false, Lba::At(REFUSED_LBA), 0),
];

/// Where a probe starts.
#[derive(Clone, Copy)]
enum Lba {
    At(u64),
    Last,
    AfterLast,
}

/// Calls ReadBlocks and then WriteBlocks of the whole virtual disk with each of [`PROBES`] and prints the
/// status each returns; on a read-only disk WriteBlocks gets one valid request instead (it must be
/// WRITE_PROTECTED). With `disk_full` (the disk under the image has no room left) it then writes
/// [`FULL_LBA`], which needs a new cluster (DEVICE_ERROR expected), and reads it back.
fn refusals(writable: bool, disk_full: bool) -> Result<(), Status> {
    let mut io = get::<BlockIO>(whole_disk()?)?;
    let (media_id, block_size, last) = {
        let m = io.media();
        (m.media_id(), m.block_size(), m.last_block())
    };
    if block_size != 512 || last < FULL_LBA {
        return Err(Status::UNSUPPORTED);
    }
    let mut buf = [0u8; 1024];
    for write in [false, true] {
        if write && !writable {
            let s = status(io.write_blocks(media_id, REFUSED_LBA, &buf[..512]));
            say!("WriteBlocks on a read-only disk: {s:?}");
            break;
        }
        for (what, wrong_media, lba, len) in PROBES {
            let media = if wrong_media {
                media_id.wrapping_add(1)
            } else {
                media_id
            };
            let lba = match lba {
                Lba::At(lba) => lba,
                Lba::Last => last,
                Lba::AfterLast => last.saturating_add(1),
            };
            let (name, s) = if write {
                // Not what the block holds: a write that was not refused would show on the disk.
                buf.fill(0xa5);
                (
                    "WriteBlocks",
                    status(io.write_blocks(media, lba, &buf[..len])),
                )
            } else {
                (
                    "ReadBlocks",
                    status(io.read_blocks(media, lba, &mut buf[..len])),
                )
            };
            say!("{name} {what}: {s:?}");
        }
    }
    if disk_full {
        buf.fill(0x5a);
        let s = status(io.write_blocks(media_id, FULL_LBA, &buf[..512]));
        say!("WriteBlocks at block {FULL_LBA}, a new cluster on a full disk: {s:?}");
        buf.fill(0xff);
        let s = status(io.read_blocks(media_id, FULL_LBA, &mut buf[..512]));
        let zeros = buf[..512].iter().all(|&b| b == 0);
        say!(
            "ReadBlocks at block {FULL_LBA} after it: {s:?}, {}",
            if zeros { "zeros" } else { "not zeros" }
        );
    }
    Ok(())
}

#[entry]
fn main() -> Status {
    if uefi::helpers::init().is_err() {
        return Status::ABORTED;
    }
    let writable = device_writable();
    let leave = if writable {
        match how_to_leave() {
            Ok(leave) => leave,
            Err(e) => {
                say!("reading \\payload.cfg failed: {e:?}");
                return e;
            }
        }
    } else {
        Leave::Reset
    };
    if writable && leave != Leave::DiskFull {
        if let Err(e) = write_file() {
            say!("writing {FILE_NAME} failed: {e:?}");
            return e;
        }
        match raw_write() {
            Ok(lba) => say!(
                "wrote {} bytes at block {lba} of its partition through Block I/O, no flush",
                RAW_LINES * LINE_LEN
            ),
            Err(e) => {
                say!("writing through Block I/O failed: {e:?}");
                return e;
            }
        }
    }
    if let Err(e) = refusals(writable, leave == Leave::DiskFull) {
        say!("calling the virtual disk's Block I/O failed: {e:?}");
        return e;
    }
    uefi::system::with_stdout(|out| {
        let _ = writeln!(out, "{LINE}");
    });
    boot::stall(core::time::Duration::from_millis(100));
    match leave {
        Leave::Reset | Leave::DiskFull => {}
        Leave::ExitBootServices => {
            say!("exiting boot services");
            // SAFETY: nothing of boot services is used after this (the console neither).
            let _map = unsafe { boot::exit_boot_services(None) };
        }
        Leave::Return => {
            say!("returning");
            return Status::SUCCESS;
        }
        Leave::Hang => {
            say!("waiting for the power to be cut");
            loop {
                boot::stall(core::time::Duration::from_secs(1));
            }
        }
    }
    uefi::runtime::reset(ResetType::SHUTDOWN, Status::SUCCESS, None)
}
