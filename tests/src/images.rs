//! Recipes for the interop images, built at test time with qemu-img and qemu-io (nothing is downloaded).
//! Each returns the path of the image to check (the top of a chain where there is one).

use std::path::PathBuf;

use crate::{
    KIB, MIB, Scratch, noise, qemu_img_ok, qemu_io_cmds, size_for_cluster, text, varied_writes,
    write_at,
};

/// A qcow2 image with `opts` (cluster_size appended) and [`varied_writes`] applied.
pub fn plain(scratch: &Scratch, name: &str, opts: &str, cluster: u64) -> PathBuf {
    let size = size_for_cluster(cluster);
    let opts = if opts.is_empty() {
        format!("cluster_size={cluster}")
    } else {
        format!("{opts},cluster_size={cluster}")
    };
    let img = scratch.qcow2(name, &opts, size);
    qemu_io_cmds(&img, "qcow2", &varied_writes(cluster, size));
    img
}

/// A raw file of `size` bytes with text and noise at a few places and holes between them.
pub fn raw_with_holes(scratch: &Scratch, name: &str, size: u64, seed: u64) -> PathBuf {
    let p = scratch.path(name);
    let f = std::fs::File::create(&p).expect("create raw");
    f.set_len(size).expect("set_len");
    drop(f);
    let mut off = 777 % size;
    let mut i = 0;
    while off + 9000 < size {
        let data = if i % 2 == 0 {
            text(seed + i, 9000)
        } else {
            noise(seed + i, 9000)
        };
        write_at(&p, off, &data);
        off += 300 * KIB + 4099 * (i + 1);
        i += 1;
    }
    p
}

/// Extended L2 image (`cluster` 16 KiB .. 2 MiB) with mixed subcluster states: partial-cluster writes,
/// `write -z` of subcluster ranges on allocated and unallocated clusters, subcluster discards, a write
/// crossing the boundary between two clusters. With `backing`, over a raw backing file full of text, so
/// partial writes copy subclusters from the backing file and discards have to hide it.
pub fn extended_l2(scratch: &Scratch, cluster: u64, backing: bool) -> PathBuf {
    let size = size_for_cluster(cluster);
    let s = cluster / 32;
    let name = format!(
        "extl2-{}k-{}.qcow2",
        cluster / KIB,
        if backing { "bk" } else { "nobk" }
    );
    let img = if backing {
        let raw = scratch.path(&format!("extl2-{}k-base.raw", cluster / KIB));
        // Full of text except for a hole at clusters 8..10.
        write_at(&raw, 0, &text(cluster, (8 * cluster) as usize));
        write_at(
            &raw,
            10 * cluster,
            &text(cluster + 1, (size - 10 * cluster) as usize),
        );
        let raw_name = raw.file_name().unwrap().to_string_lossy().into_owned();
        scratch.create(
            &name,
            "qcow2",
            &format!("extended_l2=on,cluster_size={cluster}"),
            size,
            Some((&raw_name, "raw")),
        )
    } else {
        scratch.qcow2(
            &name,
            &format!("extended_l2=on,cluster_size={cluster}"),
            size,
        )
    };
    let c = cluster;
    let cmds = vec![
        // cluster 0: subclusters 3..5 partially written (unaligned start), rest unallocated
        format!("write -P 0x11 {} {}", 3 * s + 5, 2 * s),
        // last subcluster of cluster 0 and first of cluster 1
        format!("write -P 0x22 {} {}", c - s / 2, s),
        // cluster 2 fully written, then subcluster ranges zeroed, discarded, zeroed with unmap
        format!("write -P 0x33 {} {}", 2 * c, c),
        format!("write -z {} {}", 2 * c + 4 * s, 3 * s),
        format!("discard {} {}", 2 * c + 10 * s, 2 * s),
        format!("write -z -u {} {}", 2 * c + 20 * s, s),
        // cluster 4: only zero subclusters (no data cluster)
        format!("write -z {} {}", 4 * c + s, 2 * s),
        // cluster 5: discard of subclusters that were never written
        format!("discard {} {}", 5 * c + 8 * s, 4 * s),
        // cluster 6: one subcluster written, one zeroed, scattered
        format!("write -P 0x44 {} {}", 6 * c + 31 * s, 2 * s),
        format!("write -z {} {}", 6 * c + 7 * s, s),
        format!("write -P 0x66 {} 100", 6 * c + 17 * s + 1),
        // cluster 8 (over the backing file's hole): a subcluster of data
        format!("write -P 0x77 {} {}", 8 * c + 2 * s, s),
        // near the end
        format!("write -P 0x55 {} 20", size - s - 10),
    ];
    qemu_io_cmds(&img, "qcow2", &cmds);
    img
}

