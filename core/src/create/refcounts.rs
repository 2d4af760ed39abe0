//! Refcount table and refcount block entries as the replay reads and sets them, QEMU's refcount metadata
//! sizing, and `qcow2_refcount_area`: a new refcount table with the blocks for everything to come.

use crate::Error;
use crate::device::BlockDeviceWrite;
use crate::format::MAX_REFTABLE_BYTES;

use super::replay::{Builder, div, overflow, rem};

impl<D: BlockDeviceWrite> Builder<'_, '_, D> {
    /// Offset of refcount block `index`, 0 if there is none.
    pub(super) fn refblock(&mut self, index: u64) -> Result<u64, Error<D::Error>> {
        if index >= self.rt_entries {
            return Ok(0);
        }
        let at = self
            .rt_offset
            .checked_add(index.checked_mul(8).ok_or(overflow())?)
            .ok_or(overflow())?;
        Ok(self.read_be64(at)? & 0xffff_ffff_ffff_fe00)
    }

    pub(super) fn set_refblock(&mut self, index: u64, offset: u64) -> Result<(), Error<D::Error>> {
        let at = self
            .rt_offset
            .checked_add(index.checked_mul(8).ok_or(overflow())?)
            .ok_or(overflow())?;
        self.write(at, &offset.to_be_bytes())
    }

    /// Refcount of `cluster`.
    pub(super) fn refcount(&mut self, cluster: u64) -> Result<u64, Error<D::Error>> {
        if cluster >= self.end {
            return Ok(0);
        }
        if (self.known_used.0..self.known_used.1).contains(&cluster) {
            return Ok(1);
        }
        let per = self.g.refcounts_per_block();
        let block = self.refblock(div(cluster, per))?;
        if block == 0 {
            return Ok(0);
        }
        let bits = self.g.refcount_bits();
        let index = rem(cluster, per);
        let bit = index.saturating_mul(bits);
        let byte = block.saturating_add(bit / 8);
        if bits >= 8 {
            let mut b = [0u8; 8];
            let n = (bits / 8) as usize;
            let dst = b.get_mut(8usize.saturating_sub(n)..).ok_or(overflow())?;
            self.read(byte, dst)?;
            Ok(u64::from_be_bytes(b))
        } else {
            let mut b = [0u8; 1];
            self.read(byte, &mut b)?;
            let mask = (1u64 << bits).wrapping_sub(1);
            Ok((u64::from(b[0]) >> (bit % 8)) & mask)
        }
    }

    /// Sets the refcounts of `count` clusters from entry `first` of the block at `block` to `value` (0 or 1).
    pub(super) fn set_refcounts(
        &mut self,
        block: u64,
        first: u64,
        count: u64,
        value: u64,
    ) -> Result<(), Error<D::Error>> {
        let bits = self.g.refcount_bits();
        if bits >= 8 {
            let width = bits / 8;
            let mut pattern = [0u8; 8];
            if let Some(last) = pattern.get_mut(width.saturating_sub(1) as usize) {
                *last = value as u8;
            }
            let pattern = pattern.get(..width as usize).ok_or(overflow())?;
            let at = block.saturating_add(first.saturating_mul(width));
            return self.fill(at, count.saturating_mul(width), pattern);
        }
        // Sub-byte widths: whole bytes in one go, partial bytes read, modified and written back.
        let per_byte = div(8, bits);
        let mask = (1u64 << bits).wrapping_sub(1);
        let mut index = first;
        let stop = first.saturating_add(count);
        while index < stop {
            if rem(index, per_byte) == 0 && stop.saturating_sub(index) >= per_byte {
                let bytes = div(stop.saturating_sub(index), per_byte);
                let mut byte = 0u8;
                if value != 0 {
                    for k in 0..per_byte {
                        byte |= (value << (k.saturating_mul(bits))) as u8;
                    }
                }
                self.fill(block.saturating_add(div(index, per_byte)), bytes, &[byte])?;
                index = index.saturating_add(bytes.saturating_mul(per_byte));
            } else {
                let at = block.saturating_add(div(index, per_byte));
                let mut b = [0u8; 1];
                self.read(at, &mut b)?;
                let shift = (rem(index, per_byte)).saturating_mul(bits);
                let cleared = u64::from(b[0]) & !(mask << shift);
                b[0] = (cleared | ((value & mask) << shift)) as u8;
                self.write(at, &b)?;
                index = index.saturating_add(1);
            }
        }
        Ok(())
    }

