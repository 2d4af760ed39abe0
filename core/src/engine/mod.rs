//! The image: the types a caller sees ([`Image`], [`Layer`], [`Mapping`], [`Resolver`], ...) and, one concern
//! a file, opening and chain resolution (`open`), mapping guest ranges to host runs (`map`), reading
//! (`read`) and introspection (`introspect`). A guest read travels: [`Image::read_at`] (`read`) ->
//! `Reader::read` -> `map_from` / `map_qcow2` (`map`, L1 and L2 entries through
//! [`crate::meta::TableAccess`] and its [`crate::meta::SliceCache`]) -> one device read per run
//! ([`crate::io::read_bytes`]) into the caller's buffer.

mod bitmaps;
mod introspect;
mod map;
mod open;
mod read;

pub(crate) use open::open_qcow2;
pub(crate) use read::Reader;

use heapless::Vec;

use crate::Error;
use crate::compress::{CompressedSource, DecompressError, Decompressor};
use crate::device::BlockDevice;
use crate::error::corrupt;
use crate::format::{
    AutoclearFeatures, ClusterKind, CompressedDescriptor, CompressionType, ExtensionWalk,
    FEATURE_NAME_ENTRY_LEN, FeatureName, HEADER_READ_LEN, Header, L2Format, MAGIC,
    MAX_BACKING_FORMAT_LEN, MAX_BACKING_NAME_LEN, SNAPSHOT_FIXED_LEN, SnapshotEntryLayout,
    extension,
};
use crate::format::{be32, be64};
use crate::io::{check_block_size, read_bytes};
use crate::meta::{SliceCache, TableAccess, TableLayout, tables::l2_entry_at};

/// Default capacity of the backing chain (the image itself included).
pub const DEFAULT_MAX_DEPTH: usize = 16;
/// Default number of metadata slices cached.
pub const DEFAULT_SLICES: usize = 8;
/// Longest external data file name the engine accepts.
pub const MAX_DATA_FILE_NAME_LEN: usize = 1023;
/// The buffer a stored file name (backing or external data file) is read into.
const NAME_BUF: usize = 1023;

/// Buffers the caller supplies to [`Image::open`].
#[derive(Debug)]
pub struct Buffers<B> {
    /// One device block (at least the largest block size of the chain's devices): unaligned head and tail
    /// of device reads go through it.
    pub bounce: B,
    /// The metadata cache: split into the image's slice count of equal power-of-two slots (512 bytes each
    /// at least). Bigger slots mean fewer metadata reads.
    pub metadata: B,
}

/// The format of an image in the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Format {
    /// qcow2.
    Qcow2,
    /// Raw: the device's bytes are the guest's.
    Raw,
}

impl Format {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }

    fn from_name(name: &[u8]) -> Option<Format> {
        match name {
            b"qcow2" => Some(Format::Qcow2),
            b"raw" => Some(Format::Raw),
            _ => None,
        }
    }
}

/// What the engine asks the caller's [`Resolver`] for.
#[derive(Debug, Clone, Copy)]
pub struct FileRequest<'a> {
    /// Position in the chain of the image that names the file (0 = the image opened).
    pub depth: usize,
    /// The file name exactly as the image stores it.
    pub name: &'a [u8],
    /// For a backing file: the format the image declares for it, if any.
    pub format: Option<&'a [u8]>,
}

