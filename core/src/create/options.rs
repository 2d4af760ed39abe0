//! What can be asked of [`create`](super::create): the options, their defaults, qemu-img's checks in its order
//! with its messages ([`OptionError`]), and the header that valid options give (its geometry is then
//! `format::Header`'s, derived in one place for every reader and writer).

use core::fmt;

use crate::Error;
use crate::format::{
    AutoclearFeatures, CompatibleFeatures, CompressionType, Header, IncompatibleFeatures,
    MAX_BACKING_FORMAT_LEN, MAX_BACKING_NAME_LEN, MAX_CLUSTER_BITS, MAX_L1_BYTES,
    MAX_REFCOUNT_ORDER, MIN_CLUSTER_BITS, MIN_EXTENDED_L2_CLUSTER_BITS, V3_HEADER_LEN,
};

use super::header_cluster::HeaderCluster;

/// The image's compatibility level (`compat=`): the header version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Compat {
    /// `0.10` (`v2`): version 2 header.
    V2,
    /// `1.1` (`v3`): version 3 header (the default).
    V3,
}

/// What `preallocation=` allocates when the image is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Preallocation {
    /// Nothing beyond the header, refcount structures and L1 table (the default).
    Off,
    /// L2 tables and data clusters are allocated; data is not written (the file is sparse).
    Metadata,
    /// Like `Full` in layout; the caller reserves the data area (`fallocate`) after [`super::create`] returns.
    Falloc,
    /// Like `Falloc`, and the data clusters are written with zeros.
    Full,
}

impl Preallocation {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

/// What to create; [`Default`] is what `qemu-img create -f qcow2 FILE 0` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateOptions<'a> {
    /// Virtual size in bytes (rounded up to 512 in the header, as QEMU does).
    pub size: u64,
    /// Cluster size in bytes: a power of two in 512..=2 MiB (default 64 KiB).
    pub cluster_size: u64,
    /// Header version (default [`Compat::V3`]).
    pub compat: Compat,
    /// Refcount width in bits: a power of two in 1..=64 (default 16; anything else needs version 3).
    pub refcount_bits: u32,
    /// Lazy refcounts (compatible bit 0; version 3 only).
    pub lazy_refcounts: bool,
    /// Extended L2 entries (subclusters; version 3 and clusters of at least 16 KiB).
    pub extended_l2: bool,
    /// Compression type for compressed clusters (zstd needs version 3).
    pub compression_type: CompressionType,
    /// What to allocate up front.
    pub preallocation: Preallocation,
    /// Backing file name, stored as given.
    pub backing_file: Option<&'a str>,
    /// Backing file format, stored in the backing format extension (needs a backing file).
    pub backing_fmt: Option<&'a str>,
    /// External data file name, stored in the data file extension (version 3).
    pub data_file: Option<&'a str>,
    /// The data file is a valid raw image (autoclear bit 1; needs a data file and no backing file).
    pub data_file_raw: bool,
}

impl Default for CreateOptions<'_> {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            compat: Compat::V3,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression_type: CompressionType::Deflate,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_fmt: None,
            data_file: None,
            data_file_raw: false,
        }
    }
}

/// Why a set of [`CreateOptions`] cannot be created; [`OptionError::message`] is qemu-img's wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum OptionError {
    /// The cluster size is not a power of two in 512..=2 MiB.
    ClusterSize,
    /// Extended L2 entries with clusters below 16 KiB.
    ExtendedL2ClusterSize,
    /// Lazy refcounts with version 2.
    LazyRefcountsNeedV3,
    /// Refcount width other than 16 with version 2.
    RefcountBitsNeedV3,
    /// Extended L2 entries with version 2.
    ExtendedL2NeedsV3,
    /// zstd compression with version 2.
    CompressionTypeNeedsV3,
    /// External data file with version 2.
    DataFileNeedsV3,
    /// Refcount width not a power of two in 1..=64.
    RefcountBits,
    /// `data_file_raw` without a data file.
    DataFileRawNeedsDataFile,
    /// `data_file_raw` with a backing file.
    BackingWithDataFileRaw,
    /// Backing format without a backing file.
    BackingFmtWithoutBackingFile,
    /// Preallocation with a backing file needs extended L2 entries.
    BackingWithPreallocation,
    /// The L1 table for this virtual size would exceed QEMU's 32 MiB limit.
    SizeTooLarge,
    /// The backing file name is longer than 1023 bytes.
    BackingNameTooLong,
    /// The backing format name is longer than 15 bytes.
    BackingFormatTooLong,
    /// Header, extensions and backing file name do not fit in the first cluster.
    HeaderTooLarge,
}

