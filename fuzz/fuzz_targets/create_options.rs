//! `create` with arbitrary options on an in-memory device: options that `validate` refuses must make
//! `create` fail; options it accepts must give an image that opens, reads as zeros where sampled, checks clean
//! (no corruption, no leak), and takes a write that reads back. Sizes are kept to what a memory device holds.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_core::check::{self, NoSink};
use qcow2_core::create::{Compat, CreateOptions, Preallocation, create};
use qcow2_core::format::CompressionType;
use qcow2_core::{Buffers, Image, MemDevice, NoDecompressor, NoFiles, WriteState};

const CAPACITY: usize = 8 << 20;

fuzz_target!(|data: &[u8]| {
    let b = |i: usize| data.get(i).copied().unwrap_or(0);
    let size = u64::from(u32::from_le_bytes([b(0), b(1), b(2), 0])) * 512 % (4 << 20);
    let cluster_size = match b(3) % 16 {
        // Mostly valid sizes, sometimes nonsense.
        n @ 0..=12 => 512u64 << n.min(12),
        13 => 3000,
        14 => 0,
        _ => 4 << 20,
    };
    let refcount_bits = match b(4) % 9 {
        7 => 3,
        8 => 128,
        n => 1u32 << n,
    };
    let flags = b(5);
    let opts = CreateOptions {
        size,
        cluster_size,
        compat: if flags & 1 != 0 {
            Compat::V2
        } else {
            Compat::V3
        },
        refcount_bits,
        lazy_refcounts: flags & 2 != 0,
        extended_l2: flags & 4 != 0,
        compression_type: if flags & 8 != 0 {
            CompressionType::Zstd
        } else {
            CompressionType::Deflate
        },
        preallocation: match b(6) % 4 {
            0 => Preallocation::Off,
            1 => Preallocation::Metadata,
            2 => Preallocation::Falloc,
            _ => Preallocation::Full,
        },
        ..CreateOptions::default()
    };
    let mut dev = MemDevice::with_len(vec![0u8; CAPACITY], 0, 512);
    let mut bounce = [0u8; 512];
    let made = create(&mut dev, &mut bounce, &opts);
    if opts.validate().is_err() {
        assert!(
            made.is_err(),
            "create accepted options that validate refuses: {opts:?}"
        );
        return;
    }
    let Ok(len) = made else {
        // Too big for the memory device is the only acceptable failure.
        return;
    };
    // Metadata preallocation can end the file past what was written (holes): only what the memory device
    // holds can be checked.
    if len > CAPACITY as u64 {
        return;
    }
    let mut bytes = dev.into_inner();
    let mut scratch = vec![0u8; 1 << 16];
    let report = check::check(
        &mut MemDevice::with_len(&bytes[..], len, 512),
        &mut bounce,
        &mut scratch,
        &mut NoSink,
    )
    .expect("check of a created image");
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0),
        "{opts:?}"
    );
    let buffers = Buffers {
        bounce: vec![0u8; 512],
        metadata: vec![0u8; 4 * 512],
    };
    let mut img: Image<_, _, _, 2, 4, WriteState> = Image::open_writable(
        MemDevice::with_len(&mut bytes[..], len, 512),
        buffers,
        NoDecompressor,
        &mut NoFiles,
    )
    .expect("open a created image");
    assert_eq!(img.virtual_size(), size);
    // A write may need an L2 table and a data cluster beyond the end: only where the memory device has room.
    if size >= 1024 && len + 3 * cluster_size <= CAPACITY as u64 {
        let mut buf = [1u8; 512];
        img.read_at(size - 512, &mut buf).expect("read");
        assert!(
            buf.iter().all(|&x| x == 0),
            "a new image does not read as zeros"
        );
        img.write_at(size / 2 & !511, &[7u8; 512]).expect("write");
        img.read_at(size / 2 & !511, &mut buf).expect("read back");
        assert!(buf.iter().all(|&x| x == 7));
    }
    img.close().expect("close");
});
