//! Guarding the image's own metadata against writes: where the metadata lives, verified once before the
//! first write and consulted before every write and every free.
//!
//! An image's metadata may lie: a refcount of 0 on a live table, an L2 entry or a bitmap table naming a
//! cluster that holds an L2 table, a refcount block or the header. Writing through such an entry would damage
//! what the write did not touch. So, before anything lands:
//!
//! - Before the first write, [`Meta::verify_metadata`] walks the metadata once (work proportional to the
//!   image's metadata, never to its data or virtual size): every metadata cluster (header, active L1,
//!   refcount table and blocks, active L2 tables, snapshot table, snapshots' L1 tables and their L2 tables,
//!   bitmap directory and tables) must have a refcount of at least 1, or the allocator would hand it out as
//!   free. It fills the filter below. Then [`Meta::verify_references`] lists every metadata cluster in the
//!   metadata cache's buffer (empty at that point; 8 bytes a cluster), sorts the list, refuses when two
//!   structures share a cluster, and reads every active L2 table to refuse when an entry names a listed
//!   cluster. When the list does not fit, that step is skipped and the checks below carry the load.
//! - On every request, the host clusters that the request would write in place or free (what the L2 entries
//!   of its range name) are checked exactly: against the fixed places (header cluster, active L1, refcount
//!   table, snapshot table, bitmap directory while the bitmaps are live), the clusters of cached tables, and
//!   the tables named by other tables, which a fixed-size filter of their clusters ([`MetadataFilter`],
//!   2048 bits) rules out for most clusters and a scan of the naming tables settles for the rest.
//! - Clusters the allocator hands out have refcount 0, so they are none of the verified tables; they, new L2
//!   tables, new refcount blocks and a grown refcount table are still checked against the fixed places and
//!   the cache, and the engine's new tables go into the filter.
//!
//! A refusal sets the corrupt bit (as QEMU's overlap check does), stops writing, and changes nothing else: the
//! checks run before the request writes anything. What stays possible: a data cluster whose refcount is lower
//! than the L2 entries naming it can be handed out again (telling would take a full check); without the
//! sorted list (more metadata clusters than the cache's buffer holds), an entry that names metadata is only
//! caught when a request reaches it, and once the filter fills, in-place writes scan the L1 and refcount
//! tables each time (slower, never less safe). Only the first [`VERIFY_EXACT_SCANS`] filter collisions of the
//! first walk are checked for two structures sharing a cluster (the sorted list checks all of them).

mod references;
mod verify;

use super::{Meta, split_bounce};
use crate::Error;
use crate::device::BlockDeviceWrite;
use crate::format::bitmap::{DIR_ENTRY_LEN, DirectoryWalk};
use crate::format::{
    AutoclearFeatures, ClusterKind, L1Entry, L2Entry, L2Format, MAX_HOST_OFFSET,
    MAX_SNAPSHOT_EXTRA, MAX_SNAPSHOT_TABLE_BYTES, OFFSET_MASK, REFTABLE_OFFSET_MASK,
    SNAPSHOT_FIXED_LEN, SnapshotEntryLayout, be64,
};
use crate::io::{ceil_div, read_bytes};

/// 64-bit words of the metadata filter (2048 bits).
const FILTER_WORDS: usize = 32;
/// How many filter collisions [`Meta::verify_metadata`] resolves with a scan of the tables.
pub const VERIFY_EXACT_SCANS: u32 = 64;
/// Bytes of a table read at once when scanning into a stack buffer (the part of the bounce buffer past its
/// first block is used instead when it is at least [`BIG_CHUNK`] bytes: heap-backed images scan in large
/// reads, firmware keeps its stack small).
pub(in crate::write) const SCAN_CHUNK: usize = 128;
/// Smallest spare bounce buffer worth scanning with.
const BIG_CHUNK: usize = 512;

/// Which host clusters may hold a table named by another table (a Bloom filter with one hash): no false
/// negatives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MetadataFilter {
    bits: [u64; FILTER_WORDS],
}

impl Default for MetadataFilter {
    fn default() -> Self {
        MetadataFilter {
            bits: [0; FILTER_WORDS],
        }
    }
}

