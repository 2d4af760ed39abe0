//! What the check finds: [`Problem`] with the line qemu-img prints for each, and the [`ShortName`] of a
//! snapshot that some of them carry.

use core::fmt;

use super::SNAPSHOT_NAME_LEN;

/// A snapshot's id or name as a [`Problem`] carries it (at most [`SNAPSHOT_NAME_LEN`] bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ShortName {
    pub(super) bytes: [u8; SNAPSHOT_NAME_LEN],
    pub(super) len: u8,
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

pub(super) fn verb(repairing: bool) -> &'static str {
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