impl OptionError {
    /// The message qemu-img prints (after "qemu-img: FILE: ").
    pub fn message(self) -> &'static str {
        match self {
            OptionError::ClusterSize => "Cluster size must be a power of two between 512 and 2048k",
            OptionError::ExtendedL2ClusterSize => {
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
            }
            OptionError::LazyRefcountsNeedV3 => {
                "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"
            }
            OptionError::RefcountBitsNeedV3 => {
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"
            }
            OptionError::ExtendedL2NeedsV3 => {
                "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)"
            }
            OptionError::CompressionTypeNeedsV3 => {
                "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)"
            }
            OptionError::DataFileNeedsV3 => {
                "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)"
            }
            OptionError::RefcountBits => {
                "Refcount width must be a power of two and may not exceed 64 bits"
            }
            OptionError::DataFileRawNeedsDataFile => "data-file-raw requires data-file",
            OptionError::BackingWithDataFileRaw => {
                "Backing file and data-file-raw cannot be used at the same time"
            }
            OptionError::BackingFmtWithoutBackingFile => {
                "Backing format cannot be used without backing file"
            }
            OptionError::BackingWithPreallocation => {
                "Backing file and preallocation can only be used at the same time if extended_l2 is on"
            }
            OptionError::SizeTooLarge => {
                "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
            }
            OptionError::BackingNameTooLong => "Backing file name too long",
            OptionError::BackingFormatTooLong => "Backing format name too long",
            OptionError::HeaderTooLarge => "Header extensions do not fit in the first cluster",
        }
    }
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl OptionError {
    /// As the engine's error: an invalid header field named "create option" with this message.
    pub fn into_error<E>(self) -> Error<E> {
        let e = self;
        Error::InvalidHeader {
            field: "create option",
            value: 0,
            problem: e.message(),
        }
    }
}

impl<'a> CreateOptions<'a> {
    /// Checks the options the way `qemu-img create` does, in its order (the first problem wins).
    pub fn validate(&self) -> Result<(), OptionError> {
        self.header().map(|_| ())
    }

    fn v3(&self) -> bool {
        self.compat == Compat::V3
    }

