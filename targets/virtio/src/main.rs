//! qcow2-core on bare-metal AArch64 (qemu-system-aarch64 `-M virt`), over virtio-blk disks.
//!
//! The images are attached to QEMU as raw drives (`-drive if=none,format=raw,...` and `-device
//! virtio-blk-device,drive=...,serial=NAME`), so that only this program understands qcow2. At start it
//! brings up every virtio-blk device on the virtio-mmio bus (src/virtio.rs) and prints one line per disk:
//! `disk SLOT NAME SECTORS ro|rw modern|legacy`, where NAME is the device's ID (QEMU's `serial`, at most 20
//! bytes).
//!
//! The jobs are the semihosting command line (QEMU's `-semihosting-config arg=...`): the program's name,
//! then pairs of words, run in order:
//!
//! - `read NAME`: opens the qcow2 image on the disk named `NAME` read-only, reads the whole virtual disk in
//!   64 KiB pieces and prints `sha256 NAME <hex>`: the SHA-256 of the virtual disk, as
//!   `qemu-img convert -O raw IMAGE - | sha256sum` prints it.
//! - `write NAME`: opens it with `Image::open_writable`, makes the writes of [`WRITES`], closes it (which
//!   flushes) and prints `wrote NAME`.
//!
//! A backing file is the disk whose name is the last path component of the name the image stores; it is
//! opened read-only. A disk cannot grow, so an image to be written needs free room after its data (the host
//! test pads the file). Errors are printed as `error: ...`; the program then goes on with the next job.
//! It exits through semihosting: status 0 when every job succeeded, 1 otherwise (2 after a panic, 3 after an
//! exception).

#![no_std]
#![no_main]

mod arch;
mod boot;
#[path = "../../cortex-m/src/sha256.rs"]
mod sha256;
mod uart;
mod virtio;

use qcow2_core::{
    BlockDevice, BlockDeviceWrite, Buffers, Decompressor, Error, FileRequest, Image, Inflate,
    Resolver, WriteState,
};

use sha256::Sha256;
use uart::Uart;
use virtio::{Disk, MAX_DISKS, SECTOR, VirtioError};

/// The writes a `write` job makes: (guest offset, length, byte). The host test applies the same writes to
/// its raw copy and reads them back with `qemu-io -c 'read -P BYTE OFFSET LENGTH'`. The last one ends at
/// the disk's end (offset given as `u64::MAX`: the disk's size minus the length). The same as
/// targets/cortex-m's.
pub const WRITES: [(u64, usize, u8); 3] = [
    (65536 + 1000, 5000, 0xa5),
    (3 * 1024 * 1024 + 7, 70000, 0x3c),
    (u64::MAX, 4096, 0x5a),
];

/// Images in a chain at most (the image and its backing files).
const DEPTH: usize = MAX_DISKS;
/// Metadata cache slices (a writer needs 4).
const SLICES: usize = 4;
/// Bytes per metadata slice.
const SLICE: usize = 4096;
/// Bytes per read or write call while hashing or writing.
const CHUNK: usize = 64 * 1024;
/// Deflate window (the whole window of a raw deflate stream).
const WINDOW: usize = 32 * 1024;

/// A disk as one layer of an image: the top image of a `write` job is writable, everything else read-only.
#[derive(Debug)]
pub struct Handle<'a> {
    disk: &'a mut Disk,
    writable: bool,
}

impl BlockDevice for Handle<'_> {
    type Error = VirtioError;

    fn block_size(&self) -> usize {
        self.disk.block_size()
    }

    fn size(&mut self) -> Result<u64, VirtioError> {
        self.disk.size()
    }

    fn read_blocks(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), VirtioError> {
        self.disk.read_blocks(lba, buf)
    }
}

impl BlockDeviceWrite for Handle<'_> {
    fn write_blocks(&mut self, lba: u64, buf: &[u8]) -> Result<(), VirtioError> {
        if !self.writable {
            return Err(VirtioError::ReadOnly);
        }
        self.disk.write_blocks(lba, buf)
    }

    fn flush(&mut self) -> Result<(), VirtioError> {
        if !self.writable {
            return Ok(());
        }
        BlockDeviceWrite::flush(self.disk)
    }
}

