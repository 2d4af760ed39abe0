//! Persistent bitmaps edited as `qemu-img bitmap` edits them: added, removed, cleared, enabled, disabled and
//! merged, crash-safely and in bounded memory.
//!
//! - A bitmap is added or removed through a new directory: the new directory (and, for an addition, the new
//!   bitmap's empty table) is written to free clusters, one rewrite of the first cluster switches to it,
//!   and only then is the old directory (and what the removed bitmap owned) freed. After a crash the image
//!   has the old set of bitmaps or the new one, with at most leaked clusters.
//! - A bitmap whose bits change (cleared, merged into) is marked in use first, durably, as the bitmaps that
//!   writes keep up to date are (`write::bitmaps`): a crash leaves it in use, which QEMU never trusts; a
//!   clean close marks it consistent again. Enabling and disabling change its flags in place (one 4-byte
//!   field a sector holds whole).
//!
//! Refusals name QEMU's conditions through the `what` of [`Error::Unsupported`]: the `BITMAP_*` constants
//! below, which a tool maps to QEMU's messages.

use super::*;
use crate::engine::BitmapRef;
use crate::format::bitmap::TABLE_ENTRY_ALL_ONES;
use crate::format::bitmap::{
    FLAG_AUTO, FLAG_IN_USE, MAX_BITMAPS, MAX_DIRECTORY_SIZE, MAX_GRANULARITY_BITS, MAX_NAME_SIZE,
    MAX_PHYS_SIZE, MAX_TABLE_SIZE, MIN_GRANULARITY_BITS, TYPE_DIRTY_TRACKING,
};
use bitmaps::TRACKED_BITMAPS;
use header::Cluster0Change;

/// No bitmap has that name.
pub const BITMAP_NOT_FOUND: &str = "no persistent bitmap has that name";
/// A bitmap of that name exists already.
pub const BITMAP_EXISTS: &str = "a persistent bitmap of that name exists";
/// The bitmap is in use (inconsistent): only removing it is allowed.
pub const BITMAP_INCONSISTENT: &str = "the persistent bitmap is inconsistent (in use)";
/// Version 2 images cannot store persistent bitmaps.
pub const BITMAPS_NEED_V3: &str = "persistent bitmaps need a version 3 image (compat=1.1)";
/// The granularity is not a power of two from 512 bytes to 2 GiB.
pub const BITMAP_GRANULARITY: &str =
    "a bitmap granularity must be a power of 2 from 512 B to 2 GiB";
/// The name is empty or longer than 1023 bytes.
pub const BITMAP_NAME: &str = "a bitmap name must be 1 to 1023 bytes long";
/// The image has QEMU's maximum of bitmaps already.
pub const TOO_MANY_BITMAPS: &str = "the image has 65535 persistent bitmaps already";
/// The directory would exceed QEMU's limit.
pub const BITMAP_DIRECTORY_FULL: &str = "the bitmap directory would exceed QEMU's limit";
/// The bitmap's data would exceed QEMU's limit (a larger granularity is needed).
pub const BITMAP_TOO_BIG: &str = "the bitmap would take more space than QEMU allows";
/// Bits are changed only in the first [`TRACKED_BITMAPS`] bitmaps of a directory.
pub const BITMAP_PAST_LIMIT: &str = "changing the bits of a bitmap past the 64th of the directory";

/// A persistent bitmap to add ([`Image::add_bitmap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewBitmap<'a> {
    /// Its name (1 to 1023 bytes, unique in the image).
    pub name: &'a str,
    /// log2 of the guest bytes one bit covers (9 to 31).
    pub granularity_bits: u8,
    /// Whether writes set its bits from now on (QEMU's `auto` flag).
    pub enabled: bool,
}

fn refuse<E>(what: &'static str) -> Error<E> {
    Error::Unsupported { what, value: 0 }
}

/// Bit `index` of a held/tracked mask (none past [`TRACKED_BITMAPS`]).
fn mask_bit(index: u32) -> u64 {
    if index < TRACKED_BITMAPS {
        1u64.checked_shl(index).unwrap_or(0)
    } else {
        0
    }
}

/// The mask with bit `index` taken out and the bits above it moved down (that entry left the directory).
fn mask_without(mask: u64, index: u32) -> u64 {
    let below = mask_bit(index).wrapping_sub(1);
    let above = mask.checked_shr(index.saturating_add(1)).unwrap_or(0);
    (mask & below) | above.checked_shl(index).unwrap_or(0)
}

