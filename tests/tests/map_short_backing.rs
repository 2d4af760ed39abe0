//! `map` on extended-L2 images over a backing file that ends before them: where the top image has a host
//! cluster allocated but a subcluster unallocated past the backing file's end, qemu-img reports the extent at
//! the top's depth with that host offset (and ends it with the cluster); ours must print the same, JSON and
//! human, whatever the layout (backing qcow2 or raw, ending on or inside a cluster, the top image's file cut
//! short so that its last cluster lies past the end of the file).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use qcow2_tests::{Scratch, check_map, qemu_img_ok, qemu_io_cmds};

fn top_over(s: &Scratch, backing_fmt: &str, backing_size: u64, writes: &[&str]) -> PathBuf {
    s.create("base", backing_fmt, "", backing_size, None);
    let top = s.create(
        "top.qcow2",
        "qcow2",
        "extended_l2=on,cluster_size=64k",
        4 << 20,
        Some(("base", backing_fmt)),
    );
    let cmds: Vec<String> = writes.iter().map(|w| w.to_string()).collect();
    qemu_io_cmds(&top, "qcow2", &cmds);
    top
}

fn same_as_qemu(top: &Path) {
    check_map(top, &["--output=json"]);
    check_map(top, &[]);
}

#[test]
fn subclusters_past_a_shorter_backing_file() {
    for backing_fmt in ["qcow2", "raw"] {
        for (backing_size, writes) in [
            // The whole allocated cluster lies past the backing file's end.
            (64 << 10, &["write -P 1 128k 2k"][..]),
            // The backing file ends inside the allocated cluster.
            (96 << 10, &["write -P 1 64k 2k", "write -P 2 120k 1k"][..]),
            // Several clusters, some subclusters zeroed.
            (
                1 << 20,
                &[
                    "write -P 3 1536k 4k",
                    "write -z 1544k 2k",
                    "write -P 4 3m 2k",
                    "write -P 5 3200k 2k",
                ][..],
            ),
        ] {
            let s = Scratch::new();
            let top = top_over(&s, backing_fmt, backing_size, writes);
            same_as_qemu(&top);
            // The top image's last cluster past the end of its file.
            let len = std::fs::metadata(&top).unwrap().len();
            let f = std::fs::OpenOptions::new().write(true).open(&top).unwrap();
            f.set_len(len - 32 * 1024).unwrap();
            drop(f);
            same_as_qemu(&top);
            qemu_img_ok([OsStr::new("info"), top.as_os_str()]);
        }
    }
}
