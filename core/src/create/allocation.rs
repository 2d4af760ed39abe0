//! QEMU's cluster allocator, replayed step by step: the search for free clusters (`alloc_clusters_noref`),
//! refcount updates that may find a refcount block missing and place it first (`update_refcount`,
//! `alloc_refcount_block`, then "search again"), allocation at a given place (`qcow2_alloc_clusters_at`),
//! and a new refcount table with the refcount blocks for everything to come when the table is full or
//! preallocation needs one (`qcow2_refcount_area`, sized by `qcow2_refcount_metadata_size`).

use crate::Error;
use crate::device::BlockDeviceWrite;
use crate::format::{MAX_HOST_OFFSET, MAX_REFTABLE_BYTES};

use super::builder::{Builder, div, overflow, rem};

/// Retries of one allocation before giving up, beyond one per refcount block it may have to create.
const MAX_RETRIES: u64 = 64;

/// Outcome of a refcount update that may have had to allocate a refcount block first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Update {
    Done,
    /// A refcount block was allocated; the caller must search for free clusters again.
    Again,
}

impl<D: BlockDeviceWrite> Builder<'_, '_, D> {
    /// QEMU's `alloc_clusters_noref`: the first run of `count` free clusters at or after the free cluster
    /// index; returns its first cluster index.
    fn alloc_clusters_noref(&mut self, count: u64) -> Result<u64, Error<D::Error>> {
        let mut found = 0u64;
        while found < count {
            if self.free_cluster_index >= self.allocated_end {
                // Everything from here on is free.
                self.free_cluster_index = self
                    .free_cluster_index
                    .checked_add(count.saturating_sub(found))
                    .ok_or(overflow())?;
                break;
            }
            let cluster = self.free_cluster_index;
            if self.known_used.contains(&cluster) {
                self.free_cluster_index = self.known_used.end;
                found = 0;
                continue;
            }
            self.free_cluster_index = cluster.saturating_add(1);
            if self.refcount(cluster)? != 0 {
                found = 0;
            } else {
                found = found.saturating_add(1);
            }
        }
        let first = self.free_cluster_index.saturating_sub(count);
        if self.free_cluster_index > MAX_HOST_OFFSET >> (self.header.cluster_bits & 63) {
            return Err(overflow());
        }
        self.allocated_end = self.allocated_end.max(self.free_cluster_index);
        Ok(first)
    }

    /// QEMU's `update_refcount` for an increase (`value` 1) or a decrease (`value` 0) of the refcounts of
    /// `count` clusters from cluster index `first`.
    fn update_refcount(
        &mut self,
        first: u64,
        count: u64,
        value: u64,
    ) -> Result<Update, Error<D::Error>> {
        let per_block = self.refcount_block_entries();
        let stop = first.checked_add(count).ok_or(overflow())?;
        let mut cluster = first;
        while cluster < stop {
            let index = div(cluster, per_block);
            let segment_end = stop.min(index.saturating_add(1).saturating_mul(per_block));
            let block = self.refcount_block_offset(index)?;
            if block == 0 {
                self.alloc_refcount_block(cluster)?;
                // Undo what this call did, as QEMU does when it gets -EAGAIN.
                if cluster > first {
                    self.set_refcount_range(
                        first,
                        cluster.saturating_sub(first),
                        u64::from(value == 0),
                    )?;
                }
                // QEMU searches again from the start of this allocation (observed with qemu-img 10
                // also when nothing had to be undone: a table allocated right at a refcount block
                // boundary stays there, the new block goes after it).
                if value != 0 {
                    self.free_cluster_index = self.free_cluster_index.min(first);
                }
                return Ok(Update::Again);
            }
            self.set_refcounts(
                block,
                rem(cluster, per_block),
                segment_end.saturating_sub(cluster),
                value,
            )?;
            if value == 0 {
                self.free_cluster_index = self.free_cluster_index.min(cluster);
            }
            cluster = segment_end;
        }
        Ok(Update::Done)
    }

    /// QEMU's `alloc_refcount_block` for cluster index `cluster` whose refcount block is missing. Always
    /// ends in "search again".
    fn alloc_refcount_block(&mut self, cluster: u64) -> Result<(), Error<D::Error>> {
        let per_block = self.refcount_block_entries();
        let index = div(cluster, per_block);
        let new_block = self.alloc_clusters_noref(1)?;
        let offset = self.cluster_offset(new_block);
        if div(new_block, per_block) == index {
            // Describes itself.
            self.zero(offset, self.header.cluster_size())?;
            self.set_refcounts(offset, rem(new_block, per_block), 1, 1)?;
        } else {
            if self.update_refcount(new_block, 1, 1)? == Update::Again {
                return Ok(());
            }
            self.zero(offset, self.header.cluster_size())?;
        }
        if index < self.header.refcount_table_entries() {
            return self.set_refcount_block_offset(index, offset);
        }
        // The table is full: a new, larger one goes after the clusters the blocks so far can cover,
        // together with blocks for itself.
        let blocks_used = cluster.max(new_block).saturating_add(1).div_ceil(per_block);
        let area_start = blocks_used.checked_mul(per_block).ok_or(overflow())?;
        self.refcount_area(area_start, 0, false, Some((index, offset)))?;
        Ok(())
    }

