//! Consistency check and repair of an image's metadata, as `qemu-img check` does them.
//!
//! [`check`] counts every reference to every host cluster of the image file (header, L1 tables, L2 tables,
//! data clusters, compressed data, refcount table and blocks, snapshot table and snapshot L1 tables, bitmap
//! directory and tables) and compares the counts with the refcounts on disk. [`repair`] does the same and
//! fixes what it may: `RepairMode::Leaks` lowers refcounts that are too high (zeroing the bytes of clusters
//! that become free, as QEMU's discard does) and fixes COPIED flags once the refcounts are known to be right;
//! `RepairMode::All` also raises refcounts that are too low, fixes COPIED flags in any case, clears
//! preallocated entries whose offset is unaligned, and when the refcount structure itself is broken (a used
//! cluster with refcount 0, a bad refcount table entry, a refcount block whose own refcount is not 1) writes a
//! new refcount table and blocks past the end of the image, makes them durable, and only then points the header
//! at them. A repair that leaves no corruption clears the dirty and corrupt bits.
//!
//! The counts follow QEMU's `qcow2_check_refcounts` rule for rule, so the numbers match `qemu-img check`; each
//! problem goes to the caller's [`CheckSink`] as a [`Problem`], whose `Display` is the line qemu-img prints.
//!
//! # Where this differs from QEMU
//!
//! - A rebuilt refcount structure goes after the end of the image (QEMU fills the first free clusters), so the
//!   image end offset after a rebuild can differ; the counts do not. QEMU's rebuild sometimes trips its own
//!   overlap check and fails (a refcount table entry with reserved bits, an unaligned refcount block); this
//!   one does not.
//! - A refcount block past the end of the file is repaired by the rebuild (QEMU grows the file to reach it).
//! - After a successful rebuild, refcounts of the old structure that could not be read are no longer check
//!   errors, so the dirty and corrupt bits are cleared (QEMU leaves them set).
//! - The snapshot table's own repairs (`qcow2_check_fix_snapshot_table`) are not done: a snapshot table that
//!   cannot be parsed is an error.
//! - Only the image's own file is read: a missing backing file does not stop the check.
//! - An L1 table with more entries pointing into the file than the file has clusters (the same L2 table named
//!   over and over) is an error rather than walked each time, so that the work stays near the file's size per
//!   L1 table.
//! - A `-r all` repair first makes sure that every table it may write entries into (the active L1 table, every
//!   L2 table an L1 table names) is used as that table only, not as the header, guest data, the refcount
//!   structure, a snapshot or bitmap structure or (an L2 table) inside the active L1 table; otherwise it reports
//!   the problems, sets the corrupt bit and fails without writing anything else ([`Problem::RepairOverlap`]).
//!   QEMU's overlap check stops its repair at the first such write, which may come after other writes.
//! - Like QEMU, a file of more than [`MAX_CHECK_CLUSTERS`] clusters is refused ([`FILE_TOO_LARGE`]). Below that,
//!   the counts stop past the last cluster any reference or refcount table entry reaches, and clusters that no
//!   refcount block covers are skipped by a scan of the counts, so a sparse file's apparent length costs little.
//!
//! ```
//! use qcow2_core::MemDevice;
//! use qcow2_core::check::{self, CheckSink, Problem, RepairMode};
//!
//! struct Print;
//! impl CheckSink for Print {
//!     fn report(&mut self, problem: Problem) {
//!         // e.g. "Leaked cluster 5 refcount=1 reference=0", as qemu-img prints it
//!         let _ = problem;
//!     }
//! }
//!
//! # fn main() -> Result<(), qcow2_core::Error<qcow2_core::io::MemDeviceFull>> {
//! let mut image = qcow2_core::testimage::tiny_qcow2();
//! let mut bounce = [0u8; 512];
//! let mut scratch = [0u8; 4096]; // 4 bytes per host cluster for one pass; less makes more passes
//! let report = check::check(&mut MemDevice::new(&image[..]), &mut bounce, &mut scratch, &mut Print)?;
//! assert_eq!(report.exit_code(), 0);
//! let mut dev = MemDevice::new(&mut image[..]);
//! let report = check::repair(&mut dev, &mut bounce, &mut scratch, RepairMode::Leaks, &mut Print)?;
//! assert_eq!(report.leaks_fixed, 0);
//! # Ok(()) }
//! ```
//!
//! # Memory
//!
//! The caller passes `scratch`; the counts take [`COUNT_BYTES`] bytes per host cluster. When `scratch` cannot
//! hold a count for every host cluster, the check works in passes over ranges of clusters and walks the
//! metadata again for each range, so the result is the same with any scratch (at least [`COUNT_BYTES`] bytes;
//! [`min_scratch_len`] for a refcount rebuild); [`scratch_len_for_one_pass`] says how much makes it one pass.
//! Each pass reads the L1 tables, each L2 table once per L1 entry that names it (at most the file's length per
//! L1 table), the refcount table and the bitmap tables; the comparison reads the refcount blocks once. Everything else
//! lives on the stack (a few KiB). The work is bounded by the image's validated sizes: the file's length, the
//! L1 sizes, the refcount table and the number of snapshots and bitmaps.

