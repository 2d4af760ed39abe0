//! Writing: allocation, copy-on-write, zeroes, discard, flush and close.
//!
//! Crash safety follows QEMU's ordering: on-disk refcounts are never below the real number of references,
//! guest data is durable before the L2 entry that points at it, refcount blocks are durable before the L2
//! entries that need them (unless lazy refcounts, where the dirty bit carries that promise), and a cluster's
//! refcount is only decremented once the entry that stopped referencing it is durable.

use crate::Error;
use crate::compress::Decompressor;
use crate::device::BlockDeviceWrite;
use crate::engine::{Buffers, Image, Resolver};

impl<D, B, C, const DEPTH: usize, const SLICES: usize> Image<D, B, C, DEPTH, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// Opens the qcow2 image on `dev` for reading and writing (its backing chain stays read-only).
    ///
    /// Refuses images with the corrupt bit set. A dirty image (lazy refcounts) has its refcounts rebuilt
    /// before this returns. Unknown autoclear bits (and the bitmaps bit: the engine does not update bitmaps)
    /// are cleared before the first write.
    pub fn open_writable<R: Resolver<D>>(
        dev: D,
        buffers: Buffers<B>,
        decompressor: C,
        resolver: &mut R,
    ) -> Result<Self, Error<D::Error>> {
        let _ = (dev, buffers, decompressor, resolver);
        Err(Error::ReadOnly)
    }

    /// Writes `buf` at guest `offset` (any size and alignment).
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Error<D::Error>> {
        let _ = (offset, buf);
        Err(Error::ReadOnly)
    }

    /// Makes `len` bytes at guest `offset` read as zeros: with the zero flag (or subcluster zero bits) where
    /// whole (sub)clusters are covered, with written zeros elsewhere. With `unmap`, zeroed clusters give their
    /// host clusters back.
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), Error<D::Error>> {
        let _ = (offset, len, unmap);
        Err(Error::ReadOnly)
    }

    /// Discards `len` bytes at guest `offset`: whole clusters inside the range are freed (and read as zeros
    /// afterwards where the format can say so); partial clusters are left alone.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), Error<D::Error>> {
        let _ = (offset, len);
        Err(Error::ReadOnly)
    }

    /// Stores one whole guest cluster at the cluster-aligned guest `offset` as `compressed` (the cluster's
    /// content compressed with the image's compression type, shorter than a cluster). The caller compresses;
    /// data that does not compress should go through [`Image::write_at`] instead.
    pub fn write_compressed(
        &mut self,
        offset: u64,
        compressed: &[u8],
    ) -> Result<(), Error<D::Error>> {
        let _ = (offset, compressed);
        Err(Error::ReadOnly)
    }

    /// Writes back every cached metadata change in crash-safe order and flushes the device.
    pub fn flush(&mut self) -> Result<(), Error<D::Error>> {
        Err(Error::ReadOnly)
    }

    /// Flushes, clears the dirty bit (lazy refcounts) and gives the device back.
    pub fn close(self) -> Result<D, Error<D::Error>> {
        Err(Error::ReadOnly)
    }
}
