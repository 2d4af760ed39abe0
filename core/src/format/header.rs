//! The qcow2 header (version 2 and 3): raw big-endian views, full validation, and re-encoding.

use static_assertions::const_assert_eq;
use zerocopy::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::FormatError;
use super::{
    AutoclearFeatures, CompatibleFeatures, CompressionType, IncompatibleFeatures, L2Format,
    MAX_BACKING_NAME_LEN, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFCOUNT_ORDER, MAX_REFTABLE_BYTES,
    MAX_SNAPSHOTS, MIN_CLUSTER_BITS, MIN_EXTENDED_L2_CLUSTER_BITS,
};

/// qcow2's magic, `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;

/// Length of the version 2 header; version 3 fields start here.
pub const V2_HEADER_LEN: usize = 72;
/// Length of the version 3 header without the compression type byte.
pub const V3_MIN_HEADER_LEN: usize = 104;
/// Length of the version 3 header that QEMU writes (with the compression type and its padding).
pub const V3_HEADER_LEN: usize = 112;
/// How many leading bytes of the image [`Header::parse`] wants (it accepts fewer only for version 2).
pub const HEADER_READ_LEN: usize = V3_HEADER_LEN;

/// The version 2 header, as it sits on disk.
#[allow(missing_docs)] // fields are named as in the qcow2 specification
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeaderV2 {
    pub magic: U32,
    pub version: U32,
    pub backing_file_offset: U64,
    pub backing_file_size: U32,
    pub cluster_bits: U32,
    pub size: U64,
    pub crypt_method: U32,
    pub l1_size: U32,
    pub l1_table_offset: U64,
    pub refcount_table_offset: U64,
    pub refcount_table_clusters: U32,
    pub nb_snapshots: U32,
    pub snapshots_offset: U64,
}

/// The fields version 3 adds after the version 2 header.
#[allow(missing_docs)] // fields are named as in the qcow2 specification
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeaderV3 {
    pub incompatible_features: U64,
    pub compatible_features: U64,
    pub autoclear_features: U64,
    pub refcount_order: U32,
    pub header_length: U32,
}

const_assert_eq!(core::mem::size_of::<RawHeaderV2>(), V2_HEADER_LEN);
const_assert_eq!(
    core::mem::size_of::<RawHeaderV3>(),
    V3_MIN_HEADER_LEN - V2_HEADER_LEN
);

/// Byte offsets of the header fields a writer changes in place (big-endian on disk).
pub mod field {
    use super::{RawHeaderV2, RawHeaderV3};
    use core::mem::{offset_of, size_of};

    /// `size` (8 bytes): the virtual disk size.
    pub const SIZE: u64 = offset_of!(RawHeaderV2, size) as u64;
    /// `l1_size` (4 bytes), followed by `l1_table_offset` (8 bytes).
    pub const L1_SIZE: u64 = offset_of!(RawHeaderV2, l1_size) as u64;
    /// `nb_snapshots` (4 bytes), followed by `snapshots_offset` (8 bytes).
    pub const NB_SNAPSHOTS: u64 = offset_of!(RawHeaderV2, nb_snapshots) as u64;
    /// `refcount_table_offset` (8 bytes), followed by `refcount_table_clusters` (4 bytes).
    pub const REFCOUNT_TABLE_OFFSET: u64 = offset_of!(RawHeaderV2, refcount_table_offset) as u64;
    /// `incompatible_features` (version 3).
    pub const INCOMPATIBLE_FEATURES: u64 =
        (size_of::<RawHeaderV2>() + offset_of!(RawHeaderV3, incompatible_features)) as u64;
    /// `compatible_features` (version 3).
    pub const COMPATIBLE_FEATURES: u64 =
        (size_of::<RawHeaderV2>() + offset_of!(RawHeaderV3, compatible_features)) as u64;
    /// `autoclear_features` (version 3).
    pub const AUTOCLEAR_FEATURES: u64 =
        (size_of::<RawHeaderV2>() + offset_of!(RawHeaderV3, autoclear_features)) as u64;
}

