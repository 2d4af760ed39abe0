//! `qemu-img convert`: copy the guest view of one or more disks into another, the way qemu-img does it.
//!
//! The copy itself ([`copy_guest_data`]) follows qemu-img's loop: the source is walked by block status
//! ([`Plan`]: data, zeros, or "leave it to the target's backing file"), data is read in 2 MiB pieces and
//! written where it is not zeros (`-S`), zero runs are left as holes when the target already reads as zeros
//! and written as zeros otherwise. Reading and writing overlap: a writer thread writes the pieces in guest
//! order while the next ones are read; with `-c`, batches of clusters are compressed on every core. Any
//! writable output plugs in through [`VirtualDiskWrite`]: [`convert`] creates a sparse raw file or a new
//! qcow2 image (or opens an existing target with `-n`) and copies into it.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};

use crate::aligned::AlignedBuf;
use crate::cache::CacheMode;
use crate::cli::progress::Progress;
use crate::disk::{
    DiskError, MapExtent, ParallelWriter, Reservation, Reserve, VirtualDisk, VirtualDiskWrite,
    write_compressed_range,
};
use crate::raw_disk::RawDisk;

const SECTOR: u64 = 512;
/// qemu-img's copy buffer: 2 MiB.
const BUF_SECTORS: u64 = 4096;
/// Largest block-status request (QEMU's BDRV_REQUEST_MAX_SECTORS).
const MAX_REQUEST_SECTORS: u64 = 2_147_483_136 / SECTOR;
/// qemu-img's default `-S 4k`: zero runs shorter than this many sectors are written anyway.
pub const DEFAULT_MIN_SPARSE: u64 = 8;
/// Largest `-S` (qemu-img's MAX_BUF_SECTORS).
pub const MAX_MIN_SPARSE: u64 = 32768;
/// qemu-img's default `-m`.
pub const DEFAULT_PARALLEL: usize = 8;
/// Largest `-m` (qemu-img's MAX_COROUTINES).
pub const MAX_PARALLEL: usize = 16;

fn sector_is_zero(buf: &[u8], sector: usize) -> bool {
    let start = sector * SECTOR as usize;
    is_zero(&buf[start..(start + SECTOR as usize).min(buf.len())])
}

/// Whether `buf` holds only zeros. Data usually has a non-zero byte near its start, so the first word is
/// looked at alone; the rest is folded 256 bytes at a time (a loop the compiler vectorises), stopping at the
/// first block that is not zeros.
fn is_zero(buf: &[u8]) -> bool {
    let (words, tail) = buf.as_chunks::<16>();
    if words.first().is_some_and(|w| u128::from_ne_bytes(*w) != 0) {
        return false;
    }
    words.chunks(16).all(|block| {
        block
            .iter()
            .fold(0u128, |acc, w| acc | u128::from_ne_bytes(*w))
            == 0
    }) && tail.iter().all(|&b| b == 0)
}

/// qemu-img's `is_allocated_sectors`: whether the first sector of `buf` (n sectors, the first at
/// `sector_num`) holds data, and for how many sectors that status lasts once aligned to `align` sectors (a
/// power of two).
fn allocated_run(buf: &[u8], n: usize, sector_num: u64, align: u64) -> (bool, usize) {
    if n == 0 {
        return (false, 0);
    }
    let mut is_zero = sector_is_zero(buf, 0);
    let mut i = 1;
    while i < n && sector_is_zero(buf, i) == is_zero {
        i += 1;
    }
    if i == n {
        return (!is_zero, i);
    }
    let tail = ((sector_num + i as u64) & (align - 1)) as usize;
    if tail != 0 {
        if is_zero && i <= tail {
            // A zero run that is only the tail of an aligned block: the data after it rewrites that block.
            is_zero = false;
        }
        if !is_zero {
            i = (i + align as usize - tail).min(n);
        } else {
            i -= tail;
        }
    }
    (!is_zero, i)
}

/// qemu-img's `is_allocated_sectors_min`: like [`allocated_run`], but a data run swallows zero runs shorter
/// than `min` sectors that follow it.
fn allocated_run_min(
    buf: &[u8],
    n: usize,
    min: usize,
    sector_num: u64,
    align: u64,
) -> (bool, usize) {
    let min = min.min(n);
    let (data, first) = allocated_run(buf, n, sector_num, align);
    if !data {
        return (false, first);
    }
    let mut used = first;
    let mut checked = first;
    let mut left = n - first;
    while left > 0 {
        let off = checked * SECTOR as usize;
        let (d, run) = allocated_run(&buf[off..], left, sector_num + checked as u64, align);
        left -= run;
        checked += run;
        if d {
            used = checked;
        } else if run >= min {
            break;
        }
    }
    (true, used)
}

/// What went wrong in a conversion: the one-line message after "prog: ".
#[derive(Debug)]
pub struct ConvertError(pub String);

/// Several sources read as one disk, one after the other (qemu-img convert with more than one source);
/// each source takes whole sectors, its last one padded with zeros.
pub struct Sources<'a> {
    parts: Vec<&'a mut (dyn VirtualDisk + Send)>,
    /// Where each part starts, and the total, in bytes (multiples of 512).
    starts: Vec<u64>,
    size: u64,
}

