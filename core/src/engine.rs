//! The image: open (validate everything), map guest ranges to host runs through the backing chain, read.

use heapless::Vec;

use crate::Error;
use crate::compress::{CompressedSource, DecompressError, Decompressor};
use crate::device::BlockDevice;
use crate::format::bitmap::{DIR_ENTRY_LEN, DirectoryWalk};
use crate::format::{
    AutoclearFeatures, ClusterKind, CompressedDescriptor, CompressionType, ExtensionWalk,
    FEATURE_NAME_ENTRY_LEN, FeatureName, HEADER_READ_LEN, Header, IncompatibleFeatures, L1Entry,
    L2Entry, L2Format, MAGIC, MAX_BACKING_FORMAT_LEN, MAX_BACKING_NAME_LEN, extension,
};
use crate::format::{be32, be64};
use crate::io::{check_block_size, read_bytes};
use crate::meta::SliceCache;

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

/// QEMU's limit on a snapshot table's size.
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 * 1024 * 1024;
/// QEMU's limit on a snapshot entry's extra data.
pub const MAX_SNAPSHOT_EXTRA: u32 = 1024;

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
    /// Past the end of a backing image that is shorter than the image above it: reads as zeros.
    PastEnd,
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

/// An open image and its backing chain.
///
/// Generic over the device `D`, the buffer storage `B` (`&mut [u8]`, arrays, or heap buffers in adapters),
/// the decompressor `C`, the chain capacity `DEPTH` and the metadata slice count `SLICES`.
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
> {
    pub(crate) layers: Vec<Layer<D>, DEPTH>,
    pub(crate) bounce: B,
    pub(crate) cache: SliceCache<B, SLICES>,
    pub(crate) decompressor: C,
    /// Writer state (unused by a read-only image).
    pub(crate) w: crate::write::WriteState,
}

fn corrupt<E>(what: &'static str, offset: u64) -> Error<E> {
    Error::Corrupt { what, offset }
}

/// Reads the qcow2 header and extensions of `dev` and validates them.
pub(crate) fn open_qcow2<D: BlockDevice>(
    dev: &mut D,
    bounce: &mut [u8],
    file_size: u64,
) -> Result<Qcow2Meta, Error<D::Error>> {
    let mut first = [0u8; HEADER_READ_LEN];
    let n = usize::try_from(file_size)
        .unwrap_or(usize::MAX)
        .min(HEADER_READ_LEN);
    read_bytes(dev, bounce, 0, first.get_mut(..n).unwrap_or(&mut []))?;
    let header = Header::parse(first.get(..n).unwrap_or(&[]))?;
    let mut meta = Qcow2Meta {
        header,
        l2: L2Format {
            cluster_bits: header.cluster_bits,
            v3: header.version >= 3,
            extended: header.extended_l2(),
            external_data: header
                .incompatible_features
                .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE),
        },
        backing_name: (header.backing_file_offset != 0).then_some(StoredName {
            offset: header.backing_file_offset,
            len: header.backing_file_size,
        }),
        backing_format: None,
        data_file_name: None,
        feature_table: None,
        bitmaps: None,
    };
    // Header extensions: the one walk of the extension area (format::ExtensionWalk), as check sees them.
    {
        let mut walk = ExtensionWalk::new(&header);
        while let Some(off) = walk.next_at() {
            let mut raw = [0u8; 8];
            read_bytes(dev, bounce, off, &mut raw)?;
            let Some(ext) = walk.advance::<D::Error>(raw)? else {
                break;
            };
            let data = ext.data_at;
            match ext.magic {
                extension::BACKING_FORMAT => {
                    let len = ext.len as usize;
                    if len > MAX_BACKING_FORMAT_LEN {
                        return Err(Error::InvalidHeader {
                            field: "backing format extension length",
                            value: ext.len.into(),
                            problem: "backing format name is longer than 15 bytes",
                        });
                    }
                    let mut name = [0u8; MAX_BACKING_FORMAT_LEN];
                    read_bytes(dev, bounce, data, name.get_mut(..len).unwrap_or(&mut []))?;
                    meta.backing_format = Some((name, len as u8));
                }
                extension::FEATURE_NAME_TABLE => {
                    meta.feature_table = Some(StoredName {
                        offset: data,
                        len: ext.len,
                    });
                }
                extension::BITMAPS => {
                    if ext.len != BitmapsExtension::LEN {
                        return Err(Error::InvalidHeader {
                            field: "bitmaps extension length",
                            value: ext.len.into(),
                            problem: "must be 24",
                        });
                    }
                    // Without the autoclear bit the extension is stale: QEMU ignores it.
                    if header
                        .autoclear_features
                        .contains(AutoclearFeatures::BITMAPS)
                    {
                        let mut b = [0u8; 24];
                        read_bytes(dev, bounce, data, &mut b)?;
                        let ext = BitmapsExtension::parse(&b, header.cluster_size(), ext.header_at)
                            .map_err(|(problem, value)| Error::InvalidHeader {
                                field: "bitmaps extension",
                                value,
                                problem,
                            })?;
                        validate_bitmap_directory(dev, bounce, &header, &ext)?;
                        meta.bitmaps = Some(ext);
                    }
                }
                extension::DATA_FILE => {
                    if ext.len as usize > MAX_DATA_FILE_NAME_LEN {
                        return Err(Error::InvalidHeader {
                            field: "data file extension length",
                            value: ext.len.into(),
                            problem: "external data file name is longer than 1023 bytes",
                        });
                    }
                    meta.data_file_name = Some(StoredName {
                        offset: data,
                        len: ext.len,
                    });
                }
                _ => {}
            }
        }
    }
    let unknown = header.unknown_incompatible();
    if unknown != 0 {
        let bit = unknown.trailing_zeros() as u8;
        let name = feature_name(dev, bounce, meta.feature_table, 0, bit)?;
        return Err(Error::UnknownIncompatibleFeature { bit, name });
    }
    if meta.l2.external_data && meta.backing_name.is_some() && meta.data_raw() {
        return Err(Error::InvalidHeader {
            field: "autoclear_features",
            value: header.autoclear_features.bits(),
            problem: "a raw external data file cannot have a backing file",
        });
    }
    Ok(meta)
}

