//! Arbitrary bytes as a deflate-compressed cluster: `Inflate` with a window of a whole cluster (inflates and
//! keeps the cluster) and with a 32 KiB ring (streams) must agree: both fail, or both produce the same bytes
//! for the same range of the cluster. Nothing may panic, and every call is bounded by the cluster size.

#![no_main]

use libfuzzer_sys::fuzz_target;
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

fn run(window: usize, cs: usize, skip: usize, len: usize, src: &[u8]) -> Option<Vec<u8>> {
    let mut inflate = Inflate::new(vec![0u8; window], vec![0u8; 512]);
    let mut out = vec![0u8; len];
    inflate
        .decompress(
            CompressionType::Deflate,
            (0, 0),
            &mut Slice(src),
            cs,
            skip,
            &mut out,
        )
        .ok()
        .map(|()| out)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    // 64 KiB clusters: the 32 KiB ring has to stream; 512 B .. 32 KiB otherwise.
    let cs = if data[0] & 1 == 0 {
        65536
    } else {
        512usize << (data[0] >> 1) % 7
    };
    let skip = usize::from(u16::from_le_bytes([data[1], data[2]])) % cs;
    let len = 1 + usize::from(data[3]) * 97 % (cs - skip);
    let src = &data[4..];
    let kept = run(cs.max(32 * 1024), cs, skip, len, src);
    let streamed = run(32 * 1024, cs, skip, len, src);
    if cs > 32 * 1024 {
        assert_eq!(kept, streamed, "keeping and streaming inflate disagree");
    }
});
