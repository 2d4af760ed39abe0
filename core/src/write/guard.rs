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
const SCAN_CHUNK: usize = 128;
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
        let cs = g.cluster_size;
        if host < cs {
            return Some(Structure::Header);
        }
        if cluster_in(host, cs, g.l1_table_offset, g.l1_size.saturating_mul(8)) {
            return Some(Structure::L1);
        }
        if cluster_in(
            host,
            cs,
            g.refcount_table_offset,
            g.refcount_table_entries.saturating_mul(8),
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
        if self.cache.overlaps_cluster(0, host, 1, self.g.cluster_size) {
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
        let cs = self.g.cluster_size;
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

    /// Whether host cluster `host` may be freed: it lies in no metadata structure (exact check).
    pub(super) fn is_metadata(&mut self, host: u64) -> Result<bool, Error<D::Error>> {
        Ok(self
            .structure_at(host & !self.g.cluster_size.wrapping_sub(1), true)?
            .is_some())
    }

    /// Records host cluster `host` as a table the engine has just allocated.
    pub(super) fn note_table(&mut self, host: u64) {
        let _ = self.w.filter.insert(host >> self.g.cluster_bits);
    }

    /// Reads the next chunk of the 8-byte table at `table` from entry `from` (at most `chunk.len() / 8`
    /// entries, fewer at the end); returns how many entries were read.
    fn read_table_chunk(
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

    /// How the tables of the image name host cluster `host`: a full scan of the refcount table, the L1 table,
    /// the snapshot table and each snapshot's L1 table, and the bitmap directory.
    fn names_of(&mut self, host: u64) -> Result<Names, Error<D::Error>> {
        let g = self.g;
        let cs = g.cluster_size;
        let mut names = Names {
            refcount_blocks: self.count_in_table(
                g.refcount_table_offset,
                g.refcount_table_entries,
                REFTABLE_OFFSET_MASK,
                host,
            )?,
            l2_tables: self.count_in_table(g.l1_table_offset, g.l1_size, OFFSET_MASK, host)?,
            ..Names::default()
        };
        let nb = self.header.nb_snapshots;
        let mut at = self.header.snapshots_offset;
        for _ in 0..nb {
            let Some(s) = self.snapshot_at(at)? else {
                break;
            };
            let l1_bytes = u64::from(s.l1_size).saturating_mul(8);
            if cluster_in(host, cs, s.l1_table_offset, l1_bytes) {
                names.snapshot_l1_tables = names.snapshot_l1_tables.saturating_add(1);
            }
            let n = self.count_in_table(s.l1_table_offset, s.l1_size.into(), OFFSET_MASK, host)?;
            names.snapshot_l2_tables = names.snapshot_l2_tables.saturating_add(n);
            at = at.saturating_add(s.entry_len());
        }
        if let Some(b) = self.bitmaps
            && self.bitmaps_live()
        {
            let mut walk = DirectoryWalk::new(&b, cs, self.header.size);
            while let Some(e) = self.bitmap_entry(&mut walk)? {
                if cluster_in(host, cs, e.table_offset, e.table_bytes()) {
                    names.bitmap_tables = names.bitmap_tables.saturating_add(1);
                }
            }
        }
        Ok(names)
    }

    /// The snapshot table entry at `at`, if it is one the engine can walk past.
    fn snapshot_at(&mut self, at: u64) -> Result<Option<SnapshotEntryLayout>, Error<D::Error>> {
        let mut fixed = [0u8; SNAPSHOT_FIXED_LEN];
        let bs = self.dev.block_size();
        let (bounce, _) = split_bounce(self.bounce, bs);
        read_bytes(self.dev, bounce, at, &mut fixed)?;
        let s = SnapshotEntryLayout::parse(&fixed);
        let table_end = self
            .header
            .snapshots_offset
            .saturating_add(MAX_SNAPSHOT_TABLE_BYTES);
        let fits = at.saturating_add(s.entry_len()) <= table_end;
        Ok((s.extra_len <= MAX_SNAPSHOT_EXTRA && fits).then_some(s))
    }

    /// The snapshot table's length in bytes (refused when an entry cannot be walked past, as QEMU refuses
    /// to open such an image).
    fn snapshot_table_len(&mut self) -> Result<u64, Error<D::Error>> {
        let start = self.header.snapshots_offset;
        let mut at = start;
        for _ in 0..self.header.nb_snapshots {
            let Some(s) = self.snapshot_at(at)? else {
                return Err(super::corrupt(
                    "snapshot table entry is invalid or the table is larger than 64 MiB",
                    at,
                ));
            };
            at = at.saturating_add(s.entry_len());
        }
        Ok(at.saturating_sub(start))
    }

    /// Checks one cluster of a fixed structure: its refcount is not 0.
    fn verify_fixed(&mut self, offset: u64, len: u64, s: Structure) -> Result<(), Error<D::Error>> {
        let cs = self.g.cluster_size;
        let mut host = offset & !cs.wrapping_sub(1);
        let end = offset.saturating_add(len);
        while host < end && host <= MAX_HOST_OFFSET {
            if self.refcount(host >> self.g.cluster_bits)? == 0 {
                return Err(super::corrupt(s.zero_refcount_message(), host));
            }
            host = host.saturating_add(cs);
        }
        Ok(())
    }

    /// Checks one cluster of a table named by another table: not in a fixed structure, not a second
    /// structure (as far as the scan budget goes), refcount not 0. Adds it to the filter.
    fn verify_named(
        &mut self,
        host: u64,
        s: Structure,
        scans: &mut u32,
    ) -> Result<(), Error<D::Error>> {
        let cs = self.g.cluster_size;
        if host == 0 || host & cs.wrapping_sub(1) != 0 || host > MAX_HOST_OFFSET {
            // Not a table the engine would use: an invalid entry is refused where it is met.
            return Ok(());
        }
        if self.fixed_structure_at(host).is_some() {
            return Err(super::corrupt(s.shared_message(), host));
        }
        let seen = self.w.filter.insert(host >> self.g.cluster_bits);
        if seen && *scans < VERIFY_EXACT_SCANS {
            *scans = scans.saturating_add(1);
            // A snapshot's L1 table spans clusters: its own entry names each of them once.
            if self.names_of(host)?.owners() > 1 {
                return Err(super::corrupt(s.shared_message(), host));
            }
        }
        if self.refcount(host >> self.g.cluster_bits)? == 0 {
            return Err(super::corrupt(s.zero_refcount_message(), host));
        }
        Ok(())
    }

    /// Checks every table of the 8-byte table at `table` (`entries` entries under `mask`) as structure `s`.
    fn verify_table_entries(
        &mut self,
        table: u64,
        entries: u64,
        s: Structure,
        scans: &mut u32,
    ) -> Result<(), Error<D::Error>> {
        let mut chunk = [0u8; SCAN_CHUNK];
        let mut i = 0u64;
        while i < entries {
            let n = self.read_table_chunk(table, i, entries, &mut chunk)?;
            if n == 0 {
                break;
            }
            for k in 0..n {
                let word = be64(&chunk, k.saturating_mul(8));
                let host = if s == Structure::RefcountBlock {
                    word & REFTABLE_OFFSET_MASK
                } else {
                    // Entries with reserved bits are refused where they are used.
                    match L1Entry(word).l2_offset(self.g.cluster_size) {
                        Ok(Some(h)) => h,
                        _ => 0,
                    }
                };
                self.verify_named(host, s, scans)?;
            }
            i = i.saturating_add(n as u64);
        }
        Ok(())
    }

    /// Walks the image's metadata once before the first write (see the module comment): every metadata
    /// cluster must have a refcount of at least 1 and hold one structure. Fills the filter.
    pub(super) fn verify_metadata(&mut self) -> Result<(), Error<D::Error>> {
        let g = self.g;
        let cs = g.cluster_size;
        let mut scans = 0u32;
        self.w.snapshot_table_len = self.snapshot_table_len()?;
        self.verify_fixed(0, cs, Structure::Header)?;
        self.verify_fixed(
            g.l1_table_offset,
            g.l1_size.saturating_mul(8),
            Structure::L1,
        )?;
        self.verify_fixed(
            g.refcount_table_offset,
            g.refcount_table_entries.saturating_mul(8),
            Structure::RefcountTable,
        )?;
        let (nb, snapshots) = (self.header.nb_snapshots, self.header.snapshots_offset);
        if nb != 0 {
            let len = self.w.snapshot_table_len;
            self.verify_fixed(snapshots, len, Structure::SnapshotTable)?;
        }
        if let Some(b) = self.bitmaps
            && self.bitmaps_live()
        {
            self.verify_fixed(
                b.directory_offset,
                b.directory_size,
                Structure::BitmapDirectory,
            )?;
        }
        self.verify_table_entries(
            g.refcount_table_offset,
            g.refcount_table_entries,
            Structure::RefcountBlock,
            &mut scans,
        )?;
        self.verify_table_entries(g.l1_table_offset, g.l1_size, Structure::L2, &mut scans)?;
        let mut at = snapshots;
        for _ in 0..nb {
            let Some(s) = self.snapshot_at(at)? else {
                break;
            };
            let l1_bytes = u64::from(s.l1_size).saturating_mul(8);
            let clusters = ceil_div(l1_bytes, cs);
            let first = s.l1_table_offset & !cs.wrapping_sub(1);
            for k in 0..clusters {
                self.verify_named(
                    first.saturating_add(k.saturating_mul(cs)),
                    Structure::SnapshotL1,
                    &mut scans,
                )?;
            }
            self.verify_table_entries(
                s.l1_table_offset,
                s.l1_size.into(),
                Structure::SnapshotL2,
                &mut scans,
            )?;
            at = at.saturating_add(s.entry_len());
        }
        if let Some(b) = self.bitmaps
            && self.bitmaps_live()
        {
            let mut walk = DirectoryWalk::new(&b, cs, self.header.size);
            while let Some(e) = self.bitmap_entry(&mut walk)? {
                let clusters = ceil_div(e.table_bytes(), cs);
                for k in 0..clusters {
                    self.verify_named(
                        e.table_offset.saturating_add(k.saturating_mul(cs)),
                        Structure::BitmapTable,
                        &mut scans,
                    )?;
                }
            }
        }
        Ok(())
    }
}

/// Kinds of metadata cluster in the sorted list of [`Meta::verify_references`], kept in the low bits of each
/// (cluster-aligned) host offset.
const KIND_MASK: u64 = 0xf;

fn kind_code(s: Structure) -> u64 {
    match s {
        Structure::Header => 0,
        Structure::L1 => 1,
        Structure::RefcountTable => 2,
        Structure::RefcountBlock => 3,
        Structure::L2 => 4,
        Structure::SnapshotTable => 5,
        Structure::SnapshotL1 => 6,
        Structure::SnapshotL2 => 7,
        Structure::BitmapDirectory => 8,
        Structure::BitmapTable => 9,
        Structure::Cached => 10,
    }
}

/// The host clusters of the image's metadata, in the caller's metadata cache buffer (used as scratch memory
/// while nothing is cached): 8-byte big-endian entries, host offset | kind.
struct MetadataList<'a> {
    entries: &'a mut [[u8; 8]],
    len: usize,
    cluster_size: u64,
}

impl MetadataList<'_> {
    /// Adds the clusters of `[offset, offset + len)` as `s`; `false` when the list is full.
    fn push_range(&mut self, offset: u64, len: u64, s: Structure) -> bool {
        let cs = self.cluster_size;
        let mut host = offset & !cs.wrapping_sub(1);
        let end = offset.saturating_add(len);
        while host < end {
            if !self.push(host, s) {
                return false;
            }
            host = host.saturating_add(cs);
        }
        true
    }

    fn push(&mut self, host: u64, s: Structure) -> bool {
        if host > MAX_HOST_OFFSET || host & self.cluster_size.wrapping_sub(1) != 0 {
            // Not a cluster any table could be at: an invalid entry is refused where it is used.
            return true;
        }
        match self.entries.get_mut(self.len) {
            Some(e) => {
                *e = (host | kind_code(s)).to_be_bytes();
                self.len = self.len.saturating_add(1);
                true
            }
            None => false,
        }
    }

    fn sorted(&mut self) -> &[[u8; 8]] {
        let list = self.entries.get_mut(..self.len).unwrap_or(&mut []);
        heapsort(list);
        list
    }
}