impl Qcow2Meta {
    fn data_raw(&self) -> bool {
        self.header
            .autoclear_features
            .contains(AutoclearFeatures::DATA_FILE_RAW)
    }
}

/// Reads the bitmap directory `ext` names and validates every entry as QEMU does when it opens the image
/// (`bitmap_list_load`): at most [`crate::format::bitmap::MAX_BITMAPS`] entries of a directory of at most
/// 64 MiB, each table within QEMU's size limits. The tables themselves are not read.
pub(crate) fn validate_bitmap_directory<D: BlockDevice>(
    dev: &mut D,
    bounce: &mut [u8],
    header: &Header,
    ext: &BitmapsExtension,
) -> Result<(), Error<D::Error>> {
    let invalid = |(problem, value)| Error::InvalidHeader {
        field: "bitmap directory entry",
        value,
        problem,
    };
    let mut walk = DirectoryWalk::new(ext, header.cluster_size(), header.size);
    while let Some(at) = walk.next_at() {
        let mut raw = [0u8; DIR_ENTRY_LEN];
        read_bytes(dev, bounce, at, &mut raw)?;
        walk.advance(&raw).map_err(invalid)?;
    }
    walk.finish().map_err(invalid)
}

/// The image at `depth` of the chain.
fn layer_at<D, E>(layers: &mut [Layer<D>], depth: usize) -> Result<&mut Layer<D>, Error<E>> {
    layers.get_mut(depth).ok_or(Error::Unavailable {
        what: "no image at that depth of the backing chain",
    })
}

/// Looks a feature up in the feature name table.
fn feature_name<D: BlockDevice>(
    dev: &mut D,
    bounce: &mut [u8],
    table: Option<StoredName>,
    ty: u8,
    bit: u8,
) -> Result<FeatureName, Error<D::Error>> {
    let Some(table) = table else {
        return Ok(FeatureName::EMPTY);
    };
    let entries = table.len as usize / FEATURE_NAME_ENTRY_LEN;
    for i in 0..entries {
        let mut e = [0u8; FEATURE_NAME_ENTRY_LEN];
        let at = table
            .offset
            .saturating_add((i.saturating_mul(FEATURE_NAME_ENTRY_LEN)) as u64);
        read_bytes(dev, bounce, at, &mut e)?;
        let (t, b, name) = FeatureName::parse_entry(&e);
        if t == ty && b == bit {
            return Ok(name);
        }
    }
    Ok(FeatureName::EMPTY)
}

/// Reads the compressed bytes of one cluster from a device.
struct DeviceSource<'a, D: BlockDevice> {
    dev: &'a mut D,
    bounce: &'a mut [u8],
    pos: u64,
    remaining: u64,
    error: Option<D::Error>,
}

