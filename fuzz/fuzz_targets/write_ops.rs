//! Arbitrary operation sequences on a small in-memory image (64 KiB virtual, 512-byte clusters, 16-bit
//! refcounts): writes, zero writes (with and without unmap), discards, reads, flushes, reopens, resizes
//! (512 bytes to 128 KiB), internal snapshots created, applied and deleted, the version changed both ways,
//! backing file names written and removed, the image emptied, and persistent bitmaps added, removed,
//! cleared, enabled, disabled and merged (and kept up to date by the writes), with firmware-sized buffers
//! (a 512-byte bounce block, four 512-byte metadata slices). The image must read back exactly as a flat
//! model of the disk (and each snapshot as the disk it was taken of), after every read and after a final
//! close and reopen, and `check` must find no corruption and no leak.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_core::check::{self, NoSink};
use qcow2_core::io::MemDeviceFull;
use qcow2_core::testimage::{TINY_LEN, tiny_qcow2};
use qcow2_core::{Buffers, Error, Image, MemDevice, NoDecompressor, NoFiles, WriteState};

const SIZE: usize = 64 * 1024;
const CAPACITY: usize = 2 << 20;

type Img = Image<MemDevice<Vec<u8>>, Vec<u8>, NoDecompressor, 2, 4, WriteState>;

fn open(bytes: Vec<u8>, len: u64) -> Result<Img, Error<MemDeviceFull>> {
    Image::open_writable(
        MemDevice::with_len(bytes, len, 512),
        Buffers {
            bounce: vec![0u8; 512],
            metadata: vec![0u8; 4 * 512],
        },
        NoDecompressor,
        &mut NoFiles,
    )
}

/// The host offset of the `n`-th entry of the snapshot table.
fn snapshot_entry(img: &mut Img, n: usize) -> u64 {
    let h = img.layers()[0].qcow2().expect("qcow2").header;
    let mut at = h.snapshots_offset;
    for _ in 0..n {
        at = img.read_snapshot(0, at).expect("snapshot entry").1;
    }
    at
}

fn version(img: &Img) -> u32 {
    img.layers()[0].qcow2().expect("qcow2").header.version
}

