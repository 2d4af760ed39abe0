//! QEMU reads the clusters our compressor writes (`qcow2_alloc::compress_cluster`, deflate with its 4 KiB
//! window and zstd): qemu-img makes a compressed image, every compressed cluster's L2 entry is then pointed
//! at our compression of the same guest cluster (appended to the file), and `qemu-img convert -O raw` must
//! give back the original bytes. This checks the compressed streams alone, before and apart from the
//! engine's write path (refcounts are not updated: the patched image is only read).

use std::ffi::OsStr;

use qcow2_core::format::CompressionType;
use qcow2_tests::{Scratch, assert_bytes_equal, noise, qemu_img_ok, text};

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn source(cluster: usize, clusters: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(cluster * clusters);
    for i in 0..clusters {
        let piece = match i % 4 {
            0 => text(i as u64, cluster),
            1 => vec![0x5a; cluster],
            2 => {
                // half text, half noise: compresses a little
                let mut p = text(i as u64, cluster / 2);
                p.extend(noise(i as u64, cluster - cluster / 2));
                p
            }
            _ => {
                // repeats far apart: references at the edge of the window
                let unit = noise(i as u64, 3000);
                unit.iter().cycle().take(cluster).copied().collect()
            }
        };
        v.extend(piece);
    }
    v
}

fn patch_and_read(cluster: usize, ctype: &str, ty: CompressionType) {
    let s = Scratch::new();
    let clusters = if cluster >= 1 << 20 { 4 } else { 12 };
    let data = source(cluster, clusters);
    let raw = s.path("src.raw");
    std::fs::write(&raw, &data).unwrap();
    let img = s.path("c.qcow2");
    qemu_img_ok([
        OsStr::new("convert"),
        OsStr::new("-c"),
        OsStr::new("-f"),
        OsStr::new("raw"),
        OsStr::new("-O"),
        OsStr::new("qcow2"),
        OsStr::new("-o"),
        OsStr::new(&format!("cluster_size={cluster},compression_type={ctype}")),
        raw.as_os_str(),
        img.as_os_str(),
    ]);
    let mut b = std::fs::read(&img).unwrap();
    let cluster_bits = u32::from_be_bytes(b[20..24].try_into().unwrap());
    assert_eq!(1usize << cluster_bits, cluster);
    let l1 = be64(&b, 40) as usize;
    let per_l2 = cluster / 8;
    let x = 70 - cluster_bits;
    let mut patched = 0;
    for (g, guest) in data.chunks(cluster).enumerate() {
        let l2 = (be64(&b, l1 + 8 * (g / per_l2)) & 0x00ff_ffff_ffff_fe00) as usize;
        assert_ne!(l2, 0, "cluster {g}: no L2 table");
        let at = l2 + 8 * (g % per_l2);
        let entry = be64(&b, at);
        let ours = qcow2_alloc::compress_cluster(ty, guest);
        if let Some(c) = &ours {
            assert!(c.len() < cluster);
        }
        if entry >> 62 & 1 == 0 {
            continue;
        }
        let Some(c) = ours else {
            // QEMU compressed a cluster we could not: only acceptable when barely compressible.
            assert_eq!(g % 4, 2, "cluster {g}: QEMU compresses it, we do not");
            continue;
        };
        let off = b.len().div_ceil(512) * 512;
        b.resize(off, 0);
        b.extend_from_slice(&c);
        let nsect = c.len().div_ceil(512) as u64 - 1;
        let new = (1u64 << 62) | (nsect << x) | off as u64;
        b[at..at + 8].copy_from_slice(&new.to_be_bytes());
        patched += 1;
    }
    assert!(patched >= clusters / 2, "only {patched} clusters patched");
    b.resize(b.len().div_ceil(512) * 512, 0);
    std::fs::write(&img, &b).unwrap();
    let back = s.path("back.raw");
    qemu_img_ok([
        OsStr::new("convert"),
        OsStr::new("-O"),
        OsStr::new("raw"),
        img.as_os_str(),
        back.as_os_str(),
    ]);
    let got = std::fs::read(&back).unwrap();
    assert_bytes_equal(
        &got,
        &data,
        &format!("{ctype} {cluster}: qemu's reading of our clusters"),
    );
}

#[test]
fn deflate_clusters_read_by_qemu() {
    for cluster in [512, 4096, 65536, 2 << 20] {
        patch_and_read(cluster, "zlib", CompressionType::Deflate);
    }
}

#[test]
fn zstd_clusters_read_by_qemu() {
    for cluster in [4096, 65536, 2 << 20] {
        patch_and_read(cluster, "zstd", CompressionType::Zstd);
    }
}
