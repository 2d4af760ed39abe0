//! Creating an image: byte for byte what `qemu-img create -f qcow2` (QEMU 10) writes for the same options.
//!
//! QEMU builds a new image in steps, and its layout is the trace of those steps, so [`create`] replays them
//! against the device rather than computing a layout up front:
//!
//! 1. Cluster 0 is the header, cluster 1 the refcount table (one cluster), cluster 2 the first refcount
//!    block; clusters 0..=2 get refcount 1.
//! 2. The L1 table (exactly as many entries as the virtual size needs) is allocated at the first free
//!    cluster; QEMU writes only `l1_size * 8` bytes of it, so the file may end in the middle of a cluster.
//! 3. Preallocation:
//!    - `metadata`: for each L2 table in guest order, allocate the table, then the run of data clusters it
//!      maps (at most `INT_MAX >> cluster_bits` clusters per run), and point the entries at them with
//!      COPIED set. With an external data file the entries map guest offset = host offset and no data
//!      clusters are allocated in the image (`data_file_raw` implies this even without preallocation).
//!    - `falloc` / `full`: a new, exactly sized refcount table and the refcount blocks for everything to
//!      come are placed after the last used cluster, the old table is freed, the data clusters follow the
//!      new table, and the L2 tables are allocated afterwards: the first one reuses the old table's cluster,
//!      the others go after the data.
//! 4. The header is rewritten with its extensions: backing file format, external data file name, and the
//!    feature name table (version 3 with clusters larger than 4 KiB), an end marker, then the backing file
//!    name.
//!
//! Refcount blocks appear where QEMU's allocator puts them: a cluster allocation whose refcounts need a
//! missing block places the block at the first free cluster (described by itself if it falls in its own
//! range, else by another block allocated the same way), undoes the refcounts it had set, and searches
//! again from the start of the allocation, as QEMU does.
//!
//! Memory: about 5 KiB of stack (one 4 KiB write buffer, a 512-byte copy buffer, the builder's state)
//! plus the caller's bounce block, whatever the cluster or virtual size. Zeroed clusters, refcounts, L1
//! and L2 entries are written in pieces of at most 4 KiB; the state that QEMU keeps in memory (which
//! refcount blocks exist, which clusters are free) is read back from the device.
//!
//! When the refcount table runs out of entries (small clusters with large images, or preallocation of
//! many TiB), QEMU places a table half as large again, with refcount blocks covering it, after the
//! clusters its refcount blocks could cover so far, and frees the old table; that is replayed too.
//! Encryption is not supported.
//!
//! ```
//! use qcow2_core::MemDevice;
//! use qcow2_core::create::{CreateOptions, create};
//!
//! let mut disk = [0u8; 4 * 65536];
//! let mut dev = MemDevice::with_len(&mut disk[..], 0, 512);
//! let mut bounce = [0u8; 512];
//! let opts = CreateOptions { size: 1 << 20, ..CreateOptions::default() };
//! let len = create(&mut dev, &mut bounce, &opts)?;
//! // Header, refcount table, refcount block, and the one L1 entry: what qemu-img writes.
//! assert_eq!(len, 3 * 65536 + 8);
//! # Ok::<(), qcow2_core::Error<qcow2_core::io::MemDeviceFull>>(())
//! ```

use core::fmt;

use crate::Error;
use crate::device::BlockDeviceWrite;
use crate::format::{
    AutoclearFeatures, CompatibleFeatures, CompressionType, FEATURE_NAME_ENTRY_LEN, Header,
    IncompatibleFeatures, MAX_BACKING_FORMAT_LEN, MAX_BACKING_NAME_LEN, MAX_CLUSTER_BITS,
    MAX_L1_BYTES, MAX_REFCOUNT_ORDER, MAX_REFTABLE_BYTES, MIN_CLUSTER_BITS,
    MIN_EXTENDED_L2_CLUSTER_BITS, V2_HEADER_LEN, V3_HEADER_LEN, extension,
};
use crate::io::{read_bytes, write_bytes};

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
    /// Like `Full` in layout; the caller reserves the data area (`fallocate`) after [`create`] returns.
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

/// The feature name table QEMU writes, in its order.
const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// Length of the data of the feature name table extension.
const FEATURE_TABLE_LEN: u64 = (FEATURE_NAMES.len() * FEATURE_NAME_ENTRY_LEN) as u64;

/// Stack buffer for streamed writes (the largest buffer `create` holds besides the caller's bounce block).
const CHUNK: usize = 4096;

/// Retries of one allocation before giving up, beyond one per refcount block it may have to create.
const MAX_RETRIES: u64 = 64;

/// `a / b`, 0 when `b` is 0.
fn div(a: u64, b: u64) -> u64 {
    a.checked_div(b).unwrap_or(0)
}