#[allow(missing_docs)] // fields are named as in the qcow2 specification
/// A parsed and validated header. Every value in it has been checked against the format's and QEMU's limits,
/// so the derived quantities below cannot overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: IncompatibleFeatures,
    pub compatible_features: CompatibleFeatures,
    pub autoclear_features: AutoclearFeatures,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
}

fn invalid(field: &'static str, value: u64, problem: &'static str) -> FormatError {
    FormatError::InvalidHeader {
        field,
        value,
        problem,
    }
}

/// Big-endian u32 at `at`, 0 if `b` is too short.
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at.saturating_add(4))
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_be_bytes)
}

/// Big-endian u64 at `at`, 0 if `b` is too short.
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at.saturating_add(8))
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map_or(0, u64::from_be_bytes)
}

/// Checks an internal snapshot's L1 table position and size as the active L1 table's are checked (QEMU
/// validates a snapshot's L1 table the same way before it reads through it).
pub fn validate_snapshot_l1(
    offset: u64,
    l1_size: u32,
    cluster_size: u64,
) -> Result<(), FormatError> {
    validate_table(
        "snapshot l1_table_offset",
        offset,
        l1_size.into(),
        8,
        MAX_L1_BYTES,
        cluster_size,
    )
}

/// Checks a table's offset and byte size as QEMU's `validate_table_offset` does, and more: the table must be
/// cluster-aligned, must not overflow, must not start in the header cluster.
fn validate_table(
    field: &'static str,
    offset: u64,
    entries: u64,
    entry_size: u64,
    max_bytes: u64,
    cluster_size: u64,
) -> Result<(), FormatError> {
    let bytes = entries.saturating_mul(entry_size);
    if bytes > max_bytes {
        return Err(invalid(field, entries, "table is larger than the limit"));
    }
    if entries == 0 {
        return Ok(());
    }
    if offset & cluster_size.wrapping_sub(1) != 0 {
        return Err(invalid(
            field,
            offset,
            "table offset is not cluster-aligned",
        ));
    }
    if offset == 0 {
        return Err(invalid(field, offset, "table overlaps the header"));
    }
    if offset
        .checked_add(bytes)
        .is_none_or(|end| end > super::MAX_HOST_OFFSET)
    {
        return Err(invalid(
            field,
            offset,
            "table ends past the largest host offset",
        ));
    }
    Ok(())
}

