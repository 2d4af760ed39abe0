//! Preallocation: L2 tables allocated and linked into the L1 table as QEMU does, their entries (COPIED,
//! subcluster bitmaps 0), and the data clusters of `preallocation=metadata` (also used for external data
//! files, where guest offset = host offset) and of `preallocation=falloc|full` (behind a new refcount table
//! sized for all of it).

use crate::Error;
use crate::device::BlockDeviceWrite;
use crate::format::OFLAG_COPIED;

use super::builder::{Builder, CHUNK, div, overflow, rem};

/// QEMU allocates at most `INT_MAX` bytes of data clusters at a time.
const MAX_ALLOCATION_BYTES: u64 = 0x7fff_ffff;

impl<D: BlockDeviceWrite> Builder<'_, '_, D> {
    /// Allocates an L2 table for L1 index `l1_index` and links it into the L1 table (COPIED set); returns
    /// its host offset.
    fn allocate_l2_table(&mut self, l1_index: u64) -> Result<u64, Error<D::Error>> {
        let cluster = self.alloc_clusters(1)?;
        let l2_offset = self.cluster_offset(cluster);
        self.zero(l2_offset, self.header.cluster_size())?;
        let l1_entry = self
            .header
            .l1_table_offset
            .saturating_add(l1_index.saturating_mul(8));
        self.write(l1_entry, &(l2_offset | OFLAG_COPIED).to_be_bytes())?;
        Ok(l2_offset)
    }

    /// Writes `count` L2 entries from index `first` of the L2 table at `l2_offset`, mapping consecutive
    /// clusters from host offset `host` (COPIED set; subcluster bitmaps 0).
    fn write_l2_entries(
        &mut self,
        l2_offset: u64,
        first: u64,
        count: u64,
        host: u64,
    ) -> Result<(), Error<D::Error>> {
        let entry_size = self.header.l2_entry_size();
        let per_chunk = div(CHUNK as u64, entry_size);
        let mut buf = [0u8; CHUNK];
        let mut done = 0u64;
        while done < count {
            let n = count.saturating_sub(done).min(per_chunk);
            for k in 0..n {
                let cluster_host = host.saturating_add(self.cluster_offset(done.saturating_add(k)));
                let at = (k.saturating_mul(entry_size)) as usize;
                let entry = (cluster_host | OFLAG_COPIED).to_be_bytes();
                buf.get_mut(at..at.saturating_add(8))
                    .ok_or(overflow())?
                    .copy_from_slice(&entry);
                if let Some(bitmap) =
                    buf.get_mut(at.saturating_add(8)..at.saturating_add(entry_size as usize))
                {
                    bitmap.fill(0);
                }
            }
            let at =
                l2_offset.saturating_add(first.saturating_add(done).saturating_mul(entry_size));
            let piece = buf
                .get(..(n.saturating_mul(entry_size)) as usize)
                .ok_or(overflow())?;
            self.write(at, piece)?;
            done = done.saturating_add(n);
        }
        Ok(())
    }

    /// `preallocation=metadata`, and any preallocation with an external data file (`data_file`: the entries
    /// map guest offset = host offset and no data clusters are allocated in the image).
    pub(super) fn preallocate_metadata(&mut self, data_file: bool) -> Result<(), Error<D::Error>> {
        let total = self.guest_clusters();
        let per_l2 = self.header.l2_entries();
        let max_run = (MAX_ALLOCATION_BYTES >> (self.header.cluster_bits & 63)).max(1);
        let mut guest = 0u64;
        let mut l2_offset = 0u64;
        let mut last_data_end = 0u64;
        while guest < total {
            let l1_index = div(guest, per_l2);
            let within = rem(guest, per_l2);
            if within == 0 || l2_offset == 0 {
                l2_offset = self.allocate_l2_table(l1_index)?;
            }
            let run = total
                .saturating_sub(guest)
                .min(per_l2.saturating_sub(within))
                .min(max_run);
            let host = if data_file {
                self.cluster_offset(guest)
            } else {
                let first = self.alloc_clusters(run)?;
                // The guest bytes this run maps, rounded up to a subcluster.
                let guest_end = self
                    .header
                    .size
                    .min(self.cluster_offset(guest.saturating_add(run)));
                let bytes = guest_end
                    .saturating_sub(self.cluster_offset(guest))
                    .next_multiple_of(self.header.subcluster_size());
                last_data_end = self.cluster_offset(first).saturating_add(bytes);
                self.cluster_offset(first)
            };
            self.write_l2_entries(l2_offset, within, run, host)?;
            guest = guest.saturating_add(run);
        }
        // QEMU extends the file to the end of the last data it allocated (to the subcluster).
        self.file_end = self.file_end.max(last_data_end);
        Ok(())
    }

    /// `preallocation=falloc|full` without a data file; `write_zeros` for `full`.
    pub(super) fn preallocate_full(&mut self, write_zeros: bool) -> Result<(), Error<D::Error>> {
        let data = self.guest_clusters();
        let per_l2 = self.header.l2_entries();
        let l2_tables = data.div_ceil(per_l2);
        // Every cluster below `allocated_end` is in use: the new structures start there.
        let start = self.allocated_end;
        let area_end = self.refcount_area(start, data.saturating_add(l2_tables), true, None)?;
        // The data area.
        let data_offset = self.cluster_offset(area_end);
        let data_end = area_end.checked_add(data).ok_or(overflow())?;
        if write_zeros {
            self.zero(data_offset, self.cluster_offset(data))?;
        }
        self.file_end = self.file_end.max(self.cluster_offset(data_end));
        self.alloc_clusters_at(area_end, data)?;
        self.known_used = area_end..data_end;
        // L2 tables, allocated as they are linked.
        let mut guest = 0u64;
        while guest < data {
            let l1_index = div(guest, per_l2);
            let run = data.saturating_sub(guest).min(per_l2);
            let l2_offset = self.allocate_l2_table(l1_index)?;
            let host = self.cluster_offset(area_end.saturating_add(guest));
            self.write_l2_entries(l2_offset, 0, run, host)?;
            guest = guest.saturating_add(run);
        }
        Ok(())
    }
}
