//! Unit tests of the check and repair on the tiny test image.

extern crate std;
use std::vec;

use super::*;
use crate::MemDevice;
use crate::testimage::{TINY_LEN, tiny_qcow2};

#[derive(Default)]
struct Count(usize);
impl CheckSink for Count {
    fn report(&mut self, _: Problem) {
        self.0 += 1;
    }
}

fn run(img: &[u8], scratch: usize) -> (CheckReport, usize) {
    let mut dev = MemDevice::new(img);
    let mut sink = Count::default();
    let r = check(
        &mut dev,
        &mut [0u8; 512],
        &mut vec![0u8; scratch],
        &mut sink,
    )
    .unwrap();
    (r, sink.0)
}

fn set_refcount(img: &mut [u8], cluster: usize, v: u16) {
    img[1024 + 2 * cluster..1024 + 2 * cluster + 2].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn clean_image() {
    let img = tiny_qcow2();
    let (r, n) = run(&img, 4096);
    assert_eq!(n, 0);
    assert_eq!(r.exit_code(), 0);
    assert_eq!(r.total_clusters, 128);
    assert_eq!(r.allocated_clusters, 1);
    assert_eq!(r.image_end_offset, TINY_LEN as u64);
    assert_eq!(r.passes, 1);
    // One cluster a pass: the same report.
    let (r1, _) = run(&img, 4);
    assert_eq!(r1.passes, 7);
    assert_eq!(CheckReport { passes: 1, ..r1 }, r);
}

#[test]
fn leak_and_repair() {
    let mut img = tiny_qcow2();
    set_refcount(&mut img, 5, 2);
    let (r, _) = run(&img, 4);
    assert_eq!((r.leaks, r.corruptions), (1, 1)); // the leak, and COPIED on a refcount-2 cluster
    let mut buf = img.to_vec();
    let mut dev = MemDevice::new(&mut buf[..]);
    let r = repair(
        &mut dev,
        &mut [0u8; 512],
        &mut [0u8; 8],
        RepairMode::Leaks,
        &mut NoSink,
    )
    .unwrap();
    assert_eq!(r.leaks_fixed, 1);
    assert_eq!(r.exit_code(), 0);
    assert_eq!(&buf[..], &tiny_qcow2()[..]);
}

#[test]
fn zero_refcount_rebuilds_after_the_end() {
    let mut img = tiny_qcow2();
    set_refcount(&mut img, 4, 0);
    let (r, n) = run(&img, 64);
    assert_eq!(r.corruptions, 2); // refcount 0, and the L1 COPIED flag
    assert!(n >= 2);
    let mut buf = img.to_vec();
    buf.resize(64 * 1024, 0);
    let mut dev = MemDevice::with_len(&mut buf[..], TINY_LEN as u64, 512);
    let r = repair(
        &mut dev,
        &mut [0u8; 512],
        &mut vec![0u8; 4096],
        RepairMode::All,
        &mut NoSink,
    )
    .unwrap();
    assert!(r.rebuilt);
    assert_eq!(r.exit_code(), 0);
    assert!(r.corruptions_fixed >= 1);
    let len = dev.content().len();
    // New refcount block and table go after the old end of the file.
    assert_eq!(len, TINY_LEN + 2 * 512);
    let table = u64::from_be_bytes(buf[48..56].try_into().unwrap());
    assert_eq!(table, (TINY_LEN + 512) as u64);
    let (again, n) = run(&buf[..len], 4);
    assert_eq!((again.exit_code(), n), (0, 0));
}

#[test]
fn repeated_l2_tables_stop_the_check() {
    // 64 L1 entries (the whole L1 cluster) all naming the one L2 table: more walks than the file has
    // clusters.
    let mut img = tiny_qcow2();
    img[36..40].copy_from_slice(&64u32.to_be_bytes());
    for i in 0..64 {
        let at = 3 * 512 + 8 * i;
        img[at..at + 8].copy_from_slice(&((4u64 * 512) | (1 << 63)).to_be_bytes());
    }
    let mut dev = MemDevice::new(&img[..]);
    let r = check(&mut dev, &mut [0u8; 512], &mut [0u8; 64], &mut NoSink);
    assert!(matches!(r, Err(Error::Corrupt { .. })), "{r:?}");
    // A few repeats are counted, as QEMU counts them.
    let mut img = tiny_qcow2();
    img[3 * 512 + 8..3 * 512 + 16].copy_from_slice(&((4u64 * 512) | (1 << 63)).to_be_bytes());
    let (r, _) = run(&img, 64);
    assert!(r.corruptions >= 1);
}

#[test]
fn hostile_headers_give_errors() {
    let mut img = tiny_qcow2();
    img[0] = 0;
    let mut dev = MemDevice::new(&img[..]);
    assert!(check(&mut dev, &mut [0u8; 512], &mut [0u8; 64], &mut NoSink).is_err());
    let img = tiny_qcow2();
    let mut dev = MemDevice::new(&img[..]);
    assert!(matches!(
        check(&mut dev, &mut [0u8; 512], &mut [0u8; 3], &mut NoSink),
        Err(Error::BufferTooSmall { .. })
    ));
}
