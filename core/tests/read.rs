//! Reads through the core engine on images built in memory (no qemu-img needed here; the interop suite in
//! `tests/` compares with qemu-img).

mod common;

use common::{Cluster, Spec, build, expected_range};
use qcow2_core::{Buffers, Error, Image, Inflate, MemDevice, NoDecompressor, NoFiles, Source};

type MemImage<'a> = Image<MemDevice<&'a [u8]>, Vec<u8>, NoDecompressor, 4, 4>;

fn open(bytes: &[u8], slot: usize) -> Result<MemImage<'_>, Error<qcow2_core::io::MemDeviceFull>> {
    let buffers = Buffers {
        bounce: vec![0u8; 512],
        metadata: vec![0u8; 4 * slot],
    };
    Image::open(MemDevice::new(bytes), buffers, NoDecompressor, &mut NoFiles)
}

#[test]
fn tiny_image_reads_its_data_and_zeros() {
    let bytes = qcow2_core::testimage::tiny_qcow2();
    let mut img = open(&bytes, 512).unwrap();
    assert_eq!(img.virtual_size(), 64 * 1024);
    let mut buf = vec![0xAAu8; 1024];
    img.read_at(0, &mut buf).unwrap();
    for (i, b) in buf[..512].iter().enumerate() {
        assert_eq!(*b, i as u8);
    }
    assert!(buf[512..].iter().all(|&b| b == 0));
    // Unaligned read across the data/unallocated boundary.
    let mut buf = vec![0xAAu8; 100];
    img.read_at(470, &mut buf).unwrap();
    for (i, b) in buf.iter().enumerate() {
        let pos = 470 + i;
        assert_eq!(*b, if pos < 512 { pos as u8 } else { 0 });
    }
    // Out of range.
    let mut buf = [0u8; 2];
    assert!(matches!(
        img.read_at(64 * 1024 - 1, &mut buf),
        Err(Error::OutOfRange { .. })
    ));
}

#[test]
fn contiguous_clusters_map_to_one_run() {
    let spec = Spec {
        cluster_bits: 16,
        size: 64 << 20,
        extended_l2: false,
        version: 3,
    };
    let clusters: Vec<_> = (0..8).map(|i| (i, Cluster::Fill(i as u8 + 1))).collect();
    let built = build(&spec, &clusters);
    let mut img = open(&built.bytes, 4096).unwrap();
    let m = img.map_guest_range(0, 64 << 20).unwrap();
    assert_eq!(
        m.len,
        8 << 16,
        "8 clusters at consecutive host offsets are one run"
    );
    assert!(matches!(
        m.source,
        Source::Data {
            external: false,
            ..
        }
    ));
    let m = img.map_guest_range(8 << 16, 64 << 20).unwrap();
    assert_eq!(m.source, Source::Unallocated { host: None });
    assert_eq!(m.len, (64 << 20) - (8 << 16));
}

#[test]
fn cluster_sizes_and_zero_clusters_read_back() {
    for bits in [9u32, 12, 16, 20, 21] {
        let cs = 1u64 << bits;
        let spec = Spec {
            cluster_bits: bits,
            size: cs * 40,
            extended_l2: false,
            version: 3,
        };
        let clusters = [
            (0, Cluster::Fill(7)),
            (3, Cluster::Fill(9)),
            (4, Cluster::Zero),
            (39, Cluster::Fill(1)),
        ];
        let built = build(&spec, &clusters);
        let mut img = open(&built.bytes, 512).unwrap();
        for &(off, len) in &[
            (0u64, cs as usize * 5),
            (cs - 3, 7),
            (cs * 3 + 1, cs as usize),
            (cs * 39, cs as usize),
        ] {
            let mut buf = vec![0x55u8; len];
            img.read_at(off, &mut buf).unwrap();
            assert_eq!(
                buf,
                expected_range(&built, cs, off, len),
                "bits {bits} off {off}"
            );
        }
    }
}

