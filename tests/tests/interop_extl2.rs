//! Interop matrix, extended L2 entries (cluster sizes 16 KiB .. 2 MiB) with mixed subcluster states, with
//! and without a backing file.

use qcow2_tests::images::extended_l2;
use qcow2_tests::{Scratch, check_image};

fn extl2(cluster: u64) {
    for backing in [false, true] {
        let s = Scratch::new();
        let img = extended_l2(&s, cluster, backing);
        check_image(&s, &img);
    }
}

#[test]
fn extended_l2_16k() {
    extl2(16 << 10);
}

#[test]
fn extended_l2_32k() {
    extl2(32 << 10);
}

#[test]
fn extended_l2_64k() {
    extl2(64 << 10);
}

#[test]
fn extended_l2_128k() {
    extl2(128 << 10);
}

#[test]
fn extended_l2_256k() {
    extl2(256 << 10);
}

#[test]
fn extended_l2_512k() {
    extl2(512 << 10);
}

#[test]
fn extended_l2_1m() {
    extl2(1 << 20);
}

#[test]
fn extended_l2_2m() {
    extl2(2 << 20);
}
