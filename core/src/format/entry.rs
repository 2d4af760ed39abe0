//! L1, L2 and refcount table entries, and compressed cluster descriptors.

use super::{MAX_HOST_OFFSET, SUBCLUSTERS};

/// COPIED flag (bit 63) of L1 and standard L2 entries: the refcount is exactly 1.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Compressed flag (bit 62) of L2 entries.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Zero flag (bit 0) of standard L2 entries (version 3 only).
pub const OFLAG_ZERO: u64 = 1;
/// Host offset bits of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of L1 entries.
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of standard (uncompressed) L2 entries.
pub const L2_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Host offset bits of refcount table entries.
pub const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Reserved bits of refcount table entries.
pub const REFTABLE_RESERVED_MASK: u64 = 0x1ff;

/// Why an entry is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum EntryError {
    /// Reserved bits are set.
    ReservedBits,
    /// The host offset is not cluster-aligned.
    Unaligned,
    /// The zero flag in a version 2 image.
    ZeroFlagInV2,
    /// A subcluster is marked both allocated and zero, or allocated in an unallocated cluster.
    InvalidBitmap,
    /// A compressed entry in an image whose data lives in an external file, or with a non-zero bitmap.
    InvalidCompressed,
}

impl EntryError {
    /// What is wrong, in the specification's words.
    pub fn describe(self, table: &'static str) -> &'static str {
        match (self, table) {
            (EntryError::ReservedBits, "refcount table") => {
                "refcount table entry has reserved bits set"
            }
            (EntryError::Unaligned, "refcount table") => {
                "refcount block offset is not cluster-aligned"
            }
            (EntryError::ReservedBits, "L1") => "L1 entry has reserved bits set",
            (EntryError::Unaligned, "L1") => "L2 table offset in L1 entry is not cluster-aligned",
            (EntryError::ReservedBits, _) => "L2 entry has reserved bits set",
            (EntryError::Unaligned, _) => "L2 entry's host cluster offset is not cluster-aligned",
            (EntryError::ZeroFlagInV2, _) => "L2 entry has the zero flag in a version 2 image",
            (EntryError::InvalidBitmap, _) => "extended L2 entry has an invalid subcluster bitmap",
            (EntryError::InvalidCompressed, _) => "invalid compressed L2 entry",
        }
    }
}

/// One refcount table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RefcountTableEntry(pub u64);

impl RefcountTableEntry {
    /// Host offset of the refcount block, or `None` where no block is allocated. Checks reserved bits and
    /// alignment against `cluster_size`.
    pub fn block_offset(self, cluster_size: u64) -> Result<Option<u64>, EntryError> {
        if self.0 & REFTABLE_RESERVED_MASK != 0 {
            return Err(EntryError::ReservedBits);
        }
        let off = self.0 & REFTABLE_OFFSET_MASK;
        if off & cluster_size.wrapping_sub(1) != 0 {
            return Err(EntryError::Unaligned);
        }
        Ok((off != 0).then_some(off))
    }
}

/// One L1 table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// Host offset of the L2 table, or `None` if the L2 table is unallocated. Checks reserved bits and
    /// alignment against `cluster_size`.
    pub fn l2_offset(self, cluster_size: u64) -> Result<Option<u64>, EntryError> {
        if self.0 & L1_RESERVED_MASK != 0 {
            return Err(EntryError::ReservedBits);
        }
        let off = self.0 & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if off & cluster_size.wrapping_sub(1) != 0 {
            return Err(EntryError::Unaligned);
        }
        Ok(Some(off))
    }

    /// The COPIED flag.
    pub fn copied(self) -> bool {
        self.0 & OFLAG_COPIED != 0
    }
}

/// What a (sub)cluster of guest space is, as its L2 entry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ClusterKind {
    /// Not allocated in this image: read from the backing file, or zeros without one.
    Unallocated,
    /// Reads as zeros. `host` is the preallocated host cluster, if any.
    Zero {
        /// Preallocated host offset (of the whole cluster), if any.
        host: Option<u64>,
    },
    /// Data at host offset `host` (of the whole cluster).
    Data {
        /// Host offset of the cluster.
        host: u64,
    },
    /// A compressed cluster.
    Compressed(CompressedDescriptor),
}

/// Per-image facts that decoding an L2 entry needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct L2Format {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Version 3 (the zero flag exists).
    pub v3: bool,
    /// Extended L2 entries.
    pub extended: bool,
    /// Guest data lives in an external data file (host offset 0 is valid, compression is not).
    pub external_data: bool,
}

/// A decoded L2 entry (the standard word, and the subcluster bitmap with extended L2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct L2Entry {
    /// The standard 64-bit word.
    pub word: u64,
    /// The subcluster bitmap (0 without extended L2).
    pub bitmap: u64,
}