fn close(img: Img) -> (Vec<u8>, u64) {
    let dev = img.close().expect("close");
    let len = dev.content().len() as u64;
    (dev.into_inner(), len)
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = tiny_qcow2().to_vec();
    bytes.resize(CAPACITY, 0);
    let mut img = open(bytes, TINY_LEN as u64).expect("the template opens");
    let mut model = vec![0u8; SIZE];
    for (i, b) in model[..512].iter_mut().enumerate() {
        *b = i as u8;
    }
    let mut snapshots: Vec<Vec<u8>> = Vec::new();
    for op in data.chunks_exact(6).take(64) {
        let size = model.len();
        let off = (usize::from(u16::from_le_bytes([op[1], op[2]])) % size) as u64;
        let len = (1 + usize::from(u16::from_le_bytes([op[3], op[4]])) % 8192)
            .min(size - off as usize) as u64;
        let (o, l) = (off as usize, len as usize);
        match op[0] % 16 {
            0 | 1 => {
                img.write_at(off, &vec![op[5]; l]).expect("write");
                model[o..o + l].fill(op[5]);
            }
            2 => {
                img.write_zeroes(off, len, op[5] & 1 != 0)
                    .expect("write_zeroes");
                model[o..o + l].fill(0);
            }
            3 => {
                img.discard(off, len).expect("discard");
                let start = o.div_ceil(512) * 512;
                let end = if o + l == size {
                    o + l
                } else {
                    (o + l) / 512 * 512
                };
                if start < end {
                    model[start..end].fill(0);
                }
            }
            4 => {
                let mut buf = vec![0u8; l];
                img.read_at(off, &mut buf).expect("read");
                assert!(
                    buf == model[o..o + l],
                    "read {off}+{len} differs from the model"
                );
            }
            5 => img.flush().expect("flush"),
            6 => {
                let (bytes, len) = close(img);
                img = open(bytes, len).expect("reopen");
            }
            7 => {
                let new = (usize::from(u16::from_le_bytes([op[1], op[2]])) % 256 + 1) * 512;
                match img.resize(new as u64) {
                    Ok(()) => model.resize(new, 0),
                    // Version 2 images with snapshots keep their size, as in QEMU.
                    Err(Error::Unsupported { .. })
                        if version(&img) == 2 && !snapshots.is_empty() => {}
                    Err(e) => panic!("resize: {e}"),
                }
            }
            8 => {
                img.create_snapshot(&qcow2_core::write::NewSnapshot {
                    name: &op[1..3],
                    date_sec: 0,
                    date_nsec: 0,
                    vm_clock_nsec: 0,
                })
                .expect("create a snapshot");
                snapshots.push(model.clone());
            }
            9 if !snapshots.is_empty() => {
                let n = usize::from(op[1]) % snapshots.len();
                let at = snapshot_entry(&mut img, n);
                img.apply_snapshot(at).expect("apply a snapshot");
                model = snapshots[n].clone();
            }
            10 if !snapshots.is_empty() => {
                let n = usize::from(op[1]) % snapshots.len();
                let at = snapshot_entry(&mut img, n);
                img.delete_snapshot(at).expect("delete a snapshot");
                snapshots.remove(n);
            }
            11 if version(&img) >= 3 => match img.downgrade_to_v2() {
                // Snapshots of another disk size stay version 3, as in QEMU.
                Ok(()) | Err(Error::Unsupported { .. }) => {}
                Err(e) => panic!("downgrade: {e}"),
            },
            11 => img.upgrade_to_v3().expect("upgrade"),
            12 => {
                let name: String = (0..usize::from(op[5]) + 1)
                    .map(|i| char::from(b'a' + (op[1].wrapping_add(i as u8) % 26)))
                    .collect();
                img.set_backing_file(Some(qcow2_core::write::BackingFile {
                    name: &name,
                    format: Some("qcow2"),
                }))
                .expect("name a backing file");
                img.set_backing_file(None).expect("remove the backing file");
            }
            13 => {
                img.make_empty().expect("make empty");
                model.fill(0);
            }
            14 => {
                let name = ["b0", "b1", "b2", "b3"][usize::from(op[1] % 4)];
                let added = img.add_bitmap(&qcow2_core::write::NewBitmap {
                    name,
                    granularity_bits: 9 + op[2] % 8,
                    enabled: op[5] & 1 != 0,
                });
                match added {
                    // An existing name, a version 2 image.
                    Ok(()) | Err(Error::Unsupported { .. }) => {}
                    Err(e) => panic!("add a bitmap: {e}"),
                }
            }
            15 => {
                let name = ["b0", "b1", "b2", "b3"][usize::from(op[1] % 4)];
                let other = ["b0", "b1", "b2", "b3"][usize::from(op[2] % 4)];
                let done = match op[5] % 5 {
                    0 => img.remove_bitmap(name),
                    1 => img.clear_bitmap(name),
                    2 => img.set_bitmap_enabled(name, true),
                    3 => img.set_bitmap_enabled(name, false),
                    _ => img.merge_bitmap(name, other),
                };
                match done {
                    // No such bitmap (or one left in use by a change of disk size).
                    Ok(()) | Err(Error::Unsupported { .. }) => {}
                    Err(e) => panic!("change a bitmap: {e}"),
                }
            }
            _ => {}
        }
        assert_eq!(img.virtual_size(), model.len() as u64, "virtual size");
    }
    let (bytes, len) = close(img);
    // What the engine leaves behind is clean: no corruption, no leaked cluster.
    let mut bounce = [0u8; 512];
    let mut scratch = vec![0u8; 4096];
    let report = check::check(
        &mut MemDevice::with_len(&bytes[..], len, 512),
        &mut bounce,
        &mut scratch,
        &mut NoSink,
    )
    .expect("check");
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0),
        "the image is not clean after the sequence"
    );
    let mut img = open(bytes, len).expect("final reopen");
    let mut all = vec![0u8; model.len()];
    img.read_at(0, &mut all).expect("final read");
    assert!(all == model, "final content differs from the model");
    for (n, want) in snapshots.iter().enumerate() {
        let at = snapshot_entry(&mut img, n);
        img.apply_snapshot(at).expect("apply a snapshot");
        let mut got = vec![0u8; want.len()];
        img.read_at(0, &mut got).expect("read a snapshot");
        assert!(
            &got == want,
            "snapshot {n} differs from the disk it was taken of"
        );
    }
});
