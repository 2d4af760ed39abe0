//! `qcow2-alloc`: [`qcow2_core`] with heap-backed buffers, larger caches, and zstd decompression.
//!
//! The engine is the same; this crate only supplies what needs a heap: buffers sized at run time, a
//! metadata cache of megabytes rather than kilobytes, whole-cluster decompression (so reading a compressed
//! cluster in small pieces inflates it once), and zstd through `ruzstd`.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod check;

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;

use qcow2_core::compress::{CompressedSource, DEFLATE_WINDOW, DecompressError};
use qcow2_core::engine::DEFAULT_MAX_DEPTH;
use qcow2_core::format::CompressionType;
use qcow2_core::{BlockDevice, Buffers, Decompressor, Error, Format, Image, Inflate, Resolver};
use ruzstd::decoding::{FrameDecoder, StreamingDecoder};
use ruzstd::io::Read;

/// Metadata slices the heap-backed image caches.
pub const SLICES: usize = 32;
/// Bytes per metadata slice (an L2 slice of 32 KiB maps 4096 clusters).
pub const SLICE_SIZE: usize = 32 * 1024;
/// Bounce block: the largest device block size the engine supports.
pub const BOUNCE_SIZE: usize = qcow2_core::device::MAX_BLOCK_SIZE;

/// An image with heap buffers, zstd, and a 1 MiB metadata cache.
pub type HeapImage<D> = Image<D, Vec<u8>, AllocDecompressor, DEFAULT_MAX_DEPTH, SLICES>;

/// Heap buffers for [`HeapImage`].
pub fn buffers() -> Buffers<Vec<u8>> {
    Buffers {
        bounce: vec![0u8; BOUNCE_SIZE],
        metadata: vec![0u8; SLICES * SLICE_SIZE],
    }
}

/// Opens an image of `format` on `dev` with heap buffers; backing and data files come from `resolver`.
pub fn open<D: BlockDevice, R: Resolver<D>>(
    dev: D,
    format: Format,
    resolver: &mut R,
) -> Result<HeapImage<D>, Error<D::Error>> {
    Image::open_as(
        dev,
        format,
        buffers(),
        AllocDecompressor::default(),
        resolver,
    )
}

/// Deflate with whole-cluster buffers, and zstd. Keeps the last decompressed cluster of each kind.
#[derive(Default)]
pub struct AllocDecompressor {
    inflate: Option<(usize, Inflate<Vec<u8>>)>,
    zstd: Option<Box<FrameDecoder>>,
    zstd_in: Vec<u8>,
    zstd_out: Vec<u8>,
    zstd_kept: Option<(u8, u64)>,
}

impl core::fmt::Debug for AllocDecompressor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("AllocDecompressor").finish_non_exhaustive()
    }
}

impl AllocDecompressor {
    fn zstd_cluster(
        &mut self,
        src: &mut dyn CompressedSource,
        cluster_size: usize,
    ) -> Result<(), DecompressError> {
        let len = usize::try_from(src.remaining())
            .map_err(|_| DecompressError::Corrupt("compressed size"))?;
        self.zstd_in.clear();
        self.zstd_in.resize(len, 0);
        let mut got = 0;
        while got < len {
            let n = src.read(self.zstd_in.get_mut(got..).unwrap_or(&mut []))?;
            if n == 0 {
                break;
            }
            got = got.saturating_add(n);
        }
        self.zstd_in.truncate(got);
        self.zstd_out.clear();
        self.zstd_out.resize(cluster_size, 0);
        let frame = self
            .zstd
            .get_or_insert_with(|| Box::new(FrameDecoder::new()));
        let mut input: &[u8] = &self.zstd_in;
        let mut filled = 0usize;
        // One or more frames, until the cluster is full.
        while filled < cluster_size {
            if input.is_empty() {
                return Err(DecompressError::Corrupt(
                    "zstd data ends before a whole cluster",
                ));
            }
            let mut dec = StreamingDecoder::new_with_decoder(&mut input, &mut **frame)
                .map_err(|_| DecompressError::Corrupt("invalid zstd frame"))?;
            loop {
                let out = self.zstd_out.get_mut(filled..).unwrap_or(&mut []);
                if out.is_empty() {
                    break;
                }
                let n = dec
                    .read(out)
                    .map_err(|_| DecompressError::Corrupt("invalid zstd data"))?;
                if n == 0 {
                    break;
                }
                filled = filled.saturating_add(n);
            }
        }
        Ok(())
    }
}

impl Decompressor for AllocDecompressor {
    fn decompress(
        &mut self,
        ty: CompressionType,
        key: (u8, u64),
        src: &mut dyn CompressedSource,
        cluster_size: usize,
        skip: usize,
        out: &mut [u8],
    ) -> Result<(), DecompressError> {
        match ty {
            CompressionType::Deflate => {
                let window = cluster_size.max(DEFLATE_WINDOW).next_power_of_two();
                let inflate = match &mut self.inflate {
                    Some((w, inflate)) if *w >= window => inflate,
                    slot => {
                        let (_, inflate) = slot.insert((
                            window,
                            Inflate::new(vec![0u8; window], vec![0u8; 64 * 1024]),
                        ));
                        inflate
                    }
                };
                inflate.decompress(ty, key, src, cluster_size, skip, out)
            }
            CompressionType::Zstd => {
                if self.zstd_kept != Some(key) || self.zstd_out.len() != cluster_size {
                    self.zstd_kept = None;
                    self.zstd_cluster(src, cluster_size)?;
                    self.zstd_kept = Some(key);
                }
                let from = self.zstd_out.get(skip..skip.saturating_add(out.len()));
                out.copy_from_slice(
                    from.ok_or(DecompressError::Corrupt("range outside the cluster"))?,
                );
                Ok(())
            }
        }
    }

    fn invalidate(&mut self) {
        if let Some((_, i)) = &mut self.inflate {
            i.invalidate();
        }
        self.zstd_kept = None;
    }
}