impl L2Entry {
    /// The COPIED flag.
    pub fn copied(self) -> bool {
        self.word & OFLAG_COPIED != 0
    }

    /// QEMU's cluster type of the entry (`qcow2_get_cluster_type`), from its flags and offset alone, without
    /// the validation of [`L2Entry::classify`]: compressed, zero (preallocated when the offset is not 0,
    /// without extended L2 only), data (an offset, or with an external data file offset 0 and COPIED), or
    /// unallocated. `qemu-img check` counts references by this type, and reports what is invalid itself.
    pub fn kind(self, f: L2Format) -> ClusterKind {
        let host = self.word & OFFSET_MASK;
        if self.word & OFLAG_COMPRESSED != 0 {
            ClusterKind::Compressed(CompressedDescriptor::decode_unclamped(
                self.word,
                f.cluster_bits,
            ))
        } else if self.word & OFLAG_ZERO != 0 && !f.extended {
            ClusterKind::Zero {
                host: (host != 0).then_some(host),
            }
        } else if host == 0 && !(f.external_data && self.copied()) {
            ClusterKind::Unallocated
        } else {
            ClusterKind::Data { host }
        }
    }

    /// Classifies the whole cluster (for standard L2) or, with extended L2, the cluster before looking at
    /// subclusters: [`ClusterKind::Data`] then means "the host cluster", and [`L2Entry::subcluster`] says which
    /// subclusters of it are allocated.
    pub fn classify(self, f: L2Format) -> Result<ClusterKind, EntryError> {
        let cluster_size = 1u64 << (f.cluster_bits & 63);
        if self.word & OFLAG_COMPRESSED != 0 {
            if f.external_data || (f.extended && self.bitmap != 0) {
                return Err(EntryError::InvalidCompressed);
            }
            return Ok(ClusterKind::Compressed(CompressedDescriptor::decode(
                self.word,
                f.cluster_bits,
            )));
        }
        if self.word & L2_RESERVED_MASK != 0 {
            return Err(EntryError::ReservedBits);
        }
        let host = self.word & OFFSET_MASK;
        if host & cluster_size.wrapping_sub(1) != 0 {
            return Err(EntryError::Unaligned);
        }
        let zero = self.word & OFLAG_ZERO != 0;
        if f.extended {
            // With extended L2 the zero flag is reserved: zeroes live in the bitmap.
            if zero {
                return Err(EntryError::ReservedBits);
            }
            let alloc = (self.bitmap & 0xffff_ffff) as u32;
            let zeros = (self.bitmap >> 32) as u32;
            if alloc & zeros != 0 {
                return Err(EntryError::InvalidBitmap);
            }
            let allocated_cluster = host != 0 || (f.external_data && self.copied());
            if !allocated_cluster {
                if alloc != 0 {
                    return Err(EntryError::InvalidBitmap);
                }
                return Ok(ClusterKind::Unallocated);
            }
            return Ok(ClusterKind::Data { host });
        }
        if zero {
            if !f.v3 {
                return Err(EntryError::ZeroFlagInV2);
            }
            let prealloc = host != 0 || (f.external_data && self.copied());
            return Ok(ClusterKind::Zero {
                host: prealloc.then_some(host),
            });
        }
        if host == 0 && !(f.external_data && self.copied()) {
            return Ok(ClusterKind::Unallocated);
        }
        Ok(ClusterKind::Data { host })
    }

    /// With extended L2: the state of subcluster `index` (0..32) of a cluster whose [`L2Entry::classify`]
    /// result is `kind`.
    pub fn subcluster(self, kind: ClusterKind, index: u32) -> ClusterKind {
        let bit = 1u64 << (index % SUBCLUSTERS);
        match kind {
            ClusterKind::Data { host } | ClusterKind::Zero { host: Some(host) } => {
                if self.bitmap & bit != 0 {
                    ClusterKind::Data { host }
                } else if (self.bitmap >> 32) & bit != 0 {
                    ClusterKind::Zero { host: Some(host) }
                } else {
                    ClusterKind::Unallocated
                }
            }
            ClusterKind::Unallocated | ClusterKind::Zero { host: None } => {
                if (self.bitmap >> 32) & bit != 0 {
                    ClusterKind::Zero { host: None }
                } else {
                    ClusterKind::Unallocated
                }
            }
            ClusterKind::Compressed(_) => kind,
        }
    }
}

/// Where a compressed cluster's data sits on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CompressedDescriptor {
    /// Host byte offset of the compressed data (not aligned).
    pub offset: u64,
    /// Upper bound of the compressed data's length in bytes (to the end of its last 512-byte sector).
    pub len: u64,
}