impl MetadataFilter {
    fn position(cluster: u64) -> (usize, u64) {
        // Fibonacci hashing to 11 bits.
        let h = cluster.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 53;
        ((h >> 6) as usize, 1u64 << (h & 63))
    }

    /// Adds host cluster `cluster`; returns whether it may have been there already.
    pub(crate) fn insert(&mut self, cluster: u64) -> bool {
        let (word, bit) = Self::position(cluster);
        match self.bits.get_mut(word) {
            Some(w) => {
                let had = *w & bit != 0;
                *w |= bit;
                had
            }
            None => true,
        }
    }

    /// Whether host cluster `cluster` may have been added.
    pub(crate) fn may_contain(&self, cluster: u64) -> bool {
        let (word, bit) = Self::position(cluster);
        self.bits.get(word).is_none_or(|w| w & bit != 0)
    }
}

/// A metadata structure of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Structure {
    Header,
    L1,
    RefcountTable,
    RefcountBlock,
    L2,
    SnapshotTable,
    SnapshotL1,
    SnapshotL2,
    BitmapDirectory,
    BitmapTable,
    Cached,
}

impl Structure {
    /// Why a write into the structure is refused.
    fn overlap_message(self) -> &'static str {
        match self {
            Structure::Header => "a write would overwrite the image header",
            Structure::L1 => "a write would overwrite the active L1 table",
            Structure::RefcountTable => "a write would overwrite the refcount table",
            Structure::RefcountBlock => "a write would overwrite a refcount block",
            Structure::L2 => "a write would overwrite an active L2 table",
            Structure::SnapshotTable => "a write would overwrite the snapshot table",
            Structure::SnapshotL1 => "a write would overwrite a snapshot's L1 table",
            Structure::SnapshotL2 => "a write would overwrite a snapshot's L2 table",
            Structure::BitmapDirectory => "a write would overwrite the bitmap directory",
            Structure::BitmapTable => "a write would overwrite a bitmap table",
            Structure::Cached => "a write would overwrite a metadata table in use",
        }
    }

    /// Why writing is refused when a cluster of the structure has refcount 0.
    fn zero_refcount_message(self) -> &'static str {
        match self {
            Structure::Header => "the header cluster has refcount 0",
            Structure::L1 => "a cluster of the active L1 table has refcount 0",
            Structure::RefcountTable => "a cluster of the refcount table has refcount 0",
            Structure::RefcountBlock => "a refcount block has refcount 0",
            Structure::L2 => "an active L2 table has refcount 0",
            Structure::SnapshotTable => "a cluster of the snapshot table has refcount 0",
            Structure::SnapshotL1 => "a cluster of a snapshot's L1 table has refcount 0",
            Structure::SnapshotL2 => "an L2 table of a snapshot has refcount 0",
            Structure::BitmapDirectory => "a cluster of the bitmap directory has refcount 0",
            Structure::BitmapTable => "a cluster of a bitmap table has refcount 0",
            Structure::Cached => "a metadata table in use has refcount 0",
        }
    }

    /// Why writing is refused when a table named by another table lies in another structure.
    fn shared_message(self) -> &'static str {
        match self {
            Structure::RefcountBlock => "a refcount block lies in another metadata structure",
            Structure::L2 => "an active L2 table lies in another metadata structure",
            Structure::SnapshotL1 => "a snapshot's L1 table lies in another metadata structure",
            Structure::SnapshotL2 => "a snapshot's L2 table lies in another metadata structure",
            Structure::BitmapTable => "a bitmap table lies in another metadata structure",
            _ => "two metadata structures share a cluster",
        }
    }
}

/// How many times the tables name one host cluster, by the kind of table it would be.
#[derive(Debug, Default, Clone, Copy)]
struct Names {
    refcount_blocks: u32,
    l2_tables: u32,
    snapshot_l1_tables: u32,
    snapshot_l2_tables: u32,
    bitmap_tables: u32,
}

impl Names {
    /// The structures that hold the cluster: a snapshot's L2 table may also be an active one (shared), any
    /// other pair is one too many.
    fn owners(&self) -> u32 {
        let inactive = u32::from(self.snapshot_l2_tables != 0 && self.l2_tables == 0);
        self.refcount_blocks
            .saturating_add(self.l2_tables)
            .saturating_add(self.snapshot_l1_tables)
            .saturating_add(self.bitmap_tables)
            .saturating_add(inactive)
    }