#[test]
fn extended_l2_subclusters() {
    let bits = 16;
    let cs = 1u64 << bits;
    let spec = Spec {
        cluster_bits: bits,
        size: cs * 4,
        extended_l2: true,
        version: 3,
    };
    let clusters = [
        (0, Cluster::Sub(0x0000_00ff, 0x0000_ff00, 3)),
        (1, Cluster::Zero),
        (2, Cluster::Fill(4)),
    ];
    let built = build(&spec, &clusters);
    let mut img = open(&built.bytes, 512).unwrap();
    let mut buf = vec![0x55u8; (cs * 4) as usize];
    img.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, expected_range(&built, cs, 0, buf.len()));
    // Subcluster states show in the map.
    let m = img.map_guest_range(0, cs).unwrap();
    assert_eq!(m.len, 8 * cs / 32);
    assert!(matches!(m.source, Source::Data { .. }));
    let m = img.map_guest_range(8 * cs / 32, cs).unwrap();
    assert!(matches!(m.source, Source::Zero { host: Some(_), .. }));
    let m = img.map_guest_range(16 * cs / 32, cs).unwrap();
    assert!(
        matches!(m.source, Source::Unallocated { host: Some(_) }),
        "unallocated subcluster keeps its host cluster"
    );
}

#[test]
fn invalid_subcluster_bitmap_is_corrupt() {
    let spec = Spec {
        cluster_bits: 16,
        size: 1 << 20,
        extended_l2: true,
        version: 3,
    };
    let built = build(&spec, &[(0, Cluster::Sub(1, 1, 3))]);
    let mut img = open(&built.bytes, 512).unwrap();
    let mut buf = vec![0u8; 512];
    let err = img.read_at(0, &mut buf).unwrap_err();
    assert!(
        matches!(err, Error::Corrupt { what, .. } if what.contains("subcluster bitmap")),
        "{err:?}"
    );
}

#[test]
fn zero_flag_in_v2_is_corrupt() {
    let spec = Spec {
        cluster_bits: 16,
        size: 1 << 20,
        extended_l2: false,
        version: 2,
    };
    let built = build(&spec, &[(0, Cluster::Zero)]);
    let mut img = open(&built.bytes, 512).unwrap();
    let err = img.read_at(0, &mut [0u8; 16]).unwrap_err();
    assert!(
        matches!(err, Error::Corrupt { what, .. } if what.contains("version 2")),
        "{err:?}"
    );
}

/// The engine's memory does not depend on the image: a 2 MiB-cluster 1 TiB image and a 64 KiB-cluster one
/// open and read with the same 512-byte bounce block and four 512-byte metadata slots, in the same `Image` type.
#[test]
fn memory_is_independent_of_cluster_size_and_virtual_size() {
    let tib = 1u64 << 40;
    for bits in [16u32, 21] {
        let cs = 1u64 << bits;
        let spec = Spec {
            cluster_bits: bits,
            size: tib,
            extended_l2: false,
            version: 3,
        };
        let far = tib / cs - 1;
        let built = build(
            &spec,
            &[(0, Cluster::Fill(0x11)), (far, Cluster::Fill(0x22))],
        );
        let mut img = open(&built.bytes, 512).unwrap();
        assert_eq!(img.virtual_size(), tib);
        let mut buf = vec![0u8; 4096];
        img.read_at(far * cs + cs - 4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0x22));
        img.read_at(cs - 2048, &mut buf).unwrap();
        assert!(buf[..2048].iter().all(|&b| b == 0x11) && buf[2048..].iter().all(|&b| b == 0));
    }
    // One type for both images: the state is fixed at build time.
    let state = core::mem::size_of::<MemImage<'static>>();
    assert!(state < 4096, "engine state {state} bytes");
}