use core::fmt;
use core::ops::ControlFlow::{self, Break, Continue};

use crate::Error;
use crate::device::{BlockDevice, BlockDeviceWrite};
use crate::error::corrupt;
use crate::format::bitmap::{
    BitmapDirEntry, BitmapTableEntry, BitmapsExtension, DIR_ENTRY_LEN, DirectoryWalk,
};
use crate::format::{
    AutoclearFeatures, ClusterKind, ExtensionWalk, HEADER_READ_LEN, Header, IncompatibleFeatures,
    L1_RESERVED_MASK, L2_RESERVED_MASK, L2Entry, MAX_L1_BYTES, OFFSET_MASK, OFLAG_COPIED,
    OFLAG_ZERO, REFTABLE_OFFSET_MASK, SNAPSHOT_FIXED_LEN, SnapshotEntryLayout, be64, extension,
    field, refcount_get, refcount_location, refcount_set, refcount_slice_position,
};
use crate::io::{ceil_div, read_bytes, write_bytes};

mod access;
mod checker;
mod compare;
mod copied;
mod counts;
mod image;
mod overlap;
mod problems;
mod rebuild;
mod refcounts;
#[cfg(test)]
mod tests;
mod walk;

use access::{Access, ReadOnly, Writable};
use checker::Checker;
use counts::*;
use image::*;
pub use problems::{Problem, ShortName};
use refcounts::*;
use walk::*;

/// Bytes of `scratch` per host cluster (one saturating `u32` count).
pub const COUNT_BYTES: usize = 4;

/// Bytes of a refcount block that one count pass writes as a unit when rebuilding.
const PIECE: usize = 512;

/// Refcounts in one [`PIECE`] of a refcount block of refcount order `order`.
fn per_piece(order: u32) -> u64 {
    ((PIECE as u64) << 3) >> order
}

/// Metadata read granule (entries of L1, L2, refcount and bitmap tables are read this many bytes at a time).
const CHUNK: usize = 1024;

/// QEMU's limit on the host clusters of a checked image file (`INT_MAX`): a larger file is refused at once
/// ([`FILE_TOO_LARGE`]), as `qemu-img check` refuses it ("Check failed: File too large").
pub const MAX_CHECK_CLUSTERS: u64 = i32::MAX as u64;
/// The [`Error::Unsupported`] `what` of a file with more than [`MAX_CHECK_CLUSTERS`] host clusters.
pub const FILE_TOO_LARGE: &str = "File too large";
/// Counting ranges up to this many host clusters are not cut to what the image references (see
/// [`Checker::count_end`]): finding the cut costs a walk of the metadata.
const UNCUT_COUNT_CLUSTERS: u64 = 1 << 20;
/// Longest snapshot id or name a [`Problem`] carries (longer ones are cut).
pub const SNAPSHOT_NAME_LEN: usize = 32;

/// What `repair` may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RepairMode {
    /// Lower refcounts that are higher than the references (`qemu-img check -r leaks`).
    Leaks,
    /// Everything: leaks, refcounts too low, COPIED flags, broken refcount structure (`-r all`).
    All,
}

/// Where [`check`] and [`repair`] send each problem as they find it.
pub trait CheckSink {
    /// One problem (or repair), in the order qemu-img prints them.
    fn report(&mut self, problem: Problem);
}

/// A sink that drops every problem (only the counts of the [`CheckReport`] are wanted).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSink;

impl CheckSink for NoSink {
    fn report(&mut self, _problem: Problem) {}
}

/// The result of a check, with qemu-img's fields. After a repair it describes the image after the repair,
/// with what was fixed in `corruptions_fixed` and `leaks_fixed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CheckReport {
    /// Corruptions found (and not repaired).
    pub corruptions: u64,
    /// Leaked clusters found (and not repaired).
    pub leaks: u64,
    /// Errors that kept the check from looking at something.
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaked clusters repaired.
    pub leaks_fixed: u64,
    /// One past the last byte of the last used host cluster.
    pub image_end_offset: u64,
    /// Virtual size in clusters.
    pub total_clusters: u64,
    /// Allocated guest clusters of the active L1 (compressed, data and preallocated zero).
    pub allocated_clusters: u64,
    /// Allocated guest clusters not contiguous with the previous one of their L2 table (all compressed ones).
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// Counting passes over the metadata (1 when the scratch held every cluster).
    pub passes: u32,
    /// Whether the refcount structure was rebuilt.
    pub rebuilt: bool,
}

