//! Several threads on one image through the hosted thread-safe handle: writers on disjoint blocks that share
//! clusters and L2 slices, writers racing on the same blocks, zeroers, and readers. Every request is atomic
//! (a read never returns a mix of two writes), the image is clean in `qemu-img check` afterwards, and every
//! block holds what its last writer wrote.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use qcow2_hosted::shared::SharedDisk;
use qcow2_tests::ops::Rng;
use qcow2_tests::{Scratch, qemu_img, qemu_img_ok, qemu_io_cmds};

const BLOCK: u64 = 4096;
const OWNED_WRITERS: u64 = 4;

/// The value a thread writes into a block on a given round; never 0 (0 is what zeroed blocks read).
fn value(thread: u64, round: u64) -> u8 {
    (1 + (thread * 61 + round * 7) % 250) as u8
}

#[test]
fn readers_and_writers_on_one_image() {
    let s = Scratch::new();
    let base = s.path("base.qcow2");
    let img = s.path("top.qcow2");
    let size: u64 = 16 << 20;
    qemu_img_ok(["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "16M"]);
    // The backing file holds 0xbb everywhere, so copy-on-write is exercised by every first write.
    qemu_io_cmds(&base, "qcow2", &["write -P 0xbb 0 16M".to_string()]);
    qemu_img_ok([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=16384",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        img.to_str().unwrap(),
    ]);
    let disk = SharedDisk::open(img.to_str().unwrap(), Some("qcow2")).unwrap();
    assert_eq!(disk.virtual_size(), size);
    // Layout: the first 8 MiB are blocks owned by one writer each (block b belongs to writer b % 4, so the
    // four writers share every cluster); the next 4 MiB are written by two racing writers; the last 4 MiB
    // are zeroed and rewritten by one thread.
    let owned_blocks = (8 << 20) / BLOCK;
    let raced = (8u64 << 20, 4u64 << 20);
    let zeroed = (12u64 << 20, 4u64 << 20);
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for t in 0..OWNED_WRITERS {
        let disk = disk.clone();
        handles.push(thread::spawn(move || {
            let mut last = vec![0u8; owned_blocks as usize];
            let mut rng = Rng(t + 1);
            for round in 0..600u64 {
                let b = (rng.below(owned_blocks / OWNED_WRITERS)) * OWNED_WRITERS + t;
                let v = value(t, round);
                disk.write_at(b * BLOCK, &vec![v; BLOCK as usize]).unwrap();
                last[b as usize] = v;
                if round % 100 == 99 {
                    disk.flush().unwrap();
                }
            }
            last
        }));
    }
    let mut racers = Vec::new();
    for t in 10..12u64 {
        let disk = disk.clone();
        racers.push(thread::spawn(move || {
            let mut rng = Rng(t);
            for round in 0..400u64 {
                let blocks = 1 + rng.below(4);
                let b = rng.below(raced.1 / BLOCK - blocks);
                let v = value(t, round);
                disk.write_at(raced.0 + b * BLOCK, &vec![v; (blocks * BLOCK) as usize])
                    .unwrap();
            }
        }));
    }
    let zeroer = {
        let disk = disk.clone();
        thread::spawn(move || {
            let mut rng = Rng(99);
            let mut last = vec![0xbbu8; (zeroed.1 / BLOCK) as usize];
            for round in 0..300u64 {
                let b = rng.below(zeroed.1 / BLOCK - 8);
                let n = 1 + rng.below(8);
                let at = zeroed.0 + b * BLOCK;
                match round % 3 {
                    0 => {
                        disk.write_zeroes(at, n * BLOCK, round % 2 == 0).unwrap();
                        last[b as usize..(b + n) as usize].fill(0);
                    }
                    1 => {
                        let v = value(20, round);
                        disk.write_at(at, &vec![v; (n * BLOCK) as usize]).unwrap();
                        last[b as usize..(b + n) as usize].fill(v);
                    }
                    _ => {
                        // Discards change only whole clusters; keep the model exact by discarding
                        // cluster-aligned ranges (16 KiB = 4 blocks).
                        let c = b / 4 * 4;
                        disk.discard(zeroed.0 + c * BLOCK, 4 * BLOCK).unwrap();
                        last[c as usize..(c + 4) as usize].fill(0);
                    }
                }
            }
            last
        })
    };
    let mut readers = Vec::new();
    for t in 0..3u64 {
        let disk = disk.clone();
        let stop = stop.clone();
        readers.push(thread::spawn(move || {
            let mut rng = Rng(1000 + t);
            let mut buf = vec![0u8; (4 * BLOCK) as usize];
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) || reads < 200 {
                let b = rng.below(size / BLOCK - 4);
                disk.read_at(b * BLOCK, &mut buf).unwrap();
                for block in buf.chunks(BLOCK as usize) {
                    assert!(
                        block.iter().all(|&x| x == block[0]),
                        "a read saw a block that is not one write's data (block near {b})"
                    );
                }
                reads += 1;
            }
            reads
        }));
    }
    let owned: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for r in racers {
        r.join().unwrap();
    }
    let zeroed_model = zeroer.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(reads >= 600);
    disk.close().unwrap();
    assert!(
        disk.read_at(0, &mut [0u8; 512]).is_err(),
        "a closed image must refuse reads"
    );

    let out = qemu_img(["check", img.to_str().unwrap()]);
    assert!(out.code == Some(0), "{}", out.describe());
    let rawfile = s.path("top.raw");
    qemu_img_ok([
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        rawfile.to_str().unwrap(),
    ]);
    let data = std::fs::read(&rawfile).unwrap();
    for b in 0..owned_blocks {
        let t = (b % OWNED_WRITERS) as usize;
        let want = match owned[t][b as usize] {
            0 => 0xbb,
            v => v,
        };
        let got = &data[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
        assert!(
            got.iter().all(|&x| x == want),
            "owned block {b}: want {want:#x}, got {:#x}",
            got[0]
        );
    }
    for b in 0..raced.1 / BLOCK {
        let at = (raced.0 + b * BLOCK) as usize;
        let got = &data[at..at + BLOCK as usize];
        assert!(got.iter().all(|&x| x == got[0]), "raced block {b} is torn");
    }
    for (i, want) in zeroed_model.iter().enumerate() {
        let at = (zeroed.0 + i as u64 * BLOCK) as usize;
        let got = &data[at..at + BLOCK as usize];
        assert!(
            got.iter().all(|&x| x == *want),
            "zeroed-region block {i}: want {want:#x}, got {:#x}",
            got[0]
        );
    }
}
