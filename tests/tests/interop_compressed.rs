//! Interop matrix: deflate and zstd compressed clusters (zstd goes through the qcow2-alloc adapter inside
//! the tool), zero clusters of every kind, preallocated zero clusters.

use qcow2_tests::images::{compressed, preallocated, zero_clusters};
use qcow2_tests::{Scratch, check_image};

fn comp(cluster: u64, ctype: &str) {
    let s = Scratch::new();
    let img = compressed(&s, cluster, ctype);
    check_image(&s, &img);
}

#[test]
fn deflate_512() {
    comp(512, "zlib");
}

#[test]
fn deflate_4k() {
    comp(4096, "zlib");
}

#[test]
fn deflate_64k() {
    comp(65536, "zlib");
}

#[test]
fn deflate_2m() {
    comp(2 << 20, "zlib");
}

#[test]
fn zstd_4k() {
    comp(4096, "zstd");
}

#[test]
fn zstd_64k() {
    comp(65536, "zstd");
}

#[test]
fn zstd_1m() {
    comp(1 << 20, "zstd");
}

#[test]
fn zero_clusters_4k() {
    let s = Scratch::new();
    let img = zero_clusters(&s, 4096);
    check_image(&s, &img);
}

#[test]
fn zero_clusters_64k() {
    let s = Scratch::new();
    let img = zero_clusters(&s, 65536);
    check_image(&s, &img);
}

#[test]
fn preallocated_metadata_untouched() {
    let s = Scratch::new();
    let img = preallocated(&s, 65536, false);
    check_image(&s, &img);
}

#[test]
fn preallocated_zero_clusters_4k() {
    let s = Scratch::new();
    let img = preallocated(&s, 4096, true);
    check_image(&s, &img);
}

#[test]
fn preallocated_zero_clusters_64k() {
    let s = Scratch::new();
    let img = preallocated(&s, 65536, true);
    check_image(&s, &img);
}
