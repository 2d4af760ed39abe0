//! Power loss while an image grows with its new clusters preallocated (`resize --preallocation=falloc|full`:
//! new refcount structures and a new refcount table after the last cluster in use, the old table freed, the
//! data clusters in one run, the L2 entries, the size last). Every crash state opens, has no refcount below
//! its references (an independent counter; a sample through `qemu-img check`), and is the old disk (old
//! size, old data) or the new one (new size, the old data, zeros after).

use qcow2_tests::crash_harness::{ResizeCase, resize_states};

#[test]
fn crash_resize_preallocated() {
    let cases = [
        (
            ResizeCase {
                name: "falloc, 4 KiB clusters, unaligned old end",
                opts: "cluster_size=4096",
                size: (1 << 20) - 1536,
                new_size: 3 << 20,
                backing: false,
                snapshot: false,
                compressed: false,
            },
            false,
        ),
        (
            ResizeCase {
                name: "full, 512-byte clusters, many refcount blocks, compressed clusters",
                opts: "cluster_size=512",
                size: 256 << 10,
                new_size: 4 << 20,
                backing: false,
                snapshot: false,
                compressed: true,
            },
            true,
        ),
        (
            ResizeCase {
                name: "falloc, extended L2 over a longer backing file",
                opts: "cluster_size=65536,extended_l2=on",
                size: 1 << 20,
                new_size: 3 << 20,
                backing: true,
                snapshot: false,
                compressed: false,
            },
            false,
        ),
        (
            ResizeCase {
                name: "full, lazy refcounts, a snapshot",
                opts: "cluster_size=4096,lazy_refcounts=on",
                size: 3 << 20,
                new_size: 4 << 20,
                backing: false,
                snapshot: true,
                compressed: false,
            },
            true,
        ),
    ];
    let mut total = 0;
    for (c, zeros) in cases {
        total += resize_states(&c, |image| {
            image.resize_preallocated(c.new_size, zeros).unwrap();
        });
    }
    qcow2_tests::record_evidence(
        "crash_preallocate",
        &format!("crash_preallocate: {total} crash states checked, 0 violations"),
    );
}