/// Sorts `list` in place (a heapsort: small, no allocation, and no panic path, unlike the standard library's
/// sorts).
fn heapsort(list: &mut [[u8; 8]]) {
    let n = list.len();
    let mut start = n / 2;
    while start > 0 {
        start = start.saturating_sub(1);
        sift_down(list, start, n);
    }
    let mut end = n;
    while end > 1 {
        end = end.saturating_sub(1);
        swap(list, 0, end);
        sift_down(list, 0, end);
    }
}

/// Restores the max-heap order below `root` in `list[..end]`.
fn sift_down(list: &mut [[u8; 8]], mut root: usize, end: usize) {
    loop {
        let left = root.saturating_mul(2).saturating_add(1);
        if left >= end {
            return;
        }
        let right = left.saturating_add(1);
        let mut child = left;
        if right < end && list.get(right) > list.get(left) {
            child = right;
        }
        if list.get(child) <= list.get(root) {
            return;
        }
        swap(list, root, child);
        root = child;
    }
}

fn swap(list: &mut [[u8; 8]], a: usize, b: usize) {
    let (Some(&x), Some(&y)) = (list.get(a), list.get(b)) else {
        return;
    };
    if let Some(v) = list.get_mut(a) {
        *v = y;
    }
    if let Some(v) = list.get_mut(b) {
        *v = x;
    }
}