/// `a % b`, 0 when `b` is 0.
fn rem(a: u64, b: u64) -> u64 {
    a.checked_rem(b).unwrap_or(0)
}

fn pad8(n: u64) -> u64 {
    n.div_ceil(8).saturating_mul(8)
}

/// Everything that follows from the options alone.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    cluster_bits: u32,
    refcount_order: u32,
    /// Entries per L2 table.
    l2_entries: u64,
    /// Bytes per L2 entry.
    l2_entry_size: u64,
    /// L1 entries.
    l1_size: u64,
    /// Virtual size as stored (rounded up to 512).
    size: u64,
    /// Guest clusters.
    guest_clusters: u64,
}

impl Geometry {
    fn cluster_size(&self) -> u64 {
        1u64 << (self.cluster_bits & 63)
    }
    /// Refcount entries per refcount block.
    fn refcounts_per_block(&self) -> u64 {
        (self.cluster_size().saturating_mul(8)) >> (self.refcount_order & 63)
    }
    /// Bytes per subcluster (the cluster size without extended L2 entries).
    fn subcluster_size(&self) -> u64 {
        if self.l2_entry_size == 16 {
            self.cluster_size() >> 5
        } else {
            self.cluster_size()
        }
    }
    fn refcount_bits(&self) -> u64 {
        1u64 << (self.refcount_order & 63)
    }
    /// Clusters needed for `bytes`.
    fn clusters(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }
    fn offset(&self, cluster: u64) -> u64 {
        cluster.saturating_mul(self.cluster_size())
    }
}

impl CreateOptions<'_> {
    /// Checks the options the way `qemu-img create` does, in its order (the first problem wins).
    pub fn validate(&self) -> Result<(), OptionError> {
        self.geometry().map(|_| ())
    }

    fn v3(&self) -> bool {
        self.compat == Compat::V3
    }

    fn geometry(&self) -> Result<Geometry, OptionError> {
        // In qemu-img's order (it matters when several options are wrong).
        let v2 = !self.v3();
        if self.extended_l2 && v2 {
            return Err(OptionError::ExtendedL2NeedsV3);
        }
        let cs = self.cluster_size;
        if !cs.is_power_of_two()
            || !(1u64 << MIN_CLUSTER_BITS..=1u64 << MAX_CLUSTER_BITS).contains(&cs)
        {
            return Err(OptionError::ClusterSize);
        }
        let cluster_bits = cs.trailing_zeros();
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
        let l2_entry_size: u64 = if self.extended_l2 { 16 } else { 8 };
        let l2_entries = div(cs, l2_entry_size);
        let l2_span = cs.saturating_mul(l2_entries);
        let l1_size = size.div_ceil(l2_span);
        if l1_size > MAX_L1_BYTES / 8 {
            return Err(OptionError::SizeTooLarge);
        }
        if self.header_layout(cs).end > cs {
            return Err(OptionError::HeaderTooLarge);
        }
        Ok(Geometry {
            cluster_bits,
            refcount_order,
            l2_entries,
            l2_entry_size,
            l1_size,
            size,
            guest_clusters: size.div_ceil(cs),
        })
    }

    /// Where the pieces of cluster 0 go.
    fn header_layout(&self, cluster_size: u64) -> HeaderLayout {
        let mut at = if self.v3() {
            V3_HEADER_LEN as u64
        } else {
            V2_HEADER_LEN as u64
        };
        let mut layout = HeaderLayout::default();
        if let (Some(_), Some(fmt)) = (self.backing_file, self.backing_fmt) {
            layout.backing_fmt = Some(at);
            at = at.saturating_add(8).saturating_add(pad8(fmt.len() as u64));
        }
        if let (true, Some(name)) = (self.v3(), self.data_file) {
            layout.data_file = Some(at);
            at = at.saturating_add(8).saturating_add(pad8(name.len() as u64));
        }
        if self.v3() && cluster_size > 4096 {
            layout.feature_table = Some(at);
            at = at.saturating_add(8).saturating_add(FEATURE_TABLE_LEN);
        }
        // End marker.
        at = at.saturating_add(8);
        if let Some(b) = self.backing_file {
            layout.backing_file = Some(at);
            at = at.saturating_add(b.len() as u64);
        }
        layout.end = at;
        layout
    }
}

/// Offsets in cluster 0.
#[derive(Debug, Default, Clone, Copy)]
struct HeaderLayout {
    backing_fmt: Option<u64>,
    data_file: Option<u64>,
    feature_table: Option<u64>,
    backing_file: Option<u64>,
    end: u64,
}

/// Outcome of a refcount update that may have had to allocate a refcount block first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Update {
    Done,
    /// A refcount block was allocated; the caller must search for free clusters again.
    Again,
}

