//! Persistent bitmaps kept up to date, as QEMU keeps them: before the first write every enabled bitmap that
//! is consistent is marked in use (durably, before any guest byte changes); every guest write, zero write
//! and discard then sets the bits of the range it covers in those bitmaps (bitmap data and tables through the
//! metadata cache, written back after the refcounts of what they point at); a clean close clears the in-use
//! flags once everything is durable. After a crash the bitmaps stay in use, which QEMU reads as
//! inconsistent (never trusted), and `qemu-img check` finds nothing wrong. Disabled bitmaps and bitmaps
//! already in use are left alone. Operations that change the guest view wholesale mark every bit, or (a
//! change of disk size, a downgrade to version 2) disown the bitmaps: the extension is ended and the clusters
//! freed. The directory's format and QEMU's limits are `format::bitmap`'s.
//!
//! Memory stays bounded: the engine remembers which of the first [`TRACKED_BITMAPS`] directory entries it
//! tracks (one bit each) and walks the directory on the device for each request; an enabled bitmap past
//! them is marked in use and left so (inconsistent, as after a crash).

use super::*;
#[cfg(feature = "bitmaps")]
use crate::format::bitmap::{FLAG_AUTO, FLAG_IN_USE, TABLE_ENTRY_ALL_ONES};
#[cfg(feature = "bitmaps")]
use guard::SCAN_CHUNK;

/// How many bitmaps (the first entries of the directory) the engine keeps up to date in one session.
#[cfg(feature = "bitmaps")]
pub const TRACKED_BITMAPS: u32 = 64;

/// Byte of a directory entry where its flags are.
#[cfg(feature = "bitmaps")]
const FLAGS_AT: u64 = 12;

impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// Disowns the bitmaps of extension `b` (their autoclear bit is already cleared and durable): the
    /// bitmaps extension is ended where it is the last extension, and the directory, tables and bitmap
    /// clusters are freed. Anything that does not look exactly
    /// like a valid bitmap directory is left alone (leaked, never freed twice), and so is a bitmap table whose
    /// clusters are not each owned once (shared with another bitmap, or already freed).
    ///
    /// The directory was validated when the image was opened (QEMU's limits: at most 65535 entries, each table
    /// at most 512 MiB of bitmap data); tables are read a chunk at a time, and each owned table once.
    pub(super) fn drop_bitmaps(&mut self, b: BitmapsExtension) -> Result<(), Error<D::Error>> {
        let cs = self.g.tables.cluster_size;
        let next = b.extension_at.saturating_add(8 + 24);
        let mut word = [0u8; 8];
        read_bytes(self.dev, bounce_of(self.bounce, 0), next, &mut word)?;
        if word != [0u8; 8] {
            return Ok(());
        }
        self.write_header(b.extension_at, &[0u8; 8])?;
        // Validate the whole directory before freeing anything.
        let disk_size = self.header.size;
        let mut walk = DirectoryWalk::new(&b, cs, disk_size);
        while walk.next_at().is_some() {
            if self.bitmap_entry(&mut walk)?.is_none() {
                return Ok(());
            }
        }
        if walk.finish().is_err() {
            return Ok(());
        }
        let mut walk = DirectoryWalk::new(&b, cs, disk_size);
        while walk.next_at().is_some() {
            let Some(entry) = self.bitmap_entry(&mut walk)? else {
                return Ok(());
            };
            let table = entry.table_offset;
            let bytes = entry.table_bytes();
            let clusters = ceil_div(bytes, cs);
            let mut owned = true;
            for c in 0..clusters {
                let host = table.saturating_add(c.saturating_mul(cs));
                if host > MAX_HOST_OFFSET || self.refcount(host >> self.g.cluster_bits)? != 1 {
                    owned = false;
                    break;
                }
            }
            if !owned {
                continue;
            }
            let mut chunk = [0u8; STACK_CHUNK];
            let mut done = 0u64;
            while done < bytes {
                let n = (STACK_CHUNK as u64).min(bytes.saturating_sub(done)) as usize;
                let part = chunk.get_mut(..n).unwrap_or(&mut []);
                read_bytes(
                    self.dev,
                    bounce_of(self.bounce, 0),
                    table.saturating_add(done),
                    part,
                )?;
                for k in 0..n / 8 {
                    if let BitmapTableEntry::Data(host) =
                        BitmapTableEntry::decode(be64(&chunk, k.saturating_mul(8)), cs)
                    {
                        self.free_owned(host)?;
                    }
                }
                done = done.saturating_add(n as u64);
            }
            for c in 0..clusters {
                self.free_owned(table.saturating_add(c.saturating_mul(cs)))?;
            }
        }
        let clusters = ceil_div(b.directory_size, cs);
        for c in 0..clusters {
            self.free_owned(b.directory_offset.saturating_add(c.saturating_mul(cs)))?;
        }
        Ok(())
    }

    /// The next bitmap directory entry of `walk`, if it is valid (format::bitmap::DirectoryWalk's rules).
    pub(super) fn bitmap_entry(
        &mut self,
        walk: &mut DirectoryWalk,
    ) -> Result<Option<BitmapDirEntry>, Error<D::Error>> {
        let Some(at) = walk.next_at() else {
            return Ok(None);
        };
        let mut raw = [0u8; DIR_ENTRY_LEN];
        read_bytes(self.dev, bounce_of(self.bounce, 0), at, &mut raw)?;
        Ok(walk.advance(&raw).ok().map(|e| e.entry))
    }

    /// Lowers the refcount of the cluster at `host` if it is exactly 1 (a bitmap cluster is never shared).
    pub(super) fn free_owned(&mut self, host: u64) -> Result<(), Error<D::Error>> {
        if host == 0
            || host & self.g.tables.cluster_size.wrapping_sub(1) != 0
            || host > MAX_HOST_OFFSET
        {
            return Ok(());
        }
        let c = host >> self.g.cluster_bits;
        // A bitmap table entry that names live metadata lies: that cluster is not the bitmap's to free. (The
        // bitmap's own clusters may be cached: the cache does not make them metadata.)
        if self.refcount(c)? == 1 && !self.holds_named_metadata(host)? {
            self.change_refcount(c, false)?;
        }
        Ok(())
    }

    /// Disowns the live bitmaps, if any: their autoclear bit is cleared (durably), then their clusters are
    /// freed. For a change the bitmaps cannot follow (the disk size, a downgrade to version 2).
    pub(super) fn disown_bitmaps(&mut self) -> Result<(), Error<D::Error>> {
        let Some(b) = self.bitmaps else {
            return Ok(());
        };
        let bits = self.header.autoclear_features;
        if !bits.contains(AutoclearFeatures::BITMAPS) {
            return Ok(());
        }
        self.writeback_all()?;
        let bits = bits & !AutoclearFeatures::BITMAPS;
        self.write_header(field::AUTOCLEAR_FEATURES, &bits.bits().to_be_bytes())?;
        self.header.autoclear_features = bits;
        #[cfg(feature = "bitmaps")]
        {
            self.w.bitmaps_tracked = 0;
            self.w.bitmaps_held = 0;
        }
        self.drop_bitmaps(b)
    }
}

