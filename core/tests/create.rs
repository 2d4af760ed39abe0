//! Images made by `create` in memory open with the engine and read as zeros (the byte comparison with
//! qemu-img is in the interop suite, `tests/tests/create.rs`).

use qcow2_core::create::{Compat, CreateOptions, OptionError, Preallocation, create};
use qcow2_core::format::{CompressionType, Header};
use qcow2_core::{Buffers, Image, MemDevice, NoDecompressor, NoFiles};

type MemImage<'a> = Image<MemDevice<&'a [u8]>, Vec<u8>, NoDecompressor, 4, 4>;

/// Creates into a memory device of `capacity` bytes; returns the image bytes cut to the returned length.
fn create_mem(opts: &CreateOptions<'_>, capacity: usize) -> Vec<u8> {
    let mut buf = vec![0u8; capacity];
    let mut dev = MemDevice::with_len(&mut buf[..], 0, 512);
    let mut bounce = [0u8; 512];
    let len = create(&mut dev, &mut bounce, opts).expect("create");
    let content_len = dev.content().len() as u64;
    // The device rounds the last write up to a block; preallocated data that is never written lies past
    // what the device holds.
    assert!(
        content_len < len + 512,
        "returned length {len} vs device length {content_len}"
    );
    buf.truncate(len as usize);
    buf
}

fn open(bytes: &[u8]) -> MemImage<'_> {
    let buffers = Buffers {
        bounce: vec![0u8; 512],
        metadata: vec![0u8; 4 * 4096],
    };
    Image::open(MemDevice::new(bytes), buffers, NoDecompressor, &mut NoFiles).expect("open")
}

fn assert_reads_zeros(img: &mut MemImage<'_>, size: u64) {
    let mut buf = vec![0xAAu8; 4096];
    let step = (size / 7).max(4096) & !511;
    let mut at = 0;
    while at + 4096 <= size {
        buf.fill(0xAA);
        img.read_at(at, &mut buf).expect("read");
        assert!(buf.iter().all(|&b| b == 0), "non-zero data at {at}");
        at += step;
    }
    let mut tail = [0xAAu8; 512];
    img.read_at(size - 512, &mut tail).expect("read tail");
    assert!(tail.iter().all(|&b| b == 0));
}

#[test]
fn created_images_open_and_read_zeros() {
    let cases: Vec<(CreateOptions<'static>, usize)> = vec![
        (
            CreateOptions {
                size: 1 << 20,
                ..Default::default()
            },
            1 << 20,
        ),
        (
            CreateOptions {
                size: 1 << 30,
                cluster_size: 512,
                ..Default::default()
            },
            1 << 20,
        ),
        (
            CreateOptions {
                size: 64 << 20,
                extended_l2: true,
                refcount_bits: 1,
                compression_type: CompressionType::Zstd,
                lazy_refcounts: true,
                ..Default::default()
            },
            1 << 20,
        ),
        (
            CreateOptions {
                size: 3 << 20,
                compat: Compat::V2,
                preallocation: Preallocation::Metadata,
                ..Default::default()
            },
            4 << 20,
        ),
        (
            CreateOptions {
                size: 5 << 20,
                cluster_size: 4096,
                refcount_bits: 64,
                preallocation: Preallocation::Full,
                ..Default::default()
            },
            8 << 20,
        ),
        (
            CreateOptions {
                size: 2 << 20,
                cluster_size: 16384,
                extended_l2: true,
                preallocation: Preallocation::Falloc,
                ..Default::default()
            },
            4 << 20,
        ),
    ];
    for (opts, capacity) in cases {
        let bytes = create_mem(&opts, capacity);
        let header = Header::parse(&bytes).expect("header parses");
        assert_eq!(header.size, opts.size);
        assert_eq!(header.cluster_size(), opts.cluster_size);
        assert_eq!(header.refcount_bits(), opts.refcount_bits);
        assert_eq!(header.extended_l2(), opts.extended_l2);
        let mut img = open(&bytes);
        assert_eq!(img.virtual_size(), opts.size, "{opts:?}");
        assert_reads_zeros(&mut img, opts.size);
    }
}

#[test]
fn one_tib_with_two_mib_clusters_needs_little_memory() {
    // 1 TiB at 2 MiB clusters: three clusters of metadata and a 16-byte L1 table.
    let opts = CreateOptions {
        size: 1 << 40,
        cluster_size: 2 << 20,
        ..Default::default()
    };
    let bytes = create_mem(&opts, 8 << 20);
    assert_eq!(bytes.len(), 3 * (2 << 20) + 16);
    let mut img = open(&bytes);
    assert_eq!(img.virtual_size(), 1 << 40);
    let mut buf = [0xAAu8; 512];
    img.read_at((1 << 40) - 512, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn invalid_options_are_refused_before_writing() {
    let mut buf = vec![0u8; 1 << 20];
    let mut dev = MemDevice::with_len(&mut buf[..], 0, 512);
    let mut bounce = [0u8; 512];
    let opts = CreateOptions {
        size: 1 << 20,
        cluster_size: 3000,
        ..Default::default()
    };
    assert_eq!(opts.validate(), Err(OptionError::ClusterSize));
    assert!(create(&mut dev, &mut bounce, &opts).is_err());
    assert_eq!(dev.content().len(), 0);
}