#[test]
fn compressed_cluster_streams_through_small_window() {
    // Build a 64 KiB-cluster image whose cluster 1 is deflate-compressed.
    let bits = 16;
    let cs = 1usize << bits;
    let spec = Spec {
        cluster_bits: bits,
        size: 4 << 16,
        extended_l2: false,
        version: 3,
    };
    let mut built = build(&spec, &[(0, Cluster::Fill(1))]);
    let plain: Vec<u8> = (0..cs)
        .map(|i| ((i * 7) % 251) as u8 ^ (i >> 12) as u8)
        .collect();
    append_compressed_cluster_1(&mut built.bytes, bits, &plain, 100);
    for window in [32 * 1024usize, 64 * 1024] {
        let buffers = Buffers {
            bounce: vec![0u8; 512],
            metadata: vec![0u8; 4 * 512],
        };
        let inflate = Inflate::new(vec![0u8; window], vec![0u8; 512]);
        let mut img: Image<_, _, _, 4, 4> = Image::open(
            MemDevice::new(&built.bytes[..]),
            buffers,
            inflate,
            &mut NoFiles,
        )
        .unwrap();
        let mut whole = vec![0u8; cs];
        img.read_at(cs as u64, &mut whole).unwrap();
        assert_eq!(whole, plain, "whole-cluster read, window {window}");
        for &(off, len) in &[
            (0usize, 512usize),
            (40000, 5000),
            (cs - 10, 10),
            (123, 60000),
        ] {
            let mut part = vec![0u8; len];
            img.read_at((cs + off) as u64, &mut part).unwrap();
            assert_eq!(part, &plain[off..off + len], "window {window} off {off}");
        }
    }
    // Without a decompressor the read is refused, with a typed error.
    let mut img = open(&built.bytes, 512).unwrap();
    assert!(matches!(
        img.read_at(cs as u64, &mut [0u8; 8]),
        Err(Error::Unsupported { .. })
    ));
}

/// Appends `plain` as a deflate stream `gap` bytes past the end of `img` (unaligned, as qemu packs them) and
/// points guest cluster 1 at it. The L2 table of images from `build` is cluster 4 (after header, refcount
/// table, refcount block and L1).
fn append_compressed_cluster_1(img: &mut Vec<u8>, bits: u32, plain: &[u8], gap: u64) {
    let packed = miniz_oxide_compress(plain);
    let coff = img.len() as u64 + gap;
    img.resize(coff as usize, 0);
    img.extend_from_slice(&packed);
    let nsect = (coff + packed.len() as u64).div_ceil(512) - coff / 512;
    let word = (1u64 << 62) | coff | ((nsect - 1) << (70 - bits));
    let l2 = (4usize << bits) + 8;
    img[l2..l2 + 8].copy_from_slice(&word.to_be_bytes());
}

fn miniz_oxide_compress(data: &[u8]) -> Vec<u8> {
    // A stored (uncompressed) deflate stream is valid deflate and needs no compressor.
    let mut out = Vec::new();
    let chunks: Vec<_> = data.chunks(65535).collect();
    for (i, c) in chunks.iter().enumerate() {
        out.push(if i + 1 == chunks.len() { 1 } else { 0 });
        out.extend_from_slice(&(c.len() as u16).to_le_bytes());
        out.extend_from_slice(&(!(c.len() as u16)).to_le_bytes());
        out.extend_from_slice(c);
    }
    out
}

/// A compressed cluster whose stored bytes run past the end of the file (trailing zeros cut off) reads as if
/// the missing bytes were zeros, as QEMU reads it.
#[test]
fn compressed_cluster_past_end_of_file_reads_zeros() {
    let bits = 12;
    let cs = 1usize << bits;
    let spec = Spec {
        cluster_bits: bits,
        size: 4 << 12,
        extended_l2: false,
        version: 3,
    };
    let mut built = build(&spec, &[(0, Cluster::Fill(1))]);
    let mut plain: Vec<u8> = (0..cs).map(|i| (i % 13) as u8 + 1).collect();
    plain[cs - 300..].fill(0);
    append_compressed_cluster_1(&mut built.bytes, bits, &plain, 8);
    while built.bytes.last() == Some(&0) {
        built.bytes.pop();
    }
    let buffers = Buffers {
        bounce: vec![0u8; 512],
        metadata: vec![0u8; 4 * 512],
    };
    let inflate = Inflate::new(vec![0u8; 32 * 1024], vec![0u8; 512]);
    let mut img: Image<_, _, _, 4, 4> = Image::open(
        MemDevice::new(&built.bytes[..]),
        buffers,
        inflate,
        &mut NoFiles,
    )
    .unwrap();
    let mut whole = vec![0u8; cs];
    img.read_at(cs as u64, &mut whole).unwrap();
    assert_eq!(whole, plain);
}
