//! `qcow2-alloc`: [`qcow2_core`] with heap-backed buffers, larger caches, and zstd decompression.
//!
//! The engine is the same; this crate only supplies what needs a heap: buffers sized at run time, a
//! metadata cache of megabytes rather than kilobytes, whole-cluster decompression (so reading a compressed
//! cluster in small pieces inflates it once), and zstd through `ruzstd`.
//!
//! For writes it also supplies the compression the engine leaves to its caller: [`compress_cluster`] turns
//! one guest cluster into what [`Image::write_compressed`] stores: raw deflate through zlib-rs with QEMU's
//! settings (level 6, a 4 KiB window, which QEMU's inflater requires), or zstd (ruzstd's encoder; libzstd with
//! the `zstd-c` feature).

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod check;

#[cfg(not(feature = "zstd-c"))]
use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;

use qcow2_core::compress::{CompressedSource, DEFLATE_WINDOW, DecompressError};
use qcow2_core::engine::DEFAULT_MAX_DEPTH;
use qcow2_core::format::CompressionType;
use qcow2_core::{
    BlockDevice, BlockDeviceWrite, Buffers, Decompressor, Error, Format, Image, Inflate, Resolver,
    WriteState,
};
#[cfg(not(feature = "zstd-c"))]
use ruzstd::decoding::{FrameDecoder, StreamingDecoder};
#[cfg(not(feature = "zstd-c"))]
use ruzstd::encoding::{CompressionLevel, compress_to_vec};
#[cfg(not(feature = "zstd-c"))]
use ruzstd::io::Read;

/// Metadata slices the heap-backed image caches.
pub const SLICES: usize = 32;
/// Bytes per metadata slice (an L2 slice of 32 KiB maps 4096 clusters).
pub const SLICE_SIZE: usize = 32 * 1024;
/// Bounce block: the largest device block size the engine supports.
pub const BOUNCE_SIZE: usize = qcow2_core::device::MAX_BLOCK_SIZE;

/// An image with heap buffers, zstd, and a 1 MiB metadata cache.
pub type HeapImage<D> = Image<D, Vec<u8>, AllocDecompressor, DEFAULT_MAX_DEPTH, SLICES, WriteState>;

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

/// Opens the qcow2 image on `dev` for reading and writing with heap buffers (its backing chain, from
/// `resolver`, stays read-only).
pub fn open_writable<D: BlockDeviceWrite, R: Resolver<D>>(
    dev: D,
    resolver: &mut R,
) -> Result<HeapImage<D>, Error<D::Error>> {
    Image::open_writable(dev, buffers(), AllocDecompressor::default(), resolver)
}

/// Compresses one guest cluster (`data`, exactly one cluster) the way the image's compression type `ty`
/// says, for [`Image::write_compressed`].
///
/// Returns `None` when the cluster does not compress into at most `data.len() - 1` bytes: QEMU's rule
/// (the compressed data must be shorter than a cluster), and the caller then writes the cluster
/// uncompressed. Deflate never refers back more than 4 KiB, so QEMU (which inflates with a 4 KiB window)
/// reads what this writes.
pub fn compress_cluster(ty: CompressionType, data: &[u8]) -> Option<Vec<u8>> {
    let limit = data.len().checked_sub(1)?;
    match ty {
        CompressionType::Deflate => deflate_raw(data, limit),
        // libzstd at its default level, as QEMU compresses (several times faster than ruzstd's encoder).
        #[cfg(feature = "zstd-c")]
        CompressionType::Zstd => {
            let mut out = Vec::with_capacity(limit);
            let n = zstd_safe::compress(&mut out, data, zstd_safe::CLEVEL_DEFAULT).ok()?;
            (n <= limit).then_some(out)
        }
        #[cfg(not(feature = "zstd-c"))]
        CompressionType::Zstd => {
            let out = compress_to_vec(data, CompressionLevel::Fastest);
            (out.len() <= limit).then_some(out)
        }
    }
}

