//! Before a `-r all` repair writes anything: the tables it would write entries into must be used as those
//! tables only (the repair's refusal of tables that overlap other data or metadata).

use super::*;

impl<A: Access> Checker<'_, A> {
    /// Before a `-r all` repair writes anything: every cluster it may write table entries into (the active L1
    /// table, and every L2 table that an L1 table names) must be used as that table only: not the header, not
    /// guest data, not part of the refcount structure or of a snapshot or bitmap structure, and (an L2 table)
    /// not inside the active L1 table. Returns the first cluster that is not, and the table it would be
    /// written as. QEMU's overlap check stops its repair at the first such write; this finds them all before
    /// the first write, so that a refused repair changes nothing but the corrupt bit.
    pub(super) fn repair_conflict(
        &mut self,
        scratch: &mut [u8],
    ) -> Result<Option<(u64, &'static str)>, Error<A::E>> {
        let len = self.pass_len(scratch.len());
        let total = self.count_end()?;
        let mut lo = 0u64;
        while lo < total {
            let hi = lo.saturating_add(len).min(total);
            let used = (hi.saturating_sub(lo) as usize).saturating_mul(COUNT_BYTES);
            scratch.get_mut(..used).unwrap_or(&mut []).fill(0);
            let mut p = Pass::new(PassKind::Overlap, &mut *scratch, lo, hi);
            self.walk(&mut p)?;
            if let Some(conflict) = self.table_conflict(&p)? {
                return Ok(Some(conflict));
            }
            lo = hi;
        }
        Ok(None)
    }

    /// [`Checker::repair_conflict`] for the clusters of one role-probe pass.
    pub(super) fn table_conflict(
        &mut self,
        p: &Pass<'_>,
    ) -> Result<Option<(u64, &'static str)>, Error<A::E>> {
        let g = self.image;
        let h = g.header;
        let l1_bytes = u64::from(h.l1_size).saturating_mul(8);
        let l1_in_file = self.in_file(h.l1_table_offset, l1_bytes, 8);
        if l1_in_file > 0 {
            let first = h.l1_table_offset >> g.header.cluster_bits;
            let last = h
                .l1_table_offset
                .saturating_add(l1_in_file.saturating_sub(1))
                >> g.header.cluster_bits;
            for c in first..=last {
                if c == 0 || p.count(c) > 0 {
                    return Ok(Some((c << g.header.cluster_bits, "active L1 table")));
                }
            }
        }
        let active = (
            h.l1_table_offset,
            h.l1_table_offset.saturating_add(l1_bytes),
        );
        if let Some(c) = self.l2_conflict(p, h.l1_table_offset, h.l1_size, active)? {
            return Ok(Some((c << g.header.cluster_bits, "L2 table")));
        }
        let mut at = h.snapshots_offset;
        for _ in 0..h.nb_snapshots {
            let (next, s) = read_snapshot(&mut self.io, self.bounce, &g, at)?;
            at = next;
            // The walk leaves these out too (reported as corruptions, never written).
            if s.entry.l1_table_offset & g.header.cluster_size().wrapping_sub(1) != 0
                || u64::from(s.entry.l1_size) > MAX_L1_BYTES / 8
            {
                continue;
            }
            if let Some(c) =
                self.l2_conflict(p, s.entry.l1_table_offset, s.entry.l1_size, active)?
            {
                return Ok(Some((c << g.header.cluster_bits, "L2 table")));
            }
        }
        Ok(None)
    }

    /// The first in-file cluster of an L2 table named by the L1 table at `l1_offset` that is also used as
    /// something else (see [`Checker::repair_conflict`]).
    pub(super) fn l2_conflict(
        &mut self,
        p: &Pass<'_>,
        l1_offset: u64,
        l1_size: u32,
        active_l1: (u64, u64),
    ) -> Result<Option<u64>, Error<A::E>> {
        let g = self.image;
        self.for_each_entry(
            l1_offset,
            u64::from(l1_size).saturating_mul(8),
            8,
            &mut |this, _, entry| {
                let e = be64(entry, 0);
                if e == 0 {
                    return Ok(Continue(()));
                }
                let l2 = e & OFFSET_MASK;
                let l2_bytes = this.in_file(
                    l2,
                    g.header
                        .l2_entries()
                        .saturating_mul(g.header.l2_entry_size()),
                    g.header.l2_entry_size(),
                );
                if l2_bytes == 0 {
                    return Ok(Continue(()));
                }
                let l2_end = l2.saturating_add(l2_bytes);
                if l2 < active_l1.1 && active_l1.0 < l2_end {
                    return Ok(Break(l2 >> g.header.cluster_bits));
                }
                for c in (l2 >> g.header.cluster_bits)
                    ..=(l2_end.saturating_sub(1) >> g.header.cluster_bits)
                {
                    if c == 0 || p.count(c) > 0 {
                        return Ok(Break(c));
                    }
                }
                Ok(Continue(()))
            },
        )
    }
}
