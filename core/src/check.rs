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

use crate::Error;
use crate::device::{BlockDevice, BlockDeviceWrite};
use crate::format::bitmap::{
    BitmapDirEntry, BitmapTableEntry, BitmapsExtension, DIR_ENTRY_LEN, DirectoryWalk,
};
use crate::format::{
    AutoclearFeatures, ExtensionWalk, HEADER_READ_LEN, Header, IncompatibleFeatures,
    L1_RESERVED_MASK, L2_RESERVED_MASK, MAX_L1_BYTES, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
    OFLAG_ZERO, REFTABLE_OFFSET_MASK, REFTABLE_RESERVED_MASK, be32, be64, extension, refcount_get,
    refcount_set,
};
use crate::io::{ceil_div, read_bytes, write_bytes};

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

/// QEMU's limit on a snapshot table's size.
const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 * 1024 * 1024;
/// QEMU's limit on a snapshot entry's extra data.
const MAX_SNAPSHOT_EXTRA: u32 = 1024;
/// QEMU's limit on the host clusters of a checked image file (`INT_MAX`): a larger file is refused at once
/// ([`FILE_TOO_LARGE`]), as `qemu-img check` refuses it ("Check failed: File too large").
pub const MAX_CHECK_CLUSTERS: u64 = i32::MAX as u64;
/// The [`Error::Unsupported`] `what` of a file with more than [`MAX_CHECK_CLUSTERS`] host clusters.
pub const FILE_TOO_LARGE: &str = "File too large";
/// Counting ranges up to this many host clusters are not cut to what the image references (see
/// [`Ctx::count_end`]): finding the cut costs a walk of the metadata.
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

/// A snapshot's id or name as a [`Problem`] carries it (at most [`SNAPSHOT_NAME_LEN`] bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ShortName {
    bytes: [u8; SNAPSHOT_NAME_LEN],
    len: u8,
}

impl ShortName {
    /// The name as text (`?` for bytes that are not UTF-8).
    pub fn as_str(&self) -> &str {
        let b = self.bytes.get(..usize::from(self.len)).unwrap_or(&[]);
        core::str::from_utf8(b).unwrap_or("?")
    }
}

impl fmt::Debug for ShortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for ShortName {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "{=str}", self.as_str())
    }
}

/// One problem found (or repaired). `Display` gives the line `qemu-img check` prints for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Problem {
    /// Host cluster `cluster` has a refcount higher than its references (a leak).
    Leaked {
        /// Host cluster index.
        cluster: u64,
        /// Refcount on disk.
        refcount: u64,
        /// References counted.
        references: u64,
    },
    /// Host cluster `cluster` has a refcount lower than its references (refcount 0 included).
    RefcountTooLow {
        /// Host cluster index.
        cluster: u64,
        /// Refcount on disk.
        refcount: u64,
        /// References counted.
        references: u64,
    },
    /// The refcount of host cluster `cluster` is being set to its number of references.
    Repairing {
        /// Host cluster index.
        cluster: u64,
        /// Refcount on disk before the repair.
        refcount: u64,
        /// References counted (the new refcount).
        references: u64,
    },
    /// More references to a cluster than its refcount width can count.
    RefcountOverflow {
        /// Host offset of the cluster.
        offset: u64,
    },
    /// A structure ends one cluster or more past the end of the file.
    PastEndOfFile {
        /// Host offset of the structure.
        offset: u64,
        /// Its length in bytes.
        size: u64,
    },
    /// An L1 entry with reserved bits set.
    L1ReservedBits {
        /// The entry.
        entry: u64,
    },
    /// An L1 entry whose L2 table offset is not cluster-aligned.
    L2TableUnaligned {
        /// The L2 table offset.
        l2_offset: u64,
    },
    /// A standard L2 entry with reserved bits set.
    L2ReservedBits {
        /// The entry.
        entry: u64,
    },
    /// A compressed L2 entry with the COPIED flag.
    CompressedCopied {
        /// Host offset of the compressed data.
        coffset: u64,
    },
    /// A compressed L2 entry in an image with an external data file.
    CompressedWithDataFile {
        /// Index of the entry in its L2 table.
        index: u64,
        /// The entry.
        entry: u64,
    },
    /// A compressed extended L2 entry with a non-zero subcluster bitmap.
    CompressedWithBitmap {
        /// Index of the entry in its L2 table.
        index: u64,
        /// The entry.
        entry: u64,
    },
    /// An allocated extended L2 entry with a subcluster both allocated and zero.
    BadSubclusterBitmap {
        /// The entry's host offset.
        offset: u64,
    },
    /// An unallocated extended L2 entry with allocated subclusters.
    UnallocatedWithBitmap,
    /// A preallocated zero cluster whose host offset is not cluster-aligned (repairs clear the entry).
    PreallocatedUnaligned {
        /// The host offset.
        offset: u64,
        /// Whether it is being repaired.
        repairing: bool,
    },
    /// A data cluster whose host offset is not cluster-aligned.
    DataUnaligned {
        /// The host offset.
        offset: u64,
    },
    /// Internal snapshots in an image with an external data file.
    SnapshotsWithDataFile {
        /// Number of snapshots.
        count: u32,
    },
    /// A snapshot whose L1 table offset is not cluster-aligned.
    SnapshotL1Unaligned {
        /// The snapshot's id.
        id: ShortName,
        /// The snapshot's name.
        name: ShortName,
        /// Its L1 table offset.
        l1_offset: u64,
    },
    /// A snapshot whose L1 table is larger than 32 MiB.
    SnapshotL1TooLarge {
        /// The snapshot's id.
        id: ShortName,
        /// The snapshot's name.
        name: ShortName,
        /// Its L1 size (entries).
        l1_size: u32,
    },
    /// A refcount table entry with reserved bits set.
    RefcountTableReservedBits {
        /// Index of the entry.
        index: u64,
    },
    /// A refcount table entry whose refcount block offset is not cluster-aligned.
    RefcountBlockUnaligned {
        /// Index of the entry.
        index: u64,
    },
    /// A refcount block past the end of the file.
    RefcountBlockOutside {
        /// Index of the refcount table entry.
        index: u64,
        /// Whether it is being repaired (by rebuilding the refcount structure).
        repairing: bool,
    },
    /// A refcount block whose own refcount (as counted) is not 1.
    RefcountBlockRefcount {
        /// Index of the refcount table entry.
        index: u64,
        /// Its counted references.
        refcount: u64,
    },
    /// The refcount of a cluster could not be read (its refcount block offset is unaligned).
    RefcountUnreadable {
        /// Host cluster index.
        cluster: u64,
    },
    /// The refcount structure is being rebuilt.
    Rebuilding,
    /// The refcount structure needs a rebuild that the repair mode does not allow.
    NeedsRebuild,
    /// The rebuilt refcount structure still has problems.
    RebuildStillBroken,
    /// COPIED flag of an active L1 entry does not match its L2 table's refcount.
    CopiedL1 {
        /// Index in the active L1 table.
        l1_index: u64,
        /// The entry.
        l1_entry: u64,
        /// The L2 table's refcount.
        refcount: u64,
        /// Whether it is being repaired.
        repairing: bool,
    },
    /// COPIED flag of an active L2 entry does not match its data cluster's refcount.
    CopiedL2 {
        /// The entry.
        l2_entry: u64,
        /// The data cluster's refcount.
        refcount: u64,
        /// Whether it is being repaired.
        repairing: bool,
    },
    /// QEMU's corruption event for a refcount block offset that is not cluster-aligned (printed once).
    RefcountBlockOffsetUnaligned {
        /// The refcount block offset.
        offset: u64,
        /// Index of the refcount table entry.
        index: u64,
        /// Whether the image is writable, so that it gets marked corrupt.
        marking: bool,
    },
    /// A repair would write table entries into a cluster that the image also uses as something else (the
    /// header, the active L1 table, guest data, the refcount structure, a snapshot or bitmap structure): the
    /// repair is refused before anything is written, and the image is marked corrupt, as QEMU's overlap check
    /// stops its repair.
    RepairOverlap {
        /// Host offset of the cluster.
        offset: u64,
        /// What the repair would have written there.
        table: &'static str,
    },
    /// The bitmap directory or a bitmap table is unusable (qemu-img counts it without a message).
    BitmapCorrupt {
        /// Host offset of the structure.
        offset: u64,
    },
}

impl Problem {
    /// Whether qemu-img prints a line for this problem (bitmap problems are counted silently).
    pub fn has_message(&self) -> bool {
        !matches!(self, Problem::BitmapCorrupt { .. })
    }
}

