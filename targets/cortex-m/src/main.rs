//! qcow2-core on a Cortex-M4 under emulation (qemu-system-arm `-M mps2-an386`).
//!
//! The block devices are host files reached through ARM semihosting (`SYS_OPEN`, `SYS_SEEK`, `SYS_READ`,
//! `SYS_WRITE`, `SYS_FLEN`). The program reads `jobs.txt` from QEMU's working directory; each line is
//!
//! - `read NAME`: opens the qcow2 image `NAME` read-only (a backing file is opened by the name the image
//!   stores, relative to QEMU's working directory), reads the whole virtual disk in 4 KiB pieces and prints
//!   `sha256 NAME <hex>`: the SHA-256 of the virtual disk, as `qemu-img convert -O raw NAME - | sha256sum`.
//! - `write NAME`: opens `NAME` with `Image::open_writable`, writes the fixed pattern [`WRITES`], closes it,
//!   prints `wrote NAME`.
//! - `snapshot NAME`: opens `NAME` for writing, creates the internal snapshot `before`, doubles the disk's
//!   size, makes the writes of [`WRITES`] (the last at the new end), closes it, prints `snapshot NAME`.
//! - `rollback NAME`: opens `NAME` for writing, applies its first internal snapshot, closes it, prints
//!   `rolled back NAME`.
//! - `unlock NAME` (built with the `luks` feature): opens the LUKS-encrypted `NAME` with the passphrase
//!   [`PASSPHRASE`], prints `unlock NAME CENTISECONDS` (the open's host time under emulation, from
//!   semihosting's clock), its peak stack as `stack unlock NAME BYTES`, and the virtual disk's `sha256`
//!   line as a `read` job does.
//!
//! Every buffer the engine uses is a static. The stack is painted before each job and its peak use during
//! the job (open, reads or writes, close, hashing; measured from the top of the stack, so `main`'s frame is
//! included) is printed as `stack read|write NAME BYTES`; the last line is
//! `stack-peak read BYTES write BYTES`, the largest of each kind (`snapshot` and `rollback` jobs are
//! printed as `stack snapshot|rollback NAME BYTES` and their largest as `stack-peak-snapshots BYTES`).
//! The program exits through semihosting: status 0 when every job succeeded.

#![no_std]
#![no_main]

mod sha256;

use core::mem::size_of;
use core::ptr::addr_of_mut;

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln, syscall};
use qcow2_core::{
    BlockDevice, BlockDeviceWrite, Buffers, Decompressor, Error, FileRequest, Image, Inflate,
    Resolver, WriteState,
};

use sha256::Sha256;

/// The writes a `write` job makes: (guest offset, length, byte). The host test applies the same writes to
/// its raw copy and reads them back with `qemu-io -c 'read -P BYTE OFFSET LENGTH'`. The last one ends at
/// the disk's end (offset given as `u64::MAX`: the disk's size minus the length).
pub const WRITES: [(u64, usize, u8); 3] = [
    (65536 + 1000, 5000, 0xa5),
    (3 * 1024 * 1024 + 7, 70000, 0x3c),
    (u64::MAX, 4096, 0x5a),
];

/// The passphrase of the encrypted images `unlock` jobs open.
#[cfg(feature = "luks")]
pub const PASSPHRASE: &[u8] = b"cortex-m-passphrase";

/// Block size of the semihosting devices.
const BLOCK: usize = 512;
/// Images in a chain at most (the image and its backing files).
const DEPTH: usize = 2;
/// Metadata cache slices (a writer needs 4).
const SLICES: usize = 4;

// The caller's buffers, all static: the stack measurement then shows the engine's own use.
static mut BOUNCE: [u8; BLOCK] = [0; BLOCK];
static mut METADATA: [u8; SLICES * BLOCK] = [0; SLICES * BLOCK];
static mut WINDOW: [u8; 32 * 1024] = [0; 32 * 1024];
static mut INPUT: [u8; BLOCK] = [0; BLOCK];
static mut CHUNK: [u8; 4096] = [0; 4096];
static mut JOBS: [u8; 2048] = [0; 2048];
static mut INFLATE: Option<Inflate<&'static mut [u8]>> = None;

/// Semihosting failures.
#[derive(Debug, Clone, Copy)]
pub enum SemiError {
    /// `SYS_OPEN` refused the name.
    Open,
    /// `SYS_SEEK` failed, or the offset is past what semihosting addresses (4 GiB).
    Seek,
    /// `SYS_READ` failed.
    Read,
    /// `SYS_WRITE` wrote less than asked.
    Write,
    /// `SYS_FLEN` failed.
    Length,
    /// A name longer than [`MAX_NAME`].
    Name,
}

