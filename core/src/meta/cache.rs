//! The bounded cache of metadata slices.
//!
//! A slice is a power-of-two piece of an L2 table (or, for writers, a refcount block): a few hundred bytes to
//! a few KiB, never a whole table unless the table is that small. The cache holds `N` slices in one
//! caller-supplied buffer and evicts the least recently used. Its memory is the buffer plus `N` small tags,
//! whatever the image's size, cluster size or chain depth.

use crate::Error;
use crate::device::BlockDevice;
use crate::io::{copy_exact, read_bytes};

/// Smallest slice the cache uses.
pub const MIN_SLICE: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tag {
    /// Which image of the chain (0 = the top) the slice belongs to; `u8::MAX` = empty.
    layer: u8,
    /// Host offset of the slice's first byte.
    host: u64,
    /// Length of the slice in bytes.
    len: u32,
    /// Last use, for LRU.
    used: u32,
    /// Changed in the cache and not yet written back.
    dirty: Option<SliceKind>,
}

/// What a dirty slice holds: the write-back order depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SliceKind {
    /// A piece of an L2 table.
    L2,
    /// A piece of a refcount block.
    Refcount,
    /// A piece of a persistent bitmap's table or data (written back after the refcounts).
    Bitmap,
}

const EMPTY: Tag = Tag {
    layer: u8::MAX,
    host: 0,
    len: 0,
    used: 0,
    dirty: None,
};

/// `N` metadata slices in a caller-supplied buffer.
#[derive(Debug)]
pub struct SliceCache<B, const N: usize> {
    buf: B,
    slot: usize,
    tags: [Tag; N],
    /// The slot of the last lookup: consecutive lookups mostly want the same slice, so it is tried first.
    last: usize,
    clock: u32,
    hits: u64,
    misses: u64,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>, const N: usize> SliceCache<B, N> {
    /// Splits `buf` into `N` slots of the largest power of two that fits (at least [`MIN_SLICE`] bytes each).
    pub fn new<E>(buf: B) -> Result<Self, Error<E>> {
        let len = buf.as_ref().len();
        let per = len.checked_div(N).unwrap_or(0);
        if per < MIN_SLICE {
            return Err(Error::BufferTooSmall {
                what: "metadata cache",
                need: (MIN_SLICE as u64).saturating_mul(N as u64),
                have: len as u64,
            });
        }
        let slot = 1usize
            << (usize::BITS
                .saturating_sub(1)
                .saturating_sub(per.leading_zeros()));
        Ok(SliceCache {
            buf,
            slot,
            tags: [EMPTY; N],
            last: 0,
            clock: 0,
            hits: 0,
            misses: 0,
        })
    }

    /// Bytes per slot: the largest slice the cache holds.
    pub fn slot_size(&self) -> usize {
        self.slot
    }

    /// (hits, misses) since creation.
    pub fn stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }

    /// Forgets every slice of `layer` (all layers with `None`).
    pub fn invalidate(&mut self, layer: Option<u8>) {
        for t in self.tags.iter_mut() {
            if layer.is_none_or(|l| l == t.layer) {
                *t = EMPTY;
            }
        }
    }