/// Raw deflate of `data` as QEMU compresses a cluster (zlib's `deflateInit2` with the default level, a 4 KiB
/// window, memory level 9, the default strategy), when the result fits in `limit` bytes.
fn deflate_raw(data: &[u8], limit: usize) -> Option<Vec<u8>> {
    let mut out = vec![0u8; limit];
    let config = zlib_rs::DeflateConfig {
        level: 6,
        method: zlib_rs::Method::Deflated,
        window_bits: -12,
        mem_level: 9,
        strategy: zlib_rs::Strategy::Default,
    };
    let (done, code) = zlib_rs::compress_slice(&mut out, data, config);
    if code != zlib_rs::ReturnCode::Ok {
        return None;
    }
    let n = done.len();
    out.truncate(n);
    Some(out)
}

/// Deflate with whole-cluster buffers, and zstd (ruzstd, or libzstd with the `zstd-c` feature). Keeps the last
/// decompressed cluster of each kind; a whole-cluster zstd read with libzstd goes straight into the caller's buffer.
#[derive(Default)]
pub struct AllocDecompressor {
    inflate: Option<(usize, Inflate<Vec<u8>>)>,
    #[cfg(not(feature = "zstd-c"))]
    zstd: Option<Box<FrameDecoder>>,
    zstd_in: Vec<u8>,
    zstd_out: Vec<u8>,
    zstd_kept: Option<(u8, u64)>,
    #[cfg(feature = "zstd-c")]
    zstd_c: Option<zstd_safe::DCtx<'static>>,
    #[cfg(feature = "deflate-c")]
    deflate_c: Option<libdeflater::Decompressor>,
    /// The last cluster inflated by libdeflate for a partial read, and its key.
    #[cfg(feature = "deflate-c")]
    deflate_kept: Option<(u8, u64)>,
    #[cfg(feature = "deflate-c")]
    deflate_out: Vec<u8>,
}

/// Compressed bytes already in memory, as a [`CompressedSource`].
#[cfg(feature = "deflate-c")]
struct InMemory<'a>(&'a [u8]);

#[cfg(feature = "deflate-c")]
impl CompressedSource for InMemory<'_> {
    fn remaining(&self) -> u64 {
        self.0.len() as u64
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, DecompressError> {
        let n = buf.len().min(self.0.len());
        let (head, tail) = self.0.split_at(n);
        buf.get_mut(..n)
            .ok_or(DecompressError::Source)?
            .copy_from_slice(head);
        self.0 = tail;
        Ok(n)
    }
}

impl core::fmt::Debug for AllocDecompressor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("AllocDecompressor").finish_non_exhaustive()
    }
}

impl AllocDecompressor {
    /// Reads the whole compressed cluster into `zstd_in`.
    fn zstd_input(&mut self, src: &mut dyn CompressedSource) -> Result<(), DecompressError> {
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
        Ok(())
    }

    /// Decompresses the cluster in `zstd_in` into `out` (one whole cluster) with libzstd, the way QEMU does:
    /// streamed until the cluster is full (frames may follow one another; bytes after them are ignored).
    #[cfg(feature = "zstd-c")]
    fn zstd_c_into(&mut self, out: &mut [u8]) -> Result<(), DecompressError> {
        use zstd_safe::{DCtx, InBuffer, OutBuffer, ResetDirective};
        let dctx = self.zstd_c.get_or_insert_with(DCtx::create);
        dctx.reset(ResetDirective::SessionOnly)
            .map_err(|_| DecompressError::Corrupt("invalid zstd frame"))?;
        let total = out.len();
        let mut output = OutBuffer::around(out);
        let mut input = InBuffer::around(&self.zstd_in);
        while output.pos() < total {
            let (in_pos, out_pos) = (input.pos(), output.pos());
            dctx.decompress_stream(&mut output, &mut input)
                .map_err(|_| DecompressError::Corrupt("invalid zstd data"))?;
            if input.pos() <= in_pos && output.pos() <= out_pos {
                return Err(DecompressError::Corrupt(
                    "zstd data ends before a whole cluster",
                ));
            }
        }
        Ok(())
    }

