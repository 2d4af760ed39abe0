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

// The files: `options` (what may be asked, and the header it gives) and `header_cluster` (cluster 0's layout,
// and writing it) say what the image will be; `builder` holds it while it is made and does the device I/O;
// `refcounts` reads and sets refcount entries with it; `allocation` replays QEMU's cluster allocator on
// those; `preallocation` allocates L2 tables and data clusters with that. No file uses one that uses it.
mod allocation;
mod builder;
mod header_cluster;
pub mod measure;
mod options;
mod preallocation;
mod refcounts;

pub use options::{Compat, CreateOptions, OptionError, Preallocation};

use crate::Error;
use crate::device::BlockDeviceWrite;
use crate::error::corrupt;
use builder::Builder;

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
    let mut header = opts.header().map_err(OptionError::into_error)?;
    let cluster_size = header.cluster_size();
    // Step 1: the refcount table is cluster 1, one cluster long.
    header.refcount_table_offset = cluster_size;
    header.refcount_table_clusters = 1;
    let mut builder = Builder::new(dev, bounce, header);
    // Header cluster, refcount table and the first refcount block, all zeroed; then table entry 0 and
    // refcount 1 for the three clusters (QEMU allocates them through its normal allocator).
    builder.zero(0, cluster_size.saturating_mul(3))?;
    builder.set_refcount_block_offset(0, cluster_size.saturating_mul(2))?;
    let first = builder.alloc_clusters(3)?;
    if first != 0 {
        return Err(corrupt(
            "header clusters not at the start of the image",
            builder.cluster_offset(first),
        ));
    }
    // Step 2: the L1 table (only its entries are written).
    if header.l1_size > 0 {
        let l1_bytes = u64::from(header.l1_size).saturating_mul(8);
        let l1 = builder.alloc_clusters(l1_bytes.div_ceil(cluster_size))?;
        let l1_offset = builder.cluster_offset(l1);
        builder.header.l1_table_offset = l1_offset;
        builder.zero(l1_offset, l1_bytes)?;
    }
    // Step 3: preallocation.
    let data_file = opts.data_file.is_some();
    match opts.preallocation {
        Preallocation::Off if opts.data_file_raw => builder.preallocate_metadata(true)?,
        Preallocation::Off => {}
        Preallocation::Metadata => builder.preallocate_metadata(data_file)?,
        Preallocation::Falloc | Preallocation::Full if data_file => {
            builder.preallocate_metadata(true)?
        }
        Preallocation::Falloc => builder.preallocate_full(false)?,
        Preallocation::Full => builder.preallocate_full(true)?,
    }
    // Step 4: cluster 0.
    builder.write_header_cluster(&opts.header_cluster())?;
    builder.device.flush()?;
    Ok(builder.file_end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDevice;

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