impl CompressedDescriptor {
    /// Decodes the descriptor bits of a compressed L2 entry for an image with `cluster_bits`.
    pub fn decode(word: u64, cluster_bits: u32) -> CompressedDescriptor {
        let d = CompressedDescriptor::decode_unclamped(word, cluster_bits);
        CompressedDescriptor {
            offset: d.offset & MAX_HOST_OFFSET,
            len: d.len,
        }
    }

    /// [`CompressedDescriptor::decode`] as QEMU's `qcow2_parse_compressed_l2_entry` does it: the offset is the
    /// whole offset field, also the bits above [`MAX_HOST_OFFSET`] that small clusters leave in it.
    pub fn decode_unclamped(word: u64, cluster_bits: u32) -> CompressedDescriptor {
        // x = 62 - (cluster_bits - 8): the offset field's width.
        let x = 70u32.saturating_sub(cluster_bits).min(62);
        let offset = word & (1u64 << x).wrapping_sub(1);
        let sectors = ((word & !(OFLAG_COPIED | OFLAG_COMPRESSED)) >> x).saturating_add(1);
        let len = sectors.saturating_mul(512).saturating_sub(offset & 511);
        CompressedDescriptor { offset, len }
    }

    /// Encodes the descriptor for a compressed L2 entry (without the compressed flag).
    pub fn encode(self, cluster_bits: u32) -> u64 {
        let x = 70u32.saturating_sub(cluster_bits).min(62);
        let end = self.offset.saturating_add(self.len);
        let sectors = end.div_ceil(512).saturating_sub(self.offset / 512);
        (self.offset & (1u64 << x).wrapping_sub(1)) | (sectors.saturating_sub(1) << x)
    }
}

/// Where the refcount of host cluster `cluster` lives: (index of the refcount table entry naming its refcount
/// block, index of the refcount in that block), for refcount blocks of `1 << refcount_block_bits` entries
/// ([`super::Header::refcount_block_bits`]).
pub fn refcount_location(cluster: u64, refcount_block_bits: u32) -> (u64, u64) {
    let bits = refcount_block_bits & 63;
    (cluster >> bits, cluster & (1u64 << bits).wrapping_sub(1))
}

/// Where refcount `index` of a refcount block lies when the block is read in slices of `slice_len` bytes
/// (a power of two): (byte offset of its slice in the block, index of the refcount in the slice), for
/// refcounts of `1 << refcount_order` bits.
pub fn refcount_slice_position(index: u64, refcount_order: u32, slice_len: u64) -> (u64, usize) {
    let order = refcount_order & 63;
    let bit = index << order;
    let slice_bits = slice_len.saturating_mul(8);
    let start = (bit & !slice_bits.wrapping_sub(1)) >> 3;
    let in_slice = index & (slice_bits >> order).wrapping_sub(1);
    (start, in_slice as usize)
}

/// Reads refcount `index` of a refcount block slice with refcount width `1 << order` bits. `None` if `index`
/// is outside `block`.
pub fn refcount_get(block: &[u8], order: u32, index: usize) -> Option<u64> {
    match order {
        0..=2 => {
            // 8 >> order entries a byte, LSB first.
            let byte = *block.get(index >> 3u32.saturating_sub(order))?;
            let shift = (index & ((8usize >> order).wrapping_sub(1))) << order;
            let mask = (1u64 << (1u32 << order)).wrapping_sub(1);
            Some(u64::from(byte >> shift) & mask)
        }
        3..=6 => {
            let width = 1usize << (order & 7).saturating_sub(3);
            let start = index.checked_mul(width)?;
            let bytes = block.get(start..start.checked_add(width)?)?;
            Some(bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
        }
        _ => None,
    }
}

/// Writes refcount `index` of a refcount block slice. Returns `None` if `index` is outside `block` or
/// `value` does not fit the width.
pub fn refcount_set(block: &mut [u8], order: u32, index: usize, value: u64) -> Option<()> {
    match order {
        0..=2 => {
            let bits = 1u32 << order;
            if value >> bits != 0 {
                return None;
            }
            let byte = block.get_mut(index >> 3u32.saturating_sub(order))?;
            let shift = (index & ((8usize >> order).wrapping_sub(1))) << order;
            let mask = ((1u16 << bits).wrapping_sub(1) << shift) as u8;
            *byte = (*byte & !mask) | ((value as u8) << shift);
            Some(())
        }
        3..=6 => {
            let width = 1usize << (order & 7).saturating_sub(3);
            if width < 8 && value >> (width << 3) != 0 {
                return None;
            }
            let start = index.checked_mul(width)?;
            let bytes = block.get_mut(start..start.checked_add(width)?)?;
            let be = value.to_be_bytes();
            super::copy_exact(bytes, be.get(8usize.saturating_sub(width)..)?)
        }
        _ => None,
    }
}
