//! Writing: allocation, copy-on-write, zeroes, discard, flush and close.
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

use heapless::Vec;

use crate::Error;
use crate::compress::Decompressor;
use crate::device::BlockDeviceWrite;
use crate::engine::{BitmapsExtension, Buffers, Format, Image, Layer, Reader, Resolver};
use crate::format::bitmap::{BitmapDirEntry, BitmapTableEntry, DIR_ENTRY_LEN, DirectoryWalk};
use crate::format::{
    AutoclearFeatures, ClusterKind, CompatibleFeatures, CompressedDescriptor, Header,
    IncompatibleFeatures, L1Entry, L2Entry, L2Format, MAX_HOST_OFFSET, MAX_REFTABLE_BYTES,
    OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, REFTABLE_OFFSET_MASK,
    REFTABLE_RESERVED_MASK, be64, refcount_get, refcount_set,
};
use crate::io::{ceil_div, copy_exact, read_bytes, write_bytes};
use crate::meta::{SliceCache, SliceKind};

/// How many freed host clusters wait for their referencing entries to become durable before the engine
/// writes back and lowers their refcounts.
const PENDING_FREES: usize = 32;
/// Copy buffer used when the bounce buffer has no room beyond one device block.
const STACK_CHUNK: usize = 512;
/// Smallest metadata slice count a writable image needs (an L2 slice and refcount slices dirty at once,
/// plus room to read).
pub const MIN_WRITE_SLICES: usize = 4;

/// Header field offsets (big-endian, common to versions 2 and 3).
const HDR_REFTABLE: u64 = 48;
const HDR_INCOMPATIBLE: u64 = 72;
const HDR_AUTOCLEAR: u64 = 88;

/// All subclusters read as zero (extended L2 bitmap).
const ALL_ZEROES: u64 = 0xffff_ffff_0000_0000;

/// What the writer keeps between requests.
#[derive(Debug, Default)]
pub(crate) struct WriteState {
    writable: bool,
    /// Device writes happened since the last device flush.
    needs_flush: bool,
    /// No cluster below this index is free (a search starts here).
    free_hint: u64,
    /// Lazy refcounts are in effect.
    lazy: bool,
    /// The dirty bit is set on disk by this writer.
    dirty_bit: bool,
    /// The header has been prepared for writing (autoclear bits cleared, dirty bit set if lazy).
    started: bool,
    /// Next free byte for compressed data in the current compressed-data cluster (0 = none).
    compressed_at: u64,
    /// Host offsets whose refcount drops once the entries that referenced them are durable.
    pending: Vec<u64, PENDING_FREES>,
}

/// The source of the bytes a write stores.
#[derive(Clone, Copy)]
enum Src<'a> {
    Bytes(&'a [u8]),
    Zeros,
}

impl<'a> Src<'a> {
    fn sub(self, from: usize, len: usize) -> Src<'a> {
        match self {
            Src::Bytes(b) => Src::Bytes(b.get(from..from.saturating_add(len)).unwrap_or(&[])),
            Src::Zeros => Src::Zeros,
        }
    }
}

/// Image geometry the writer needs, from the top image's header.
#[derive(Debug, Clone, Copy)]
struct Geo {
    cluster_bits: u32,
    cs: u64,
    order: u32,
    block_bits: u32,
    l2: L2Format,
    l2_entry: u64,
    l2_entries: u64,
    coverage_bits: u32,
    sub_size: u64,
    slice: u64,
    rt_off: u64,
    rt_entries: u64,
    l1_off: u64,
    l1_size: u64,
}

impl Geo {
    fn new(h: &Header, l2: L2Format, slot: usize) -> Geo {
        let cs = h.cluster_size();
        Geo {
            cluster_bits: h.cluster_bits,
            cs,
            order: h.refcount_order,
            block_bits: h
                .cluster_bits
                .saturating_add(3)
                .saturating_sub(h.refcount_order),
            l2,
            l2_entry: h.l2_entry_size(),
            l2_entries: h.l2_entries(),
            coverage_bits: h.l2_coverage_bits(),
            sub_size: h.subcluster_size(),
            slice: (slot as u64).min(cs),
            rt_off: h.refcount_table_offset,
            rt_entries: u64::from(h.refcount_table_clusters) << h.cluster_bits.saturating_sub(3),
            l1_off: h.l1_table_offset,
            l1_size: u64::from(h.l1_size),
        }
    }

    fn max_refcount(&self) -> u64 {
        if self.order >= 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)).wrapping_sub(1)
        }
    }

    /// Subclusters (or the one piece of a standard cluster) per cluster.
    fn pieces(&self) -> u64 {
        if self.l2.extended { 32 } else { 1 }
    }

    fn piece_size(&self) -> u64 {
        if self.l2.extended {
            self.sub_size
        } else {
            self.cs
        }
    }
}

fn corrupt<E>(what: &'static str, offset: u64) -> Error<E> {
    Error::Corrupt { what, offset }
}

/// The metadata side of the top image, borrowed from an [`Image`].
struct Meta<'a, D, B, const SLICES: usize> {
    dev: &'a mut D,
    /// The external data file, flushed with `dev` (guest data there must be durable before the entries).
    data: Option<&'a mut D>,
    header: &'a mut Header,
    bounce: &'a mut [u8],
    cache: &'a mut SliceCache<B, SLICES>,
    w: &'a mut WriteState,
    g: Geo,
}

impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    fn write_dev(&mut self, host: u64, bytes: &[u8]) -> Result<(), Error<D::Error>> {
        let bs = self.dev.block_size();
        let len = self.bounce.len();
        let bounce = self.bounce.get_mut(..bs.min(len)).unwrap_or(&mut []);
        write_bytes(self.dev, bounce, host, bytes)?;
        self.w.needs_flush = true;
        Ok(())
    }

    fn flush_dev(&mut self) -> Result<(), Error<D::Error>> {
        if let Some(data) = self.data.as_mut() {
            data.flush()?;
        }
        self.dev.flush()?;
        self.w.needs_flush = false;
        Ok(())
    }

    /// Writes `len` zero bytes at `host`.
    fn write_zeros(&mut self, host: u64, len: u64) -> Result<(), Error<D::Error>> {
        write_zero_run(self.dev, self.bounce, host, len)?;
        self.w.needs_flush = true;
        Ok(())
    }

    /// Writes header bytes at `at` and flushes.
    fn write_header(&mut self, at: u64, bytes: &[u8]) -> Result<(), Error<D::Error>> {
        self.write_dev(at, bytes)?;
        self.flush_dev()
    }

    // --- Tables through the cache -------------------------------------------------------------------------

    /// The 8-byte big-endian word at byte `byte` of the table at `table` (L1 or refcount table).
    fn table_word(&mut self, table: u64, byte: u64) -> Result<u64, Error<D::Error>> {
        let slice = self.g.slice;
        let start = byte & !slice.wrapping_sub(1);
        let s = self.cache.get(
            self.dev,
            bounce_of(self.bounce, 0),
            0,
            table.saturating_add(start),
            slice as usize,
        )?;
        Ok(be64(s, byte.saturating_sub(start) as usize))
    }

    /// Writes an 8-byte table word through to the device and into any cached copy.
    fn set_table_word(&mut self, table: u64, byte: u64, word: u64) -> Result<(), Error<D::Error>> {
        let host = table.saturating_add(byte);
        let bytes = word.to_be_bytes();
        self.write_dev(host, &bytes)?;
        self.cache.update(0, host, &bytes);
        Ok(())
    }

    fn l1_entry(&mut self, index: u64) -> Result<L1Entry, Error<D::Error>> {
        if index >= self.g.l1_size {
            return Err(corrupt("guest offset beyond the L1 table", index));
        }
        let w = self.table_word(self.g.l1_off, index.saturating_mul(8))?;
        Ok(L1Entry(w))
    }

    /// The refcount block covering refcount table index `r` (0 = none).
    fn reftable_entry(&mut self, r: u64) -> Result<u64, Error<D::Error>> {
        if r >= self.g.rt_entries {
            return Ok(0);
        }
        let byte = r.saturating_mul(8);
        let w = self.table_word(self.g.rt_off, byte)?;
        if w & REFTABLE_RESERVED_MASK != 0 {
            return Err(corrupt(
                "refcount table entry has reserved bits set",
                self.g.rt_off.saturating_add(byte),
            ));
        }
        let block = w & REFTABLE_OFFSET_MASK;
        if block & self.g.cs.wrapping_sub(1) != 0 {
            return Err(corrupt(
                "refcount block offset is not cluster-aligned",
                block,
            ));
        }
        Ok(block)
    }

    /// Where cluster `c`'s refcount lives: (host offset of its slice, index inside the slice), or `None` when
    /// no refcount block covers it.
    fn refcount_loc(&mut self, c: u64) -> Result<Option<(u64, usize)>, Error<D::Error>> {
        let r = c >> self.g.block_bits;
        let block = self.reftable_entry(r)?;
        if block == 0 {
            return Ok(None);
        }
        let index = c & (1u64 << self.g.block_bits).wrapping_sub(1);
        let bit = index << self.g.order;
        let slice_bits = self.g.slice.saturating_mul(8);
        let start = (bit & !slice_bits.wrapping_sub(1)) >> 3;
        let in_slice = index & (slice_bits >> self.g.order).wrapping_sub(1);
        Ok(Some((block.saturating_add(start), in_slice as usize)))
    }

    fn refcount(&mut self, c: u64) -> Result<u64, Error<D::Error>> {
        let Some((host, idx)) = self.refcount_loc(c)? else {
            return Ok(0);
        };
        let slice = self.g.slice as usize;
        let order = self.g.order;
        let s = self
            .cache
            .get(self.dev, bounce_of(self.bounce, 0), 0, host, slice)?;
        refcount_get(s, order, idx).ok_or(corrupt("refcount index", host))
    }

    /// Raises (`up`) or lowers cluster `c`'s refcount by one.
    fn change_refcount(&mut self, c: u64, up: bool) -> Result<(), Error<D::Error>> {
        self.make_room(2)?;
        let Some((host, idx)) = self.refcount_loc(c)? else {
            return Err(corrupt(
                "no refcount block covers an allocated cluster",
                c << self.g.cluster_bits,
            ));
        };
        let slice = self.g.slice as usize;
        let order = self.g.order;
        let max = self.g.max_refcount();
        let bs = self.dev.block_size();
        let s = self.cache.get_mut(
            self.dev,
            bounce_of(self.bounce, bs),
            0,
            host,
            slice,
            SliceKind::Refcount,
        )?;
        let v = refcount_get(s, order, idx).ok_or(corrupt("refcount index", host))?;
        let new = if up {
            v.checked_add(1)
                .filter(|&n| n <= max)
                .ok_or(corrupt("refcount overflow", c << self.g.cluster_bits))?
        } else {
            v.checked_sub(1)
                .ok_or(corrupt("refcount underflow", c << self.g.cluster_bits))?
        };
        refcount_set(s, order, idx, new).ok_or(corrupt("refcount index", host))?;
        if new == 0 {
            self.w.free_hint = self.w.free_hint.min(c);
            if self.w.compressed_at >> self.g.cluster_bits == c {
                self.w.compressed_at = 0;
            }
        }
        Ok(())
    }

    // --- Write-back ----------------------------------------------------------------------------------------

    fn writeback(&mut self, kind: SliceKind) -> Result<(), Error<D::Error>> {
        let bs = self.dev.block_size();
        while let Some((idx, host, bytes)) = self.cache.dirty_slice(Some(kind)) {
            write_bytes(self.dev, bounce_of(self.bounce, bs), host, bytes)?;
            self.cache.mark_clean(idx);
            self.w.needs_flush = true;
        }
        Ok(())
    }

    /// Writes every dirty slice back in crash-safe order (refcounts, flush, L2 tables).
    fn writeback_all(&mut self) -> Result<(), Error<D::Error>> {
        if self.cache.dirty_slice(Some(SliceKind::L2)).is_some() {
            if !self.w.lazy {
                self.writeback(SliceKind::Refcount)?;
            }
            if self.w.needs_flush {
                self.flush_dev()?;
            }
            self.writeback(SliceKind::L2)?;
        }
        self.writeback(SliceKind::Refcount)
    }

    /// Keeps at least `need` cache slots clean.
    fn make_room(&mut self, need: usize) -> Result<(), Error<D::Error>> {
        if self.cache.dirty_count().saturating_add(need) > SLICES {
            self.writeback_all()?;
        }
        Ok(())
    }

    /// Queues host cluster `host` for a refcount decrement once the entry change that dropped it is durable.
    fn free_later(&mut self, host: u64) -> Result<(), Error<D::Error>> {
        if self.w.pending.is_full() {
            self.commit_frees()?;
        }
        self.w
            .pending
            .push(host)
            .map_err(|_| corrupt("pending frees", host))
    }

    /// Makes every entry change durable, then lowers the refcounts of the clusters they stopped referencing.
    fn commit_frees(&mut self) -> Result<(), Error<D::Error>> {
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

    // --- Allocation ----------------------------------------------------------------------------------------

    fn max_cluster(&self) -> u64 {
        MAX_HOST_OFFSET >> self.g.cluster_bits
    }

    /// The first cluster at or after `from` whose refcount is 0.
    fn find_free(&mut self, from: u64) -> Result<u64, Error<D::Error>> {
        let mut c = from.max(1);
        let order = self.g.order;
        let per_slice = (self.g.slice.saturating_mul(8)) >> order;
        loop {
            if c > self.max_cluster() {
                return Err(Error::NoSpace {
                    what: "no free host cluster below 2^56",
                });
            }
            let Some((host, idx)) = self.refcount_loc(c)? else {
                return Ok(c);
            };
            let slice = self.g.slice as usize;
            let s = self
                .cache
                .get(self.dev, bounce_of(self.bounce, 0), 0, host, slice)?;
            let mut i = idx;
            while (i as u64) < per_slice {
                if refcount_get(s, order, i) == Some(0) {
                    return Ok(c.saturating_add((i.saturating_sub(idx)) as u64));
                }
                i = i.saturating_add(1);
            }
            c = c.saturating_add(per_slice.saturating_sub(idx as u64));
        }
    }

    /// Allocates up to `max` contiguous clusters (at least one) with refcount 1. Returns the host offset
    /// and the count.
    fn alloc_clusters(&mut self, max: u64) -> Result<(u64, u64), Error<D::Error>> {
        for _ in 0..64 {
            let c = self.find_free(self.w.free_hint)?;
            let r = c >> self.g.block_bits;
            if r >= self.g.rt_entries {
                self.grow_reftable(c)?;
                continue;
            }
            if self.reftable_entry(r)? == 0 {
                self.alloc_refblock(r, c)?;
                continue;
            }
            let mut count = 1u64;
            while count < max {
                let next = c.saturating_add(count);
                if next > self.max_cluster()
                    || self.refcount_loc(next)?.is_none()
                    || self.refcount(next)? != 0
                {
                    break;
                }
                count = count.saturating_add(1);
            }
            for i in 0..count {
                self.change_refcount(c.saturating_add(i), true)?;
            }
            self.w.free_hint = c.saturating_add(count);
            let host = c << self.g.cluster_bits;
            self.cache
                .forget_range(0, host, count.saturating_mul(self.g.cs));
            return Ok((host, count));
        }
        Err(Error::NoSpace {
            what: "cluster allocation did not converge",
        })
    }

    /// Allocates one cluster for metadata (never cluster 0).
    fn alloc_metadata_cluster(&mut self) -> Result<u64, Error<D::Error>> {
        let (host, _) = self.alloc_clusters(1)?;
        if host == 0 {
            return Err(corrupt("allocation of metadata at offset 0", 0));
        }
        Ok(host)
    }

    /// Writes the refcount block for refcount table index `r` at cluster `c` (inside the range it covers, so
    /// that it covers itself), then points the refcount table at it.
    fn alloc_refblock(&mut self, r: u64, c: u64) -> Result<(), Error<D::Error>> {
        let host = c << self.g.cluster_bits;
        self.cache.forget_range(0, host, self.g.cs);
        let self_index = c & (1u64 << self.g.block_bits).wrapping_sub(1);
        let order = self.g.order;
        self.write_block_with(host, |_, chunk_start, chunk| {
            set_in_chunk(chunk, chunk_start, self_index, order)
        })?;
        self.flush_dev()?;
        self.set_table_word(self.g.rt_off, r.saturating_mul(8), host)?;
        Ok(())
    }

    /// Writes a new L2 table at `new` (a copy of the shared table at `old`, or zeros) and makes it durable
    /// with the refcounts that cover it, before an L1 entry may point at it.
    fn prepare_l2(&mut self, old: Option<u64>, new: u64) -> Result<(), Error<D::Error>> {
        match old {
            // Copy the shared table; its entries keep their (shared) COPIED-less state.
            Some(old) => self.copy_cluster(old, new)?,
            None => self.write_zeros(new, self.g.cs)?,
        }
        if !self.w.lazy {
            self.writeback(SliceKind::Refcount)?;
        }
        self.flush_dev()
    }

    /// Copies the cluster at host offset `from` to `to`.
    ///
    /// Out of line: inlined, its stack copy buffer would sit in the frame of the write request, below which
    /// every allocation of that request runs.
    #[inline(never)]
    fn copy_cluster(&mut self, from: u64, to: u64) -> Result<(), Error<D::Error>> {
        let cs = self.g.cs;
        let bs = self.dev.block_size();
        let (bounce, rest) = split_bounce(self.bounce, bs);
        let mut stack = [0u8; STACK_CHUNK];
        let chunk = chunk_of(rest, &mut stack);
        let mut done = 0u64;
        while done < cs {
            let n = (chunk.len() as u64).min(cs.saturating_sub(done)) as usize;
            let part = chunk.get_mut(..n).unwrap_or(&mut []);
            read_bytes(self.dev, bounce, from.saturating_add(done), part)?;
            write_bytes(self.dev, bounce, to.saturating_add(done), part)?;
            done = done.saturating_add(n as u64);
        }
        self.w.needs_flush = true;
        Ok(())
    }

    /// Writes one cluster at `host` chunk by chunk; `fill(first, chunk_offset, chunk)` fills each zeroed chunk.
    fn write_block_with<F>(&mut self, host: u64, mut fill: F) -> Result<(), Error<D::Error>>
    where
        F: FnMut(bool, u64, &mut [u8]) -> Option<()>,
    {
        let bs = self.dev.block_size();
        let cs = self.g.cs;
        let (bounce, rest) = split_bounce(self.bounce, bs);
        let mut stack = [0u8; STACK_CHUNK];
        let chunk = chunk_of(rest, &mut stack);
        let mut done = 0u64;
        while done < cs {
            let n = (chunk.len() as u64).min(cs.saturating_sub(done)) as usize;
            let part = chunk.get_mut(..n).unwrap_or(&mut []);
            part.fill(0);
            fill(done == 0, done, part).ok_or(corrupt("refcount block layout", host))?;
            write_bytes(self.dev, bounce, host.saturating_add(done), part)?;
            done = done.saturating_add(n as u64);
        }
        self.w.needs_flush = true;
        Ok(())
    }

    /// Grows the refcount table so that it covers cluster `c` (which, like everything after it, has no
    /// refcount block yet). The new table and the refcount blocks that cover it are placed at `c`.
    fn grow_reftable(&mut self, c: u64) -> Result<(), Error<D::Error>> {
        let g = self.g;
        let per_cluster = g.cs >> 3;
        let r0 = c >> g.block_bits;
        let old_entries = g.rt_entries;
        let want = old_entries
            .saturating_add(old_entries / 2)
            .max(r0.saturating_add(2));
        let mut k = 1u64;
        let mut t;
        loop {
            let need = want.max(r0.saturating_add(k).saturating_add(1));
            t = ceil_div(need, per_cluster);
            let last = c.saturating_add(k).saturating_add(t).saturating_sub(1);
            let regions = (last >> g.block_bits).saturating_sub(r0).saturating_add(1);
            if regions <= k {
                break;
            }
            k = regions;
            if k > 1024 {
                return Err(Error::NoSpace {
                    what: "refcount table growth did not converge",
                });
            }
        }
        if t.saturating_mul(g.cs) > MAX_REFTABLE_BYTES || t > u64::from(u32::MAX) {
            return Err(Error::NoSpace {
                what: "the refcount table would exceed 8 MiB",
            });
        }
        let area_end = c.saturating_add(k).saturating_add(t);
        if area_end > self.max_cluster() {
            return Err(Error::NoSpace {
                what: "no free host cluster below 2^56",
            });
        }
        // Refcount blocks: block i (at cluster c + i) covers region r0 + i and counts the new area's clusters.
        for i in 0..k {
            let region = r0.saturating_add(i);
            let first = region << g.block_bits;
            let lo = c.max(first).saturating_sub(first);
            let hi = area_end
                .min(first.saturating_add(1u64 << g.block_bits))
                .saturating_sub(first);
            let host = c.saturating_add(i) << g.cluster_bits;
            self.cache.forget_range(0, host, g.cs);
            self.write_block_with(host, |_, chunk_start, chunk| {
                let entries = (chunk.len() as u64).saturating_mul(8) >> g.order;
                let first_entry = chunk_start.saturating_mul(8) >> g.order;
                let from = lo.max(first_entry);
                let to = hi.min(first_entry.saturating_add(entries));
                let mut e = from;
                while e < to {
                    set_in_chunk(chunk, chunk_start, e, g.order)?;
                    e = e.saturating_add(1);
                }
                Some(())
            })?;
        }
        // The new table: the old entries, then the new blocks.
        let table = c.saturating_add(k) << g.cluster_bits;
        self.cache.forget_range(0, table, t.saturating_mul(g.cs));
        let old_bytes = old_entries.saturating_mul(8);
        let bs = self.dev.block_size();
        {
            let (bounce, rest) = split_bounce(self.bounce, bs);
            let mut stack = [0u8; STACK_CHUNK];
            let chunk = chunk_of(rest, &mut stack);
            let total = t.saturating_mul(g.cs);
            let mut done = 0u64;
            while done < total {
                let n = (chunk.len() as u64).min(total.saturating_sub(done)) as usize;
                let part = chunk.get_mut(..n).unwrap_or(&mut []);
                part.fill(0);
                if done < old_bytes {
                    let m = (old_bytes.saturating_sub(done) as usize).min(n);
                    read_bytes(
                        self.dev,
                        bounce,
                        g.rt_off.saturating_add(done),
                        part.get_mut(..m).unwrap_or(&mut []),
                    )?;
                }
                for i in 0..k {
                    let byte = r0.saturating_add(i).saturating_mul(8);
                    if byte >= done && byte < done.saturating_add(n as u64) {
                        let at = byte.saturating_sub(done) as usize;
                        let host = c.saturating_add(i) << g.cluster_bits;
                        if let Some(dst) = part.get_mut(at..at.saturating_add(8)) {
                            let _ = copy_exact(dst, &host.to_be_bytes());
                        }
                    }
                }
                write_bytes(self.dev, bounce, table.saturating_add(done), part)?;
                done = done.saturating_add(n as u64);
            }
        }
        self.flush_dev()?;
        // Point the header at it.
        let mut field = [0u8; 12];
        let (offset, clusters) = field.split_at_mut_checked(8).unwrap_or_default();
        let _ = copy_exact(offset, &table.to_be_bytes());
        let _ = copy_exact(clusters, &(t as u32).to_be_bytes());
        self.write_header(HDR_REFTABLE, &field)?;
        let old_off = g.rt_off;
        let old_clusters = old_entries.checked_div(per_cluster).unwrap_or(0);
        self.header.refcount_table_offset = table;
        self.header.refcount_table_clusters = t as u32;
        self.g.rt_off = table;
        self.g.rt_entries = t.saturating_mul(per_cluster);
        self.cache
            .forget_range(0, old_off, old_clusters.saturating_mul(g.cs));
        // The old table is no longer referenced by the (durable) header.
        for i in 0..old_clusters {
            self.change_refcount((old_off >> g.cluster_bits).saturating_add(i), false)?;
        }
        Ok(())
    }

    // --- L2 entries ----------------------------------------------------------------------------------------

    fn l2_loc(&self, l2: u64, index: u64) -> (u64, usize) {
        let byte = index.saturating_mul(self.g.l2_entry);
        let start = byte & !self.g.slice.wrapping_sub(1);
        (
            l2.saturating_add(start),
            byte.saturating_sub(start) as usize,
        )
    }

    fn l2_get(&mut self, l2: u64, index: u64) -> Result<L2Entry, Error<D::Error>> {
        let (host, at) = self.l2_loc(l2, index);
        let slice = self.g.slice as usize;
        let extended = self.g.l2.extended;
        let s = self
            .cache
            .get(self.dev, bounce_of(self.bounce, 0), 0, host, slice)?;
        Ok(L2Entry {
            word: be64(s, at),
            bitmap: if extended {
                be64(s, at.saturating_add(8))
            } else {
                0
            },
        })
    }

    fn l2_set(&mut self, l2: u64, index: u64, e: L2Entry) -> Result<(), Error<D::Error>> {
        self.make_room(1)?;
        let (host, at) = self.l2_loc(l2, index);
        let slice = self.g.slice as usize;
        let extended = self.g.l2.extended;
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
    fn l2_table(&mut self, guest: u64) -> Result<(L1Entry, Option<u64>), Error<D::Error>> {
        let g = self.g;
        let l1_index = guest >> g.coverage_bits;
        let entry = self.l1_entry(l1_index)?;
        let l2 = entry.l2_offset(g.cs).map_err(|e| {
            self.mark_corrupt(
                e.describe("L1"),
                g.l1_off.saturating_add(l1_index.saturating_mul(8)),
            )
        })?;
        Ok((entry, l2))
    }

    /// The index, entry and kind of guest cluster `gc` in the L2 table at `l2`. An invalid entry marks the
    /// image corrupt.
    fn cluster_entry(
        &mut self,
        l2: u64,
        gc: u64,
    ) -> Result<(u64, L2Entry, ClusterKind), Error<D::Error>> {
        let g = self.g;
        let index = (gc >> g.cluster_bits) & g.l2_entries.wrapping_sub(1);
        let old = self.l2_get(l2, index)?;
        let (entry_host, _) = self.l2_loc(l2, index);
        let kind = old
            .classify(g.l2)
            .map_err(|e| self.mark_corrupt(e.describe("L2"), entry_host))?;
        Ok((index, old, kind))
    }

    /// Queues the host clusters an entry held for freeing (data, preallocated zero, compressed).
    fn free_entry(&mut self, kind: ClusterKind) -> Result<(), Error<D::Error>> {
        match kind {
            ClusterKind::Data { host } | ClusterKind::Zero { host: Some(host) } => {
                if !self.g.l2.external_data {
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

    /// Fails (and marks the image corrupt) if host bytes `[host, host + len)` hold metadata.
    fn check_overlap(&mut self, host: u64, len: u64) -> Result<(), Error<D::Error>> {
        let end = host.saturating_add(len);
        let hit = |a: u64, b: u64| a < end && host < b;
        let g = self.g;
        let h = *self.header;
        let snapshots =
            h.nb_snapshots != 0 && hit(h.snapshots_offset, h.snapshots_offset.saturating_add(g.cs));
        if hit(0, g.cs)
            || hit(
                g.l1_off,
                g.l1_off.saturating_add(g.l1_size.saturating_mul(8)),
            )
            || hit(
                g.rt_off,
                g.rt_off.saturating_add(g.rt_entries.saturating_mul(8)),
            )
            || snapshots
            || self.cache.overlaps(0, host, len)
        {
            return Err(self.mark_corrupt("a data write would overwrite metadata", host));
        }
        Ok(())
    }

    /// The engine does not keep dirty bitmaps up to date, so before its first write it disowns them (their
    /// autoclear bit is already cleared and durable): the bitmaps extension is ended where it is the last
    /// extension, and the directory, tables and bitmap clusters are freed. Anything that does not look exactly
    /// like a valid bitmap directory is left alone (leaked, never freed twice), and so is a bitmap table whose
    /// clusters are not each owned once (shared with another bitmap, or already freed).
    ///
    /// The directory was validated when the image was opened (QEMU's limits: at most 65535 entries, each table
    /// at most 512 MiB of bitmap data); tables are read a chunk at a time, and each owned table once.
    fn drop_bitmaps(&mut self, b: BitmapsExtension) -> Result<(), Error<D::Error>> {
        let cs = self.g.cs;
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
    fn bitmap_entry(
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
    fn free_owned(&mut self, host: u64) -> Result<(), Error<D::Error>> {
        if host == 0 || host & self.g.cs.wrapping_sub(1) != 0 || host > MAX_HOST_OFFSET {
            return Ok(());
        }
        let c = host >> self.g.cluster_bits;
        if self.refcount(c)? == 1 {
            self.change_refcount(c, false)?;
        }
        Ok(())
    }

    /// Sets the corrupt bit (version 3), stops writing, and returns the error describing why.
    fn mark_corrupt(&mut self, what: &'static str, offset: u64) -> Error<D::Error> {
        self.w.writable = false;
        if self.header.version >= 3 {
            let bits = self.header.incompatible_features | IncompatibleFeatures::CORRUPT;
            if self
                .write_header(HDR_INCOMPATIBLE, &bits.bits().to_be_bytes())
                .is_ok()
            {
                self.header.incompatible_features = bits;
            }
        }
        corrupt(what, offset)
    }
}

/// Writes `len` zero bytes at `host` of `dev`, from the part of `bounce` past its first block (or a stack
/// buffer).
fn write_zero_run<D: BlockDeviceWrite>(
    dev: &mut D,
    bounce: &mut [u8],
    host: u64,
    len: u64,
) -> Result<(), Error<D::Error>> {
    let (bounce, rest) = split_bounce(bounce, dev.block_size());
    let mut stack = [0u8; STACK_CHUNK];
    let chunk = chunk_of(rest, &mut stack);
    chunk.fill(0);
    let mut done = 0u64;
    while done < len {
        let n = (chunk.len() as u64).min(len.saturating_sub(done)) as usize;
        write_bytes(
            dev,
            bounce,
            host.saturating_add(done),
            chunk.get(..n).unwrap_or(&[]),
        )?;
        done = done.saturating_add(n as u64);
    }
    Ok(())
}

/// The first `bs` bytes of the bounce buffer (the device-block bounce).
fn bounce_of(bounce: &mut [u8], bs: usize) -> &mut [u8] {
    let len = bounce.len();
    let n = if bs == 0 { len } else { bs.min(len) };
    bounce.get_mut(..n).unwrap_or(&mut [])
}

/// Splits the bounce buffer into the device-block bounce and the rest (a copy buffer, maybe empty).
fn split_bounce(bounce: &mut [u8], bs: usize) -> (&mut [u8], &mut [u8]) {
    let n = bs.min(bounce.len());
    bounce.split_at_mut_checked(n).unwrap_or_default()
}

/// The copy buffer: the largest power of two of `rest` (at least 512 bytes), else `stack`.
fn chunk_of<'a>(rest: &'a mut [u8], stack: &'a mut [u8; STACK_CHUNK]) -> &'a mut [u8] {
    if rest.len() >= STACK_CHUNK {
        let n = 1usize
            << (usize::BITS
                .saturating_sub(1)
                .saturating_sub(rest.len().leading_zeros()));
        rest.get_mut(..n).unwrap_or(&mut [])
    } else {
        &mut stack[..]
    }
}

/// Sets refcount entry `entry` (of a block whose chunk starting at byte `chunk_start` is `chunk`) to 1.
fn set_in_chunk(chunk: &mut [u8], chunk_start: u64, entry: u64, order: u32) -> Option<()> {
    let bit = entry << order;
    let byte = bit >> 3;
    if byte < chunk_start || byte >= chunk_start.saturating_add(chunk.len() as u64) {
        return Some(());
    }
    let first_entry = chunk_start.saturating_mul(8) >> order;
    refcount_set(
        chunk,
        order,
        usize::try_from(entry.saturating_sub(first_entry)).ok()?,
        1,
    )
}

/// Refuses a corrupt image and repairs (or, without `dirty-repair`, refuses) a dirty one, for
/// [`Image::open_writable`]. Returns whether lazy refcounts are in effect for the writer.
fn make_writable<
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
    const DEPTH: usize,
    const SLICES: usize,
>(
    layers: &mut Vec<Layer<D>, DEPTH>,
    bounce: &mut [u8],
    cache: &mut SliceCache<B, SLICES>,
) -> Result<bool, Error<D::Error>> {
    let layer = layers.first_mut().ok_or(Error::ReadOnly)?;
    let header = &layer.meta.as_ref().ok_or(Error::ReadOnly)?.header;
    let incompatible = header.incompatible_features;
    let lazy = header
        .compatible_features
        .contains(CompatibleFeatures::LAZY_REFCOUNTS);
    if incompatible.contains(IncompatibleFeatures::CORRUPT) {
        return Err(corrupt(
            "the image is marked corrupt; repair it (check -r all) before writing",
            0,
        ));
    }
    if incompatible.contains(IncompatibleFeatures::DIRTY) {
        #[cfg(feature = "dirty-repair")]
        rebuild_refcounts(layer, bounce, cache)?;
        #[cfg(not(feature = "dirty-repair"))]
        return Err(Error::NeedsRepair {
            what: "the image is dirty (lazy refcounts were not written back); repair it (check -r all) \
                   before writing",
        });
    }
    #[cfg(not(feature = "dirty-repair"))]
    let _ = (bounce, cache);
    // Without `dirty-repair` a dirty image could not be reopened for writing: keep refcounts eager.
    Ok(lazy && cfg!(feature = "dirty-repair"))
}

/// Rebuilds the refcounts of a dirty image (after a crash with lazy refcounts) and re-reads its header.
#[cfg(feature = "dirty-repair")]
fn rebuild_refcounts<D: BlockDeviceWrite, B: AsRef<[u8]> + AsMut<[u8]>, const SLICES: usize>(
    layer: &mut Layer<D>,
    bounce: &mut [u8],
    cache: &mut SliceCache<B, SLICES>,
) -> Result<(), Error<D::Error>> {
    // The metadata cache is empty at this point: its buffer is the repair's scratch memory.
    let scratch = cache.scratch()?;
    let report = crate::check::repair(
        &mut layer.dev,
        bounce,
        scratch,
        crate::check::RepairMode::All,
        &mut crate::check::NoSink,
    )?;
    if report.corruptions != 0 {
        return Err(corrupt(
            "the dirty image's refcounts could not be rebuilt",
            report.corruptions,
        ));
    }
    cache.invalidate(None);
    let size = layer.dev.size()?;
    let meta = crate::engine::open_qcow2(&mut layer.dev, bounce, size)?;
    layer.meta = Some(meta);
    layer.file_size = size;
    Ok(())
}

impl<D, B, C, const DEPTH: usize, const SLICES: usize> Image<D, B, C, DEPTH, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// Opens the qcow2 image on `dev` for reading and writing (its backing chain stays read-only; an
    /// external data file, which the resolver supplies, is written too).
    ///
    /// Refuses images with the corrupt bit set, and metadata caches of fewer than [`MIN_WRITE_SLICES`] slices.
    /// A dirty image (lazy refcounts after a crash) has its refcounts rebuilt before this returns (feature
    /// `dirty-repair`, on by default); without that feature it is refused with [`Error::NeedsRepair`] and
    /// left as it is: [`crate::check::repair`] it (mode `All`), then open it again. Before the first write,
    /// unknown autoclear bits are cleared, and so is the bitmaps bit: the engine does not update dirty
    /// bitmaps, so it disowns them (frees their clusters) rather than leave them stale.
    ///
    /// Writes keep QEMU's crash-safety rules (see [`crate::write`]): after a power loss
    /// the image may leak clusters but never loses flushed data or references a cluster whose refcount is too
    /// low. [`Image::flush`] makes everything written before it durable; [`Image::close`] also clears the
    /// dirty bit of a lazy-refcounts image. Without `dirty-repair` the engine never sets the dirty bit: it
    /// writes the refcounts of a lazy-refcounts image back as it does for any other, so that whatever it
    /// leaves behind (even after a power loss) opens for writing again.
    pub fn open_writable<R: Resolver<D>>(
        dev: D,
        buffers: Buffers<B>,
        decompressor: C,
        resolver: &mut R,
    ) -> Result<Self, Error<D::Error>> {
        if SLICES < MIN_WRITE_SLICES {
            return Err(Error::BufferTooSmall {
                what: "metadata slice count for writing",
                need: MIN_WRITE_SLICES as u64,
                have: SLICES as u64,
            });
        }
        // As `open_as`, with the checks and the repair in between: the image value is built once, where it is
        // returned.
        let Buffers {
            mut bounce,
            metadata,
        } = buffers;
        let mut cache = SliceCache::new(metadata)?;
        let mut layers = Vec::new();
        Self::open_chain(&mut layers, dev, Format::Qcow2, bounce.as_mut(), resolver)?;
        let lazy = make_writable(&mut layers, bounce.as_mut(), &mut cache)?;
        Ok(Image {
            layers,
            bounce,
            cache,
            decompressor,
            w: WriteState {
                writable: true,
                lazy,
                free_hint: 1,
                ..WriteState::default()
            },
        })
    }

    /// Whether the image was opened for writing (and has not been stopped by a corruption).
    pub fn is_writable(&self) -> bool {
        self.w.writable
    }

    fn meta(&mut self) -> Result<Meta<'_, D, B, SLICES>, Error<D::Error>> {
        let Image {
            layers,
            bounce,
            cache,
            w,
            ..
        } = self;
        let layer = layers.first_mut().ok_or(Error::ReadOnly)?;
        let meta = layer.meta.as_mut().ok_or(Error::ReadOnly)?;
        let g = Geo::new(&meta.header, meta.l2, cache.slot_size());
        Ok(Meta {
            dev: &mut layer.dev,
            data: layer.data.as_mut(),
            header: &mut meta.header,
            bounce: bounce.as_mut(),
            cache,
            w,
            g,
        })
    }

    /// Checks that writing is allowed and prepares the header on the first write.
    fn begin_write(&mut self) -> Result<(), Error<D::Error>> {
        if !self.w.writable {
            return Err(Error::ReadOnly);
        }
        if self.w.started {
            return Ok(());
        }
        let bitmaps = self.layers.first().and_then(|l| l.meta).and_then(|m| {
            m.header
                .autoclear_features
                .contains(AutoclearFeatures::BITMAPS)
                .then_some(m.bitmaps)
                .flatten()
        });
        let mut m = self.meta()?;
        if m.header.version >= 3 {
            let keep = m.header.autoclear_features & AutoclearFeatures::DATA_FILE_RAW;
            let raw = m.header.autoclear_features.bits();
            if raw != keep.bits() {
                m.write_header(HDR_AUTOCLEAR, &keep.bits().to_be_bytes())?;
                m.header.autoclear_features = keep;
            }
            if let Some(b) = bitmaps {
                m.drop_bitmaps(b)?;
            }
            if m.w.lazy && !m.w.dirty_bit {
                let bits = m.header.incompatible_features | IncompatibleFeatures::DIRTY;
                m.write_header(HDR_INCOMPATIBLE, &bits.bits().to_be_bytes())?;
                m.header.incompatible_features = bits;
                m.w.dirty_bit = true;
            }
        }
        m.w.started = true;
        Ok(())
    }

    /// Ends a request: frees what it dropped and keeps the cache from filling with dirty slices.
    fn end_write(&mut self) -> Result<(), Error<D::Error>> {
        let mut m = self.meta()?;
        m.commit_frees()?;
        if m.cache.dirty_count().saturating_mul(2) > SLICES {
            m.writeback_all()?;
        }
        Ok(())
    }

    fn geo(&mut self) -> Result<Geo, Error<D::Error>> {
        Ok(self.meta()?.g)
    }

    /// The L2 table for guest offset `guest`, allocated (or copied, if shared with a snapshot) so that it can
    /// be written. Returns its host offset.
    fn writable_l2(&mut self, guest: u64) -> Result<u64, Error<D::Error>> {
        let mut m = self.meta()?;
        let g = m.g;
        let l1_index = guest >> g.coverage_bits;
        let (entry, old) = m.l2_table(guest)?;
        if let Some(old) = old
            && entry.copied()
        {
            return Ok(old);
        }
        m.make_room(3)?;
        let new = m.alloc_metadata_cluster()?;
        if let Err(e) = m.prepare_l2(old, new) {
            // The L1 entry does not point at it yet: the cluster goes back.
            let _ = m.change_refcount(new >> g.cluster_bits, false);
            return Err(e);
        }
        m.set_table_word(g.l1_off, l1_index.saturating_mul(8), new | OFLAG_COPIED)?;
        if let Some(old) = old {
            m.free_later(old)?;
        }
        Ok(new)
    }

    /// Copies the guest bytes `[guest, guest + len)` as they read now into host bytes at `host` of the top
    /// image (the copy-on-write part of an allocating write).
    fn copy_guest(&mut self, guest: u64, host: u64, len: u64) -> Result<(), Error<D::Error>> {
        let size = self.virtual_size();
        let bs = self
            .layers
            .first()
            .map(|l| l.dev.block_size())
            .ok_or(Error::ReadOnly)?;
        let Image {
            layers,
            bounce,
            cache,
            decompressor,
            ..
        } = self;
        let (b, rest) = split_bounce(bounce.as_mut(), bs);
        let mut stack = [0u8; STACK_CHUNK];
        let chunk = chunk_of(rest, &mut stack);
        let mut done = 0u64;
        while done < len {
            let n = (chunk.len() as u64).min(len.saturating_sub(done)) as usize;
            let part = chunk.get_mut(..n).unwrap_or(&mut []);
            // The last cluster of a disk whose size is not a cluster multiple reaches past the disk: that part
            // is copied as zeros.
            let at = guest.saturating_add(done);
            let inside = usize::try_from(size.saturating_sub(at))
                .unwrap_or(usize::MAX)
                .min(n);
            let (readable, past) = part.split_at_mut_checked(inside).unwrap_or_default();
            past.fill(0);
            Reader {
                layers: layers.as_mut_slice(),
                bounce: &mut *b,
                cache: &mut *cache,
                decompressor: &mut *decompressor,
            }
            .read(at, readable)?;
            let top = layers.first_mut().ok_or(Error::ReadOnly)?;
            let dev = match top.data.as_mut() {
                Some(data) => data,
                None => &mut top.dev,
            };
            write_bytes(dev, b, host.saturating_add(done), part)?;
            done = done.saturating_add(n as u64);
        }
        self.w.needs_flush = true;
        Ok(())
    }

    /// Stores `src` at host offset `host` of the top image (in its external data file, if it has one).
    fn store(&mut self, host: u64, src: Src<'_>, len: u64) -> Result<(), Error<D::Error>> {
        let Image {
            layers, bounce, w, ..
        } = self;
        let top = layers.first_mut().ok_or(Error::ReadOnly)?;
        let dev = match top.data.as_mut() {
            Some(data) => data,
            None => &mut top.dev,
        };
        match src {
            Src::Bytes(bytes) => {
                let bs = dev.block_size();
                write_bytes(dev, bounce_of(bounce.as_mut(), bs), host, bytes)?;
            }
            Src::Zeros => write_zero_run(dev, bounce.as_mut(), host, len)?,
        }
        w.needs_flush = true;
        Ok(())
    }

    /// Writes guest bytes `[a, b)` of the cluster at guest offset `gc` from `src`.
    fn write_cluster(
        &mut self,
        gc: u64,
        a: u64,
        b: u64,
        src: Src<'_>,
    ) -> Result<(), Error<D::Error>> {
        let l2 = self.writable_l2(gc)?;
        let mut m = self.meta()?;
        m.make_room(3)?;
        let g = m.g;
        let (index, old, kind) = m.cluster_entry(l2, gc)?;
        let piece = g.piece_size();
        let pieces = g.pieces();
        // Which pieces hold data now, and which does this write touch.
        let full = if pieces == 32 { u32::MAX } else { 1 };
        let old_alloc: u32 = match kind {
            ClusterKind::Data { .. } if g.l2.extended => (old.bitmap & 0xffff_ffff) as u32,
            ClusterKind::Data { .. } | ClusterKind::Compressed(_) => full,
            _ => 0,
        };
        let old_zero: u32 = if g.l2.extended {
            (old.bitmap >> 32) as u32
        } else {
            0
        };
        let first = a.checked_div(piece).unwrap_or(0);
        let last = b.saturating_sub(1).checked_div(piece).unwrap_or(0);
        let mut touched = 0u32;
        let mut p = first;
        while p <= last && p < pieces {
            touched |= 1u32 << p;
            p = p.saturating_add(1);
        }
        let in_place = match kind {
            ClusterKind::Data { host } if old.copied() => Some(host),
            ClusterKind::Zero { host: Some(host) } if old.copied() && !g.l2.extended => Some(host),
            _ => None,
        };
        let new_alloc = old_alloc | touched;
        let target = match in_place {
            Some(host) => host,
            // An external data file maps guest clusters to the same offsets, without refcounts.
            None if g.l2.external_data => gc,
            None => m.alloc_clusters(1)?.0,
        };
        if !g.l2.external_data {
            m.check_overlap(target, g.cs)?;
        }
        // Copy what the write does not cover in the pieces that will be allocated, from the old content, then
        // store the new bytes. If that fails, a cluster allocated for it goes back: nothing references it yet.
        let copy = match in_place {
            Some(_) => new_alloc & !old_alloc,
            None => new_alloc,
        };
        if let Err(e) = self.fill_cluster(gc, target, a, b, src, copy) {
            if in_place.is_none() && !g.l2.external_data {
                self.give_back(target);
            }
            return Err(e);
        }
        let new = if g.l2.extended {
            L2Entry {
                word: target | OFLAG_COPIED,
                bitmap: u64::from(new_alloc) | (u64::from(old_zero & !new_alloc) << 32),
            }
        } else {
            L2Entry {
                word: target | OFLAG_COPIED,
                bitmap: 0,
            }
        };
        let mut m = self.meta()?;
        if new != old {
            m.l2_set(l2, index, new)?;
        }
        if in_place.is_none() {
            m.free_entry(kind)?;
        }
        if matches!(kind, ClusterKind::Compressed(_)) {
            self.decompressor.invalidate();
        }
        Ok(())
    }

    /// Fills the pieces of the host cluster at `target` that `copy` names with the old content of guest cluster
    /// `gc` (around the written bytes), then stores the guest bytes `[a, b)` of the cluster from `src`.
    fn fill_cluster(
        &mut self,
        gc: u64,
        target: u64,
        a: u64,
        b: u64,
        src: Src<'_>,
        copy: u32,
    ) -> Result<(), Error<D::Error>> {
        let g = self.geo()?;
        let piece = g.piece_size();
        let pieces = g.pieces();
        let mut run: Option<(u64, u64)> = None;
        for p in 0..pieces {
            if copy & (1u32 << p) == 0 {
                continue;
            }
            let ps = p.saturating_mul(piece);
            let pe = ps.saturating_add(piece);
            for (lo, hi) in [(ps, pe.min(a)), (ps.max(b), pe)] {
                if lo >= hi {
                    continue;
                }
                run = match run {
                    Some((rlo, rhi)) if rhi == lo => Some((rlo, hi)),
                    Some((rlo, rhi)) => {
                        self.copy_guest(
                            gc.saturating_add(rlo),
                            target.saturating_add(rlo),
                            rhi.saturating_sub(rlo),
                        )?;
                        Some((lo, hi))
                    }
                    None => Some((lo, hi)),
                };
            }
        }
        if let Some((rlo, rhi)) = run {
            self.copy_guest(
                gc.saturating_add(rlo),
                target.saturating_add(rlo),
                rhi.saturating_sub(rlo),
            )?;
        }
        self.store(target.saturating_add(a), src, b.saturating_sub(a))
    }

    /// Gives back a cluster allocated for a change that failed before anything referenced it (best effort:
    /// the request's own error is what the caller sees; at worst the cluster stays leaked).
    fn give_back(&mut self, host: u64) {
        if let Ok(mut m) = self.meta() {
            let c = host >> m.g.cluster_bits;
            let _ = m.change_refcount(c, false);
        }
    }

    /// Writes `buf` at guest `offset` (any size and alignment).
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Error<D::Error>> {
        self.check_range(offset, buf.len() as u64)?;
        self.begin_write()?;
        self.write_range(offset, buf.len() as u64, Src::Bytes(buf))?;
        self.end_write()
    }

    fn write_range(&mut self, offset: u64, len: u64, src: Src<'_>) -> Result<(), Error<D::Error>> {
        let cs = self.geo()?.cs;
        let mut pos = offset;
        let end = offset.saturating_add(len);
        while pos < end {
            let gc = pos & !cs.wrapping_sub(1);
            let a = pos.saturating_sub(gc);
            let b = end.saturating_sub(gc).min(cs);
            let from = pos.saturating_sub(offset) as usize;
            let n = b.saturating_sub(a);
            self.write_cluster(gc, a, b, src.sub(from, n as usize))?;
            pos = gc.saturating_add(b);
        }
        Ok(())
    }

    /// Makes `len` bytes at guest `offset` read as zeros: with the zero flag (or subcluster zero bits) where
    /// whole (sub)clusters are covered, with written zeros elsewhere. With `unmap`, zeroed clusters give their
    /// host clusters back.
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), Error<D::Error>> {
        self.check_range(offset, len)?;
        self.begin_write()?;
        self.zero_range(offset, len, unmap)?;
        self.end_write()
    }

    fn zero_range(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), Error<D::Error>> {
        let g = self.geo()?;
        if g.l2.external_data && self.data_raw() {
            // A raw data file must read as the guest disk: zero it too.
            self.store(offset, Src::Zeros, len)?;
        }
        let size = self.virtual_size();
        let end = offset.saturating_add(len);
        let backing = self.layers.len() > 1;
        if !g.l2.v3 && backing {
            // Version 2 has no zero flag, and a deallocated cluster would show the backing file: write zeros.
            return self.write_range(offset, len, Src::Zeros);
        }
        // Version 2 without a backing file deallocates (unallocated clusters read as zeros there).
        let piece = g.piece_size();
        let mut pos = offset;
        while pos < end {
            let gc = pos & !g.cs.wrapping_sub(1);
            let ps = pos & !piece.wrapping_sub(1);
            let pe = ps.saturating_add(piece).min(size);
            let b = end.min(pe);
            if pos == gc && (b == gc.saturating_add(g.cs) || b >= size) {
                // A whole cluster.
                if g.l2.v3 {
                    self.zero_cluster(gc, unmap)?;
                } else {
                    self.discard_cluster(gc, false)?;
                }
                pos = b;
                continue;
            }
            // A whole piece, or a partial one whose rest already reads as zeros and that holds no data in
            // this image, becomes a zero (sub)cluster as in QEMU; anything else gets written zeros.
            let whole = pos == ps && b == pe;
            let promote = whole
                || (self.holds_no_data(ps)?
                    && self.reads_as_zero(ps, pos.saturating_sub(ps))?
                    && self.reads_as_zero(b, pe.saturating_sub(b))?);
            if promote && !g.l2.v3 {
                self.discard_cluster(gc, false)?;
            } else if promote && g.l2.extended {
                let s = ps.saturating_sub(gc).checked_div(piece).unwrap_or(0);
                self.zero_subclusters(gc, s, s.saturating_add(1))?;
            } else if promote {
                self.zero_cluster(gc, unmap)?;
            } else {
                self.write_cluster(gc, pos.saturating_sub(gc), b.saturating_sub(gc), Src::Zeros)?;
            }
            pos = b;
        }
        Ok(())
    }

    /// Whether guest bytes `[offset, offset + len)` are known to read as zeros without reading data (zero or
    /// unallocated everywhere in the chain).
    fn reads_as_zero(&mut self, offset: u64, len: u64) -> Result<bool, Error<D::Error>> {
        let mut pos = offset;
        let end = offset.saturating_add(len);
        while pos < end {
            let m = self.reader().map_from(0, pos, end.saturating_sub(pos))?;
            match m.source {
                crate::engine::Source::Zero { .. }
                | crate::engine::Source::Unallocated { .. }
                | crate::engine::Source::PastEnd => {}
                // A raw image's holes read as zeros too (the device says which ranges are holes).
                crate::engine::Source::Data {
                    host,
                    external: false,
                } if self
                    .layers
                    .get(m.depth)
                    .is_some_and(|l| l.qcow2().is_none()) =>
                {
                    let mut at = host;
                    let stop = host.saturating_add(m.len);
                    while at < stop {
                        let e = self.host_status(m.depth, false, at, stop.saturating_sub(at))?;
                        if e.data || e.len == 0 {
                            return Ok(false);
                        }
                        at = at.saturating_add(e.len);
                    }
                }
                _ => return Ok(false),
            }
            pos = pos.saturating_add(m.len.max(1));
        }
        Ok(true)
    }

    /// Whether the (sub)cluster at guest offset `offset` is unallocated or zero in the top image.
    fn holds_no_data(&mut self, offset: u64) -> Result<bool, Error<D::Error>> {
        let m = self.reader().map_from(0, offset, 1)?;
        Ok(m.depth > 0
            || matches!(
                m.source,
                crate::engine::Source::Zero { .. } | crate::engine::Source::Unallocated { .. }
            ))
    }

    fn data_raw(&self) -> bool {
        self.layers.first().and_then(|l| l.meta).is_some_and(|m| {
            m.header
                .autoclear_features
                .contains(AutoclearFeatures::DATA_FILE_RAW)
        })
    }

    fn zero_cluster(&mut self, gc: u64, unmap: bool) -> Result<(), Error<D::Error>> {
        let l2 = self.writable_l2(gc)?;
        let mut m = self.meta()?;
        m.make_room(3)?;
        let g = m.g;
        let (index, old, kind) = m.cluster_entry(l2, gc)?;
        let allocated = matches!(
            kind,
            ClusterKind::Data { .. } | ClusterKind::Zero { host: Some(_) }
        );
        // An external data file keeps its clusters (they are not refcounted).
        let drop_host = !g.l2.external_data
            && (matches!(kind, ClusterKind::Compressed(_)) || (unmap && allocated));
        let new = if g.l2.extended {
            L2Entry {
                word: if drop_host { 0 } else { old.word },
                bitmap: ALL_ZEROES,
            }
        } else {
            L2Entry {
                word: (if drop_host { 0 } else { old.word }) | OFLAG_ZERO,
                bitmap: 0,
            }
        };
        if new != old {
            m.l2_set(l2, index, new)?;
            if drop_host {
                m.free_entry(kind)?;
            }
        }
        Ok(())
    }

    /// Extended L2: subclusters `[sa, sb)` of the cluster at `gc` read as zeros.
    fn zero_subclusters(&mut self, gc: u64, sa: u64, sb: u64) -> Result<(), Error<D::Error>> {
        let l2 = self.writable_l2(gc)?;
        let mut m = self.meta()?;
        m.make_room(3)?;
        let g = m.g;
        let (index, old, kind) = m.cluster_entry(l2, gc)?;
        if matches!(kind, ClusterKind::Compressed(_)) {
            return self.write_cluster(
                gc,
                sa.saturating_mul(g.sub_size),
                sb.saturating_mul(g.sub_size),
                Src::Zeros,
            );
        }
        let mut mask = 0u64;
        let mut s = sa;
        while s < sb && s < 32 {
            mask |= 1u64 << s;
            s = s.saturating_add(1);
        }
        let new = L2Entry {
            word: old.word,
            bitmap: (old.bitmap & !mask & 0xffff_ffff) | (((old.bitmap >> 32) | mask) << 32),
        };
        if new != old {
            self.meta()?.l2_set(l2, index, new)?;
        }
        Ok(())
    }

    /// Discards `len` bytes at guest `offset`: whole clusters inside the range are freed (and read as zeros
    /// afterwards where the format can say so); partial clusters are left alone.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), Error<D::Error>> {
        self.check_range(offset, len)?;
        self.begin_write()?;
        let g = self.geo()?;
        let size = self.virtual_size();
        let end_req = offset.saturating_add(len);
        let start = ceil_div(offset, g.cs).saturating_mul(g.cs);
        let end = if end_req == size {
            end_req
        } else {
            end_req & !g.cs.wrapping_sub(1)
        };
        if g.l2.external_data {
            // Clusters of an external data file stay mapped; the discarded range reads as zeros.
            if start < end {
                self.zero_range(start, end.saturating_sub(start), false)?;
            }
            return self.end_write();
        }
        let backing = self.layers.len() > 1;
        if backing && !g.l2.v3 {
            // Version 2 cannot mark a cluster as zeros, and dropping it would expose the backing file's
            // data: like QEMU, leave such clusters in place.
            return self.end_write();
        }
        let mut gc = start;
        while gc < end {
            self.discard_cluster(gc, backing)?;
            gc = gc.saturating_add(g.cs);
        }
        self.end_write()
    }

    fn discard_cluster(&mut self, gc: u64, backing: bool) -> Result<(), Error<D::Error>> {
        let mut m = self.meta()?;
        let g = m.g;
        let (_, l2) = m.l2_table(gc)?;
        let (index, old, kind) = match l2 {
            None => (
                (gc >> g.cluster_bits) & g.l2_entries.wrapping_sub(1),
                L2Entry { word: 0, bitmap: 0 },
                ClusterKind::Unallocated,
            ),
            Some(l2) => m.cluster_entry(l2, gc)?,
        };
        let allocated = !matches!(
            kind,
            ClusterKind::Unallocated | ClusterKind::Zero { host: None }
        );
        if !backing && !allocated {
            return Ok(());
        }
        let new = if g.l2.extended {
            L2Entry {
                word: 0,
                bitmap: ALL_ZEROES,
            }
        } else {
            L2Entry {
                word: if g.l2.v3 { OFLAG_ZERO } else { 0 },
                bitmap: 0,
            }
        };
        if new == old {
            return Ok(());
        }
        let l2 = self.writable_l2(gc)?;
        let mut m = self.meta()?;
        m.make_room(3)?;
        m.l2_set(l2, index, new)?;
        if allocated {
            m.free_entry(kind)?;
        }
        if matches!(kind, ClusterKind::Compressed(_)) {
            self.decompressor.invalidate();
        }
        Ok(())
    }

    /// Stores one whole guest cluster at the cluster-aligned guest `offset` as `compressed` (the cluster's
    /// content compressed with the image's compression type, shorter than a cluster). The caller compresses;
    /// data that does not compress should go through [`Image::write_at`] instead. Like QEMU, a compressed
    /// write only goes to a cluster that holds no data yet.
    pub fn write_compressed(
        &mut self,
        offset: u64,
        compressed: &[u8],
    ) -> Result<(), Error<D::Error>> {
        let g = self.geo()?;
        let n = compressed.len() as u64;
        if offset & g.cs.wrapping_sub(1) != 0 || offset >= self.virtual_size() {
            return Err(Error::OutOfRange {
                offset,
                len: g.cs,
                size: self.virtual_size(),
            });
        }
        if n == 0 || n >= g.cs {
            return Err(Error::BufferTooSmall {
                what: "compressed cluster (must be shorter than a cluster)",
                need: g.cs.saturating_sub(1),
                have: n,
            });
        }
        if g.l2.external_data {
            return Err(Error::Unsupported {
                what: "compressed clusters in an image with an external data file",
                value: offset,
            });
        }
        self.begin_write()?;
        let l2 = self.writable_l2(offset)?;
        let mut m = self.meta()?;
        m.make_room(3)?;
        let index = (offset >> g.cluster_bits) & g.l2_entries.wrapping_sub(1);
        let old = m.l2_get(l2, index)?;
        if old.word & (OFFSET_MASK | OFLAG_COMPRESSED) != 0 {
            return Err(Error::Unsupported {
                what: "compressed write over a cluster that holds data",
                value: offset,
            });
        }
        // Pack compressed data into the current compressed-data cluster while it fits.
        let at = m.w.compressed_at;
        let cl = at & !g.cs.wrapping_sub(1);
        let host = if at != 0 && at.saturating_add(n) <= cl.saturating_add(g.cs) {
            m.change_refcount(cl >> g.cluster_bits, true)?;
            at
        } else {
            m.alloc_clusters(1)?.0
        };
        let next = host.saturating_add(n);
        m.w.compressed_at = if next & g.cs.wrapping_sub(1) == 0 {
            0
        } else {
            next
        };
        m.check_overlap(host, n)?;
        m.write_dev(host, compressed)?;
        let d = CompressedDescriptor {
            offset: host,
            len: n,
        };
        m.l2_set(
            l2,
            index,
            L2Entry {
                word: OFLAG_COMPRESSED | d.encode(g.cluster_bits),
                bitmap: 0,
            },
        )?;
        self.decompressor.invalidate();
        self.end_write()
    }

    /// Writes back every cached metadata change in crash-safe order and flushes the device.
    pub fn flush(&mut self) -> Result<(), Error<D::Error>> {
        if !self.w.writable {
            return Ok(());
        }
        let mut m = self.meta()?;
        m.commit_frees()?;
        m.writeback_all()?;
        m.flush_dev()
    }

    /// Flushes, clears the dirty bit (lazy refcounts) and gives the device back.
    pub fn close(mut self) -> Result<D, Error<D::Error>> {
        self.finish()?;
        // Taken out in place: the backing images are dropped, the top one popped.
        self.layers.truncate(1);
        self.layers.pop().map(|l| l.dev).ok_or(Error::ReadOnly)
    }

    /// What [`Image::close`] writes: everything cached, then the cleared dirty bit.
    #[inline(never)]
    fn finish(&mut self) -> Result<(), Error<D::Error>> {
        if self.w.writable {
            self.flush()?;
            let mut m = self.meta()?;
            if m.w.dirty_bit {
                let bits = m.header.incompatible_features & !IncompatibleFeatures::DIRTY;
                m.write_header(HDR_INCOMPATIBLE, &bits.bits().to_be_bytes())?;
                m.header.incompatible_features = bits;
                m.w.dirty_bit = false;
            }
        }
        Ok(())
    }
}