fn verb(repairing: bool) -> &'static str {
    if repairing { "Repairing" } else { "ERROR" }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Problem::Leaked {
                cluster,
                refcount,
                references,
            } => write!(
                f,
                "Leaked cluster {cluster} refcount={refcount} reference={references}"
            ),
            Problem::RefcountTooLow {
                cluster,
                refcount,
                references,
            } => write!(
                f,
                "ERROR cluster {cluster} refcount={refcount} reference={references}"
            ),
            Problem::Repairing {
                cluster,
                refcount,
                references,
            } => write!(
                f,
                "Repairing cluster {cluster} refcount={refcount} reference={references}"
            ),
            Problem::RefcountOverflow { offset } => write!(
                f,
                "ERROR: overflow cluster offset={offset:#x}\nUse qemu-img amend to increase the refcount \
                 entry width or qemu-img convert to create a clean copy if the image cannot be opened for \
                 writing"
            ),
            Problem::PastEndOfFile { offset, size } => write!(
                f,
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: \
                 offset {offset:#x} size {size:#x}"
            ),
            Problem::L1ReservedBits { entry } => {
                write!(f, "ERROR found L1 entry with reserved bits set: {entry:x}")
            }
            Problem::L2TableUnaligned { l2_offset } => write!(
                f,
                "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"
            ),
            Problem::L2ReservedBits { entry } => {
                write!(f, "ERROR found l2 entry with reserved bits set: {entry:x}")
            }
            Problem::CompressedCopied { coffset } => write!(
                f,
                "ERROR: coffset={coffset:#x}: copied flag must never be set for compressed clusters"
            ),
            Problem::CompressedWithDataFile { index, entry } => write!(
                f,
                "ERROR compressed cluster {index} with data file, entry={entry:#x}"
            ),
            Problem::CompressedWithBitmap { index, entry } => write!(
                f,
                "ERROR compressed cluster {index} with non-zero subcluster allocation bitmap, \
                 entry={entry:#x}"
            ),
            Problem::BadSubclusterBitmap { offset } => write!(
                f,
                "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
            ),
            Problem::UnallocatedWithBitmap => write!(
                f,
                "ERROR: Unallocated cluster has non-zero subcluster allocation map"
            ),
            Problem::PreallocatedUnaligned { offset, repairing } => write!(
                f,
                "{} offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.",
                verb(repairing)
            ),
            Problem::DataUnaligned { offset } => write!(
                f,
                "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."
            ),
            Problem::SnapshotsWithDataFile { count } => {
                write!(f, "ERROR {count} snapshots in image with data file")
            }
            Problem::SnapshotL1Unaligned {
                id,
                name,
                l1_offset,
            } => write!(
                f,
                "ERROR snapshot {} ({}) l1_offset={l1_offset:#x}: L1 table is not cluster aligned; snapshot \
                 table entry corrupted",
                id.as_str(),
                name.as_str()
            ),
            Problem::SnapshotL1TooLarge { id, name, l1_size } => write!(
                f,
                "ERROR snapshot {} ({}) l1_size={l1_size:#x}: L1 table is too large; snapshot table entry \
                 corrupted",
                id.as_str(),
                name.as_str()
            ),
            Problem::RefcountTableReservedBits { index } => write!(
                f,
                "ERROR refcount table entry {index} has reserved bits set"
            ),
            Problem::RefcountBlockUnaligned { index } => write!(
                f,
                "ERROR refcount block {index} is not cluster aligned; refcount table entry corrupted"
            ),
            Problem::RefcountBlockOutside { index, repairing } => write!(
                f,
                "{} refcount block {index} is outside image",
                verb(repairing)
            ),
            Problem::RefcountBlockRefcount { index, refcount } => {
                write!(f, "ERROR refcount block {index} refcount={refcount}")
            }
            Problem::RefcountUnreadable { cluster } => write!(
                f,
                "Can't get refcount for cluster {cluster}: Input/output error"
            ),
            Problem::Rebuilding => write!(f, "Rebuilding refcount structure"),
            Problem::NeedsRebuild => write!(f, "ERROR need to rebuild refcount structures"),
            Problem::RebuildStillBroken => {
                write!(f, "ERROR rebuilt refcount structure is still broken")
            }
            Problem::CopiedL1 {
                l1_index,
                l1_entry,
                refcount,
                repairing,
            } => write!(
                f,
                "{} OFLAG_COPIED L2 cluster: l1_index={l1_index} l1_entry={l1_entry:x} refcount={refcount}",
                verb(repairing)
            ),
            Problem::CopiedL2 {
                l2_entry,
                refcount,
                repairing,
            } => write!(
                f,
                "{} OFLAG_COPIED data cluster: l2_entry={l2_entry:x} refcount={refcount}",
                verb(repairing)
            ),
            Problem::RepairOverlap { offset, table } => write!(
                f,
                "qcow2: Marking image as corrupt: Preventing invalid write on metadata (the {table} at \
                 {offset:#x} overlaps with other data or metadata); the repair was not started"
            ),
            Problem::RefcountBlockOffsetUnaligned {
                offset,
                index,
                marking,
            } => {
                if marking {
                    f.write_str("qcow2: Marking image as corrupt: ")?;
                } else {
                    f.write_str("qcow2: Image is corrupt: ")?;
                }
                write!(f, "Refblock offset {offset:#x} unaligned (reftable index: ")?;
                // C's %#x prints 0 without the prefix.
                if index == 0 {
                    f.write_str("0")?;
                } else {
                    write!(f, "{index:#x}")?;
                }
                if marking {
                    f.write_str("); further corruption events will be suppressed")
                } else {
                    f.write_str("); further non-fatal corruption events will be suppressed")
                }
            }
            Problem::BitmapCorrupt { offset } => {
                write!(f, "ERROR bitmap metadata at {offset:#x} is corrupted")
            }
        }
    }
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

/// The device access the check needs: reads always, writes only when repairing.
trait Access {
    type E: fmt::Debug;
    fn size(&mut self) -> Result<u64, Error<Self::E>>;
    fn read(&mut self, bounce: &mut [u8], at: u64, buf: &mut [u8]) -> Result<(), Error<Self::E>>;
    fn write(&mut self, bounce: &mut [u8], at: u64, buf: &[u8]) -> Result<(), Error<Self::E>>;
    fn flush(&mut self) -> Result<(), Error<Self::E>>;
    fn writable(&self) -> bool;
}

struct ReadOnly<'a, D>(&'a mut D);

impl<D: BlockDevice> Access for ReadOnly<'_, D> {
    type E = D::Error;
    fn size(&mut self) -> Result<u64, Error<D::Error>> {
        Ok(self.0.size()?)
    }
    fn read(&mut self, bounce: &mut [u8], at: u64, buf: &mut [u8]) -> Result<(), Error<D::Error>> {
        read_bytes(self.0, bounce, at, buf)
    }
    fn write(&mut self, _: &mut [u8], _: u64, _: &[u8]) -> Result<(), Error<D::Error>> {
        Err(Error::ReadOnly)
    }
    fn flush(&mut self) -> Result<(), Error<D::Error>> {
        Err(Error::ReadOnly)
    }
    fn writable(&self) -> bool {
        false
    }
}

struct Writable<'a, D>(&'a mut D);

impl<D: BlockDeviceWrite> Access for Writable<'_, D> {
    type E = D::Error;
    fn size(&mut self) -> Result<u64, Error<D::Error>> {
        Ok(self.0.size()?)
    }
    fn read(&mut self, bounce: &mut [u8], at: u64, buf: &mut [u8]) -> Result<(), Error<D::Error>> {
        read_bytes(self.0, bounce, at, buf)
    }
    fn write(&mut self, bounce: &mut [u8], at: u64, buf: &[u8]) -> Result<(), Error<D::Error>> {
        write_bytes(self.0, bounce, at, buf)
    }
    fn flush(&mut self) -> Result<(), Error<D::Error>> {
        Ok(self.0.flush()?)
    }
    fn writable(&self) -> bool {
        true
    }
}

/// What the check needs to know about the image, from its header.
#[derive(Debug, Clone, Copy)]
struct Geo {
    h: Header,
    cs: u64,
    cb: u32,
    file_len: u64,
    /// Host clusters of the file (the last one may be partial).
    nb_file: u64,
    l2_entries: u64,
    /// Bytes per L2 entry.
    es: u64,
    extended: bool,
    external: bool,
    refcount_max: u64,
    order: u32,
    /// log2 of the refcounts per refcount block.
    block_bits: u32,
    reftable_entries: u64,
    snapshots_size: u64,
    /// Bitmaps extension: (number of bitmaps, directory size, directory offset).
    bitmaps: Option<BitmapsExtension>,
}

fn corrupt<E>(what: &'static str, offset: u64) -> Error<E> {
    Error::Corrupt { what, offset }
}

/// An L1 table with more entries pointing into the file than the file has clusters: some L2 table is
/// referenced again and again. QEMU would walk it each time; the check stops instead of spending time
/// proportional to the L1 size times the cluster size.
fn too_many_l2<E>(l1_offset: u64) -> Error<E> {
    corrupt(
        "L1 table references more L2 tables than the image file holds",
        l1_offset,
    )
}

/// `x` rounded up to a multiple of 8.
fn align8(x: u64) -> u64 {
    x.checked_next_multiple_of(8).unwrap_or(u64::MAX)
}

fn load<A: Access>(io: &mut A, bounce: &mut [u8]) -> Result<Geo, Error<A::E>> {
    let file_len = io.size()?;
    let mut first = [0u8; HEADER_READ_LEN];
    let n = usize::try_from(file_len)
        .unwrap_or(usize::MAX)
        .min(HEADER_READ_LEN);
    let head = first.get_mut(..n).unwrap_or(&mut []);
    io.read(bounce, 0, head)?;
    let h = Header::parse(head).map_err(Error::from_format)?;
    let unknown = h.unknown_incompatible();
    if unknown != 0 {
        return Err(Error::UnknownIncompatibleFeature {
            bit: unknown.trailing_zeros() as u8,
            name: crate::format::FeatureName::EMPTY,
        });
    }
    let cs = h.cluster_size();
    let cb = h.cluster_bits;
    let order = h.refcount_order;
    let refcount_max = if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)).saturating_sub(1)
    };
    let mut geo = Geo {
        h,
        cs,
        cb,
        file_len,
        nb_file: ceil_div(file_len, cs),
        l2_entries: h.l2_entries(),
        es: h.l2_entry_size(),
        extended: h.extended_l2(),
        external: h
            .incompatible_features
            .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE),
        refcount_max,
        order,
        block_bits: cb.saturating_add(3).saturating_sub(order),
        reftable_entries: u64::from(h.refcount_table_clusters) << cb.saturating_sub(3),
        snapshots_size: 0,
        bitmaps: None,
    };
    // Snapshot table: its size is the sum of its entries.
    let mut at = h.snapshots_offset;
    for _ in 0..h.nb_snapshots {
        let (next, _) = read_snapshot(io, bounce, &geo, at)?;
        at = next;
    }
    geo.snapshots_size = at.saturating_sub(h.snapshots_offset);
    // Header extensions: the same walk and the same validation as the engine's open, so that the check sees
    // the bitmaps that the image holds (and refuses what QEMU's open refuses).
    let mut walk = ExtensionWalk::new(&h);
    while let Some(off) = walk.next_at() {
        let mut raw = [0u8; 8];
        io.read(bounce, off, &mut raw)?;
        let Some(ext) = walk.advance(raw).map_err(Error::from_format)? else {
            break;
        };
        if ext.magic != extension::BITMAPS {
            continue;
        }
        if ext.len != BitmapsExtension::LEN {
            return Err(Error::InvalidHeader {
                field: "bitmaps extension length",
                value: ext.len.into(),
                problem: "must be 24",
            });
        }
        if !h.autoclear_features.contains(AutoclearFeatures::BITMAPS) {
            continue;
        }
        let mut b = [0u8; 24];
        io.read(bounce, ext.data_at, &mut b)?;
        let bitmaps =
            BitmapsExtension::parse(&b, cs, ext.header_at).map_err(|(problem, value)| {
                Error::InvalidHeader {
                    field: "bitmaps extension",
                    value,
                    problem,
                }
            })?;
        let mut dir = DirectoryWalk::new(&bitmaps, cs, h.size);
        let invalid = |(problem, value)| Error::InvalidHeader {
            field: "bitmap directory entry",
            value,
            problem,
        };
        while let Some(at) = dir.next_at() {
            let mut raw = [0u8; DIR_ENTRY_LEN];
            io.read(bounce, at, &mut raw)?;
            dir.advance(&raw).map_err(invalid)?;
        }
        dir.finish().map_err(invalid)?;
        geo.bitmaps = Some(bitmaps);
    }
    Ok(geo)
}

/// A snapshot table entry's facts the check uses.
#[derive(Clone, Copy)]
struct Snap {
    l1_offset: u64,
    l1_size: u32,
    id_at: u64,
    id_len: u32,
    name_at: u64,
    name_len: u32,
}