    fn first(&self) -> Option<Structure> {
        if self.refcount_blocks != 0 {
            Some(Structure::RefcountBlock)
        } else if self.l2_tables != 0 {
            Some(Structure::L2)
        } else if self.snapshot_l1_tables != 0 {
            Some(Structure::SnapshotL1)
        } else if self.snapshot_l2_tables != 0 {
            Some(Structure::SnapshotL2)
        } else if self.bitmap_tables != 0 {
            Some(Structure::BitmapTable)
        } else {
            None
        }
    }
}

/// Whether host cluster `host` (cluster-aligned, `cluster_size` bytes) overlaps `[offset, offset + len)`.
fn cluster_in(host: u64, cluster_size: u64, offset: u64, len: u64) -> bool {
    len != 0 && host < offset.saturating_add(len) && offset < host.saturating_add(cluster_size)
}

impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    fn bitmaps_live(&self) -> bool {
        self.bitmaps.is_some()
            && self
                .header
                .autoclear_features
                .contains(AutoclearFeatures::BITMAPS)
    }

    /// The fixed structure (or cached table) that host cluster `host` lies in, if any.
    fn fixed_structure_at(&self, host: u64) -> Option<Structure> {
        let g = self.g;
        let h = &*self.header;
        let cs = g.tables.cluster_size;
        if host < cs {
            return Some(Structure::Header);
        }
        if cluster_in(
            host,
            cs,
            g.tables.l1_table_offset,
            g.tables.l1_size.saturating_mul(8),
        ) {
            return Some(Structure::L1);
        }
        if cluster_in(
            host,
            cs,
            g.tables.refcount_table_offset,
            g.tables.refcount_table_entries.saturating_mul(8),
        ) {
            return Some(Structure::RefcountTable);
        }
        if h.nb_snapshots != 0
            && cluster_in(
                host,
                cs,
                h.snapshots_offset,
                self.w.snapshot_table_len.max(1),
            )
        {
            return Some(Structure::SnapshotTable);
        }
        if let Some(b) = self.bitmaps
            && self.bitmaps_live()
            && cluster_in(host, cs, b.directory_offset, b.directory_size.max(1))
        {
            return Some(Structure::BitmapDirectory);
        }
        None
    }

    /// The structure host cluster `host` lies in: the fixed ones and the cached tables always, the tables
    /// named by other tables when `exact` (scanning them where the filter cannot rule the cluster out).
    fn structure_at(
        &mut self,
        host: u64,
        exact: bool,
    ) -> Result<Option<Structure>, Error<D::Error>> {
        if let Some(s) = self.fixed_structure_at(host) {
            return Ok(Some(s));
        }
        if self
            .cache
            .overlaps_cluster(0, host, 1, self.g.tables.cluster_size)
        {
            return Ok(Some(Structure::Cached));
        }
        if !exact || !self.w.filter.may_contain(host >> self.g.cluster_bits) {
            return Ok(None);
        }
        Ok(self.names_of(host)?.first())
    }

    /// Refuses (and marks the image corrupt) unless host bytes `[host, host + len)` are clear of the image's
    /// metadata. `exact`: also the tables named by other tables (for clusters that an entry names, which may
    /// lie); without it, the fixed structures and cached tables (for clusters the allocator hands out).
    pub(super) fn guard(
        &mut self,
        host: u64,
        len: u64,
        exact: bool,
    ) -> Result<(), Error<D::Error>> {
        let cs = self.g.tables.cluster_size;
        let mut c = host & !cs.wrapping_sub(1);
        let end = host.saturating_add(len);
        while c < end {
            if let Some(s) = self.structure_at(c, exact)? {
                return Err(self.mark_corrupt(s.overlap_message(), host));
            }
            c = c.saturating_add(cs);
        }
        Ok(())
    }

    /// Whether host cluster `host` lies in a structure the image's tables place or name (exact), without
    /// counting the cache: a cluster whose slices the engine has cached as bitmap data is not metadata.
    pub(in crate::write) fn holds_named_metadata(
        &mut self,
        host: u64,
    ) -> Result<bool, Error<D::Error>> {
        let c = host & !self.g.tables.cluster_size.wrapping_sub(1);
        if self.fixed_structure_at(c).is_some() {
            return Ok(true);
        }
        if !self.w.filter.may_contain(c >> self.g.cluster_bits) {
            return Ok(false);
        }
        Ok(self.names_of(c)?.first().is_some())
    }

    /// Records host cluster `host` as a table the engine has just allocated.
    pub(super) fn note_table(&mut self, host: u64) {
        let _ = self.w.filter.insert(host >> self.g.cluster_bits);
    }

    /// Reads the next chunk of the 8-byte table at `table` from entry `from` (at most `chunk.len() / 8`
    /// entries, fewer at the end); returns how many entries were read.
    pub(in crate::write) fn read_table_chunk(
        &mut self,
        table: u64,
        from: u64,
        entries: u64,
        chunk: &mut [u8; SCAN_CHUNK],
    ) -> Result<usize, Error<D::Error>> {
        let n = entries.saturating_sub(from).min((SCAN_CHUNK / 8) as u64) as usize;
        let bs = self.dev.block_size();
        let (bounce, _) = split_bounce(self.bounce, bs);
        let part = chunk.get_mut(..n.saturating_mul(8)).unwrap_or(&mut []);
        read_bytes(
            self.dev,
            bounce,
            table.saturating_add(from.saturating_mul(8)),
            part,
        )?;
        Ok(n)
    }

    /// How many of the `entries` 8-byte entries of the table at `table` name host cluster `host` (under
    /// `mask`).
    fn count_in_table(
        &mut self,
        table: u64,
        entries: u64,
        mask: u64,
        host: u64,
    ) -> Result<u32, Error<D::Error>> {
        let mut count = 0u32;
        for_each_word(self.dev, self.bounce, table, entries, |_, word| {
            if word & mask == host {
                count = count.saturating_add(1);
            }
            true
        })?;
        Ok(count)
    }
}