/// A compressed image: `qemu-img convert -c` of a raw source that mixes text (compresses), noise (does not:
/// stored uncompressed), zeros and holes; then a few qemu-io writes over compressed clusters (copy-on-write
/// through decompression). `ctype` is "zlib" or "zstd".
pub fn compressed(scratch: &Scratch, cluster: u64, ctype: &str) -> PathBuf {
    let size = size_for_cluster(cluster);
    let c = cluster;
    let src = scratch.path(&format!("comp-{}k-{ctype}.src.raw", cluster / KIB));
    std::fs::File::create(&src)
        .and_then(|f| f.set_len(size))
        .expect("create source");
    write_at(&src, 0, &text(1, (3 * c) as usize));
    write_at(&src, 3 * c, &noise(2, c as usize));
    write_at(&src, 4 * c + 100, &text(3, (c / 2) as usize));
    // cluster 5 stays a hole, cluster 6 explicit zeros
    write_at(&src, 6 * c, &vec![0u8; c as usize]);
    write_at(&src, 7 * c, &text(4, (2 * c) as usize));
    write_at(&src, 9 * c + 13, &noise(5, (c / 3) as usize));
    write_at(&src, size - 5000, &text(6, 5000));
    let img = scratch.path(&format!("comp-{}k-{ctype}.qcow2", cluster / KIB));
    qemu_img_ok([
        "convert".as_ref(),
        "-c".as_ref(),
        "-f".as_ref(),
        "raw".as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        "-o".as_ref(),
        format!("cluster_size={cluster},compression_type={ctype}").as_ref(),
        src.as_os_str(),
        img.as_os_str(),
    ]);
    qemu_io_cmds(
        &img,
        "qcow2",
        &[
            format!("write -P 0x5c {} 700", c + 300),
            format!("write -z {} {}", 7 * c, c),
        ],
    );
    img
}

/// v3 image with every kind of zero cluster: `write -z` (plain zero), `write -z -u`, `discard`, on
/// allocated and unallocated clusters.
pub fn zero_clusters(scratch: &Scratch, cluster: u64) -> PathBuf {
    let size = size_for_cluster(cluster);
    let c = cluster;
    let img = scratch.qcow2(
        &format!("zero-{}k.qcow2", cluster / KIB),
        &format!("cluster_size={cluster}"),
        size,
    );
    qemu_io_cmds(
        &img,
        "qcow2",
        &[
            format!("write -P 0x31 0 {}", 6 * c),
            format!("write -z {} {}", c, c),
            format!("write -z -u {} {}", 2 * c, c),
            format!("discard {} {}", 3 * c, c),
            // on unallocated clusters
            format!("write -z {} {}", 7 * c, 2 * c),
            format!("write -z -u {} {}", 9 * c, c),
            format!("discard {} {}", 10 * c, c),
            // partial zero write inside a data cluster (no zero cluster, just zero bytes)
            format!("write -z {} 1000", 4 * c + 77),
        ],
    );
    img
}

