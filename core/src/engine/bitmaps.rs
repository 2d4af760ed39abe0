//! Persistent bitmaps read by name: finding one in the opened image's directory, and its dirty guest ranges
//! a chunk at a time (table entries through the metadata cache, bitmap data a few hundred bytes at a time),
//! for `qemu-img bitmap --merge` and tools that copy bitmaps. Memory stays bounded whatever the bitmap's
//! size.

use super::*;
use crate::format::bitmap::{BitmapDirEntry, BitmapTableEntry, TABLE_ENTRY_ALL_ONES};

/// A persistent bitmap of the opened image ([`Image::find_bitmap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BitmapRef {
    /// Its place in the directory (0 = the first entry).
    pub index: u32,
    /// Host offset of its directory entry.
    pub entry_at: u64,
    /// The entry as it was read.
    pub entry: BitmapDirEntry,
}

/// Bytes of bitmap data looked at once.
const RUN_CHUNK: usize = 64;

impl<D, B, C, const DEPTH: usize, const SLICES: usize, W> Image<D, B, C, DEPTH, SLICES, W>
where
    D: BlockDevice,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// The opened image's persistent bitmap named `name`, if it has one.
    pub fn find_bitmap(&mut self, name: &[u8]) -> Result<Option<BitmapRef>, Error<D::Error>> {
        let Some(mut walk) = self.bitmap_directory(0) else {
            return Ok(None);
        };
        let mut index = 0u32;
        loop {
            let Some(entry_at) = walk.next_at() else {
                return Ok(None);
            };
            let Some((entry, stored)) = self.read_bitmap_entry(0, &mut walk)? else {
                return Ok(None);
            };
            if self.stored_name_is(stored, name)? {
                return Ok(Some(BitmapRef {
                    index,
                    entry_at,
                    entry,
                }));
            }
            index = index.saturating_add(1);
        }
    }

    /// Fills `out` with the next runs of dirty guest bytes of bitmap `r` from guest offset `*from` on
    /// (each `(offset, length)`, in order, adjacent bits joined up to the end of a bitmap cluster), and
    /// moves `*from` past what it looked at. Returns how many runs it found; 0 once the disk's end is
    /// reached. The bits are read as they are stored: an in-use (inconsistent) bitmap's too.
    pub fn bitmap_dirty_runs(
        &mut self,
        r: &BitmapRef,
        from: &mut u64,
        out: &mut [(u64, u64)],
    ) -> Result<usize, Error<D::Error>> {
        let Image {
            layers,
            bounce,
            cache,
            ..
        } = self;
        let layer = layer_at(layers, 0)?;
        let meta = layer.meta.ok_or(Error::Unsupported {
            what: "bitmaps of a raw image",
            value: 0,
        })?;
        let disk = layer.size;
        if *from >= disk {
            return Ok(0);
        }
        let cs = meta.header.cluster_size();
        let g = u32::from(r.entry.granularity_bits) & 63;
        let per_entry = cs.saturating_mul(8);
        let bits = disk.div_ceil(1u64 << g);
        let mut tables = TableAccess {
            layout: TableLayout::of(&meta.header, cache.slot_size()),
            dev: &mut layer.dev,
            cache,
            bounce: bounce.as_mut(),
            layer: 0,
        };
        let slice_size = tables.layout.slice_size;
        let guest = |bit: u64| bit.checked_shl(g).unwrap_or(u64::MAX).min(disk);
        let mut n = 0usize;
        let mut bit = *from >> g;
        // A run being built: its first bit.
        let mut open: Option<u64> = None;
        while bit < bits && n < out.len() {
            let t = bit.checked_div(per_entry).unwrap_or(0);
            if t >= u64::from(r.entry.table_size) {
                break;
            }
            let base = t.saturating_mul(per_entry);
            let entry_end = base.saturating_add(per_entry).min(bits);
            let at = r.entry.table_offset.saturating_add(t.saturating_mul(8));
            let within = at & slice_size.wrapping_sub(1);
            let word = be64(tables.slice(at.saturating_sub(within))?, within as usize);
            if word == TABLE_ENTRY_ALL_ONES {
                push(
                    out,
                    &mut n,
                    (guest(bit), guest(entry_end).saturating_sub(guest(bit))),
                );
                bit = entry_end;
                continue;
            }
            let host = match BitmapTableEntry::decode(word, cs) {
                BitmapTableEntry::Data(host) => host,
                BitmapTableEntry::Unallocated => {
                    bit = entry_end;
                    continue;
                }
                BitmapTableEntry::Invalid => {
                    return Err(crate::error::corrupt("invalid bitmap table entry", at));
                }
            };
            // One chunk of the data cluster: the bits from `bit` to the chunk's end.
            let chunk_start = (bit.saturating_sub(base) / 8) & !(RUN_CHUNK as u64).wrapping_sub(1);
            let chunk_base = base.saturating_add(chunk_start.saturating_mul(8));
            let chunk_end = chunk_base
                .saturating_add((RUN_CHUNK as u64).saturating_mul(8))
                .min(entry_end);
            let mut chunk = [0u8; RUN_CHUNK];
            let src = host.saturating_add(chunk_start);
            let within = src & slice_size.wrapping_sub(1);
            let slice = tables.slice(src.saturating_sub(within))?;
            let part = slice
                .get(within as usize..)
                .and_then(|s| s.get(..RUN_CHUNK.min(s.len())))
                .unwrap_or(&[]);
            if let Some(dst) = chunk.get_mut(..part.len()) {
                let _ = crate::io::copy_exact(dst, part);
            }
            while bit < chunk_end {
                let k = bit.saturating_sub(chunk_base);
                let set = chunk
                    .get((k / 8) as usize)
                    .is_some_and(|b| b & (1u8 << (k % 8)) != 0);
                bit = bit.saturating_add(1);
                match (set, open) {
                    (true, None) => open = Some(bit.saturating_sub(1)),
                    (false, Some(first)) => {
                        let end = bit.saturating_sub(1);
                        push(
                            out,
                            &mut n,
                            (guest(first), guest(end).saturating_sub(guest(first))),
                        );
                        open = None;
                        if n == out.len() {
                            break;
                        }
                    }
                    _ => {}
                }
            }
            if let Some(first) = open
                && bit == entry_end
            {
                push(
                    out,
                    &mut n,
                    (guest(first), guest(bit).saturating_sub(guest(first))),
                );
                open = None;
            }
        }
        if let Some(first) = open {
            // Not finished: the next call starts at the run's first bit.
            bit = first;
        }
        *from = guest(bit);
        Ok(n)
    }
}

/// Stores `run` at `out[*n]` (when there is room) and counts it.
fn push(out: &mut [(u64, u64)], n: &mut usize, run: (u64, u64)) {
    if let Some(slot) = out.get_mut(*n) {
        *slot = run;
        *n = n.saturating_add(1);
    }
}
