//! A new refcount structure written after the end of the image, from counts taken without the old one.

use super::*;

impl<A: Access> Checker<'_, A> {
    /// Clusters a rebuild pass covers: a multiple of the refcounts in one [`PIECE`] of a refcount block.
    pub(super) fn rebuild_pass_len(&self, scratch_len: usize) -> u64 {
        let per_piece = per_piece(self.image.header.refcount_order);
        self.pass_len(scratch_len)
            .checked_div(per_piece)
            .unwrap_or(0)
            .saturating_mul(per_piece)
    }

    /// Writes a new refcount table and blocks after the last used cluster (inside the file where it has room
    /// there, else after its end), from counts taken without the old refcount structure, makes them durable,
    /// then points the header at them.
    ///
    /// `max_end` is one past the highest cluster any reference names: the new structure goes after it, so
    /// that it never lands on a cluster something references (one past the end of the file included).
    pub(super) fn rebuild(
        &mut self,
        scratch: &mut [u8],
        touched_end: bool,
        max_end: u64,
    ) -> Result<(), Error<A::E>> {
        let g = self.image;
        let per_block = 1u64 << g.header.refcount_block_bits();
        // Refcount blocks covering everything up to `start` and the new structure itself.
        let sizes = |start: u64| {
            let (mut blocks, mut table) = (1u64, 1u64);
            for _ in 0..64 {
                let total = start.saturating_add(blocks).saturating_add(table);
                let b = ceil_div(total, per_block);
                let t = ceil_div(b.saturating_mul(8), g.header.cluster_size());
                if (b, t) == (blocks, table) {
                    break;
                }
                (blocks, table) = (b, t);
            }
            (blocks, table)
        };
        // Where the file has room after its last used cluster (a firmware disk, which cannot grow, keeps
        // some), the new structure goes there; else after the end of the file.
        let (blocks, table) = sizes(max_end);
        let fits = max_end.saturating_add(blocks).saturating_add(table) <= g.file_clusters;
        let start = if fits {
            max_end
        } else {
            g.file_clusters
                .saturating_add(u64::from(touched_end))
                .max(max_end)
        };
        let (blocks, table) = if fits { (blocks, table) } else { sizes(start) };
        if table.saturating_mul(g.header.cluster_size()) > crate::format::MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported {
                what: "rebuilt refcount table would be larger than 8 MiB",
                value: table,
            });
        }
        let table_offset = start
            .saturating_add(blocks)
            .saturating_mul(g.header.cluster_size());
        let end = start.saturating_add(blocks).saturating_add(table);
        if end
            .checked_mul(g.header.cluster_size())
            .is_none_or(|e| e > crate::format::MAX_HOST_OFFSET)
        {
            return Err(corrupt("image too large to rebuild refcounts", end));
        }
        let len = self.rebuild_pass_len(scratch.len());
        if len == 0 {
            return Err(Error::BufferTooSmall {
                what: "check scratch (refcount rebuild)",
                need: per_piece(g.header.refcount_order).saturating_mul(COUNT_BYTES as u64),
                have: scratch.len() as u64,
            });
        }
        let covered = blocks.saturating_mul(per_block);
        let per_piece = per_piece(g.header.refcount_order);
        let mut lo = 0u64;
        while lo < covered {
            let hi = lo.saturating_add(len).min(covered);
            let used = (hi.saturating_sub(lo) as usize).saturating_mul(COUNT_BYTES);
            scratch.get_mut(..used).unwrap_or(&mut []).fill(0);
            let mut p = Pass::new(PassKind::ForRebuild, &mut *scratch, lo, hi);
            if lo <= g.file_clusters {
                self.walk(&mut p)?;
            }
            // The new structure itself.
            for c in start.max(lo)..end.min(hi) {
                count_set(p.counts, c.saturating_sub(lo), 1);
            }
            // Write the range's pieces of refcount blocks.
            let mut c0 = lo;
            while c0 < hi {
                let mut piece = [0u8; PIECE];
                for k in 0..per_piece {
                    let v = p.count(c0.saturating_add(k)).min(g.header.max_refcount());
                    let _ = refcount_set(&mut piece, g.header.refcount_order, k as usize, v);
                }
                let (block, index) = refcount_location(c0, g.header.refcount_block_bits());
                let (byte, _) =
                    refcount_slice_position(index, g.header.refcount_order, PIECE as u64);
                let at = start
                    .saturating_add(block)
                    .saturating_mul(g.header.cluster_size())
                    .saturating_add(byte);
                self.io.write(self.bounce, at, &piece)?;
                c0 = c0.saturating_add(per_piece);
            }
            lo = hi;
        }
        // The refcount table.
        let entries_per_piece = (PIECE / 8) as u64;
        let table_entries = table.saturating_mul(g.header.cluster_size()) / 8;
        let mut e0 = 0u64;
        while e0 < table_entries {
            let mut piece = [0u8; PIECE];
            for k in 0..entries_per_piece {
                let b = e0.saturating_add(k);
                if b < blocks {
                    let off = start
                        .saturating_add(b)
                        .saturating_mul(g.header.cluster_size());
                    let at = (k as usize).saturating_mul(8);
                    if let Some(d) = piece.get_mut(at..at.saturating_add(8)) {
                        d.copy_from_slice(&off.to_be_bytes());
                    }
                }
            }
            self.io.write(
                self.bounce,
                table_offset.saturating_add(e0.saturating_mul(8)),
                &piece,
            )?;
            e0 = e0.saturating_add(entries_per_piece);
        }
        // New structure durable before the header points at it.
        self.io.flush()?;
        let mut fields = [0u8; 12];
        fields
            .get_mut(..8)
            .unwrap_or(&mut [])
            .copy_from_slice(&table_offset.to_be_bytes());
        fields
            .get_mut(8..)
            .unwrap_or(&mut [])
            .copy_from_slice(&(table as u32).to_be_bytes());
        self.io
            .write(self.bounce, field::REFCOUNT_TABLE_OFFSET, &fields)?;
        self.io.flush()?;
        self.image = load_image(&mut self.io, self.bounce)?;
        Ok(())
    }
}
