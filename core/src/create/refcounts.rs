//! Refcount table and refcount block entries on the device, as the replay reads and sets them: a refcount
//! block's offset from the refcount table, one cluster's refcount, and runs of refcounts set to 0 or 1. The
//! bit packing and the place of every refcount width is format's ([`refcount_location`],
//! [`refcount_slice_position`], [`refcount_get`], [`refcount_set`]). The image is being laid out, so these
//! read and write the device directly in the smallest pieces instead of through the metadata cache.

use crate::Error;
use crate::device::BlockDeviceWrite;
use crate::error::corrupt;
use crate::format::{
    REFTABLE_OFFSET_MASK, refcount_get, refcount_location, refcount_set, refcount_slice_position,
};

use super::builder::{Builder, div, overflow, rem};

impl<D: BlockDeviceWrite> Builder<'_, '_, D> {
    /// Host offset of refcount table entry `index`.
    fn refcount_table_entry(&self, index: u64) -> Result<u64, Error<D::Error>> {
        index
            .checked_mul(8)
            .and_then(|at| self.header.refcount_table_offset.checked_add(at))
            .ok_or(overflow())
    }

    /// Offset of refcount block `index`, 0 if there is none.
    pub(super) fn refcount_block_offset(&mut self, index: u64) -> Result<u64, Error<D::Error>> {
        if index >= self.header.refcount_table_entries() {
            return Ok(0);
        }
        let at = self.refcount_table_entry(index)?;
        Ok(self.read_be64(at)? & REFTABLE_OFFSET_MASK)
    }

    /// Points refcount table entry `index` at the refcount block at `offset`.
    pub(super) fn set_refcount_block_offset(
        &mut self,
        index: u64,
        offset: u64,
    ) -> Result<(), Error<D::Error>> {
        let at = self.refcount_table_entry(index)?;
        self.write(at, &offset.to_be_bytes())
    }

    /// The smallest run of whole bytes that holds a refcount entry: its length (one byte below 8-bit
    /// refcounts, else the entry's width) and the entries in it.
    fn refcount_piece(&self) -> (u64, u64) {
        let order = self.header.refcount_order & 63;
        let piece_len = 1u64 << order.saturating_sub(3);
        (piece_len, (piece_len << 3) >> order)
    }

    /// Refcount of cluster index `cluster`.
    pub(super) fn refcount(&mut self, cluster: u64) -> Result<u64, Error<D::Error>> {
        if cluster >= self.allocated_end {
            return Ok(0);
        }
        if self.known_used.contains(&cluster) {
            return Ok(1);
        }
        let (table_index, index) = refcount_location(cluster, self.header.refcount_block_bits());
        let block = self.refcount_block_offset(table_index)?;
        if block == 0 {
            return Ok(0);
        }
        let (piece_len, _) = self.refcount_piece();
        let (start, in_piece) =
            refcount_slice_position(index, self.header.refcount_order, piece_len);
        let mut piece = [0u8; 8];
        let piece = piece.get_mut(..piece_len as usize).ok_or(overflow())?;
        self.read(block.saturating_add(start), piece)?;
        refcount_get(piece, self.header.refcount_order, in_piece).ok_or(overflow())
    }

    /// Sets the refcounts of `count` clusters from entry `first` of the refcount block at `block` to `value`
    /// (0 or 1): whole bytes in one streamed write, a byte shared with other entries read, changed and
    /// written back.
    pub(super) fn set_refcounts(
        &mut self,
        block: u64,
        first: u64,
        count: u64,
        value: u64,
    ) -> Result<(), Error<D::Error>> {
        let order = self.header.refcount_order;
        // Eight bytes of entries that all hold `value`: a pattern for any run of whole pieces.
        let mut pattern = [0u8; 8];
        for index in 0..(64usize >> (order & 63)) {
            refcount_set(&mut pattern, order, index, value).ok_or(overflow())?;
        }
        let (piece_len, per_piece) = self.refcount_piece();
        let stop = first.saturating_add(count);
        let mut index = first;
        while index < stop {
            let at = block.saturating_add(div(index, per_piece).saturating_mul(piece_len));
            let in_piece = rem(index, per_piece);
            let whole_pieces = div(stop.saturating_sub(index), per_piece);
            if in_piece == 0 && whole_pieces > 0 {
                self.fill(at, whole_pieces.saturating_mul(piece_len), &pattern)?;
                index = index.saturating_add(whole_pieces.saturating_mul(per_piece));
            } else {
                let mut byte = [0u8; 1];
                self.read(at, &mut byte)?;
                refcount_set(&mut byte, order, in_piece as usize, value).ok_or(overflow())?;
                self.write(at, &byte)?;
                index = index.saturating_add(1);
            }
        }
        Ok(())
    }

    /// Sets the refcounts of `count` clusters from cluster index `first` to `value` (0 or 1), where every
    /// refcount block they need exists.
    pub(super) fn set_refcount_range(
        &mut self,
        first: u64,
        count: u64,
        value: u64,
    ) -> Result<(), Error<D::Error>> {
        let per_block = self.refcount_block_entries();
        let stop = first.saturating_add(count);
        let mut cluster = first;
        while cluster < stop {
            let index = div(cluster, per_block);
            let segment_end = stop.min(index.saturating_add(1).saturating_mul(per_block));
            let block = self.refcount_block_offset(index)?;
            if block == 0 {
                return Err(corrupt(
                    "refcount block missing while creating the image",
                    self.cluster_offset(cluster),
                ));
            }
            self.set_refcounts(
                block,
                rem(cluster, per_block),
                segment_end.saturating_sub(cluster),
                value,
            )?;
            cluster = segment_end;
        }
        Ok(())
    }
}