impl<D, B, C, const DEPTH: usize, const SLICES: usize> Image<D, B, C, DEPTH, SLICES, WriteState>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// Whether bitmap `r` is in use by someone else than this writer: inconsistent (a crash, or a program
    /// that had it open), so that its bits are not to be trusted or changed.
    pub fn bitmap_inconsistent(&self, r: &BitmapRef) -> bool {
        r.entry.flags & FLAG_IN_USE != 0 && self.w.bitmaps_held & mask_bit(r.index) == 0
    }

    /// The bitmap named `name`, or [`BITMAP_NOT_FOUND`].
    fn bitmap_named(&mut self, name: &str) -> Result<BitmapRef, Error<D::Error>> {
        self.find_bitmap(name.as_bytes())?
            .ok_or(refuse(BITMAP_NOT_FOUND))
    }

    /// Adds an empty persistent bitmap as `qemu-img bitmap --add` does, at the end of the directory.
    pub fn add_bitmap(&mut self, b: &NewBitmap<'_>) -> Result<(), Error<D::Error>> {
        let h = *self.meta()?.header;
        if h.version < 3 {
            return Err(refuse(BITMAPS_NEED_V3));
        }
        if b.name.is_empty() || b.name.len() > usize::from(MAX_NAME_SIZE) {
            return Err(refuse(BITMAP_NAME));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&b.granularity_bits) {
            return Err(refuse(BITMAP_GRANULARITY));
        }
        if self.find_bitmap(b.name.as_bytes())?.is_some() {
            return Err(refuse(BITMAP_EXISTS));
        }
        let cs = h.cluster_size();
        let name_len = b.name.len() as u64;
        let entry_len = (DIR_ENTRY_LEN as u64)
            .saturating_add(name_len)
            .next_multiple_of(8);
        let old = self.meta()?.live_bitmaps();
        let (count, old_size) = old.map_or((0, 0), |e| (e.nb_bitmaps, e.directory_size));
        if count >= MAX_BITMAPS {
            return Err(refuse(TOO_MANY_BITMAPS));
        }
        let new_size = old_size.saturating_add(entry_len);
        if new_size > MAX_DIRECTORY_SIZE {
            return Err(refuse(BITMAP_DIRECTORY_FULL));
        }
        let probe = BitmapDirEntry {
            table_offset: 0,
            table_size: 0,
            flags: 0,
            kind: TYPE_DIRTY_TRACKING,
            granularity_bits: b.granularity_bits,
            name_size: 0,
            extra_data_size: 0,
        };
        let table_size = probe.table_size_for(cs, h.size);
        if table_size > u64::from(MAX_TABLE_SIZE) || table_size.saturating_mul(cs) > MAX_PHYS_SIZE {
            return Err(refuse(BITMAP_TOO_BIG));
        }
        self.begin_write()?;
        let mut m = self.meta()?;
        // The empty table.
        let table_bytes = table_size.saturating_mul(8);
        let table = m.alloc_table_clusters(ceil_div(table_bytes, cs))?;
        m.note_table(table);
        m.write_zeros(table, ceil_div(table_bytes, cs).saturating_mul(cs))?;
        // The new directory: the old entries, then this one (held, when writes are to keep it up to date).
        let index = count;
        let mut flags = 0u32;
        if b.enabled {
            flags |= FLAG_AUTO;
            if mask_bit(index) != 0 {
                flags |= FLAG_IN_USE;
            }
        }
        let dir = m.alloc_table_clusters(ceil_div(new_size, cs))?;
        m.note_table(dir);
        m.write_zeros(dir, ceil_div(new_size, cs).saturating_mul(cs))?;
        if let Some(e) = old {
            m.copy_bytes(e.directory_offset, dir, e.directory_size)?;
        }
        let mut fixed = [0u8; DIR_ENTRY_LEN];
        {
            let (offset, rest) = fixed.split_at_mut_checked(8).unwrap_or_default();
            let _ = copy_exact(offset, &table.to_be_bytes());
            let (size, rest) = rest.split_at_mut_checked(4).unwrap_or_default();
            let _ = copy_exact(size, &(table_size as u32).to_be_bytes());
            let (f, rest) = rest.split_at_mut_checked(4).unwrap_or_default();
            let _ = copy_exact(f, &flags.to_be_bytes());
            let (kind, rest) = rest.split_at_mut_checked(2).unwrap_or_default();
            let _ = copy_exact(kind, &[TYPE_DIRTY_TRACKING, b.granularity_bits]);
            let (n, _extra) = rest.split_at_mut_checked(2).unwrap_or_default();
            let _ = copy_exact(n, &(b.name.len() as u16).to_be_bytes());
        }
        let at = dir.saturating_add(old_size);
        m.write_dev(at, &fixed)?;
        m.write_dev(at.saturating_add(DIR_ENTRY_LEN as u64), b.name.as_bytes())?;
        let new = BitmapsExtension {
            nb_bitmaps: count.saturating_add(1),
            directory_size: new_size,
            directory_offset: dir,
            extension_at: 0,
        };
        m.switch_directory(Some(new))?;
        if let Some(e) = old {
            m.free_range(e.directory_offset, e.directory_size)?;
        }
        if flags & FLAG_IN_USE != 0 {
            m.w.bitmaps_held |= mask_bit(index);
            m.w.bitmaps_tracked |= mask_bit(index);
        }
        self.reload_meta()?;
        self.end_write()
    }

    /// Removes the persistent bitmap `name` (an inconsistent one too) and frees what it owned.
    pub fn remove_bitmap(&mut self, name: &str) -> Result<(), Error<D::Error>> {
        let r = self.bitmap_named(name)?;
        self.begin_write()?;
        let mut m = self.meta()?;
        let old = m.live_bitmaps().ok_or(refuse(BITMAP_NOT_FOUND))?;
        m.writeback_all()?;
        let entry_len = r.entry.entry_len();
        let new_size = old.directory_size.saturating_sub(entry_len);
        let new = if old.nb_bitmaps <= 1 {
            None
        } else {
            let cs = m.g.tables.cluster_size;
            let dir = m.alloc_table_clusters(ceil_div(new_size, cs))?;
            m.note_table(dir);
            m.write_zeros(dir, ceil_div(new_size, cs).saturating_mul(cs))?;
            let before = r.entry_at.saturating_sub(old.directory_offset);
            m.copy_bytes(old.directory_offset, dir, before)?;
            m.copy_bytes(
                r.entry_at.saturating_add(entry_len),
                dir.saturating_add(before),
                new_size.saturating_sub(before),
            )?;
            Some(BitmapsExtension {
                nb_bitmaps: old.nb_bitmaps.saturating_sub(1),
                directory_size: new_size,
                directory_offset: dir,
                extension_at: 0,
            })
        };
        m.switch_directory(new)?;
        m.w.bitmaps_held = mask_without(m.w.bitmaps_held, r.index);
        m.w.bitmaps_tracked = mask_without(m.w.bitmaps_tracked, r.index);
        // What the bitmap owned, then the old directory.
        let cs = m.g.tables.cluster_size;
        let entries = u64::from(r.entry.table_size);
        let mut chunk = [0u8; guard::SCAN_CHUNK];
        let mut from = 0u64;
        while from < entries {
            let n = m.read_table_chunk(r.entry.table_offset, from, entries, &mut chunk)?;
            for k in 0..n {
                if let BitmapTableEntry::Data(host) =
                    BitmapTableEntry::decode(be64(&chunk, k.saturating_mul(8)), cs)
                {
                    m.free_owned(host)?;
                }
            }
            if n == 0 {
                break;
            }
            from = from.saturating_add(n as u64);
        }
        let table_clusters = ceil_div(r.entry.table_bytes(), cs);
        for c in 0..table_clusters {
            m.free_owned(r.entry.table_offset.saturating_add(c.saturating_mul(cs)))?;
        }
        m.free_range(old.directory_offset, old.directory_size)?;
        self.reload_meta()?;
        self.end_write()
    }

    /// Clears every bit of the persistent bitmap `name` (its data clusters freed).
    pub fn clear_bitmap(&mut self, name: &str) -> Result<(), Error<D::Error>> {
        let r = self.bitmap_named(name)?;
        self.begin_write()?;
        let mut m = self.meta()?;
        m.hold_bitmap(&r)?;
        let cs = m.g.tables.cluster_size;
        for t in 0..u64::from(r.entry.table_size) {
            let at = r.entry.table_offset.saturating_add(t.saturating_mul(8));
            let word = m.bitmap_word(at)?;
            if word == 0 {
                continue;
            }
            if let BitmapTableEntry::Data(host) = BitmapTableEntry::decode(word, cs) {
                m.free_later(host)?;
            }
            m.set_bitmap_word(at, 0)?;
        }
        self.end_write()
    }

    /// Enables (writes set its bits from now on) or disables the persistent bitmap `name`.
    pub fn set_bitmap_enabled(&mut self, name: &str, enabled: bool) -> Result<(), Error<D::Error>> {
        let r = self.bitmap_named(name)?;
        self.begin_write()?;
        let mut m = self.meta()?;
        let bit = mask_bit(r.index);
        let held = m.w.bitmaps_held & bit != 0;
        if r.entry.flags & FLAG_IN_USE != 0 && !held {
            return Err(refuse(BITMAP_INCONSISTENT));
        }
        if enabled && !held {
            // Enabled from now on: held, so that the writes of this session keep it up to date.
            m.hold_bitmap(&r)?;
        }
        let held = m.w.bitmaps_held & bit != 0;
        let mut flags = r.entry.flags & !(FLAG_AUTO | FLAG_IN_USE);
        if enabled {
            flags |= FLAG_AUTO;
        }
        if held {
            flags |= FLAG_IN_USE;
        }
        m.write_dev(r.entry_at.saturating_add(12), &flags.to_be_bytes())?;
        m.flush_dev()?;
        if enabled && held {
            m.w.bitmaps_tracked |= bit;
        } else {
            m.w.bitmaps_tracked &= !bit;
        }
        self.end_write()
    }

    /// Sets in the persistent bitmap `target` every bit that is set in `source` (of this image; the
    /// granularities may differ: every guest range `source` marks is marked in `target`).
    pub fn merge_bitmap(&mut self, target: &str, source: &str) -> Result<(), Error<D::Error>> {
        let t = self.bitmap_named(target)?;
        let s = self.bitmap_named(source)?;
        let held = self.meta()?.w.bitmaps_held & mask_bit(s.index) != 0;
        if s.entry.flags & FLAG_IN_USE != 0 && !held {
            return Err(refuse(BITMAP_INCONSISTENT));
        }
        self.begin_write()?;
        self.meta()?.hold_bitmap(&t)?;
        if t.index == s.index {
            return self.end_write();
        }
        let mut runs = [(0u64, 0u64); 16];
        let mut from = 0u64;
        loop {
            let n = self.bitmap_dirty_runs(&s, &mut from, &mut runs)?;
            if n == 0 {
                break;
            }
            let mut m = self.meta()?;
            for &(offset, len) in runs.get(..n).unwrap_or(&[]) {
                m.mark_bitmap(&t.entry, offset, len)?;
            }
            self.end_write()?;
        }
        self.end_write()
    }

    /// Resizes every persistent bitmap for a disk of `new_size` bytes (the disk is `old_size` now), as QEMU
    /// truncates its bitmaps when it resizes an image: bits past the new end cleared, the new area's bits
    /// clear, each table shortened in place or lengthened (in place where its clusters have room, else in
    /// new clusters). Every bitmap is marked in use first (the disabled ones too), so that a crash leaves them
    /// untrusted rather than wrong. Refused, with nothing changed, when a bitmap is inconsistent, past the
    /// 64th, or would outgrow QEMU's limits.
    ///
    /// With `apply` false, only checks. A failure while applying leaves the bitmaps in use (untrusted).
    pub(super) fn resize_bitmaps(
        &mut self,
        old_size: u64,
        new_size: u64,
        apply: bool,
    ) -> Result<(), Error<D::Error>> {
        let Some(b) = self.meta()?.live_bitmaps() else {
            return Ok(());
        };
        let cs = self.geometry()?.tables.cluster_size;
        let done = self.resize_bitmaps_in(&b, cs, old_size, new_size, apply);
        if done.is_err() && apply {
            // Whatever was resized stays in use: a clean close must not call those bitmaps consistent.
            self.w.bitmaps_held = 0;
            self.w.bitmaps_tracked = 0;
        }
        done
    }

    fn resize_bitmaps_in(
        &mut self,
        b: &BitmapsExtension,
        cs: u64,
        old_size: u64,
        new_size: u64,
        apply: bool,
    ) -> Result<(), Error<D::Error>> {
        for check in [true, false] {
            if !check && !apply {
                break;
            }
            let mut walk = DirectoryWalk::new(b, cs, old_size);
            let mut index = 0u32;
            while let Some(entry_at) = walk.next_at() {
                let Some(entry) = self.meta()?.bitmap_entry(&mut walk)? else {
                    break;
                };
                let r = BitmapRef {
                    index,
                    entry_at,
                    entry,
                };
                index = index.saturating_add(1);
                if check {
                    if self.bitmap_inconsistent(&r) {
                        return Err(refuse(BITMAP_INCONSISTENT));
                    }
                    if mask_bit(r.index) == 0 {
                        return Err(refuse(BITMAP_PAST_LIMIT));
                    }
                    let t = entry.table_size_for(cs, new_size);
                    if t > u64::from(MAX_TABLE_SIZE) || t.saturating_mul(cs) > MAX_PHYS_SIZE {
                        return Err(refuse(BITMAP_TOO_BIG));
                    }
                    continue;
                }
                let mut m = self.meta()?;
                m.hold_bitmap(&r)?;
                m.resize_bitmap(&r, old_size, new_size)?;
            }
        }
        Ok(())
    }

    /// Sets the bits of guest bytes `[offset, offset + len)` in the persistent bitmap `r` (found with
    /// [`Image::find_bitmap`] since the last change to the directory): for merging a bitmap of another
    /// image, whose dirty runs come from [`Image::bitmap_dirty_runs`] there.
    pub fn mark_bitmap(
        &mut self,
        r: &BitmapRef,
        offset: u64,
        len: u64,
    ) -> Result<(), Error<D::Error>> {
        self.begin_write()?;
        let mut m = self.meta()?;
        m.hold_bitmap(r)?;
        m.mark_bitmap(&r.entry, offset, len)?;
        self.end_write()
    }
}

impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// The bitmaps extension while it is live (its autoclear bit set).
    fn live_bitmaps(&self) -> Option<BitmapsExtension> {
        self.bitmaps.filter(|_| {
            self.header
                .autoclear_features
                .contains(AutoclearFeatures::BITMAPS)
        })
    }

    /// Marks bitmap `r` in use for this session (durably, before its bits change), unless this writer holds
    /// it already. Refused for a bitmap that is in use otherwise (inconsistent), past the first
    /// [`TRACKED_BITMAPS`], or whose table names clusters it does not own.
    fn hold_bitmap(&mut self, r: &BitmapRef) -> Result<(), Error<D::Error>> {
        let bit = mask_bit(r.index);
        if self.w.bitmaps_held & bit != 0 {
            return Ok(());
        }
        if r.entry.flags & FLAG_IN_USE != 0 {
            return Err(refuse(BITMAP_INCONSISTENT));
        }
        if bit == 0 {
            return Err(refuse(BITMAP_PAST_LIMIT));
        }
        self.writeback_all()?;
        if !self.bitmap_owns_its_data(&r.entry)? {
            return Err(corrupt(
                "a bitmap table names clusters the bitmap does not own",
                r.entry.table_offset,
            ));
        }
        let flags = r.entry.flags | FLAG_IN_USE;
        self.write_dev(r.entry_at.saturating_add(12), &flags.to_be_bytes())?;
        self.flush_dev()?;
        self.w.bitmaps_held |= bit;
        if r.entry.flags & FLAG_AUTO != 0 {
            self.w.bitmaps_tracked |= bit;
        }
        Ok(())
    }

    /// Resizes held bitmap `r` from a disk of `old_size` bytes to one of `new_size` ([`Image::resize_bitmaps`]).
    fn resize_bitmap(
        &mut self,
        r: &BitmapRef,
        old_size: u64,
        new_size: u64,
    ) -> Result<(), Error<D::Error>> {
        let cs = self.g.tables.cluster_size;
        let g = u32::from(r.entry.granularity_bits) & 63;
        let per_entry = cs.saturating_mul(8);
        let old_bits = old_size.div_ceil(1u64 << g);
        let new_bits = new_size.div_ceil(1u64 << g);
        let table = r.entry.table_offset;
        let old_t = u64::from(r.entry.table_size);
        let new_t = r.entry.table_size_for(cs, new_size);
        let old_clusters = ceil_div(old_t.saturating_mul(8), cs);
        let new_clusters = ceil_div(new_t.saturating_mul(8), cs);
        let word_at = |t: u64| table.saturating_add(t.saturating_mul(8));
        // The entry holding the last bit that stays: only bits below the end are kept (an "all ones" entry
        // becomes a data cluster with exactly those).
        let end_bits = old_bits.min(new_bits);
        let keep = end_bits.checked_rem(per_entry).unwrap_or(0);
        if keep != 0 {
            let t = end_bits.checked_div(per_entry).unwrap_or(0);
            self.truncate_entry(word_at(t), keep)?;
        }
        if new_t < old_t {
            for t in new_t..old_t {
                let word = self.bitmap_word(word_at(t))?;
                if let BitmapTableEntry::Data(host) = BitmapTableEntry::decode(word, cs) {
                    self.free_later(host)?;
                }
                if word != 0 {
                    self.set_bitmap_word(word_at(t), 0)?;
                }
            }
        }
        let mut moved = None;
        if new_t > old_t {
            if new_clusters <= old_clusters {
                for t in old_t..new_t {
                    self.set_bitmap_word(word_at(t), 0)?;
                }
            } else {
                self.writeback_all()?;
                let new_table = self.alloc_table_clusters(new_clusters)?;
                self.note_table(new_table);
                self.write_zeros(new_table, new_clusters.saturating_mul(cs))?;
                self.copy_bytes(table, new_table, old_t.saturating_mul(8))?;
                moved = Some(new_table);
            }
        }
        if new_t == old_t && moved.is_none() {
            return Ok(());
        }
        // The table is complete on disk before the entry names it; the offset goes before the size (the two
        // may lie in different sectors, and a longer size must never name a shorter table).
        self.writeback_all()?;
        self.flush_dev()?;
        if let Some(new_table) = moved {
            self.write_dev(r.entry_at, &new_table.to_be_bytes())?;
            self.flush_dev()?;
        }
        let size = u32::try_from(new_t).map_err(|_| refuse(BITMAP_TOO_BIG))?;
        self.write_dev(r.entry_at.saturating_add(8), &size.to_be_bytes())?;
        self.flush_dev()?;
        if moved.is_some() {
            self.free_range(table, old_clusters.saturating_mul(cs))?;
        } else if new_clusters < old_clusters {
            let from = table.saturating_add(new_clusters.saturating_mul(cs));
            self.free_range(
                from,
                old_clusters.saturating_sub(new_clusters).saturating_mul(cs),
            )?;
        }
        Ok(())
    }

    /// Keeps only bits `0..keep` of the bitmap table entry at `at`: a data cluster's later bits are cleared,
    /// an "all ones" entry becomes a data cluster with exactly those bits set.
    fn truncate_entry(&mut self, at: u64, keep: u64) -> Result<(), Error<D::Error>> {
        let cs = self.g.tables.cluster_size;
        let last = cs.saturating_mul(8).saturating_sub(1);
        let word = self.bitmap_word(at)?;
        if word == TABLE_ENTRY_ALL_ONES {
            let (host, _) = self.alloc_clusters(1)?;
            if host == 0 {
                return Err(corrupt("allocation of bitmap data at offset 0", 0));
            }
            self.guard(host, cs, false)?;
            self.write_zeros(host, cs)?;
            self.set_bitmap_bits(host, 0, keep.saturating_sub(1))?;
            return self.set_bitmap_word(at, host);
        }
        if let BitmapTableEntry::Data(host) = BitmapTableEntry::decode(word, cs) {
            self.change_bitmap_bits(host, keep, last, false)?;
        }
        Ok(())
    }

    /// Makes `new` the bitmap directory (`None`: no bitmaps) with one rewrite of the first cluster, after
    /// everything it names is durable.
    fn switch_directory(&mut self, new: Option<BitmapsExtension>) -> Result<(), Error<D::Error>> {
        self.writeback_all()?;
        self.flush_dev()?;
        let mut header = *self.header;
        if new.is_some() {
            header.autoclear_features |= AutoclearFeatures::BITMAPS;
        } else {
            header.autoclear_features.remove(AutoclearFeatures::BITMAPS);
        }
        self.rewrite_cluster0(
            &mut header,
            &Cluster0Change {
                bitmaps: Some(new),
                ..Cluster0Change::default()
            },
        )?;
        *self.header = header;
        self.bitmaps = new;
        Ok(())
    }
}