impl std::fmt::Debug for Sources<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("starts", &self.starts)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl<'a> Sources<'a> {
    /// The concatenation of `parts`, in order.
    pub fn new(parts: Vec<&'a mut (dyn VirtualDisk + Send)>) -> Sources<'a> {
        let mut starts = Vec::with_capacity(parts.len());
        let mut size = 0u64;
        for p in &parts {
            starts.push(size);
            size = size.saturating_add(p.virtual_size().div_ceil(SECTOR) * SECTOR);
        }
        Sources {
            parts,
            starts,
            size,
        }
    }

    /// The part holding byte `offset`, with the offset inside it.
    fn part(&self, offset: u64) -> (usize, u64) {
        let i = self
            .starts
            .partition_point(|&s| s <= offset)
            .saturating_sub(1);
        (i, offset - self.starts[i])
    }

    /// The length of part `i` in whole sectors.
    fn part_len(&self, i: usize) -> u64 {
        self.starts.get(i + 1).copied().unwrap_or(self.size) - self.starts[i]
    }
}

impl VirtualDisk for Sources<'_> {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, mut offset: u64, mut buf: &mut [u8]) -> Result<(), DiskError> {
        while !buf.is_empty() {
            let (i, inner) = self.part(offset);
            let n = (self.part_len(i) - inner).min(buf.len() as u64) as usize;
            let (now, rest) = buf.split_at_mut(n);
            let part = &mut self.parts[i];
            let readable = part.virtual_size().saturating_sub(inner).min(n as u64) as usize;
            part.read_at(inner, &mut now[..readable])?;
            now[readable..].fill(0);
            offset += n as u64;
            buf = rest;
        }
        Ok(())
    }

    fn map_extent(&mut self, offset: u64, max_len: u64) -> Result<MapExtent, DiskError> {
        let (i, inner) = self.part(offset);
        let part = &mut self.parts[i];
        let size = part.virtual_size();
        let len = max_len.min(self.starts.get(i + 1).map_or(u64::MAX, |e| e - offset));
        if inner >= size {
            // The padding of a last partial sector (only reached when the size is not a multiple of 512).
            return Ok(MapExtent {
                start: offset,
                length: len,
                depth: 0,
                present: false,
                zero: true,
                data: false,
                compressed: false,
                offset: None,
                file: None,
            });
        }
        let mut e = part.map_extent(inner, len.min(size - inner))?;
        e.start = offset;
        if inner + e.length == size {
            // The extent ends the part: it covers the padding up to the next sector too.
            e.length = len.min(size.div_ceil(SECTOR) * SECTOR - inner);
        }
        Ok(e)
    }
}

/// What qemu-img does with a range of the source (its `ImgConvertBlockStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Read it and write what is not zeros.
    Data,
    /// Reads as zeros: write zeros unless the target already reads as zeros there.
    Zero,
    /// Unallocated in the source's top image: left unallocated, so the target's backing file shows through.
    Backing,
}

/// How [`copy_guest_data`] copies (qemu-img convert's settings).
#[derive(Debug, Clone, Copy)]
pub struct CopyOptions {
    /// Print qemu-img's progress lines on the output.
    pub progress: bool,
    /// Print warnings (`--salvage`) on stderr.
    pub quiet: bool,
    /// Write every cluster that holds data compressed (`qemu-img convert -c`); the output must take
    /// compressed writes ([`VirtualDiskWrite::compressed_cluster_size`]).
    pub compress: bool,
    /// The target's cache mode (`-t`): with `writethrough` every write is flushed; with `unsafe` (qemu-img
    /// convert's default) nothing is made durable, not even at the end; otherwise the target is flushed once,
    /// when it is closed.
    pub cache: CacheMode,
    /// `-S` in sectors: zeros inside data are written only in runs shorter than this; 0 writes every byte
    /// (zeros included: a fully allocated target).
    pub min_sparse: u64,
    /// The target reads as zeros where nothing is written (a new image without a backing file, or
    /// `--target-is-zero`): zero runs are skipped instead of written as zeros.
    pub target_zeroed: bool,
    /// The target has a backing file (`-B`): what is unallocated in the source's top image is left
    /// unallocated. `target_backing_size` is that backing file's size when the target is new.
    pub target_has_backing: bool,
    /// See `target_has_backing`.
    pub target_backing_size: Option<u64>,
    /// `--salvage`: unreadable sectors become zeros (with a warning) instead of failing the conversion.
    pub salvage: bool,
    /// `-C`: data is copied as it is, without looking for zeros in it.
    pub copy_range: bool,
    /// `-m`: how many requests may be in flight (1: read, then write, one piece at a time).
    pub parallel: usize,
    /// `-r`: at most this many bytes of data a second.
    pub rate: Option<u64>,
}

impl Default for CopyOptions {
    /// qemu-img convert's defaults.
    fn default() -> CopyOptions {
        CopyOptions {
            progress: false,
            quiet: false,
            compress: false,
            cache: CacheMode::UNSAFE,
            min_sparse: DEFAULT_MIN_SPARSE,
            target_zeroed: true,
            target_has_backing: false,
            target_backing_size: None,
            salvage: false,
            copy_range: false,
            parallel: DEFAULT_PARALLEL,
            rate: None,
        }
    }
}

impl CopyOptions {
    /// Zero runs inside data are aligned to this many sectors (qemu-img's `s.alignment` for a file).
    fn alignment(&self) -> u64 {
        if self.min_sparse == 0 {
            1
        } else {
            1 << self.min_sparse.ilog2()
        }
    }
}