    /// How often an allocation of `count` clusters may have to start over: once per refcount block it
    /// makes.
    fn retries(&self, count: u64) -> u64 {
        div(
            self.allocated_end.saturating_add(count),
            self.refcount_block_entries(),
        )
        .saturating_mul(2)
        .saturating_add(MAX_RETRIES)
    }

    /// QEMU's `qcow2_alloc_clusters`: `count` clusters with refcount 1; returns the first cluster index.
    pub(super) fn alloc_clusters(&mut self, count: u64) -> Result<u64, Error<D::Error>> {
        for _ in 0..self.retries(count) {
            let first = self.alloc_clusters_noref(count)?;
            if self.update_refcount(first, count, 1)? == Update::Done {
                return Ok(first);
            }
        }
        Err(Error::Unsupported {
            what: "cluster allocation did not settle",
            value: count,
        })
    }

    /// QEMU's `qcow2_alloc_clusters_at` for `count` clusters from cluster index `first`, known to be free.
    pub(super) fn alloc_clusters_at(
        &mut self,
        first: u64,
        count: u64,
    ) -> Result<(), Error<D::Error>> {
        for _ in 0..self.retries(count) {
            if self.update_refcount(first, count, 1)? == Update::Done {
                self.allocated_end = self.allocated_end.max(first.saturating_add(count));
                return Ok(());
            }
        }
        Err(Error::Unsupported {
            what: "cluster allocation did not settle",
            value: count,
        })
    }

    /// QEMU's `qcow2_refcount_metadata_size`: refcount blocks needed for `clusters` clusters plus the
    /// refcount structures themselves (with `generous`, room for a table half as large again).
    fn refcount_blocks_needed(&self, clusters: u64, generous: bool) -> u64 {
        super::measure::refcount_structures(
            clusters,
            self.header.cluster_size(),
            self.header.refcount_order,
            generous,
        )
        .0
    }

    /// QEMU's `qcow2_refcount_area`: from cluster index `start` (past everything in use), new refcount blocks
    /// and a new refcount table that cover themselves and `additional` clusters after them (`exact`: no room
    /// to grow); `new_block` is a refcount block already written, `(index, offset)`, that the new table takes
    /// at its index. The old table is freed. Returns the first cluster index after the new structures.
    pub(super) fn refcount_area(
        &mut self,
        start: u64,
        additional: u64,
        exact: bool,
        new_block: Option<(u64, u64)>,
    ) -> Result<u64, Error<D::Error>> {
        let cluster_size = self.header.cluster_size();
        let per_block = self.refcount_block_entries();
        let total_blocks =
            self.refcount_blocks_needed(start.checked_add(additional).ok_or(overflow())?, !exact);
        let mut table_entries = total_blocks;
        if !exact {
            table_entries = table_entries.saturating_add(total_blocks.div_ceil(2));
        }
        let table_entries = table_entries.next_multiple_of(cluster_size / 8);
        if table_entries.saturating_mul(8) > MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported {
                what: "refcount table larger than 8 MiB",
                value: table_entries,
            });
        }
        let table_clusters = div(table_entries.saturating_mul(8), cluster_size);
        let area_index = div(start, per_block);
        let mut new_blocks = 0u64;
        for index in area_index..total_blocks {
            let taken = matches!(new_block, Some((taken, _)) if taken == index);
            if !taken && self.refcount_block_offset(index)? == 0 {
                new_blocks = new_blocks.saturating_add(1);
            }
        }
        let table_cluster = start.saturating_add(new_blocks);
        let area_end = table_cluster.saturating_add(table_clusters);
        let table_offset = self.cluster_offset(table_cluster);
        // The new table: a copy of the old one, the block the caller made, then the new blocks.
        self.zero(table_offset, table_entries.saturating_mul(8))?;
        let old_offset = self.header.refcount_table_offset;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        let copy = self
            .header
            .refcount_table_entries()
            .min(table_entries)
            .saturating_mul(8);
        let mut buf = [0u8; 512];
        let mut done = 0u64;
        while done < copy {
            let n = copy.saturating_sub(done).min(buf.len() as u64) as usize;
            let piece = buf.get_mut(..n).ok_or(overflow())?;
            self.read(old_offset.saturating_add(done), piece)?;
            let piece = buf.get(..n).ok_or(overflow())?;
            self.write(table_offset.saturating_add(done), piece)?;
            done = done.saturating_add(n as u64);
        }
        self.header.refcount_table_offset = table_offset;
        self.header.refcount_table_clusters =
            u32::try_from(table_clusters).map_err(|_| overflow())?;
        if let Some((index, offset)) = new_block {
            self.set_refcount_block_offset(index, offset)?;
        }
        let mut block = start;
        for index in area_index..total_blocks {
            if self.refcount_block_offset(index)? == 0 {
                let offset = self.cluster_offset(block);
                self.zero(offset, cluster_size)?;
                self.set_refcount_block_offset(index, offset)?;
                block = block.saturating_add(1);
            }
        }
        self.allocated_end = self.allocated_end.max(area_end);
        self.set_refcount_range(start, area_end.saturating_sub(start), 1)?;
        // Free the old table.
        self.update_refcount(div(old_offset, cluster_size), old_clusters, 0)?;
        Ok(area_end)
    }
}
