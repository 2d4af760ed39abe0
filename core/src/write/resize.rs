//! Resizing the virtual disk, with QEMU's results byte for byte and a crash leaving the old disk or the new one.
//!
//! - Growing: a longer L1 table, when the new size needs one, is written to new clusters and made durable
//!   before one header write (`l1_size` and `l1_table_offset` together) switches to it; the old table is
//!   freed after. Where the image has a backing file longer than the old size, the new area is made to read
//!   as zeros (as QEMU does, so that the backing file's bytes do not appear). The new `size` is written last.
//! - Shrinking: the new `size` is written first (from then on the guest sees the smaller disk), then the
//!   clusters past it are dropped (their entries unallocated, their host clusters freed), the L1 entries past
//!   the new end are cleared and their L2 tables freed, refcount blocks that no longer count anything but
//!   themselves leave the refcount table, and the file is cut after its last used cluster. Freed clusters are
//!   discarded on the device, as QEMU discards them. The L1 table keeps its length, as in QEMU.
//!
//! Memory stays bounded: tables are walked through the metadata cache and copied chunk by chunk.

use super::*;
use crate::format::MAX_L1_BYTES;

/// Refcount blocks dropped from the refcount table before their clusters are freed (more are done in turns).
const DROPPED_BLOCKS: usize = 16;

