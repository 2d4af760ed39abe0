//! Writing: the writer's state and the borrowed view of the top image's metadata (`Meta`) that every
//! write operation works through. One concept a file:
//!
//! - `open`: opening for writing (refusing a corrupt image, repairing a dirty one), the start and end of each
//!   request, flush and close.
//! - `guard`: where the image's own metadata lives, verified before the first write and checked before every
//!   write and free.
//! - `writeback`: the crash-safe order in which cached changes reach the device, and the deferred-free queue.
//! - `refcounts`: L1 and refcount table words, refcount lookup and change.
//! - `allocate`: free-cluster search, cluster allocation, new refcount blocks and refcount-table growth.
//! - `l2`: L2 entries through the cache, and what an entry holds when it is dropped.
//! - `data`: guest writes (copy-on-write of partial clusters, allocation of writable L2 tables).
//! - `zeroes`: zero clusters and subclusters, discard.
//! - `compressed`: compressed cluster writes.
//! - `bitmaps`: persistent bitmaps kept up to date by writes (or disowned).
//! - `bitmap_edit`: persistent bitmaps added, removed, cleared, enabled, disabled and merged.
//! - `resize`: growing and shrinking the virtual disk.
//! - `header`: the first cluster rewritten as QEMU lays it out (version, backing file, data file name).
//! - `amend`: header options changed in place (lazy refcounts, version, backing and data file names).
//! - `refcount_order`: another refcount width (the refcount structure rebuilt as QEMU rebuilds it).
//! - `downgrade`: the downgrade to version 2 (zero clusters expanded).
//! - `empty`: emptying an image after a commit.
//! - `snapshots`: creating and deleting internal snapshots.
//! - `encrypted`: writes to encrypted images (data encrypted per sector, partial sectors patched whole), and
//!   the encryption of a new image.
//!
//! Memory stays bounded: nothing here holds more than the caller's buffers, the `WriteState` and a few
//! hundred bytes of stack.

use heapless::Vec;

use crate::Error;
use crate::compress::Decompressor;
use crate::device::BlockDeviceWrite;
use crate::engine::{BitmapsExtension, Buffers, Format, Image, Layer, Reader, Resolver};
use crate::error::corrupt;
use crate::format::bitmap::{BitmapDirEntry, BitmapTableEntry, DIR_ENTRY_LEN, DirectoryWalk};
use crate::format::field;
use crate::format::{
    AutoclearFeatures, ClusterKind, CompatibleFeatures, CompressedDescriptor, Header,
    IncompatibleFeatures, L1Entry, L2Entry, MAX_HOST_OFFSET, MAX_REFTABLE_BYTES, OFFSET_MASK,
    OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, be64, refcount_get, refcount_set,
};
use crate::io::{ceil_div, copy_exact, read_bytes, write_bytes};
use crate::meta::{SliceCache, SliceKind, TableAccess, TableLayout};

mod allocate;
mod amend;
#[cfg(feature = "bitmaps")]
mod bitmap_edit;
mod bitmaps;
mod compressed;
mod data;
mod downgrade;
mod empty;
#[cfg(any(feature = "luks", feature = "aes-legacy"))]
mod encrypted;
mod guard;
mod header;
mod l2;
mod open;
mod refcount_order;
mod refcounts;
mod resize;
mod snapshots;
mod writeback;
mod zeroes;

#[cfg(feature = "bitmaps")]
pub use bitmap_edit::*;
pub use data::Reservation;
pub use downgrade::{
    DOWNGRADE_DATA_FILE, DOWNGRADE_FEATURES, DOWNGRADE_REFCOUNT_BITS, DOWNGRADE_SNAPSHOTS,
    DOWNGRADE_ZSTD,
};
pub use header::{BackingFile, Cluster0Change};
pub use refcount_order::{REFCOUNT_TOO_WIDE, REFCOUNT_WIDTH_NEEDS_V3};
pub use snapshots::NewSnapshot;

/// How many freed host clusters wait for their referencing entries to become durable before the engine
/// writes back and lowers their refcounts.
const PENDING_FREES: usize = 32;
/// Copy buffer used when the bounce buffer has no room beyond one device block.
const STACK_CHUNK: usize = 512;
/// Smallest metadata slice count a writable image needs (an L2 slice and refcount slices dirty at once,
/// plus room to read).
pub const MIN_WRITE_SLICES: usize = 4;

/// All subclusters read as zero (extended L2 bitmap).
const ALL_ZEROES: u64 = 0xffff_ffff_0000_0000;