/// The first cluster that two structures share (host offset), if any: an L2 table may be both active and a
/// snapshot's, any other pair is refused.
fn shared_cluster(sorted: &[[u8; 8]]) -> Option<u64> {
    let l2 = kind_code(Structure::L2);
    let snapshot_l2 = kind_code(Structure::SnapshotL2);
    let mut i = 0usize;
    while let Some(first) = sorted.get(i) {
        let host = u64::from_be_bytes(*first) & !KIND_MASK;
        let mut j = i;
        let mut active = 0u32;
        let mut other = 0u32;
        while let Some(e) = sorted.get(j) {
            let v = u64::from_be_bytes(*e);
            if v & !KIND_MASK != host {
                break;
            }
            match v & KIND_MASK {
                k if k == l2 => active = active.saturating_add(1),
                k if k == snapshot_l2 => {}
                _ => other = other.saturating_add(1),
            }
            j = j.saturating_add(1);
        }
        let group = j.saturating_sub(i);
        if group > 1 && (other != 0 || active > 1) {
            return Some(host);
        }
        i = j;
    }
    None
}

/// Whether any cluster of `[offset, offset + len)` is in the sorted list.
fn holds_metadata(sorted: &[[u8; 8]], offset: u64, len: u64, cluster_size: u64) -> bool {
    let mut host = offset & !cluster_size.wrapping_sub(1);
    let end = offset.saturating_add(len.max(1));
    while host < end {
        let at = sorted.partition_point(|e| u64::from_be_bytes(*e) & !KIND_MASK < host);
        if sorted
            .get(at)
            .is_some_and(|e| u64::from_be_bytes(*e) & !KIND_MASK == host)
        {
            return true;
        }
        host = host.saturating_add(cluster_size);
    }
    false
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

impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// The second half of the verification before the first write, in the metadata cache's buffer (empty
    /// then): lists every metadata cluster, refuses when two structures share one, then reads every active L2
    /// table and refuses when an entry names a cluster that holds metadata (writing elsewhere could then change
    /// what that entry reads, and writing or freeing through it would damage the table). Returns `false`,
    /// doing nothing, when the list does not fit the buffer (8 bytes a metadata cluster); the checks of single
    /// writes still apply then.
    pub(super) fn verify_references(&mut self) -> Result<bool, Error<D::Error>> {
        let g = self.g;
        let cs = g.cluster_size;
        let h = *self.header;
        let snapshot_len = self.w.snapshot_table_len;
        let bitmaps = self.bitmaps.filter(|_| self.bitmaps_live());
        let Meta {
            dev, bounce, cache, ..
        } = self;
        let scratch = cache.scratch()?;
        let (entries, _) = scratch.as_chunks_mut::<8>();
        let mut list = MetadataList {
            entries,
            len: 0,
            cluster_size: cs,
        };
        let mut fits = list.push_range(0, cs, Structure::Header)
            && list.push_range(
                g.l1_table_offset,
                g.l1_size.saturating_mul(8),
                Structure::L1,
            )
            && list.push_range(
                g.refcount_table_offset,
                g.refcount_table_entries.saturating_mul(8),
                Structure::RefcountTable,
            );
        if fits && h.nb_snapshots != 0 {
            fits = list.push_range(h.snapshots_offset, snapshot_len, Structure::SnapshotTable);
        }
        if let Some(b) = bitmaps
            && fits
        {
            fits = list.push_range(
                b.directory_offset,
                b.directory_size,
                Structure::BitmapDirectory,
            );
        }
        if fits {
            fits = for_each_word(
                dev,
                bounce,
                g.refcount_table_offset,
                g.refcount_table_entries,
                |_, w| {
                    let block = w & REFTABLE_OFFSET_MASK;
                    block == 0 || list.push(block, Structure::RefcountBlock)
                },
            )?;
        }
        if fits {
            fits = for_each_word(dev, bounce, g.l1_table_offset, g.l1_size, |_, w| {
                let l2 = l2_table_of(w, cs);
                l2 == 0 || list.push(l2, Structure::L2)
            })?;
        }
        let mut at = h.snapshots_offset;
        for _ in 0..h.nb_snapshots {
            if !fits {
                break;
            }
            let mut fixed = [0u8; SNAPSHOT_FIXED_LEN];
            read_part(dev, bounce, at, &mut fixed)?;
            let s = SnapshotEntryLayout::parse(&fixed);
            let l1_bytes = u64::from(s.l1_size).saturating_mul(8);
            fits = list.push_range(s.l1_table_offset, l1_bytes, Structure::SnapshotL1)
                && for_each_word(dev, bounce, s.l1_table_offset, s.l1_size.into(), |_, w| {
                    let l2 = l2_table_of(w, cs);
                    l2 == 0 || list.push(l2, Structure::SnapshotL2)
                })?;
            at = at.saturating_add(s.entry_len());
        }
        if let Some(b) = bitmaps {
            let mut walk = DirectoryWalk::new(&b, cs, h.size);
            while fits {
                let Some(at) = walk.next_at() else {
                    break;
                };
                let mut raw = [0u8; DIR_ENTRY_LEN];
                read_part(dev, bounce, at, &mut raw)?;
                let Ok(found) = walk.advance(&raw) else {
                    break;
                };
                fits = list.push_range(
                    found.entry.table_offset,
                    found.entry.table_bytes(),
                    Structure::BitmapTable,
                );
            }
        }
        if !fits {
            cache.invalidate(None);
            return Ok(false);
        }
        let sorted = list.sorted();
        if let Some(host) = shared_cluster(sorted) {
            return Err(super::corrupt(
                "two metadata structures share a cluster; repair the image (check -r all)",
                host,
            ));
        }
        // Every entry of every active L2 table.
        let entry_words = g.l2_entry_size / 8;
        let mut bad = None;
        let mut l1_index = 0u64;
        while l1_index < g.l1_size && bad.is_none() {
            let mut word = [0u8; 8];
            read_part(
                dev,
                bounce,
                g.l1_table_offset.saturating_add(l1_index.saturating_mul(8)),
                &mut word,
            )?;
            l1_index = l1_index.saturating_add(1);
            let table = l2_table_of(u64::from_be_bytes(word), cs);
            if table == 0 || g.l2_format.external_data {
                continue;
            }
            let mut previous = 0u64;
            let _ = for_each_word(
                dev,
                bounce,
                table,
                g.l2_entries.saturating_mul(entry_words),
                |pos, w| {
                    // Extended L2: the word after each entry is its subcluster bitmap.
                    let index = pos.saturating_sub(table) / 8;
                    if entry_words == 2 && index % 2 == 1 {
                        let entry = L2Entry {
                            word: previous,
                            bitmap: w,
                        };
                        if let Some((host, len)) = entry_hosts(entry, g.l2_format, cs)
                            && holds_metadata(sorted, host, len, cs)
                        {
                            bad = Some(pos.saturating_sub(8));
                            return false;
                        }
                        return true;
                    }
                    previous = w;
                    if entry_words == 2 {
                        return true;
                    }
                    let entry = L2Entry { word: w, bitmap: 0 };
                    if let Some((host, len)) = entry_hosts(entry, g.l2_format, cs)
                        && holds_metadata(sorted, host, len, cs)
                    {
                        bad = Some(pos);
                        return false;
                    }
                    true
                },
            )?;
        }
        cache.invalidate(None);
        match bad {
            Some(pos) => Err(super::corrupt(
                "an L2 entry names a cluster that holds metadata; repair the image (check -r all)",
                pos,
            )),
            None => Ok(true),
        }
    }
}

/// The host bytes an L2 entry names in the image file (none for unallocated, zero without a preallocated
/// cluster, or an invalid entry).
fn entry_hosts(entry: L2Entry, format: L2Format, cluster_size: u64) -> Option<(u64, u64)> {
    match entry.classify(format).ok()? {
        ClusterKind::Data { host } | ClusterKind::Zero { host: Some(host) } => {
            Some((host, cluster_size))
        }
        ClusterKind::Compressed(d) => Some((d.offset, d.len)),
        ClusterKind::Unallocated | ClusterKind::Zero { host: None } => None,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::heapsort;

    #[test]
    fn heapsort_sorts() {
        let mut seed = 0x1234_5678_u64;
        for n in [0usize, 1, 2, 3, 10, 257] {
            let mut v: std::vec::Vec<[u8; 8]> = (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed % 50).to_be_bytes()
                })
                .collect();
            let mut want = v.clone();
            want.sort();
            heapsort(&mut v);
            assert_eq!(v, want, "n = {n}");
        }
    }
}