/// QEMU's allocator state, replayed against the device.
struct Builder<'d, 'b, D> {
    dev: &'d mut D,
    bounce: &'b mut [u8],
    g: Geometry,
    /// Refcount table offset and entries.
    rt_offset: u64,
    rt_entries: u64,
    /// QEMU's `free_cluster_index`.
    free_index: u64,
    /// Every cluster at or past `end` has refcount 0.
    end: u64,
    /// Clusters known to be in use (skipped without reading their refcounts).
    known_used: (u64, u64),
    /// Length of the file QEMU leaves behind: the end of the furthest write or truncation.
    file_end: u64,
}

fn overflow<E>() -> Error<E> {
    Error::Unsupported {
        what: "image layout beyond the largest host offset",
        value: 0,
    }
}

impl<D: BlockDeviceWrite> Builder<'_, '_, D> {
    fn write(&mut self, offset: u64, bytes: &[u8]) -> Result<(), Error<D::Error>> {
        write_bytes(self.dev, self.bounce, offset, bytes)?;
        let end = offset.saturating_add(bytes.len() as u64);
        self.file_end = self.file_end.max(end);
        Ok(())
    }

    fn read(&mut self, offset: u64, bytes: &mut [u8]) -> Result<(), Error<D::Error>> {
        read_bytes(self.dev, self.bounce, offset, bytes)
    }

