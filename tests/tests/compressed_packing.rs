//! Compressed clusters packed as QEMU packs them: back to back, a compressed cluster running on across a
//! host-cluster boundary when the next host cluster is the one allocated, a host cluster shared only while
//! its refcount can count another reference. The same `write -c` sequence goes through `qcow2 io` and
//! qemu-io on twin images; the packing rule is asserted on both (so the rule the test states is QEMU's),
//! `qemu-img check` must find ours clean and its guest view must equal a raw reference.

use std::ffi::OsStr;
use std::path::Path;

use qcow2_tests::malformed::{Image, L2_COMPRESSED};
use qcow2_tests::{Scratch, noise, qcow2, qemu_img, qemu_io_cmds};

/// Bytes from a 32-letter alphabet: deflate and zstd store them in about 5/8 of their size, so consecutive
/// compressed clusters do not fit a host cluster evenly.
fn source(seed: u64, len: usize) -> Vec<u8> {
    noise(seed, len).iter().map(|b| b'A' + (b & 31)).collect()
}

/// A compressed cluster's host range as its L2 entry gives it: the first byte and the end of the last
/// 512-byte sector the data touches.
#[derive(Debug, Clone, Copy)]
struct Placed {
    offset: u64,
    end: u64,
}

fn placements(img: &Path, clusters: u64) -> Vec<Placed> {
    let image = Image {
        bytes: std::fs::read(img).expect("read image"),
    };
    let bits = image.cluster_bits();
    let x = 62 - (bits - 8);
    (0..clusters)
        .map(|g| {
            let e = image.l2_entry(g);
            assert!(
                e & L2_COMPRESSED != 0,
                "{}: guest cluster {g} is not compressed (entry {e:#x})",
                img.display()
            );
            let offset = e & ((1u64 << x) - 1);
            let sectors = ((e & !(3u64 << 62)) >> x) + 1;
            Placed {
                offset,
                end: (offset & !511) + sectors * 512,
            }
        })
        .collect()
}

/// Asserts QEMU's packing on the clusters of one image, written in guest order: each starts where the one
/// before ended (in the last sector it touched), unless the host cluster holding that end already counts
/// as many references as `refcount_bits` can hold, and then it starts a host cluster of its own. Returns
/// how many run on across a host-cluster boundary.
fn assert_packed(what: &str, placed: &[Placed], cluster_size: u64, max_refcount: u64) -> usize {
    let cluster_of = |byte: u64| byte / cluster_size;
    for pair in placed.windows(2) {
        let (prev, next) = (pair[0], pair[1]);
        if next.offset <= prev.end && next.offset + 512 > prev.end {
            continue;
        }
        let last = cluster_of(prev.end - 1);
        let references = placed
            .iter()
            .filter(|p| p.offset <= prev.offset)
            .filter(|p| cluster_of(p.offset) <= last && last <= cluster_of(p.end - 1))
            .count() as u64;
        assert!(
            references >= max_refcount && next.offset.is_multiple_of(cluster_size),
            "{what}: {next:?} does not follow {prev:?}, yet host cluster {last} counts only {references} \
             of {max_refcount} references\n{placed:#?}"
        );
    }
    placed
        .iter()
        .filter(|p| cluster_of(p.offset) != cluster_of(p.end - 1))
        .count()
}

fn run(cluster_size: u64, refcount_bits: u32, compression: &str, clusters: u64) {
    let what = format!("cluster_size={cluster_size} refcount_bits={refcount_bits} {compression}");
    let s = Scratch::new();
    let opts = format!(
        "cluster_size={cluster_size},refcount_bits={refcount_bits},compression_type={compression}"
    );
    let size = clusters * cluster_size;
    let ours = s.qcow2("ours.qcow2", &opts, size);
    let twin = s.qcow2("twin.qcow2", &opts, size);
    let mut raw = Vec::new();
    let mut cmds = Vec::new();
    for g in 0..clusters {
        let data = source(g + u64::from(refcount_bits) * 1000, cluster_size as usize);
        let file = s.path(&format!("src{g}"));
        std::fs::write(&file, &data).expect("write source");
        raw.extend_from_slice(&data);
        cmds.push(format!(
            "write -c -s {} {} {cluster_size}",
            file.display(),
            g * cluster_size
        ));
    }
    let reference = s.path("reference.raw");
    std::fs::write(&reference, &raw).expect("write reference");

    let mut args: Vec<&OsStr> = vec![OsStr::new("io"), OsStr::new("-f"), OsStr::new("qcow2")];
    for c in &cmds {
        args.push(OsStr::new("-c"));
        args.push(OsStr::new(c));
    }
    args.push(ours.as_os_str());
    let out = qcow2(&args);
    let text = out.stdout_str() + &out.stderr_str();
    assert!(
        out.success() && !text.contains("failed"),
        "{what}: compressed writes failed:\n{}",
        out.describe()
    );
    qemu_io_cmds(&twin, "qcow2", &cmds);

    let check = qemu_img([OsStr::new("check"), ours.as_os_str()]);
    assert_eq!(
        check.code,
        Some(0),
        "{what}: qemu-img check:\n{}",
        check.describe()
    );
    let cmp = qemu_img([
        OsStr::new("compare"),
        OsStr::new("-F"),
        OsStr::new("raw"),
        ours.as_os_str(),
        reference.as_os_str(),
    ]);
    assert_eq!(
        cmp.code,
        Some(0),
        "{what}: qemu-img compare:\n{}",
        cmp.describe()
    );

    let max_refcount = if refcount_bits == 64 {
        u64::MAX
    } else {
        (1u64 << refcount_bits) - 1
    };
    let qemu_runs = assert_packed(
        &format!("qemu-io, {what}"),
        &placements(&twin, clusters),
        cluster_size,
        max_refcount,
    );
    let our_runs = assert_packed(
        &format!("qcow2 io, {what}"),
        &placements(&ours, clusters),
        cluster_size,
        max_refcount,
    );
    if refcount_bits >= 8 {
        assert!(
            qemu_runs > 0 && our_runs > 0,
            "{what}: no compressed cluster crosses a host-cluster boundary (qemu-io {qemu_runs}, ours \
             {our_runs})"
        );
    }
    let len = |p: &Path| std::fs::metadata(p).expect("stat").len();
    println!(
        "{what}: file {} bytes (qemu-io {}), clusters across a boundary {our_runs} (qemu-io {qemu_runs})",
        len(&ours),
        len(&twin)
    );
}

#[test]
fn packed_across_host_clusters_512() {
    run(512, 16, "zlib", 64);
}

#[test]
fn packed_across_host_clusters_4k() {
    run(4096, 16, "zlib", 32);
    run(4096, 16, "zstd", 32);
}

#[test]
fn packed_across_host_clusters_64k() {
    run(65536, 16, "zlib", 16);
    run(65536, 16, "zstd", 16);
    run(65536, 64, "zlib", 16);
}

#[test]
fn packed_across_host_clusters_2m() {
    run(2 << 20, 16, "zlib", 4);
}

#[test]
fn narrow_refcounts_limit_sharing() {
    for bits in [1, 2, 4, 8] {
        run(4096, bits, "zlib", 32);
    }
}
