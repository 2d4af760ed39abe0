//! Preallocation: L2 tables linked into the L1 table, their entries, and the data clusters of
//! `preallocation=metadata` (and external data files) and `preallocation=falloc|full`.

use crate::Error;
use crate::device::BlockDeviceWrite;

use super::replay::{Builder, CHUNK, div, overflow, rem};

impl<D: BlockDeviceWrite> Builder<'_, '_, D> {
    /// Allocates an L2 table for L1 index `l1_index` and hooks it up (COPIED set).
    pub(super) fn alloc_l2(
        &mut self,
        l1_offset: u64,
        l1_index: u64,
    ) -> Result<u64, Error<D::Error>> {
        let l2 = self.alloc_clusters(1)?;
        let l2 = self.g.offset(l2);
        self.zero(l2, self.g.cluster_size())?;
        let entry = l2 | (1u64 << 63);
        self.write(
            l1_offset.saturating_add(l1_index.saturating_mul(8)),
            &entry.to_be_bytes(),
        )?;
        Ok(l2)
    }

    /// Writes `count` L2 entries from index `first` of the table at `l2`, mapping consecutive clusters
    /// from host offset `host` (COPIED set; subcluster bitmaps 0).
    pub(super) fn write_l2_entries(
        &mut self,
        l2: u64,
        first: u64,
        count: u64,
        host: u64,
    ) -> Result<(), Error<D::Error>> {
        let es = self.g.l2_entry_size;
        let per_chunk = div(CHUNK as u64, es);
        let mut buf = [0u8; CHUNK];
        let mut done = 0u64;
        while done < count {
            let n = count.saturating_sub(done).min(per_chunk);
            for k in 0..n {
                let cluster_host = host.saturating_add(self.g.offset(done.saturating_add(k)));
                let at = (k.saturating_mul(es)) as usize;
                let entry = (cluster_host | (1u64 << 63)).to_be_bytes();
                buf.get_mut(at..at.saturating_add(8))
                    .ok_or(overflow())?
                    .copy_from_slice(&entry);
                if let Some(bitmap) =
                    buf.get_mut(at.saturating_add(8)..at.saturating_add(es as usize))
                {
                    bitmap.fill(0);
                }
            }
            let at = l2.saturating_add(first.saturating_add(done).saturating_mul(es));
            let piece = buf
                .get(..(n.saturating_mul(es)) as usize)
                .ok_or(overflow())?;
            self.write(at, piece)?;
            done = done.saturating_add(n);
        }
        Ok(())
    }

    /// `preallocation=metadata` (and any preallocation with an external data file).
    pub(super) fn preallocate_metadata(
        &mut self,
        l1_offset: u64,
        data_file: bool,
    ) -> Result<(), Error<D::Error>> {
        let total = self.g.guest_clusters;
        let per_l2 = self.g.l2_entries;
        // QEMU allocates at most INT_MAX bytes of clusters at a time.
        let max_run = (0x7fff_ffffu64 >> self.g.cluster_bits).max(1);
        let mut guest = 0u64;
        let mut l2 = 0u64;
        let mut last_data_end = 0u64;
        while guest < total {
            let l1_index = div(guest, per_l2);
            let within = rem(guest, per_l2);
            if within == 0 || l2 == 0 {
                l2 = self.alloc_l2(l1_offset, l1_index)?;
            }
            let run = total
                .saturating_sub(guest)
                .min(per_l2.saturating_sub(within))
                .min(max_run);
            let host = if data_file {
                self.g.offset(guest)
            } else {
                let pos = self.alloc_clusters(run)?;
                // The guest bytes this run maps, rounded up to a subcluster.
                let guest_end = self.g.size.min(self.g.offset(guest.saturating_add(run)));
                let bytes = guest_end
                    .saturating_sub(self.g.offset(guest))
                    .next_multiple_of(self.g.subcluster_size());
                last_data_end = self.g.offset(pos).saturating_add(bytes);
                self.g.offset(pos)
            };
            self.write_l2_entries(l2, within, run, host)?;
            guest = guest.saturating_add(run);
        }
        // QEMU extends the file to the end of the last data it allocated (to the subcluster).
        self.file_end = self.file_end.max(last_data_end);
        Ok(())
    }

    /// `preallocation=falloc|full` without a data file.
    pub(super) fn preallocate_full(
        &mut self,
        l1_offset: u64,
        write_zeros: bool,
    ) -> Result<(), Error<D::Error>> {
        let data = self.g.guest_clusters;
        let l2_tables = data.div_ceil(self.g.l2_entries);
        // Everything below `end` is in use: the new structures start there.
        let start = self.end;
        let area_end = self.refcount_area(start, data.saturating_add(l2_tables), true, None)?;
        // The data area.
        let data_offset = self.g.offset(area_end);
        let data_end = area_end.checked_add(data).ok_or(overflow())?;
        if write_zeros {
            self.zero(data_offset, self.g.offset(data))?;
        }
        self.file_end = self.file_end.max(self.g.offset(data_end));
        self.alloc_clusters_at(area_end, data)?;
        self.known_used = (area_end, data_end);
        // L2 tables, allocated as they are linked.
        let per_l2 = self.g.l2_entries;
        let mut guest = 0u64;
        while guest < data {
            let l1_index = div(guest, per_l2);
            let run = data.saturating_sub(guest).min(per_l2);
            let l2 = self.alloc_l2(l1_offset, l1_index)?;
            self.write_l2_entries(l2, 0, run, self.g.offset(area_end.saturating_add(guest)))?;
            guest = guest.saturating_add(run);
        }
        Ok(())
    }
}
