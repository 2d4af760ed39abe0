//! Emptying an image after its data was committed into its backing file (`qemu-img commit`), as QEMU's
//! `qcow2_make_empty` does: a version 3 image without snapshots, bitmaps or external data file whose
//! structures sit where a fresh image has them (refcount table in cluster 1, the first refcount block in
//! cluster 2, the L1 table from cluster 3) is reset to that fresh layout and the file cut after its L1 table;
//! any other image has every cluster dropped (QEMU's full discard).
//!
//! The guest sees the backing file through the emptied image, which after a commit is what it saw before:
//! so a power loss in between leaves an image whose entries are partly dropped, and that reads the same.
//! The reset goes in an order where every state is consistent but for leaked clusters: the L1 table
//! zeroed first, then the refcount table's entries for other refcount blocks, then the first refcount block
//! rewritten to count only the header, the two refcount structures and the L1 table (all in the region that
//! block covers), then the file cut. QEMU instead sets the dirty bit and rebuilds the structures in place.

use super::allocate::set_in_chunk;
use super::*;

impl<D, B, C, const DEPTH: usize, const SLICES: usize> Image<D, B, C, DEPTH, SLICES, WriteState>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// Drops everything the image holds, so that it reads as its backing file (see the module's
    /// documentation).
    pub fn make_empty(&mut self) -> Result<(), Error<D::Error>> {
        self.refuse_external_data("emptying an image with an external data file")?;
        let h = *self.meta()?.header;
        let bitmaps = h.autoclear_features.contains(AutoclearFeatures::BITMAPS);
        self.begin_write()?;
        // Every guest byte may change: every bit of the bitmaps is set first.
        let size = self.virtual_size();
        self.meta()?.mark_bitmaps(0, size)?;
        self.finish()?;
        let mut m = self.meta()?;
        let g = m.g;
        let cs = g.tables.cluster_size;
        let l1_clusters = ceil_div(g.tables.l1_size.saturating_mul(8), cs);
        let fresh = h.version >= 3
            && h.nb_snapshots == 0
            && !bitmaps
            && h.crypt_method == 0
            && h.refcount_table_offset == cs
            && h.refcount_table_clusters == 1
            && g.tables.l1_table_offset == cs.saturating_mul(3)
            && l1_clusters.saturating_add(3) <= 1u64 << g.tables.refcount_block_bits
            && m.reftable_entry(0)? == cs.saturating_mul(2);
        if !fresh {
            // Freed clusters are discarded on the device, as QEMU passes these discards down.
            m.w.discard_freed = true;
            let dropped = self.drop_clusters(0, ceil_div(size, cs).saturating_mul(cs));
            let mut m = self.meta()?;
            let freed = dropped.and_then(|()| m.commit_frees());
            m.w.discard_freed = false;
            freed?;
            m.writeback_all()?;
            m.flush_dev()?;
            return self.end_write();
        }
        // The L1 table: the guest now sees the backing file.
        m.write_zeros(cs.saturating_mul(3), l1_clusters.saturating_mul(cs))?;
        m.flush_dev()?;
        // Refcount blocks other than the first: nothing they count is referenced any more.
        m.write_zeros(cs.saturating_add(8), cs.saturating_sub(8))?;
        m.flush_dev()?;
        // The first refcount block counts the header, the refcount table and block and the L1 table.
        let used = l1_clusters.saturating_add(3);
        let order = g.tables.refcount_order;
        m.write_block_with(cs.saturating_mul(2), |_, chunk_start, chunk| {
            (0..used).try_for_each(|c| set_in_chunk(chunk, chunk_start, c, order))
        })?;
        m.flush_dev()?;
        m.cache.invalidate(Some(0));
        m.w.free_hint = used;
        let end = used.saturating_mul(cs);
        if m.dev.size()? != end {
            m.dev.set_size(end)?;
        }
        Ok(())
    }
}