#[cfg(feature = "bitmaps")]
impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// Whether the bitmap directory of `b` is valid as a whole (QEMU refuses to open an image whose
    /// directory is not).
    fn bitmap_directory_valid(&mut self, b: &BitmapsExtension) -> Result<bool, Error<D::Error>> {
        let mut walk = DirectoryWalk::new(b, self.g.tables.cluster_size, self.header.size);
        while walk.next_at().is_some() {
            if self.bitmap_entry(&mut walk)?.is_none() {
                return Ok(false);
            }
        }
        Ok(walk.finish().is_ok())
    }

    /// Before the first write: keeps the live bitmaps of `b` when their directory is valid (returns whether
    /// it did; the caller disowns them otherwise). Every enabled consistent bitmap is marked in use, durably;
    /// the first [`TRACKED_BITMAPS`] whose tables hold only valid entries naming clusters they own are
    /// tracked.
    pub(super) fn start_bitmaps(&mut self, b: BitmapsExtension) -> Result<bool, Error<D::Error>> {
        if !self.bitmap_directory_valid(&b)? {
            return Ok(false);
        }
        let mut walk = DirectoryWalk::new(&b, self.g.tables.cluster_size, self.header.size);
        let mut index = 0u32;
        let mut tracked = 0u64;
        let mut marked = false;
        while let Some(at) = walk.next_at() {
            let Some(e) = self.bitmap_entry(&mut walk)? else {
                break;
            };
            if e.flags & FLAG_AUTO != 0 && e.flags & FLAG_IN_USE == 0 {
                if index < TRACKED_BITMAPS && self.bitmap_owns_its_data(&e)? {
                    tracked |= 1u64 << index;
                }
                let flags = e.flags | FLAG_IN_USE;
                self.write_dev(at.saturating_add(FLAGS_AT), &flags.to_be_bytes())?;
                marked = true;
            }
            index = index.saturating_add(1);
        }
        if marked {
            self.flush_dev()?;
        }
        self.w.bitmaps_tracked = tracked;
        self.w.bitmaps_held = tracked;
        Ok(true)
    }

    /// Whether every entry of bitmap `e`'s table is valid and names a cluster with refcount 1 that holds no
    /// other metadata: the engine changes those clusters in place.
    pub(super) fn bitmap_owns_its_data(
        &mut self,
        e: &BitmapDirEntry,
    ) -> Result<bool, Error<D::Error>> {
        let cs = self.g.tables.cluster_size;
        let entries = u64::from(e.table_size);
        let mut chunk = [0u8; SCAN_CHUNK];
        let mut from = 0u64;
        while from < entries {
            let n = self.read_table_chunk(e.table_offset, from, entries, &mut chunk)?;
            for k in 0..n {
                match BitmapTableEntry::decode(be64(&chunk, k.saturating_mul(8)), cs) {
                    BitmapTableEntry::Invalid => return Ok(false),
                    BitmapTableEntry::Data(host) => {
                        if host > MAX_HOST_OFFSET
                            || self.refcount(host >> self.g.cluster_bits)? != 1
                            || self.holds_named_metadata(host)?
                        {
                            return Ok(false);
                        }
                    }
                    BitmapTableEntry::Unallocated => {}
                }
            }
            if n == 0 {
                break;
            }
            from = from.saturating_add(n as u64);
        }
        Ok(true)
    }

    /// Sets the bits of guest bytes `[offset, offset + len)` in every tracked bitmap.
    pub(super) fn mark_bitmaps(&mut self, offset: u64, len: u64) -> Result<(), Error<D::Error>> {
        let tracked = self.w.bitmaps_tracked;
        let Some(b) = self.bitmaps else {
            return Ok(());
        };
        if tracked == 0 || len == 0 {
            return Ok(());
        }
        let mut walk = DirectoryWalk::new(&b, self.g.tables.cluster_size, self.header.size);
        let mut index = 0u32;
        while index < TRACKED_BITMAPS && tracked.checked_shr(index).unwrap_or(0) != 0 {
            let Some(e) = self.bitmap_entry(&mut walk)? else {
                break;
            };
            if tracked.checked_shr(index).unwrap_or(0) & 1 != 0 {
                self.mark_bitmap(&e, offset, len)?;
            }
            index = index.saturating_add(1);
        }
        // The request itself needs the cache slots a writer has without bitmaps: what the marking left dirty
        // goes back when it would take them.
        if self.cache.dirty_count().saturating_add(MIN_WRITE_SLICES) > SLICES {
            self.writeback_all()?;
        }
        Ok(())
    }

    /// Sets the bits of guest bytes `[offset, offset + len)` in bitmap `e`: a table entry whose bits the
    /// range covers becomes "all ones" (its data cluster freed once that is durable), a partly covered one
    /// gets a data cluster (zeroed, allocated where it has none) with those bits set.
    pub(super) fn mark_bitmap(
        &mut self,
        e: &BitmapDirEntry,
        offset: u64,
        len: u64,
    ) -> Result<(), Error<D::Error>> {
        let cs = self.g.tables.cluster_size;
        let disk = self.header.size;
        let end = offset.saturating_add(len).min(disk);
        if end <= offset {
            return Ok(());
        }
        let granularity = u32::from(e.granularity_bits);
        let bits = disk.div_ceil(1u64 << (granularity & 63));
        let first = offset >> granularity;
        let last = end.saturating_sub(1) >> granularity;
        let per_entry = cs.saturating_mul(8);
        let mut t = first.checked_div(per_entry).unwrap_or(0);
        while t.saturating_mul(per_entry) <= last {
            if t >= u64::from(e.table_size) {
                return Err(
                    self.mark_corrupt("a bitmap table is shorter than the disk", e.table_offset)
                );
            }
            // A table slice and a data slice may be read and changed below.
            self.make_room(2)?;
            let base = t.saturating_mul(per_entry);
            let entry_end = base.saturating_add(per_entry).min(bits);
            let lo = base.max(first);
            let hi = entry_end.saturating_sub(1).min(last);
            let whole = lo == base && hi.saturating_add(1) == entry_end;
            let entry_at = e.table_offset.saturating_add(t.saturating_mul(8));
            let word = self.bitmap_word(entry_at)?;
            t = t.saturating_add(1);
            if word == TABLE_ENTRY_ALL_ONES {
                continue;
            }
            let host = match BitmapTableEntry::decode(word, cs) {
                BitmapTableEntry::Invalid => {
                    return Err(self.mark_corrupt("invalid bitmap table entry", entry_at));
                }
                BitmapTableEntry::Data(host) => Some(host),
                BitmapTableEntry::Unallocated => None,
            };
            if whole {
                self.set_bitmap_word(entry_at, TABLE_ENTRY_ALL_ONES)?;
                if let Some(host) = host {
                    self.free_later(host)?;
                }
                continue;
            }
            let host = match host {
                Some(host) => host,
                None => {
                    let (host, _) = self.alloc_clusters(1)?;
                    if host == 0 {
                        return Err(corrupt("allocation of bitmap data at offset 0", 0));
                    }
                    self.guard(host, cs, false)?;
                    self.write_zeros(host, cs)?;
                    self.set_bitmap_word(entry_at, host)?;
                    host
                }
            };
            self.set_bitmap_bits(host, lo.saturating_sub(base), hi.saturating_sub(base))?;
        }
        Ok(())
    }

    /// The bitmap table word at host offset `at`, through the metadata cache.
    pub(super) fn bitmap_word(&mut self, at: u64) -> Result<u64, Error<D::Error>> {
        self.make_room(1)?;
        let (slice, within) = self.bitmap_slice(at);
        let mut tables = self.tables();
        Ok(be64(tables.slice(slice)?, within))
    }

    /// Where host byte `at` of bitmap metadata lives in the cache: (slice, offset in it).
    fn bitmap_slice(&self, at: u64) -> (u64, usize) {
        let size = self.g.tables.slice_size;
        let slice = at & !size.wrapping_sub(1);
        (slice, at.saturating_sub(slice) as usize)
    }

    /// Changes the bitmap table word at host offset `at` in the cache.
    pub(super) fn set_bitmap_word(&mut self, at: u64, word: u64) -> Result<(), Error<D::Error>> {
        let (slice, within) = self.bitmap_slice(at);
        let s = self.bitmap_slice_mut(slice)?;
        let dst = s
            .get_mut(within..within.saturating_add(8))
            .ok_or(corrupt("bitmap table slice", at))?;
        copy_exact(dst, &word.to_be_bytes()).ok_or(corrupt("bitmap table slice", at))
    }

    pub(super) fn bitmap_slice_mut(&mut self, slice: u64) -> Result<&mut [u8], Error<D::Error>> {
        self.make_room(1)?;
        let bs = self.dev.block_size();
        let size = self.g.tables.slice_size as usize;
        self.cache.get_mut(
            self.dev,
            bounce_of(self.bounce, bs),
            0,
            slice,
            size,
            SliceKind::Bitmap,
        )
    }

    /// Sets bits `lo..=hi` of the bitmap data cluster at `host` (least significant bit first in each byte,
    /// as QEMU serializes them), slice by slice, leaving slices whose bits are all set as they are.
    pub(super) fn set_bitmap_bits(
        &mut self,
        host: u64,
        lo: u64,
        hi: u64,
    ) -> Result<(), Error<D::Error>> {
        self.change_bitmap_bits(host, lo, hi, true)
    }

    /// Sets (`set`) or clears bits `lo..=hi` of the bitmap data cluster at `host`, slice by slice, leaving
    /// slices that already hold them so as they are.
    pub(super) fn change_bitmap_bits(
        &mut self,
        host: u64,
        lo: u64,
        hi: u64,
        set: bool,
    ) -> Result<(), Error<D::Error>> {
        let size = self.g.tables.slice_size;
        let slice_bits = size.saturating_mul(8);
        let mut bit = lo;
        while bit <= hi {
            let slice_start = bit & !slice_bits.wrapping_sub(1);
            let slice_end = slice_start
                .saturating_add(slice_bits)
                .min(hi.saturating_add(1));
            let host_slice = host.saturating_add(slice_start / 8);
            let (from, to) = (
                bit.saturating_sub(slice_start),
                slice_end.saturating_sub(slice_start),
            );
            self.make_room(1)?;
            let done = {
                let mut tables = self.tables();
                let s = tables.slice(host_slice)?;
                (from..to).all(|b| {
                    s.get((b / 8) as usize)
                        .is_some_and(|byte| (byte & (1u8 << (b % 8)) != 0) == set)
                })
            };
            if !done {
                let s = self.bitmap_slice_mut(host_slice)?;
                set_bits(s, from, to, set);
            }
            bit = slice_end;
        }
        Ok(())
    }

    /// After everything is durable, at a clean close: the tracked bitmaps are consistent again.
    pub(super) fn end_bitmaps(&mut self) -> Result<(), Error<D::Error>> {
        let tracked = self.w.bitmaps_held;
        let Some(b) = self.bitmaps else {
            return Ok(());
        };
        if tracked == 0 {
            return Ok(());
        }
        let mut walk = DirectoryWalk::new(&b, self.g.tables.cluster_size, self.header.size);
        let mut index = 0u32;
        while index < TRACKED_BITMAPS && tracked.checked_shr(index).unwrap_or(0) != 0 {
            let Some(at) = walk.next_at() else {
                break;
            };
            let Some(e) = self.bitmap_entry(&mut walk)? else {
                break;
            };
            if tracked.checked_shr(index).unwrap_or(0) & 1 != 0 {
                let flags = e.flags & !FLAG_IN_USE;
                self.write_dev(at.saturating_add(FLAGS_AT), &flags.to_be_bytes())?;
            }
            index = index.saturating_add(1);
        }
        self.flush_dev()?;
        self.w.bitmaps_tracked = 0;
        self.w.bitmaps_held = 0;
        Ok(())
    }
}

