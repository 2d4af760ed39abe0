//! Write-back order and the deferred-free queue: the one place that decides what must be durable before
//! what. The power-loss simulator (`tests/src/crash.rs`, `tests/tests/crash_write.rs`) checks these rules.
//!
//! Crash safety follows QEMU's ordering (the reference sheet's section 12):
//!
//! - On-disk refcounts are never below the real number of references: a cluster's refcount is raised (and,
//!   without lazy refcounts, written back) before an L2 entry that points at it is written back, and it is only
//!   lowered once the entry that stopped pointing at it is durable.
//! - Guest data is durable before the L2 entry that points at it: L2 slices are written back only after a
//!   device flush that follows every data write.
//! - A new L2 table is written (and flushed) before the L1 entry that points at it; a new refcount block
//!   before the refcount table entry; a new refcount table and its blocks before the header.
//! - With lazy refcounts the dirty bit is set durably before the first change; refcounts may then lag behind
//!   the L2 tables until a clean [`Image::close`], and a writable open of a dirty image rebuilds them. That
//!   needs the `dirty-repair` feature (on by default); without it the engine treats a lazy-refcounts image
//!   like any other (refcounts written back before the entries that need them, no dirty bit) and refuses to
//!   open a dirty one for writing.
//!
//! Changed L2 and refcount slices stay in the metadata cache (dirty) and are written back in that order when
//! the cache needs room, at [`Image::flush`] and at [`Image::close`]. Memory stays bounded: nothing here
//! holds more than the caller's buffers and a few hundred bytes of stack.
//!
//! A freed cluster is reused only after the entry that dropped it is durable: [`Meta::free_later`] queues it,
//! and [`Meta::commit_frees`] writes every change back and flushes before it lowers the refcounts.

use super::*;

impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    pub(super) fn writeback(&mut self, kind: SliceKind) -> Result<(), Error<D::Error>> {
        let bs = self.dev.block_size();
        while let Some((idx, host, bytes)) = self.cache.dirty_slice(Some(kind)) {
            write_bytes(self.dev, bounce_of(self.bounce, bs), host, bytes)?;
            self.cache.mark_clean(idx);
            self.w.needs_flush = true;
        }
        Ok(())
    }

    /// Writes every dirty slice back in crash-safe order (refcounts, flush, L2 tables and bitmaps).
    pub(super) fn writeback_all(&mut self) -> Result<(), Error<D::Error>> {
        if self.cache.dirty_slice(Some(SliceKind::L2)).is_some()
            || self.cache.dirty_slice(Some(SliceKind::Bitmap)).is_some()
        {
            if !self.w.lazy {
                self.writeback(SliceKind::Refcount)?;
            }
            if self.w.needs_flush {
                self.flush_dev()?;
            }
            self.writeback(SliceKind::L2)?;
            self.writeback(SliceKind::Bitmap)?;
        }
        self.writeback(SliceKind::Refcount)
    }

    /// Keeps at least `need` cache slots clean.
    pub(super) fn make_room(&mut self, need: usize) -> Result<(), Error<D::Error>> {
        if self.cache.dirty_count().saturating_add(need) > SLICES {
            self.writeback_all()?;
        }
        Ok(())
    }

    /// Queues host cluster `host` for a refcount decrement once the entry change that dropped it is durable.
    pub(super) fn free_later(&mut self, host: u64) -> Result<(), Error<D::Error>> {
        if self.w.pending.is_full() {
            self.commit_frees()?;
        }
        self.w
            .pending
            .push(host)
            .map_err(|_| corrupt("pending frees", host))
    }

    /// Makes every entry change durable, then lowers the refcounts of the clusters they stopped referencing.
    pub(super) fn commit_frees(&mut self) -> Result<(), Error<D::Error>> {
        if self.w.pending.is_empty() {
            return Ok(());
        }
        self.writeback_all()?;
        self.flush_dev()?;
        while let Some(host) = self.w.pending.pop() {
            self.change_refcount(host >> self.g.cluster_bits, false)?;
        }
        Ok(())
    }
}