/// Reads the snapshot entry at `at`; returns the offset of the next one and the entry.
fn read_snapshot<A: Access>(
    io: &mut A,
    bounce: &mut [u8],
    geo: &Geo,
    at: u64,
) -> Result<(u64, Snap), Error<A::E>> {
    let mut fixed = [0u8; 40];
    io.read(bounce, at, &mut fixed)?;
    let lens = be32(&fixed, 12);
    let id_len = lens >> 16;
    let name_len = lens & 0xffff;
    let extra = be32(&fixed, 36);
    if extra > MAX_SNAPSHOT_EXTRA {
        return Err(corrupt(
            "snapshot table entry has more than 1024 bytes of extra data",
            at,
        ));
    }
    let id_at = at.saturating_add(40).saturating_add(extra.into());
    let name_at = id_at.saturating_add(id_len.into());
    let next = align8(name_at.saturating_add(name_len.into()));
    if next.saturating_sub(geo.h.snapshots_offset) > MAX_SNAPSHOT_TABLE_BYTES {
        return Err(corrupt("snapshot table is larger than 64 MiB", at));
    }
    Ok((
        next,
        Snap {
            l1_offset: be64(&fixed, 0),
            l1_size: be32(&fixed, 8),
            id_at,
            id_len,
            name_at,
            name_len,
        },
    ))
}

fn short_name<A: Access>(
    io: &mut A,
    bounce: &mut [u8],
    at: u64,
    len: u32,
) -> Result<ShortName, Error<A::E>> {
    let mut n = ShortName {
        bytes: [0; SNAPSHOT_NAME_LEN],
        len: 0,
    };
    let l = (len as usize).min(SNAPSHOT_NAME_LEN);
    io.read(bounce, at, n.bytes.get_mut(..l).unwrap_or(&mut []))?;
    n.len = l as u8;
    Ok(n)
}

/// QEMU's cluster types (`qcow2_get_cluster_type`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ty {
    Compressed,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Unallocated,
}

fn cluster_type(geo: &Geo, word: u64) -> Ty {
    if word & OFLAG_COMPRESSED != 0 {
        Ty::Compressed
    } else if word & OFLAG_ZERO != 0 && !geo.extended {
        if word & OFFSET_MASK != 0 {
            Ty::ZeroAlloc
        } else {
            Ty::ZeroPlain
        }
    } else if word & OFFSET_MASK == 0 {
        if geo.external && word & OFLAG_COPIED != 0 {
            Ty::Normal
        } else {
            Ty::Unallocated
        }
    } else {
        Ty::Normal
    }
}

/// Counters of one check run.
#[derive(Debug, Clone, Copy, Default)]
struct Res {
    corruptions: u64,
    leaks: u64,
    check_errors: u64,
    corruptions_fixed: u64,
    leaks_fixed: u64,
    allocated: u64,
    fragmented: u64,
    compressed: u64,
}

impl Res {
    fn add(&mut self, o: &Res) {
        self.corruptions = self.corruptions.saturating_add(o.corruptions);
        self.leaks = self.leaks.saturating_add(o.leaks);
        self.check_errors = self.check_errors.saturating_add(o.check_errors);
        self.corruptions_fixed = self.corruptions_fixed.saturating_add(o.corruptions_fixed);
        self.leaks_fixed = self.leaks_fixed.saturating_add(o.leaks_fixed);
        self.allocated = self.allocated.saturating_add(o.allocated);
        self.fragmented = self.fragmented.saturating_add(o.fragmented);
        self.compressed = self.compressed.saturating_add(o.compressed);
    }
}

fn bump(x: &mut u64) {
    *x = x.saturating_add(1);
}

fn drop1(x: &mut u64) {
    *x = x.saturating_sub(1);
}

/// One counting pass over host clusters `lo..hi`.
struct Pass<'s> {
    counts: &'s mut [u8],
    lo: u64,
    hi: u64,
    /// Report entry-level problems and statistics (the first pass of a run).
    first: bool,
    /// Report and count nothing (a recount whose problems were already reported).
    quiet: bool,
    /// Apply `-r all` fixes to entries while walking.
    fix_entries: bool,
    /// Leave the refcount table and blocks out (counting for a new refcount structure).
    skip_refcount_structure: bool,
    /// Count every reference except the active L1 table's own range and the L2 tables that L1 entries name:
    /// what is left says whether a cluster a repair would write as a table is also used as something else.
    role_probe: bool,
    /// A reference reached host cluster `nb_file` (QEMU then grows its count array by one).
    touched_end: bool,
    /// One past the highest host cluster any reference names, even one too far past the end of the file to
    /// be counted (a rebuilt refcount structure must not land there).
    max_end: u64,
    rebuild: bool,
    res: Res,
}

fn slot(i: u64) -> Option<core::ops::Range<usize>> {
    let start = usize::try_from(i).ok()?.checked_mul(COUNT_BYTES)?;
    Some(start..start.checked_add(COUNT_BYTES)?)
}

fn count_get(counts: &[u8], i: u64) -> u32 {
    slot(i)
        .and_then(|r| counts.get(r))
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_ne_bytes)
}

fn count_set(counts: &mut [u8], i: u64, v: u32) {
    if let Some(b) = slot(i).and_then(|r| counts.get_mut(r)) {
        b.copy_from_slice(&v.to_ne_bytes());
    }
}

impl Pass<'_> {
    fn count(&self, cluster: u64) -> u64 {
        if cluster < self.lo || cluster >= self.hi {
            return 0;
        }
        count_get(self.counts, cluster.saturating_sub(self.lo)).into()
    }

    /// The first cluster of `from..to` (inside the pass's range) with a reference count above 0.
    fn next_counted(&self, from: u64, to: u64) -> Option<u64> {
        let a = from.max(self.lo).saturating_sub(self.lo);
        let b = to.min(self.hi).saturating_sub(self.lo);
        let (sa, sb) = (slot(a)?.start, slot(b)?.start);
        let counts = self.counts.get(sa..sb.min(self.counts.len()))?;
        counts
            .chunks_exact(COUNT_BYTES)
            .position(|c| c.iter().any(|&x| x != 0))
            .map(|i| from.max(self.lo).saturating_add(i as u64))
    }

    fn reports(&self) -> bool {
        self.first && !self.quiet
    }
}

/// Where a refcount lives: `Ok(None)` when no refcount block covers it, `Err(())` when its block offset is
/// unaligned, else the offset of its piece and its index there.
type Located = Result<Option<(u64, usize)>, ()>;

/// The on-disk refcounts, read through a one-piece cache (sequential lookups read each piece once).
struct RefReader {
    table_index: u64,
    block: u64,
    piece_at: u64,
    piece: [u8; PIECE],
}

impl RefReader {
    fn new() -> RefReader {
        RefReader {
            table_index: u64::MAX,
            block: 0,
            piece_at: u64::MAX,
            piece: [0; PIECE],
        }
    }

    /// Where the refcount of `cluster` lives: `Ok(None)` if no refcount block covers it (refcount 0),
    /// `Err(())` if its refcount block offset is unaligned; else (piece offset, index in the piece).
    fn locate<A: Access>(
        &mut self,
        io: &mut A,
        bounce: &mut [u8],
        geo: &Geo,
        cluster: u64,
    ) -> Result<Located, Error<A::E>> {
        let ti = cluster >> geo.block_bits;
        if ti >= geo.reftable_entries {
            return Ok(Ok(None));
        }
        if ti != self.table_index {
            let mut e = [0u8; 8];
            io.read(
                bounce,
                geo.h
                    .refcount_table_offset
                    .saturating_add(ti.saturating_mul(8)),
                &mut e,
            )?;
            self.block = u64::from_be_bytes(e) & REFTABLE_OFFSET_MASK;
            self.table_index = ti;
        }
        if self.block == 0 {
            return Ok(Ok(None));
        }
        if self.block & geo.cs.wrapping_sub(1) != 0 {
            return Ok(Err(()));
        }
        let idx = cluster & (1u64 << geo.block_bits).wrapping_sub(1);
        let byte = (idx << geo.order) >> 3;
        let piece_at = self
            .block
            .saturating_add(byte & !(PIECE as u64).wrapping_sub(1));
        let per_piece = per_piece(geo.order);
        let in_piece = (idx & per_piece.wrapping_sub(1)) as usize;
        if piece_at != self.piece_at {
            io.read(bounce, piece_at, &mut self.piece)?;
            self.piece_at = piece_at;
        }
        Ok(Ok(Some((piece_at, in_piece))))
    }

    /// When no refcount block covers `cluster` (its refcount table entry is 0, or it is past the table): one
    /// past the last cluster that shares that fate with it (every refcount there reads as 0).
    fn uncovered_until<A: Access>(
        &mut self,
        io: &mut A,
        bounce: &mut [u8],
        geo: &Geo,
        cluster: u64,
    ) -> Result<Option<u64>, Error<A::E>> {
        let ti = cluster >> geo.block_bits;
        if ti >= geo.reftable_entries {
            return Ok(Some(u64::MAX));
        }
        // locate() reads the table entry (and the block's piece, when there is a block).
        let _ = self.locate(io, bounce, geo, cluster)?;
        Ok((self.block == 0).then(|| {
            ti.saturating_add(1)
                .checked_shl(geo.block_bits)
                .unwrap_or(u64::MAX)
        }))
    }

    /// The refcount of `cluster`, `None` if it cannot be read.
    fn get<A: Access>(
        &mut self,
        io: &mut A,
        bounce: &mut [u8],
        geo: &Geo,
        cluster: u64,
    ) -> Result<Option<u64>, Error<A::E>> {
        match self.locate(io, bounce, geo, cluster)? {
            Err(()) => Ok(None),
            Ok(None) => Ok(Some(0)),
            Ok(Some((_, i))) => Ok(refcount_get(&self.piece, geo.order, i)),
        }
    }