/// Turns the file names an image stores (backing file, external data file) into devices. The caller decides
/// what a name means and which names it refuses: the engine never interprets them.
pub trait Resolver<D: BlockDevice> {
    /// The backing file of the image at `request.depth`.
    fn backing_file(&mut self, request: FileRequest<'_>) -> Result<D, Error<D::Error>>;
    /// The external data file of the image at `request.depth`.
    fn data_file(&mut self, request: FileRequest<'_>) -> Result<D, Error<D::Error>>;
    /// Whether to open the top image without its backing chain, to read what it says about itself (as
    /// `qemu-img info` opens an image). Its unallocated clusters then read as zeros, so such an image is
    /// never opened for writing.
    fn skip_backing(&self) -> bool {
        false
    }
    /// The passphrase of the encrypted image at `depth` of the chain, if the caller has one. An encrypted
    /// image opened without one is locked: it opens (for what it says about itself), and reading its data
    /// fails with [`crate::format::luks::LuksError::Locked`].
    fn passphrase(&mut self, depth: usize) -> Option<&[u8]> {
        let _ = depth;
        None
    }
}

/// A resolver that supplies nothing: images that need a backing or data file fail to open.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoFiles;

impl<D: BlockDevice> Resolver<D> for NoFiles {
    fn backing_file(&mut self, _request: FileRequest<'_>) -> Result<D, Error<D::Error>> {
        Err(Error::Unavailable {
            what: "the image has a backing file and no resolver was given to open it",
        })
    }
    fn data_file(&mut self, _request: FileRequest<'_>) -> Result<D, Error<D::Error>> {
        Err(Error::Unavailable {
            what: "the image has an external data file and no resolver was given to open it",
        })
    }
}

/// A byte range inside the image's first cluster (a name stored there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct StoredName {
    /// Host offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

pub use crate::format::{MAX_SNAPSHOT_EXTRA, MAX_SNAPSHOT_TABLE_BYTES};

/// One internal snapshot table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SnapshotEntry {
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Nanoseconds part of the creation time.
    pub date_nsec: u32,
    /// Guest clock at the snapshot, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state.
    pub vm_state_size: u64,
    /// Virtual disk size at the snapshot, if the entry records it.
    pub disk_size: Option<u64>,
    /// Instruction count, if recorded.
    pub icount: Option<u64>,
    /// The unique id string, on disk.
    pub id: StoredName,
    /// The name, on disk.
    pub name: StoredName,
}

pub use crate::format::bitmap::BitmapsExtension;
pub use bitmaps::BitmapRef;

/// Why a backing file whose format was probed (not declared by the image above it) is not followed when it
/// names a backing file of its own: a probed image must not steer the reader to other host files.
pub const PROBED_NAMES_BACKING: &str = "a backing file whose format was probed as qcow2 names a backing file \
                                        of its own; refusing to follow it (declare the format with backing_fmt)";
/// As [`PROBED_NAMES_BACKING`], for an external data file.
pub const PROBED_NAMES_DATA_FILE: &str = "a backing file whose format was probed as qcow2 names an external \
                                          data file; refusing to follow it (declare the format with backing_fmt)";

/// Everything the engine knows about one qcow2 image of the chain after opening it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Qcow2Meta {
    /// The validated header.
    pub header: Header,
    /// Decoding parameters for L2 entries.
    pub l2: L2Format,
    /// The backing file name, if any.
    pub backing_name: Option<StoredName>,
    /// The backing format from the header extension (`len` bytes of `bytes`).
    pub backing_format: Option<([u8; MAX_BACKING_FORMAT_LEN], u8)>,
    /// The external data file name from the header extension, if any.
    pub data_file_name: Option<StoredName>,
    /// The feature name table, if any.
    pub feature_table: Option<StoredName>,
    /// The bitmaps extension, when the autoclear bit says it is valid.
    pub bitmaps: Option<BitmapsExtension>,
    /// The full-disk-encryption header extension: host offset and length of the LUKS area.
    #[cfg(feature = "luks")]
    pub encryption: Option<(u64, u64)>,
}

impl Qcow2Meta {
    /// The backing format name, if the image declares one.
    pub fn backing_format(&self) -> Option<&[u8]> {
        self.backing_format
            .as_ref()
            .map(|(b, l)| b.get(..usize::from(*l)).unwrap_or(&[]))
    }
}

/// One image of the chain.
#[derive(Debug)]
pub struct Layer<D> {
    pub(crate) dev: D,
    pub(crate) data: Option<D>,
    format: Format,
    /// qcow2 metadata (for qcow2 images).
    pub(crate) meta: Option<Qcow2Meta>,
    /// Virtual size in bytes.
    pub(crate) size: u64,
    /// Length of the device (of the image file) in bytes.
    pub(crate) file_size: u64,
    /// The format was probed, not declared.
    probed: bool,
    /// The data key of an encrypted image that a passphrase unlocked (`None`: not encrypted, or locked).
    #[cfg(any(feature = "luks", feature = "aes-legacy"))]
    pub(crate) key: Option<crate::crypto::DiskKey>,
}

impl<D> Layer<D> {
    /// The image's format.
    pub fn format(&self) -> Format {
        self.format
    }
    /// qcow2 metadata, for qcow2 images.
    pub fn qcow2(&self) -> Option<&Qcow2Meta> {
        self.meta.as_ref()
    }
    /// Virtual size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.size
    }
    /// Length of the image file in bytes (when it was opened).
    pub fn file_size(&self) -> u64 {
        self.file_size
    }
    /// Whether the format was probed rather than declared by the image above.
    pub fn probed(&self) -> bool {
        self.probed
    }
    /// The device the image is read from (and written to).
    pub fn device(&self) -> &D {
        &self.dev
    }
    /// Whether the image is encrypted (`crypt_method` not 0).
    pub fn encrypted(&self) -> bool {
        self.meta.is_some_and(|m| m.header.crypt_method != 0)
    }
    /// Whether the image is encrypted and no passphrase unlocked it: its data cannot be read.
    pub fn locked(&self) -> bool {
        #[cfg(any(feature = "luks", feature = "aes-legacy"))]
        return self.encrypted() && self.key.is_none();
        #[cfg(not(any(feature = "luks", feature = "aes-legacy")))]
        return self.encrypted();
    }
}