impl CheckReport {
    /// qemu-img's exit code for this report: 0 clean, 1 check errors, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// Bytes of scratch below which [`repair`] cannot rebuild the refcount structure of the image of `dev` (the
/// counts of one 512-byte piece of a refcount block: `(4096 >> refcount_order) * 4`, at most 16 KiB). [`check`]
/// and repairs that need no rebuild work with any scratch of at least [`COUNT_BYTES`].
pub fn min_scratch_len<D: BlockDevice>(
    dev: &mut D,
    bounce: &mut [u8],
) -> Result<usize, Error<D::Error>> {
    let image = load_image(&mut ReadOnly(dev), bounce)?;
    Ok((per_piece(image.header.refcount_order) as usize).saturating_mul(COUNT_BYTES))
}

/// Bytes of scratch with which [`check`] and [`repair`] work in one pass over the image of `dev`, even when
/// they rebuild its refcount structure.
pub fn scratch_len_for_one_pass<D: BlockDevice>(
    dev: &mut D,
    bounce: &mut [u8],
) -> Result<usize, Error<D::Error>> {
    let g = load_image(&mut ReadOnly(dev), bounce)?;
    let per_piece = per_piece(g.header.refcount_order);
    let per_block = 1u64 << g.header.refcount_block_bits();
    if g.file_clusters > MAX_CHECK_CLUSTERS {
        return Ok(COUNT_BYTES);
    }
    // Counting covers what the image can make non-zero (Checker::count_end). A file whose tail is cut off that
    // way is mostly sparse: a rebuild of its refcount structure, should it need one, works in passes.
    let count_end = {
        let mut sink = NoSink;
        let mut ctx = Checker {
            io: ReadOnly(&mut *dev),
            bounce: &mut *bounce,
            image: g,
            sink: &mut sink,
            signalled: false,
        };
        ctx.count_end()?
    };
    if count_end <= g.file_clusters {
        let clusters = count_end.saturating_add(1).next_multiple_of(per_piece);
        return Ok(
            usize::try_from(clusters.saturating_mul(COUNT_BYTES as u64)).unwrap_or(usize::MAX)
        );
    }
    // Counting covers file_clusters + 1 clusters; a rebuild covers whole refcount blocks past the new structure.
    let start = g.file_clusters.saturating_add(1);
    let mut blocks = 1u64;
    for _ in 0..64 {
        let table = ceil_div(blocks.saturating_mul(8), g.header.cluster_size());
        let b = ceil_div(
            start.saturating_add(blocks).saturating_add(table),
            per_block,
        );
        if b == blocks {
            break;
        }
        blocks = b;
    }
    let clusters = blocks
        .saturating_mul(per_block)
        .max(start)
        .saturating_add(1)
        .next_multiple_of(per_piece);
    Ok(usize::try_from(clusters.saturating_mul(COUNT_BYTES as u64)).unwrap_or(usize::MAX))
}

/// Checks the image on `dev` (its own file only: no backing file or data file is needed) the way
/// `qemu-img check` does, sending each problem to `sink`.
///
/// `bounce` is one device block; `scratch` holds the reference counts ([`COUNT_BYTES`] per host cluster;
/// smaller buffers make more passes, see the module documentation).
pub fn check<D: BlockDevice>(
    dev: &mut D,
    bounce: &mut [u8],
    scratch: &mut [u8],
    sink: &mut dyn CheckSink,
) -> Result<CheckReport, Error<D::Error>> {
    let mut io = ReadOnly(dev);
    let image = load_image(&mut io, bounce)?;
    let mut ctx = Checker {
        io,
        bounce,
        image,
        sink,
        signalled: false,
    };
    ctx.run(scratch, None)
}

/// Checks and repairs once, as `qemu-img check -r` does before it double-checks: the report counts what was
/// found and what was fixed in this one run. [`repair`] adds the second check.
pub fn repair_once<D: BlockDeviceWrite>(
    dev: &mut D,
    bounce: &mut [u8],
    scratch: &mut [u8],
    mode: RepairMode,
    sink: &mut dyn CheckSink,
) -> Result<CheckReport, Error<D::Error>> {
    let mut io = Writable(dev);
    let image = load_image(&mut io, bounce)?;
    let mut ctx = Checker {
        io,
        bounce,
        image,
        sink,
        signalled: false,
    };
    ctx.run(scratch, Some(mode))
}

/// Repairs what `mode` allows, then (if anything was fixed) checks the image again like qemu-img: the report
/// describes the image after the repair, with `corruptions_fixed` and `leaks_fixed` from the repair.
///
/// A rebuilt refcount structure goes after the last used cluster and is durable before the header points at
/// it, so a crash during the repair leaves the old structure in place.
pub fn repair<D: BlockDeviceWrite>(
    dev: &mut D,
    bounce: &mut [u8],
    scratch: &mut [u8],
    mode: RepairMode,
    sink: &mut dyn CheckSink,
) -> Result<CheckReport, Error<D::Error>> {
    let first = repair_once(dev, bounce, scratch, mode, sink)?;
    if first.corruptions_fixed == 0 && first.leaks_fixed == 0 {
        return Ok(first);
    }
    let mut again = check(dev, bounce, scratch, sink)?;
    again.corruptions_fixed = first.corruptions_fixed;
    again.leaks_fixed = first.leaks_fixed;
    again.rebuilt = first.rebuilt;
    again.passes = again.passes.saturating_add(first.passes);
    Ok(again)
}