    /// Sets the refcount of `cluster` (which a refcount block covers); `false` if it cannot.
    fn set<A: Access>(
        &mut self,
        io: &mut A,
        bounce: &mut [u8],
        geo: &Geo,
        cluster: u64,
        value: u64,
    ) -> Result<bool, Error<A::E>> {
        match self.locate(io, bounce, geo, cluster)? {
            Ok(Some((at, i))) => {
                if refcount_set(&mut self.piece, geo.order, i, value).is_none() {
                    return Ok(false);
                }
                io.write(bounce, at, &self.piece)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// The checker: the device, the bounce block, the image's facts and the sink.
struct Ctx<'a, A> {
    io: A,
    bounce: &'a mut [u8],
    geo: Geo,
    sink: &'a mut dyn CheckSink,
    /// QEMU's corruption event was signalled (it is printed once).
    signalled: bool,
}

impl<A: Access> Ctx<'_, A> {
    fn report(&mut self, p: &Pass<'_>, problem: Problem) {
        if !p.quiet {
            self.sink.report(problem);
        }
    }

    /// A refcount could not be read (unaligned refcount block): QEMU's corruption event, once; a writable image
    /// gets the corrupt bit, as QEMU sets it.
    fn signal_unreadable(&mut self, rr: &RefReader) -> Result<(), Error<A::E>> {
        if self.signalled {
            return Ok(());
        }
        self.signalled = true;
        let marking = self.io.writable();
        self.sink.report(Problem::RefcountBlockOffsetUnaligned {
            offset: rr.block,
            index: rr.table_index,
            marking,
        });
        if marking && self.geo.h.version >= 3 {
            let mut f = [0u8; 8];
            self.io.read(self.bounce, 72, &mut f)?;
            let bits = u64::from_be_bytes(f) | IncompatibleFeatures::CORRUPT.bits();
            self.write_word(72, bits)?;
        }
        Ok(())
    }

    /// QEMU's `qcow2_inc_refcounts_imrt`: one more reference to every cluster of `offset..offset + size`.
    fn inc(&mut self, p: &mut Pass<'_>, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        let g = self.geo;
        let end = offset.saturating_add(size);
        p.max_end = p.max_end.max(
            end.saturating_sub(1)
                .checked_shr(g.cb)
                .unwrap_or(0)
                .saturating_add(1),
        );
        if end.saturating_sub(g.file_len) >= g.cs {
            if p.reports() {
                self.sink.report(Problem::PastEndOfFile { offset, size });
                bump(&mut p.res.corruptions);
            }
            return;
        }
        let first = offset >> g.cb;
        let last = end.saturating_sub(1) >> g.cb;
        if last >= g.nb_file {
            p.touched_end = true;
        }
        let a = first.max(p.lo);
        let b = last.min(p.hi.saturating_sub(1));
        if p.hi == 0 || a > b {
            return;
        }
        for c in a..=b {
            let i = c.saturating_sub(p.lo);
            let v = count_get(p.counts, i);
            if u64::from(v) >= g.refcount_max {
                if !p.quiet {
                    self.sink
                        .report(Problem::RefcountOverflow { offset: c << g.cb });
                    bump(&mut p.res.corruptions);
                }
                continue;
            }
            count_set(p.counts, i, v.saturating_add(1));
        }
    }

    /// Zeroes a freed cluster's bytes inside the file, as QEMU's discard of a freed cluster punches a hole.
    fn discard(&mut self, cluster: u64) -> Result<(), Error<A::E>> {
        let g = self.geo;
        let start = cluster.saturating_mul(g.cs);
        let end = start.saturating_add(g.cs).min(g.file_len);
        let zeros = [0u8; PIECE];
        let mut at = start;
        while at < end {
            let n = end.saturating_sub(at).min(PIECE as u64) as usize;
            self.io
                .write(self.bounce, at, zeros.get(..n).unwrap_or(&[]))?;
            at = at.saturating_add(n as u64);
        }
        Ok(())
    }

    /// The part of a table of `bytes` at `offset` that lies inside the file, in whole entries of `entry` bytes
    /// (the rest reads as zeros, which is an empty entry in every table the check reads).
    fn in_file(&self, offset: u64, bytes: u64, entry: u64) -> u64 {
        let avail = self.geo.file_len.saturating_sub(offset);
        bytes.min(avail.checked_next_multiple_of(entry).unwrap_or(u64::MAX))
    }

    /// Writes one 8-byte entry word and makes it durable.
    fn write_word(&mut self, at: u64, word: u64) -> Result<(), Error<A::E>> {
        self.io.write(self.bounce, at, &word.to_be_bytes())?;
        self.io.flush()
    }

    /// QEMU's `calculate_refcounts`: every reference of the image, counted into the pass's range.
    fn walk(&mut self, p: &mut Pass<'_>) -> Result<(), Error<A::E>> {
        let g = self.geo;
        let h = g.h;
        // Header.
        self.inc(p, 0, g.cs);
        // Active L1 table.
        self.check_l1(p, h.l1_table_offset, h.l1_size, true, true)?;
        // Snapshots.
        if g.external && h.nb_snapshots > 0 && p.reports() {
            self.sink.report(Problem::SnapshotsWithDataFile {
                count: h.nb_snapshots,
            });
            bump(&mut p.res.corruptions);
        }
        let mut at = h.snapshots_offset;
        for _ in 0..h.nb_snapshots {
            let (next, s) = read_snapshot(&mut self.io, self.bounce, &g, at)?;
            at = next;
            if s.l1_offset & g.cs.wrapping_sub(1) != 0 {
                if p.reports() {
                    let id = short_name(&mut self.io, self.bounce, s.id_at, s.id_len)?;
                    let name = short_name(&mut self.io, self.bounce, s.name_at, s.name_len)?;
                    self.sink.report(Problem::SnapshotL1Unaligned {
                        id,
                        name,
                        l1_offset: s.l1_offset,
                    });
                    bump(&mut p.res.corruptions);
                }
                continue;
            }
            if u64::from(s.l1_size) > MAX_L1_BYTES / 8 {
                if p.reports() {
                    let id = short_name(&mut self.io, self.bounce, s.id_at, s.id_len)?;
                    let name = short_name(&mut self.io, self.bounce, s.name_at, s.name_len)?;
                    self.sink.report(Problem::SnapshotL1TooLarge {
                        id,
                        name,
                        l1_size: s.l1_size,
                    });
                    bump(&mut p.res.corruptions);
                }
                continue;
            }
            self.check_l1(p, s.l1_offset, s.l1_size, false, false)?;
        }
        self.inc(p, h.snapshots_offset, g.snapshots_size);
        // Refcount table.
        if !p.skip_refcount_structure {
            self.inc(
                p,
                h.refcount_table_offset,
                g.reftable_entries.saturating_mul(8),
            );
        }
        // Bitmaps.
        self.check_bitmaps(p)?;
        // Refcount blocks.
        if !p.skip_refcount_structure {
            self.check_refblocks(p)?;
        }
        Ok(())
    }

    fn check_l1(
        &mut self,
        p: &mut Pass<'_>,
        l1_offset: u64,
        l1_size: u32,
        frag: bool,
        active: bool,
    ) -> Result<(), Error<A::E>> {
        if l1_size == 0 {
            return Ok(());
        }
        let g = self.geo;
        let bytes = u64::from(l1_size).saturating_mul(8);
        if !(p.role_probe && active) {
            self.inc(p, l1_offset, bytes);
        }
        // Past the end of the file the table reads as zeros: no entries (QEMU reads them; same result).
        let bytes = self.in_file(l1_offset, bytes, 8);
        // In-file L2 tables walked: more than the file has clusters means entries repeat (bounds the work).
        let mut walks = 0u64;
        let mut buf = [0u8; CHUNK];
        let mut pos = 0u64;
        while pos < bytes {
            let n = (bytes.saturating_sub(pos)).min(CHUNK as u64) as usize;
            let chunk = buf.get_mut(..n).unwrap_or(&mut []);
            self.io
                .read(self.bounce, l1_offset.saturating_add(pos), chunk)?;
            for k in 0..n / 8 {
                let e = be64(&buf, k.saturating_mul(8));
                if e == 0 {
                    continue;
                }
                if e & L1_RESERVED_MASK != 0 && p.reports() {
                    self.sink.report(Problem::L1ReservedBits { entry: e });
                    bump(&mut p.res.corruptions);
                }
                let l2 = e & OFFSET_MASK;
                if !p.role_probe {
                    self.inc(p, l2, g.cs);
                }
                if l2 & g.cs.wrapping_sub(1) != 0 && p.reports() {
                    self.sink
                        .report(Problem::L2TableUnaligned { l2_offset: l2 });
                    bump(&mut p.res.corruptions);
                }
                if l2 < g.file_len {
                    walks = walks.saturating_add(1);
                    if walks > g.nb_file {
                        return Err(too_many_l2(l1_offset));
                    }
                }
                self.check_l2(p, l2, frag, active)?;
            }
            pos = pos.saturating_add(n as u64);
        }
        Ok(())
    }

    fn check_l2(
        &mut self,
        p: &mut Pass<'_>,
        l2_offset: u64,
        frag: bool,
        _active: bool,
    ) -> Result<(), Error<A::E>> {
        let g = self.geo;
        let mut next_contiguous = 0u64;
        let mut buf = [0u8; CHUNK];
        // Past the end of the file entries read as zeros, unallocated (QEMU reads them; same result).
        let bytes = self.in_file(l2_offset, g.l2_entries.saturating_mul(g.es), g.es);
        let per_chunk = (CHUNK as u64).checked_div(g.es).unwrap_or(0);
        let mut pos = 0u64;
        let mut index = 0u64;
        while pos < bytes {
            let n = (bytes.saturating_sub(pos)).min(CHUNK as u64) as usize;
            let chunk = buf.get_mut(..n).unwrap_or(&mut []);
            self.io
                .read(self.bounce, l2_offset.saturating_add(pos), chunk)?;
            for k in 0..(n as u64).checked_div(g.es).unwrap_or(0).min(per_chunk) {
                let at = k.saturating_mul(g.es) as usize;
                let mut word = be64(&buf, at);
                let bitmap = if g.extended {
                    be64(&buf, at.saturating_add(8))
                } else {
                    0
                };
                let i = index;
                index = index.saturating_add(1);
                let ty = cluster_type(&g, word);
                if ty != Ty::Compressed && word & L2_RESERVED_MASK != 0 && p.reports() {
                    self.sink.report(Problem::L2ReservedBits { entry: word });
                    bump(&mut p.res.corruptions);
                }
                match ty {
                    Ty::Compressed => {
                        if word & OFLAG_COPIED != 0 {
                            let x = 62u32.saturating_sub(g.cb.saturating_sub(8));
                            if p.reports() {
                                self.sink.report(Problem::CompressedCopied {
                                    coffset: word & (1u64 << x).wrapping_sub(1),
                                });
                                bump(&mut p.res.corruptions);
                            }
                            word &= !OFLAG_COPIED;
                        }
                        if g.external {
                            if p.reports() {
                                self.sink.report(Problem::CompressedWithDataFile {
                                    index: i,
                                    entry: word,
                                });
                                bump(&mut p.res.corruptions);
                            }
                            continue;
                        }
                        if bitmap != 0 {
                            if p.reports() {
                                self.sink.report(Problem::CompressedWithBitmap {
                                    index: i,
                                    entry: word,
                                });
                                bump(&mut p.res.corruptions);
                            }
                            continue;
                        }
                        // qcow2_parse_compressed_l2_entry.
                        let shift = 62u32.saturating_sub(g.cb.saturating_sub(8));
                        let coffset = word & (1u64 << shift).wrapping_sub(1);
                        let csize_mask = (1u64 << g.cb.saturating_sub(8)).wrapping_sub(1);
                        let sectors = ((word >> shift) & csize_mask).saturating_add(1);
                        let csize = sectors.saturating_mul(512).saturating_sub(coffset & 511);
                        self.inc(p, coffset, csize);
                        if frag && p.reports() {
                            bump(&mut p.res.allocated);
                            bump(&mut p.res.compressed);
                            bump(&mut p.res.fragmented);
                        }
                    }
                    Ty::ZeroAlloc | Ty::Normal => {
                        let offset = word & OFFSET_MASK;
                        if (bitmap >> 32) & bitmap != 0 && p.reports() {
                            bump(&mut p.res.corruptions);
                            self.sink.report(Problem::BadSubclusterBitmap { offset });
                        }
                        if offset & g.cs.wrapping_sub(1) != 0 {
                            let contains_data = if g.extended {
                                bitmap & 0xffff_ffff != 0
                            } else {
                                word & OFLAG_ZERO == 0
                            };
                            if !contains_data {
                                let repairing = p.fix_entries && p.reports();
                                if p.reports() {
                                    bump(&mut p.res.corruptions);
                                    self.sink.report(Problem::PreallocatedUnaligned {
                                        offset,
                                        repairing,
                                    });
                                }
                                if repairing {
                                    let new = if g.extended { 0 } else { OFLAG_ZERO };
                                    let at = l2_offset.saturating_add(i.saturating_mul(g.es));
                                    self.write_word(at, new)?;
                                    drop1(&mut p.res.corruptions);
                                    bump(&mut p.res.corruptions_fixed);
                                    continue;
                                }
                            } else if p.reports() {
                                bump(&mut p.res.corruptions);
                                self.sink.report(Problem::DataUnaligned { offset });
                            }
                        }
                        if frag && p.reports() {
                            bump(&mut p.res.allocated);
                            if next_contiguous != 0 && offset != next_contiguous {
                                bump(&mut p.res.fragmented);
                            }
                        }
                        next_contiguous = offset.saturating_add(g.cs);
                        if !g.external {
                            self.inc(p, offset, g.cs);
                        }
                    }
                    Ty::ZeroPlain => {}
                    Ty::Unallocated => {
                        if bitmap & 0xffff_ffff != 0 && p.reports() {
                            bump(&mut p.res.corruptions);
                            self.sink.report(Problem::UnallocatedWithBitmap);
                        }
                    }
                }
            }
            pos = pos.saturating_add(n as u64);
        }
        Ok(())
    }

    /// QEMU's `qcow2_check_bitmaps_refcounts`.
    fn check_bitmaps(&mut self, p: &mut Pass<'_>) -> Result<(), Error<A::E>> {
        let g = self.geo;
        let Some(ext) = g.bitmaps else {
            return Ok(());
        };
        let (dir_offset, dir_size) = (ext.directory_offset, ext.directory_size);
        self.inc(p, dir_offset, dir_size);
        let dir_end = dir_offset.saturating_add(dir_size);
        let mut at = dir_offset;
        // The directory was validated when the image was loaded (format::bitmap::DirectoryWalk).
        for _ in 0..ext.nb_bitmaps {
            let mut e = [0u8; DIR_ENTRY_LEN];
            if at.saturating_add(24) > dir_end || dir_end.saturating_sub(g.file_len) >= g.cs {
                if p.reports() {
                    bump(&mut p.res.corruptions);
                    self.sink.report(Problem::BitmapCorrupt { offset: at });
                }
                return Ok(());
            }
            self.io.read(self.bounce, at, &mut e)?;
            let entry = BitmapDirEntry::parse(&e);
            let table_offset = entry.table_offset;
            at = at.saturating_add(entry.entry_len());
            let bytes = entry.table_bytes();
            self.inc(p, table_offset, bytes);
            if table_offset & g.cs.wrapping_sub(1) != 0
                || table_offset
                    .saturating_add(bytes)
                    .saturating_sub(g.file_len)
                    >= g.cs
            {
                if p.reports() {
                    bump(&mut p.res.corruptions);
                    self.sink.report(Problem::BitmapCorrupt {
                        offset: table_offset,
                    });
                }
                return Ok(());
            }
            let mut buf = [0u8; CHUNK];
            let mut pos = 0u64;
            while pos < bytes {
                let n = (bytes.saturating_sub(pos)).min(CHUNK as u64) as usize;
                let chunk = buf.get_mut(..n).unwrap_or(&mut []);
                self.io
                    .read(self.bounce, table_offset.saturating_add(pos), chunk)?;
                for k in 0..n / 8 {
                    match BitmapTableEntry::decode(be64(&buf, k.saturating_mul(8)), g.cs) {
                        BitmapTableEntry::Invalid => {
                            if p.reports() {
                                bump(&mut p.res.corruptions);
                            }
                        }
                        BitmapTableEntry::Data(off) => self.inc(p, off, g.cs),
                        BitmapTableEntry::Unallocated => {}
                    }
                }
                pos = pos.saturating_add(n as u64);
            }
        }
        Ok(())
    }

    /// QEMU's `check_refblocks`.
    fn check_refblocks(&mut self, p: &mut Pass<'_>) -> Result<(), Error<A::E>> {
        let g = self.geo;
        let bytes = self.in_file(
            g.h.refcount_table_offset,
            g.reftable_entries.saturating_mul(8),
            8,
        );
        let mut buf = [0u8; CHUNK];
        let mut pos = 0u64;
        let mut index = 0u64;
        while pos < bytes {
            let n = (bytes.saturating_sub(pos)).min(CHUNK as u64) as usize;
            let chunk = buf.get_mut(..n).unwrap_or(&mut []);
            self.io.read(
                self.bounce,
                g.h.refcount_table_offset.saturating_add(pos),
                chunk,
            )?;
            for k in 0..n / 8 {
                let i = index;
                index = index.saturating_add(1);
                let e = be64(&buf, k.saturating_mul(8));
                let offset = e & REFTABLE_OFFSET_MASK;
                let cluster = offset >> g.cb;
                if e & REFTABLE_RESERVED_MASK != 0 {
                    if p.reports() {
                        self.sink
                            .report(Problem::RefcountTableReservedBits { index: i });
                        bump(&mut p.res.corruptions);
                    }
                    p.rebuild = true;
                    continue;
                }
                if offset & g.cs.wrapping_sub(1) != 0 {
                    if p.reports() {
                        self.sink
                            .report(Problem::RefcountBlockUnaligned { index: i });
                        bump(&mut p.res.corruptions);
                    }
                    p.rebuild = true;
                    continue;
                }
                let nb = g.nb_file.saturating_add(u64::from(p.touched_end));
                if cluster >= nb {
                    if p.reports() {
                        self.sink.report(Problem::RefcountBlockOutside {
                            index: i,
                            repairing: p.fix_entries,
                        });
                        bump(&mut p.res.corruptions);
                    }
                    if p.fix_entries {
                        p.rebuild = true;
                    }
                    continue;
                }
                if offset != 0 {
                    self.inc(p, offset, g.cs);
                    if cluster >= p.lo && cluster < p.hi {
                        let refcount = p.count(cluster);
                        if refcount != 1 {
                            self.report(p, Problem::RefcountBlockRefcount { index: i, refcount });
                            if !p.quiet {
                                bump(&mut p.res.corruptions);
                            }
                            p.rebuild = true;
                        }
                    }
                }
            }
            pos = pos.saturating_add(n as u64);
        }
        Ok(())
    }

    /// QEMU's `compare_refcounts` over the pass's range (clusters below `nb`).
    fn compare(
        &mut self,
        p: &mut Pass<'_>,
        fix: Option<RepairMode>,
        highest: &mut u64,
        res: &mut Res,
    ) -> Result<(), Error<A::E>> {
        let g = self.geo;
        let nb = g.nb_file.saturating_add(u64::from(p.touched_end));
        let end = p.hi.min(nb);
        let mut rr = RefReader::new();
        let mut c = p.lo;
        while c < end {
            // Where no refcount block covers the clusters, only those with references can differ: skip to the
            // next one (a sparse file's tail costs a scan of the counts, not a lookup per cluster).
            if let Some(until) = rr.uncovered_until(&mut self.io, self.bounce, &g, c)? {
                let stop = until.min(end);
                match p.next_counted(c, stop) {
                    Some(next) => c = next,
                    None => {
                        c = stop;
                        continue;
                    }
                }
            }
            let cluster = c;
            c = c.saturating_add(1);
            let Some(r1) = rr.get(&mut self.io, self.bounce, &g, cluster)? else {
                self.signal_unreadable(&rr)?;
                self.sink.report(Problem::RefcountUnreadable { cluster });
                bump(&mut res.check_errors);
                continue;
            };
            let r2 = p.count(cluster);
            if r1 > 0 || r2 > 0 {
                *highest = cluster;
            }
            if r1 == r2 {
                continue;
            }
            #[derive(PartialEq)]
            enum Fix {
                Leak,
                Corruption,
            }
            let mut fixing = None;
            if r1 == 0 {
                p.rebuild = true;
            } else if r1 > r2 && fix.is_some() {
                fixing = Some(Fix::Leak);
            } else if r1 < r2 && fix == Some(RepairMode::All) {
                fixing = Some(Fix::Corruption);
            }
            let problem = if fixing.is_some() {
                Problem::Repairing {
                    cluster,
                    refcount: r1,
                    references: r2,
                }
            } else if r1 < r2 {
                Problem::RefcountTooLow {
                    cluster,
                    refcount: r1,
                    references: r2,
                }
            } else {
                Problem::Leaked {
                    cluster,
                    refcount: r1,
                    references: r2,
                }
            };
            self.sink.report(problem);
            if let Some(kind) = fixing
                && rr.set(&mut self.io, self.bounce, &g, cluster, r2)?
            {
                if kind == Fix::Leak {
                    if r2 == 0 {
                        self.discard(cluster)?;
                    }
                    bump(&mut res.leaks_fixed);
                } else {
                    bump(&mut res.corruptions_fixed);
                }
                continue;
            }
            if r1 < r2 {
                bump(&mut res.corruptions);
            } else {
                bump(&mut res.leaks);
            }
        }
        Ok(())
    }

    /// Clusters a counting pass covers.
    fn pass_len(&self, scratch_len: usize) -> u64 {
        (scratch_len / COUNT_BYTES) as u64
    }

    /// Clusters a rebuild pass covers: a multiple of the refcounts in one [`PIECE`] of a refcount block.
    fn rebuild_pass_len(&self, scratch_len: usize) -> u64 {
        let per_piece = per_piece(self.geo.order);
        self.pass_len(scratch_len)
            .checked_div(per_piece)
            .unwrap_or(0)
            .saturating_mul(per_piece)
    }

    /// Counts (walk) and compares, pass by pass over host clusters `0..nb_file + 1`. Walk results go to
    /// `walk_res`, comparison results to `cmp_res`.
    #[allow(clippy::too_many_arguments)]
    fn count_and_compare(
        &mut self,
        scratch: &mut [u8],
        quiet: bool,
        fix_entries: bool,
        fix: Option<RepairMode>,
        walk_res: &mut Res,
        cmp_res: &mut Res,
        rebuild: &mut bool,
        highest: &mut u64,
        passes: &mut u32,
    ) -> Result<(), Error<A::E>> {
        let len = self.pass_len(scratch.len());
        let total = self.count_end()?;
        *highest = 0;
        let mut lo = 0u64;
        while lo < total {
            let hi = lo.saturating_add(len).min(total);
            let used = (hi.min(total).saturating_sub(lo) as usize).saturating_mul(COUNT_BYTES);
            scratch.get_mut(..used).unwrap_or(&mut []).fill(0);
            let mut p = Pass {
                counts: &mut *scratch,
                lo,
                hi,
                first: lo == 0,
                quiet,
                fix_entries,
                skip_refcount_structure: false,
                role_probe: false,
                touched_end: false,
                max_end: 0,
                rebuild: false,
                res: Res::default(),
            };
            self.walk(&mut p)?;
            walk_res.add(&p.res);
            self.compare(&mut p, fix, highest, cmp_res)?;
            *rebuild |= p.rebuild;
            *passes = passes.saturating_add(1);
            lo = hi;
        }
        Ok(())
    }

    /// Before a `-r all` repair writes anything: every cluster it may write table entries into (the active L1
    /// table, and every L2 table that an L1 table names) must be used as that table only: not the header, not
    /// guest data, not part of the refcount structure or of a snapshot or bitmap structure, and (an L2 table)
    /// not inside the active L1 table. Returns the first cluster that is not, and the table it would be
    /// written as. QEMU's overlap check stops its repair at the first such write; this finds them all before
    /// the first write, so that a refused repair changes nothing but the corrupt bit.
    fn repair_conflict(
        &mut self,
        scratch: &mut [u8],
    ) -> Result<Option<(u64, &'static str)>, Error<A::E>> {
        let len = self.pass_len(scratch.len());
        let total = self.count_end()?;
        let mut lo = 0u64;
        while lo < total {
            let hi = lo.saturating_add(len).min(total);
            let used = (hi.saturating_sub(lo) as usize).saturating_mul(COUNT_BYTES);
            scratch.get_mut(..used).unwrap_or(&mut []).fill(0);
            let mut p = Pass {
                counts: &mut *scratch,
                lo,
                hi,
                first: false,
                quiet: true,
                fix_entries: false,
                skip_refcount_structure: false,
                role_probe: true,
                touched_end: false,
                max_end: 0,
                rebuild: false,
                res: Res::default(),
            };
            self.walk(&mut p)?;
            if let Some(conflict) = self.table_conflict(&p)? {
                return Ok(Some(conflict));
            }
            lo = hi;
        }
        Ok(None)
    }

    /// [`Ctx::repair_conflict`] for the clusters of one role-probe pass.
    fn table_conflict(&mut self, p: &Pass<'_>) -> Result<Option<(u64, &'static str)>, Error<A::E>> {
        let g = self.geo;
        let h = g.h;
        let l1_bytes = u64::from(h.l1_size).saturating_mul(8);
        let l1_in_file = self.in_file(h.l1_table_offset, l1_bytes, 8);
        if l1_in_file > 0 {
            let first = h.l1_table_offset >> g.cb;
            let last = h
                .l1_table_offset
                .saturating_add(l1_in_file.saturating_sub(1))
                >> g.cb;
            for c in first..=last {
                if c == 0 || p.count(c) > 0 {
                    return Ok(Some((c << g.cb, "active L1 table")));
                }
            }
        }
        let active = (
            h.l1_table_offset,
            h.l1_table_offset.saturating_add(l1_bytes),
        );
        if let Some(c) = self.l2_conflict(p, h.l1_table_offset, h.l1_size, active)? {
            return Ok(Some((c << g.cb, "L2 table")));
        }
        let mut at = h.snapshots_offset;
        for _ in 0..h.nb_snapshots {
            let (next, s) = read_snapshot(&mut self.io, self.bounce, &g, at)?;
            at = next;
            // The walk leaves these out too (reported as corruptions, never written).
            if s.l1_offset & g.cs.wrapping_sub(1) != 0 || u64::from(s.l1_size) > MAX_L1_BYTES / 8 {
                continue;
            }
            if let Some(c) = self.l2_conflict(p, s.l1_offset, s.l1_size, active)? {
                return Ok(Some((c << g.cb, "L2 table")));
            }
        }
        Ok(None)
    }

    /// The first in-file cluster of an L2 table named by the L1 table at `l1_offset` that is also used as
    /// something else (see [`Ctx::repair_conflict`]).
    fn l2_conflict(
        &mut self,
        p: &Pass<'_>,
        l1_offset: u64,
        l1_size: u32,
        active_l1: (u64, u64),
    ) -> Result<Option<u64>, Error<A::E>> {
        let g = self.geo;
        let bytes = self.in_file(l1_offset, u64::from(l1_size).saturating_mul(8), 8);
        let mut buf = [0u8; CHUNK];
        let mut pos = 0u64;
        while pos < bytes {
            let n = (bytes.saturating_sub(pos)).min(CHUNK as u64) as usize;
            let chunk = buf.get_mut(..n).unwrap_or(&mut []);
            self.io
                .read(self.bounce, l1_offset.saturating_add(pos), chunk)?;
            for k in 0..n / 8 {
                let e = be64(&buf, k.saturating_mul(8));
                if e == 0 {
                    continue;
                }
                let l2 = e & OFFSET_MASK;
                let l2_bytes = self.in_file(l2, g.l2_entries.saturating_mul(g.es), g.es);
                if l2_bytes == 0 {
                    continue;
                }
                let l2_end = l2.saturating_add(l2_bytes);
                if l2 < active_l1.1 && active_l1.0 < l2_end {
                    return Ok(Some(l2 >> g.cb));
                }
                for c in (l2 >> g.cb)..=(l2_end.saturating_sub(1) >> g.cb) {
                    if c == 0 || p.count(c) > 0 {
                        return Ok(Some(c));
                    }
                }
            }
            pos = pos.saturating_add(n as u64);
        }
        Ok(None)
    }

    /// One past the last host cluster the counting passes cover. QEMU counts `nb_file + 1` clusters (the whole
    /// file, and one past its end); past both the highest cluster any reference names and the last cluster any
    /// refcount table entry covers, the refcount on disk and the reference count are both 0, so nothing there
    /// can be reported. Cutting the range there makes the work follow what the image holds, not a sparse
    /// file's apparent length. Small files are not cut (finding the cut costs a walk of the metadata).
    fn count_end(&mut self) -> Result<u64, Error<A::E>> {
        let all = self.geo.nb_file.saturating_add(1);
        if all <= UNCUT_COUNT_CLUSTERS {
            return Ok(all);
        }
        let mut probe = Pass {
            counts: &mut [],
            lo: 0,
            hi: 0,
            first: false,
            quiet: true,
            fix_entries: false,
            skip_refcount_structure: false,
            role_probe: false,
            touched_end: false,
            max_end: 0,
            rebuild: false,
            res: Res::default(),
        };
        self.walk(&mut probe)?;
        let covered = self.refcount_cover_end()?;
        Ok(all.min(probe.max_end.max(covered)).max(1))
    }

    /// One past the last host cluster that a non-zero refcount table entry covers (valid or not: an invalid
    /// entry makes its clusters' refcounts unreadable, which is reported for each of them).
    fn refcount_cover_end(&mut self) -> Result<u64, Error<A::E>> {
        let g = self.geo;
        let bytes = self.in_file(
            g.h.refcount_table_offset,
            g.reftable_entries.saturating_mul(8),
            8,
        );
        let mut buf = [0u8; CHUNK];
        let mut pos = 0u64;
        let mut end = 0u64;
        while pos < bytes {
            let n = (bytes.saturating_sub(pos)).min(CHUNK as u64) as usize;
            let chunk = buf.get_mut(..n).unwrap_or(&mut []);
            self.io.read(
                self.bounce,
                g.h.refcount_table_offset.saturating_add(pos),
                chunk,
            )?;
            for k in 0..n / 8 {
                if be64(&buf, k.saturating_mul(8)) != 0 {
                    let index = (pos / 8).saturating_add(k as u64);
                    end = index
                        .saturating_add(1)
                        .checked_shl(g.block_bits)
                        .unwrap_or(u64::MAX);
                }
            }
            pos = pos.saturating_add(n as u64);
        }
        Ok(end)
    }

    /// The reference count range of one pass when everything fits: the counts of the last
    /// [`Ctx::count_and_compare`] are still in `scratch` and can be compared again.
    fn one_pass(&self, scratch_len: usize) -> bool {
        self.pass_len(scratch_len) > self.geo.nb_file
    }

    /// Writes a new refcount table and blocks after the last used cluster, from counts taken without the old
    /// refcount structure, makes them durable, then points the header at them.
    ///
    /// `max_end` is one past the highest cluster any reference names: the new structure goes after it too,
    /// so that a reference that points past the end of the file never lands on a new refcount block.
    fn rebuild(
        &mut self,
        scratch: &mut [u8],
        touched_end: bool,
        max_end: u64,
    ) -> Result<(), Error<A::E>> {
        let g = self.geo;
        let start = g
            .nb_file
            .saturating_add(u64::from(touched_end))
            .max(max_end);
        let per_block = 1u64 << g.block_bits;
        // Refcount blocks covering everything, themselves and the table included.
        let (mut blocks, mut table) = (1u64, 1u64);
        for _ in 0..64 {
            let total = start.saturating_add(blocks).saturating_add(table);
            let b = ceil_div(total, per_block);
            let t = ceil_div(b.saturating_mul(8), g.cs);
            if (b, t) == (blocks, table) {
                break;
            }
            (blocks, table) = (b, t);
        }
        if table.saturating_mul(g.cs) > crate::format::MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported {
                what: "rebuilt refcount table would be larger than 8 MiB",
                value: table,
            });
        }
        let table_offset = start.saturating_add(blocks).saturating_mul(g.cs);
        let end = start.saturating_add(blocks).saturating_add(table);
        if end
            .checked_mul(g.cs)
            .is_none_or(|e| e > crate::format::MAX_HOST_OFFSET)
        {
            return Err(corrupt("image too large to rebuild refcounts", end));
        }
        let len = self.rebuild_pass_len(scratch.len());
        if len == 0 {
            return Err(Error::BufferTooSmall {
                what: "check scratch (refcount rebuild)",
                need: per_piece(g.order).saturating_mul(COUNT_BYTES as u64),
                have: scratch.len() as u64,
            });
        }
        let covered = blocks.saturating_mul(per_block);
        let per_piece = per_piece(g.order);
        let mut lo = 0u64;
        while lo < covered {
            let hi = lo.saturating_add(len).min(covered);
            let used = (hi.saturating_sub(lo) as usize).saturating_mul(COUNT_BYTES);
            scratch.get_mut(..used).unwrap_or(&mut []).fill(0);
            let mut p = Pass {
                counts: &mut *scratch,
                lo,
                hi,
                first: false,
                quiet: true,
                fix_entries: false,
                skip_refcount_structure: true,
                role_probe: false,
                touched_end: false,
                max_end: 0,
                rebuild: false,
                res: Res::default(),
            };
            if lo <= g.nb_file {
                self.walk(&mut p)?;
            }
            // The new structure itself.
            for c in start.max(lo)..end.min(hi) {
                count_set(p.counts, c.saturating_sub(lo), 1);
            }
            // Write the range's pieces of refcount blocks.
            let mut c0 = lo;
            while c0 < hi {
                let mut piece = [0u8; PIECE];
                for k in 0..per_piece {
                    let v = p.count(c0.saturating_add(k)).min(g.refcount_max);
                    let _ = refcount_set(&mut piece, g.order, k as usize, v);
                }
                let block = c0 >> g.block_bits;
                let byte = ((c0 & per_block.wrapping_sub(1)) << g.order) >> 3;
                let at = start
                    .saturating_add(block)
                    .saturating_mul(g.cs)
                    .saturating_add(byte);
                self.io.write(self.bounce, at, &piece)?;
                c0 = c0.saturating_add(per_piece);
            }
            lo = hi;
        }
        // The refcount table.
        let entries_per_piece = (PIECE / 8) as u64;
        let table_entries = table.saturating_mul(g.cs) / 8;
        let mut e0 = 0u64;
        while e0 < table_entries {
            let mut piece = [0u8; PIECE];
            for k in 0..entries_per_piece {
                let b = e0.saturating_add(k);
                if b < blocks {
                    let off = start.saturating_add(b).saturating_mul(g.cs);
                    let at = (k as usize).saturating_mul(8);
                    if let Some(d) = piece.get_mut(at..at.saturating_add(8)) {
                        d.copy_from_slice(&off.to_be_bytes());
                    }
                }
            }
            self.io.write(
                self.bounce,
                table_offset.saturating_add(e0.saturating_mul(8)),
                &piece,
            )?;
            e0 = e0.saturating_add(entries_per_piece);
        }
        // New structure durable before the header points at it.
        self.io.flush()?;
        let mut fields = [0u8; 12];
        fields
            .get_mut(..8)
            .unwrap_or(&mut [])
            .copy_from_slice(&table_offset.to_be_bytes());
        fields
            .get_mut(8..)
            .unwrap_or(&mut [])
            .copy_from_slice(&(table as u32).to_be_bytes());
        self.io.write(self.bounce, 48, &fields)?;
        self.io.flush()?;
        self.geo = load(&mut self.io, self.bounce)?;
        Ok(())
    }

