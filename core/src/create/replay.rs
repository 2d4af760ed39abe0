//! QEMU's allocator, replayed against the device: the [`Builder`] with the state QEMU keeps in memory (free
//! cluster index, the end of what is in use), streamed writes, and cluster allocation with the refcount
//! blocks it has to create on the way (`alloc_clusters_noref`, `update_refcount`, `alloc_refcount_block`).

use crate::Error;
use crate::device::BlockDeviceWrite;
use crate::io::{read_bytes, write_bytes};

use super::options::Geometry;

/// Stack buffer for streamed writes (the largest buffer `create` holds besides the caller's bounce block).
pub(super) const CHUNK: usize = 4096;

/// Retries of one allocation before giving up, beyond one per refcount block it may have to create.
const MAX_RETRIES: u64 = 64;

/// `a / b`, 0 when `b` is 0.
pub(super) fn div(a: u64, b: u64) -> u64 {
    a.checked_div(b).unwrap_or(0)
}

/// `a % b`, 0 when `b` is 0.
pub(super) fn rem(a: u64, b: u64) -> u64 {
    a.checked_rem(b).unwrap_or(0)
}

/// Outcome of a refcount update that may have had to allocate a refcount block first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Update {
    Done,
    /// A refcount block was allocated; the caller must search for free clusters again.
    Again,
}

/// QEMU's allocator state, replayed against the device.
pub(super) struct Builder<'d, 'b, D> {
    pub(super) dev: &'d mut D,
    pub(super) bounce: &'b mut [u8],
    pub(super) g: Geometry,
    /// Refcount table offset and entries.
    pub(super) rt_offset: u64,
    pub(super) rt_entries: u64,
    /// QEMU's `free_cluster_index`.
    pub(super) free_index: u64,
    /// Every cluster at or past `end` has refcount 0.
    pub(super) end: u64,
    /// Clusters known to be in use (skipped without reading their refcounts).
    pub(super) known_used: (u64, u64),
    /// Length of the file QEMU leaves behind: the end of the furthest write or truncation.
    pub(super) file_end: u64,
}

pub(super) fn overflow<E>() -> Error<E> {
    Error::Unsupported {
        what: "image layout beyond the largest host offset",
        value: 0,
    }
}

impl<D: BlockDeviceWrite> Builder<'_, '_, D> {
    pub(super) fn write(&mut self, offset: u64, bytes: &[u8]) -> Result<(), Error<D::Error>> {
        write_bytes(self.dev, self.bounce, offset, bytes)?;
        let end = offset.saturating_add(bytes.len() as u64);
        self.file_end = self.file_end.max(end);
        Ok(())
    }

    pub(super) fn read(&mut self, offset: u64, bytes: &mut [u8]) -> Result<(), Error<D::Error>> {
        read_bytes(self.dev, self.bounce, offset, bytes)
    }