/// The disks not yet taken by the image being opened, found by name.
struct Disks<'a> {
    free: [Option<&'a mut Disk>; MAX_DISKS],
}

impl<'a> Disks<'a> {
    fn new(disks: &'a mut [Option<Disk>; MAX_DISKS]) -> Self {
        Disks {
            free: disks.each_mut().map(Option::as_mut),
        }
    }

    /// Takes the disk named `name`.
    fn take(&mut self, name: &[u8], writable: bool) -> Option<Handle<'a>> {
        let disk = self.free.iter_mut().find_map(|d| match d {
            Some(disk) if disk.name() == name => d.take(),
            _ => None,
        })?;
        Some(Handle { disk, writable })
    }
}

/// The last path component of `name`.
fn base_name(name: &[u8]) -> &[u8] {
    name.rsplit(|&b| b == b'/').next().unwrap_or(name)
}

impl<'a> Resolver<Handle<'a>> for Disks<'a> {
    fn backing_file(&mut self, request: FileRequest<'_>) -> Result<Handle<'a>, Error<VirtioError>> {
        self.take(base_name(request.name), false)
            .ok_or(Error::Unavailable {
                what: "no virtio disk is named (serial) after the backing file",
            })
    }

    fn data_file(&mut self, _request: FileRequest<'_>) -> Result<Handle<'a>, Error<VirtioError>> {
        Err(Error::Unavailable {
            what: "external data files are not supported by this program",
        })
    }
}

/// The inflate state, lent to one image at a time (the engine holds its decompressor by value).
type LentInflate<'a, 'b> = &'a mut Inflate<&'b mut [u8]>;

/// The image type this program uses, for reading and for writing.
type Qcow2<'a, 'b> =
    Image<Handle<'a>, &'a mut [u8], LentInflate<'a, 'b>, DEPTH, SLICES, WriteState>;

/// The engine's buffers.
struct Ctx<'b> {
    bounce: &'b mut [u8],
    metadata: &'b mut [u8],
    inflate: &'b mut Inflate<&'b mut [u8]>,
    chunk: &'b mut [u8],
}

impl<'b> Ctx<'b> {
    /// The buffers and the decompressor for one image, and the chunk buffer.
    fn lend(&mut self) -> (Buffers<&mut [u8]>, LentInflate<'_, 'b>, &mut [u8]) {
        // A new image may reuse host offsets of an old one: forget the kept cluster.
        self.inflate.invalidate();
        (
            Buffers {
                bounce: &mut self.bounce[..],
                metadata: &mut self.metadata[..],
            },
            &mut *self.inflate,
            &mut self.chunk[..],
        )
    }
}

/// The top disk of a job.
fn top<'a>(
    disks: &mut Disks<'a>,
    name: &[u8],
    writable: bool,
) -> Result<Handle<'a>, Error<VirtioError>> {
    disks.take(name, writable).ok_or(Error::Unavailable {
        what: "no virtio disk has this name (serial)",
    })
}

/// Reads the whole virtual disk of the image on disk `name`; returns its SHA-256.
fn hash_image(
    ctx: &mut Ctx<'_>,
    disks: &mut [Option<Disk>; MAX_DISKS],
    name: &[u8],
) -> Result<[u8; 32], Error<VirtioError>> {
    let mut disks = Disks::new(disks);
    let dev = top(&mut disks, name, false)?;
    let (buffers, inflate, chunk) = ctx.lend();
    let mut image: Qcow2<'_, '_> = Image::open(dev, buffers, inflate, &mut disks)?;
    let size = image.virtual_size();
    let mut sha = Sha256::new();
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(chunk.len() as u64) as usize;
        let piece = &mut chunk[..n];
        image.read_at(pos, piece)?;
        sha.update(piece);
        pos += n as u64;
    }
    Ok(sha.finish())
}