    /// Inflates the cluster in `zstd_in` into `out` (one whole cluster) with libdeflate. A stream that holds
    /// more than a cluster (QEMU takes its first cluster) goes through miniz_oxide instead, which stops there.
    #[cfg(feature = "deflate-c")]
    fn deflate_c_into(&mut self, key: (u8, u64), out: &mut [u8]) -> Result<(), DecompressError> {
        let dec = self
            .deflate_c
            .get_or_insert_with(libdeflater::Decompressor::new);
        match dec.deflate_decompress(&self.zstd_in, out) {
            Ok(n) if n == out.len() => Ok(()),
            Ok(_) => Err(DecompressError::Corrupt(
                "stream ends before a whole cluster",
            )),
            Err(libdeflater::DecompressionError::BadData) => {
                Err(DecompressError::Corrupt("invalid deflate stream"))
            }
            Err(libdeflater::DecompressionError::InsufficientSpace) => {
                let cluster_size = out.len();
                let window = cluster_size.max(DEFLATE_WINDOW).next_power_of_two();
                let mut inflate = Inflate::new(vec![0u8; window], vec![0u8; 64 * 1024]);
                let mut src = InMemory(&self.zstd_in);
                inflate.decompress(
                    CompressionType::Deflate,
                    key,
                    &mut src,
                    cluster_size,
                    0,
                    out,
                )
            }
        }
    }

    fn zstd_cluster(
        &mut self,
        src: &mut dyn CompressedSource,
        cluster_size: usize,
    ) -> Result<(), DecompressError> {
        self.zstd_input(src)?;
        self.zstd_out.clear();
        self.zstd_out.resize(cluster_size, 0);
        #[cfg(feature = "zstd-c")]
        {
            let mut out = core::mem::take(&mut self.zstd_out);
            let r = self.zstd_c_into(&mut out);
            self.zstd_out = out;
            r
        }
        #[cfg(not(feature = "zstd-c"))]
        self.zstd_rust(cluster_size)
    }