    pub(super) fn read_be64(&mut self, offset: u64) -> Result<u64, Error<D::Error>> {
        let mut b = [0u8; 8];
        self.read(offset, &mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// Writes `len` bytes made of `pattern` repeated (its length must divide [`CHUNK`]).
    pub(super) fn fill(
        &mut self,
        offset: u64,
        len: u64,
        pattern: &[u8],
    ) -> Result<(), Error<D::Error>> {
        let mut buf = [0u8; CHUNK];
        if !pattern.iter().all(|&b| b == 0) {
            for (dst, src) in buf.iter_mut().zip(pattern.iter().cycle()) {
                *dst = *src;
            }
        }
        let mut done = 0u64;
        while done < len {
            let n = (len.saturating_sub(done)).min(CHUNK as u64);
            let piece = buf.get(..n as usize).ok_or(overflow())?;
            self.write(offset.saturating_add(done), piece)?;
            done = done.saturating_add(n);
        }
        Ok(())
    }

    pub(super) fn zero(&mut self, offset: u64, len: u64) -> Result<(), Error<D::Error>> {
        self.fill(offset, len, &[0])
    }
}

impl<D: BlockDeviceWrite> Builder<'_, '_, D> {
    /// QEMU's `alloc_clusters_noref`: the first run of `n` free clusters at or after the free index.
    pub(super) fn alloc_noref(&mut self, n: u64) -> Result<u64, Error<D::Error>> {
        let mut found = 0u64;
        while found < n {
            if self.free_index >= self.end {
                // Everything from here on is free.
                self.free_index = self
                    .free_index
                    .checked_add(n.saturating_sub(found))
                    .ok_or(overflow())?;
                break;
            }
            let c = self.free_index;
            if (self.known_used.0..self.known_used.1).contains(&c) {
                self.free_index = self.known_used.1;
                found = 0;
                continue;
            }
            self.free_index = c.saturating_add(1);
            if self.refcount(c)? != 0 {
                found = 0;
            } else {
                found = found.saturating_add(1);
            }
        }
        let pos = self.free_index.saturating_sub(n);
        if self.free_index > crate::format::MAX_HOST_OFFSET >> self.g.cluster_bits {
            return Err(overflow());
        }
        self.end = self.end.max(self.free_index);
        Ok(pos)
    }

    /// QEMU's `update_refcount` for an increase (`value` 1) or a decrease (`value` 0) of `n` clusters.
    pub(super) fn update_refcount(
        &mut self,
        pos: u64,
        n: u64,
        value: u64,
    ) -> Result<Update, Error<D::Error>> {
        let per = self.g.refcounts_per_block();
        let stop = pos.checked_add(n).ok_or(overflow())?;
        let mut c = pos;
        while c < stop {
            let index = div(c, per);
            let seg_end = stop.min(index.saturating_add(1).saturating_mul(per));
            let block = self.refblock(index)?;
            if block == 0 {
                self.alloc_refcount_block(c)?;
                // Undo what this call did, as QEMU does when it gets -EAGAIN.
                if c > pos {
                    self.set_range(pos, c.saturating_sub(pos), u64::from(value == 0))?;
                }
                // QEMU searches again from the start of this allocation (observed with qemu-img 10
                // also when nothing had to be undone: a table allocated right at a refcount block
                // boundary stays there, the new block goes after it).
                if value != 0 {
                    self.free_index = self.free_index.min(pos);
                }
                return Ok(Update::Again);
            }
            self.set_refcounts(block, rem(c, per), seg_end.saturating_sub(c), value)?;
            if value == 0 {
                self.free_index = self.free_index.min(c);
            }
            c = seg_end;
        }
        Ok(Update::Done)
    }

    /// QEMU's `alloc_refcount_block` for a cluster whose block is missing. Always ends in "search again".
    pub(super) fn alloc_refcount_block(&mut self, cluster: u64) -> Result<(), Error<D::Error>> {
        let per = self.g.refcounts_per_block();
        let index = div(cluster, per);
        let new_block = self.alloc_noref(1)?;
        let offset = self.g.offset(new_block);
        if div(new_block, per) == index {
            // Describes itself.
            self.zero(offset, self.g.cluster_size())?;
            self.set_refcounts(offset, rem(new_block, per), 1, 1)?;
        } else {
            if self.update_refcount(new_block, 1, 1)? == Update::Again {
                return Ok(());
            }
            self.zero(offset, self.g.cluster_size())?;
        }
        if index < self.rt_entries {
            return self.set_refblock(index, offset);
        }
        // The table is full: a new, larger one goes after the clusters the blocks so far can cover,
        // together with blocks for itself.
        let blocks_used = cluster.max(new_block).saturating_add(1).div_ceil(per);
        let meta_start = blocks_used.checked_mul(per).ok_or(overflow())?;
        self.refcount_area(meta_start, 0, false, Some((index, offset)))?;
        Ok(())
    }

    /// How often an allocation of `n` clusters may have to start over: once per refcount block it makes.
    pub(super) fn retries(&self, n: u64) -> u64 {
        let per = self.g.refcounts_per_block();
        div(self.end.saturating_add(n), per)
            .saturating_mul(2)
            .saturating_add(MAX_RETRIES)
    }

    /// QEMU's `qcow2_alloc_clusters`: `n` clusters with refcount 1; returns the first.
    pub(super) fn alloc_clusters(&mut self, n: u64) -> Result<u64, Error<D::Error>> {
        for _ in 0..self.retries(n) {
            let pos = self.alloc_noref(n)?;
            if self.update_refcount(pos, n, 1)? == Update::Done {
                return Ok(pos);
            }
        }
        Err(Error::Unsupported {
            what: "cluster allocation did not settle",
            value: n,
        })
    }

    /// QEMU's `qcow2_alloc_clusters_at` for clusters known to be free.
    pub(super) fn alloc_clusters_at(&mut self, pos: u64, n: u64) -> Result<(), Error<D::Error>> {
        for _ in 0..self.retries(n) {
            if self.update_refcount(pos, n, 1)? == Update::Done {
                self.end = self.end.max(pos.saturating_add(n));
                return Ok(());
            }
        }
        Err(Error::Unsupported {
            what: "cluster allocation did not settle",
            value: n,
        })
    }
}