fn warn(opts: &CopyOptions, msg: String) {
    if !opts.quiet {
        eprintln!("qcow2: warning: {msg}");
    }
}

/// qemu-img's `convert_iteration_sectors`: walks the source by block status.
struct Plan {
    total: u64,
    status: Status,
    next_status: u64,
    cluster: u64,
}

impl Plan {
    /// The status at `sector` and for how many sectors it lasts (in whole clusters when compressing).
    fn next(
        &mut self,
        src: &mut dyn VirtualDisk,
        sector: u64,
        opts: &CopyOptions,
    ) -> Result<(Status, u64), ConvertError> {
        let mut n = (self.total - sector).min(MAX_REQUEST_SECTORS);
        let backing_sectors = opts
            .target_backing_size
            .filter(|_| opts.target_has_backing)
            .map(|b| b.div_ceil(SECTOR));
        let mut post_backing_zero = false;
        if let Some(b) = backing_sectors {
            if sector >= b {
                post_backing_zero = true;
            } else if sector + n > b {
                n = b - sector;
            }
        }
        if self.next_status <= sector {
            let (e, count) = loop {
                match src.map_extent(sector * SECTOR, n * SECTOR) {
                    Ok(e) => {
                        let count = e.length.div_ceil(SECTOR).clamp(1, n);
                        break (Some(e), count);
                    }
                    Err(e) if opts.salvage => {
                        if n == 1 {
                            warn(
                                opts,
                                format!(
                                    "error while reading block status at offset {}: {e}",
                                    sector * SECTOR
                                ),
                            );
                            break (None, 1);
                        }
                        n = n.div_ceil(4);
                    }
                    Err(e) => {
                        return Err(ConvertError(format!(
                            "error while reading block status at offset {}: {e}",
                            sector * SECTOR
                        )));
                    }
                }
            };
            n = count;
            self.status = match e {
                None => Status::Data,
                // Unallocated in the source's top image, which has a backing file.
                Some(e)
                    if opts.target_has_backing && !(e.present && e.depth == 0) && e.depth > 0 =>
                {
                    Status::Backing
                }
                Some(e) if e.zero => {
                    if post_backing_zero {
                        Status::Backing
                    } else {
                        Status::Zero
                    }
                }
                Some(_) => Status::Data,
            };
            self.next_status = sector + n;
        }
        n = n.min(self.next_status - sector);
        // With -S 0, zeros are written as data.
        let data =
            self.status == Status::Data || (opts.min_sparse == 0 && self.status == Status::Zero);
        if data {
            // One buffer at a time; a compressed conversion reads one cluster at a time.
            n = n.min(if opts.compress {
                self.cluster
            } else {
                BUF_SECTORS
            });
        }
        if opts.compress {
            // Compressed clusters are written whole: a run shorter than a cluster is data.
            if n < self.cluster {
                n = self.cluster.min(self.total - sector);
                self.status = Status::Data;
            } else {
                n -= n % self.cluster;
            }
        }
        let status = if opts.min_sparse == 0 && self.status == Status::Zero {
            Status::Data
        } else {
            self.status
        };
        Ok((status, n))
    }
}

/// Reads `buf.len()` bytes at `offset`; with `--salvage`, a failing read is retried sector by sector and the
/// sectors that cannot be read become zeros.
fn read_source(
    src: &mut dyn VirtualDisk,
    offset: u64,
    buf: &mut [u8],
    opts: &CopyOptions,
) -> Result<(), ConvertError> {
    let err =
        |off: u64, e: DiskError| ConvertError(format!("error while reading at byte {off}: {e}"));
    match src.read_at(offset, buf) {
        Ok(()) => Ok(()),
        Err(e) if !opts.salvage => Err(err(offset, e)),
        Err(_) => {
            for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
                let off = offset + i as u64 * SECTOR;
                if let Err(e) = src.read_at(off, sector) {
                    warn(opts, format!("error while reading offset {off}: {e}"));
                    sector.fill(0);
                }
            }
            Ok(())
        }
    }
}

/// After a write to the target: in a write-through cache mode, the write is made durable before the next.
fn written(dst: &mut dyn VirtualDiskWrite, cache: CacheMode) -> Result<(), DiskError> {
    if cache.writethrough {
        dst.flush()?;
    }
    Ok(())
}

/// One piece of the copy, in guest order.
struct Piece {
    sector: u64,
    sectors: u64,
    status: Status,
    /// The data read (for [`Status::Data`]).
    buf: AlignedBuf,
    /// For compressed writes: the cluster compressed on another thread (`None` inside: it does not
    /// compress), or not compressed yet.
    compressed: Option<Option<Vec<u8>>>,
}

/// Zeros at `offset`: nothing when the target reads as zeros already, written as zeros otherwise.
fn write_zeros(
    dst: &mut dyn VirtualDiskWrite,
    offset: u64,
    len: u64,
    opts: &CopyOptions,
) -> Result<(), DiskError> {
    if opts.target_zeroed {
        return Ok(());
    }
    dst.write_zeroes(offset, len, true)
        .and_then(|()| written(dst, opts.cache))
}

/// What an uncompressed piece asks of the target, run by run: data to write, or zeros.
#[derive(Debug, Clone, Copy)]
enum Run<'a> {
    Data(&'a [u8]),
    Zeros(u64),
}

