//! Bounded caches of metadata slices.
//!
//! A slice is a power-of-two piece of an L2 table (or, for writers, a refcount block): a few hundred bytes to
//! a few KiB, never a whole table unless the table is that small. The cache holds `N` slices in one
//! caller-supplied buffer and evicts the least recently used. Its memory is the buffer plus `N` small tags,
//! whatever the image's size, cluster size or chain depth.

use crate::Error;
use crate::device::BlockDevice;
use crate::io::read_bytes;

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
}

const EMPTY: Tag = Tag {
    layer: u8::MAX,
    host: 0,
    len: 0,
    used: 0,
};

/// `N` metadata slices in a caller-supplied buffer.
#[derive(Debug)]
pub struct SliceCache<B, const N: usize> {
    buf: B,
    slot: usize,
    tags: [Tag; N],
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
    /// `layer`'s device, read on a miss.
    pub fn get<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        bounce: &mut [u8],
        layer: u8,
        host: u64,
        len: usize,
    ) -> Result<&[u8], Error<D::Error>> {
        if len > self.slot || len == 0 {
            return Err(Error::BufferTooSmall {
                what: "metadata cache slot",
                need: len as u64,
                have: self.slot as u64,
            });
        }
        self.clock = self.clock.wrapping_add(1);
        let clock = self.clock;
        let idx = match self
            .tags
            .iter()
            .position(|t| t.layer == layer && t.host == host && t.len as usize == len)
        {
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
                    .max_by_key(|(_, t)| {
                        if t.layer == u8::MAX {
                            u32::MAX
                        } else {
                            clock.wrapping_sub(t.used)
                        }
                    })
                    .map_or(0, |(i, _)| i);
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
                    };
                }
                victim
            }
        };
        if let Some(t) = self.tags.get_mut(idx) {
            t.used = clock;
        }
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
}