impl<D: BlockDevice> CompressedSource for DeviceSource<'_, D> {
    fn remaining(&self) -> u64 {
        self.remaining
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, DecompressError> {
        let n = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let dst = buf.get_mut(..n).ok_or(DecompressError::Source)?;
        match read_bytes(self.dev, self.bounce, self.pos, dst) {
            Ok(()) => {}
            Err(Error::Io(e)) => {
                self.error = Some(e);
                return Err(DecompressError::Source);
            }
            Err(_) => return Err(DecompressError::Corrupt("unreadable compressed data")),
        }
        self.pos = self.pos.saturating_add(n as u64);
        self.remaining = self.remaining.saturating_sub(n as u64);
        Ok(n)
    }
}

impl<D, B, C, const DEPTH: usize, const SLICES: usize> Image<D, B, C, DEPTH, SLICES>
where
    D: BlockDevice,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// Opens the qcow2 image on `dev` and, through `resolver`, its backing chain and external data files.
    ///
    /// Validates the header, the extensions and every table's placement; refuses unknown incompatible
    /// features (naming them), encryption, and chains longer than `DEPTH`. A backing file whose format is not
    /// declared is probed (qcow2 magic, else raw); a probed qcow2 backing file that names a backing file of its
    /// own is refused rather than followed.
    pub fn open<R: Resolver<D>>(
        dev: D,
        buffers: Buffers<B>,
        decompressor: C,
        resolver: &mut R,
    ) -> Result<Self, Error<D::Error>> {
        Self::open_as(dev, Format::Qcow2, buffers, decompressor, resolver)
    }

    /// Like [`Image::open`], for an image of the given format (a raw image has no metadata and no chain).
    pub fn open_as<R: Resolver<D>>(
        dev: D,
        format: Format,
        buffers: Buffers<B>,
        decompressor: C,
        resolver: &mut R,
    ) -> Result<Self, Error<D::Error>> {
        let Buffers {
            mut bounce,
            metadata,
        } = buffers;
        let cache = SliceCache::new(metadata)?;
        let mut layers = Vec::new();
        Self::open_chain(&mut layers, dev, format, bounce.as_mut(), resolver)?;
        Ok(Image {
            layers,
            bounce,
            cache,
            decompressor,
            w: crate::write::WriteState::default(),
        })
    }

    /// Opens the image on `dev` and its backing chain into `layers` (empty on entry), for [`Image::open_as`]
    /// and [`Image::open_writable`], which then build the image value once, where they return it. Each layer
    /// is appended to `layers` first and completed there, so no frame holds a copy of a layer either.
    pub(crate) fn open_chain<R: Resolver<D>>(
        layers: &mut Vec<Layer<D>, DEPTH>,
        dev: D,
        format: Format,
        bounce: &mut [u8],
        resolver: &mut R,
    ) -> Result<(), Error<D::Error>> {
        let (mut dev, mut format, mut probed) = (dev, format, false);
        loop {
            // One call site: the layer's code is there once.
            Self::open_layer(layers, dev, format, probed, bounce, resolver)?;
            let count = layers.len();
            let depth = count.saturating_sub(1);
            let Some(last) = layers.last_mut() else { break };
            let Some(meta) = last.meta.as_ref() else {
                break;
            };
            let Some(stored) = meta.backing_name else {
                break;
            };
            if last.probed {
                return Err(Error::Unavailable {
                    what: "a backing file whose format was probed as qcow2 names a backing file of its own; \
                           refusing to follow it (declare the format with backing_fmt)",
                });
            }
            if count >= DEPTH {
                return Err(Error::ChainTooDeep { limit: DEPTH });
            }
            let declared = meta.backing_format;
            let declared = declared
                .as_ref()
                .map(|(b, l)| b.get(..usize::from(*l)).unwrap_or(&[]));
            let request = FileRequest {
                depth,
                name: &[],
                format: declared,
            };
            dev = open_named(&mut last.dev, bounce, stored, true, request, resolver)?;
            (format, probed) = match declared {
                Some(f) => (
                    Format::from_name(f).ok_or(Error::Unsupported {
                        what: "backing file format",
                        value: 0,
                    })?,
                    false,
                ),
                None => (probe(&mut dev, bounce)?, true),
            };
        }
        Ok(())
    }

    /// Opens the image on `dev` (at depth `layers.len()` of the chain) and appends it to `layers`.
    fn open_layer<R: Resolver<D>>(
        layers: &mut Vec<Layer<D>, DEPTH>,
        mut dev: D,
        format: Format,
        probed: bool,
        bounce: &mut [u8],
        resolver: &mut R,
    ) -> Result<(), Error<D::Error>> {
        let depth = layers.len();
        check_block_size(dev.block_size(), bounce.len())?;
        let file_size = dev.size()?;
        // Appended first and completed in place (on an error the caller drops the whole chain).
        layers
            .push(Layer {
                dev,
                data: None,
                format,
                meta: None,
                // Like QEMU, a raw image's size is its length rounded up to a sector; the tail reads as
                // zeros. A qcow2 image's is set from its header below.
                size: file_size.checked_next_multiple_of(512).unwrap_or(file_size),
                file_size,
                probed,
            })
            .map_err(|_| Error::ChainTooDeep { limit: DEPTH })?;
        if format == Format::Raw {
            return Ok(());
        }
        let layer = layers
            .last_mut()
            .ok_or(Error::ChainTooDeep { limit: DEPTH })?;
        let meta = layer
            .meta
            .insert(open_qcow2(&mut layer.dev, bounce, file_size)?);
        layer.size = meta.header.size;
        match meta.data_file_name {
            Some(stored) if meta.l2.external_data => {
                let request = FileRequest {
                    depth,
                    name: &[],
                    format: None,
                };
                let mut d = open_named(&mut layer.dev, bounce, stored, false, request, resolver)?;
                check_block_size(d.block_size(), bounce.len())?;
                let _ = d.size()?;
                layer.data = Some(d);
            }
            None if meta.l2.external_data => {
                return Err(Error::Unavailable {
                    what: "the image needs an external data file but does not name one",
                });
            }
            _ => {}
        }
        Ok(())
    }

    /// The virtual disk's size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.layers.first().map_or(0, |l| l.size)
    }

    /// The images of the chain, the opened one first.
    pub fn layers(&self) -> &[Layer<D>] {
        &self.layers
    }

    /// Metadata cache (hits, misses).
    pub fn cache_stats(&self) -> (u64, u64) {
        self.cache.stats()
    }

    /// Reads a name stored in the first cluster of the image at `depth` into `buf`.
    pub fn read_stored_name<'b>(
        &mut self,
        depth: usize,
        name: StoredName,
        buf: &'b mut [u8],
    ) -> Result<&'b [u8], Error<D::Error>> {
        let layer = layer_at(&mut self.layers, depth)?;
        let dst = buf
            .get_mut(..name.len as usize)
            .ok_or(Error::BufferTooSmall {
                what: "name buffer",
                need: name.len.into(),
                have: 0,
            })?;
        read_bytes(&mut layer.dev, self.bounce.as_mut(), name.offset, dst)?;
        Ok(dst)
    }

    /// Asks the device of the image at `depth` (or its external data file) whether a host range holds data.
    pub fn host_status(
        &mut self,
        depth: usize,
        external: bool,
        host: u64,
        len: u64,
    ) -> Result<crate::device::DeviceExtent, Error<D::Error>> {
        let layer = layer_at(&mut self.layers, depth)?;
        let dev = if external {
            layer.data.as_mut().unwrap_or(&mut layer.dev)
        } else {
            &mut layer.dev
        };
        Ok(dev.block_status(host, len)?)
    }

    /// Reads the internal snapshot table entry at host offset `at` of the qcow2 image at `depth` (the first
    /// is at the header's `snapshots_offset`). Returns the entry and the offset of the next one. The id and
    /// name stay on disk: read them with [`Image::read_stored_name`].
    pub fn read_snapshot(
        &mut self,
        depth: usize,
        at: u64,
    ) -> Result<(SnapshotEntry, u64), Error<D::Error>> {
        let Image { layers, bounce, .. } = self;
        let layer = layer_at(layers, depth)?;
        let meta = layer.meta.ok_or(Error::Unsupported {
            what: "snapshots of a raw image",
            value: 0,
        })?;
        let h = meta.header;
        let table_end = h.snapshots_offset.saturating_add(MAX_SNAPSHOT_TABLE_BYTES);
        let mut fixed = [0u8; 40];
        read_bytes(&mut layer.dev, bounce.as_mut(), at, &mut fixed)?;
        let id_len = u32::from(u16::try_from(be32(&fixed, 12) >> 16).unwrap_or(0));
        let name_len = be32(&fixed, 12) & 0xffff;
        let extra_len = be32(&fixed, 36);
        if extra_len > MAX_SNAPSHOT_EXTRA {
            return Err(corrupt(
                "snapshot table entry has more than 1024 bytes of extra data",
                at,
            ));
        }
        let mut extra = [0u8; 24];
        let extra_read = (extra_len as usize).min(extra.len());
        let extra_at = at.saturating_add(40);
        read_bytes(
            &mut layer.dev,
            bounce.as_mut(),
            extra_at,
            extra.get_mut(..extra_read).unwrap_or(&mut []),
        )?;
        let id_at = extra_at.saturating_add(extra_len.into());
        let name_at = id_at.saturating_add(id_len.into());
        let end = name_at.saturating_add(name_len.into());
        let next = end.checked_next_multiple_of(8).unwrap_or(u64::MAX);
        if next > table_end {
            return Err(corrupt("snapshot table is larger than 64 MiB", at));
        }
        let entry = SnapshotEntry {
            l1_table_offset: be64(&fixed, 0),
            l1_size: be32(&fixed, 8),
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64(&fixed, 24),
            vm_state_size: if extra_len >= 8 {
                be64(&extra, 0)
            } else {
                u64::from(be32(&fixed, 32))
            },
            disk_size: (extra_len >= 16).then(|| be64(&extra, 8)),
            icount: (extra_len >= 24)
                .then(|| be64(&extra, 16))
                .filter(|&i| i != u64::MAX),
            id: StoredName {
                offset: id_at,
                len: id_len,
            },
            name: StoredName {
                offset: name_at,
                len: name_len,
            },
        };
        Ok((entry, next))
    }

    /// The refcount of host cluster `cluster` of the qcow2 image at `depth` (0 where no refcount block covers
    /// it).
    pub fn refcount(&mut self, depth: usize, cluster: u64) -> Result<u64, Error<D::Error>> {
        let Image {
            layers,
            bounce,
            cache,
            ..
        } = self;
        let layer = layer_at(layers, depth)?;
        let meta = layer.meta.ok_or(Error::Unsupported {
            what: "refcounts of a raw image",
            value: 0,
        })?;
        let h = meta.header;
        let block_bits = h
            .cluster_bits
            .saturating_add(3)
            .saturating_sub(h.refcount_order);
        let table_index = cluster >> block_bits;
        let table_entries =
            u64::from(h.refcount_table_clusters) << h.cluster_bits.saturating_sub(3);
        if table_index >= table_entries {
            return Ok(0);
        }
        let slice_len = (cache.slot_size() as u64).min(h.cluster_size());
        let byte = table_index.saturating_mul(8);
        let slice_start = byte & !slice_len.wrapping_sub(1);
        let host = h.refcount_table_offset.saturating_add(slice_start);
        let slice = cache.get(
            &mut layer.dev,
            bounce.as_mut(),
            depth as u8,
            host,
            slice_len as usize,
        )?;
        let word = be64(slice, byte.saturating_sub(slice_start) as usize);
        if word & crate::format::REFTABLE_RESERVED_MASK != 0 {
            return Err(corrupt("refcount table entry has reserved bits set", host));
        }
        let block = word & crate::format::REFTABLE_OFFSET_MASK;
        if block == 0 {
            return Ok(0);
        }
        if block & h.cluster_size().wrapping_sub(1) != 0 {
            return Err(corrupt(
                "refcount block offset is not cluster-aligned",
                block,
            ));
        }
        // Bit offset of the entry inside the block, then the slice holding it.
        let index = cluster & (1u64 << block_bits).wrapping_sub(1);
        let bit = index << h.refcount_order;
        let slice_bits = slice_len.saturating_mul(8);
        let slice_start = (bit & !slice_bits.wrapping_sub(1)) >> 3;
        let slice = cache.get(
            &mut layer.dev,
            bounce.as_mut(),
            depth as u8,
            block.saturating_add(slice_start),
            slice_len as usize,
        )?;
        let in_slice = (index & (slice_bits >> h.refcount_order).wrapping_sub(1)) as usize;
        crate::format::refcount_get(slice, h.refcount_order, in_slice)
            .ok_or(corrupt("refcount index", block))
    }

    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<(), Error<D::Error>> {
        let size = self.virtual_size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    /// Maps the guest range starting at `offset` (at most `max_len` bytes, within the virtual disk) to its
    /// first run: the image of the chain that supplies it and where. Contiguous pieces with the same source
    /// (data at consecutive host offsets, zeros, unallocated) merge into one run.
    pub fn map_guest_range(
        &mut self,
        offset: u64,
        max_len: u64,
    ) -> Result<Mapping, Error<D::Error>> {
        self.reader().map_from(0, offset, max_len)
    }

    /// Reads `buf.len()` guest bytes at `offset`.
    ///
    /// Each run of contiguous allocated clusters is one device read straight into `buf`; zero and
    /// unallocated runs are filled; compressed clusters stream through the decompressor into `buf`.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Error<D::Error>> {
        self.check_range(offset, buf.len() as u64)?;
        self.reader().read(offset, buf)
    }

    pub(crate) fn reader(&mut self) -> Reader<'_, D, B, C, SLICES> {
        Reader {
            layers: &mut self.layers,
            bounce: self.bounce.as_mut(),
            cache: &mut self.cache,
            decompressor: &mut self.decompressor,
        }
    }
}

