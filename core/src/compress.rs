//! Decompression of compressed clusters: streamed inflate into the caller's buffer, no allocation.
//!
//! The engine hands a [`Decompressor`] a [`CompressedSource`] (the compressed bytes, read from the device on
//! demand) and the part of the decompressed cluster it wants. [`Inflate`] does deflate with miniz_oxide in
//! bounded memory: with a window of at least one cluster it decompresses whole clusters and keeps the last one
//! (so small reads of one cluster inflate it once); with a smaller window (32 KiB or more, a power of two) it
//! streams through a ring and stops as soon as the wanted bytes are out. A read of a whole cluster always
//! inflates straight into the caller's buffer. zstd needs a heap and comes from `qcow2-alloc`.

use miniz_oxide::inflate::TINFLStatus;
use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};

use crate::format::CompressionType;

/// The deflate window: a ring smaller than this cannot inflate arbitrary streams.
pub const DEFLATE_WINDOW: usize = 32 * 1024;

/// Why a compressed cluster could not be decompressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DecompressError {
    /// Reading the compressed bytes failed (the engine keeps the device's error).
    Source,
    /// This decompressor cannot do it (compression type, or buffers too small).
    Unsupported(&'static str),
    /// The data is not a valid stream, or does not yield a whole cluster.
    Corrupt(&'static str),
}

/// The compressed bytes of one cluster, read on demand.
pub trait CompressedSource {
    /// Bytes still available (the descriptor's length, cut at the end of the device).
    fn remaining(&self) -> u64;
    /// Reads the next compressed bytes into `buf`; returns how many (0 once nothing remains).
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, DecompressError>;
}

/// What the engine needs from a decompressor.
pub trait Decompressor {
    /// Decompresses the cluster that `src` yields and writes its bytes `skip .. skip + out.len()` into `out`.
    /// `key` identifies the compressed cluster (image in the chain, host offset) so that an implementation can
    /// keep the last one; `cluster_size` is the decompressed size.
    fn decompress(
        &mut self,
        ty: CompressionType,
        key: (u8, u64),
        src: &mut dyn CompressedSource,
        cluster_size: usize,
        skip: usize,
        out: &mut [u8],
    ) -> Result<(), DecompressError>;

    /// Forgets any kept cluster (the engine calls it when compressed clusters may have changed).
    fn invalidate(&mut self) {}
}

/// A decompressor lent to an image: the caller keeps the decompressor (and its state, about 11 KiB for
/// [`Inflate`]) and lends it to one image at a time, instead of moving it into the image value.
impl<T: Decompressor + ?Sized> Decompressor for &mut T {
    fn decompress(
        &mut self,
        ty: CompressionType,
        key: (u8, u64),
        src: &mut dyn CompressedSource,
        cluster_size: usize,
        skip: usize,
        out: &mut [u8],
    ) -> Result<(), DecompressError> {
        (**self).decompress(ty, key, src, cluster_size, skip, out)
    }

    fn invalidate(&mut self) {
        (**self).invalidate();
    }
}

/// A decompressor for builds that read no compressed images: every compressed cluster is refused.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoDecompressor;

impl Decompressor for NoDecompressor {
    fn decompress(
        &mut self,
        _ty: CompressionType,
        _key: (u8, u64),
        _src: &mut dyn CompressedSource,
        _cluster_size: usize,
        _skip: usize,
        _out: &mut [u8],
    ) -> Result<(), DecompressError> {
        Err(DecompressError::Unsupported(
            "compressed clusters (this build has no decompressor)",
        ))
    }
}

/// Streamed deflate in caller-supplied buffers.
///
/// Memory: `size_of::<Inflate<B>>()` (about 11 KiB of inflate state) plus `window` plus `input`.
pub struct Inflate<B> {
    state: DecompressorOxide,
    window: B,
    input: B,
    kept: Option<(u8, u64)>,
}

impl<B> core::fmt::Debug for Inflate<B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Inflate")
            .field("kept", &self.kept)
            .finish_non_exhaustive()
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> Inflate<B> {
    /// `window`: a power of two of at least [`DEFLATE_WINDOW`] bytes, or at least one cluster (then whole
    /// clusters are inflated and the last one kept). `input`: compressed bytes are read in pieces of this size
    /// (512 bytes or more is sensible).
    pub fn new(window: B, input: B) -> Self {
        Inflate {
            state: DecompressorOxide::new(),
            window,
            input,
            kept: None,
        }
    }
}

/// Inflates `total` bytes (one whole cluster) from `src` into `ring`. Without `dest`, `ring` is the whole
/// cluster (non-wrapping) and must be filled; with `dest`, `ring` is a power-of-two window used as a ring and
/// the bytes `skip .. skip + want` of the output are copied into `dest` as they come out. Either way the
/// stream must yield the whole cluster (as QEMU requires), so a damaged cluster fails every read of it, not
/// only the reads past the damage.
#[allow(clippy::too_many_arguments)]
fn inflate_into(
    state: &mut DecompressorOxide,
    input: &mut [u8],
    src: &mut dyn CompressedSource,
    ring: &mut [u8],
    mut dest: Option<&mut [u8]>,
    skip: usize,
    want: usize,
    total: usize,
) -> Result<(), DecompressError> {
    if input.is_empty() {
        return Err(DecompressError::Unsupported(
            "inflate input buffer is empty",
        ));
    }
    let wrapping = dest.is_some();
    if wrapping && (!ring.len().is_power_of_two() || ring.len() < DEFLATE_WINDOW) {
        return Err(DecompressError::Unsupported(
            "inflate window must be a power of two of 32 KiB or more",
        ));
    }
    state.init();
    let end = skip
        .checked_add(want)
        .ok_or(DecompressError::Corrupt("range overflow"))?;
    let mask = ring.len().wrapping_sub(1);
    let mut produced = 0usize;
    let (mut in_pos, mut in_len) = (0usize, 0usize);
    loop {
        if in_pos >= in_len && src.remaining() > 0 {
            in_len = src.read(input)?;
            in_pos = 0;
        }
        let more = src.remaining() > 0;
        let mut flags = 0;
        if more {
            flags |= inflate_flags::TINFL_FLAG_HAS_MORE_INPUT;
        }
        // The ring is filled from its start before it wraps: until then the output is inflated as a plain
        // buffer, so that a back-reference to before the start of the stream fails as it does for a whole
        // cluster (a wrapping buffer would read stale ring bytes instead). Once the ring is full, every
        // distance deflate allows (32 KiB at most) has its history in the ring.
        let linear = !wrapping || produced < ring.len();
        if linear {
            flags |= inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
        }
        let out_pos = if linear { produced } else { produced & mask };
        let chunk = input.get(in_pos..in_len).unwrap_or(&[]);
        let (status, used, written) = decompress(state, chunk, ring, out_pos, flags);
        in_pos = in_pos.saturating_add(used);
        if let Some(dest) = dest.as_deref_mut() {
            // Copy what this step produced and the caller wants: [produced, produced + written) and [skip, end).
            let lo = produced.max(skip);
            let hi = produced.saturating_add(written).min(end);
            if lo < hi {
                let from = ring.get(
                    out_pos.saturating_add(lo.saturating_sub(produced))
                        ..out_pos.saturating_add(hi.saturating_sub(produced)),
                );
                let to = dest.get_mut(lo.saturating_sub(skip)..hi.saturating_sub(skip));
                if let (Some(from), Some(to)) = (from, to) {
                    crate::io::copy_exact(to, from);
                }
            }
        }
        produced = produced.saturating_add(written);
        if produced >= total.max(end) {
            return Ok(());
        }
        match status {
            TINFLStatus::Done => {
                return Err(DecompressError::Corrupt(
                    "stream ends before a whole cluster",
                ));
            }
            TINFLStatus::HasMoreOutput if !wrapping => {
                return Err(DecompressError::Corrupt("inflate output buffer full"));
            }
            TINFLStatus::HasMoreOutput => {}
            TINFLStatus::NeedsMoreInput | TINFLStatus::FailedCannotMakeProgress => {
                if !more && in_pos >= in_len {
                    return Err(DecompressError::Corrupt(
                        "compressed data ends before a whole cluster",
                    ));
                }
            }
            _ => return Err(DecompressError::Corrupt("invalid deflate stream")),
        }
        if written == 0 && used == 0 && !more {
            return Err(DecompressError::Corrupt(
                "compressed data ends before a whole cluster",
            ));
        }
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> Decompressor for Inflate<B> {
    fn decompress(
        &mut self,
        ty: CompressionType,
        key: (u8, u64),
        src: &mut dyn CompressedSource,
        cluster_size: usize,
        skip: usize,
        out: &mut [u8],
    ) -> Result<(), DecompressError> {
        if ty != CompressionType::Deflate {
            crate::logging::log_at!(
                warn,
                "qcow2: compressed cluster at host offset {}: zstd needs the qcow2-alloc adapter",
                key.1
            );
            return Err(DecompressError::Unsupported(
                "zstd compression (needs the qcow2-alloc adapter)",
            ));
        }
        let want = out.len();
        if skip.checked_add(want).is_none_or(|e| e > cluster_size) {
            return Err(DecompressError::Corrupt("range outside the cluster"));
        }
        let Inflate {
            state,
            window,
            input,
            kept,
        } = self;
        let input = input.as_mut();
        if skip == 0 && want == cluster_size {
            return inflate_into(state, input, src, out, None, 0, want, want);
        }
        let window = window.as_mut();
        if let Some(whole) = window.get_mut(..cluster_size) {
            if *kept != Some(key) {
                crate::logging::log_at!(
                    trace,
                    "qcow2: inflating compressed cluster at host offset {} (layer {})",
                    key.1,
                    key.0
                );
                *kept = None;
                inflate_into(
                    state,
                    input,
                    src,
                    whole,
                    None,
                    0,
                    cluster_size,
                    cluster_size,
                )?;
                *kept = Some(key);
            }
            let from = whole.get(skip..skip.saturating_add(want));
            crate::io::copy_exact(
                out,
                from.ok_or(DecompressError::Corrupt("range outside the cluster"))?,
            )
            .ok_or(DecompressError::Corrupt("range outside the cluster"))?;
            return Ok(());
        }
        inflate_into(
            state,
            input,
            src,
            window,
            Some(out),
            skip,
            want,
            cluster_size,
        )
    }

    fn invalidate(&mut self) {
        self.kept = None;
    }
}
