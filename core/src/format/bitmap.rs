//! Persistent dirty bitmaps on disk: the bitmaps header extension, the bitmap directory and its entries, and
//! bitmap table entries, with QEMU's limits (`block/qcow2-bitmap.c`, `block/qcow2.h`). Pure functions over
//! byte slices; [`DirectoryWalk`] is the walk over the directory that every reader uses (the engine's open,
//! the writer that keeps bitmaps up to date or disowns them, the check), as a state machine that does no I/O.
//!
//! The limits bound the work any reader does on a hostile image: at most [`MAX_BITMAPS`] entries in a
//! directory of at most [`MAX_DIRECTORY_SIZE`] bytes, and a bitmap table of at most
//! [`MAX_PHYS_SIZE`]` / cluster_size` entries.

use super::{be32, be64};

/// QEMU's `QCOW2_MAX_BITMAPS`.
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's `QCOW2_MAX_BITMAP_DIRECTORY_SIZE` (1024 bytes per bitmap).
pub const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// QEMU's `BME_MAX_TABLE_SIZE`: entries of one bitmap table.
pub const MAX_TABLE_SIZE: u32 = 0x800_0000;
/// QEMU's `BME_MAX_PHYS_SIZE`: bytes of bitmap data (table entries times cluster size) of one bitmap.
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// QEMU's `BME_MAX_GRANULARITY_BITS`.
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// QEMU's `BME_MIN_GRANULARITY_BITS`.
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// QEMU's `BME_MAX_NAME_SIZE`.
pub const MAX_NAME_SIZE: u16 = 1023;
/// Bitmap flag: the bitmap was in use (not saved consistently).
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Bitmap flag: the bitmap tracks writes automatically.
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flags no version of the format defines.
pub const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);
/// The only bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Reserved bits of a bitmap table entry.
pub const TABLE_ENTRY_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Host offset bits of a bitmap table entry.
pub const TABLE_ENTRY_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry flag: the cluster reads as all ones (only without an offset).
pub const TABLE_ENTRY_ALL_ONES: u64 = 1;
/// Length of the fixed part of a directory entry.
pub const DIR_ENTRY_LEN: usize = 24;

/// The bitmaps header extension's fields, validated as QEMU's `qcow2_read_extensions` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BitmapsExtension {
    /// Number of bitmaps (1..=[`MAX_BITMAPS`]).
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes (at most [`MAX_DIRECTORY_SIZE`]).
    pub directory_size: u64,
    /// Host offset of the bitmap directory (cluster aligned).
    pub directory_offset: u64,
    /// Host offset of the extension's own 8-byte header (in the first cluster).
    pub extension_at: u64,
}

/// Why a bitmaps extension, directory or entry is refused (QEMU's message, without names or numbers).
pub type BitmapProblem = &'static str;

impl BitmapsExtension {
    /// Length of the extension's data.
    pub const LEN: u32 = 24;

    /// Decodes and validates the extension's data (`data`, found at `extension_at`).
    pub fn parse(
        data: &[u8; 24],
        cluster_size: u64,
        extension_at: u64,
    ) -> Result<BitmapsExtension, (BitmapProblem, u64)> {
        let nb_bitmaps = be32(data, 0);
        let reserved = be32(data, 4);
        let directory_size = be64(data, 8);
        let directory_offset = be64(data, 16);
        if reserved != 0 {
            return Err((
                "bitmaps extension: reserved field is not zero",
                reserved.into(),
            ));
        }
        if nb_bitmaps > MAX_BITMAPS {
            return Err((
                "bitmaps extension: more bitmaps than the supported maximum of 65535",
                nb_bitmaps.into(),
            ));
        }
        if nb_bitmaps == 0 {
            return Err(("found bitmaps extension with zero bitmaps", 0));
        }
        if directory_offset & cluster_size.wrapping_sub(1) != 0 {
            return Err((
                "bitmaps extension: invalid bitmap directory offset",
                directory_offset,
            ));
        }
        if directory_size > MAX_DIRECTORY_SIZE {
            return Err((
                "bitmaps extension: bitmap directory size exceeds the supported maximum",
                directory_size,
            ));
        }
        if directory_size == 0 {
            return Err(("requested bitmap directory size is zero", 0));
        }
        Ok(BitmapsExtension {
            nb_bitmaps,
            directory_size,
            directory_offset,
            extension_at,
        })
    }

