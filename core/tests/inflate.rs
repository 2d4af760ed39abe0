//! Inflate on damaged streams: a cluster whose deflate stream ends early fails every read of it, whether the
//! whole cluster is kept (a window of a cluster or more) or streamed through a 32 KiB ring.

use qcow2_core::Inflate;
use qcow2_core::compress::{CompressedSource, DecompressError, Decompressor};
use qcow2_core::format::CompressionType;

struct Slice<'a>(&'a [u8]);

impl CompressedSource for Slice<'_> {
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

fn read(
    window: usize,
    src: &[u8],
    cs: usize,
    skip: usize,
    len: usize,
) -> Result<Vec<u8>, DecompressError> {
    let mut inflate = Inflate::new(vec![0u8; window], vec![0u8; 512]);
    let mut out = vec![0u8; len];
    inflate.decompress(
        CompressionType::Deflate,
        (0, 0),
        &mut Slice(src),
        cs,
        skip,
        &mut out,
    )?;
    Ok(out)
}

/// Found by the `inflate` fuzz target: a fixed-Huffman block holding one literal, never finished.
#[test]
fn truncated_stream_fails_in_both_modes() {
    let src = [0x0a, 0x00, 0x5b];
    for window in [65536, 32768] {
        assert!(read(window, &src, 65536, 0, 1).is_err(), "window {window}");
        assert!(
            read(window, &src, 65536, 0, 65536).is_err(),
            "window {window}"
        );
    }
}

#[test]
fn whole_stream_reads_the_same_in_both_modes() {
    let plain: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
    // Stored deflate blocks: valid deflate without a compressor.
    let mut packed = Vec::new();
    let chunks: Vec<_> = plain.chunks(20000).collect();
    for (i, c) in chunks.iter().enumerate() {
        packed.push(u8::from(i + 1 == chunks.len()));
        packed.extend_from_slice(&(c.len() as u16).to_le_bytes());
        packed.extend_from_slice(&(!(c.len() as u16)).to_le_bytes());
        packed.extend_from_slice(c);
    }
    // A stream cut short in its last block fails, kept or streamed, even for bytes before the cut.
    let cut = &packed[..packed.len() - 100];
    assert!(read(65536, cut, 65536, 0, 10).is_err());
    assert!(read(32768, cut, 65536, 0, 10).is_err());
    for (skip, len) in [(0, 1), (1000, 5000), (40000, 25536), (65535, 1)] {
        let kept = read(65536, &packed, 65536, skip, len).unwrap();
        let streamed = read(32768, &packed, 65536, skip, len).unwrap();
        assert_eq!(kept, streamed);
        assert_eq!(kept, plain[skip..skip + len]);
    }
}

/// Found by the `inflate` fuzz target: a stream whose back-reference reaches before the start of the output.
/// Inflating the whole cluster fails ("distance too far back"); streaming through the 32 KiB ring read stale
/// ring bytes instead and succeeded, so a partial read of the cluster returned garbage. The ring is now filled
/// as a plain buffer until it is full, and both fail.
#[test]
fn back_reference_before_the_start_fails_in_both_modes() {
    // The fuzz input: 4 bytes choosing the cluster size and range, then the deflate stream.
    let data = include_bytes!("data/inflate-distance-before-start.bin");
    let src = &data[4..];
    for (skip, len) in [(0, 98), (0, 65536), (100, 4096), (60000, 5536)] {
        for window in [65536, 32768] {
            assert!(
                read(window, src, 65536, skip, len).is_err(),
                "window {window}, bytes {skip}..{}",
                skip + len
            );
        }
    }
}