/// Reads `part` at `at` of `dev` through the first block of `bounce`.
fn read_part<D: BlockDeviceWrite>(
    dev: &mut D,
    bounce: &mut [u8],
    at: u64,
    part: &mut [u8],
) -> Result<(), Error<D::Error>> {
    let bs = dev.block_size();
    let (b, _) = split_bounce(bounce, bs);
    read_bytes(dev, b, at, part)
}

/// Calls `f` with each 8-byte entry of the table of `entries` entries at `table` (and the entry's host
/// offset), until it returns `false`. Returns whether every entry was visited.
fn for_each_word<D: BlockDeviceWrite, F: FnMut(u64, u64) -> bool>(
    dev: &mut D,
    bounce: &mut [u8],
    table: u64,
    entries: u64,
    mut f: F,
) -> Result<bool, Error<D::Error>> {
    let bs = dev.block_size();
    let (block, rest) = split_bounce(bounce, bs);
    let mut stack = [0u8; SCAN_CHUNK];
    let chunk: &mut [u8] = if rest.len() >= BIG_CHUNK {
        rest
    } else {
        &mut stack[..]
    };
    let per_chunk = (chunk.len() / 8) as u64;
    let mut i = 0u64;
    while i < entries {
        let n = entries.saturating_sub(i).min(per_chunk) as usize;
        let part = chunk.get_mut(..n.saturating_mul(8)).unwrap_or(&mut []);
        read_bytes(dev, block, table.saturating_add(i.saturating_mul(8)), part)?;
        for k in 0..n {
            let at = table.saturating_add(i.saturating_add(k as u64).saturating_mul(8));
            if !f(at, be64(part, k.saturating_mul(8))) {
                return Ok(false);
            }
        }
        i = i.saturating_add(n as u64);
    }
    Ok(true)
}

/// The L2 table an L1 entry names (0 for none or an invalid entry, which is refused where it is used).
fn l2_table_of(word: u64, cluster_size: u64) -> u64 {
    match L1Entry(word).l2_offset(cluster_size) {
        Ok(Some(h)) => h,
        _ => 0,
    }
}