    /// The extension's data as stored.
    pub fn emit(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        let (count, rest) = out.split_at_mut_checked(4).unwrap_or_default();
        let (_reserved, rest) = rest.split_at_mut_checked(4).unwrap_or_default();
        let (size, offset) = rest.split_at_mut_checked(8).unwrap_or_default();
        let _ = super::copy_exact(count, &self.nb_bitmaps.to_be_bytes());
        let _ = super::copy_exact(size, &self.directory_size.to_be_bytes());
        let _ = super::copy_exact(offset, &self.directory_offset.to_be_bytes());
        out
    }
}

/// The fixed part of one bitmap directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BitmapDirEntry {
    /// Host offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flags ([`FLAG_IN_USE`], [`FLAG_AUTO`]).
    pub flags: u32,
    /// Bitmap type ([`TYPE_DIRTY_TRACKING`]).
    pub kind: u8,
    /// log2 of the bytes of guest disk one bit covers.
    pub granularity_bits: u8,
    /// Length of the name that follows the extra data.
    pub name_size: u16,
    /// Length of the extra data that follows the fixed part.
    pub extra_data_size: u32,
}

impl BitmapDirEntry {
    /// Decodes the fixed part of an entry.
    pub fn parse(e: &[u8; DIR_ENTRY_LEN]) -> BitmapDirEntry {
        let [.., kind, granularity_bits, n0, n1, _, _, _, _] = *e;
        BitmapDirEntry {
            table_offset: be64(e, 0),
            table_size: be32(e, 8),
            flags: be32(e, 12),
            kind,
            granularity_bits,
            name_size: u16::from_be_bytes([n0, n1]),
            extra_data_size: be32(e, 20),
        }
    }

    /// Bytes the whole entry takes in the directory (padded to 8).
    pub fn entry_len(&self) -> u64 {
        (DIR_ENTRY_LEN as u64)
            .saturating_add(self.name_size.into())
            .saturating_add(self.extra_data_size.into())
            .next_multiple_of(8)
    }

    /// Bytes of the bitmap table.
    pub fn table_bytes(&self) -> u64 {
        u64::from(self.table_size).saturating_mul(8)
    }

    /// QEMU's `check_dir_entry` (and its refusal of extra data), for an image with clusters of `cluster_size`
    /// bytes and a virtual disk of `disk_size` bytes.
    pub fn validate(&self, cluster_size: u64, disk_size: u64) -> Result<(), BitmapProblem> {
        if self.extra_data_size != 0 {
            return Err("bitmap extra data is not supported");
        }
        let phys = u64::from(self.table_size).saturating_mul(cluster_size);
        let bad = self.table_size == 0
            || self.table_offset == 0
            || self.table_offset & cluster_size.wrapping_sub(1) != 0
            || self.table_size > MAX_TABLE_SIZE
            || self.granularity_bits > MAX_GRANULARITY_BITS
            || self.granularity_bits < MIN_GRANULARITY_BITS
            || self.flags & RESERVED_FLAGS != 0
            || self.name_size > MAX_NAME_SIZE
            || self.kind != TYPE_DIRTY_TRACKING
            || phys > MAX_PHYS_SIZE
            // A consistent bitmap's table must cover the whole disk (phys <= 2^29, so this cannot overflow).
            || (self.flags & FLAG_IN_USE == 0
                && disk_size > phys.saturating_mul(8) << self.granularity_bits);
        if bad {
            return Err("bitmap doesn't satisfy the constraints");
        }
        // QEMU loads a consistent bitmap's data when it opens the image, and refuses a table whose size is not
        // exactly what the disk needs (`load_bitmap_data`).
        if self.flags & FLAG_IN_USE == 0
            && u64::from(self.table_size) != self.table_size_for(cluster_size, disk_size)
        {
            return Err("bitmap table size does not match the disk size");
        }
        Ok(())
    }