/// The parts of an [`Image`] that reading needs, borrowed one by one so that a writer can lend the rest of
/// the bounce buffer out as a copy buffer while it reads.
pub(crate) struct Reader<'a, D, B, C, const SLICES: usize> {
    pub(crate) layers: &'a mut [Layer<D>],
    pub(crate) bounce: &'a mut [u8],
    pub(crate) cache: &'a mut SliceCache<B, SLICES>,
    pub(crate) decompressor: &'a mut C,
}

impl<D, B, C, const SLICES: usize> Reader<'_, D, B, C, SLICES>
where
    D: BlockDevice,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    fn virtual_size(&self) -> u64 {
        self.layers.first().map_or(0, |l| l.size)
    }

    /// [`Image::map_guest_range`], starting the walk at image `first` of the chain.
    pub(crate) fn map_from(
        &mut self,
        first: usize,
        offset: u64,
        max_len: u64,
    ) -> Result<Mapping, Error<D::Error>> {
        let len = max_len.min(self.virtual_size().saturating_sub(offset));
        if len == 0 {
            return Err(Error::OutOfRange {
                offset,
                len: max_len,
                size: self.virtual_size(),
            });
        }
        let mut limit = len;
        let count = self.layers.len();
        for depth in first..count {
            let Reader {
                layers,
                bounce,
                cache,
                ..
            } = self;
            let Some(layer) = layers.get_mut(depth) else {
                break;
            };
            if offset >= layer.size {
                return Ok(Mapping {
                    depth,
                    len: limit,
                    source: Source::PastEnd,
                });
            }
            limit = limit.min(layer.size.saturating_sub(offset));
            let (source, run) = match layer.meta {
                None => (
                    Source::Data {
                        host: offset,
                        external: false,
                    },
                    limit,
                ),
                Some(ref meta) => {
                    map_qcow2(meta, &mut layer.dev, cache, bounce, depth, offset, limit)?
                }
            };
            if !matches!(source, Source::Unallocated { .. }) || depth.saturating_add(1) >= count {
                return Ok(Mapping {
                    depth,
                    len: run,
                    source,
                });
            }
            limit = run;
        }
        Ok(Mapping {
            depth: count.saturating_sub(1),
            len: limit,
            source: Source::Unallocated { host: None },
        })
    }

    /// Reads guest bytes (the range must lie inside the virtual disk).
    pub(crate) fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Error<D::Error>> {
        let mut pos = offset;
        let mut rest = buf;
        while !rest.is_empty() {
            let m = self.map_from(0, pos, rest.len() as u64)?;
            let n = usize::try_from(m.len).unwrap_or(usize::MAX).min(rest.len());
            let (head, tail) = rest.split_at_mut(n);
            self.read_run(m, head)?;
            pos = pos.saturating_add(n as u64);
            rest = tail;
        }
        Ok(())
    }

    fn read_run(&mut self, m: Mapping, out: &mut [u8]) -> Result<(), Error<D::Error>> {
        let Reader {
            layers,
            bounce,
            decompressor,
            ..
        } = self;
        match m.source {
            Source::Zero { .. } | Source::PastEnd | Source::Unallocated { .. } => {
                out.fill(0);
                Ok(())
            }
            Source::Data { host, external } => {
                let layer = layers.get_mut(m.depth).ok_or(corrupt("chain", 0))?;
                let dev = if external {
                    layer.data.as_mut().ok_or(corrupt("data file", host))?
                } else {
                    &mut layer.dev
                };
                read_bytes(dev, bounce, host, out)
            }
            Source::Compressed { descriptor, skip } => {
                let layer = layers.get_mut(m.depth).ok_or(corrupt("chain", 0))?;
                let meta = layer
                    .meta
                    .ok_or(corrupt("compressed cluster in a raw image", 0))?;
                let cluster_size = meta.header.cluster_size() as usize;
                // Bytes past the end of the device read as zeros (as QEMU reads them); the descriptor's length is at
                // most two clusters, so this stays bounded.
                let available = descriptor.len;
                let mut src = DeviceSource {
                    dev: &mut layer.dev,
                    bounce,
                    pos: descriptor.offset,
                    remaining: available,
                    error: None,
                };
                let key = (m.depth as u8, descriptor.offset);
                let ty = meta.header.compression_type;
                let res =
                    decompressor.decompress(ty, key, &mut src, cluster_size, skip as usize, out);
                match res {
                    Ok(()) => Ok(()),
                    Err(DecompressError::Source) => match src.error.take() {
                        Some(e) => Err(Error::Io(e)),
                        None => Err(Error::Decompress {
                            offset: descriptor.offset,
                            problem: "unreadable",
                        }),
                    },
                    Err(DecompressError::Corrupt(problem)) => Err(Error::Decompress {
                        offset: descriptor.offset,
                        problem,
                    }),
                    Err(DecompressError::Unsupported(what)) => Err(Error::Unsupported {
                        what,
                        value: match ty {
                            CompressionType::Deflate => 0,
                            CompressionType::Zstd => 1,
                        },
                    }),
                }
            }
        }
    }
}