/// qemu-img's `convert_co_write` for an uncompressed piece: calls `apply` with each run at its guest offset,
/// in order (a data piece is split where it holds zeros, `-S`).
fn piece_runs(
    p: &Piece,
    opts: &CopyOptions,
    mut apply: impl FnMut(u64, Run<'_>) -> Result<(), DiskError>,
) -> Result<(), ConvertError> {
    let off = p.sector * SECTOR;
    let fail =
        |at: u64, e: DiskError| ConvertError(format!("error while writing at byte {at}: {e}"));
    match p.status {
        Status::Backing => Ok(()),
        Status::Zero => apply(off, Run::Zeros(p.sectors * SECTOR)).map_err(|e| fail(off, e)),
        Status::Data if opts.min_sparse == 0 || opts.copy_range => {
            apply(off, Run::Data(&p.buf)).map_err(|e| fail(off, e))
        }
        Status::Data => {
            let n = p.sectors as usize;
            let mut i = 0usize;
            while i < n {
                let (is_data, run) = allocated_run_min(
                    &p.buf[i * SECTOR as usize..],
                    n - i,
                    opts.min_sparse as usize,
                    p.sector + i as u64,
                    opts.alignment(),
                );
                let run = run.max(1);
                let start = i as u64 * SECTOR;
                let len = run as u64 * SECTOR;
                let what = if is_data {
                    Run::Data(&p.buf[start as usize..(start + len) as usize])
                } else {
                    Run::Zeros(len)
                };
                apply(off + start, what).map_err(|e| fail(off + start, e))?;
                i += run;
            }
            Ok(())
        }
    }
}

/// Applies one run to the target.
fn write_run(
    dst: &mut dyn VirtualDiskWrite,
    off: u64,
    run: Run<'_>,
    opts: &CopyOptions,
) -> Result<(), DiskError> {
    match run {
        Run::Data(bytes) => dst
            .write_at(off, bytes)
            .and_then(|()| written(dst, opts.cache)),
        Run::Zeros(len) => write_zeros(dst, off, len, opts),
    }
}

/// qemu-img's `convert_co_write`: writes one piece.
fn write_piece(
    dst: &mut dyn VirtualDiskWrite,
    p: &Piece,
    opts: &CopyOptions,
) -> Result<(), ConvertError> {
    if !(opts.compress && p.status == Status::Data) {
        return piece_runs(p, opts, |off, run| write_run(dst, off, run, opts));
    }
    let off = p.sector * SECTOR;
    let fail = |e: DiskError| {
        ConvertError(format!(
            "error while writing at byte {}: {e}",
            p.sector * SECTOR
        ))
    };
    if opts.min_sparse != 0 && is_zero(&p.buf) {
        return write_zeros(dst, off, p.sectors * SECTOR, opts).map_err(fail);
    }
    match &p.compressed {
        Some(c) => dst.write_precompressed(off, &p.buf, c.as_deref()),
        None => write_compressed_range(dst, off, &p.buf),
    }
    .and_then(|()| written(dst, opts.cache))
    .map_err(fail)
}

/// Where a conversion writes.
#[derive(Debug, Clone)]
pub enum Target {
    /// A new raw file (created, or truncated).
    NewRaw,
    /// A new qcow2 image, created as `qemu-img create -f qcow2 -o OPTIONS [-b BACKING -F FMT]` would with the
    /// sources' total size.
    NewQcow2 {
        options: Vec<String>,
        backing: Option<String>,
        backing_fmt: Option<String>,
    },
    /// `-n`: an existing image of at least the sources' size, opened as this format (probed when `None`).
    Existing { format: Option<String> },
}

/// Converts `src` into `dst` as qemu-img convert does, with qemu-img's progress on `out` when asked.
pub fn convert(
    src: &mut (dyn VirtualDisk + Send),
    dst: &str,
    target: &Target,
    mut opts: CopyOptions,
    out: &mut dyn Write,
) -> Result<(), ConvertError> {
    let size = src.virtual_size().div_ceil(SECTOR) * SECTOR;
    let mut prog = Progress::new(opts.progress, 1.0);
    let io = |e: std::io::Error| ConvertError(format!("{dst}: {}", DiskError::os_text(&e)));
    prog.print(0.0, 100, out).map_err(io)?;
    let mut disk = open_target(dst, target, size, &mut opts)?;
    copy_guest_data(src, disk.as_mut(), opts, &mut prog, out)?;
    prog.print(100.0, 0, out).map_err(io)?;
    prog.end(out).map_err(io)?;
    disk.close()
        .map_err(|e| ConvertError(format!("{dst}: {e}")))
}

/// Creates (or, with `-n`, opens) the target `dst` for a conversion of `size` bytes, with `opts.cache`;
/// with a backing file, notes its size in `opts`.
pub fn open_target(
    dst: &str,
    target: &Target,
    size: u64,
    opts: &mut CopyOptions,
) -> Result<Box<dyn VirtualDiskWrite + Send>, ConvertError> {
    Ok(match target {
        Target::NewRaw => Box::new(create_raw(dst, size, opts.cache)?),
        Target::NewQcow2 {
            options,
            backing,
            backing_fmt,
        } => {
            let args = crate::cli::create::CreateArgs {
                quiet: true,
                format: Some("qcow2".to_string()),
                options: options.clone(),
                backing: backing.clone(),
                backing_fmt: backing_fmt.clone(),
                file: dst.to_string(),
                size: Some(size.to_string()),
                // As qemu-img's convert, the image is made without opening its backing file; opening the
                // new image does.
                unsafe_backing: true,
            };
            crate::cli::create::run_create(&args, &mut std::io::sink())
                .map_err(|e| creation_error(dst, e.0))?;
            let opened = crate::open::open_disk_writable_cache(dst, Some("qcow2"), opts.cache)
                .map_err(|e| ConvertError(format!("Could not open '{dst}': {}", e.0)))?;
            if opts.target_has_backing {
                opts.target_backing_size = opened.chain.get(1).map(|b| b.virtual_size);
            }
            opened.disk
        }
        Target::Existing { format } => {
            let opened = crate::open::open_disk_writable_cache(dst, format.as_deref(), opts.cache)
                .map_err(|e| ConvertError(format!("Could not open '{dst}': {}", e.0)))?;
            if opened.disk.virtual_size().div_ceil(SECTOR) < size / SECTOR {
                return Err(ConvertError(
                    "output file is smaller than input file".to_string(),
                ));
            }
            opened.disk
        }
    })
}

/// qemu-img convert's wording of a failed creation of `dst`: option syntax errors come before the image is
/// created and name no file; what the format refuses is "error while converting".
fn creation_error(dst: &str, msg: String) -> ConvertError {
    let Some(rest) = msg.strip_prefix(&format!("{dst}: ")) else {
        return ConvertError(msg);
    };
    if rest.starts_with("Invalid parameter '")
        || (rest.starts_with("Parameter '") && rest.contains("' expects "))
    {
        ConvertError(rest.to_string())
    } else {
        ConvertError(format!("{dst}: error while converting qcow2: {rest}"))
    }
}

/// Creates the sparse raw file `dst` of `size` bytes, the way QEMU's file driver does.
fn create_raw(dst: &str, size: u64, cache: CacheMode) -> Result<RawDisk, ConvertError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)
        .map_err(|e| {
            ConvertError(format!(
                "{dst}: error while converting raw: Could not create '{dst}': {}",
                DiskError::os_text(&e)
            ))
        })?;
    file.set_len(size).map_err(|e| {
        ConvertError(format!(
            "{dst}: error while converting raw: Could not resize file: {}",
            DiskError::os_text(&e)
        ))
    })?;
    // Like QEMU's file driver, allocate the first block of a new file (QEMU does it so that later opens can
    // probe the alignment), so that the result has the same holes as qemu-img's.
    let first = size.min(4096) as usize;
    if first > 0 {
        file.write_all_at(&vec![0u8; first], 0).map_err(|e| {
            ConvertError(format!(
                "{dst}: error while converting raw: Could not write to the new file: {}",
                DiskError::os_text(&e)
            ))
        })?;
    }
    let mut target = RawDisk::new_writable(file, dst).map_err(|e| ConvertError(e.0))?;
    target.set_no_flush(cache.no_flush);
    Ok(target)
}