    /// Entries a bitmap table needs for a disk of `disk_size` bytes at this entry's granularity.
    pub fn table_size_for(&self, cluster_size: u64, disk_size: u64) -> u64 {
        let bits = disk_size.div_ceil(1u64 << (self.granularity_bits & 63));
        bits.div_ceil(8).div_ceil(cluster_size.max(1))
    }
}

/// A bitmap table entry, as QEMU's `check_table_entry` reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BitmapTableEntry {
    /// No cluster: the bitmap's bits there are all zeros (or all ones, with flag bit 0).
    Unallocated,
    /// A cluster of bitmap data at this host offset.
    Data(u64),
    /// Reserved bits set, an unaligned offset, or an offset with the all-ones flag.
    Invalid,
}

impl BitmapTableEntry {
    /// Decodes `entry` of an image with clusters of `cluster_size` bytes.
    pub fn decode(entry: u64, cluster_size: u64) -> BitmapTableEntry {
        if entry & TABLE_ENTRY_RESERVED != 0 {
            return BitmapTableEntry::Invalid;
        }
        let offset = entry & TABLE_ENTRY_OFFSET;
        if offset == 0 {
            return BitmapTableEntry::Unallocated;
        }
        if entry & TABLE_ENTRY_ALL_ONES != 0 || offset & cluster_size.wrapping_sub(1) != 0 {
            return BitmapTableEntry::Invalid;
        }
        BitmapTableEntry::Data(offset)
    }
}

/// QEMU's `bitmap_list_load` as a walk over the directory: the caller reads the [`DIR_ENTRY_LEN`] bytes at
/// [`DirectoryWalk::next_at`] and hands them to [`DirectoryWalk::advance`], which validates the entry; after
/// the last one [`DirectoryWalk::finish`] checks that the directory held exactly the extension's count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DirectoryWalk {
    at: u64,
    end: u64,
    seen: u32,
    nb_bitmaps: u32,
    cluster_size: u64,
    disk_size: u64,
}

/// One validated directory entry and where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DirEntryAt {
    /// Host offset of the entry.
    pub at: u64,
    /// The entry.
    pub entry: BitmapDirEntry,
}

impl DirectoryWalk {
    /// The walk over the directory the extension `ext` names, of an image with clusters of `cluster_size`
    /// bytes and a virtual disk of `disk_size` bytes.
    pub fn new(ext: &BitmapsExtension, cluster_size: u64, disk_size: u64) -> DirectoryWalk {
        DirectoryWalk {
            at: ext.directory_offset,
            end: ext.directory_offset.saturating_add(ext.directory_size),
            seen: 0,
            nb_bitmaps: ext.nb_bitmaps,
            cluster_size,
            disk_size,
        }
    }

    /// Host offset of the next entry to read, `None` after the last one.
    pub fn next_at(&self) -> Option<u64> {
        (self.at < self.end).then_some(self.at)
    }

    /// Validates the entry read at [`DirectoryWalk::next_at`]. The error carries QEMU's reason and the
    /// entry's offset.
    pub fn advance(
        &mut self,
        raw: &[u8; DIR_ENTRY_LEN],
    ) -> Result<DirEntryAt, (BitmapProblem, u64)> {
        let at = self.at;
        if at.saturating_add(DIR_ENTRY_LEN as u64) > self.end {
            return Err(("broken bitmap directory", at));
        }
        self.seen = self.seen.saturating_add(1);
        if self.seen > self.nb_bitmaps {
            return Err(("more bitmaps found than specified in header extension", at));
        }
        let entry = BitmapDirEntry::parse(raw);
        let next = at.saturating_add(entry.entry_len());
        if next > self.end {
            return Err(("broken bitmap directory", at));
        }
        entry
            .validate(self.cluster_size, self.disk_size)
            .map_err(|p| (p, at))?;
        self.at = next;
        Ok(DirEntryAt { at, entry })
    }