impl<D, B, C, const DEPTH: usize, const SLICES: usize> Image<D, B, C, DEPTH, SLICES, WriteState>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// Grows or shrinks the virtual disk to `new_size` bytes, a multiple of 512. Shrinking drops every byte
    /// past the new end (callers ask first, as qemu-img's `--shrink` does).
    ///
    /// Persistent bitmaps are resized as QEMU resizes them (feature `bitmaps`; without it an image with
    /// bitmaps is refused).
    ///
    /// Refused (with nothing changed) where QEMU refuses, or where this engine does not yet resize:
    /// version 2 images with internal snapshots, images with an inconsistent bitmap or an external data
    /// file, and sizes whose L1 table would pass 32 MiB.
    pub fn resize(&mut self, new_size: u64) -> Result<(), Error<D::Error>> {
        self.resize_as(new_size, None).map(drop)
    }

    /// Grows the virtual disk to `new_size` with every new cluster allocated, as QEMU's resize with
    /// `preallocation=falloc` (`zeros` false) or `full` (`zeros` true) does: from the end of the last
    /// cluster in use, new refcount structures sized for the new clusters (a new refcount table, the old
    /// one freed), then the data clusters in one run (written with zeros for `full`; the file grown to
    /// cover them, and a part of the run that lies inside the old file zeroed either way, where QEMU leaves
    /// its old bytes), mapped by the L2 entries (a cluster that held the old end copied first), the size
    /// last. Returns the data run (host offset, length) for a caller that reserves its space (`falloc`).
    /// Refused for an image that does not grow and for an encrypted image (its new clusters would not
    /// read as zeros).
    pub fn resize_preallocated(
        &mut self,
        new_size: u64,
        zeros: bool,
    ) -> Result<(u64, u64), Error<D::Error>> {
        if new_size <= self.virtual_size() {
            return Err(Error::Unsupported {
                what: "preallocation for an image that does not grow",
                value: new_size,
            });
        }
        if self.layers.first().is_some_and(|l| l.encrypted()) {
            return Err(Error::Unsupported {
                what: "preallocating the new clusters of an encrypted image",
                value: new_size,
            });
        }
        self.resize_as(new_size, Some(zeros))
            .map(|area| area.unwrap_or((0, 0)))
    }

    fn resize_as(
        &mut self,
        new_size: u64,
        prealloc: Option<bool>,
    ) -> Result<Option<(u64, u64)>, Error<D::Error>> {
        if !new_size.is_multiple_of(512) {
            return Err(Error::Unsupported {
                what: "a virtual size that is not a multiple of 512 bytes",
                value: new_size,
            });
        }
        let (header, bitmaps) = {
            let m = self.meta()?;
            (*m.header, m.bitmaps)
        };
        if header.nb_snapshots != 0 && header.version < 3 {
            return Err(Error::Unsupported {
                what: "resizing a version 2 image that has internal snapshots",
                value: header.nb_snapshots.into(),
            });
        }
        if cfg!(not(feature = "bitmaps"))
            && bitmaps.is_some()
            && header
                .autoclear_features
                .contains(AutoclearFeatures::BITMAPS)
        {
            return Err(Error::Unsupported {
                what: "resizing an image with persistent bitmaps",
                value: 0,
            });
        }
        if header.external_data_file() {
            return Err(Error::Unsupported {
                what: "resizing an image with an external data file",
                value: 0,
            });
        }
        let mut resized = header;
        resized.size = new_size;
        let l1_needed = resized
            .l1_entries_needed()
            .filter(|&n| n <= MAX_L1_BYTES / 8 && new_size <= i64::MAX as u64)
            .ok_or(Error::NoSpace {
                what: "the L1 table for that virtual size would pass 32 MiB",
            })?;
        self.begin_write()?;
        let old_size = self.virtual_size();
        #[cfg(feature = "bitmaps")]
        self.resize_bitmaps(old_size, new_size, false)?;
        let resized = if new_size < old_size {
            self.w.discard_freed = true;
            let shrunk = self.shrink(old_size, new_size, l1_needed);
            self.w.discard_freed = false;
            shrunk.map(|()| None)
        } else {
            self.grow(old_size, new_size, l1_needed, prealloc)
        };
        #[cfg(feature = "bitmaps")]
        if resized.is_err() {
            // The disk may have its new size already: the bitmaps stay in use (untrusted).
            self.w.bitmaps_held = 0;
            self.w.bitmaps_tracked = 0;
        }
        let area = resized?;
        #[cfg(feature = "bitmaps")]
        self.resize_bitmaps(old_size, new_size, true)?;
        self.end_write()?;
        Ok(area)
    }

    pub(super) fn set_virtual_size(&mut self, size: u64) -> Result<(), Error<D::Error>> {
        let layer = self.layers.first_mut().ok_or(Error::ReadOnly)?;
        layer.size = size;
        if let Some(meta) = layer.meta.as_mut() {
            meta.header.size = size;
        }
        Ok(())
    }

    /// Writes back everything, then the header's `size` (made durable).
    fn commit_size(&mut self, size: u64) -> Result<(), Error<D::Error>> {
        let mut m = self.meta()?;
        m.commit_frees()?;
        m.writeback_all()?;
        m.flush_dev()?;
        m.write_header(field::SIZE, &size.to_be_bytes())
    }

    fn grow(
        &mut self,
        old_size: u64,
        new_size: u64,
        l1_needed: u64,
        prealloc: Option<bool>,
    ) -> Result<Option<(u64, u64)>, Error<D::Error>> {
        // A backing file longer than the old disk must not show through the new area (QEMU zeroes it).
        let backing_size = self.layers.get(1).map_or(0, |l| l.size);
        let longer = backing_size > old_size && new_size > old_size;
        if longer && prealloc.is_none() && !self.geometry()?.tables.l2_format.v3 {
            return Err(Error::Unsupported {
                what: "zeroing the area past the old end (a version 2 image cannot mark clusters as zeros)",
                value: old_size,
            });
        }
        {
            let mut m = self.meta()?;
            if l1_needed > m.g.tables.l1_size {
                m.grow_l1(l1_needed)?;
            }
        }
        self.set_virtual_size(new_size)?;
        let mut area = None;
        let filled = match prealloc {
            // Preallocated clusters read as zeros (their subclusters allocated where a backing file would
            // show through).
            Some(zeros) => self
                .preallocate_area(old_size, new_size, zeros, longer)
                .map(|a| area = Some(a)),
            None if longer => self.zero_range(old_size, new_size.saturating_sub(old_size), false),
            None => Ok(()),
        };
        if let Err(e) = filled.and_then(|()| self.commit_size(new_size)) {
            self.set_virtual_size(old_size)?;
            return Err(e);
        }
        self.end_write()?;
        Ok(area)
    }

    /// The clusters of QEMU's `falloc`/`full` growth from `old_size` to `new_size` (see
    /// [`Self::resize_preallocated`]); `allocated`: every subcluster marked allocated.
    fn preallocate_area(
        &mut self,
        old_size: u64,
        new_size: u64,
        zeros: bool,
        allocated: bool,
    ) -> Result<(u64, u64), Error<D::Error>> {
        let g = self.geometry()?;
        let cs = g.tables.cluster_size;
        let first_gc = old_size & !cs.wrapping_sub(1);
        let data = ceil_div(new_size, cs).saturating_sub(first_gc >> g.cluster_bits);
        let (host, file_end) = {
            let mut m = self.meta()?;
            let file_end = m.dev.size()?;
            // The end of the last cluster in use.
            let mut start = ceil_div(file_end, cs);
            while start > 0 && m.refcount(start.saturating_sub(1))? == 0 {
                start = start.saturating_sub(1);
            }
            let l2_tables = ceil_div(data, g.l2_entries).saturating_add(1);
            let first = m.refcount_area(start, data.saturating_add(l2_tables))?;
            let mut c = first;
            while c < first.saturating_add(data) {
                m.make_room(2)?;
                m.change_refcount(c, true)?;
                c = c.saturating_add(1);
            }
            (first << g.cluster_bits, m.dev.size()?)
        };
        let len = data.saturating_mul(cs);
        let end = host.saturating_add(len);
        {
            let mut m = self.meta()?;
            // `full` zeroes the whole run; otherwise only the part that reuses the old file's space.
            let zero_to = if zeros {
                end
            } else {
                file_end.max(host).min(end)
            };
            if zero_to > host {
                m.write_zeros(host, zero_to.saturating_sub(host))?;
            }
            if end > m.dev.size()? && !m.dev.set_size(end)? {
                // A device that cannot grow: the clusters past its end are written as zeros.
                let now = m.dev.size()?.max(host);
                m.write_zeros(now, end.saturating_sub(now))?;
            }
            m.w.needs_flush = true;
        }
        // The L2 entries; a cluster that held the old end keeps its first bytes.
        let bitmap = if g.tables.l2_format.extended && allocated {
            u64::from(u32::MAX)
        } else {
            0
        };
        let mut at = 0u64;
        while at < len {
            let gc = first_gc.saturating_add(at);
            let target = host.saturating_add(at);
            let l2 = self.writable_l2(gc)?;
            let head = old_size.saturating_sub(gc).min(cs);
            if head > 0 {
                self.copy_guest(gc, target, head)?;
            }
            let mut m = self.meta()?;
            m.make_room(2)?;
            let (index, old, kind) = m.cluster_entry(l2, gc)?;
            let bitmap = if g.tables.l2_format.extended && !allocated {
                old.bitmap
            } else {
                bitmap
            };
            m.l2_set(
                l2,
                index,
                L2Entry {
                    word: target | OFLAG_COPIED,
                    bitmap,
                },
            )?;
            m.free_entry(kind)?;
            if matches!(kind, ClusterKind::Compressed(_)) {
                self.decompressor.invalidate();
            }
            at = at.saturating_add(cs);
        }
        Ok((host, len))
    }

    /// QEMU's full discard of the guest clusters in `[from, to)` (cluster-aligned): each L2 table of the range
    /// made writable first (allocated where there is none, copied where a snapshot shares it), then every
    /// entry unallocated and its host cluster freed.
    pub(super) fn drop_clusters(&mut self, from: u64, to: u64) -> Result<(), Error<D::Error>> {
        let cs = self.geometry()?.tables.cluster_size;
        let mut gc = from;
        while gc < to {
            self.writable_l2(gc)?;
            self.discard_cluster(gc, false, true)?;
            gc = gc.saturating_add(cs);
        }
        Ok(())
    }

    fn shrink(
        &mut self,
        old_size: u64,
        new_size: u64,
        l1_needed: u64,
    ) -> Result<(), Error<D::Error>> {
        self.commit_size(new_size)?;
        self.set_virtual_size(new_size)?;
        // Everything past the cluster that holds the new end: entries unallocated, host clusters freed. As in
        // QEMU, each L2 table of the range is made writable first (allocated where there is none, copied
        // where a snapshot shares it), so that the result is QEMU's byte for byte.
        let cs = self.geometry()?.tables.cluster_size;
        self.drop_clusters(
            ceil_div(new_size, cs).saturating_mul(cs),
            ceil_div(old_size, cs).saturating_mul(cs),
        )?;
        let mut m = self.meta()?;
        m.commit_frees()?;
        m.shrink_l1(l1_needed)?;
        m.commit_frees()?;
        m.shrink_reftable()?;
        m.writeback_all()?;
        m.flush_dev()?;
        m.trim_file()
    }
}

impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// Replaces the L1 table with one of `entries` entries (the old ones, then zeros) in new clusters.
    #[inline(never)]
    fn grow_l1(&mut self, entries: u64) -> Result<(), Error<D::Error>> {
        let g = self.g;
        let old_offset = g.tables.l1_table_offset;
        let old_bytes = g.tables.l1_size.saturating_mul(8);
        let bytes = entries.saturating_mul(8);
        let clusters = ceil_div(bytes, g.tables.cluster_size);
        let table = self.alloc_table_clusters(clusters)?;
        self.writeback(SliceKind::Refcount)?;
        let file_end = self.dev.size()?;
        self.copy_bytes(old_offset, table, old_bytes)?;
        self.write_zeros(
            table.saturating_add(old_bytes),
            bytes.saturating_sub(old_bytes),
        )?;
        // A table that ends the file ends it at its last byte, not at the device block's end.
        let table_end = table.saturating_add(bytes);
        if table_end > file_end {
            self.dev.set_size(table_end)?;
        }
        self.flush_dev()?;
        let mut fields = [0u8; 12];
        let (size, offset) = fields.split_at_mut_checked(4).unwrap_or_default();
        let _ = copy_exact(size, &(entries as u32).to_be_bytes());
        let _ = copy_exact(offset, &table.to_be_bytes());
        self.write_header(field::L1_SIZE, &fields)?;
        self.header.l1_size = entries as u32;
        self.header.l1_table_offset = table;
        self.g.tables.l1_size = entries;
        self.g.tables.l1_table_offset = table;
        // The old table is no longer named by the (durable) header.
        self.cache.forget_range(0, old_offset, old_bytes);
        if old_bytes != 0 {
            let first = old_offset >> g.cluster_bits;
            let last = old_offset.saturating_add(old_bytes).saturating_sub(1) >> g.cluster_bits;
            for c in first..=last {
                self.change_refcount(c, false)?;
            }
        }
        Ok(())
    }

    /// Clears the L1 entries from index `keep` on and frees the L2 tables they named (once the cleared
    /// entries are durable).
    fn shrink_l1(&mut self, keep: u64) -> Result<(), Error<D::Error>> {
        let l1 = self.g.tables.l1_table_offset;
        let mut i = self.g.tables.l1_size;
        while i > keep {
            i = i.saturating_sub(1);
            let entry = self.l1_entry(i)?;
            if entry.0 == 0 {
                continue;
            }
            let l2 = entry.l2_offset(self.g.tables.cluster_size).map_err(|e| {
                self.mark_corrupt(e.describe("L1"), l1.saturating_add(i.saturating_mul(8)))
            })?;
            self.set_table_word(l1, i.saturating_mul(8), 0)?;
            if let Some(l2) = l2 {
                self.free_later(l2)?;
            }
        }
        Ok(())
    }

    /// Whether the refcount block at `block`, entry `r` of the refcount table, counts nothing but itself.
    fn refblock_unused(&mut self, r: u64, block: u64) -> Result<bool, Error<D::Error>> {
        let g = self.g;
        let order = g.tables.refcount_order;
        let bits = g.tables.refcount_block_bits;
        let own = (block >> g.cluster_bits >> bits == r)
            .then(|| (block >> g.cluster_bits) & (1u64 << bits).wrapping_sub(1));
        let slice = g.tables.slice_size;
        let per_slice = slice.saturating_mul(8) >> order;
        let bs = self.dev.block_size();
        let mut at = 0u64;
        while at < g.tables.cluster_size {
            let s = self.cache.get(
                self.dev,
                bounce_of(self.bounce, bs),
                0,
                block.saturating_add(at),
                slice as usize,
            )?;
            let first = at.saturating_mul(8) >> order;
            let used = match own.filter(|&o| o >= first && o < first.saturating_add(per_slice)) {
                None => s.iter().any(|&b| b != 0),
                Some(o) => (0..per_slice).any(|i| {
                    first.saturating_add(i) != o
                        && refcount_get(s, order, i as usize).is_some_and(|v| v != 0)
                }),
            };
            if used {
                return Ok(false);
            }
            at = at.saturating_add(slice);
        }
        Ok(true)
    }

    /// Takes refcount blocks that count nothing but themselves out of the refcount table (made durable),
    /// then frees their clusters, as QEMU does after a shrink.
    #[inline(never)]
    fn shrink_reftable(&mut self) -> Result<(), Error<D::Error>> {
        let reftable = self.g.tables.refcount_table_offset;
        let entries = self.g.tables.refcount_table_entries;
        let mut dropped: Vec<u64, DROPPED_BLOCKS> = Vec::new();
        for r in 0..entries {
            let block = self.reftable_entry(r)?;
            if block == 0 || !self.refblock_unused(r, block)? {
                continue;
            }
            if dropped.is_full() {
                self.free_refblocks(&mut dropped)?;
            }
            self.set_table_word(reftable, r.saturating_mul(8), 0)?;
            self.cache
                .forget_range(0, block, self.g.tables.cluster_size);
            let _ = dropped.push(block);
        }
        self.free_refblocks(&mut dropped)
    }

    /// Frees the clusters of refcount blocks already taken out of the (durable) refcount table.
    fn free_refblocks(
        &mut self,
        dropped: &mut Vec<u64, DROPPED_BLOCKS>,
    ) -> Result<(), Error<D::Error>> {
        if dropped.is_empty() {
            return Ok(());
        }
        self.flush_dev()?;
        let cs = self.g.tables.cluster_size;
        while let Some(block) = dropped.pop() {
            let c = block >> self.g.cluster_bits;
            if self.refcount_loc(c)?.is_some() {
                self.change_refcount(c, false)?;
            } else {
                // It counted itself: no block counts it any more.
                self.dev.discard(block, cs)?;
            }
        }
        Ok(())
    }

    /// Ends the file at the end of its last cluster with a refcount, as qemu-img leaves it after a shrink
    /// (cut after that cluster, or extended to its end where the file ended inside it).
    #[inline(never)]
    pub(super) fn trim_file(&mut self) -> Result<(), Error<D::Error>> {
        let cs = self.g.tables.cluster_size;
        let now = self.dev.size()?;
        let mut c = ceil_div(now, cs);
        while c > 0 {
            if self.refcount(c.saturating_sub(1))? != 0 {
                break;
            }
            c = c.saturating_sub(1);
        }
        // QEMU's file ends at the end of that cluster, even where it ended inside it before.
        let end = c.saturating_mul(cs);
        if c > 0 && end != now {
            self.dev.set_size(end)?;
        }
        Ok(())
    }
}