    /// QEMU's `check_oflag_copied`: COPIED flags of the active L1 and L2 tables against the refcounts on disk.
    fn check_copied(&mut self, fix: Option<RepairMode>, res: &mut Res) -> Result<(), Error<A::E>> {
        let g = self.geo;
        // Repairing leaks only, QEMU fixes COPIED flags when the refcounts are now known to be right.
        let fix_all = match fix {
            Some(RepairMode::All) => true,
            Some(RepairMode::Leaks) => {
                res.check_errors == 0 && res.corruptions == 0 && res.leaks == 0
            }
            None => false,
        };
        let mut rr = RefReader::new();
        let bytes = self.in_file(
            g.h.l1_table_offset,
            u64::from(g.h.l1_size).saturating_mul(8),
            8,
        );
        let mut l1 = [0u8; CHUNK];
        let mut l2 = [0u8; CHUNK];
        let mut pos = 0u64;
        let mut l1_index = 0u64;
        let mut walks = 0u64;
        let mut wrote = false;
        while pos < bytes {
            let n = (bytes.saturating_sub(pos)).min(CHUNK as u64) as usize;
            let chunk = l1.get_mut(..n).unwrap_or(&mut []);
            self.io
                .read(self.bounce, g.h.l1_table_offset.saturating_add(pos), chunk)?;
            for k in 0..n / 8 {
                let i = l1_index;
                l1_index = l1_index.saturating_add(1);
                let e = be64(&l1, k.saturating_mul(8));
                let l2_offset = e & OFFSET_MASK;
                if l2_offset == 0 {
                    continue;
                }
                let Some(refcount) = rr.get(&mut self.io, self.bounce, &g, l2_offset >> g.cb)?
                else {
                    self.signal_unreadable(&rr)?;
                    continue;
                };
                if (refcount == 1) != (e & OFLAG_COPIED != 0) {
                    bump(&mut res.corruptions);
                    self.sink.report(Problem::CopiedL1 {
                        l1_index: i,
                        l1_entry: e,
                        refcount,
                        repairing: fix_all,
                    });
                    if fix_all {
                        let new = if refcount == 1 {
                            e | OFLAG_COPIED
                        } else {
                            e & !OFLAG_COPIED
                        };
                        let at = g.h.l1_table_offset.saturating_add(i.saturating_mul(8));
                        self.write_word(at, new)?;
                        drop1(&mut res.corruptions);
                        bump(&mut res.corruptions_fixed);
                    }
                }
                let l2_bytes = self.in_file(l2_offset, g.l2_entries.saturating_mul(g.es), g.es);
                if l2_bytes > 0 {
                    walks = walks.saturating_add(1);
                    if walks > g.nb_file {
                        return Err(too_many_l2(g.h.l1_table_offset));
                    }
                }
                let mut lpos = 0u64;
                let mut j = 0u64;
                while lpos < l2_bytes {
                    let m = (l2_bytes.saturating_sub(lpos)).min(CHUNK as u64) as usize;
                    let chunk = l2.get_mut(..m).unwrap_or(&mut []);
                    self.io
                        .read(self.bounce, l2_offset.saturating_add(lpos), chunk)?;
                    for q in 0..(m as u64).checked_div(g.es).unwrap_or(0) {
                        let at = q.saturating_mul(g.es) as usize;
                        let word = be64(&l2, at);
                        let jj = j;
                        j = j.saturating_add(1);
                        let ty = cluster_type(&g, word);
                        if ty != Ty::Normal && ty != Ty::ZeroAlloc {
                            continue;
                        }
                        let refcount = if g.external {
                            1
                        } else {
                            match rr.get(
                                &mut self.io,
                                self.bounce,
                                &g,
                                (word & OFFSET_MASK) >> g.cb,
                            )? {
                                Some(r) => r,
                                None => {
                                    self.signal_unreadable(&rr)?;
                                    continue;
                                }
                            }
                        };
                        if (refcount == 1) != (word & OFLAG_COPIED != 0) {
                            bump(&mut res.corruptions);
                            self.sink.report(Problem::CopiedL2 {
                                l2_entry: word,
                                refcount,
                                repairing: fix_all,
                            });
                            if fix_all {
                                let new = if refcount == 1 {
                                    word | OFLAG_COPIED
                                } else {
                                    word & !OFLAG_COPIED
                                };
                                let at = l2_offset.saturating_add(jj.saturating_mul(g.es));
                                self.io.write(self.bounce, at, &new.to_be_bytes())?;
                                wrote = true;
                                drop1(&mut res.corruptions);
                                bump(&mut res.corruptions_fixed);
                            }
                        }
                    }
                    lpos = lpos.saturating_add(m as u64);
                }
            }
            pos = pos.saturating_add(n as u64);
        }
        if wrote {
            self.io.flush()?;
        }
        Ok(())
    }