    /// The slice of `len` bytes (a power of two, at most [`SliceCache::slot_size`]) at host offset `host` of
    /// `layer`'s device, read on a miss. Dirty slices are never evicted here: a writer writes them back first.
    pub fn get<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        bounce: &mut [u8],
        layer: u8,
        host: u64,
        len: usize,
    ) -> Result<&[u8], Error<D::Error>> {
        let idx = self.lookup(dev, bounce, layer, host, len)?;
        let start = idx.saturating_mul(self.slot);
        self.buf
            .as_ref()
            .get(start..start.saturating_add(len))
            .ok_or(Error::BufferTooSmall {
                what: "metadata cache",
                need: len as u64,
                have: 0,
            })
    }

    /// Like [`SliceCache::get`], for changing the slice: it is marked dirty (as `kind`) and stays in the
    /// cache until [`SliceCache::mark_clean`].
    pub fn get_mut<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        bounce: &mut [u8],
        layer: u8,
        host: u64,
        len: usize,
        kind: SliceKind,
    ) -> Result<&mut [u8], Error<D::Error>> {
        let idx = self.lookup(dev, bounce, layer, host, len)?;
        if let Some(t) = self.tags.get_mut(idx) {
            t.dirty = Some(kind);
        }
        let start = idx.saturating_mul(self.slot);
        self.buf
            .as_mut()
            .get_mut(start..start.saturating_add(len))
            .ok_or(Error::BufferTooSmall {
                what: "metadata cache",
                need: len as u64,
                have: 0,
            })
    }

    /// Number of dirty slices.
    pub fn dirty_count(&self) -> usize {
        self.tags.iter().filter(|t| t.dirty.is_some()).count()
    }

    /// A dirty slice of `kind` (`None`: any kind): its slot, host offset and bytes.
    pub fn dirty_slice(&self, kind: Option<SliceKind>) -> Option<(usize, u64, &[u8])> {
        let (idx, t) = self
            .tags
            .iter()
            .enumerate()
            .find(|(_, t)| t.dirty.is_some_and(|k| kind.is_none_or(|want| want == k)))?;
        let start = idx.saturating_mul(self.slot);
        let bytes = self
            .buf
            .as_ref()
            .get(start..start.saturating_add(t.len as usize))?;
        Some((idx, t.host, bytes))
    }

    /// Records that slot `idx` has been written back.
    pub fn mark_clean(&mut self, idx: usize) {
        if let Some(t) = self.tags.get_mut(idx) {
            t.dirty = None;
        }
    }

    /// Copies `bytes` into every cached slice of `layer` that covers host offset `host` (a write-through
    /// update of an entry the writer has already written to the device).
    pub fn update(&mut self, layer: u8, host: u64, bytes: &[u8]) {
        let slot = self.slot;
        for (idx, t) in self.tags.iter().enumerate() {
            if t.layer != layer || host < t.host {
                continue;
            }
            let within = host.saturating_sub(t.host);
            let end = within.saturating_add(bytes.len() as u64);
            if end > u64::from(t.len) {
                continue;
            }
            let start = idx.saturating_mul(slot).saturating_add(within as usize);
            if let Some(dst) = self
                .buf
                .as_mut()
                .get_mut(start..start.saturating_add(bytes.len()))
            {
                let _ = copy_exact(dst, bytes);
            }
        }
    }

    /// Forgets the slices of `layer` that overlap host bytes `[host, host + len)` (a cluster that is being
    /// reused for something else). Dirty slices there are dropped too: the caller owns that range now.
    pub fn forget_range(&mut self, layer: u8, host: u64, len: u64) {
        let end = host.saturating_add(len);
        for t in self.tags.iter_mut() {
            let t_end = t.host.saturating_add(u64::from(t.len));
            if t.layer == layer && t.host < end && host < t_end {
                *t = EMPTY;
            }
        }
    }

    /// Whether a cached slice of `layer` overlaps host bytes `[host, host + len)`.
    pub fn overlaps(&self, layer: u8, host: u64, len: u64) -> bool {
        let end = host.saturating_add(len);
        self.tags.iter().any(|t| {
            let t_end = t.host.saturating_add(u64::from(t.len));
            t.layer == layer && t.host < end && host < t_end
        })
    }

    /// Whether a cached slice of `layer` lies in a cluster (of `cluster_size` bytes) that overlaps host bytes
    /// `[host, host + len)`: the cluster holds a table the engine has read.
    pub fn overlaps_cluster(&self, layer: u8, host: u64, len: u64, cluster_size: u64) -> bool {
        let mask = !cluster_size.wrapping_sub(1);
        let start = host & mask;
        let end = host.saturating_add(len);
        self.tags.iter().any(|t| {
            let c = t.host & mask;
            t.layer == layer && c < end && start <= c
        })
    }

    /// The whole buffer, emptied of slices (for a caller that needs scratch memory, such as a refcount
    /// rebuild). Fails if a slice is dirty.
    pub fn scratch<E>(&mut self) -> Result<&mut [u8], Error<E>> {
        if self.dirty_count() != 0 {
            return Err(Error::Corrupt {
                what: "metadata cache still holds unwritten slices",
                offset: 0,
            });
        }
        self.invalidate(None);
        Ok(self.buf.as_mut())
    }

    fn lookup<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        bounce: &mut [u8],
        layer: u8,
        host: u64,
        len: usize,
    ) -> Result<usize, Error<D::Error>> {
        if len > self.slot || len == 0 {
            return Err(Error::BufferTooSmall {
                what: "metadata cache slot",
                need: len as u64,
                have: self.slot as u64,
            });
        }
        self.clock = self.clock.wrapping_add(1);
        let clock = self.clock;
        let wanted = |t: &Tag| t.layer == layer && t.host == host && t.len as usize == len;
        let last = self.last;
        let found = if self.tags.get(last).is_some_and(wanted) {
            Some(last)
        } else {
            self.tags.iter().position(wanted)
        };
        let idx = match found {
            Some(i) => {
                self.hits = self.hits.wrapping_add(1);
                i
            }
            None => {
                self.misses = self.misses.wrapping_add(1);
                let victim = self
                    .tags
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.dirty.is_none())
                    .max_by_key(|(_, t)| {
                        if t.layer == u8::MAX {
                            u32::MAX
                        } else {
                            clock.wrapping_sub(t.used)
                        }
                    })
                    .map(|(i, _)| i)
                    .ok_or(Error::BufferTooSmall {
                        what: "metadata cache (every slice is waiting to be written back)",
                        need: N as u64,
                        have: N as u64,
                    })?;
                let start = victim.saturating_mul(self.slot);
                let dst = self
                    .buf
                    .as_mut()
                    .get_mut(start..start.saturating_add(len))
                    .ok_or(Error::BufferTooSmall {
                        what: "metadata cache",
                        need: len as u64,
                        have: 0,
                    })?;
                if let Some(t) = self.tags.get_mut(victim) {
                    *t = EMPTY;
                }
                read_bytes(dev, bounce, host, dst)?;
                if let Some(t) = self.tags.get_mut(victim) {
                    *t = Tag {
                        layer,
                        host,
                        len: len as u32,
                        used: clock,
                        dirty: None,
                    };
                }
                victim
            }
        };
        if let Some(t) = self.tags.get_mut(idx) {
            t.used = clock;
        }
        self.last = idx;
        Ok(idx)
    }
}