/// Copies the guest view of `src` into `dst` (a disk of at least the same size) as qemu-img's convert loop
/// does, printing progress on `out`.
pub fn copy_guest_data(
    src: &mut (dyn VirtualDisk + Send),
    dst: &mut (dyn VirtualDiskWrite + Send),
    opts: CopyOptions,
    prog: &mut Progress,
    out: &mut dyn Write,
) -> Result<(), ConvertError> {
    // Requests cover whole sectors: a source whose size is not a multiple of 512 reads its last sector
    // padded with zeros.
    let mut padded;
    let src: &mut (dyn VirtualDisk + Send) = if src.virtual_size().is_multiple_of(SECTOR) {
        src
    } else {
        padded = Sources::new(vec![src]);
        &mut padded
    };
    let total = src.virtual_size().div_ceil(SECTOR);
    // A target that takes no compressed writes fails at its first write, as qemu-img's does.
    let (cluster, no_compression) = if opts.compress {
        match dst.compressed_cluster_size() {
            Ok(c) => {
                let c = c / SECTOR;
                if c == 0 || c > MAX_MIN_SPARSE {
                    return Err(ConvertError("invalid cluster size".to_string()));
                }
                (c, None)
            }
            Err(e) => (1, Some(e)),
        }
    } else {
        (1, None)
    };
    let mut plan = Plan {
        total,
        status: Status::Data,
        next_status: 0,
        cluster,
    };
    // First pass: how many sectors will be written, for the progress bar.
    let mut allocated: u64 = 0;
    let mut sector = 0;
    while sector < total {
        let (status, n) = plan.next(src, sector, &opts)?;
        if status == Status::Data {
            if let Some(e) = no_compression {
                return Err(ConvertError(format!(
                    "error while writing at byte {}: {e}",
                    sector * SECTOR
                )));
            }
            allocated += n;
        }
        sector += n;
    }
    plan.next_status = 0;
    let mut reader = Reader {
        src,
        plan,
        sector: 0,
        done: 0,
        allocated,
        progress: None,
        started: std::time::Instant::now(),
    };
    let mut printer = Printer { prog, out };
    if opts.compress {
        copy_compressed(&mut reader, &mut printer, dst, &opts)
    } else if let Some(pw) = dst
        .parallel_writer()
        .filter(|_| opts.parallel > 1 && !opts.cache.writethrough)
    {
        copy_parallel(reader, &mut printer, dst, &pw, &opts)
    } else {
        copy_pipelined(&mut reader, &mut printer, dst, &opts)
    }
}

/// Where progress goes: qemu-img's progress lines on the output.
struct Printer<'a> {
    prog: &'a mut Progress,
    out: &'a mut dyn Write,
}