    /// One `qcow2_check_refcounts` (+ the dirty/corrupt bit clearing of `qcow2_co_check_locked`).
    fn run(
        &mut self,
        scratch: &mut [u8],
        fix: Option<RepairMode>,
    ) -> Result<CheckReport, Error<A::E>> {
        let g = self.geo;
        if self.pass_len(scratch.len()) == 0 {
            return Err(Error::BufferTooSmall {
                what: "check scratch",
                need: COUNT_BYTES as u64,
                have: scratch.len() as u64,
            });
        }
        if g.nb_file > MAX_CHECK_CLUSTERS {
            return Err(Error::Unsupported {
                what: FILE_TOO_LARGE,
                value: g.nb_file,
            });
        }
        let fix_all = fix == Some(RepairMode::All);
        let (mut walk_res, mut cmp_res) = (Res::default(), Res::default());
        let (mut rebuild, mut highest, mut passes) = (false, 0u64, 0u32);
        if fix_all && let Some((offset, table)) = self.repair_conflict(scratch)? {
            // Report what a check finds, then refuse: nothing but the corrupt bit is written.
            self.count_and_compare(
                scratch,
                false,
                false,
                None,
                &mut walk_res,
                &mut cmp_res,
                &mut rebuild,
                &mut highest,
                &mut passes,
            )?;
            self.sink.report(Problem::RepairOverlap { offset, table });
            if g.h.version >= 3 {
                let mut f = [0u8; 8];
                self.io.read(self.bounce, 72, &mut f)?;
                let bits = u64::from_be_bytes(f) | IncompatibleFeatures::CORRUPT.bits();
                self.write_word(72, bits)?;
            }
            return Err(corrupt(
                "repair refused: a table it would write overlaps other data or metadata",
                offset,
            ));
        }
        self.count_and_compare(
            scratch,
            false,
            fix_all,
            None,
            &mut walk_res,
            &mut cmp_res,
            &mut rebuild,
            &mut highest,
            &mut passes,
        )?;
        let mut res = walk_res;
        res.add(&cmp_res);
        let mut rebuilt = false;
        if rebuild && fix_all {
            self.sink.report(Problem::Rebuilding);
            let old = res;
            // Whether a reference reached the cluster past the file's end: cheap to find again.
            let (touched_end, max_end) = {
                let mut p = Pass {
                    counts: &mut [],
                    lo: 0,
                    hi: 0,
                    first: false,
                    quiet: true,
                    fix_entries: false,
                    skip_refcount_structure: true,
                    role_probe: false,
                    touched_end: false,
                    max_end: 0,
                    rebuild: false,
                    res: Res::default(),
                };
                self.walk(&mut p)?;
                (p.touched_end, p.max_end)
            };
            self.rebuild(scratch, touched_end, max_end)?;
            rebuilt = true;
            res.corruptions = 0;
            res.leaks = 0;
            // Refcounts that could not be read were those of the old structure, which is gone now (QEMU keeps
            // counting them, and so leaves the dirty and corrupt bits set after a successful rebuild).
            res.check_errors = res.check_errors.saturating_sub(cmp_res.check_errors);
            let (mut w2, mut c2) = (Res::default(), Res::default());
            let mut rebuild2 = false;
            self.count_and_compare(
                scratch,
                false,
                false,
                Some(RepairMode::Leaks),
                &mut w2,
                &mut c2,
                &mut rebuild2,
                &mut highest,
                &mut passes,
            )?;
            res.corruptions = res.corruptions.saturating_add(w2.corruptions);
            res.leaks = res.leaks.saturating_add(w2.leaks);
            res.check_errors = res.check_errors.saturating_add(w2.check_errors);
            if rebuild2 {
                self.sink.report(Problem::RebuildStillBroken);
            }
            if res.corruptions < old.corruptions {
                res.corruptions_fixed = res
                    .corruptions_fixed
                    .saturating_add(old.corruptions.saturating_sub(res.corruptions));
            }
            if res.leaks < old.leaks {
                res.leaks_fixed = res
                    .leaks_fixed
                    .saturating_add(old.leaks.saturating_sub(res.leaks));
            }
            res.leaks = res.leaks.saturating_add(c2.leaks);
        } else if let Some(mode) = fix {
            if rebuild {
                self.sink.report(Problem::NeedsRebuild);
                return Err(corrupt(
                    "the refcount structure needs to be rebuilt (repair all)",
                    0,
                ));
            }
            if res.leaks > 0 || res.corruptions > 0 {
                res = walk_res;
                let mut c2 = Res::default();
                if self.one_pass(scratch.len()) {
                    let hi = self.pass_len(scratch.len()).min(self.count_end()?);
                    let mut p = Pass {
                        counts: &mut *scratch,
                        lo: 0,
                        hi,
                        first: false,
                        quiet: true,
                        fix_entries: false,
                        skip_refcount_structure: false,
                        role_probe: false,
                        touched_end: false,
                        max_end: 0,
                        rebuild: false,
                        res: Res::default(),
                    };
                    // touched_end is a property of the references: find it without counting.
                    let mut probe = Pass {
                        counts: &mut [],
                        lo: 0,
                        hi: 0,
                        first: false,
                        quiet: true,
                        fix_entries: false,
                        skip_refcount_structure: false,
                        role_probe: false,
                        touched_end: false,
                        max_end: 0,
                        rebuild: false,
                        res: Res::default(),
                    };
                    self.walk(&mut probe)?;
                    p.touched_end = probe.touched_end;
                    highest = 0;
                    self.compare(&mut p, Some(mode), &mut highest, &mut c2)?;
                } else {
                    let mut w3 = Res::default();
                    let mut rebuild3 = false;
                    self.count_and_compare(
                        scratch,
                        true,
                        false,
                        Some(mode),
                        &mut w3,
                        &mut c2,
                        &mut rebuild3,
                        &mut highest,
                        &mut passes,
                    )?;
                }
                res.add(&c2);
                self.io.flush()?;
            }
        }
        self.check_copied(fix, &mut res)?;
        if fix.is_some() && res.check_errors == 0 && res.corruptions == 0 && g.h.version >= 3 {
            let mut f = [0u8; 8];
            self.io.read(self.bounce, 72, &mut f)?;
            let old = u64::from_be_bytes(f);
            let new =
                old & !(IncompatibleFeatures::DIRTY.bits() | IncompatibleFeatures::CORRUPT.bits());
            if new != old {
                self.write_word(72, new)?;
                self.geo = load(&mut self.io, self.bounce)?;
            }
        }
        Ok(CheckReport {
            corruptions: res.corruptions,
            leaks: res.leaks,
            check_errors: res.check_errors,
            corruptions_fixed: res.corruptions_fixed,
            leaks_fixed: res.leaks_fixed,
            image_end_offset: highest.saturating_add(1).saturating_mul(g.cs),
            total_clusters: ceil_div(g.h.size, g.cs),
            allocated_clusters: res.allocated,
            fragmented_clusters: res.fragmented,
            compressed_clusters: res.compressed,
            passes,
            rebuilt,
        })
    }
}