/// Makes the writes of [`WRITES`] into the image on disk `name` and closes it.
fn write_image(
    ctx: &mut Ctx<'_>,
    disks: &mut [Option<Disk>; MAX_DISKS],
    name: &[u8],
) -> Result<(), Error<VirtioError>> {
    let mut disks = Disks::new(disks);
    let dev = top(&mut disks, name, true)?;
    let (buffers, inflate, chunk) = ctx.lend();
    let mut image: Qcow2<'_, '_> = Image::open_writable(dev, buffers, inflate, &mut disks)?;
    let size = image.virtual_size();
    for (offset, len, byte) in WRITES {
        let start = if offset == u64::MAX {
            size.saturating_sub(len as u64)
        } else {
            offset
        };
        chunk.fill(byte);
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(chunk.len());
            image.write_at(start + done as u64, &chunk[..n])?;
            done += n;
        }
    }
    image.close().map(drop)
}

/// `bytes` as text, for messages.
fn text(bytes: &[u8]) -> &str {
    core::str::from_utf8(bytes).unwrap_or("?")
}

/// Brings up the disks and runs the jobs; returns the exit status.
fn run() -> u32 {
    let mut failed = false;
    let mut disks: [Option<Disk>; MAX_DISKS] = [const { None }; MAX_DISKS];
    let mut count = 0;
    for slot in 0..virtio::SLOTS {
        match virtio::probe(slot) {
            None => {}
            Some(Ok(disk)) => {
                println!(
                    "disk {} {} {} {} {}",
                    disk.slot(),
                    text(disk.name()),
                    disk.capacity(),
                    if disk.read_only() { "ro" } else { "rw" },
                    if disk.legacy() { "legacy" } else { "modern" },
                );
                if let Some(free) = disks.get_mut(count) {
                    *free = Some(disk);
                    count += 1;
                }
            }
            Some(Err(e)) => {
                println!("error: virtio-blk at slot {slot}: {e:?}");
                failed = true;
            }
        }
    }

    let mut cmdline = [0u8; 1024];
    let Some(args) = arch::cmdline(&mut cmdline) else {
        println!("error: no semihosting command line");
        return 1;
    };

    let mut bounce = [0u8; SECTOR];
    let mut metadata = [0u8; SLICES * SLICE];
    let mut window = [0u8; WINDOW];
    let mut input = [0u8; SECTOR];
    let mut chunk = [0u8; CHUNK];
    let mut inflate = Inflate::new(&mut window[..], &mut input[..]);
    let mut ctx = Ctx {
        bounce: &mut bounce,
        metadata: &mut metadata,
        inflate: &mut inflate,
        chunk: &mut chunk,
    };

    let mut words = args.split(|&b| b == b' ').filter(|w| !w.is_empty()).skip(1);
    let mut jobs = 0;
    while let Some(verb) = words.next() {
        let Some(name) = words.next() else {
            println!("error: `{}` without a disk name", text(verb));
            failed = true;
            break;
        };
        jobs += 1;
        match verb {
            b"read" => match hash_image(&mut ctx, &mut disks, name) {
                Ok(digest) => {
                    let mut hex = [0u8; 64];
                    for (i, b) in digest.iter().enumerate() {
                        const H: &[u8; 16] = b"0123456789abcdef";
                        hex[2 * i] = H[usize::from(b >> 4)];
                        hex[2 * i + 1] = H[usize::from(b & 15)];
                    }
                    println!("sha256 {} {}", text(name), text(&hex));
                }
                Err(e) => {
                    println!("error: read {}: {e:?}", text(name));
                    failed = true;
                }
            },
            b"write" => match write_image(&mut ctx, &mut disks, name) {
                Ok(()) => println!("wrote {}", text(name)),
                Err(e) => {
                    println!("error: write {}: {e:?}", text(name));
                    failed = true;
                }
            },
            _ => {
                println!("error: unknown job `{}`", text(verb));
                failed = true;
            }
        }
    }
    if jobs == 0 {
        println!("error: no jobs on the command line");
        failed = true;
    }
    u32::from(failed)
}

/// Called by `_start` (src/boot.rs) with a stack and FP/SIMD enabled.
#[unsafe(no_mangle)]
extern "C" fn rust_main() -> ! {
    Uart::init();
    let status = run();
    arch::exit(status)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("panic: {info}");
    arch::exit(2)
}
