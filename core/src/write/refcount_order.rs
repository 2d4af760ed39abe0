//! A new refcount width (qemu-img amend's `refcount_bits`), made as QEMU's `qcow2_change_refcount_order`
//! makes it, so that the result is qemu-img's byte for byte:
//!
//! 1. Walks over every refcount the old refcount table covers, in groups of a new refcount block's size;
//!    each group with a nonzero refcount gets a cluster for its new block (allocated in the old structure,
//!    so the walk sees it), then the new refcount table gets clusters; repeated until a walk allocates
//!    nothing (the new clusters need counting too).
//! 2. Writes each new block (every refcount in the new width) and the new table.
//! 3. One rewrite of the first cluster switches the width and the table together (crash-safe); then the old
//!    blocks and table are freed in the new structure.
//!
//! After a crash before the switch the old structure holds (the new clusters leaked); after it, the new one
//! (the old clusters leaked until freed). The new table is built in a caller-supplied buffer (8 bytes an
//! entry): memory stays the caller's.

use super::*;
use crate::format::{MAX_REFTABLE_BYTES, REFTABLE_OFFSET_MASK};
use header::Cluster0Change;

/// A refcount does not fit the new width: `value` is the cluster's offset.
pub const REFCOUNT_TOO_WIDE: &str = "a cluster's refcount does not fit the new refcount width";
/// A refcount width other than 16 bits needs version 3.
pub const REFCOUNT_WIDTH_NEEDS_V3: &str =
    "refcount widths other than 16 bits need a version 3 image (compat=1.1)";

/// Where a walk over the refcounts is: the new block being filled.
struct NewBlock {
    /// Its index in the new refcount table.
    index: u64,
    /// Refcounts already in it.
    filled: u64,
    /// Every refcount in it so far is 0.
    empty: bool,
}

impl<D, B, C, const DEPTH: usize, const SLICES: usize> Image<D, B, C, DEPTH, SLICES, WriteState>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// Changes the refcount width to `1 << order` bits (`order` 0 to 6) as QEMU does (see the module's
    /// documentation). `table` holds the new refcount table while it is built: 8 bytes an entry, at most
    /// QEMU's 8 MiB ([`Error::BufferTooSmall`] when the table needs more than it has). Refused, with the
    /// image left as it was, when a refcount does not fit the new width ([`REFCOUNT_TOO_WIDE`], the
    /// cluster's offset as the value) and for version 2 images ([`REFCOUNT_WIDTH_NEEDS_V3`]).
    pub fn change_refcount_order(
        &mut self,
        order: u32,
        table: &mut [u8],
    ) -> Result<(), Error<D::Error>> {
        let h = *self.meta()?.header;
        if order == h.refcount_order {
            return Ok(());
        }
        if order > 6 {
            return Err(Error::Unsupported {
                what: "a refcount width of more than 64 bits",
                value: 1u64.checked_shl(order).unwrap_or(u64::MAX),
            });
        }
        if h.version < 3 {
            return Err(Error::Unsupported {
                what: REFCOUNT_WIDTH_NEEDS_V3,
                value: 1u64 << order,
            });
        }
        self.begin_write()?;
        self.finish()?;
        let mut m = self.meta()?;
        m.w.lazy = false;
        let mut new_table = (0u64, 0u64);
        let (reftable, entries) = match m.build_refcount_structure(order, table, &mut new_table) {
            Ok(done) => done,
            Err(e) => {
                m.drop_new_structure(table, new_table)?;
                return Err(e);
            }
        };
        m.writeback_all()?;
        m.flush_dev()?;
        let old = m.g.tables;
        let mut new = *m.header;
        new.refcount_order = order;
        new.refcount_table_offset = reftable;
        new.refcount_table_clusters =
            u32::try_from(ceil_div(entries.saturating_mul(8), old.cluster_size))
                .unwrap_or(u32::MAX);
        m.rewrite_cluster0(&mut new, &Cluster0Change::default())?;
        self.cache.invalidate(None);
        self.reload_meta()?;
        // The old structure, counted in the new one: its blocks in table order, then its table.
        let mut m = self.meta()?;
        let mut chunk = [0u8; guard::SCAN_CHUNK];
        let mut from = 0u64;
        while from < old.refcount_table_entries {
            let n = m.read_table_chunk(
                old.refcount_table_offset,
                from,
                old.refcount_table_entries,
                &mut chunk,
            )?;
            for k in 0..n {
                let block = be64(&chunk, k.saturating_mul(8)) & REFTABLE_OFFSET_MASK;
                if block != 0 {
                    m.free_range(block, old.cluster_size)?;
                }
            }
            if n == 0 {
                break;
            }
            from = from.saturating_add(n as u64);
        }
        m.free_range(
            old.refcount_table_offset,
            old.refcount_table_entries.saturating_mul(8),
        )?;
        m.writeback_all()?;
        m.flush_dev()
    }
}

impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// Steps 1 and 2: allocates and writes the new refcount blocks and table (for width `1 << order`) in the
    /// old structure; returns the new table's offset and entry count. The new table's entries are in
    /// `table` (big-endian, as stored).
    /// `new_table` follows the new table's clusters (offset, entries) for a caller that must free them.
    fn build_refcount_structure(
        &mut self,
        order: u32,
        table: &mut [u8],
        new_table: &mut (u64, u64),
    ) -> Result<(u64, u64), Error<D::Error>> {
        table.fill(0);
        let cs = self.g.tables.cluster_size;
        let per_cluster = cs / 8;
        let mut size = 0u64;
        loop {
            let mut allocated = false;
            self.walk_new_blocks(order, &mut |m, index, empty| {
                if empty {
                    return Ok(());
                }
                if index >= size {
                    let grown = index.saturating_add(1).next_multiple_of(per_cluster.max(1));
                    if grown.saturating_mul(8) > MAX_REFTABLE_BYTES {
                        return Err(Error::NoSpace {
                            what: "the refcount table would grow beyond the maximum size QEMU supports",
                        });
                    }
                    if grown.saturating_mul(8) > table.len() as u64 {
                        return Err(Error::BufferTooSmall {
                            what: "buffer for the new refcount table",
                            need: grown.saturating_mul(8),
                            have: table.len() as u64,
                        });
                    }
                    size = grown;
                }
                let at = index.saturating_mul(8) as usize;
                if be64(table, at) == 0 {
                    let host = m.alloc_table_clusters(1)?;
                    m.note_table(host);
                    if let Some(slot) = table.get_mut(at..at.saturating_add(8)) {
                        let _ = copy_exact(slot, &host.to_be_bytes());
                    }
                    allocated = true;
                }
                Ok(())
            })?;
            if !allocated {
                break;
            }
            if new_table.0 != 0 {
                let (at, entries) = *new_table;
                *new_table = (0, 0);
                self.free_range(at, entries.saturating_mul(8))?;
            }
            let at = self.alloc_table_clusters(ceil_div(size.saturating_mul(8), cs))?;
            self.note_table(at);
            *new_table = (at, size);
        }
        let reftable = new_table.0;
        // Step 2: the blocks, then the table.
        let bits = self.g.cluster_bits;
        let per_block = 1u64 << (bits.saturating_add(3).saturating_sub(order) & 63);
        let per_chunk = (STACK_CHUNK as u64).saturating_mul(8) >> order;
        for index in 0..size {
            let host = be64(table, index.saturating_mul(8) as usize);
            if host == 0 {
                continue;
            }
            let first = index.saturating_mul(per_block);
            let mut done = 0u64;
            while done < per_block {
                let mut chunk = [0u8; STACK_CHUNK];
                let n = per_chunk.min(per_block.saturating_sub(done));
                for e in 0..n {
                    let c = first.saturating_add(done).saturating_add(e);
                    let rc = self.refcount_or_zero(c)?;
                    refcount_set(&mut chunk, order, e as usize, rc)
                        .ok_or(corrupt("new refcount block", host))?;
                }
                let bytes = (n << order).div_ceil(8) as usize;
                let at = host.saturating_add((done << order) / 8);
                self.write_dev(at, chunk.get(..bytes).unwrap_or(&[]))?;
                done = done.saturating_add(n);
            }
        }
        let bytes = size.saturating_mul(8) as usize;
        self.write_dev(reftable, table.get(..bytes).unwrap_or(&[]))?;
        Ok((reftable, size))
    }

    /// Calls `f(meta, index, empty)` for each new refcount block (`1 << order`-bit refcounts) as QEMU's walk
    /// finishes it: every refcount the old refcount table covers, read as the walk goes (what `f` allocates
    /// shows in later blocks), in groups of a new block's size; the last group may be partial.
    fn walk_new_blocks<F>(&mut self, order: u32, f: &mut F) -> Result<(), Error<D::Error>>
    where
        F: FnMut(&mut Self, u64, bool) -> Result<(), Error<D::Error>>,
    {
        let bits = self.g.cluster_bits;
        let per_block = 1u64 << (bits.saturating_add(3).saturating_sub(order) & 63);
        let width = 1u64 << order;
        let mut block = NewBlock {
            index: 0,
            filled: 0,
            empty: true,
        };
        let mut r = 0u64;
        // The old table may grow while the walk allocates: its length is read each time.
        while r < self.g.tables.refcount_table_entries {
            let old_block = self.reftable_entry(r)?;
            let per_old = 1u64 << self.g.tables.refcount_block_bits;
            let first = r.saturating_mul(per_old);
            let mut c = 0u64;
            while c < per_old {
                if block.filled == per_block {
                    f(self, block.index, block.empty)?;
                    block = NewBlock {
                        index: block.index.saturating_add(1),
                        filled: 0,
                        empty: true,
                    };
                }
                if old_block == 0 {
                    // No block: every refcount is 0, as many as fit in the new block at once.
                    let n = per_block
                        .saturating_sub(block.filled)
                        .min(per_old.saturating_sub(c));
                    block.filled = block.filled.saturating_add(n);
                    c = c.saturating_add(n);
                    continue;
                }
                let cluster = first.saturating_add(c);
                let rc = self.refcount(cluster)?;
                if order < 6 && rc >> width != 0 {
                    return Err(Error::Unsupported {
                        what: REFCOUNT_TOO_WIDE,
                        value: cluster << bits,
                    });
                }
                block.empty = block.empty && rc == 0;
                block.filled = block.filled.saturating_add(1);
                c = c.saturating_add(1);
            }
            r = r.saturating_add(1);
        }
        if block.filled > 0 {
            f(self, block.index, block.empty)?;
        }
        Ok(())
    }

    /// Cluster `c`'s refcount, 0 past the refcount table.
    fn refcount_or_zero(&mut self, c: u64) -> Result<u64, Error<D::Error>> {
        if c >> self.g.tables.refcount_block_bits >= self.g.tables.refcount_table_entries {
            return Ok(0);
        }
        self.refcount(c)
    }

    /// After a failure before the switch: the new blocks in `table` go back (in table order), then the new
    /// table (`new_table`: offset and entries), as QEMU frees them.
    fn drop_new_structure(
        &mut self,
        table: &[u8],
        new_table: (u64, u64),
    ) -> Result<(), Error<D::Error>> {
        let cs = self.g.tables.cluster_size;
        for slot in table.chunks_exact(8) {
            let host = slot.try_into().map(u64::from_be_bytes).unwrap_or(0) & REFTABLE_OFFSET_MASK;
            if host != 0 {
                self.free_range(host, cs)?;
            }
        }
        if new_table.0 != 0 {
            self.free_range(new_table.0, new_table.1.saturating_mul(8))?;
        }
        self.writeback_all()?;
        self.flush_dev()
    }
}
