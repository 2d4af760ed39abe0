//! The image under construction: a [`Builder`] holds the header as it will be written (the geometry, and
//! where the L1 table and the refcount table are so far) and the allocator state QEMU keeps in memory, and
//! streams every write to the device through the caller's bounce block, remembering how long the file gets.

use core::ops::Range;

use crate::Error;
use crate::device::BlockDeviceWrite;
use crate::format::Header;
use crate::io::{read_bytes, write_bytes};

/// Stack buffer for streamed writes (the largest buffer `create` holds besides the caller's bounce block).
pub(super) const CHUNK: usize = 4096;

/// `a / b`, 0 when `b` is 0.
pub(super) fn div(a: u64, b: u64) -> u64 {
    a.checked_div(b).unwrap_or(0)
}

/// `a % b`, 0 when `b` is 0.
pub(super) fn rem(a: u64, b: u64) -> u64 {
    a.checked_rem(b).unwrap_or(0)
}

/// A layout that does not fit in host offsets (or a buffer bound that cannot fail, failing).
pub(super) fn overflow<E>() -> Error<E> {
    Error::Unsupported {
        what: "image layout beyond the largest host offset",
        value: 0,
    }
}

/// QEMU's allocator state and the header being built, replayed against the device.
pub(super) struct Builder<'d, 'b, D> {
    pub(super) device: &'d mut D,
    pub(super) bounce: &'b mut [u8],
    /// The header as it will be written: geometry from the options, and the L1 and refcount tables'
    /// places as they are allocated.
    pub(super) header: Header,
    /// QEMU's `free_cluster_index`: where the search for free clusters starts.
    pub(super) free_cluster_index: u64,
    /// Every cluster at or past this one has refcount 0.
    pub(super) allocated_end: u64,
    /// Clusters known to be in use (the preallocated data area), skipped without reading their refcounts.
    pub(super) known_used: Range<u64>,
    /// Length of the file QEMU leaves behind: the end of the furthest write or truncation.
    pub(super) file_end: u64,
}

impl<'d, 'b, D: BlockDeviceWrite> Builder<'d, 'b, D> {
    /// A builder for `header` on an empty device: nothing allocated, nothing written.
    pub(super) fn new(device: &'d mut D, bounce: &'b mut [u8], header: Header) -> Self {
        Builder {
            device,
            bounce,
            header,
            free_cluster_index: 0,
            allocated_end: 0,
            known_used: 0..0,
            file_end: 0,
        }
    }

    /// Host offset of cluster index `cluster`.
    pub(super) fn cluster_offset(&self, cluster: u64) -> u64 {
        cluster.saturating_mul(self.header.cluster_size())
    }

    /// Clusters of guest space (the virtual size in clusters, the last one partial).
    pub(super) fn guest_clusters(&self) -> u64 {
        self.header.size.div_ceil(self.header.cluster_size())
    }

    /// Refcount entries in one refcount block.
    pub(super) fn refcount_block_entries(&self) -> u64 {
        1u64 << (self.header.refcount_block_bits() & 63)
    }

    pub(super) fn write(&mut self, offset: u64, bytes: &[u8]) -> Result<(), Error<D::Error>> {
        write_bytes(self.device, self.bounce, offset, bytes)?;
        let end = offset.saturating_add(bytes.len() as u64);
        self.file_end = self.file_end.max(end);
        Ok(())
    }

    pub(super) fn read(&mut self, offset: u64, bytes: &mut [u8]) -> Result<(), Error<D::Error>> {
        read_bytes(self.device, self.bounce, offset, bytes)
    }

    pub(super) fn read_be64(&mut self, offset: u64) -> Result<u64, Error<D::Error>> {
        let mut bytes = [0u8; 8];
        self.read(offset, &mut bytes)?;
        Ok(u64::from_be_bytes(bytes))
    }

    /// Writes `len` bytes made of `pattern` repeated (its length must divide [`CHUNK`]).
    pub(super) fn fill(
        &mut self,
        offset: u64,
        len: u64,
        pattern: &[u8],
    ) -> Result<(), Error<D::Error>> {
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

    pub(super) fn zero(&mut self, offset: u64, len: u64) -> Result<(), Error<D::Error>> {
        self.fill(offset, len, &[0])
    }
}
