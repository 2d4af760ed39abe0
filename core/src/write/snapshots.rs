//! Internal snapshots created and deleted, with QEMU's results byte for byte (but for what the caller gives:
//! the name and the date).
//!
//! - Create: the active L1 table is copied to new clusters; every cluster it references (L2 tables, data,
//!   the host clusters of compressed data) is counted once more and COPIED is cleared in the active tables;
//!   then the snapshot table, with the new entry at its end, is written to new clusters and committed by one
//!   header write (`nb_snapshots` and `snapshots_offset` together); the old table is freed after.
//! - Delete: the snapshot table without the entry is written and committed first; then every cluster the
//!   snapshot's L1 table references is counted once less (what no one else references is freed), the
//!   snapshot's L1 table is freed, and COPIED is recomputed in the active tables.
//!
//! Between the two halves of either, refcounts and COPIED flags disagree for a moment (they live in different
//! sectors); on a version 3 image the dirty bit is set for that time (with the `dirty-repair` feature), so
//! that a crash leaves an image whose next writable open rebuilds both. Every rewritten entry gets QEMU's 24
//! bytes of extra data (vm state size, disk size, icount). Freed clusters are discarded on the device, as
//! QEMU discards them. Memory stays bounded: tables are walked entry by entry through the metadata cache, and
//! entries copied chunk by chunk.

use super::*;
use crate::format::{
    MAX_SNAPSHOT_EXTRA, MAX_SNAPSHOT_TABLE_BYTES, SNAPSHOT_FIXED_LEN, SnapshotEntryLayout,
};

/// Bytes of extra data QEMU writes in every entry: vm state size (64-bit), disk size, icount.
const EXTRA_LEN: u32 = 24;
/// QEMU's limit on the number of internal snapshots.
const MAX_SNAPSHOTS: u32 = 65536;

/// A snapshot to create: its name and the times QEMU records.
#[derive(Debug, Clone, Copy)]
pub struct NewSnapshot<'a> {
    /// The name (at most 65535 bytes; qemu-img keeps 255).
    pub name: &'a [u8],
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Nanoseconds part of the creation time.
    pub date_nsec: u32,
    /// Guest clock at the snapshot, nanoseconds (0 for a snapshot taken outside a running guest).
    pub vm_clock_nsec: u64,
}

/// The entry a rewrite of the snapshot table adds at its end.
pub(super) struct Added<'a> {
    snapshot: &'a NewSnapshot<'a>,
    id: &'a [u8],
    l1_table_offset: u64,
    l1_size: u32,
    disk_size: u64,
}

