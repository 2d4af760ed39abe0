//! `qemu-img convert`: copy the guest view of one or more disks into another, the way qemu-img does it.
//!
//! The copy itself ([`copy_guest_data`]) follows qemu-img's loop: the source is walked by block status
//! (`read`: data, zeros, or "leave it to the target's backing file"), data is read in 2 MiB pieces and
//! written where it is not zeros (`write`: `-S`), zero runs are left as holes when the target already reads
//! as zeros and written as zeros otherwise. Reading and writing overlap (`copy`): workers read in guest
//! order and store data into the target in parallel; with `-c`, batches of clusters are compressed on every
//! core. Any writable output plugs in through [`VirtualDiskWrite`]: [`convert`] creates a sparse raw file or
//! a new qcow2 image (or opens an existing target with `-n`) and copies into it.
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};

use crate::aligned::AlignedBuf;
use crate::cache::CacheMode;
use crate::cli::progress::Progress;
use crate::disk::{
    BitmapChange, DirtyRunSink, DiskError, MapExtent, ParallelWriter, Reservation, Reserve,
    VirtualDisk, VirtualDiskWrite, write_compressed_range,
};
use crate::raw_disk::RawDisk;

pub(super) mod args;
mod copy;
mod read;
#[cfg(test)]
mod tests;
mod write;

use copy::*;
pub use read::Sources;
use read::*;
use write::*;

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

/// What went wrong in a conversion: the one-line message after "prog: ".
#[derive(Debug)]
pub struct ConvertError(pub String);

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

/// `--bitmaps`: the source's persistent bitmaps to copy after the data (name, granularity, enabled).
pub type CopiedBitmaps = Vec<(String, u64, bool)>;

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
    opts: CopyOptions,
    out: &mut dyn Write,
) -> Result<(), ConvertError> {
    convert_with_bitmaps(src, dst, target, opts, None, out)
}

/// [`convert`], then (`--bitmaps`) the source's persistent bitmaps `bitmaps` added to the target with the
/// source's bits; a target that cannot hold bitmaps is refused before anything is copied.
pub fn convert_with_bitmaps(
    src: &mut (dyn VirtualDisk + Send),
    dst: &str,
    target: &Target,
    mut opts: CopyOptions,
    bitmaps: Option<CopiedBitmaps>,
    out: &mut dyn Write,
) -> Result<(), ConvertError> {
    let size = src.virtual_size().div_ceil(SECTOR) * SECTOR;
    let mut prog = Progress::new(opts.progress, 1.0);
    let io = |e: std::io::Error| ConvertError(format!("{dst}: {}", DiskError::os_text(&e)));
    prog.print(0.0, 100, out).map_err(io)?;
    let mut disk = open_target(dst, target, size, &mut opts)?;
    if bitmaps.is_some() {
        let (format, supported) = disk.bitmap_support();
        if !supported {
            let _ = disk.close();
            return Err(ConvertError(format!(
                "Format driver '{format}' does not support bitmaps"
            )));
        }
    }
    copy_guest_data(src, disk.as_mut(), opts, &mut prog, out)?;
    // `--bitmaps`: each bitmap added to the target as the source has it, then given the source's bits.
    for (name, granularity, enabled) in bitmaps.unwrap_or_default() {
        let node = dst.to_string();
        let change = |e: DiskError| ConvertError(e.0);
        disk.bitmap_change(
            &name,
            &node,
            BitmapChange::Add {
                granularity: Some(granularity),
            },
        )
        .map_err(change)?;
        if !enabled {
            disk.bitmap_change(&name, &node, BitmapChange::Disable)
                .map_err(change)?;
        }
        let mut feed = |sink: &mut DirtyRunSink<'_>| src.bitmap_dirty_runs(&name, sink);
        disk.bitmap_change(&name, &node, BitmapChange::MergeRuns(&mut feed))
            .map_err(change)?;
    }
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