/// Without the `bitmaps` feature the engine does not keep bitmaps up to date: it disowns them.
#[cfg(not(feature = "bitmaps"))]
impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    pub(super) fn start_bitmaps(&mut self, _b: BitmapsExtension) -> Result<bool, Error<D::Error>> {
        Ok(false)
    }

    pub(super) fn mark_bitmaps(&mut self, _offset: u64, _len: u64) -> Result<(), Error<D::Error>> {
        Ok(())
    }

    pub(super) fn end_bitmaps(&mut self) -> Result<(), Error<D::Error>> {
        Ok(())
    }
}

#[cfg(feature = "bitmaps")]
/// Sets (`set`) or clears bits `from..to` of `bytes` (least significant bit first in each byte).
fn set_bits(bytes: &mut [u8], from: u64, to: u64, set: bool) {
    let mut bit = from;
    while bit < to {
        let (byte, within) = ((bit / 8) as usize, bit % 8);
        if within == 0 && to.saturating_sub(bit) >= 8 {
            if let Some(b) = bytes.get_mut(byte) {
                *b = if set { 0xff } else { 0 };
            }
            bit = bit.saturating_add(8);
            continue;
        }
        if let Some(b) = bytes.get_mut(byte) {
            if set {
                *b |= 1u8 << within;
            } else {
                *b &= !(1u8 << within);
            }
        }
        bit = bit.saturating_add(1);
    }
}
