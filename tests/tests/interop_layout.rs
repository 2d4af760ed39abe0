//! Interop matrix, layout axis: cluster sizes, compat levels and refcount widths. For each image our raw
//! conversion, `info` and `map` must equal qemu-img's.

use qcow2_tests::images::plain;
use qcow2_tests::{Scratch, check_image};

fn cluster(cs: u64) {
    let s = Scratch::new();
    let img = plain(&s, &format!("cs{cs}.qcow2"), "", cs);
    check_image(&s, &img);
}

#[test]
fn cluster_size_512() {
    cluster(512);
}

#[test]
fn cluster_size_4k() {
    cluster(4096);
}

#[test]
fn cluster_size_64k() {
    cluster(65536);
}

#[test]
fn cluster_size_1m() {
    cluster(1 << 20);
}

#[test]
fn cluster_size_2m() {
    cluster(2 << 20);
}

fn compat(level: &str, cs: u64) {
    let s = Scratch::new();
    let img = plain(
        &s,
        &format!("compat{level}.qcow2"),
        &format!("compat={level}"),
        cs,
    );
    check_image(&s, &img);
}

#[test]
fn compat_0_10() {
    compat("0.10", 65536);
}

#[test]
fn compat_0_10_small_clusters() {
    compat("0.10", 1024);
}

#[test]
fn compat_1_1() {
    compat("1.1", 65536);
}

#[test]
fn compat_1_1_lazy_refcounts() {
    let s = Scratch::new();
    let img = plain(&s, "lazy.qcow2", "compat=1.1,lazy_refcounts=on", 65536);
    check_image(&s, &img);
}

fn refcount_bits(bits: u32) {
    let s = Scratch::new();
    let img = plain(
        &s,
        &format!("rc{bits}.qcow2"),
        &format!("refcount_bits={bits}"),
        4096,
    );
    check_image(&s, &img);
}

#[test]
fn refcount_bits_1() {
    refcount_bits(1);
}

#[test]
fn refcount_bits_2() {
    refcount_bits(2);
}

#[test]
fn refcount_bits_4() {
    refcount_bits(4);
}

#[test]
fn refcount_bits_8() {
    refcount_bits(8);
}

#[test]
fn refcount_bits_16() {
    refcount_bits(16);
}

#[test]
fn refcount_bits_32() {
    refcount_bits(32);
}

#[test]
fn refcount_bits_64() {
    refcount_bits(64);
}
