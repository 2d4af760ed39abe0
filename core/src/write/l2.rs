//! L2 entries through the metadata cache (read through [`TableAccess`](crate::meta::TableAccess) as every
//! reader does): locating, reading and changing an entry, the L2 table for a
//! guest offset (invalid entries mark the image corrupt), and queueing what a dropped entry held.

use super::*;

impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// Where entry `index` of the L2 table at `l2` lives: (slice, offset in it).
    pub(super) fn l2_loc(&self, l2: u64, index: u64) -> (u64, usize) {
        self.g.tables.l2_position(l2, index)
    }

    pub(super) fn l2_get(&mut self, l2: u64, index: u64) -> Result<L2Entry, Error<D::Error>> {
        self.tables().l2_entry(l2, index)
    }

    pub(super) fn l2_set(
        &mut self,
        l2: u64,
        index: u64,
        e: L2Entry,
    ) -> Result<(), Error<D::Error>> {
        self.make_room(1)?;
        let (host, at) = self.l2_loc(l2, index);
        let slice = self.g.tables.slice_size as usize;
        let extended = self.g.tables.l2_format.extended;
        let bs = self.dev.block_size();
        let s = self.cache.get_mut(
            self.dev,
            bounce_of(self.bounce, bs),
            0,
            host,
            slice,
            SliceKind::L2,
        )?;
        let word = s
            .get_mut(at..at.saturating_add(8))
            .ok_or(corrupt("L2 slice", host))?;
        copy_exact(word, &e.word.to_be_bytes()).ok_or(corrupt("L2 slice", host))?;
        if extended {
            let bitmap = s
                .get_mut(at.saturating_add(8)..at.saturating_add(16))
                .ok_or(corrupt("L2 slice", host))?;
            copy_exact(bitmap, &e.bitmap.to_be_bytes()).ok_or(corrupt("L2 slice", host))?;
        }
        Ok(())
    }

    /// The L2 table that the L1 entry for guest offset `guest` names, if any (and the entry itself, for its
    /// COPIED flag). An invalid entry marks the image corrupt.
    pub(super) fn l2_table(
        &mut self,
        guest: u64,
    ) -> Result<(L1Entry, Option<u64>), Error<D::Error>> {
        let g = self.g;
        let l1_index = guest >> g.l2_coverage_bits;
        let entry = self.l1_entry(l1_index)?;
        let l2 = entry.l2_offset(g.tables.cluster_size).map_err(|e| {
            self.mark_corrupt(
                e.describe("L1"),
                g.tables
                    .l1_table_offset
                    .saturating_add(l1_index.saturating_mul(8)),
            )
        })?;
        Ok((entry, l2))
    }

    /// L2 entry `index` of the table at `l2`, and what it describes (an entry no valid image has marks the
    /// image corrupt).
    pub(super) fn classified_entry(
        &mut self,
        l2: u64,
        index: u64,
    ) -> Result<(L2Entry, ClusterKind), Error<D::Error>> {
        let entry = self.l2_get(l2, index)?;
        let (entry_host, _) = self.l2_loc(l2, index);
        let kind = entry
            .classify(self.g.tables.l2_format)
            .map_err(|e| self.mark_corrupt(e.describe("L2"), entry_host))?;
        Ok((entry, kind))
    }

    /// The index, entry and kind of guest cluster `gc` in the L2 table at `l2`. An invalid entry marks the
    /// image corrupt.
    pub(super) fn cluster_entry(
        &mut self,
        l2: u64,
        gc: u64,
    ) -> Result<(u64, L2Entry, ClusterKind), Error<D::Error>> {
        let index = (gc >> self.g.cluster_bits) & self.g.l2_entries.wrapping_sub(1);
        let (entry, kind) = self.classified_entry(l2, index)?;
        Ok((index, entry, kind))
    }

    /// Queues the host clusters an entry held for freeing (data, preallocated zero, compressed).
    pub(super) fn free_entry(&mut self, kind: ClusterKind) -> Result<(), Error<D::Error>> {
        match kind {
            ClusterKind::Data { host } | ClusterKind::Zero { host: Some(host) } => {
                if !self.g.tables.l2_format.external_data {
                    self.free_later(host)?;
                }
            }
            ClusterKind::Compressed(d) => {
                let first = d.offset >> self.g.cluster_bits;
                let last = d.offset.saturating_add(d.len).saturating_sub(1) >> self.g.cluster_bits;
                let mut c = first;
                while c <= last {
                    self.free_later(c << self.g.cluster_bits)?;
                    c = c.saturating_add(1);
                }
            }
            ClusterKind::Unallocated | ClusterKind::Zero { host: None } => {}
        }
        Ok(())
    }
}