/// Longest file name passed to `SYS_OPEN`.
const MAX_NAME: usize = 255;

/// A host file, through semihosting.
pub struct SemiFile {
    handle: usize,
}

/// `SYS_OPEN` modes.
const MODE_RB: usize = 1;
const MODE_RPLUSB: usize = 3;

impl SemiFile {
    /// Opens `name` (relative to QEMU's working directory) read-only, or for reading and writing.
    #[inline(never)]
    pub fn open(name: &[u8], writable: bool) -> Result<Self, SemiError> {
        let mut z = [0u8; MAX_NAME + 1];
        let dst = z.get_mut(..name.len()).ok_or(SemiError::Name)?;
        dst.copy_from_slice(name);
        let mode = if writable { MODE_RPLUSB } else { MODE_RB };
        // SAFETY: a NUL-terminated name that outlives the call.
        let h = unsafe { syscall!(OPEN, z.as_ptr(), mode, name.len()) };
        if h == usize::MAX {
            return Err(SemiError::Open);
        }
        Ok(SemiFile { handle: h })
    }

    fn seek(&mut self, pos: u64) -> Result<(), SemiError> {
        let pos = u32::try_from(pos).map_err(|_| SemiError::Seek)?;
        // SAFETY: plain integer arguments.
        match unsafe { syscall!(SEEK, self.handle, pos) } {
            0 => Ok(()),
            _ => Err(SemiError::Seek),
        }
    }

    /// Reads into `buf`; returns how many bytes came (fewer at the end of the file).
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, SemiError> {
        // SAFETY: `buf` is valid for writes of its length for the call.
        let left = unsafe { syscall!(READ, self.handle, buf.as_mut_ptr(), buf.len()) };
        if left > buf.len() {
            return Err(SemiError::Read);
        }
        Ok(buf.len() - left)
    }
}

impl Drop for SemiFile {
    fn drop(&mut self) {
        // SAFETY: plain integer argument.
        unsafe { syscall!(CLOSE, self.handle) };
    }
}

impl BlockDevice for SemiFile {
    type Error = SemiError;

    fn block_size(&self) -> usize {
        BLOCK
    }

    fn size(&mut self) -> Result<u64, SemiError> {
        // SAFETY: plain integer argument.
        let n = unsafe { syscall!(FLEN, self.handle) };
        if n == usize::MAX {
            return Err(SemiError::Length);
        }
        Ok(n as u64)
    }

    fn read_blocks(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), SemiError> {
        self.seek(lba.checked_mul(BLOCK as u64).ok_or(SemiError::Seek)?)?;
        let n = self.read(buf)?;
        buf[n..].fill(0);
        Ok(())
    }
}

impl BlockDeviceWrite for SemiFile {
    fn write_blocks(&mut self, lba: u64, buf: &[u8]) -> Result<(), SemiError> {
        self.seek(lba.checked_mul(BLOCK as u64).ok_or(SemiError::Seek)?)?;
        // SAFETY: `buf` is valid for reads of its length for the call.
        match unsafe { syscall!(WRITE, self.handle, buf.as_ptr(), buf.len()) } {
            0 => Ok(()),
            _ => Err(SemiError::Write),
        }
    }

    fn flush(&mut self) -> Result<(), SemiError> {
        // Semihosting writes reach the host's file at once; there is nothing to flush.
        Ok(())
    }
}

/// Opens backing files by the name the image stores, relative to QEMU's working directory, read-only.
struct SemiFiles;

impl Resolver<SemiFile> for SemiFiles {
    fn backing_file(&mut self, request: FileRequest<'_>) -> Result<SemiFile, Error<SemiError>> {
        SemiFile::open(request.name, false).map_err(Error::Io)
    }

    fn data_file(&mut self, _request: FileRequest<'_>) -> Result<SemiFile, Error<SemiError>> {
        Err(Error::Unavailable {
            what: "external data files are not supported by this program",
        })
    }

    #[cfg(feature = "luks")]
    fn passphrase(&mut self, _depth: usize) -> Option<&[u8]> {
        Some(PASSPHRASE)
    }
}

/// Semihosting's clock: centiseconds since the program started.
#[cfg(feature = "luks")]
fn clock() -> usize {
    // SAFETY: SYS_CLOCK takes no argument.
    unsafe { syscall!(CLOCK) }
}