/// Bytes of scratch below which [`repair`] cannot rebuild the refcount structure of the image of `dev` (the
/// counts of one 512-byte piece of a refcount block: `(4096 >> refcount_order) * 4`, at most 16 KiB). [`check`]
/// and repairs that need no rebuild work with any scratch of at least [`COUNT_BYTES`].
pub fn min_scratch_len<D: BlockDevice>(
    dev: &mut D,
    bounce: &mut [u8],
) -> Result<usize, Error<D::Error>> {
    let geo = load(&mut ReadOnly(dev), bounce)?;
    Ok((per_piece(geo.order) as usize).saturating_mul(COUNT_BYTES))
}

/// Bytes of scratch with which [`check`] and [`repair`] work in one pass over the image of `dev`, even when
/// they rebuild its refcount structure.
pub fn scratch_len_for_one_pass<D: BlockDevice>(
    dev: &mut D,
    bounce: &mut [u8],
) -> Result<usize, Error<D::Error>> {
    let g = load(&mut ReadOnly(dev), bounce)?;
    let per_piece = per_piece(g.order);
    let per_block = 1u64 << g.block_bits;
    if g.nb_file > MAX_CHECK_CLUSTERS {
        return Ok(COUNT_BYTES);
    }
    // Counting covers what the image can make non-zero (Ctx::count_end). A file whose tail is cut off that
    // way is mostly sparse: a rebuild of its refcount structure, should it need one, works in passes.
    let count_end = {
        let mut sink = NoSink;
        let mut ctx = Ctx {
            io: ReadOnly(&mut *dev),
            bounce: &mut *bounce,
            geo: g,
            sink: &mut sink,
            signalled: false,
        };
        ctx.count_end()?
    };
    if count_end <= g.nb_file {
        let clusters = count_end.saturating_add(1).next_multiple_of(per_piece);
        return Ok(
            usize::try_from(clusters.saturating_mul(COUNT_BYTES as u64)).unwrap_or(usize::MAX)
        );
    }
    // Counting covers nb_file + 1 clusters; a rebuild covers whole refcount blocks past the new structure.
    let start = g.nb_file.saturating_add(1);
    let mut blocks = 1u64;
    for _ in 0..64 {
        let table = ceil_div(blocks.saturating_mul(8), g.cs);
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
    let geo = load(&mut io, bounce)?;
    let mut ctx = Ctx {
        io,
        bounce,
        geo,
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
    let geo = load(&mut io, bounce)?;
    let mut ctx = Ctx {
        io,
        bounce,
        geo,
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

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;

    use super::*;
    use crate::MemDevice;
    use crate::testimage::{TINY_LEN, tiny_qcow2};

    #[derive(Default)]
    struct Count(usize);
    impl CheckSink for Count {
        fn report(&mut self, _: Problem) {
            self.0 += 1;
        }
    }

    fn run(img: &[u8], scratch: usize) -> (CheckReport, usize) {
        let mut dev = MemDevice::new(img);
        let mut sink = Count::default();
        let r = check(
            &mut dev,
            &mut [0u8; 512],
            &mut vec![0u8; scratch],
            &mut sink,
        )
        .unwrap();
        (r, sink.0)
    }

    fn set_refcount(img: &mut [u8], cluster: usize, v: u16) {
        img[1024 + 2 * cluster..1024 + 2 * cluster + 2].copy_from_slice(&v.to_be_bytes());
    }

    #[test]
    fn clean_image() {
        let img = tiny_qcow2();
        let (r, n) = run(&img, 4096);
        assert_eq!(n, 0);
        assert_eq!(r.exit_code(), 0);
        assert_eq!(r.total_clusters, 128);
        assert_eq!(r.allocated_clusters, 1);
        assert_eq!(r.image_end_offset, TINY_LEN as u64);
        assert_eq!(r.passes, 1);
        // One cluster a pass: the same report.
        let (r1, _) = run(&img, 4);
        assert_eq!(r1.passes, 7);
        assert_eq!(CheckReport { passes: 1, ..r1 }, r);
    }

    #[test]
    fn leak_and_repair() {
        let mut img = tiny_qcow2();
        set_refcount(&mut img, 5, 2);
        let (r, _) = run(&img, 4);
        assert_eq!((r.leaks, r.corruptions), (1, 1)); // the leak, and COPIED on a refcount-2 cluster
        let mut buf = img.to_vec();
        let mut dev = MemDevice::new(&mut buf[..]);
        let r = repair(
            &mut dev,
            &mut [0u8; 512],
            &mut [0u8; 8],
            RepairMode::Leaks,
            &mut NoSink,
        )
        .unwrap();
        assert_eq!(r.leaks_fixed, 1);
        assert_eq!(r.exit_code(), 0);
        assert_eq!(&buf[..], &tiny_qcow2()[..]);
    }

    #[test]
    fn zero_refcount_rebuilds_after_the_end() {
        let mut img = tiny_qcow2();
        set_refcount(&mut img, 4, 0);
        let (r, n) = run(&img, 64);
        assert_eq!(r.corruptions, 2); // refcount 0, and the L1 COPIED flag
        assert!(n >= 2);
        let mut buf = img.to_vec();
        buf.resize(64 * 1024, 0);
        let mut dev = MemDevice::with_len(&mut buf[..], TINY_LEN as u64, 512);
        let r = repair(
            &mut dev,
            &mut [0u8; 512],
            &mut vec![0u8; 4096],
            RepairMode::All,
            &mut NoSink,
        )
        .unwrap();
        assert!(r.rebuilt);
        assert_eq!(r.exit_code(), 0);
        assert!(r.corruptions_fixed >= 1);
        let len = dev.content().len();
        // New refcount block and table go after the old end of the file.
        assert_eq!(len, TINY_LEN + 2 * 512);
        let table = u64::from_be_bytes(buf[48..56].try_into().unwrap());
        assert_eq!(table, (TINY_LEN + 512) as u64);
        let (again, n) = run(&buf[..len], 4);
        assert_eq!((again.exit_code(), n), (0, 0));
    }

    #[test]
    fn repeated_l2_tables_stop_the_check() {
        // 64 L1 entries (the whole L1 cluster) all naming the one L2 table: more walks than the file has
        // clusters.
        let mut img = tiny_qcow2();
        img[36..40].copy_from_slice(&64u32.to_be_bytes());
        for i in 0..64 {
            let at = 3 * 512 + 8 * i;
            img[at..at + 8].copy_from_slice(&((4u64 * 512) | (1 << 63)).to_be_bytes());
        }
        let mut dev = MemDevice::new(&img[..]);
        let r = check(&mut dev, &mut [0u8; 512], &mut [0u8; 64], &mut NoSink);
        assert!(matches!(r, Err(Error::Corrupt { .. })), "{r:?}");
        // A few repeats are counted, as QEMU counts them.
        let mut img = tiny_qcow2();
        img[3 * 512 + 8..3 * 512 + 16].copy_from_slice(&((4u64 * 512) | (1 << 63)).to_be_bytes());
        let (r, _) = run(&img, 64);
        assert!(r.corruptions >= 1);
    }

    #[test]
    fn hostile_headers_give_errors() {
        let mut img = tiny_qcow2();
        img[0] = 0;
        let mut dev = MemDevice::new(&img[..]);
        assert!(check(&mut dev, &mut [0u8; 512], &mut [0u8; 64], &mut NoSink).is_err());
        let img = tiny_qcow2();
        let mut dev = MemDevice::new(&img[..]);
        assert!(matches!(
            check(&mut dev, &mut [0u8; 512], &mut [0u8; 3], &mut NoSink),
            Err(Error::BufferTooSmall { .. })
        ));
    }
}