    /// What cluster 0 holds besides the header's fixed part, and where.
    pub(super) fn header_cluster(&self) -> HeaderCluster<'a> {
        HeaderCluster::new(
            self.v3(),
            self.cluster_size,
            self.backing_file,
            self.backing_fmt,
            self.data_file,
        )
    }

    /// Checks the options as [`CreateOptions::validate`] does and returns the header they give: everything
    /// but the places of the L1 and refcount tables, which the allocation replay fills in.
    pub(super) fn header(&self) -> Result<Header, OptionError> {
        // In qemu-img's order (it matters when several options are wrong).
        let v2 = !self.v3();
        if self.extended_l2 && v2 {
            return Err(OptionError::ExtendedL2NeedsV3);
        }
        let cluster_size = self.cluster_size;
        if !cluster_size.is_power_of_two()
            || !(1u64 << MIN_CLUSTER_BITS..=1u64 << MAX_CLUSTER_BITS).contains(&cluster_size)
        {
            return Err(OptionError::ClusterSize);
        }
        let cluster_bits = cluster_size.trailing_zeros();
        if self.extended_l2 && cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(OptionError::ExtendedL2ClusterSize);
        }
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
            return Err(OptionError::BackingWithPreallocation);
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return Err(OptionError::BackingFmtWithoutBackingFile);
        }
        if self.lazy_refcounts && v2 {
            return Err(OptionError::LazyRefcountsNeedV3);
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(OptionError::RefcountBits);
        }
        let refcount_order = self.refcount_bits.trailing_zeros();
        if refcount_order > MAX_REFCOUNT_ORDER {
            return Err(OptionError::RefcountBits);
        }
        if self.refcount_bits != 16 && v2 {
            return Err(OptionError::RefcountBitsNeedV3);
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return Err(OptionError::BackingWithDataFileRaw);
        }
        if self.data_file.is_some() && v2 {
            return Err(OptionError::DataFileNeedsV3);
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(OptionError::DataFileRawNeedsDataFile);
        }
        if self.compression_type != CompressionType::Deflate && v2 {
            return Err(OptionError::CompressionTypeNeedsV3);
        }
        if self
            .backing_file
            .is_some_and(|b| b.len() > MAX_BACKING_NAME_LEN)
        {
            return Err(OptionError::BackingNameTooLong);
        }
        if self
            .backing_fmt
            .is_some_and(|f| f.len() > MAX_BACKING_FORMAT_LEN)
        {
            return Err(OptionError::BackingFormatTooLong);
        }
        let size = self
            .size
            .checked_next_multiple_of(512)
            .filter(|&s| s <= i64::MAX as u64)
            .ok_or(OptionError::SizeTooLarge)?;
        let mut incompatible_features = IncompatibleFeatures::empty();
        if self.data_file.is_some() {
            incompatible_features |= IncompatibleFeatures::EXTERNAL_DATA_FILE;
        }
        if self.compression_type != CompressionType::Deflate {
            incompatible_features |= IncompatibleFeatures::COMPRESSION_TYPE;
        }
        if self.extended_l2 {
            incompatible_features |= IncompatibleFeatures::EXTENDED_L2;
        }
        let mut compatible_features = CompatibleFeatures::empty();
        if self.lazy_refcounts {
            compatible_features |= CompatibleFeatures::LAZY_REFCOUNTS;
        }
        let mut autoclear_features = AutoclearFeatures::empty();
        if self.data_file_raw {
            autoclear_features |= AutoclearFeatures::DATA_FILE_RAW;
        }
        let mut header = Header {
            version: if v2 { 2 } else { 3 },
            backing_file_offset: 0,
            backing_file_size: self.backing_file.map_or(0, |name| name.len() as u32),
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features,
            compatible_features,
            autoclear_features,
            refcount_order,
            header_length: V3_HEADER_LEN as u32,
            compression_type: self.compression_type,
        };
        header.l1_size = header
            .l1_entries_needed()
            .filter(|&entries| entries <= MAX_L1_BYTES / 8)
            .and_then(|entries| u32::try_from(entries).ok())
            .ok_or(OptionError::SizeTooLarge)?;
        let header_cluster = self.header_cluster();
        if header_cluster.end > cluster_size {
            return Err(OptionError::HeaderTooLarge);
        }
        header.backing_file_offset = header_cluster.backing_file.map_or(0, |(at, _)| at);
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_matches_qemu_img() {
        let o = CreateOptions::default();
        assert_eq!(o.cluster_size, 65536);
        assert_eq!(o.refcount_bits, 16);
        assert_eq!(o.compat, Compat::V3);
        assert!(o.validate().is_ok());
    }

    #[test]
    fn validation_follows_qemu_img() {
        let bad = |o: CreateOptions<'static>| o.validate().unwrap_err();
        let d = CreateOptions::default();
        assert_eq!(
            bad(CreateOptions {
                cluster_size: 1000,
                ..d
            }),
            OptionError::ClusterSize
        );
        assert_eq!(
            bad(CreateOptions {
                cluster_size: 4 << 20,
                ..d
            }),
            OptionError::ClusterSize
        );
        assert_eq!(
            bad(CreateOptions {
                extended_l2: true,
                cluster_size: 8192,
                ..d
            }),
            OptionError::ExtendedL2ClusterSize
        );
        assert_eq!(
            bad(CreateOptions {
                lazy_refcounts: true,
                compat: Compat::V2,
                ..d
            }),
            OptionError::LazyRefcountsNeedV3
        );
        assert_eq!(
            bad(CreateOptions {
                refcount_bits: 3,
                ..d
            }),
            OptionError::RefcountBits
        );
        assert_eq!(
            bad(CreateOptions {
                refcount_bits: 128,
                ..d
            }),
            OptionError::RefcountBits
        );
        assert_eq!(
            bad(CreateOptions {
                data_file_raw: true,
                ..d
            }),
            OptionError::DataFileRawNeedsDataFile
        );
        assert_eq!(
            bad(CreateOptions {
                size: 1 << 40,
                cluster_size: 512,
                ..d
            }),
            OptionError::SizeTooLarge
        );
    }
}