    /// After the last entry: the directory held as many entries as the extension says.
    pub fn finish(&self) -> Result<(), (BitmapProblem, u64)> {
        if self.seen != self.nb_bitmaps {
            return Err((
                "less bitmaps found than specified in header extension",
                self.at,
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(table_offset: u64, table_size: u32, flags: u32, gran: u8, name: u16) -> [u8; 24] {
        let mut e = [0u8; 24];
        e[..8].copy_from_slice(&table_offset.to_be_bytes());
        e[8..12].copy_from_slice(&table_size.to_be_bytes());
        e[12..16].copy_from_slice(&flags.to_be_bytes());
        e[16] = TYPE_DIRTY_TRACKING;
        e[17] = gran;
        e[18..20].copy_from_slice(&name.to_be_bytes());
        e
    }

    #[test]
    fn qemu_constraints() {
        let cs = 65536;
        let disk = 1 << 30;
        let ok = BitmapDirEntry::parse(&entry(cs, 1, 0, 16, 2));
        assert_eq!(ok.validate(cs, disk), Ok(()));
        assert_eq!(ok.entry_len(), 32);
        // A table too small (or too large) for the disk, unless the bitmap is in use.
        let small = BitmapDirEntry::parse(&entry(cs, 1, 0, 9, 2));
        assert!(small.validate(cs, disk).is_err());
        let large = BitmapDirEntry::parse(&entry(cs, 2, 0, 16, 2));
        assert!(large.validate(cs, disk).is_err());
        let large = BitmapDirEntry::parse(&entry(cs, 2, FLAG_IN_USE, 16, 2));
        assert_eq!(large.validate(cs, disk), Ok(()));
        let small = BitmapDirEntry::parse(&entry(cs, 1, FLAG_IN_USE, 9, 2));
        assert_eq!(small.validate(cs, disk), Ok(()));
        // A table larger than 512 MiB of bitmap data.
        let huge = BitmapDirEntry::parse(&entry(cs, 8193, 0, 16, 2));
        assert!(huge.validate(cs, disk).is_err());
        for bad in [
            entry(0, 1, 0, 16, 2),
            entry(cs + 512, 1, 0, 16, 2),
            entry(cs, 0, 0, 16, 2),
            entry(cs, 1, 4, 16, 2),
            entry(cs, 1, 0, 8, 2),
            entry(cs, 1, 0, 32, 2),
            entry(cs, 1, 0, 16, 1024),
        ] {
            assert!(BitmapDirEntry::parse(&bad).validate(cs, disk).is_err());
        }
    }

    #[test]
    fn directory_counts() {
        let cs = 65536;
        let mut ext = [0u8; 24];
        ext[..4].copy_from_slice(&2u32.to_be_bytes());
        ext[8..16].copy_from_slice(&64u64.to_be_bytes());
        ext[16..].copy_from_slice(&(cs * 3u64).to_be_bytes());
        let ext = BitmapsExtension::parse(&ext, cs, 0).unwrap_or_else(|_| unreachable!());
        let mut walk = DirectoryWalk::new(&ext, cs, 1 << 20);
        let e = entry(cs, 1, 0, 16, 2);
        assert!(walk.advance(&e).is_ok());
        assert!(walk.finish().is_err());
        assert!(walk.advance(&e).is_ok());
        assert_eq!(walk.next_at(), None);
        assert!(walk.finish().is_ok());
        assert!(walk.advance(&e).is_err());
    }

    #[test]
    fn extension_limits() {
        let mut ext = [0u8; 24];
        ext[..4].copy_from_slice(&65536u32.to_be_bytes());
        ext[8..16].copy_from_slice(&64u64.to_be_bytes());
        assert!(BitmapsExtension::parse(&ext, 512, 0).is_err());
        ext[..4].copy_from_slice(&1u32.to_be_bytes());
        assert!(BitmapsExtension::parse(&ext, 512, 0).is_ok());
        ext[8..16].copy_from_slice(&(MAX_DIRECTORY_SIZE + 1).to_be_bytes());
        assert!(BitmapsExtension::parse(&ext, 512, 0).is_err());
    }
}