/// preallocation=metadata, then `write -z` over preallocated clusters (zero flag with a host offset), some
/// data, and a discard. With `touch` false, just the preallocated image.
pub fn preallocated(scratch: &Scratch, cluster: u64, touch: bool) -> PathBuf {
    let size = 2 * MIB;
    let c = cluster;
    let img = scratch.qcow2(
        &format!("prealloc-{}k-{touch}.qcow2", cluster / KIB),
        &format!("preallocation=metadata,cluster_size={cluster}"),
        size,
    );
    if touch {
        qemu_io_cmds(
            &img,
            "qcow2",
            &[
                format!("write -z {} {}", c, 2 * c),
                format!("write -P 0x7e {} 5000", 4 * c + 10),
                format!("write -z -u {} {}", 8 * c, c),
                format!("discard {} {}", 10 * c, c),
                format!("write -P 0x7f {} 1", size - 1),
            ],
        );
    }
    img
}

/// raw base (with holes) <- qcow2 middle (v3, 4k clusters) <- qcow2 top (64k clusters): three deep.
pub fn chain_raw_base(scratch: &Scratch) -> PathBuf {
    let size = 4 * MIB;
    raw_with_holes(scratch, "rb-base.raw", size, 10);
    let mid = scratch.create(
        "rb-mid.qcow2",
        "qcow2",
        "cluster_size=4096",
        size,
        Some(("rb-base.raw", "raw")),
    );
    qemu_io_cmds(
        &mid,
        "qcow2",
        &[
            "write -P 0x21 1000 10000".into(),
            "write -z 307200 8192".into(),
            "discard 614400 4096".into(),
            "write -P 0x22 2097000 300".into(),
        ],
    );
    let top = scratch.create(
        "rb-top.qcow2",
        "qcow2",
        "cluster_size=65536",
        size,
        Some(("rb-mid.qcow2", "qcow2")),
    );
    qemu_io_cmds(
        &top,
        "qcow2",
        &[
            "write -P 0x31 5000 3000".into(),
            "write -z 1048576 65536".into(),
            "discard 3145728 65536".into(),
            "write -P 0x32 4000000 100".into(),
        ],
    );
    top
}

/// raw base shorter (and not a multiple of 512) than its qcow2 overlay; overlay writes cross its end.
pub fn chain_short_raw_base(scratch: &Scratch) -> PathBuf {
    let base = scratch.path("short-base.raw");
    write_at(&base, 0, &text(20, (MIB + 513) as usize));
    let top = scratch.create(
        "short-top.qcow2",
        "qcow2",
        "cluster_size=65536",
        3 * MIB,
        Some(("short-base.raw", "raw")),
    );
    qemu_io_cmds(
        &top,
        "qcow2",
        &[
            // partial write in the cluster holding the base's end: copy-on-write reads past it
            format!("write -P 0x41 {} 100", MIB + 1000),
            "write -P 0x42 200000 5".into(),
        ],
    );
    top
}

/// qcow2 base (v2, 4k) <- qcow2 middle (v3, 16k, zero and discarded clusters) <- top (v3, 64k).
pub fn chain_qcow2(scratch: &Scratch) -> PathBuf {
    let size = 4 * MIB;
    let base = scratch.qcow2("q-base.qcow2", "compat=0.10,cluster_size=4096", size);
    qemu_io_cmds(&base, "qcow2", &varied_writes(4096, size));
    // the middle layer names its backing file by absolute path
    let base_abs = base.to_string_lossy().into_owned();
    let mid = scratch.create(
        "q-mid.qcow2",
        "qcow2",
        "cluster_size=16384",
        size,
        Some((&base_abs, "qcow2")),
    );
    qemu_io_cmds(
        &mid,
        "qcow2",
        &[
            "write -P 0xc1 0 1000".into(),
            "write -z 16384 32768".into(),
            "discard 81920 16384".into(),
            "write -P 0xc2 1048570 20".into(),
        ],
    );
    let top = scratch.create(
        "q-top.qcow2",
        "qcow2",
        "cluster_size=65536",
        size,
        Some(("q-mid.qcow2", "qcow2")),
    );
    qemu_io_cmds(
        &top,
        "qcow2",
        &[
            "write -P 0xd1 65000 1000".into(),
            "write -z 2097152 65536".into(),
            "discard 1048576 65536".into(),
        ],
    );
    top
}
