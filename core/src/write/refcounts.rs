//! L1 and refcount-table words through the metadata cache, and refcounts: where a cluster's refcount
//! lives, its value, and raising or lowering it (a freed cluster's cached slices are forgotten).

use super::*;
use crate::format::RefcountTableEntry;

impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// The 8-byte big-endian word at byte `byte` of the table at `table` (L1 or refcount table).
    pub(super) fn table_word(&mut self, table: u64, byte: u64) -> Result<u64, Error<D::Error>> {
        let slice = self.g.slice_size;
        let start = byte & !slice.wrapping_sub(1);
        let s = self.cache.get(
            self.dev,
            bounce_of(self.bounce, 0),
            0,
            table.saturating_add(start),
            slice as usize,
        )?;
        Ok(be64(s, byte.saturating_sub(start) as usize))
    }

    /// Writes an 8-byte table word through to the device and into any cached copy.
    pub(super) fn set_table_word(
        &mut self,
        table: u64,
        byte: u64,
        word: u64,
    ) -> Result<(), Error<D::Error>> {
        let host = table.saturating_add(byte);
        let bytes = word.to_be_bytes();
        self.write_dev(host, &bytes)?;
        self.cache.update(0, host, &bytes);
        Ok(())
    }

    pub(super) fn l1_entry(&mut self, index: u64) -> Result<L1Entry, Error<D::Error>> {
        if index >= self.g.l1_size {
            return Err(corrupt("guest offset beyond the L1 table", index));
        }
        let w = self.table_word(self.g.l1_table_offset, index.saturating_mul(8))?;
        Ok(L1Entry(w))
    }

    /// The refcount block covering refcount table index `r` (0 = none).
    pub(super) fn reftable_entry(&mut self, r: u64) -> Result<u64, Error<D::Error>> {
        if r >= self.g.refcount_table_entries {
            return Ok(0);
        }
        let byte = r.saturating_mul(8);
        let w = self.table_word(self.g.refcount_table_offset, byte)?;
        let at = self.g.refcount_table_offset.saturating_add(byte);
        let block = RefcountTableEntry(w)
            .block_offset(self.g.cluster_size)
            .map_err(|e| corrupt(e.describe("refcount table"), at))?;
        Ok(block.unwrap_or(0))
    }

    /// Where cluster `c`'s refcount lives: (host offset of its slice, index inside the slice), or `None` when
    /// no refcount block covers it.
    pub(super) fn refcount_loc(&mut self, c: u64) -> Result<Option<(u64, usize)>, Error<D::Error>> {
        let (r, index) = refcount_location(c, self.g.refcount_block_bits);
        let block = self.reftable_entry(r)?;
        if block == 0 {
            return Ok(None);
        }
        let (start, in_slice) =
            refcount_slice_position(index, self.g.refcount_order, self.g.slice_size);
        Ok(Some((block.saturating_add(start), in_slice)))
    }

    pub(super) fn refcount(&mut self, c: u64) -> Result<u64, Error<D::Error>> {
        let Some((host, idx)) = self.refcount_loc(c)? else {
            return Ok(0);
        };
        let slice = self.g.slice_size as usize;
        let order = self.g.refcount_order;
        let s = self
            .cache
            .get(self.dev, bounce_of(self.bounce, 0), 0, host, slice)?;
        refcount_get(s, order, idx).ok_or(corrupt("refcount index", host))
    }

    /// Raises (`up`) or lowers cluster `c`'s refcount by one.
    pub(super) fn change_refcount(&mut self, c: u64, up: bool) -> Result<(), Error<D::Error>> {
        self.make_room(2)?;
        let Some((host, idx)) = self.refcount_loc(c)? else {
            return Err(corrupt(
                "no refcount block covers an allocated cluster",
                c << self.g.cluster_bits,
            ));
        };
        let slice = self.g.slice_size as usize;
        let order = self.g.refcount_order;
        let max = self.g.max_refcount;
        let bs = self.dev.block_size();
        let s = self.cache.get_mut(
            self.dev,
            bounce_of(self.bounce, bs),
            0,
            host,
            slice,
            SliceKind::Refcount,
        )?;
        let v = refcount_get(s, order, idx).ok_or(corrupt("refcount index", host))?;
        let new = if up {
            v.checked_add(1)
                .filter(|&n| n <= max)
                .ok_or(Error::Unsupported {
                    what: "a cluster's refcount would exceed the largest value refcount_bits can hold",
                    value: c << self.g.cluster_bits,
                })?
        } else {
            v.checked_sub(1)
                .ok_or(corrupt("refcount underflow", c << self.g.cluster_bits))?
        };
        refcount_set(s, order, idx, new).ok_or(corrupt("refcount index", host))?;
        if new == 0 {
            // A freed table's cached slices are stale from now on (the cluster may come back as data).
            let host = c << self.g.cluster_bits;
            let cs = self.g.cluster_size;
            self.cache.forget_range(0, host, cs);
            self.w.free_hint = self.w.free_hint.min(c);
            if self.w.compressed_at >> self.g.cluster_bits == c {
                self.w.compressed_at = 0;
            }
        }
        Ok(())
    }
}