    fn read_be64(&mut self, offset: u64) -> Result<u64, Error<D::Error>> {
        let mut b = [0u8; 8];
        self.read(offset, &mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// Writes `len` bytes made of `pattern` repeated (its length must divide [`CHUNK`]).
    fn fill(&mut self, offset: u64, len: u64, pattern: &[u8]) -> Result<(), Error<D::Error>> {
        let mut buf = [0u8; CHUNK];
        if !pattern.iter().all(|&b| b == 0) {
            for (dst, src) in buf.iter_mut().zip(pattern.iter().cycle()) {
                *dst = *src;
            }
        }
        let mut done = 0u64;
        while done < len {
            let n = (len.saturating_sub(done)).min(CHUNK as u64);
            let piece = buf.get(..n as usize).ok_or(overflow())?;
            self.write(offset.saturating_add(done), piece)?;
            done = done.saturating_add(n);
        }
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<(), Error<D::Error>> {
        self.fill(offset, len, &[0])
    }

    /// Offset of refcount block `index`, 0 if there is none.
    fn refblock(&mut self, index: u64) -> Result<u64, Error<D::Error>> {
        if index >= self.rt_entries {
            return Ok(0);
        }
        let at = self
            .rt_offset
            .checked_add(index.checked_mul(8).ok_or(overflow())?)
            .ok_or(overflow())?;
        Ok(self.read_be64(at)? & 0xffff_ffff_ffff_fe00)
    }

    fn set_refblock(&mut self, index: u64, offset: u64) -> Result<(), Error<D::Error>> {
        let at = self
            .rt_offset
            .checked_add(index.checked_mul(8).ok_or(overflow())?)
            .ok_or(overflow())?;
        self.write(at, &offset.to_be_bytes())
    }

    /// Refcount of `cluster`.
    fn refcount(&mut self, cluster: u64) -> Result<u64, Error<D::Error>> {
        if cluster >= self.end {
            return Ok(0);
        }
        if (self.known_used.0..self.known_used.1).contains(&cluster) {
            return Ok(1);
        }
        let per = self.g.refcounts_per_block();
        let block = self.refblock(div(cluster, per))?;
        if block == 0 {
            return Ok(0);
        }
        let bits = self.g.refcount_bits();
        let index = rem(cluster, per);
        let bit = index.saturating_mul(bits);
        let byte = block.saturating_add(bit / 8);
        if bits >= 8 {
            let mut b = [0u8; 8];
            let n = (bits / 8) as usize;
            let dst = b.get_mut(8usize.saturating_sub(n)..).ok_or(overflow())?;
            self.read(byte, dst)?;
            Ok(u64::from_be_bytes(b))
        } else {
            let mut b = [0u8; 1];
            self.read(byte, &mut b)?;
            let mask = (1u64 << bits).wrapping_sub(1);
            Ok((u64::from(b[0]) >> (bit % 8)) & mask)
        }
    }

    /// Sets the refcounts of `count` clusters from entry `first` of the block at `block` to `value` (0 or 1).
    fn set_refcounts(
        &mut self,
        block: u64,
        first: u64,
        count: u64,
        value: u64,
    ) -> Result<(), Error<D::Error>> {
        let bits = self.g.refcount_bits();
        if bits >= 8 {
            let width = bits / 8;
            let mut pattern = [0u8; 8];
            if let Some(last) = pattern.get_mut(width.saturating_sub(1) as usize) {
                *last = value as u8;
            }
            let pattern = pattern.get(..width as usize).ok_or(overflow())?;
            let at = block.saturating_add(first.saturating_mul(width));
            return self.fill(at, count.saturating_mul(width), pattern);
        }
        // Sub-byte widths: whole bytes in one go, partial bytes read, modified and written back.
        let per_byte = div(8, bits);
        let mask = (1u64 << bits).wrapping_sub(1);
        let mut index = first;
        let stop = first.saturating_add(count);
        while index < stop {
            if rem(index, per_byte) == 0 && stop.saturating_sub(index) >= per_byte {
                let bytes = div(stop.saturating_sub(index), per_byte);
                let mut byte = 0u8;
                if value != 0 {
                    for k in 0..per_byte {
                        byte |= (value << (k.saturating_mul(bits))) as u8;
                    }
                }
                self.fill(block.saturating_add(div(index, per_byte)), bytes, &[byte])?;
                index = index.saturating_add(bytes.saturating_mul(per_byte));
            } else {
                let at = block.saturating_add(div(index, per_byte));
                let mut b = [0u8; 1];
                self.read(at, &mut b)?;
                let shift = (rem(index, per_byte)).saturating_mul(bits);
                let cleared = u64::from(b[0]) & !(mask << shift);
                b[0] = (cleared | ((value & mask) << shift)) as u8;
                self.write(at, &b)?;
                index = index.saturating_add(1);
            }
        }
        Ok(())
    }

    /// QEMU's `alloc_clusters_noref`: the first run of `n` free clusters at or after the free index.
    fn alloc_noref(&mut self, n: u64) -> Result<u64, Error<D::Error>> {
        let mut found = 0u64;
        while found < n {
            if self.free_index >= self.end {
                // Everything from here on is free.
                self.free_index = self
                    .free_index
                    .checked_add(n.saturating_sub(found))
                    .ok_or(overflow())?;
                break;
            }
            let c = self.free_index;
            if (self.known_used.0..self.known_used.1).contains(&c) {
                self.free_index = self.known_used.1;
                found = 0;
                continue;
            }
            self.free_index = c.saturating_add(1);
            if self.refcount(c)? != 0 {
                found = 0;
            } else {
                found = found.saturating_add(1);
            }
        }
        let pos = self.free_index.saturating_sub(n);
        if self.free_index > crate::format::MAX_HOST_OFFSET >> self.g.cluster_bits {
            return Err(overflow());
        }
        self.end = self.end.max(self.free_index);
        Ok(pos)
    }

    /// QEMU's `update_refcount` for an increase (`value` 1) or a decrease (`value` 0) of `n` clusters.
    fn update_refcount(&mut self, pos: u64, n: u64, value: u64) -> Result<Update, Error<D::Error>> {
        let per = self.g.refcounts_per_block();
        let stop = pos.checked_add(n).ok_or(overflow())?;
        let mut c = pos;
        while c < stop {
            let index = div(c, per);
            let seg_end = stop.min(index.saturating_add(1).saturating_mul(per));
            let block = self.refblock(index)?;
            if block == 0 {
                self.alloc_refcount_block(c)?;
                // Undo what this call did, as QEMU does when it gets -EAGAIN.
                if c > pos {
                    self.set_range(pos, c.saturating_sub(pos), u64::from(value == 0))?;
                }
                // QEMU searches again from the start of this allocation (observed with qemu-img 10
                // also when nothing had to be undone: a table allocated right at a refcount block
                // boundary stays there, the new block goes after it).
                if value != 0 {
                    self.free_index = self.free_index.min(pos);
                }
                return Ok(Update::Again);
            }
            self.set_refcounts(block, rem(c, per), seg_end.saturating_sub(c), value)?;
            if value == 0 {
                self.free_index = self.free_index.min(c);
            }
            c = seg_end;
        }
        Ok(Update::Done)
    }

    /// Sets refcounts over clusters whose blocks all exist.
    fn set_range(&mut self, pos: u64, n: u64, value: u64) -> Result<(), Error<D::Error>> {
        let per = self.g.refcounts_per_block();
        let stop = pos.saturating_add(n);
        let mut c = pos;
        while c < stop {
            let index = div(c, per);
            let seg_end = stop.min(index.saturating_add(1).saturating_mul(per));
            let block = self.refblock(index)?;
            if block == 0 {
                return Err(Error::Corrupt {
                    what: "refcount block missing while creating the image",
                    offset: self.g.offset(c),
                });
            }
            self.set_refcounts(block, rem(c, per), seg_end.saturating_sub(c), value)?;
            c = seg_end;
        }
        Ok(())
    }

    /// QEMU's `alloc_refcount_block` for a cluster whose block is missing. Always ends in "search again".
    fn alloc_refcount_block(&mut self, cluster: u64) -> Result<(), Error<D::Error>> {
        let per = self.g.refcounts_per_block();
        let index = div(cluster, per);
        let new_block = self.alloc_noref(1)?;
        let offset = self.g.offset(new_block);
        if div(new_block, per) == index {
            // Describes itself.
            self.zero(offset, self.g.cluster_size())?;
            self.set_refcounts(offset, rem(new_block, per), 1, 1)?;
        } else {
            if self.update_refcount(new_block, 1, 1)? == Update::Again {
                return Ok(());
            }
            self.zero(offset, self.g.cluster_size())?;
        }
        if index < self.rt_entries {
            return self.set_refblock(index, offset);
        }
        // The table is full: a new, larger one goes after the clusters the blocks so far can cover,
        // together with blocks for itself.
        let blocks_used = cluster.max(new_block).saturating_add(1).div_ceil(per);
        let meta_start = blocks_used.checked_mul(per).ok_or(overflow())?;
        self.refcount_area(meta_start, 0, false, Some((index, offset)))?;
        Ok(())
    }

    /// How often an allocation of `n` clusters may have to start over: once per refcount block it makes.
    fn retries(&self, n: u64) -> u64 {
        let per = self.g.refcounts_per_block();
        div(self.end.saturating_add(n), per)
            .saturating_mul(2)
            .saturating_add(MAX_RETRIES)
    }

    /// QEMU's `qcow2_alloc_clusters`: `n` clusters with refcount 1; returns the first.
    fn alloc_clusters(&mut self, n: u64) -> Result<u64, Error<D::Error>> {
        for _ in 0..self.retries(n) {
            let pos = self.alloc_noref(n)?;
            if self.update_refcount(pos, n, 1)? == Update::Done {
                return Ok(pos);
            }
        }
        Err(Error::Unsupported {
            what: "cluster allocation did not settle",
            value: n,
        })
    }

    /// QEMU's `qcow2_alloc_clusters_at` for clusters known to be free.
    fn alloc_clusters_at(&mut self, pos: u64, n: u64) -> Result<(), Error<D::Error>> {
        for _ in 0..self.retries(n) {
            if self.update_refcount(pos, n, 1)? == Update::Done {
                self.end = self.end.max(pos.saturating_add(n));
                return Ok(());
            }
        }
        Err(Error::Unsupported {
            what: "cluster allocation did not settle",
            value: n,
        })
    }

    /// Allocates an L2 table for L1 index `l1_index` and hooks it up (COPIED set).
    fn alloc_l2(&mut self, l1_offset: u64, l1_index: u64) -> Result<u64, Error<D::Error>> {
        let l2 = self.alloc_clusters(1)?;
        let l2 = self.g.offset(l2);
        self.zero(l2, self.g.cluster_size())?;
        let entry = l2 | (1u64 << 63);
        self.write(
            l1_offset.saturating_add(l1_index.saturating_mul(8)),
            &entry.to_be_bytes(),
        )?;
        Ok(l2)
    }

    /// Writes `count` L2 entries from index `first` of the table at `l2`, mapping consecutive clusters
    /// from host offset `host` (COPIED set; subcluster bitmaps 0).
    fn write_l2_entries(
        &mut self,
        l2: u64,
        first: u64,
        count: u64,
        host: u64,
    ) -> Result<(), Error<D::Error>> {
        let es = self.g.l2_entry_size;
        let per_chunk = div(CHUNK as u64, es);
        let mut buf = [0u8; CHUNK];
        let mut done = 0u64;
        while done < count {
            let n = count.saturating_sub(done).min(per_chunk);
            for k in 0..n {
                let cluster_host = host.saturating_add(self.g.offset(done.saturating_add(k)));
                let at = (k.saturating_mul(es)) as usize;
                let entry = (cluster_host | (1u64 << 63)).to_be_bytes();
                buf.get_mut(at..at.saturating_add(8))
                    .ok_or(overflow())?
                    .copy_from_slice(&entry);
                if let Some(bitmap) =
                    buf.get_mut(at.saturating_add(8)..at.saturating_add(es as usize))
                {
                    bitmap.fill(0);
                }
            }
            let at = l2.saturating_add(first.saturating_add(done).saturating_mul(es));
            let piece = buf
                .get(..(n.saturating_mul(es)) as usize)
                .ok_or(overflow())?;
            self.write(at, piece)?;
            done = done.saturating_add(n);
        }
        Ok(())
    }

    /// `preallocation=metadata` (and any preallocation with an external data file).
    fn preallocate_metadata(
        &mut self,
        l1_offset: u64,
        data_file: bool,
    ) -> Result<(), Error<D::Error>> {
        let total = self.g.guest_clusters;
        let per_l2 = self.g.l2_entries;
        // QEMU allocates at most INT_MAX bytes of clusters at a time.
        let max_run = (0x7fff_ffffu64 >> self.g.cluster_bits).max(1);
        let mut guest = 0u64;
        let mut l2 = 0u64;
        let mut last_data_end = 0u64;
        while guest < total {
            let l1_index = div(guest, per_l2);
            let within = rem(guest, per_l2);
            if within == 0 || l2 == 0 {
                l2 = self.alloc_l2(l1_offset, l1_index)?;
            }
            let run = total
                .saturating_sub(guest)
                .min(per_l2.saturating_sub(within))
                .min(max_run);
            let host = if data_file {
                self.g.offset(guest)
            } else {
                let pos = self.alloc_clusters(run)?;
                // The guest bytes this run maps, rounded up to a subcluster.
                let guest_end = self.g.size.min(self.g.offset(guest.saturating_add(run)));
                let bytes = guest_end
                    .saturating_sub(self.g.offset(guest))
                    .next_multiple_of(self.g.subcluster_size());
                last_data_end = self.g.offset(pos).saturating_add(bytes);
                self.g.offset(pos)
            };
            self.write_l2_entries(l2, within, run, host)?;
            guest = guest.saturating_add(run);
        }
        // QEMU extends the file to the end of the last data it allocated (to the subcluster).
        self.file_end = self.file_end.max(last_data_end);
        Ok(())
    }

    /// QEMU's `qcow2_refcount_metadata_size`: refcount blocks needed for `clusters` clusters plus the
    /// refcount structures themselves (with `generous`, room for a table half as large again).
    fn refblocks_needed(&self, clusters: u64, generous: bool) -> u64 {
        let per_block = self.g.refcounts_per_block().max(1);
        let per_table_cluster = (self.g.cluster_size() / 8).max(1);
        let (mut blocks, mut table, mut n) = (0u64, 0u64, 0u64);
        let (mut clusters, mut generous) = (clusters, generous);
        loop {
            let last = n;
            blocks = clusters
                .saturating_add(table)
                .saturating_add(blocks)
                .div_ceil(per_block);
            table = blocks.div_ceil(per_table_cluster);
            n = clusters.saturating_add(blocks).saturating_add(table);
            if n == last && generous {
                clusters = clusters.saturating_add(table.div_ceil(2));
                n = 0;
                generous = false;
            } else if n == last {
                return blocks;
            }
        }
    }

    /// QEMU's `qcow2_refcount_area`: from cluster `start` (past everything in use), new refcount blocks and a
    /// new refcount table that cover themselves and `additional` clusters after them; `new_block` is a
    /// refcount block already written that the new table takes at its index. The old table is freed.
    /// Returns the first cluster after the new structures.
    fn refcount_area(
        &mut self,
        start: u64,
        additional: u64,
        exact: bool,
        new_block: Option<(u64, u64)>,
    ) -> Result<u64, Error<D::Error>> {
        let cs = self.g.cluster_size();
        let per = self.g.refcounts_per_block();
        let total_blocks =
            self.refblocks_needed(start.checked_add(additional).ok_or(overflow())?, !exact);
        let mut table_entries = total_blocks;
        if !exact {
            table_entries = table_entries.saturating_add(total_blocks.div_ceil(2));
        }
        let table_entries = table_entries.next_multiple_of(cs / 8);
        if table_entries.saturating_mul(8) > MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported {
                what: "refcount table larger than 8 MiB",
                value: table_entries,
            });
        }
        let table_clusters = div(table_entries.saturating_mul(8), cs);
        let area_index = div(start, per);
        let mut new_blocks = 0u64;
        for i in area_index..total_blocks {
            let taken = matches!(new_block, Some((index, _)) if index == i);
            if !taken && self.refblock(i)? == 0 {
                new_blocks = new_blocks.saturating_add(1);
            }
        }
        let table_cluster = start.saturating_add(new_blocks);
        let area_end = table_cluster.saturating_add(table_clusters);
        let table_offset = self.g.offset(table_cluster);
        // The new table: a copy of the old one, the block the caller made, then the new blocks.
        self.zero(table_offset, table_entries.saturating_mul(8))?;
        let copy = self.rt_entries.min(table_entries).saturating_mul(8);
        let mut buf = [0u8; 512];
        let mut done = 0u64;
        while done < copy {
            let n = copy.saturating_sub(done).min(buf.len() as u64) as usize;
            let piece = buf.get_mut(..n).ok_or(overflow())?;
            self.read(self.rt_offset.saturating_add(done), piece)?;
            let piece = buf.get(..n).ok_or(overflow())?;
            self.write(table_offset.saturating_add(done), piece)?;
            done = done.saturating_add(n as u64);
        }
        let (old_offset, old_entries) = (self.rt_offset, self.rt_entries);
        self.rt_offset = table_offset;
        self.rt_entries = table_entries;
        if let Some((index, offset)) = new_block {
            self.set_refblock(index, offset)?;
        }
        let mut block = start;
        for i in area_index..total_blocks {
            if self.refblock(i)? == 0 {
                let offset = self.g.offset(block);
                self.zero(offset, cs)?;
                self.set_refblock(i, offset)?;
                block = block.saturating_add(1);
            }
        }
        self.end = self.end.max(area_end);
        self.set_range(start, area_end.saturating_sub(start), 1)?;
        // Free the old table.
        let old_cluster = div(old_offset, cs);
        let old_clusters = old_entries.saturating_mul(8).div_ceil(cs);
        self.update_refcount(old_cluster, old_clusters, 0)?;
        Ok(area_end)
    }

    /// `preallocation=falloc|full` without a data file.
    fn preallocate_full(
        &mut self,
        l1_offset: u64,
        write_zeros: bool,
    ) -> Result<(), Error<D::Error>> {
        let data = self.g.guest_clusters;
        let l2_tables = data.div_ceil(self.g.l2_entries);
        // Everything below `end` is in use: the new structures start there.
        let start = self.end;
        let area_end = self.refcount_area(start, data.saturating_add(l2_tables), true, None)?;
        // The data area.
        let data_offset = self.g.offset(area_end);
        let data_end = area_end.checked_add(data).ok_or(overflow())?;
        if write_zeros {
            self.zero(data_offset, self.g.offset(data))?;
        }
        self.file_end = self.file_end.max(self.g.offset(data_end));
        self.alloc_clusters_at(area_end, data)?;
        self.known_used = (area_end, data_end);
        // L2 tables, allocated as they are linked.
        let per_l2 = self.g.l2_entries;
        let mut guest = 0u64;
        while guest < data {
            let l1_index = div(guest, per_l2);
            let run = data.saturating_sub(guest).min(per_l2);
            let l2 = self.alloc_l2(l1_offset, l1_index)?;
            self.write_l2_entries(l2, 0, run, self.g.offset(area_end.saturating_add(guest)))?;
            guest = guest.saturating_add(run);
        }
        Ok(())
    }

    fn write_ext_header(&mut self, at: u64, magic: u32, len: u32) -> Result<(), Error<D::Error>> {
        let v = (u64::from(magic) << 32) | u64::from(len);
        self.write(at, &v.to_be_bytes())
    }

    /// One header extension (its padding is already zero).
    fn write_ext(&mut self, at: u64, magic: u32, data: &[u8]) -> Result<(), Error<D::Error>> {
        self.write_ext_header(at, magic, data.len() as u32)?;
        self.write(at.saturating_add(8), data)
    }

    /// Rewrites cluster 0: header, extensions, end marker, backing file name.
    fn write_header(
        &mut self,
        opts: &CreateOptions<'_>,
        l1_offset: u64,
    ) -> Result<(), Error<D::Error>> {
        let g = self.g;
        let layout = opts.header_layout(g.cluster_size());
        let mut incompatible = IncompatibleFeatures::empty();
        if opts.data_file.is_some() {
            incompatible |= IncompatibleFeatures::EXTERNAL_DATA_FILE;
        }
        if opts.compression_type != CompressionType::Deflate {
            incompatible |= IncompatibleFeatures::COMPRESSION_TYPE;
        }
        if opts.extended_l2 {
            incompatible |= IncompatibleFeatures::EXTENDED_L2;
        }
        let mut compatible = CompatibleFeatures::empty();
        if opts.lazy_refcounts {
            compatible |= CompatibleFeatures::LAZY_REFCOUNTS;
        }
        let mut autoclear = AutoclearFeatures::empty();
        if opts.data_file_raw {
            autoclear |= AutoclearFeatures::DATA_FILE_RAW;
        }
        let header = Header {
            version: if opts.v3() { 3 } else { 2 },
            backing_file_offset: layout.backing_file.unwrap_or(0),
            backing_file_size: opts.backing_file.map_or(0, |b| b.len() as u32),
            cluster_bits: g.cluster_bits,
            size: g.size,
            crypt_method: 0,
            l1_size: g.l1_size as u32,
            l1_table_offset: if g.l1_size == 0 { 0 } else { l1_offset },
            refcount_table_offset: self.rt_offset,
            refcount_table_clusters: (div(self.rt_entries.saturating_mul(8), g.cluster_size()))
                as u32,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: incompatible,
            compatible_features: compatible,
            autoclear_features: autoclear,
            refcount_order: g.refcount_order,
            header_length: V3_HEADER_LEN as u32,
            compression_type: opts.compression_type,
        };
        let mut buf = [0u8; V3_HEADER_LEN];
        let n = header.emit(&mut buf).ok_or(overflow())?;
        // The magic goes last, after a flush: until it is durable the device is not a qcow2 image at all,
        // so a power loss during create never leaves a half-made image that looks valid.
        self.write(4, buf.get(4..n).ok_or(overflow())?)?;
        if let (Some(at), Some(fmt)) = (layout.backing_fmt, opts.backing_fmt) {
            self.write_ext(at, extension::BACKING_FORMAT, fmt.as_bytes())?;
        }
        if let (Some(at), Some(name)) = (layout.data_file, opts.data_file) {
            self.write_ext(at, extension::DATA_FILE, name.as_bytes())?;
        }
        if let Some(at) = layout.feature_table {
            self.write_ext_header(at, extension::FEATURE_NAME_TABLE, FEATURE_TABLE_LEN as u32)?;
            let mut entry_at = at.saturating_add(8);
            for (ty, bit, name) in FEATURE_NAMES {
                let mut e = [0u8; FEATURE_NAME_ENTRY_LEN];
                for (dst, src) in e.iter_mut().zip([ty, bit].iter().chain(name.as_bytes())) {
                    *dst = *src;
                }
                self.write(entry_at, &e)?;
                entry_at = entry_at.saturating_add(FEATURE_NAME_ENTRY_LEN as u64);
            }
        }
        if let (Some(at), Some(name)) = (layout.backing_file, opts.backing_file) {
            self.write(at, name.as_bytes())?;
        }
        self.dev.flush()?;
        self.write(0, buf.get(..4).ok_or(overflow())?)
    }
}

/// Creates a qcow2 image on `dev` with `opts`, writing what `qemu-img create -f qcow2` writes, and returns
/// the length the image file must have (QEMU's file length: the device may have rounded it up to whole
/// blocks, in which case the caller truncates it to this length).
///
/// The device should read as zeros (a new or truncated file); everything the image needs is written.
/// `bounce` holds at least one device block. Memory does not depend on the virtual or cluster size.
///
/// With [`Preallocation::Falloc`] the data area is laid out but not written: a caller that can reserve
/// space (`fallocate`) does so for the whole returned length afterwards. With an external data file the
/// caller creates the data file itself.
pub fn create<D: BlockDeviceWrite>(
    dev: &mut D,
    bounce: &mut [u8],
    opts: &CreateOptions<'_>,
) -> Result<u64, Error<D::Error>> {
    let g = opts.geometry().map_err(OptionError::into_error)?;
    let cs = g.cluster_size();
    let mut b = Builder {
        dev,
        bounce,
        g,
        rt_offset: cs,
        rt_entries: cs / 8,
        free_index: 0,
        end: 0,
        known_used: (0, 0),
        file_end: 0,
    };
    // Header cluster, refcount table and the first refcount block, all zeroed; then table entry 0 and
    // refcount 1 for the three clusters (QEMU allocates them through its normal allocator).
    b.zero(0, cs.saturating_mul(3))?;
    b.set_refblock(0, cs.saturating_mul(2))?;
    let first = b.alloc_clusters(3)?;
    if first != 0 {
        return Err(Error::Corrupt {
            what: "header clusters not at the start of the image",
            offset: b.g.offset(first),
        });
    }
    // The L1 table (only its entries are written).
    let mut l1_offset = 0;
    if g.l1_size > 0 {
        let l1_bytes = g.l1_size.saturating_mul(8);
        let l1 = b.alloc_clusters(g.clusters(l1_bytes))?;
        l1_offset = g.offset(l1);
        b.zero(l1_offset, l1_bytes)?;
    }
    let data_file = opts.data_file.is_some();
    match opts.preallocation {
        Preallocation::Off if opts.data_file_raw => b.preallocate_metadata(l1_offset, true)?,
        Preallocation::Off => {}
        Preallocation::Metadata => b.preallocate_metadata(l1_offset, data_file)?,
        Preallocation::Falloc | Preallocation::Full if data_file => {
            b.preallocate_metadata(l1_offset, true)?
        }
        Preallocation::Falloc => b.preallocate_full(l1_offset, false)?,
        Preallocation::Full => b.preallocate_full(l1_offset, true)?,
    }
    b.write_header(opts, l1_offset)?;
    b.dev.flush()?;
    Ok(b.file_end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDevice;

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

    #[test]
    fn default_layout_one_mib() {
        let mut buf = [0u8; 4 * 65536];
        let mut dev = MemDevice::with_len(&mut buf[..], 0, 512);
        let mut bounce = [0u8; 512];
        let opts = CreateOptions {
            size: 1 << 20,
            ..CreateOptions::default()
        };
        let len = create(&mut dev, &mut bounce, &opts).unwrap();
        assert_eq!(len, 0x30008);
        let img = dev.content();
        assert_eq!(&img[..4], b"QFI\xfb");
        // Refcount table entry 0 -> cluster 2; refcounts 1 for clusters 0..=3.
        assert_eq!(&img[0x10000..0x10008], &0x20000u64.to_be_bytes());
        assert_eq!(&img[0x20000..0x2000a], &[0, 1, 0, 1, 0, 1, 0, 1, 0, 0]);
    }
}