/// Reads the file name `stored` from `dev` and asks `resolver` for that file (the backing file when
/// `backing`, else the external data file), with `request`'s depth and format.
///
/// Always inlined: with a resolver that refuses every file ([`NoFiles`]) the compiler then drops what
/// follows a backing file (about 0.7 KiB of thumbv7em code), and on the Cortex-M target the one frame of
/// the caller needs less stack than the two frames would.
#[inline(always)]
fn open_named<D: BlockDevice, R: Resolver<D>>(
    dev: &mut D,
    bounce: &mut [u8],
    stored: StoredName,
    backing: bool,
    request: FileRequest<'_>,
    resolver: &mut R,
) -> Result<D, Error<D::Error>> {
    const _: () = assert!(MAX_BACKING_NAME_LEN <= NAME_BUF && MAX_DATA_FILE_NAME_LEN <= NAME_BUF);
    let mut buf = [0u8; NAME_BUF];
    let name = buf.get_mut(..stored.len as usize).unwrap_or(&mut []);
    read_bytes(dev, bounce, stored.offset, name)?;
    let request = FileRequest { name, ..request };
    if backing {
        resolver.backing_file(request)
    } else {
        resolver.data_file(request)
    }
}

/// Probes a backing file's format: qcow2 if it starts with qcow2's magic, raw otherwise.
fn probe<D: BlockDevice>(dev: &mut D, bounce: &mut [u8]) -> Result<Format, Error<D::Error>> {
    check_block_size(dev.block_size(), bounce.len())?;
    let mut magic = [0u8; 4];
    if dev.size()? >= 4 {
        read_bytes(dev, bounce, 0, &mut magic)?;
    }
    Ok(if u32::from_be_bytes(magic) == MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// The state of one (sub)cluster as a run source, for `pos` inside it.
fn piece_source(kind: ClusterKind, in_cluster: u64, external: bool) -> Source {
    match kind {
        ClusterKind::Unallocated => Source::Unallocated { host: None },
        ClusterKind::Zero { host } => Source::Zero {
            host: host.map(|h| h.saturating_add(in_cluster)),
            external,
        },
        ClusterKind::Data { host } => Source::Data {
            host: host.saturating_add(in_cluster),
            external,
        },
        ClusterKind::Compressed(descriptor) => Source::Compressed {
            descriptor,
            skip: in_cluster,
        },
    }
}

/// Whether a piece with source `next` continues a run with source `run` that is `run_len` bytes long.
fn continues(run: Source, run_len: u64, next: Source) -> bool {
    match (run, next) {
        (Source::Unallocated { host: None }, Source::Unallocated { host: None }) => true,
        (Source::Unallocated { host: Some(a) }, Source::Unallocated { host: Some(b) }) => {
            a.checked_add(run_len) == Some(b)
        }
        (
            Source::Data {
                host: a,
                external: x,
            },
            Source::Data {
                host: b,
                external: y,
            },
        ) => x == y && a.checked_add(run_len) == Some(b),
        (Source::Zero { host: None, .. }, Source::Zero { host: None, .. }) => true,
        (
            Source::Zero {
                host: Some(a),
                external: x,
            },
            Source::Zero {
                host: Some(b),
                external: y,
            },
        ) => x == y && a.checked_add(run_len) == Some(b),
        _ => false,
    }
}

/// Maps the first run of `[pos, pos + limit)` inside one qcow2 image.
fn map_qcow2<D: BlockDevice, B: AsRef<[u8]> + AsMut<[u8]>, const N: usize>(
    meta: &Qcow2Meta,
    dev: &mut D,
    cache: &mut SliceCache<B, N>,
    bounce: &mut [u8],
    depth: usize,
    pos: u64,
    limit: u64,
) -> Result<(Source, u64), Error<D::Error>> {
    let h = &meta.header;
    let cluster_bits = h.cluster_bits;
    let cluster_size = h.cluster_size();
    let coverage_bits = h.l2_coverage_bits();
    let entry_size = h.l2_entry_size();
    let l2_entries = h.l2_entries();
    let sub_size = h.subcluster_size();
    let slice_len = (cache.slot_size() as u64).min(cluster_size);
    let layer = depth as u8;
    let external = meta.l2.external_data;

    let end = pos.saturating_add(limit);
    let mut run: Option<(Source, u64)> = None;
    let mut cur = pos;
    while cur < end {
        // L1 entry (through the slice cache).
        let l1_index = cur >> coverage_bits;
        let l1_span_end = l1_index
            .saturating_add(1)
            .checked_shl(coverage_bits)
            .unwrap_or(u64::MAX)
            .min(end);
        let l2_offset = if l1_index >= u64::from(h.l1_size) {
            None
        } else {
            let byte = l1_index.saturating_mul(8);
            let slice_start = byte & !(slice_len.saturating_sub(1));
            let host = h.l1_table_offset.saturating_add(slice_start);
            let slice = cache.get(dev, bounce, layer, host, slice_len as usize)?;
            let at = byte.saturating_sub(slice_start) as usize;
            let word = be64(slice, at);
            L1Entry(word)
                .l2_offset(cluster_size)
                .map_err(|e| corrupt(e.describe("L1"), h.l1_table_offset.saturating_add(byte)))?
        };
        let Some(l2_offset) = l2_offset else {
            let piece = Source::Unallocated { host: None };
            match run {
                None => run = Some((piece, l1_span_end.saturating_sub(cur))),
                Some((src, len)) if continues(src, len, piece) => {
                    run = Some((src, len.saturating_add(l1_span_end.saturating_sub(cur))));
                }
                Some(_) => break,
            }
            cur = l1_span_end;
            continue;
        };
        // L2 entries of this table, slice by slice.
        while cur < l1_span_end {
            let cluster_index = (cur >> cluster_bits) & l2_entries.wrapping_sub(1);
            let byte = cluster_index.saturating_mul(entry_size);
            let slice_start = byte & !slice_len.wrapping_sub(1);
            let host = l2_offset.saturating_add(slice_start);
            let slice = cache.get(dev, bounce, layer, host, slice_len as usize)?;
            let mut at = byte.saturating_sub(slice_start);
            let mut stop = false;
            while at < slice_len && cur < l1_span_end {
                let entry = L2Entry {
                    word: be64(slice, at as usize),
                    bitmap: if meta.l2.extended {
                        be64(slice, (at as usize).saturating_add(8))
                    } else {
                        0
                    },
                };
                let kind = entry.classify(meta.l2).map_err(|e| {
                    corrupt(
                        e.describe("L2"),
                        l2_offset.saturating_add(slice_start).saturating_add(at),
                    )
                })?;
                let cluster_start = cur & !cluster_size.wrapping_sub(1);
                let cluster_end = cluster_start.saturating_add(cluster_size).min(l1_span_end);
                // Walk the cluster piece by piece (subclusters with extended L2, else the whole cluster).
                while cur < cluster_end {
                    let in_cluster = cur.saturating_sub(cluster_start);
                    let (piece_kind, piece_end) =
                        if meta.l2.extended && !matches!(kind, ClusterKind::Compressed(_)) {
                            let sc = (in_cluster >> sub_size.trailing_zeros()) as u32;
                            let sc_end = cluster_start
                                .saturating_add(
                                    u64::from(sc).saturating_add(1).saturating_mul(sub_size),
                                )
                                .min(cluster_end);
                            (entry.subcluster(kind, sc), sc_end)
                        } else {
                            (kind, cluster_end)
                        };
                    let piece = match (piece_kind, kind) {
                        // An unallocated subcluster of an allocated host cluster keeps its host offset.
                        (ClusterKind::Unallocated, ClusterKind::Data { host }) => {
                            Source::Unallocated {
                                host: Some(host.saturating_add(in_cluster)),
                            }
                        }
                        _ => piece_source(piece_kind, in_cluster, external),
                    };
                    let piece_len = piece_end.saturating_sub(cur);
                    match run {
                        None => run = Some((piece, piece_len)),
                        Some((src, len)) if continues(src, len, piece) => {
                            run = Some((src, len.saturating_add(piece_len)))
                        }
                        Some(_) => {
                            stop = true;
                            break;
                        }
                    }
                    cur = piece_end;
                    if matches!(piece, Source::Compressed { .. }) {
                        stop = true;
                        break;
                    }
                }
                if stop {
                    break;
                }
                at = at.saturating_add(entry_size);
            }
            if stop {
                return Ok(run.unwrap_or((Source::Unallocated { host: None }, limit)));
            }
        }
    }
    Ok(run.unwrap_or((Source::Unallocated { host: None }, limit)))
}