impl Printer<'_> {
    fn print(&mut self, percent: f32) -> Result<(), ConvertError> {
        self.prog
            .print(percent, 0, self.out)
            .map_err(|e| ConvertError(DiskError::os_text(&e)))
    }

    /// The next piece from `reader`, with the progress it made printed.
    fn next(
        &mut self,
        reader: &mut Reader<'_>,
        buf: AlignedBuf,
        opts: &CopyOptions,
    ) -> Result<Option<Piece>, ConvertError> {
        let p = reader.next(buf, opts)?;
        if let Some(percent) = reader.progress.take() {
            self.print(percent)?;
        }
        Ok(p)
    }
}

/// The read side of the copy: the source's pieces in guest order.
struct Reader<'a> {
    src: &'a mut (dyn VirtualDisk + Send),
    plan: Plan,
    sector: u64,
    done: u64,
    allocated: u64,
    /// Progress made by the last piece taken, to be printed.
    progress: Option<f32>,
    /// When the copy started (for `-r`).
    started: std::time::Instant,
}

impl Reader<'_> {
    /// The next piece, read into `buf` (resized to it) when it is data; `None` at the end.
    fn next(
        &mut self,
        mut buf: AlignedBuf,
        opts: &CopyOptions,
    ) -> Result<Option<Piece>, ConvertError> {
        if self.sector >= self.plan.total {
            return Ok(None);
        }
        let sector = self.sector;
        let (status, n) = self.plan.next(self.src, sector, opts)?;
        self.sector += n;
        if status == Status::Data {
            self.done += n;
            self.progress = Some((100.0 * self.done as f64 / self.allocated.max(1) as f64) as f32);
            if let Some(rate) = opts.rate {
                // -r: wait until the data read so far is within the rate.
                let due = std::time::Duration::from_secs_f64(
                    (self.done - n) as f64 * SECTOR as f64 / rate as f64,
                );
                if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            buf.set_len((n * SECTOR) as usize);
            if self.plan.status == Status::Data {
                read_source(self.src, sector * SECTOR, &mut buf, opts)?;
            } else {
                // -S 0 over a zero run.
                buf.fill(0);
            }
        } else {
            buf.set_len(0);
        }
        Ok(Some(Piece {
            sector,
            sectors: n,
            status,
            buf,
            compressed: None,
        }))
    }
}

/// Uncompressed copy into a target that takes data from several threads ([`VirtualDiskWrite::reserve`]),
/// as qemu-img's coroutines copy: each of a few workers takes the next piece and, still in guest order
/// (under one lock), reads it, writes its zeros and reserves room for its data in the target; then it
/// stores the data itself, while another worker reads, and commits it. The target's layout is the one
/// writing in guest order gives.
fn copy_parallel(
    reader: Reader<'_>,
    printer: &mut Printer<'_>,
    dst: &mut (dyn VirtualDiskWrite + Send),
    pw: &ParallelWriter,
    opts: &CopyOptions,
) -> Result<(), ConvertError> {
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, MAX_COPY_THREADS)
        .min(opts.parallel);
    let reader = Mutex::new(reader);
    let dst = Mutex::new(dst);
    let failed = AtomicBool::new(false);
    // A filesystem takes buffered writes to one file one at a time (ext4 and XFS hold the inode's lock
    // exclusively); waiting here sleeps instead of spinning in the kernel on the other writer.
    let store_lock = Mutex::new(());
    let stopped = || ConvertError("a copy thread stopped unexpectedly".to_string());
    let (report, progress) = mpsc::channel::<f32>();
    // One piece: read, zeros written and data reserved in guest order; then the data stored and committed.
    // Errors come with the sector of the piece that met them: of several, the first in guest order is
    // reported (the one a serial copy would have met).
    let copy_one = |buf: AlignedBuf,
                    report: &mpsc::Sender<f32>|
     -> Result<Option<AlignedBuf>, (u64, ConvertError)> {
        let mut first = u64::MAX;
        let run = || -> Result<Option<AlignedBuf>, ConvertError> {
            let mut r = reader.lock().map_err(|_| stopped())?;
            first = r.sector;
            let Some(p) = r.next(buf, opts)? else {
                return Ok(None);
            };
            if let Some(percent) = r.progress.take() {
                // The printing thread is gone only when it failed (and said so).
                let _ = report.send(percent);
            }
            let mut jobs: Vec<(Reservation, usize)> = Vec::new();
            let base = p.sector * SECTOR;
            let planned = {
                let mut d = dst.lock().map_err(|_| stopped())?;
                piece_runs(&p, opts, |off, run| match run {
                    Run::Zeros(len) => write_zeros(&mut **d, off, len, opts),
                    Run::Data(bytes) => {
                        let mut at = 0usize;
                        while at < bytes.len() {
                            let left = (bytes.len() - at) as u64;
                            match d.reserve(off + at as u64, left)? {
                                Reserve::Reserved(res) => {
                                    let n = res.len() as usize;
                                    jobs.push((res, (off - base) as usize + at));
                                    at += n;
                                }
                                Reserve::WriteFirst(n) => {
                                    let n = n.clamp(1, left) as usize;
                                    d.write_at(off + at as u64, &bytes[at..at + n])?;
                                    at += n;
                                }
                            }
                        }
                        Ok(())
                    }
                })
            };
            drop(r);
            let mut jobs = jobs.into_iter();
            let stored = planned.and_then(|()| {
                for (res, start) in jobs.by_ref() {
                    let at = res.guest();
                    let data = &p.buf[start..start + res.len() as usize];
                    let stored = {
                        let _one_at_a_time = store_lock.lock().map_err(|_| stopped())?;
                        pw.store(&res, data)
                    };
                    if let Err(e) = stored {
                        dst.lock().map_err(|_| stopped())?.cancel(res);
                        return Err(ConvertError(format!(
                            "error while writing at byte {at}: {e}"
                        )));
                    }
                    let mut d = dst.lock().map_err(|_| stopped())?;
                    d.commit(res).map_err(|e| {
                        ConvertError(format!("error while writing at byte {at}: {e}"))
                    })?;
                }
                Ok(())
            });
            if stored.is_err() {
                // What was reserved and not stored goes back.
                if let Ok(mut d) = dst.lock() {
                    for (res, _) in jobs {
                        d.cancel(res);
                    }
                }
            }
            stored.map(|()| Some(p.buf))
        };
        run().map_err(|e| (first, e))
    };
    let worker = |report: mpsc::Sender<f32>| -> Result<(), (u64, ConvertError)> {
        let mut buf = AlignedBuf::default();
        while !failed.load(Ordering::Relaxed) {
            match copy_one(buf, &report) {
                Ok(Some(b)) => buf = b,
                Ok(None) => return Ok(()),
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        Ok(())
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let report = report.clone();
                s.spawn(|| worker(report))
            })
            .collect();
        drop(report);
        // This thread prints the progress the workers make, until they are all done.
        let mut printed = Ok(());
        for percent in progress {
            if printed.is_ok() {
                printed = printer.print(percent);
                if printed.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
            }
        }
        let mut first_error: Option<(u64, ConvertError)> = None;
        for h in handles {
            let failed = match h.join() {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(_) => (u64::MAX, stopped()),
            };
            if first_error.as_ref().is_none_or(|(at, _)| failed.0 < *at) {
                first_error = Some(failed);
            }
        }
        match first_error {
            Some((_, e)) => Err(e),
            None => printed,
        }
    })
}