/// The data key of a layer whose key field is `key`: the error for an encrypted layer without one.
#[cfg(any(feature = "luks", feature = "aes-legacy"))]
pub(crate) fn key_of<E>(
    key: &Option<crate::crypto::DiskKey>,
    encrypted: bool,
) -> Result<Option<&crate::crypto::DiskKey>, Error<E>> {
    match (key, encrypted) {
        (Some(k), _) => Ok(Some(k)),
        (None, true) => Err(Error::Encryption(crate::format::luks::LuksError::Locked)),
        (None, false) => Ok(None),
    }
}

/// Where a guest range's data comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Source {
    /// Data at `host` in the layer's image file, or in its external data file when `external`.
    Data {
        /// Host offset of the first byte of the run.
        host: u64,
        /// The host offset is in the external data file.
        external: bool,
    },
    /// Reads as zeros; `host` is the preallocated host offset of the first byte, if any.
    Zero {
        /// Preallocated host offset, if any.
        host: Option<u64>,
        /// The host offset is in the external data file.
        external: bool,
    },
    /// Part of a compressed cluster: `skip` bytes into the decompressed cluster.
    Compressed {
        /// Where the compressed data is.
        descriptor: CompressedDescriptor,
        /// Offset of the run's first byte inside the decompressed cluster.
        skip: u64,
    },
    /// Past the end of a backing image that is shorter than the image above it: reads as zeros. `host` is set
    /// when the image above has the (sub)cluster's host cluster allocated but the subcluster itself
    /// unallocated (extended L2): its host offset of the first byte, as for [`Source::Unallocated`].
    PastEnd {
        /// Host offset of the first byte inside the image above's allocated host cluster, if any.
        host: Option<u64>,
    },
    /// Allocated nowhere in the chain: reads as zeros. `host` is set when the last image has the (sub)cluster's
    /// host cluster allocated but the subcluster itself unallocated (extended L2).
    Unallocated {
        /// Host offset of the first byte inside the allocated host cluster, if any.
        host: Option<u64>,
    },
}

/// A run of guest bytes with one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Mapping {
    /// Position in the chain of the image that supplies the run (the chain length for [`Source::Unallocated`]
    /// means: the last image, where it is unallocated).
    pub depth: usize,
    /// Length in bytes (at least 1).
    pub len: u64,
    /// Where the bytes come from.
    pub source: Source,
}

/// The writer-state parameter of an [`Image`] that is only read (the default): no bytes, and no way to
/// open for writing.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReadOnly;

/// Writer states that may be switched to a read-only view of an internal snapshot
/// ([`Image::view_snapshot`]): a read-only image always, a writable one never.
pub trait SnapshotView {
    /// Whether the image is read only.
    fn read_only(&self) -> bool;
}

impl SnapshotView for ReadOnly {
    fn read_only(&self) -> bool {
        true
    }
}

/// An open image and its backing chain.
///
/// Generic over the device `D`, the buffer storage `B` (`&mut [u8]`, arrays, or heap buffers in adapters),
/// the decompressor `C`, the chain capacity `DEPTH`, the metadata slice count `SLICES` and the writer state
/// `W`: the default, [`ReadOnly`], carries no writer state at all (a bootloader that only reads pays nothing
/// for writing); [`crate::WriteState`] makes [`Image::open_writable`] and the write operations available.
///
/// Memory: `size_of::<Image<..>>()` (dominated by `DEPTH * size_of::<Layer<D>>()` and, for
/// [`crate::Inflate`], its state) plus the caller's bounce block and metadata buffer (and the decompressor's
/// window and input buffers). Nothing depends on the image's virtual size, cluster size or L1 size.
#[derive(Debug)]
pub struct Image<
    D,
    B,
    C,
    const DEPTH: usize = DEFAULT_MAX_DEPTH,
    const SLICES: usize = DEFAULT_SLICES,
    W = ReadOnly,
> {
    pub(crate) layers: Vec<Layer<D>, DEPTH>,
    pub(crate) bounce: B,
    pub(crate) cache: SliceCache<B, SLICES>,
    pub(crate) decompressor: C,
    /// Writer state: [`ReadOnly`] (no bytes), or the writer's [`crate::WriteState`].
    pub(crate) w: W,
}

impl Qcow2Meta {
    fn data_raw(&self) -> bool {
        self.header
            .autoclear_features
            .contains(AutoclearFeatures::DATA_FILE_RAW)
    }
}

/// The image at `depth` of the chain.
fn layer_at<D, E>(layers: &mut [Layer<D>], depth: usize) -> Result<&mut Layer<D>, Error<E>> {
    layers.get_mut(depth).ok_or(Error::Unavailable {
        what: "no image at that depth of the backing chain",
    })
}