impl Header {
    /// Parses and validates the header from the image's first bytes (`bytes` should hold
    /// [`HEADER_READ_LEN`] bytes, or the whole image if it is shorter).
    ///
    /// Checks everything that can be checked without reading further: QEMU's limits at open and the
    /// specification's rules. Header extensions are walked separately ([`super::ExtensionWalk`]).
    pub fn parse(bytes: &[u8]) -> Result<Header, FormatError> {
        let magic = be32(bytes, 0);
        if magic != MAGIC || bytes.len() < 8 {
            return Err(FormatError::NotQcow2 { magic });
        }
        let version = be32(bytes, 4);
        if version != 2 && version != 3 {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let (v2, rest) = RawHeaderV2::read_from_prefix(bytes).map_err(|_| {
            invalid(
                "header_length",
                bytes.len() as u64,
                "image is shorter than its header",
            )
        })?;
        let mut h = Header {
            version,
            backing_file_offset: v2.backing_file_offset.get(),
            backing_file_size: v2.backing_file_size.get(),
            cluster_bits: v2.cluster_bits.get(),
            size: v2.size.get(),
            crypt_method: v2.crypt_method.get(),
            l1_size: v2.l1_size.get(),
            l1_table_offset: v2.l1_table_offset.get(),
            refcount_table_offset: v2.refcount_table_offset.get(),
            refcount_table_clusters: v2.refcount_table_clusters.get(),
            nb_snapshots: v2.nb_snapshots.get(),
            snapshots_offset: v2.snapshots_offset.get(),
            incompatible_features: IncompatibleFeatures::empty(),
            compatible_features: CompatibleFeatures::empty(),
            autoclear_features: AutoclearFeatures::empty(),
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression_type: CompressionType::Deflate,
        };
        if version == 3 {
            let (v3, rest) = RawHeaderV3::read_from_prefix(rest).map_err(|_| {
                invalid(
                    "header_length",
                    bytes.len() as u64,
                    "image is shorter than its header",
                )
            })?;
            h.incompatible_features =
                IncompatibleFeatures::from_bits_retain(v3.incompatible_features.get());
            h.compatible_features =
                CompatibleFeatures::from_bits_retain(v3.compatible_features.get());
            h.autoclear_features = AutoclearFeatures::from_bits_retain(v3.autoclear_features.get());
            h.refcount_order = v3.refcount_order.get();
            h.header_length = v3.header_length.get();
            if (h.header_length as usize) < V3_MIN_HEADER_LEN {
                return Err(invalid(
                    "header_length",
                    h.header_length.into(),
                    "shorter than 104 bytes",
                ));
            }
            if !h.header_length.is_multiple_of(8) {
                return Err(invalid(
                    "header_length",
                    h.header_length.into(),
                    "not a multiple of 8",
                ));
            }
            if h.header_length as usize > V3_MIN_HEADER_LEN {
                let ty = rest.first().copied().unwrap_or(0);
                h.compression_type = match ty {
                    0 => CompressionType::Deflate,
                    1 => CompressionType::Zstd,
                    other => {
                        return Err(invalid(
                            "compression_type",
                            other.into(),
                            "unknown compression type",
                        ));
                    }
                };
            }
        }
        h.validate()?;
        Ok(h)
    }

    fn validate(&self) -> Result<(), FormatError> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(invalid(
                "cluster_bits",
                self.cluster_bits.into(),
                "must be 9..=21",
            ));
        }
        let cluster_size = self.cluster_size();
        if u64::from(self.header_length) > cluster_size {
            return Err(invalid(
                "header_length",
                self.header_length.into(),
                "larger than a cluster",
            ));
        }
        if self.refcount_order > MAX_REFCOUNT_ORDER {
            return Err(invalid(
                "refcount_order",
                self.refcount_order.into(),
                "must be 0..=6",
            ));
        }
        // Encrypted images (1: AES-CBC, 2: LUKS) parse when the engine has the feature that opens them.
        match self.crypt_method {
            0 => {}
            1 if cfg!(feature = "aes-legacy") => {}
            2 if cfg!(feature = "luks") => {}
            1 => {
                return Err(FormatError::Unsupported {
                    what: "AES-CBC encryption (crypt_method)",
                    value: 1,
                });
            }
            2 => {
                return Err(FormatError::Unsupported {
                    what: "LUKS encryption (crypt_method)",
                    value: 2,
                });
            }
            m => {
                return Err(invalid(
                    "crypt_method",
                    m.into(),
                    "unknown encryption method",
                ));
            }
        }
        // Incompatible features: refuse what we do not know before anything else depends on them.
        if self
            .incompatible_features
            .contains(IncompatibleFeatures::COMPRESSION_TYPE)
            != (self.compression_type != CompressionType::Deflate)
        {
            return Err(invalid(
                "compression_type",
                self.compression_type as u64,
                "compression type bit does not match the compression_type field",
            ));
        }
        if self
            .incompatible_features
            .contains(IncompatibleFeatures::EXTENDED_L2)
            && self.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS
        {
            return Err(invalid(
                "cluster_bits",
                self.cluster_bits.into(),
                "extended L2 needs 16 KiB clusters or larger",
            ));
        }
        if self
            .autoclear_features
            .contains(AutoclearFeatures::DATA_FILE_RAW)
            && !self.external_data_file()
        {
            return Err(invalid(
                "autoclear_features",
                self.autoclear_features.bits(),
                "raw data file bit without an external data file",
            ));
        }
        if self
            .compatible_features
            .contains(CompatibleFeatures::LAZY_REFCOUNTS)
            && self.version < 3
        {
            return Err(invalid(
                "compatible_features",
                self.compatible_features.bits(),
                "lazy refcounts need version 3",
            ));
        }
        // Backing file name.
        if self.backing_file_offset != 0 {
            if self.backing_file_offset > cluster_size {
                return Err(invalid(
                    "backing_file_offset",
                    self.backing_file_offset,
                    "past the first cluster",
                ));
            }
            if self.backing_file_offset < u64::from(self.header_length) {
                return Err(invalid(
                    "backing_file_offset",
                    self.backing_file_offset,
                    "overlaps the header",
                ));
            }
            let room = cluster_size.saturating_sub(self.backing_file_offset);
            if self.backing_file_size as usize > MAX_BACKING_NAME_LEN
                || u64::from(self.backing_file_size) > room
            {
                return Err(invalid(
                    "backing_file_size",
                    self.backing_file_size.into(),
                    "backing file name too long",
                ));
            }
        } else if self.backing_file_size != 0 {
            return Err(invalid(
                "backing_file_size",
                self.backing_file_size.into(),
                "name length without an offset",
            ));
        }
        // Virtual size and the L1 table that must cover it.
        if self.size > i64::MAX as u64 {
            return Err(invalid("size", self.size, "virtual size too large"));
        }
        let needed =
            self.l1_entries_needed()
                .ok_or(invalid("size", self.size, "virtual size too large"))?;
        if needed > MAX_L1_BYTES / 8 {
            return Err(invalid(
                "size",
                self.size,
                "virtual size needs an L1 table past the 32 MiB limit",
            ));
        }
        if u64::from(self.l1_size) < needed {
            return Err(invalid(
                "l1_size",
                self.l1_size.into(),
                "L1 table is too small for the virtual size",
            ));
        }
        if u64::from(self.l1_size).saturating_mul(8) > MAX_L1_BYTES {
            return Err(invalid(
                "l1_size",
                self.l1_size.into(),
                "L1 table is larger than 32 MiB",
            ));
        }
        validate_table(
            "l1_table_offset",
            self.l1_table_offset,
            self.l1_size.into(),
            8,
            MAX_L1_BYTES,
            cluster_size,
        )?;
        if self.refcount_table_clusters == 0 {
            return Err(invalid(
                "refcount_table_clusters",
                0,
                "refcount table is empty",
            ));
        }
        validate_table(
            "refcount_table_offset",
            self.refcount_table_offset,
            self.refcount_table_clusters.into(),
            cluster_size,
            MAX_REFTABLE_BYTES,
            cluster_size,
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(invalid(
                "nb_snapshots",
                self.nb_snapshots.into(),
                "more than 65536 snapshots",
            ));
        }
        if self.nb_snapshots > 0 {
            // Each entry is at least 40 bytes; the table must at least fit below the largest host offset.
            validate_table(
                "snapshots_offset",
                self.snapshots_offset,
                self.nb_snapshots.into(),
                40,
                u64::MAX,
                cluster_size,
            )?;
        }
        Ok(())
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1u64 << (self.cluster_bits & 63)
    }

    /// Whether guest data lives in an external data file.
    pub fn external_data_file(&self) -> bool {
        self.incompatible_features
            .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE)
    }

    /// What decoding this image's L2 entries needs to know.
    pub fn l2_format(&self) -> L2Format {
        L2Format {
            cluster_bits: self.cluster_bits,
            v3: self.version >= 3,
            extended: self.extended_l2(),
            external_data: self.external_data_file(),
        }
    }

    /// Whether L2 entries are extended (16 bytes, with a subcluster bitmap).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features
            .contains(IncompatibleFeatures::EXTENDED_L2)
    }

    /// Bytes per L2 entry: 8, or 16 with extended L2.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() { 16 } else { 8 }
    }

    /// Number of entries in one L2 table (one cluster).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() >> if self.extended_l2() { 4 } else { 3 }
    }

    /// log2 of the bytes of guest space one L2 table maps.
    pub fn l2_coverage_bits(&self) -> u32 {
        let entry_bits = if self.extended_l2() { 4 } else { 3 };
        (self.cluster_bits & 63)
            .saturating_mul(2)
            .saturating_sub(entry_bits)
    }

    /// Bytes per subcluster (the cluster size without extended L2).
    pub fn subcluster_size(&self) -> u64 {
        if self.extended_l2() {
            self.cluster_size() / 32
        } else {
            self.cluster_size()
        }
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1u32 << (self.refcount_order & 7)
    }

    /// The largest refcount `refcount_bits` can hold.
    pub fn max_refcount(&self) -> u64 {
        if self.refcount_order >= 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.refcount_order)).wrapping_sub(1)
        }
    }

    /// log2 of the refcount entries in one refcount block.
    pub fn refcount_block_bits(&self) -> u32 {
        (self.cluster_bits & 63)
            .saturating_add(3)
            .saturating_sub(self.refcount_order)
    }

    /// Entries the refcount table holds (its clusters times 8-byte entries per cluster).
    pub fn refcount_table_entries(&self) -> u64 {
        u64::from(self.refcount_table_clusters) << (self.cluster_bits & 63).saturating_sub(3)
    }

    /// L1 entries needed to map the virtual size; `None` on overflow.
    pub fn l1_entries_needed(&self) -> Option<u64> {
        let bits = self.l2_coverage_bits();
        let span = 1u64.checked_shl(bits)?;
        Some(self.size.div_ceil(span))
    }

    /// Where the header extension area ends: at the backing file name if there is one, else at the end of the
    /// first cluster.
    pub fn extensions_end(&self) -> u64 {
        if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            self.cluster_size()
        }
    }

    /// Incompatible feature bits this engine does not know.
    pub fn unknown_incompatible(&self) -> u64 {
        self.incompatible_features.bits() & !IncompatibleFeatures::all().bits()
    }

    /// Writes the header's fixed part (72 bytes for version 2, [`Header::header_length`] capped at 112 for
    /// version 3) into `out`, returning the number of bytes written. Bytes 112.. of a longer header (unknown
    /// fields) are the caller's to keep.
    pub fn emit(&self, out: &mut [u8]) -> Option<usize> {
        let v2 = RawHeaderV2 {
            magic: MAGIC.into(),
            version: self.version.into(),
            backing_file_offset: self.backing_file_offset.into(),
            backing_file_size: self.backing_file_size.into(),
            cluster_bits: self.cluster_bits.into(),
            size: self.size.into(),
            crypt_method: self.crypt_method.into(),
            l1_size: self.l1_size.into(),
            l1_table_offset: self.l1_table_offset.into(),
            refcount_table_offset: self.refcount_table_offset.into(),
            refcount_table_clusters: self.refcount_table_clusters.into(),
            nb_snapshots: self.nb_snapshots.into(),
            snapshots_offset: self.snapshots_offset.into(),
        };
        out.get_mut(..V2_HEADER_LEN)?.copy_from_slice(v2.as_bytes());
        if self.version < 3 {
            return Some(V2_HEADER_LEN);
        }
        let v3 = RawHeaderV3 {
            incompatible_features: self.incompatible_features.bits().into(),
            compatible_features: self.compatible_features.bits().into(),
            autoclear_features: self.autoclear_features.bits().into(),
            refcount_order: self.refcount_order.into(),
            header_length: self.header_length.into(),
        };
        out.get_mut(V2_HEADER_LEN..V3_MIN_HEADER_LEN)?
            .copy_from_slice(v3.as_bytes());
        if (self.header_length as usize) <= V3_MIN_HEADER_LEN {
            return Some(V3_MIN_HEADER_LEN);
        }
        let tail = out.get_mut(V3_MIN_HEADER_LEN..V3_HEADER_LEN)?;
        tail.fill(0);
        *tail.first_mut()? = self.compression_type as u8;
        Some(V3_HEADER_LEN)
    }
}