/// What the writer keeps between requests.
/// The writer's state between requests: the writer-state parameter of an [`Image`] that may be opened for
/// writing (`Image<D, B, C, DEPTH, SLICES, WriteState>`), a few hundred bytes.
#[derive(Debug, Default)]
pub struct WriteState {
    writable: bool,
    /// Device writes happened since the last device flush.
    needs_flush: bool,
    /// No cluster below this index is free (a search starts here).
    free_hint: u64,
    /// The next allocation starts a run of this many new clusters: it is placed past free holes shorter
    /// than that, as QEMU places a write's new clusters (0: the first free cluster).
    #[cfg(feature = "qemu-placement")]
    place: u64,
    /// The next allocations continue a request's host run here, for this many clusters (QEMU's allocation
    /// at the offset right after the cluster before; 0: none).
    #[cfg(feature = "qemu-placement")]
    place_at: (u64, u64),
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
    /// The image's metadata has been verified before the first write ([`guard`]).
    verified: bool,
    /// Length in bytes of the snapshot table (set by the verification).
    snapshot_table_len: u64,
    /// Host clusters that may hold a table named by another table.
    filter: guard::MetadataFilter,
    /// Clusters whose refcount drops to 0 are discarded on the device (while a shrink frees them).
    discard_freed: bool,
    /// The clusters a guest discard or an unmapping zero write gives back are discarded on the device too
    /// ([`Image::pass_discards`]).
    pass_discards: bool,
    /// Which of the first [`bitmaps::TRACKED_BITMAPS`] bitmap directory entries this writer marked in use
    /// (bit `i` for entry `i`): their flag is cleared at a clean close.
    #[cfg(feature = "bitmaps")]
    bitmaps_held: u64,
    /// Which of the held bitmaps guest writes mark (the enabled ones).
    #[cfg(feature = "bitmaps")]
    bitmaps_tracked: u64,
}

impl WriteState {
    /// Whether guest writes set bits in some bitmap (a cheap test before each request's marking).
    fn tracks_bitmaps(&self) -> bool {
        #[cfg(feature = "bitmaps")]
        {
            self.bitmaps_tracked != 0
        }
        #[cfg(not(feature = "bitmaps"))]
        {
            false
        }
    }
}

impl crate::engine::SnapshotView for WriteState {
    fn read_only(&self) -> bool {
        !self.writable
    }
}

/// The source of the bytes a write stores.
#[derive(Clone, Copy)]
enum WriteSource<'a> {
    Bytes(&'a [u8]),
    Zeros,
}

impl<'a> WriteSource<'a> {
    fn sub(self, from: usize, len: usize) -> WriteSource<'a> {
        match self {
            WriteSource::Bytes(b) => {
                WriteSource::Bytes(b.get(from..from.saturating_add(len)).unwrap_or(&[]))
            }
            WriteSource::Zeros => WriteSource::Zeros,
        }
    }
}

/// The top image's geometry and table locations, as the writer uses them (from its header, which the
/// writer keeps up to date when the refcount table moves).
#[derive(Debug, Clone, Copy)]
struct Geometry {
    /// Where the tables are and the cache's slice length, as every reader of them sees it.
    tables: TableLayout,
    cluster_bits: u32,
    l2_entries: u64,
    l2_coverage_bits: u32,
    subcluster_size: u64,
    max_refcount: u64,
}

impl Geometry {
    fn new(h: &Header, slot: usize) -> Geometry {
        Geometry {
            tables: TableLayout::of(h, slot),
            cluster_bits: h.cluster_bits,
            l2_entries: h.l2_entries(),
            l2_coverage_bits: h.l2_coverage_bits(),
            subcluster_size: h.subcluster_size(),
            max_refcount: h.max_refcount(),
        }
    }

    /// Subclusters (or the one piece of a standard cluster) per cluster.
    fn pieces(&self) -> u64 {
        if self.tables.l2_format.extended {
            32
        } else {
            1
        }
    }

    fn piece_size(&self) -> u64 {
        if self.tables.l2_format.extended {
            self.subcluster_size
        } else {
            self.tables.cluster_size
        }
    }
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
    g: Geometry,
    /// The bitmaps extension as the image was opened (live while the header's autoclear bit says so).
    bitmaps: Option<BitmapsExtension>,
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

    // --- Write-back ----------------------------------------------------------------------------------------

    // --- Allocation ----------------------------------------------------------------------------------------

    // --- L2 entries ----------------------------------------------------------------------------------------

    /// Sets the corrupt bit (version 3), stops writing, and returns the error describing why.
    fn mark_corrupt(&mut self, what: &'static str, offset: u64) -> Error<D::Error> {
        self.w.writable = false;
        if self.header.version >= 3 {
            let bits = self.header.incompatible_features | IncompatibleFeatures::CORRUPT;
            if self
                .write_header(field::INCOMPATIBLE_FEATURES, &bits.bits().to_be_bytes())
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

impl<D, B, C, const DEPTH: usize, const SLICES: usize> Image<D, B, C, DEPTH, SLICES, WriteState>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
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
        let g = Geometry::new(&meta.header, cache.slot_size());
        let bitmaps = meta.bitmaps;
        Ok(Meta {
            bitmaps,
            dev: &mut layer.dev,
            data: layer.data.as_mut(),
            header: &mut meta.header,
            bounce: bounce.as_mut(),
            cache,
            w,
            g,
        })
    }

    fn geometry(&mut self) -> Result<Geometry, Error<D::Error>> {
        Ok(self.meta()?.g)
    }
}