/// Opens the encrypted `name` (timed), then reads it as [`hash_image`] does; returns the open's time in
/// centiseconds and the disk's SHA-256.
#[cfg(feature = "luks")]
#[inline(never)]
fn unlock_image(
    ctx: &mut Ctx,
    chunk: &mut [u8],
    name: &[u8],
) -> Result<(usize, [u8; 32]), Error<SemiError>> {
    let dev = SemiFile::open(name, false).map_err(Error::Io)?;
    let (buffers, inflate) = ctx.lend();
    let start = clock();
    let mut opened: Result<Qcow2Reader<'_>, _> = Image::open(dev, buffers, inflate, &mut SemiFiles);
    let took = clock().saturating_sub(start);
    let image = opened.as_mut().map_err(|e| e.clone())?;
    Ok((took, hash_disk(image, chunk)?))
}

/// The static inflate state, lent to one image at a time (the engine holds its decompressor by value; lending
/// a `&mut` keeps the ~11 KiB state out of the image value and so off the stack).
type LentInflate<'a> = &'a mut Inflate<&'static mut [u8]>;

/// The image type this program writes with.
type Qcow2<'a> = Image<SemiFile, &'a mut [u8], LentInflate<'a>, DEPTH, SLICES, WriteState>;

/// The image type this program reads with: no writer state.
type Qcow2Reader<'a> = Image<SemiFile, &'a mut [u8], LentInflate<'a>, DEPTH, SLICES>;

/// The engine's buffers, borrowed from the statics once.
struct Ctx {
    bounce: &'static mut [u8],
    metadata: &'static mut [u8],
    inflate: &'static mut Inflate<&'static mut [u8]>,
}

impl Ctx {
    /// The buffers and the decompressor for one image.
    fn lend(&mut self) -> (Buffers<&mut [u8]>, LentInflate<'_>) {
        // A new image may reuse host offsets of an old one: forget the kept cluster.
        self.inflate.invalidate();
        (
            Buffers {
                bounce: &mut self.bounce[..],
                metadata: &mut self.metadata[..],
            },
            &mut *self.inflate,
        )
    }
}

/// Reads the whole virtual disk of `name`; returns its SHA-256.
#[inline(never)]
fn hash_image(ctx: &mut Ctx, chunk: &mut [u8], name: &[u8]) -> Result<[u8; 32], Error<SemiError>> {
    let dev = SemiFile::open(name, false).map_err(Error::Io)?;
    let (buffers, inflate) = ctx.lend();
    // Used in place, inside the `Result`: moving it out would put a second copy in this frame.
    let mut opened: Result<Qcow2Reader<'_>, _> = Image::open(dev, buffers, inflate, &mut SemiFiles);
    let image = opened.as_mut().map_err(|e| e.clone())?;
    hash_disk(image, chunk)
}

/// The SHA-256 of the whole virtual disk of `image`, read `chunk.len()` bytes at a time.
#[inline(always)]
fn hash_disk(image: &mut Qcow2Reader<'_>, chunk: &mut [u8]) -> Result<[u8; 32], Error<SemiError>> {
    let size = image.virtual_size();
    let mut sha = Sha256::new();
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(chunk.len() as u64) as usize;
        image.read_at(pos, &mut chunk[..n])?;
        sha.update(&chunk[..n]);
        pos += n as u64;
    }
    Ok(sha.finish())
}

/// Makes the writes of [`WRITES`] into `name` and closes it.
#[inline(never)]
fn write_image(ctx: &mut Ctx, chunk: &mut [u8], name: &[u8]) -> Result<(), Error<SemiError>> {
    let dev = SemiFile::open(name, true).map_err(Error::Io)?;
    let (buffers, inflate) = ctx.lend();
    // Used in place, inside the `Result`: moving it out would put a second copy in this frame.
    let mut opened = open_writable(dev, buffers, inflate);
    let image = opened.as_mut().map_err(|e| e.clone())?;
    write_patterns(image, chunk)?;
    match opened {
        Ok(image) => image.close().map(drop),
        Err(e) => Err(e),
    }
}