/// Most threads an uncompressed copy into a [`ParallelWriter`] runs.
const MAX_COPY_THREADS: usize = 4;

/// Uncompressed copy: this thread reads the pieces, a writer thread writes them in guest order, with up to
/// `opts.parallel` pieces (at most 4: 8 MiB) between them.
fn copy_pipelined(
    reader: &mut Reader<'_>,
    printer: &mut Printer<'_>,
    dst: &mut (dyn VirtualDiskWrite + Send),
    opts: &CopyOptions,
) -> Result<(), ConvertError> {
    if opts.parallel <= 1 {
        while let Some(p) = printer.next(reader, AlignedBuf::default(), opts)? {
            write_piece(dst, &p, opts)?;
        }
        return Ok(());
    }
    let depth = opts.parallel.min(4);
    std::thread::scope(|s| {
        let (to_writer, pieces) = mpsc::sync_channel::<Piece>(depth);
        let (give_back, returned) = mpsc::channel::<AlignedBuf>();
        let writer = s.spawn(move || -> Result<(), ConvertError> {
            for p in pieces {
                write_piece(dst, &p, opts)?;
                // The reader may have finished: then the buffer is dropped here.
                let _ = give_back.send(p.buf);
            }
            Ok(())
        });
        let mut spare = depth + 1;
        let read = (|| {
            loop {
                let buf = if spare > 0 {
                    spare -= 1;
                    AlignedBuf::default()
                } else {
                    match returned.recv() {
                        Ok(b) => b,
                        // The writer stopped (on an error it reports).
                        Err(_) => return Ok(()),
                    }
                };
                let Some(p) = printer.next(reader, buf, opts)? else {
                    return Ok(());
                };
                if to_writer.send(p).is_err() {
                    return Ok(());
                }
            }
        })();
        drop(to_writer);
        let wrote = writer
            .join()
            .map_err(|_| ConvertError("the writer thread stopped unexpectedly".to_string()))?;
        read.and(wrote)
    })
}

/// Most threads a compressed conversion compresses on.
const MAX_COMPRESS_THREADS: usize = 16;

/// Most bytes of source clusters a compressed conversion holds at once (twice this: the batch being
/// compressed and the next one being read).
const BATCH_BYTES: usize = 16 << 20;

