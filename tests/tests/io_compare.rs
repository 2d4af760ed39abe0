//! `qcow2 io -c 'read -P ...'` agrees with qemu-io's verdicts (and messages), and `qcow2 compare` with
//! qemu-img compare's exit codes (0 identical, 1 different, 2 error) and messages.

use qcow2_tests::images::{chain_raw_base, compressed, extended_l2, plain, zero_clusters};
use qcow2_tests::{Scratch, check_compare, check_io, qemu_img_ok, qemu_io_cmds};

#[test]
fn io_read_pattern_plain() {
    let s = Scratch::new();
    let img = plain(&s, "io.qcow2", "", 4096);
    // varied_writes(4096, ..): 0x11 at 1948..6344, 0x22 at 12295..12808, zero cluster at 24576
    assert!(check_io(&img, &["read -P 0x11 1948 4396"]));
    assert!(check_io(&img, &["read -P 0x11 2000 100"]));
    assert!(!check_io(&img, &["read -P 0x12 2000 100"]));
    // straddles the end of the 0x11 run
    assert!(!check_io(&img, &["read -P 0x11 6000 1000"]));
    assert!(check_io(&img, &["read -P 0x22 12295 513"]));
    assert!(check_io(&img, &["read -P 0 24576 4096"]));
    assert!(check_io(&img, &["read -P 0 100000 65536"]));
    assert!(!check_io(&img, &["read -P 0 1948 1"]));
    // several commands: one failing verdict fails the run, the others still run
    assert!(!check_io(
        &img,
        &[
            "read -P 0x11 2000 10",
            "read -P 0x99 2000 10",
            "read -P 0x22 12300 10"
        ]
    ));
    assert!(check_io(&img, &["read -P 0x11 2000 10", "read 0 65536"]));
}

#[test]
fn io_read_pattern_compressed_and_zero() {
    let s = Scratch::new();
    let img = compressed(&s, 65536, "zlib");
    // compressed.rs: 0x5c written at cluster 1 + 300 (through copy-on-write of a compressed cluster)
    assert!(check_io(&img, &["read -P 0x5c 65836 700"]));
    assert!(!check_io(&img, &["read -P 0x5c 65836 701"]));
    assert!(check_io(&img, &["read -P 0 458752 65536"]));
    let z = zero_clusters(&s, 4096);
    assert!(check_io(
        &z,
        &["read -P 0x31 0 4096", "read -P 0 4096 12288"]
    ));
    assert!(!check_io(&z, &["read -P 0x31 4096 1"]));
    assert!(check_io(&z, &["read -P 0 16461 1000"]));
}

#[test]
fn io_read_pattern_backing_and_subclusters() {
    let s = Scratch::new();
    let top = chain_raw_base(&s);
    assert!(check_io(&top, &["read -P 0x31 5000 3000"]));
    assert!(check_io(&top, &["read -P 0x21 1000 4000"]));
    assert!(check_io(&top, &["read -P 0 1048576 65536"]));
    assert!(!check_io(&top, &["read -P 0x21 1000 11000"]));
    let e = extended_l2(&s, 65536, true);
    // subclusters of 2 KiB: 0x11 at 6149..10245, zeroed subclusters 4..6 of cluster 2
    assert!(check_io(&e, &["read -P 0x11 6149 4096"]));
    assert!(check_io(&e, &["read -P 0 139264 6144"]));
    assert!(!check_io(&e, &["read -P 0 0 2048"]));
}

#[test]
fn compare_identical() {
    let s = Scratch::new();
    let img = plain(&s, "a.qcow2", "", 65536);
    let raw = s.path("a.raw");
    let other = s.path("a-4k.qcow2");
    qemu_img_ok([
        "convert".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        img.as_os_str(),
        raw.as_os_str(),
    ]);
    qemu_img_ok([
        "convert".as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        "-o".as_ref(),
        "cluster_size=4096".as_ref(),
        img.as_os_str(),
        other.as_os_str(),
    ]);
    assert_eq!(check_compare(&img, &img, &[]), 0);
    assert_eq!(check_compare(&img, &other, &[]), 0);
    assert_eq!(check_compare(&img, &raw, &["-f", "qcow2", "-F", "raw"]), 0);
    let comp = compressed(&s, 65536, "zstd");
    let comp_raw = s.path("comp.raw");
    qemu_img_ok([
        "convert".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        comp.as_os_str(),
        comp_raw.as_os_str(),
    ]);
    assert_eq!(
        check_compare(&comp, &comp_raw, &["-f", "qcow2", "-F", "raw"]),
        0
    );
    // a chain against its flattened copy
    let top = chain_raw_base(&s);
    let flat = s.path("flat.qcow2");
    qemu_img_ok([
        "convert".as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        top.as_os_str(),
        flat.as_os_str(),
    ]);
    assert_eq!(check_compare(&top, &flat, &[]), 0);
}

#[test]
fn compare_different() {
    let s = Scratch::new();
    let a = plain(&s, "a.qcow2", "", 65536);
    let b = s.path("b.qcow2");
    std::fs::copy(&a, &b).unwrap();
    qemu_io_cmds(&b, "qcow2", &["write -P 0x12 3000000 1".into()]);
    assert_eq!(check_compare(&a, &b, &[]), 1);
    // differing only in an allocated-vs-unallocated region that is zero on one side
    let c = s.path("c.qcow2");
    std::fs::copy(&a, &c).unwrap();
    qemu_io_cmds(&c, "qcow2", &["write -P 0 3000000 1".into()]);
    assert_eq!(check_compare(&a, &c, &[]), 0);
    // different sizes: the larger image's tail is zero (identical) or not (differs)
    let small = s.qcow2("small.qcow2", "", 1 << 20);
    let big = s.qcow2("big.qcow2", "", 2 << 20);
    assert_eq!(check_compare(&small, &big, &[]), 0);
    qemu_io_cmds(&big, "qcow2", &["write -P 0x01 1500000 1".into()]);
    assert_eq!(check_compare(&small, &big, &[]), 1);
    // strict mode: size mismatch alone is a difference
    let big2 = s.qcow2("big2.qcow2", "", 2 << 20);
    assert_eq!(check_compare(&small, &big2, &["-s"]), 1);
}

#[test]
fn compare_error() {
    let s = Scratch::new();
    let a = plain(&s, "a.qcow2", "", 65536);
    assert_eq!(check_compare(&a, &s.path("missing.qcow2"), &[]), 2);
    let junk = s.path("junk.qcow2");
    std::fs::write(&junk, b"QFI\xfb\0\0\0\x09 not a header").unwrap();
    assert_eq!(check_compare(&a, &junk, &["-f", "qcow2", "-F", "qcow2"]), 2);
}