impl<D, B, C, const DEPTH: usize, const SLICES: usize> Image<D, B, C, DEPTH, SLICES, WriteState>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// Creates an internal snapshot of the active disk, with the next free numeric id (one more than the
    /// largest there is, as QEMU numbers them). Names need not be unique.
    pub fn create_snapshot(&mut self, snapshot: &NewSnapshot<'_>) -> Result<(), Error<D::Error>> {
        if snapshot.name.len() > usize::from(u16::MAX) {
            return Err(Error::Unsupported {
                what: "a snapshot name longer than 65535 bytes",
                value: snapshot.name.len() as u64,
            });
        }
        self.refuse_external_data("creating a snapshot of an image with an external data file")?;
        self.begin_write()?;
        let disk_size = self.virtual_size();
        let mut m = self.meta()?;
        if m.header.nb_snapshots >= MAX_SNAPSHOTS {
            return Err(Error::NoSpace {
                what: "the image has 65536 snapshots already",
            });
        }
        let mut id_buf = [0u8; 20];
        let id = m.next_snapshot_id(&mut id_buf)?;
        m.around_dirty_bit(|m| {
            // The snapshot's L1 table: the active one as it is (its COPIED flags included, as QEMU copies it).
            let l1 = m.g.tables;
            let bytes = l1.l1_size.saturating_mul(8);
            let copy = if bytes == 0 {
                0
            } else {
                let clusters = ceil_div(bytes, l1.cluster_size);
                let host = m.alloc_table_clusters(clusters)?;
                m.note_table(host);
                m.copy_bytes(l1.l1_table_offset, host, bytes)?;
                host
            };
            let mut budget = u64::MAX;
            let counted =
                m.update_snapshot_refcount(l1.l1_table_offset, l1.l1_size, Some(true), &mut budget);
            if let Err(e) = counted {
                if !matches!(e, Error::Unsupported { .. }) {
                    return Err(e);
                }
                // A refcount would pass what refcount_bits holds: take back every count made, in the same
                // order, and leave the image as it was.
                let mut done = u64::MAX.saturating_sub(budget);
                m.update_snapshot_refcount(l1.l1_table_offset, l1.l1_size, Some(false), &mut done)?;
                let mut all = u64::MAX;
                m.update_snapshot_refcount(l1.l1_table_offset, l1.l1_size, None, &mut all)?;
                if copy != 0 {
                    m.free_range(copy, bytes)?;
                }
                return Ok(Some(e));
            }
            m.writeback_all()?;
            m.flush_dev()?;
            m.rewrite_snapshot_table(
                None,
                Some(&Added {
                    snapshot,
                    id,
                    l1_table_offset: copy,
                    l1_size: l1.l1_size as u32,
                    disk_size,
                }),
            )
            .map(|()| None)
        })?;
        self.end_write()
    }

    /// Deletes the internal snapshot whose table entry is at host offset `entry` (as [`Image::read_snapshot`]
    /// found it): the snapshot's clusters that nothing else references are freed.
    pub fn delete_snapshot(&mut self, entry: u64) -> Result<(), Error<D::Error>> {
        self.refuse_external_data("deleting a snapshot of an image with an external data file")?;
        self.begin_write()?;
        let mut m = self.meta()?;
        let s = m.find_entry(entry)?;
        crate::format::validate_snapshot_l1(s.l1_table_offset, s.l1_size, m.g.tables.cluster_size)
            .map_err(|_| corrupt("snapshot L1 table is invalid", entry))?;
        m.around_dirty_bit(|m| {
            m.rewrite_snapshot_table(Some(entry), None)?;
            let mut all = u64::MAX;
            m.update_snapshot_refcount(s.l1_table_offset, s.l1_size.into(), Some(false), &mut all)?;
            let bytes = u64::from(s.l1_size).saturating_mul(8);
            if bytes != 0 {
                m.free_range(s.l1_table_offset, bytes)?;
            }
            let active = m.g.tables;
            let mut all = u64::MAX;
            m.update_snapshot_refcount(active.l1_table_offset, active.l1_size, None, &mut all)?;
            m.writeback_all()?;
            m.flush_dev().map(|()| None)
        })?;
        self.end_write()
    }

    /// Makes the internal snapshot whose table entry is at host offset `entry` the active disk, at the
    /// snapshot's disk size: QEMU's `qemu-img snapshot -a`. What only the old active disk referenced is
    /// freed; the snapshot stays.
    ///
    /// Crash-safe: the snapshot's L1 table is first written to new clusters, and one header write switches
    /// the active table and the disk size together; after a crash the disk is the old one or the snapshot's.
    /// Where QEMU overwrites the active L1 table in place, the new table is then copied there and the header
    /// switched back, so that the result is QEMU's byte for byte.
    pub fn apply_snapshot(&mut self, entry: u64) -> Result<(), Error<D::Error>> {
        self.refuse_external_data("applying a snapshot of an image with an external data file")?;
        self.begin_write()?;
        let current = self.virtual_size();
        let mut m = self.meta()?;
        let s = m.find_entry(entry)?;
        crate::format::validate_snapshot_l1(s.l1_table_offset, s.l1_size, m.g.tables.cluster_size)
            .map_err(|_| corrupt("snapshot L1 table is invalid", entry))?;
        let size = if s.extra_len >= 16 {
            m.read_word(
                entry
                    .saturating_add(SNAPSHOT_FIXED_LEN as u64)
                    .saturating_add(8),
            )?
        } else {
            current
        };
        let mut resized = *m.header;
        resized.size = size;
        let needed = resized
            .l1_entries_needed()
            .filter(|&n| n <= crate::format::MAX_L1_BYTES / 8 && size <= i64::MAX as u64)
            .filter(|_| size.is_multiple_of(512))
            .ok_or(Error::Unsupported {
                what: "the snapshot's disk size",
                value: size,
            })?;
        // The guest view changes wholesale: every bit of the bitmaps is set, or, when the disk size changes
        // (which a bitmap's table cannot follow in place), the bitmaps are disowned.
        if size == current {
            m.mark_bitmaps(0, current)?;
        } else {
            m.disown_bitmaps()?;
        }
        m.around_dirty_bit(|m| m.apply(&s, current, size, needed))?;
        self.set_virtual_size(size)?;
        self.end_write()
    }

    pub(super) fn refuse_external_data(
        &mut self,
        what: &'static str,
    ) -> Result<(), Error<D::Error>> {
        if self.meta()?.header.external_data_file() {
            return Err(Error::Unsupported { what, value: 0 });
        }
        Ok(())
    }
}

impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// Runs `f` with the dirty bit set (version 3, `dirty-repair` builds, unless it is set already), and
    /// clears it once everything `f` wrote is durable. Freed clusters are discarded meanwhile.
    /// `f` returns `Ok(Some(e))` for a refusal after which the image is consistent again (the bit is cleared,
    /// and `e` returned); an `Err` leaves the bit set, for the next writable open to repair.
    fn around_dirty_bit<F>(&mut self, f: F) -> Result<(), Error<D::Error>>
    where
        F: FnOnce(&mut Self) -> Result<Option<Error<D::Error>>, Error<D::Error>>,
    {
        let mark = self.header.version >= 3 && cfg!(feature = "dirty-repair") && !self.w.dirty_bit;
        if mark {
            let bits = self.header.incompatible_features | IncompatibleFeatures::DIRTY;
            self.write_header(field::INCOMPATIBLE_FEATURES, &bits.bits().to_be_bytes())?;
            self.header.incompatible_features = bits;
        }
        self.w.discard_freed = true;
        let done = f(self);
        self.w.discard_freed = false;
        let refused = done?;
        if mark {
            self.commit_frees()?;
            self.writeback_all()?;
            self.flush_dev()?;
            let bits = self.header.incompatible_features & !IncompatibleFeatures::DIRTY;
            self.write_header(field::INCOMPATIBLE_FEATURES, &bits.bits().to_be_bytes())?;
            self.header.incompatible_features = bits;
        }
        refused.map_or(Ok(()), Err)
    }

    /// [`Image::apply_snapshot`]'s steps: the new active table written aside, the snapshot's clusters counted
    /// once more, one header write (size and L1 table), the old active table's references dropped, COPIED
    /// recomputed, and the table moved to where QEMU keeps it.
    fn apply(
        &mut self,
        sn: &SnapshotEntryLayout,
        current: u64,
        size: u64,
        needed: u64,
    ) -> Result<Option<Error<D::Error>>, Error<D::Error>> {
        let g = self.g;
        let cs = g.tables.cluster_size;
        let (old_offset, old_entries) = (g.tables.l1_table_offset, g.tables.l1_size);
        // QEMU grows the active table for a larger disk, then for a larger snapshot table; never shrinks it.
        let after_resize = if size > current {
            old_entries.max(needed)
        } else {
            old_entries
        };
        let entries = after_resize.max(sn.l1_size.into());
        let bytes = entries.saturating_mul(8);
        let sn_bytes = u64::from(sn.l1_size).saturating_mul(8);
        if let Some(c) = self.count_overflow(sn.l1_table_offset, sn.l1_size.into())? {
            return Ok(Some(Error::Unsupported {
                what: "a cluster's refcount would exceed the largest value refcount_bits can hold",
                value: c << g.cluster_bits,
            }));
        }
        let file_end = self.dev.size()?;
        let table = self.alloc_table_clusters(ceil_div(bytes, cs).max(1))?;
        self.note_table(table);
        self.writeback(SliceKind::Refcount)?;
        self.copy_bytes(sn.l1_table_offset, table, sn_bytes)?;
        if bytes > sn_bytes {
            self.write_zeros(
                table.saturating_add(sn_bytes),
                bytes.saturating_sub(sn_bytes),
            )?;
        }
        let table_end = table.saturating_add(bytes);
        if table_end > file_end {
            self.dev.set_size(table_end)?;
        }
        let mut all = u64::MAX;
        self.update_snapshot_refcount(sn.l1_table_offset, sn.l1_size.into(), Some(true), &mut all)?;
        self.writeback_all()?;
        self.flush_dev()?;
        // The switch: size, crypt_method (unchanged), l1_size and l1_table_offset are one 24-byte write.
        let mut fields = [0u8; 24];
        let parts: [(usize, &[u8]); 4] = [
            (0, &size.to_be_bytes()),
            (8, &self.header.crypt_method.to_be_bytes()),
            (12, &(entries as u32).to_be_bytes()),
            (16, &table.to_be_bytes()),
        ];
        for (at, b) in parts {
            let _ = copy_exact(
                fields
                    .get_mut(at..at.saturating_add(b.len()))
                    .unwrap_or(&mut []),
                b,
            );
        }
        self.write_header(field::SIZE, &fields)?;
        self.header.size = size;
        self.header.l1_size = entries as u32;
        self.header.l1_table_offset = table;
        self.g.tables.l1_size = entries;
        self.g.tables.l1_table_offset = table;
        // The old active table is intact where it was: drop its references, then recompute COPIED.
        let mut all = u64::MAX;
        self.update_snapshot_refcount(old_offset, old_entries, Some(false), &mut all)?;
        let mut all = u64::MAX;
        self.update_snapshot_refcount(table, entries, None, &mut all)?;
        self.commit_frees()?;
        self.writeback_all()?;
        self.flush_dev()?;
        let old_bytes = old_entries.saturating_mul(8);
        if entries == old_entries && old_bytes != 0 {
            // QEMU writes the snapshot's table over the active one in place: move it back there.
            self.cache.forget_range(0, old_offset, old_bytes);
            self.copy_bytes(table, old_offset, bytes)?;
            self.flush_dev()?;
            let mut l1 = [0u8; 12];
            let (n, offset) = l1.split_at_mut_checked(4).unwrap_or_default();
            let _ = copy_exact(n, &(entries as u32).to_be_bytes());
            let _ = copy_exact(offset, &old_offset.to_be_bytes());
            self.write_header(field::L1_SIZE, &l1)?;
            self.header.l1_table_offset = old_offset;
            self.g.tables.l1_table_offset = old_offset;
            self.cache.forget_range(0, table, bytes);
            self.free_range(table, bytes)?;
            if table >= file_end {
                self.dev.set_size(file_end)?;
            }
        } else if old_bytes != 0 {
            // QEMU moved to a larger table and freed the old one (without discarding it).
            self.w.discard_freed = false;
            let freed = self.free_range(old_offset, old_bytes);
            self.w.discard_freed = true;
            freed?;
            self.cache.forget_range(0, old_offset, old_bytes);
        }
        if size < current {
            // QEMU shrinks the disk first, which cuts the file after its last used cluster.
            self.trim_file()?;
        }
        Ok(None)
    }

    /// The table entry at host offset `entry`, which must be one of the table's entries.
    fn find_entry(&mut self, entry: u64) -> Result<SnapshotEntryLayout, Error<D::Error>> {
        let mut at = self.header.snapshots_offset;
        for _ in 0..self.header.nb_snapshots {
            let s = self.entry_at(at)?;
            if at == entry {
                return Ok(s);
            }
            at = at.saturating_add(s.entry_len());
        }
        Err(Error::Unsupported {
            what: "no snapshot table entry at that offset",
            value: entry,
        })
    }

    pub(super) fn entry_at(&mut self, at: u64) -> Result<SnapshotEntryLayout, Error<D::Error>> {
        self.snapshot_at(at)?.ok_or(corrupt(
            "snapshot table entry is invalid or the table is larger than 64 MiB",
            at,
        ))
    }

    /// One more than the largest numeric id (the leading digits of each id, as `strtoul` reads them), in
    /// decimal, in `buf`.
    fn next_snapshot_id<'b>(&mut self, buf: &'b mut [u8; 20]) -> Result<&'b [u8], Error<D::Error>> {
        let mut max = 0u64;
        let mut at = self.header.snapshots_offset;
        for _ in 0..self.header.nb_snapshots {
            let s = self.entry_at(at)?;
            let mut digits = [0u8; 20];
            let n = (s.id_len as usize).min(digits.len());
            let bs = self.dev.block_size();
            let (bounce, _) = split_bounce(self.bounce, bs);
            read_bytes(
                self.dev,
                bounce,
                s.id_at(at),
                digits.get_mut(..n).unwrap_or(&mut []),
            )?;
            let mut v = 0u64;
            for &d in digits.get(..n).unwrap_or(&[]) {
                if !d.is_ascii_digit() {
                    break;
                }
                v = v
                    .saturating_mul(10)
                    .saturating_add(u64::from(d.wrapping_sub(b'0')));
            }
            max = max.max(v);
            at = at.saturating_add(s.entry_len());
        }
        // The digits from the end of `buf` backwards.
        let mut v = max.wrapping_add(1);
        let mut start = buf.len();
        while let Some(i) = start.checked_sub(1) {
            if let Some(slot) = buf.get_mut(i) {
                *slot = b'0'.saturating_add((v % 10) as u8);
            }
            start = i;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        Ok(buf.get(start..).unwrap_or(&[]))
    }

    /// Lowers the refcount of every cluster overlapping host bytes `[host, host + len)` (a table no longer
    /// named anywhere).
    pub(super) fn free_range(&mut self, host: u64, len: u64) -> Result<(), Error<D::Error>> {
        let bits = self.g.cluster_bits;
        let first = host >> bits;
        let last = host.saturating_add(len).saturating_sub(1) >> bits;
        for c in first..=last {
            self.change_refcount(c, false)?;
        }
        Ok(())
    }

    /// QEMU's walk over an L1 table (`l1_size` entries at `l1`): with `Some(up)` every cluster it references
    /// (its L2 tables, their data clusters, the host clusters of their compressed data) counted once more or
    /// once less; then COPIED set in every L2 entry and, unless the table is being dropped, every L1 entry
    /// whose cluster's refcount is 1, and cleared elsewhere. At most `budget` counts are changed (the walk
    /// stops there); `budget` is lowered by those made.
    #[inline(never)]
    fn update_snapshot_refcount(
        &mut self,
        l1: u64,
        l1_size: u64,
        change: Option<bool>,
        budget: &mut u64,
    ) -> Result<(), Error<D::Error>> {
        let g = self.g;
        let bits = g.cluster_bits;
        for i in 0..l1_size {
            let (word, l2) = self.l1_word(l1, i)?;
            let Some(l2) = l2 else {
                continue;
            };
            for index in 0..g.l2_entries {
                let (entry, kind) = self.classified_entry(l2, index)?;
                let refcount = match kind {
                    ClusterKind::Data { host } | ClusterKind::Zero { host: Some(host) } => {
                        if let Some(up) = change
                            && !self.count_once(host >> bits, up, budget)?
                        {
                            return Ok(());
                        }
                        self.refcount(host >> bits)?
                    }
                    ClusterKind::Compressed(d) => {
                        if let Some(up) = change {
                            let first = d.offset >> bits;
                            let last = d.offset.saturating_add(d.len).saturating_sub(1) >> bits;
                            for c in first..=last {
                                if !self.count_once(c, up, budget)? {
                                    return Ok(());
                                }
                            }
                        }
                        // Compressed clusters are never written in place: no COPIED.
                        continue;
                    }
                    _ => 0,
                };
                let word = if refcount == 1 {
                    entry.word | OFLAG_COPIED
                } else {
                    entry.word & !OFLAG_COPIED
                };
                if word != entry.word {
                    self.make_room(3)?;
                    self.l2_set(
                        l2,
                        index,
                        L2Entry {
                            word,
                            bitmap: entry.bitmap,
                        },
                    )?;
                }
            }
            if let Some(up) = change
                && !self.count_once(l2 >> bits, up, budget)?
            {
                return Ok(());
            }
            if change == Some(false) {
                continue;
            }
            let refcount = self.refcount(l2 >> bits)?;
            let new = if refcount == 1 {
                word | OFLAG_COPIED
            } else {
                word & !OFLAG_COPIED
            };
            if new != word {
                self.set_table_word(l1, i.saturating_mul(8), new)?;
            }
        }
        Ok(())
    }

    /// A cluster whose refcount one more reference from the L1 table at `l1` would take past what
    /// refcount_bits holds (a host cluster of compressed data counts as if each of its references added
    /// as many again as it has now: at most twice its refcount), if there is one.
    #[inline(never)]
    fn count_overflow(&mut self, l1: u64, l1_size: u64) -> Result<Option<u64>, Error<D::Error>> {
        let g = self.g;
        let bits = g.cluster_bits;
        let max = g.max_refcount;
        for i in 0..l1_size {
            let Some(l2) = self.l1_word(l1, i)?.1 else {
                continue;
            };
            if self.refcount(l2 >> bits)? >= max {
                return Ok(Some(l2 >> bits));
            }
            for index in 0..g.l2_entries {
                let (_, kind) = self.classified_entry(l2, index)?;
                match kind {
                    ClusterKind::Data { host } | ClusterKind::Zero { host: Some(host) }
                        if self.refcount(host >> bits)? >= max =>
                    {
                        return Ok(Some(host >> bits));
                    }
                    ClusterKind::Compressed(d) => {
                        let first = d.offset >> bits;
                        let last = d.offset.saturating_add(d.len).saturating_sub(1) >> bits;
                        for c in first..=last {
                            if self.refcount(c)?.saturating_mul(2) > max {
                                return Ok(Some(c));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(None)
    }

    /// One count up or down, if `budget` allows one more (returns whether it did).
    fn count_once(&mut self, c: u64, up: bool, budget: &mut u64) -> Result<bool, Error<D::Error>> {
        if *budget == 0 {
            return Ok(false);
        }
        self.change_refcount(c, up)?;
        *budget = budget.saturating_sub(1);
        Ok(true)
    }

    /// Entry `i` of the L1 table at `l1`: the word and the L2 table it names (an entry with reserved bits
    /// set or a misaligned table marks the image corrupt).
    pub(super) fn l1_word(
        &mut self,
        l1: u64,
        i: u64,
    ) -> Result<(u64, Option<u64>), Error<D::Error>> {
        let at = l1.saturating_add(i.saturating_mul(8));
        let word = self.read_word(at)?;
        let l2 = L1Entry(word)
            .l2_offset(self.g.tables.cluster_size)
            .map_err(|e| self.mark_corrupt(e.describe("L1"), at))?;
        Ok((word, l2))
    }

    fn read_word(&mut self, host: u64) -> Result<u64, Error<D::Error>> {
        let mut b = [0u8; 8];
        let bs = self.dev.block_size();
        let (bounce, _) = split_bounce(self.bounce, bs);
        read_bytes(self.dev, bounce, host, &mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// Writes the snapshot table, without the entry at `drop` and with `add` at its end, to new clusters (as
    /// QEMU writes it: each entry at an 8-byte boundary, each with at least QEMU's 24 bytes of extra data),
    /// commits it with one header write and frees the old table.
    #[inline(never)]
    pub(super) fn rewrite_snapshot_table(
        &mut self,
        drop: Option<u64>,
        add: Option<&Added<'_>>,
    ) -> Result<(), Error<D::Error>> {
        let old_offset = self.header.snapshots_offset;
        let old_count = self.header.nb_snapshots;
        let old_len = self.w.snapshot_table_len;
        let fixed = SNAPSHOT_FIXED_LEN as u64;
        let mut size = 0u64;
        let mut count = 0u32;
        let mut at = old_offset;
        for _ in 0..old_count {
            let s = self.entry_at(at)?;
            if Some(at) != drop {
                size = round8(size)
                    .saturating_add(fixed)
                    .saturating_add(s.extra_len.max(EXTRA_LEN).into())
                    .saturating_add(u64::from(s.id_len).saturating_add(s.name_len.into()));
                count = count.saturating_add(1);
            }
            at = at.saturating_add(s.entry_len());
        }
        if let Some(a) = add {
            size = round8(size)
                .saturating_add(fixed)
                .saturating_add(EXTRA_LEN.into())
                .saturating_add((a.id.len() as u64).saturating_add(a.snapshot.name.len() as u64));
            count = count.saturating_add(1);
        }
        if size > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(Error::NoSpace {
                what: "the snapshot table would pass 64 MiB",
            });
        }
        let cs = self.g.tables.cluster_size;
        let table = if size == 0 {
            0
        } else {
            self.alloc_table_clusters(ceil_div(size, cs))?
        };
        let file_end = self.dev.size()?;
        let mut out = 0u64;
        let mut at = old_offset;
        for _ in 0..old_count {
            let s = self.entry_at(at)?;
            if Some(at) != drop {
                out = round8(out);
                out = out.saturating_add(self.copy_entry(at, &s, table.saturating_add(out))?);
            }
            at = at.saturating_add(s.entry_len());
        }
        if let Some(a) = add {
            out = round8(out);
            self.write_new_entry(a, table.saturating_add(out))?;
        }
        let end = table.saturating_add(size);
        if size != 0 && end > file_end {
            self.dev.set_size(end)?;
        }
        self.flush_dev()?;
        let mut fields = [0u8; 12];
        let (nb, offset) = fields.split_at_mut_checked(4).unwrap_or_default();
        let _ = copy_exact(nb, &count.to_be_bytes());
        let _ = copy_exact(offset, &table.to_be_bytes());
        self.write_header(field::NB_SNAPSHOTS, &fields)?;
        self.header.nb_snapshots = count;
        self.header.snapshots_offset = table;
        self.w.snapshot_table_len = size;
        if old_count != 0 && old_len != 0 {
            self.free_range(old_offset, old_len)?;
        }
        Ok(())
    }

    /// Copies the entry at `at` to `to` with QEMU's 24 bytes of extra data at least (a shorter entry gets the
    /// disk size the image has and an icount of -1, as QEMU reads it); returns the new entry's length
    /// (without padding).
    #[inline(never)]
    fn copy_entry(
        &mut self,
        at: u64,
        s: &SnapshotEntryLayout,
        to: u64,
    ) -> Result<u64, Error<D::Error>> {
        let bs = self.dev.block_size();
        let mut head = [0u8; SNAPSHOT_FIXED_LEN];
        let mut extra = [0u8; EXTRA_LEN as usize];
        let known = s.extra_len.min(EXTRA_LEN) as usize;
        {
            let (bounce, _) = split_bounce(self.bounce, bs);
            read_bytes(self.dev, bounce, at, &mut head)?;
            read_bytes(
                self.dev,
                bounce,
                at.saturating_add(SNAPSHOT_FIXED_LEN as u64),
                extra.get_mut(..known).unwrap_or(&mut []),
            )?;
        }
        let small = head
            .get(32..36)
            .map_or(0, |b| u32::from_be_bytes(b.try_into().unwrap_or_default()));
        let vm_state = if known >= 8 {
            be64(&extra, 0)
        } else {
            u64::from(small)
        };
        if known < 16 {
            let _ = copy_exact(
                extra.get_mut(8..16).unwrap_or(&mut []),
                &self.header.size.to_be_bytes(),
            );
        }
        if known < 24 {
            let _ = copy_exact(
                extra.get_mut(16..24).unwrap_or(&mut []),
                &u64::MAX.to_be_bytes(),
            );
        }
        let _ = copy_exact(
            extra.get_mut(..8).unwrap_or(&mut []),
            &vm_state.to_be_bytes(),
        );
        let small = u32::try_from(vm_state).unwrap_or(0);
        let _ = copy_exact(
            head.get_mut(32..36).unwrap_or(&mut []),
            &small.to_be_bytes(),
        );
        let extra_len = s.extra_len.max(EXTRA_LEN);
        let _ = copy_exact(
            head.get_mut(36..40).unwrap_or(&mut []),
            &extra_len.to_be_bytes(),
        );
        {
            let (bounce, _) = split_bounce(self.bounce, bs);
            write_bytes(self.dev, bounce, to, &head)?;
            write_bytes(
                self.dev,
                bounce,
                to.saturating_add(SNAPSHOT_FIXED_LEN as u64),
                &extra,
            )?;
        }
        // What follows QEMU's extra data (more extra data, the id, the name) is copied as it is.
        let rest_from = at
            .saturating_add(SNAPSHOT_FIXED_LEN as u64)
            .saturating_add(known as u64);
        let rest_len = u64::from(s.extra_len.min(MAX_SNAPSHOT_EXTRA))
            .saturating_sub(known as u64)
            .saturating_add(u64::from(s.id_len).saturating_add(s.name_len.into()));
        let rest_to = to
            .saturating_add(SNAPSHOT_FIXED_LEN as u64)
            .saturating_add(EXTRA_LEN.into());
        self.copy_bytes(rest_from, rest_to, rest_len)?;
        self.w.needs_flush = true;
        Ok((SNAPSHOT_FIXED_LEN as u64)
            .saturating_add(extra_len.into())
            .saturating_add(u64::from(s.id_len).saturating_add(s.name_len.into())))
    }

    #[inline(never)]
    fn write_new_entry(&mut self, a: &Added<'_>, to: u64) -> Result<(), Error<D::Error>> {
        let mut head = [0u8; SNAPSHOT_FIXED_LEN + EXTRA_LEN as usize];
        let lens = ((a.id.len() as u32) << 16) | (a.snapshot.name.len() as u32 & 0xffff);
        let fields: [(usize, &[u8]); 8] = [
            (0, &a.l1_table_offset.to_be_bytes()),
            (8, &a.l1_size.to_be_bytes()),
            (12, &lens.to_be_bytes()),
            (16, &a.snapshot.date_sec.to_be_bytes()),
            (20, &a.snapshot.date_nsec.to_be_bytes()),
            (24, &a.snapshot.vm_clock_nsec.to_be_bytes()),
            (36, &EXTRA_LEN.to_be_bytes()),
            (48, &a.disk_size.to_be_bytes()),
        ];
        for (at, bytes) in fields {
            let _ = copy_exact(
                head.get_mut(at..at.saturating_add(bytes.len()))
                    .unwrap_or(&mut []),
                bytes,
            );
        }
        let bs = self.dev.block_size();
        let (bounce, _) = split_bounce(self.bounce, bs);
        write_bytes(self.dev, bounce, to, &head)?;
        let id_at = to.saturating_add(head.len() as u64);
        write_bytes(self.dev, bounce, id_at, a.id)?;
        write_bytes(
            self.dev,
            bounce,
            id_at.saturating_add(a.id.len() as u64),
            a.snapshot.name,
        )?;
        self.w.needs_flush = true;
        Ok(())
    }
}

fn round8(v: u64) -> u64 {
    v.checked_next_multiple_of(8).unwrap_or(u64::MAX)
}