/// Compressed copy, cluster by cluster in guest order. When the target's compressor may run on other
/// threads, batches of clusters are compressed on every core (at most `opts.parallel`) while the next batch
/// is read; the writes stay in guest order on this thread.
fn copy_compressed(
    reader: &mut Reader<'_>,
    printer: &mut Printer<'_>,
    dst: &mut (dyn VirtualDiskWrite + Send),
    opts: &CopyOptions,
) -> Result<(), ConvertError> {
    let step = (reader.plan.cluster * SECTOR) as usize;
    let compressor = dst.thread_compressor();
    let workers = match compressor {
        Some(_) => std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_COMPRESS_THREADS)
            .min(opts.parallel.max(1)),
        None => 1,
    };
    let batch_len = (workers * 4).min((BATCH_BYTES / step).max(workers));
    let next_batch =
        |reader: &mut Reader<'_>, printer: &mut Printer<'_>| -> Result<Vec<Piece>, ConvertError> {
            let mut batch = Vec::with_capacity(batch_len);
            let mut data = 0;
            while data < batch_len {
                let Some(p) = printer.next(reader, AlignedBuf::default(), opts)? else {
                    break;
                };
                if p.status == Status::Data {
                    data += 1;
                }
                batch.push(p);
            }
            Ok(batch)
        };
    let mut current = next_batch(reader, printer)?;
    while !current.is_empty() {
        let next = match compressor {
            Some(tc) if workers > 1 => {
                let mut todo: Vec<&mut Piece> = current
                    .iter_mut()
                    .filter(|p| p.status == Status::Data && !is_zero(&p.buf))
                    .collect();
                let per = todo.len().div_ceil(workers).max(1);
                std::thread::scope(|s| {
                    let handles: Vec<_> = todo
                        .chunks_mut(per)
                        .map(|part| {
                            s.spawn(move || {
                                for p in part.iter_mut() {
                                    p.compressed = Some(tc.compress(&p.buf));
                                }
                            })
                        })
                        .collect();
                    let next = next_batch(reader, printer);
                    for h in handles {
                        h.join().map_err(|_| {
                            ConvertError("a compression thread stopped unexpectedly".to_string())
                        })?;
                    }
                    next
                })?
            }
            _ => Vec::new(),
        };
        for p in &current {
            write_piece(dst, p, opts)?;
        }
        current = match compressor {
            Some(_) if workers > 1 => next,
            _ => next_batch(reader, printer)?,
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk in memory; as an output it records which clusters were written compressed.
    struct Mem {
        data: Vec<u8>,
        compressed: Vec<u64>,
    }

    impl VirtualDisk for Mem {
        fn virtual_size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
            let o = offset as usize;
            buf.copy_from_slice(&self.data[o..o + buf.len()]);
            Ok(())
        }
        fn map_extent(&mut self, offset: u64, max_len: u64) -> Result<MapExtent, DiskError> {
            // Whole 4 KiB blocks: data unless all zero.
            let o = offset as usize;
            let end = ((o / 4096 + 1) * 4096).min(o + max_len as usize);
            let zero = self.data[o..end].iter().all(|&b| b == 0);
            Ok(MapExtent {
                start: offset,
                length: (end - o) as u64,
                depth: 0,
                present: !zero,
                zero,
                data: !zero,
                compressed: false,
                offset: None,
                file: None,
            })
        }
    }

    impl VirtualDiskWrite for Mem {
        fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
            let o = offset as usize;
            self.data[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> Result<(), DiskError> {
            self.data[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
            self.write_zeroes(offset, len, true)
        }
        fn compressed_cluster_size(&self) -> Result<u64, DiskError> {
            Ok(4096)
        }
        fn write_compressed(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
            self.compressed.push(offset);
            self.write_at(offset, data)
        }
        fn flush(&mut self) -> Result<(), DiskError> {
            Ok(())
        }
        fn close(self: Box<Self>) -> Result<(), DiskError> {
            Ok(())
        }
    }

    #[test]
    fn copies_into_any_writable_disk() {
        let mut data = vec![0u8; 40_000];
        data[100..200].fill(7);
        data[20_000..30_000].fill(9);
        data[39_999] = 1;
        for compress in [false, true] {
            let mut src = Mem {
                data: data.clone(),
                compressed: Vec::new(),
            };
            let mut dst = Mem {
                data: vec![0u8; 40_448],
                compressed: Vec::new(),
            };
            let mut out = Vec::new();
            let opts = CopyOptions {
                compress,
                cache: CacheMode::WRITEBACK,
                ..CopyOptions::default()
            };
            let mut prog = Progress::new(false, 1.0);
            copy_guest_data(&mut src, &mut dst, opts, &mut prog, &mut out).unwrap();
            assert!(dst.data[..40_000] == data[..]);
            if compress {
                // Clusters 0, 4..7 and the last (partial) one hold data.
                assert_eq!(dst.compressed, [0, 16384, 20480, 24576, 28672, 36864]);
            } else {
                assert!(dst.compressed.is_empty());
            }
        }
    }

    fn sectors(pattern: &[u8]) -> Vec<u8> {
        pattern
            .iter()
            .flat_map(|&b| std::iter::repeat_n(b, 512))
            .collect()
    }

    #[test]
    fn zero_runs_align_like_qemu() {
        // 8 data sectors, 8 zero sectors: two aligned runs.
        let buf = sectors(&[1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(allocated_run(&buf, 16, 0, 8), (true, 8));
        assert_eq!(allocated_run(&buf[8 * 512..], 8, 8, 8), (false, 8));
        // A data run ending mid-block is extended to the block end.
        let buf = sectors(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(allocated_run(&buf, 16, 0, 8), (true, 8));
        // A zero run ending mid-block is cut back to the block start.
        let buf = sectors(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]);
        assert_eq!(allocated_run(&buf, 16, 0, 8), (false, 8));
        // A zero run that is only a block's tail is data.
        let buf = sectors(&[0, 0, 1, 1]);
        assert_eq!(allocated_run(&buf, 4, 5, 8), (true, 3));
        assert_eq!(allocated_run(&buf, 4, 6, 8), (false, 2));
    }

    #[test]
    fn short_zero_gaps_stay_in_the_write() {
        let buf = sectors(&[
            1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0,
        ]);
        assert_eq!(allocated_run_min(&buf, 32, 8, 0, 8), (true, 16));
        let buf = sectors(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(allocated_run_min(&buf, 16, 8, 0, 8), (false, 16));
    }
}