    /// Sets refcounts over clusters whose blocks all exist.
    pub(super) fn set_range(
        &mut self,
        pos: u64,
        n: u64,
        value: u64,
    ) -> Result<(), Error<D::Error>> {
        let per = self.g.refcounts_per_block();
        let stop = pos.saturating_add(n);
        let mut c = pos;
        while c < stop {
            let index = div(c, per);
            let seg_end = stop.min(index.saturating_add(1).saturating_mul(per));
            let block = self.refblock(index)?;
            if block == 0 {
                return Err(Error::Corrupt {
                    what: "refcount block missing while creating the image",
                    offset: self.g.offset(c),
                });
            }
            self.set_refcounts(block, rem(c, per), seg_end.saturating_sub(c), value)?;
            c = seg_end;
        }
        Ok(())
    }

    /// QEMU's `qcow2_refcount_metadata_size`: refcount blocks needed for `clusters` clusters plus the
    /// refcount structures themselves (with `generous`, room for a table half as large again).
    pub(super) fn refblocks_needed(&self, clusters: u64, generous: bool) -> u64 {
        let per_block = self.g.refcounts_per_block().max(1);
        let per_table_cluster = (self.g.cluster_size() / 8).max(1);
        let (mut blocks, mut table, mut n) = (0u64, 0u64, 0u64);
        let (mut clusters, mut generous) = (clusters, generous);
        loop {
            let last = n;
            blocks = clusters
                .saturating_add(table)
                .saturating_add(blocks)
                .div_ceil(per_block);
            table = blocks.div_ceil(per_table_cluster);
            n = clusters.saturating_add(blocks).saturating_add(table);
            if n == last && generous {
                clusters = clusters.saturating_add(table.div_ceil(2));
                n = 0;
                generous = false;
            } else if n == last {
                return blocks;
            }
        }
    }

    /// QEMU's `qcow2_refcount_area`: from cluster `start` (past everything in use), new refcount blocks and a
    /// new refcount table that cover themselves and `additional` clusters after them; `new_block` is a
    /// refcount block already written that the new table takes at its index. The old table is freed.
    /// Returns the first cluster after the new structures.
    pub(super) fn refcount_area(
        &mut self,
        start: u64,
        additional: u64,
        exact: bool,
        new_block: Option<(u64, u64)>,
    ) -> Result<u64, Error<D::Error>> {
        let cs = self.g.cluster_size();
        let per = self.g.refcounts_per_block();
        let total_blocks =
            self.refblocks_needed(start.checked_add(additional).ok_or(overflow())?, !exact);
        let mut table_entries = total_blocks;
        if !exact {
            table_entries = table_entries.saturating_add(total_blocks.div_ceil(2));
        }
        let table_entries = table_entries.next_multiple_of(cs / 8);
        if table_entries.saturating_mul(8) > MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported {
                what: "refcount table larger than 8 MiB",
                value: table_entries,
            });
        }
        let table_clusters = div(table_entries.saturating_mul(8), cs);
        let area_index = div(start, per);
        let mut new_blocks = 0u64;
        for i in area_index..total_blocks {
            let taken = matches!(new_block, Some((index, _)) if index == i);
            if !taken && self.refblock(i)? == 0 {
                new_blocks = new_blocks.saturating_add(1);
            }
        }
        let table_cluster = start.saturating_add(new_blocks);
        let area_end = table_cluster.saturating_add(table_clusters);
        let table_offset = self.g.offset(table_cluster);
        // The new table: a copy of the old one, the block the caller made, then the new blocks.
        self.zero(table_offset, table_entries.saturating_mul(8))?;
        let copy = self.rt_entries.min(table_entries).saturating_mul(8);
        let mut buf = [0u8; 512];
        let mut done = 0u64;
        while done < copy {
            let n = copy.saturating_sub(done).min(buf.len() as u64) as usize;
            let piece = buf.get_mut(..n).ok_or(overflow())?;
            self.read(self.rt_offset.saturating_add(done), piece)?;
            let piece = buf.get(..n).ok_or(overflow())?;
            self.write(table_offset.saturating_add(done), piece)?;
            done = done.saturating_add(n as u64);
        }
        let (old_offset, old_entries) = (self.rt_offset, self.rt_entries);
        self.rt_offset = table_offset;
        self.rt_entries = table_entries;
        if let Some((index, offset)) = new_block {
            self.set_refblock(index, offset)?;
        }
        let mut block = start;
        for i in area_index..total_blocks {
            if self.refblock(i)? == 0 {
                let offset = self.g.offset(block);
                self.zero(offset, cs)?;
                self.set_refblock(i, offset)?;
                block = block.saturating_add(1);
            }
        }
        self.end = self.end.max(area_end);
        self.set_range(start, area_end.saturating_sub(start), 1)?;
        // Free the old table.
        let old_cluster = div(old_offset, cs);
        let old_clusters = old_entries.saturating_mul(8).div_ceil(cs);
        self.update_refcount(old_cluster, old_clusters, 0)?;
        Ok(area_end)
    }
}