/// Creates snapshot `before` of `name`, doubles its size, makes the writes of [`WRITES`], closes it.
#[inline(never)]
fn snapshot_image(ctx: &mut Ctx, chunk: &mut [u8], name: &[u8]) -> Result<(), Error<SemiError>> {
    let dev = SemiFile::open(name, true).map_err(Error::Io)?;
    let (buffers, inflate) = ctx.lend();
    let mut opened = open_writable(dev, buffers, inflate);
    let image = opened.as_mut().map_err(|e| e.clone())?;
    image.create_snapshot(&qcow2_core::write::NewSnapshot {
        name: b"before",
        date_sec: 0,
        date_nsec: 0,
        vm_clock_nsec: 0,
    })?;
    let size = image.virtual_size();
    image.resize(size * 2)?;
    write_patterns(image, chunk)?;
    match opened {
        Ok(image) => image.close().map(drop),
        Err(e) => Err(e),
    }
}

/// Applies the first internal snapshot of `name` and closes it.
#[inline(never)]
fn rollback_image(ctx: &mut Ctx, name: &[u8]) -> Result<(), Error<SemiError>> {
    let dev = SemiFile::open(name, true).map_err(Error::Io)?;
    let (buffers, inflate) = ctx.lend();
    let mut opened = open_writable(dev, buffers, inflate);
    let image = opened.as_mut().map_err(|e| e.clone())?;
    let first = image
        .layers()
        .first()
        .and_then(|l| l.qcow2())
        .filter(|m| m.header.nb_snapshots > 0)
        .map(|m| m.header.snapshots_offset)
        .ok_or(Error::Unavailable {
            what: "the image has no snapshot",
        })?;
    image.apply_snapshot(first)?;
    match opened {
        Ok(image) => image.close().map(drop),
        Err(e) => Err(e),
    }
}

/// `Image::open_writable`, in a frame of its own (so that the stack it needs shows apart from the caller's).
#[inline(never)]
fn open_writable<'a>(
    dev: SemiFile,
    buffers: Buffers<&'a mut [u8]>,
    inflate: LentInflate<'a>,
) -> Result<Qcow2<'a>, Error<SemiError>> {
    Image::open_writable(dev, buffers, inflate, &mut SemiFiles)
}

/// The writes of [`WRITES`], on an open image.
#[inline(never)]
fn write_patterns(image: &mut Qcow2<'_>, chunk: &mut [u8]) -> Result<(), Error<SemiError>> {
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
    Ok(())
}

const PAINT: u32 = 0x5afe_c0de;

unsafe extern "C" {
    static mut __sheap: u32;
    static _stack_start: u32;
}

/// Fills the free stack (from the end of `.bss` to a little below the current stack pointer) with
/// [`PAINT`].
#[inline(never)]
fn paint_stack() {
    let sp = cortex_m::register::msp::read() as usize;
    let mut p = addr_of_mut!(__sheap) as usize;
    while p + 64 < sp {
        // SAFETY: free stack below the live frames, word aligned.
        unsafe { core::ptr::write_volatile(p as *mut u32, PAINT) };
        p += 4;
    }
}

/// Bytes of stack used since [`paint_stack`]: from the top of the stack down to the lowest word that lost
/// its paint.
fn stack_peak() -> usize {
    let top = &raw const _stack_start as usize;
    let mut p = addr_of_mut!(__sheap) as usize;
    // SAFETY: reads of the painted area, word aligned.
    while p < top && unsafe { core::ptr::read_volatile(p as *const u32) } == PAINT {
        p += 4;
    }
    top - p
}

fn hex(digest: &[u8; 32]) -> [u8; 64] {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (i, b) in digest.iter().enumerate() {
        out[2 * i] = H[usize::from(b >> 4)];
        out[2 * i + 1] = H[usize::from(b & 15)];
    }
    out
}

fn text(b: &[u8]) -> &str {
    core::str::from_utf8(b).unwrap_or("?")
}

