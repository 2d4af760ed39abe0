//! Arbitrary operation sequences on a small in-memory image (64 KiB virtual, 512-byte clusters, 16-bit
//! refcounts): writes, zero writes (with and without unmap), discards, reads, flushes and reopens, with
//! firmware-sized buffers (a 512-byte bounce block, four 512-byte metadata slices). The image must read
//! back exactly as a flat model of the disk, after every read and after a final close and reopen, and `check`
//! must find no corruption and no leak.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_core::check::{self, NoSink};
use qcow2_core::io::MemDeviceFull;
use qcow2_core::testimage::{TINY_LEN, tiny_qcow2};
use qcow2_core::{Buffers, Error, Image, MemDevice, NoDecompressor, NoFiles, WriteState};

const SIZE: usize = 64 * 1024;
const CAPACITY: usize = 2 << 20;

type Img = Image<MemDevice<Vec<u8>>, Vec<u8>, NoDecompressor, 2, 4, WriteState>;

fn open(bytes: Vec<u8>, len: u64) -> Result<Img, Error<MemDeviceFull>> {
    Image::open_writable(
        MemDevice::with_len(bytes, len, 512),
        Buffers {
            bounce: vec![0u8; 512],
            metadata: vec![0u8; 4 * 512],
        },
        NoDecompressor,
        &mut NoFiles,
    )
}

fn close(img: Img) -> (Vec<u8>, u64) {
    let dev = img.close().expect("close");
    let len = dev.content().len() as u64;
    (dev.into_inner(), len)
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = tiny_qcow2().to_vec();
    bytes.resize(CAPACITY, 0);
    let mut img = open(bytes, TINY_LEN as u64).expect("the template opens");
    let mut model = vec![0u8; SIZE];
    for (i, b) in model[..512].iter_mut().enumerate() {
        *b = i as u8;
    }
    for op in data.chunks_exact(6).take(64) {
        let off = (usize::from(u16::from_le_bytes([op[1], op[2]])) % SIZE) as u64;
        let len = (1 + usize::from(u16::from_le_bytes([op[3], op[4]])) % 8192)
            .min(SIZE - off as usize) as u64;
        let (o, l) = (off as usize, len as usize);
        match op[0] % 7 {
            0 | 1 => {
                img.write_at(off, &vec![op[5]; l]).expect("write");
                model[o..o + l].fill(op[5]);
            }
            2 => {
                img.write_zeroes(off, len, op[5] & 1 != 0)
                    .expect("write_zeroes");
                model[o..o + l].fill(0);
            }
            3 => {
                img.discard(off, len).expect("discard");
                let start = o.div_ceil(512) * 512;
                let end = (o + l) / 512 * 512;
                if start < end {
                    model[start..end].fill(0);
                }
            }
            4 => {
                let mut buf = vec![0u8; l];
                img.read_at(off, &mut buf).expect("read");
                assert!(
                    buf == model[o..o + l],
                    "read {off}+{len} differs from the model"
                );
            }
            5 => img.flush().expect("flush"),
            _ => {
                let (bytes, len) = close(img);
                img = open(bytes, len).expect("reopen");
            }
        }
    }
    let (bytes, len) = close(img);
    // What the engine leaves behind is clean: no corruption, no leaked cluster.
    let mut bounce = [0u8; 512];
    let mut scratch = vec![0u8; 4096];
    let report = check::check(
        &mut MemDevice::with_len(&bytes[..], len, 512),
        &mut bounce,
        &mut scratch,
        &mut NoSink,
    )
    .expect("check");
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0),
        "the image is not clean after the sequence"
    );
    let mut img = open(bytes, len).expect("final reopen");
    let mut all = vec![0u8; SIZE];
    img.read_at(0, &mut all).expect("final read");
    assert!(all == model, "final content differs from the model");
});
