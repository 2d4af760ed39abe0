//! L1 and refcount-table entries and refcounts as the writer uses them: read through
//! [`TableAccess`](crate::meta::TableAccess) as every reader does, table words written through, and a
//! refcount raised or lowered in its cached slice (a freed cluster's cached slices are forgotten).

use super::*;

impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// The top image's tables through the metadata cache.
    pub(super) fn tables(&mut self) -> TableAccess<'_, D, B, SLICES> {
        TableAccess {
            dev: self.dev,
            cache: self.cache,
            bounce: self.bounce,
            layer: 0,
            layout: self.g.tables,
        }
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

    /// L1 entry `index`; past the end of the L1 table is corruption (the caller checked the guest offset).
    pub(super) fn l1_entry(&mut self, index: u64) -> Result<L1Entry, Error<D::Error>> {
        self.tables()
            .l1_entry(index)?
            .ok_or(corrupt("guest offset beyond the L1 table", index))
    }

    /// The refcount block covering refcount table index `r` (0 = none).
    pub(super) fn reftable_entry(&mut self, r: u64) -> Result<u64, Error<D::Error>> {
        Ok(self.tables().refcount_block(r)?.unwrap_or(0))
    }

    /// Where cluster `c`'s refcount lives: (host offset of its slice, index inside the slice), or `None` when
    /// no refcount block covers it.
    pub(super) fn refcount_loc(&mut self, c: u64) -> Result<Option<(u64, usize)>, Error<D::Error>> {
        self.tables().refcount_position(c)
    }

    pub(super) fn refcount(&mut self, c: u64) -> Result<u64, Error<D::Error>> {
        self.tables().refcount(c)
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
        let slice = self.g.tables.slice_size as usize;
        let order = self.g.tables.refcount_order;
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
            let cs = self.g.tables.cluster_size;
            self.cache.forget_range(0, host, cs);
            if self.w.discard_freed {
                self.dev.discard(host, cs)?;
            }
            self.w.free_hint = self.w.free_hint.min(c);
            if self.w.compressed_at >> self.g.cluster_bits == c {
                self.w.compressed_at = 0;
            }
        }
        Ok(())
    }
}