    /// Decompresses the cluster in `zstd_in` into `zstd_out` (one cluster long) with ruzstd.
    #[cfg(not(feature = "zstd-c"))]
    fn zstd_rust(&mut self, cluster_size: usize) -> Result<(), DecompressError> {
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
            #[cfg(feature = "deflate-c")]
            CompressionType::Deflate => {
                if skip == 0 && out.len() == cluster_size {
                    self.deflate_kept = None;
                    self.zstd_input(src)?;
                    return self.deflate_c_into(key, out);
                }
                if self.deflate_kept != Some(key) || self.deflate_out.len() != cluster_size {
                    self.deflate_kept = None;
                    self.zstd_input(src)?;
                    let mut whole = core::mem::take(&mut self.deflate_out);
                    whole.clear();
                    whole.resize(cluster_size, 0);
                    let r = self.deflate_c_into(key, &mut whole);
                    self.deflate_out = whole;
                    r?;
                    self.deflate_kept = Some(key);
                }
                let from = self.deflate_out.get(skip..skip.saturating_add(out.len()));
                out.copy_from_slice(
                    from.ok_or(DecompressError::Corrupt("range outside the cluster"))?,
                );
                Ok(())
            }
            #[cfg(not(feature = "deflate-c"))]
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
                // A whole cluster goes straight into the caller's buffer.
                #[cfg(feature = "zstd-c")]
                if skip == 0 && out.len() == cluster_size {
                    self.zstd_kept = None;
                    self.zstd_input(src)?;
                    return self.zstd_c_into(out);
                }
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
        #[cfg(feature = "deflate-c")]
        {
            self.deflate_kept = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Bytes<'a>(&'a [u8]);
    impl CompressedSource for Bytes<'_> {
        fn remaining(&self) -> u64 {
            self.0.len() as u64
        }
        fn read(&mut self, buf: &mut [u8]) -> Result<usize, DecompressError> {
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn cluster(size: usize) -> Vec<u8> {
        (0..size)
            .map(|i| {
                if i % 1000 < 600 {
                    (i / 1000) as u8
                } else {
                    (i * 7 % 13) as u8
                }
            })
            .collect()
    }

    #[test]
    fn compressed_clusters_read_back_through_the_decompressor() {
        for ty in [CompressionType::Deflate, CompressionType::Zstd] {
            for size in [512usize, 4096, 65536, 2 << 20] {
                let data = cluster(size);
                let c = compress_cluster(ty, &data).expect("compressible");
                assert!(c.len() < size);
                // Trailing bytes after the stream are normal (the descriptor counts whole sectors).
                let mut padded = c.clone();
                padded.resize(c.len().div_ceil(512) * 512 + 511, 0xee);
                let mut out = vec![0u8; size];
                AllocDecompressor::default()
                    .decompress(ty, (0, 1), &mut Bytes(&padded), size, 0, &mut out)
                    .unwrap();
                assert!(out == data, "{ty:?} {size}");
            }
        }
    }

    /// `len` bytes of xorshift noise.
    fn noise(mut x: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Noise blocks that repeat further back than 4 KiB: a 32 KiB window would refer back to them.
    fn far_repeats(size: usize) -> Vec<u8> {
        let block = noise(0x9e37_79b9_7f4a_7c15, 3000);
        (0..size)
            .map(|i| {
                if i % 6000 < 3000 {
                    block[i % 6000]
                } else {
                    (i % 7) as u8
                }
            })
            .collect()
    }

    /// What an inflater with a 4 KiB window (zlib, windowBits -12) makes of a stream when it hands out its
    /// output 512 bytes at a time, so that nothing further back than the window is there to refer to.
    fn inflate_4k(stream: &[u8], size: usize) -> Option<Vec<u8>> {
        let mut inf = zlib_rs::Inflate::new(false, 12);
        let mut out = Vec::with_capacity(size);
        let mut chunk = [0u8; 512];
        let mut input = stream;
        while out.len() < size {
            let (in0, out0) = (inf.total_in(), inf.total_out());
            let st = inf
                .decompress(input, &mut chunk, zlib_rs::InflateFlush::NoFlush)
                .ok()?;
            let used = (inf.total_in() - in0) as usize;
            let made = (inf.total_out() - out0) as usize;
            out.extend_from_slice(&chunk[..made]);
            input = &input[used..];
            if st == zlib_rs::Status::StreamEnd || (used == 0 && made == 0) {
                break;
            }
        }
        Some(out)
    }

    #[test]
    fn deflate_clusters_keep_to_qemus_4k_window() {
        for size in [512usize, 4096, 65536, 2 << 20] {
            let mut inputs = vec![cluster(size)];
            if size > 6000 {
                inputs.push(far_repeats(size));
            }
            for data in inputs {
                let c = compress_cluster(CompressionType::Deflate, &data).expect("compressible");
                assert!(c.len() < size);
                assert!(inflate_4k(&c, size).as_deref() == Some(&data[..]), "{size}");
            }
        }
        // The check can fail: with a 32 KiB window the same data refers too far back for QEMU.
        let data = far_repeats(65536);
        let mut wide = vec![0u8; 65536];
        let config = zlib_rs::DeflateConfig {
            window_bits: -15,
            ..zlib_rs::DeflateConfig::default()
        };
        let (wide, _) = zlib_rs::compress_slice(&mut wide, &data, config);
        assert!(inflate_4k(wide, 65536).is_none());
    }

    #[test]
    fn a_deflate_stream_longer_than_a_cluster_yields_its_first_cluster() {
        // QEMU takes the first cluster of such a stream; libdeflate alone would refuse it.
        let data = cluster(8192);
        let c = miniz_oxide::deflate::compress_to_vec(&data, 6);
        for (skip, len) in [(0usize, 4096usize), (1000, 100)] {
            let mut out = vec![0u8; len];
            AllocDecompressor::default()
                .decompress(
                    CompressionType::Deflate,
                    (0, 1),
                    &mut Bytes(&c),
                    4096,
                    skip,
                    &mut out,
                )
                .unwrap();
            assert!(out == data[skip..skip + len]);
        }
    }

    #[test]
    fn incompressible_clusters_are_refused() {
        let noise = noise(88172645463325252, 65536);
        assert!(compress_cluster(CompressionType::Deflate, &noise).is_none());
        assert!(compress_cluster(CompressionType::Zstd, &noise).is_none());
        assert!(compress_cluster(CompressionType::Deflate, &[]).is_none());
        assert!(compress_cluster(CompressionType::Deflate, &[0]).is_none());
    }
}