#[entry]
fn main() -> ! {
    // SAFETY: the only place the statics are borrowed; each once.
    let mut ctx = unsafe {
        let window: &'static mut [u8] = &mut *addr_of_mut!(WINDOW);
        let input: &'static mut [u8] = &mut *addr_of_mut!(INPUT);
        let inflate = &mut *addr_of_mut!(INFLATE);
        Ctx {
            bounce: &mut *addr_of_mut!(BOUNCE),
            metadata: &mut *addr_of_mut!(METADATA),
            inflate: inflate.insert(Inflate::new(window, input)),
        }
    };
    // SAFETY: borrowed once.
    let chunk: &'static mut [u8] = unsafe { &mut *addr_of_mut!(CHUNK) };
    // SAFETY: borrowed once.
    let jobs: &'static mut [u8] = unsafe { &mut *addr_of_mut!(JOBS) };

    hprintln!(
        "ram image-read {} image-write {} inflate-state {} bounce {} metadata {} window {} input {}",
        size_of::<
            Image<
                SemiFile,
                &mut [u8],
                qcow2_core::NoDecompressor,
                DEPTH,
                SLICES,
                qcow2_core::ReadOnly,
            >,
        >(),
        size_of::<Qcow2<'_>>(),
        size_of::<Inflate<&mut [u8]>>(),
        BLOCK,
        SLICES * BLOCK,
        32 * 1024,
        BLOCK
    );
    let mut failed = false;
    let (mut peak_read, mut peak_write, mut peak_snapshots) = (0usize, 0usize, 0usize);
    let len = match SemiFile::open(b"jobs.txt", false) {
        Ok(mut f) => f.read(jobs).unwrap_or(0),
        Err(_) => {
            hprintln!("error: cannot open jobs.txt");
            0
        }
    };
    if len == 0 || len == jobs.len() {
        hprintln!("error: jobs.txt is empty or too long");
        failed = true;
    }
    for line in jobs[..len].split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        paint_stack();
        if let Some(name) = line.strip_prefix(b"read ") {
            let result = hash_image(&mut ctx, chunk, name);
            let peak = stack_peak();
            peak_read = peak_read.max(peak);
            hprintln!("stack read {} {}", text(name), peak);
            match result {
                Ok(d) => hprintln!("sha256 {} {}", text(name), text(&hex(&d))),
                Err(e) => {
                    hprintln!("error: read {}: {:?}", text(name), e);
                    failed = true;
                }
            }
        } else if let Some(name) = line.strip_prefix(b"write ") {
            let result = write_image(&mut ctx, chunk, name);
            let peak = stack_peak();
            peak_write = peak_write.max(peak);
            hprintln!("stack write {} {}", text(name), peak);
            match result {
                Ok(()) => hprintln!("wrote {}", text(name)),
                Err(e) => {
                    hprintln!("error: write {}: {:?}", text(name), e);
                    failed = true;
                }
            }
        } else if let Some(name) = line.strip_prefix(b"snapshot ") {
            let result = snapshot_image(&mut ctx, chunk, name);
            let peak = stack_peak();
            peak_snapshots = peak_snapshots.max(peak);
            hprintln!("stack snapshot {} {}", text(name), peak);
            match result {
                Ok(()) => hprintln!("snapshot {}", text(name)),
                Err(e) => {
                    hprintln!("error: snapshot {}: {:?}", text(name), e);
                    failed = true;
                }
            }
        } else if let Some(name) = line.strip_prefix(b"rollback ") {
            let result = rollback_image(&mut ctx, name);
            let peak = stack_peak();
            peak_snapshots = peak_snapshots.max(peak);
            hprintln!("stack rollback {} {}", text(name), peak);
            match result {
                Ok(()) => hprintln!("rolled back {}", text(name)),
                Err(e) => {
                    hprintln!("error: rollback {}: {:?}", text(name), e);
                    failed = true;
                }
            }
        } else if let Some(name) = line.strip_prefix(b"unlock ") {
            #[cfg(feature = "luks")]
            let result = unlock_image(&mut ctx, chunk, name);
            #[cfg(feature = "luks")]
            hprintln!("stack unlock {} {}", text(name), stack_peak());
            #[cfg(feature = "luks")]
            match result {
                Ok((took, d)) => {
                    hprintln!("unlock {} {}", text(name), took);
                    hprintln!("sha256 {} {}", text(name), text(&hex(&d)));
                }
                Err(e) => {
                    hprintln!("error: unlock {}: {:?}", text(name), e);
                    failed = true;
                }
            }
            #[cfg(not(feature = "luks"))]
            {
                hprintln!(
                    "error: unlock {}: built without the luks feature",
                    text(name)
                );
                failed = true;
            }
        } else {
            hprintln!("error: bad job line: {}", text(line));
            failed = true;
        }
    }

    hprintln!("stack-peak read {} write {}", peak_read, peak_write);
    hprintln!("stack-peak-snapshots {}", peak_snapshots);
    debug::exit(if failed {
        debug::EXIT_FAILURE
    } else {
        debug::EXIT_SUCCESS
    });
    loop {
        cortex_m::asm::wfi();
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    hprintln!("panic");
    debug::exit(debug::EXIT_FAILURE);
    loop {
        cortex_m::asm::wfi();
    }
}
