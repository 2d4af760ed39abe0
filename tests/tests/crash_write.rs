//! Power loss during writes. Each workload runs once on a recording device; then, for every device write and
//! flush, crash states are built (none, all, or a random subset of the writes since the last flush, with
//! multi-sector writes torn at sector granularity). Every state must:
//! - open with the engine (a dirty lazy-refcounts image is opened writable, which rebuilds its refcounts),
//! - have no refcount below its number of references and exact COPIED flags (an independent counter; a
//!   sample also goes through `qemu-img check`, which must report no corruption), and
//! - read, sector by sector, the data of every write that completed before the last completed flush, and
//!   elsewhere either the old or one of the newer values, never anything else.
//!
//! The test prints how many crash states it checked. `QCOW2_CRASH_SEEDS=N` runs more random subsets per
//! crash point.

use std::cell::RefCell;
use std::rc::Rc;

use qcow2_core::BlockDeviceWrite;
use qcow2_core::create::{CreateOptions, Preallocation, create};
use qcow2_core::format::Header;
use qcow2_core::{Error, Image};
use qcow2_tests::crash::{
    Event, Log, SimDevice, SimError, Survivors, check_refcounts, crash_state,
};
use qcow2_tests::crash_harness::{
    Backing, CELL, Img, ResizeCase, Values, buffers, exactly, open_read_only, open_recorded,
    open_writable_bytes, resize_states, seeds, states_of, verify, verify_sampled,
};
use qcow2_tests::ops::{Op, ops};
use qcow2_tests::{Scratch, guest_view, qemu_img, qemu_img_ok, qemu_io_cmds};

struct Workload {
    name: &'static str,
    opts: &'static str,
    size: u64,
    cluster: u64,
    backing: bool,
    setup: &'static [&'static str],
    snapshot: bool,
    seed: u64,
    count: usize,
    small: bool,
    /// The workload must grow the refcount table.
    grows_table: bool,
    /// Compressed cluster writes into fresh clusters, then plain writes and discards over them
    /// ([`compressed_ops`]).
    compressed: bool,
    /// Runs of whole clusters written as a parallel copy writes them ([`write_reserved`]), between plain
    /// writes, zeroing and discards ([`reserved_ops`]).
    reserved: bool,
}

/// Guest sectors after each operation, following QEMU's semantics.
fn apply_model(model: &mut [u8], op: &Op, w: &Workload, v3: bool) {
    let sectors =
        |off: u64, len: u64| (off / CELL as u64) as usize..((off + len) / CELL as u64) as usize;
    match op {
        Op::Write { off, len, byte } => model[sectors(*off, *len)].fill(*byte),
        Op::Zero { off, len, .. } => model[sectors(*off, *len)].fill(0),
        Op::Discard { off, len } => {
            if !v3 && w.backing {
                return;
            }
            let start = off.div_ceil(w.cluster) * w.cluster;
            let end = if off + len == w.size {
                off + len
            } else {
                (off + len) / w.cluster * w.cluster
            };
            if start < end {
                model[sectors(start, end - start)].fill(0);
            }
        }
        Op::Flush => {}
    }
}

fn run(w: &Workload, seeds: u64) -> usize {
    let s = Scratch::new();
    let img = s.path("w.qcow2");
    let base = s.path("base.qcow2");
    let mut base_bytes = None;
    let mut create: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    if !w.opts.is_empty() {
        create.extend(["-o".to_string(), w.opts.to_string()]);
    }
    if w.backing {
        qemu_img_ok([
            "create",
            "-q",
            "-f",
            "qcow2",
            base.to_str().unwrap(),
            &w.size.to_string(),
        ]);
        qemu_io_cmds(
            &base,
            "qcow2",
            &[
                format!("write -P 0x11 0 {}", w.size / 2),
                format!("write -P 0x22 {} {}", w.size / 2 + 4096, w.size / 4),
            ],
        );
        base_bytes = Some(std::fs::read(&base).unwrap());
        create.extend(["-b", "base.qcow2", "-F", "qcow2"].map(String::from));
    }
    create.extend([img.display().to_string(), w.size.to_string()]);
    qemu_img_ok(&create);
    let setup: Vec<String> = w.setup.iter().map(|c| c.to_string()).collect();
    qemu_io_cmds(&img, "qcow2", &setup);
    if w.snapshot {
        qemu_img_ok(["snapshot", "-c", "snap", img.to_str().unwrap()]);
    }
    let initial = std::fs::read(&img).unwrap();
    // The guest content before the workload, read with qemu-img.
    let before = s.path("before.raw");
    qemu_img_ok([
        "convert".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        img.as_os_str(),
        before.as_os_str(),
    ]);
    let before = std::fs::read(&before).unwrap();
    let sectors = (w.size as usize) / CELL;
    let mut model: Vec<u8> = (0..sectors)
        .map(|i| {
            let s = &before[i * CELL..(i + 1) * CELL];
            assert!(
                s.iter().all(|&b| b == s[0]),
                "starting content must be uniform per sector"
            );
            s[0]
        })
        .collect();
    let v3 = !w.opts.contains("compat=0.10");
    let (mut seq, compressed) = if w.compressed {
        compressed_ops(w)
    } else if w.reserved {
        (reserved_ops(w), Vec::new())
    } else {
        (ops(w.seed, w.size, w.cluster, w.count), Vec::new())
    };
    seq.push(Op::Flush);

    // Run the workload once, recording.
    let log: Log = Rc::new(RefCell::new(Vec::new()));
    let dev = SimDevice {
        data: initial.clone(),
        id: 0,
        log: log.clone(),
        read_only: false,
    };
    let mut image: Img = Image::open_writable(
        dev,
        buffers(w.small),
        qcow2_alloc::AllocDecompressor::default(),
        &mut Backing(base_bytes.clone(), log.clone()),
    )
    .unwrap();
    // Half the workloads discard the clusters that discards and unmapping zero writes give back on the
    // device too (qemu-io's default).
    image.pass_discards(w.seed % 2 == 1);
    let mut reserved = 0u64;
    for (j, op) in seq.iter().enumerate() {
        log.borrow_mut().push(Event::OpStart(j));
        match op {
            Op::Write { off, byte, .. } if compressed.get(j) == Some(&true) => {
                image.write_compressed(*off, &compressed_cluster(w.cluster, *byte))
            }
            Op::Write { off, len, byte } if w.reserved => {
                write_reserved(&mut image, *off, &vec![*byte; *len as usize], w.cluster)
                    .map(|n| reserved += n)
            }
            Op::Write { off, len, byte } => image.write_at(*off, &vec![*byte; *len as usize]),
            Op::Zero { off, len, unmap } => image.write_zeroes(*off, *len, *unmap),
            Op::Discard { off, len } => image.discard(*off, *len),
            Op::Flush => image.flush(),
        }
        .unwrap_or_else(|e| panic!("{}: {op:?}: {e}", w.name));
        log.borrow_mut().push(Event::OpEnd(j));
    }
    log.borrow_mut().push(Event::OpStart(seq.len()));
    assert!(
        !w.reserved || reserved > 0,
        "{}: no write went through a reservation",
        w.name
    );
    let done = image.close().unwrap();
    if w.grows_table {
        let clusters = |b: &[u8]| u32::from_be_bytes(b[56..60].try_into().unwrap());
        assert!(
            clusters(&done.data) > clusters(&initial),
            "{}: the refcount table did not grow",
            w.name
        );
    }
    if w.compressed {
        let image = qcow2_tests::malformed::Image {
            bytes: done.data.clone(),
        };
        let (bits, cluster) = (image.cluster_bits(), image.cluster_size());
        let x = 62 - (bits - 8);
        let across = (0..w.size / cluster)
            .filter(|&g| image.u64(image.l1_entry_pos(g / image.l2_entries())) != 0)
            .map(|g| image.l2_entry(g))
            .filter(|e| e & qcow2_tests::malformed::L2_COMPRESSED != 0)
            .filter(|e| {
                let offset = e & ((1u64 << x) - 1);
                let sectors = ((e & !(3u64 << 62)) >> x) + 1;
                let end = (offset & !511) + sectors * 512;
                offset / cluster != (end - 1) / cluster
            })
            .count();
        assert!(
            across > 0,
            "{}: no compressed cluster crosses a host-cluster boundary",
            w.name
        );
        eprintln!(
            "{}: {across} compressed clusters cross a host-cluster boundary",
            w.name
        );
    }
    let events = log.borrow().clone();

    // Model snapshots: the guest content after each operation.
    let mut after: Vec<Vec<u8>> = Vec::with_capacity(seq.len() + 1);
    after.push(model.clone());
    for op in &seq {
        apply_model(&mut model, op, w, v3);
        after.push(model.clone());
    }

    let mut states = 0usize;
    let mut qemu_checked = 0usize;
    for k in 0..=events.len() {
        if k > 0
            && !matches!(
                events[k - 1],
                Event::Write { dev: 0, .. } | Event::Flush { dev: 0 }
            )
        {
            continue;
        }
        // The operation in progress, and the last flush that completed.
        let current = events[..k]
            .iter()
            .rev()
            .find_map(|e| match e {
                Event::OpStart(j) => Some(*j),
                _ => None,
            })
            .unwrap_or(0);
        let flushed = events[..k]
            .iter()
            .rev()
            .find_map(|e| match e {
                Event::OpEnd(j) if matches!(seq[*j], Op::Flush) => Some(*j + 1),
                _ => None,
            })
            .unwrap_or(0);
        // Allowed values per sector: the content at the flush, and everything written after it up to the
        // operation in progress (inclusive).
        let mut allowed = vec![Values::default(); sectors];
        for snapshot in &after[flushed..=(current + 1).min(seq.len())] {
            for (i, v) in snapshot.iter().enumerate() {
                allowed[i].add(*v);
            }
        }
        let mut kinds = vec![Survivors::None, Survivors::All];
        for r in 0..seeds {
            kinds.push(Survivors::Random((k as u64) << 8 | r));
        }
        for survivors in &kinds {
            let (state, tail) = crash_state(&initial, &events, 0, k, survivors);
            if tail == 0 && !matches!(survivors, Survivors::None) {
                continue;
            }
            states += 1;
            let what = format!("{}: crash after event {k} ({survivors:?})", w.name);
            if std::env::var_os("QCOW2_CRASH_DUMP").is_some() {
                std::fs::write("/tmp/crash-state.qcow2", &state).unwrap();
                std::fs::write("/tmp/crash-events.txt", format!("{:#?}", &events[..k])).unwrap();
            }
            let checked = verify(&state, &base_bytes, &allowed, &what);
            if states.is_multiple_of(23) {
                qemu_checked += 1;
                let path = s.path("state.qcow2");
                std::fs::write(&path, &checked).unwrap();
                let out = qemu_img(["check".as_ref(), path.as_os_str()]);
                assert!(
                    matches!(out.code, Some(0) | Some(3)),
                    "{what}: qemu-img check reports corruption:\n{}",
                    out.describe()
                );
            }
        }
    }
    eprintln!(
        "{}: {} events, {states} crash states checked ({qemu_checked} also by qemu-img check)",
        w.name,
        events.len()
    );
    states
}

/// Checks one crash state; returns the image as checked (repaired first when it was dirty).
const fn wl(
    name: &'static str,
    opts: &'static str,
    size: u64,
    cluster: u64,
    seed: u64,
) -> Workload {
    Workload {
        name,
        opts,
        size,
        cluster,
        backing: false,
        setup: &[],
        snapshot: false,
        seed,
        count: 40,
        small: false,
        grows_table: false,
        compressed: false,
        reserved: false,
    }
}

/// A compressed workload: whole-cluster writes into clusters that hold nothing yet (the engine writes these
/// compressed, [`compressed_cluster`]), a third of them later overwritten in part or discarded (freeing
/// compressed clusters that share host clusters), flushes between. Returns the operations and which of them
/// are compressed.
fn compressed_ops(w: &Workload) -> (Vec<Op>, Vec<bool>) {
    let mut r = qcow2_tests::ops::Rng(w.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let clusters = w.size / w.cluster;
    let mut order: Vec<u64> = (0..clusters).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, r.below(i as u64 + 1) as usize);
    }
    let mut seq = Vec::new();
    let mut compressed = Vec::new();
    let mut written = Vec::new();
    for &c in order.iter().take(w.count) {
        seq.push(Op::Write {
            off: c * w.cluster,
            len: w.cluster,
            byte: (1 + r.below(250)) as u8,
        });
        compressed.push(true);
        written.push(c);
        let step = match r.below(8) {
            0 => Some(Op::Flush),
            1 | 2 => {
                let c = written[r.below(written.len() as u64) as usize];
                Some(if r.below(2) == 0 {
                    Op::Discard {
                        off: c * w.cluster,
                        len: w.cluster,
                    }
                } else {
                    Op::Write {
                        off: c * w.cluster + 512,
                        len: 512,
                        byte: (1 + r.below(250)) as u8,
                    }
                })
            }
            _ => None,
        };
        if let Some(op) = step {
            seq.push(op);
            compressed.push(false);
        }
    }
    (seq, compressed)
}

/// Whole-cluster runs (one to five clusters, cluster-aligned) written with [`write_reserved`], a quarter of
/// them then overwritten in part, zeroed or discarded, flushes between.
fn reserved_ops(w: &Workload) -> Vec<Op> {
    let mut r = qcow2_tests::ops::Rng(w.seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
    let clusters = w.size / w.cluster;
    let mut seq = Vec::new();
    for _ in 0..w.count {
        let n = 1 + r.below(5);
        let c = r.below(clusters - n + 1);
        seq.push(Op::Write {
            off: c * w.cluster,
            len: n * w.cluster,
            byte: (1 + r.below(250)) as u8,
        });
        let off = c * w.cluster + w.cluster / 2;
        match r.below(8) {
            0 => seq.push(Op::Flush),
            1 => seq.push(Op::Write {
                off,
                len: CELL as u64,
                byte: (1 + r.below(250)) as u8,
            }),
            2 => seq.push(Op::Zero {
                off: c * w.cluster,
                len: w.cluster,
                unmap: r.below(2) == 0,
            }),
            3 => seq.push(Op::Discard {
                off: c * w.cluster,
                len: w.cluster,
            }),
            _ => {}
        }
    }
    seq
}

/// A write the way a parallel copy makes it: whole clusters that need new host clusters are reserved
/// (`Image::reserve_clusters`), their data stored, then committed; the rest is written as usual. Returns
/// how many bytes went through reservations.
fn write_reserved(
    image: &mut Img,
    off: u64,
    data: &[u8],
    cluster: u64,
) -> Result<u64, Error<SimError>> {
    let mut reserved = 0;
    let end = off + data.len() as u64;
    let mut at = off;
    while at < end {
        let from = (at - off) as usize;
        if at.is_multiple_of(cluster) && end - at >= cluster {
            let whole = (end - at) / cluster * cluster;
            if let Some(r) = image.reserve_clusters(at, whole)? {
                let n = r.len() as usize;
                image.store_reserved(&r, &data[from..from + n])?;
                image.commit_reservation(r)?;
                at += n as u64;
                reserved += n as u64;
                continue;
            }
        }
        let n = (((at / cluster) + 1) * cluster).min(end) - at;
        image.write_at(at, &data[from..from + n as usize])?;
        at += n;
    }
    Ok(reserved)
}

/// A raw-deflate stream that inflates to one cluster of `byte` and is about 60% of a cluster long: a stored
/// (uncompressed) block with the first part of the cluster, then the rest compressed. Long compressed
/// clusters make consecutive ones cross host-cluster boundaries.
fn compressed_cluster(cluster: u64, byte: u8) -> Vec<u8> {
    let data = vec![byte; cluster as usize];
    let stored = (cluster as usize * 3 / 5).min(65535);
    let mut out = vec![0u8];
    out.extend_from_slice(&(stored as u16).to_le_bytes());
    out.extend_from_slice(&(!(stored as u16)).to_le_bytes());
    out.extend_from_slice(&data[..stored]);
    let rest = qcow2_alloc::compress_cluster(
        qcow2_core::format::CompressionType::Deflate,
        &data[stored..],
    )
    .expect("a uniform run compresses");
    out.extend_from_slice(&rest);
    assert!((out.len() as u64) < cluster);
    out
}

fn total(test: &str, workloads: &[Workload]) {
    let seeds = seeds();
    let n: usize = workloads.iter().map(|w| run(w, seeds)).sum();
    qcow2_tests::record_evidence(
        &format!("crash_write-{test}"),
        &format!(
            "crash_write {test}: {n} crash states checked over {} workloads, 0 violations",
            workloads.len()
        ),
    );
    assert!(n > 0);
}

#[test]
fn crash_allocation_paths() {
    total(
        "allocation",
        &[
            // First writes into an empty image: new L2 tables and data clusters.
            wl("empty image", "", 4 << 20, 65536, 1),
            // 512-byte clusters, 64-bit refcounts: new refcount blocks and refcount table growth.
            Workload {
                count: 60,
                ..wl(
                    "refcount growth",
                    "cluster_size=512,refcount_bits=64",
                    4 << 20,
                    512,
                    2,
                )
            },
            wl(
                "1-bit refcounts",
                "cluster_size=1024,refcount_bits=1",
                2 << 20,
                1024,
                3,
            ),
            // Close to the end of what one refcount table cluster covers (64 blocks of 64 clusters): the
            // workload's allocations grow the table.
            Workload {
                setup: &["write -P 0x5b 0 1975k"],
                count: 60,
                grows_table: true,
                ..wl(
                    "refcount table growth",
                    "cluster_size=512,refcount_bits=64",
                    4 << 20,
                    512,
                    12,
                )
            },
            Workload {
                small: true,
                ..wl("small buffers", "cluster_size=4096", 2 << 20, 4096, 4)
            },
        ],
    );
}

#[test]
fn crash_cow_paths() {
    total(
        "cow",
        &[
            Workload {
                backing: true,
                ..wl("backing", "", 4 << 20, 65536, 5)
            },
            Workload {
                setup: &["write -c -P 0x33 0 1M", "write -c -P 0x44 2M 512k"],
                ..wl("compressed", "", 4 << 20, 65536, 6)
            },
            Workload {
                setup: &["write -P 0x55 0 3M"],
                snapshot: true,
                ..wl("snapshot", "", 4 << 20, 65536, 7)
            },
            Workload {
                backing: true,
                ..wl(
                    "extended L2",
                    "extended_l2=on,cluster_size=16k",
                    2 << 20,
                    16384,
                    8,
                )
            },
            wl("compat 0.10", "compat=0.10", 2 << 20, 65536, 9),
        ],
    );
}

/// Whole-cluster runs written the way a parallel copy writes them (reserved, stored, committed), into an
/// empty image, over a backing file, with extended L2 entries and 1-bit refcounts, and over a snapshot's
/// clusters (which need copy-on-write, so are written as usual).
#[test]
fn crash_reserved_writes() {
    total(
        "reserved",
        &[
            Workload {
                reserved: true,
                ..wl("reserved runs", "cluster_size=4096", 1 << 20, 4096, 21)
            },
            Workload {
                reserved: true,
                backing: true,
                ..wl("reserved runs over a backing file", "", 4 << 20, 65536, 22)
            },
            Workload {
                reserved: true,
                small: true,
                ..wl(
                    "reserved runs, extended L2, small buffers",
                    "extended_l2=on,cluster_size=16k",
                    2 << 20,
                    16384,
                    23,
                )
            },
            Workload {
                reserved: true,
                ..wl(
                    "reserved runs, 1-bit refcounts",
                    "cluster_size=1024,refcount_bits=1",
                    1 << 20,
                    1024,
                    24,
                )
            },
            Workload {
                reserved: true,
                setup: &["write -P 0x55 0 1M"],
                snapshot: true,
                ..wl(
                    "reserved runs over a snapshot",
                    "cluster_size=4096",
                    2 << 20,
                    4096,
                    25,
                )
            },
        ],
    );
}

/// Compressed clusters packed across host-cluster boundaries, then overwritten and discarded: every crash
/// state keeps the refcounts of shared host clusters at least their references.
#[test]
fn crash_compressed_packing() {
    total(
        "compressed",
        &[
            Workload {
                compressed: true,
                count: 48,
                ..wl("compressed packing", "cluster_size=4096", 1 << 20, 4096, 13)
            },
            Workload {
                compressed: true,
                count: 24,
                small: true,
                ..wl(
                    "compressed packing, 2-bit refcounts, small buffers",
                    "cluster_size=1024,refcount_bits=2",
                    1 << 20,
                    1024,
                    14,
                )
            },
            Workload {
                compressed: true,
                count: 24,
                backing: true,
                ..wl(
                    "compressed packing over a backing file",
                    "",
                    2 << 20,
                    65536,
                    15,
                )
            },
        ],
    );
}

#[test]
fn crash_lazy_refcounts() {
    // Refcounts may lag behind the L2 tables; the dirty bit makes the next writable open rebuild them.
    total(
        "lazy",
        &[
            wl(
                "lazy refcounts",
                "lazy_refcounts=on,cluster_size=4096",
                2 << 20,
                4096,
                10,
            ),
            Workload {
                small: true,
                backing: true,
                ..wl(
                    "lazy refcounts, small buffers",
                    "lazy_refcounts=on,cluster_size=8192",
                    1 << 20,
                    8192,
                    11,
                )
            },
        ],
    );
}

/// Crash states of one recorded run of `f` on a device holding `initial`: every write and flush boundary,
/// with none, all and `seeds` random subsets of the unflushed writes.
/// Power loss while `create` formats a device: the device either does not open as qcow2 (a clean error) or
/// opens as a consistent, all-zero image; once `create` has returned and flushed, it always opens.
#[test]
fn crash_during_create() {
    let mut n = 0;
    for opts in [
        CreateOptions {
            size: 4 << 20,
            cluster_size: 4096,
            ..CreateOptions::default()
        },
        CreateOptions {
            size: 2 << 20,
            cluster_size: 512,
            refcount_bits: 64,
            preallocation: Preallocation::Metadata,
            ..CreateOptions::default()
        },
        CreateOptions {
            size: 1 << 20,
            cluster_size: 65536,
            extended_l2: true,
            lazy_refcounts: true,
            preallocation: Preallocation::Full,
            ..CreateOptions::default()
        },
    ] {
        let size = opts.size;
        let states = states_of(&[], |mut dev| {
            let mut bounce = [0u8; 512];
            let len = create(&mut dev, &mut bounce, &opts).unwrap();
            dev.data.resize(len as usize, 0);
            dev.flush().unwrap();
        });
        let last = states.len() - 1;
        let allowed = vec![
            {
                let mut v = Values::default();
                v.add(0);
                v
            };
            size as usize / CELL
        ];
        for (i, (state, what)) in states.iter().enumerate() {
            let what = format!("create {opts:?}: {what}");
            let opens = state.len() >= 72 && Header::parse(&state[..state.len().min(4096)]).is_ok();
            if i == last {
                assert!(opens, "{what}: the finished image does not open");
            }
            if opens {
                verify(state, &None, &allowed, &what);
            }
            n += 1;
        }
    }
    qcow2_tests::record_evidence(
        "crash_write-create",
        &format!("crash_write create: {n} crash states checked, 0 violations"),
    );
}

/// Power loss while a writable open rebuilds the refcounts of a dirty (lazy refcounts) image: the dirty bit
/// stays set until the rebuild is complete, so every crash state is repaired again by the next open, and the
/// guest data never changes.
#[test]
fn crash_during_refcount_rebuild() {
    let s = Scratch::new();
    let img = s.path("dirty.qcow2");
    qemu_img_ok([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on,cluster_size=4096",
        img.to_str().unwrap(),
        "2M",
    ]);
    qemu_io_cmds(
        &img,
        "qcow2",
        &[
            "write -P 0x31 0 300k".to_string(),
            "write -P 0x32 700k 64k".to_string(),
            "write -P 0x33 1500k 200k".to_string(),
        ],
    );
    let raw = s.path("dirty.raw");
    qemu_img_ok([
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let raw = std::fs::read(&raw).unwrap();
    let allowed: Vec<Values> = raw
        .chunks(CELL)
        .map(|c| {
            let mut a = Values::default();
            a.add(c[0]);
            a
        })
        .collect();
    // What a crash with lazy refcounts can leave: the dirty bit set and refcounts that lag behind (here the
    // whole first refcount block is lost).
    let mut dirty = std::fs::read(&img).unwrap();
    let incompat = u64::from_be_bytes(dirty[72..80].try_into().unwrap()) | 1;
    dirty[72..80].copy_from_slice(&incompat.to_be_bytes());
    let rt = u64::from_be_bytes(dirty[48..56].try_into().unwrap()) as usize;
    let block = u64::from_be_bytes(dirty[rt..rt + 8].try_into().unwrap()) as usize;
    dirty[block..block + 4096].fill(0);
    let states = states_of(&dirty, |dev| {
        let image: Img = Image::open_writable(
            dev,
            buffers(false),
            qcow2_alloc::AllocDecompressor::default(),
            &mut Backing(None, Rc::new(RefCell::new(Vec::new()))),
        )
        .unwrap();
        image.close().unwrap();
    });
    let n = states.len();
    assert!(n > 10, "the rebuild wrote almost nothing");
    for (state, what) in &states {
        verify(state, &None, &allowed, &format!("rebuild: {what}"));
    }
    qcow2_tests::record_evidence(
        "crash_write-rebuild",
        &format!("crash_write refcount rebuild: {n} crash states checked, 0 violations"),
    );
}

/// Opens the image on the recording device `dev` for writing (its backing file, if any, from `base`, on
/// the same log).
/// Power loss during resize: grow with L1 growth across clusters (plain, lazy refcounts, over a longer backing
/// file whose data must not show through), shrink that drops data, L2 tables and refcount blocks (with
/// compressed clusters, and with an internal snapshot that shares L2 tables). Every crash state opens, has
/// no refcount below its references, and is the old disk (old size, old data) or the new one (new size, the
/// old data up to it, zeros after).
#[test]
fn crash_resize() {
    let cases = [
        ResizeCase {
            name: "grow, L1 across clusters",
            opts: "cluster_size=512",
            size: 1 << 20,
            new_size: 64 << 20,
            backing: false,
            snapshot: false,
            compressed: false,
        },
        ResizeCase {
            name: "grow, lazy refcounts",
            opts: "cluster_size=1024,lazy_refcounts=on",
            size: 1 << 20,
            new_size: 256 << 20,
            backing: false,
            snapshot: false,
            compressed: false,
        },
        ResizeCase {
            name: "grow over a longer backing file",
            opts: "cluster_size=4096",
            size: 1 << 20,
            new_size: 3 << 20,
            backing: true,
            snapshot: false,
            compressed: false,
        },
        ResizeCase {
            name: "shrink, refcount blocks dropped",
            opts: "cluster_size=512",
            size: 2 << 20,
            new_size: 96 << 10,
            backing: false,
            snapshot: false,
            compressed: true,
        },
        ResizeCase {
            name: "shrink with a snapshot",
            opts: "cluster_size=4096",
            size: 4 << 20,
            new_size: 1 << 20,
            backing: false,
            snapshot: true,
            compressed: false,
        },
    ];
    let mut total = 0;
    for c in cases {
        total += resize_states(&c, |image| image.resize(c.new_size).unwrap());
    }
    qcow2_tests::record_evidence(
        "crash_write-resize",
        &format!("crash_write resize: {total} crash states checked, 0 violations"),
    );
}

/// Power loss while an internal snapshot is created or deleted (version 3: the dirty bit covers the moment
/// where refcounts and COPIED flags disagree). Every crash state opens (a dirty one is repaired by the
/// writable open), has exact refcounts and COPIED flags afterwards, and reads as the active disk did; once the
/// operation has returned, the snapshot is there (or gone).
#[test]
fn crash_snapshots() {
    use qcow2_core::write::NewSnapshot;
    let mut total = 0;
    for (name, opts, delete) in [
        ("create", "cluster_size=4096", false),
        (
            "create, lazy refcounts",
            "cluster_size=4096,lazy_refcounts=on",
            false,
        ),
        ("create, 512-byte clusters", "cluster_size=512", false),
        ("delete", "cluster_size=4096", true),
    ] {
        let s = Scratch::new();
        let img = s.qcow2("s.qcow2", opts, 1 << 20);
        let mut cmds = Vec::new();
        for i in 0..16u64 {
            let flag = if i % 4 == 0 { "-c " } else { "" };
            cmds.push(format!("write {flag}-P {} {} 4096", i + 1, i * 65536));
        }
        qemu_io_cmds(&img, "qcow2", &cmds);
        if delete {
            qemu_img_ok(["snapshot", "-c", "old", img.to_str().unwrap()]);
            qemu_io_cmds(&img, "qcow2", &["write -P 0x55 0 128k".to_string()]);
        }
        let initial = std::fs::read(&img).unwrap();
        let allowed = exactly(&guest_view(&img));
        let states = states_of(&initial, |dev| {
            let mut image = open_recorded(dev, None);
            if delete {
                let at = image.layers()[0].qcow2().unwrap().header.snapshots_offset;
                image.delete_snapshot(at).unwrap();
            } else {
                image
                    .create_snapshot(&NewSnapshot {
                        name: b"snap",
                        date_sec: 1,
                        date_nsec: 2,
                        vm_clock_nsec: 0,
                    })
                    .unwrap();
            }
            image.close().unwrap();
        });
        let last = states.len() - 1;
        for (i, (state, what)) in states.iter().enumerate() {
            let what = format!("snapshot {name}: {what}");
            total += 1;
            let checked = verify_sampled(
                &s,
                state,
                &None,
                &allowed,
                &what,
                total % 17 == 0 || i == last,
            );
            let nb = u32::from_be_bytes(checked[60..64].try_into().unwrap());
            if i == last {
                assert_eq!(
                    nb,
                    u32::from(!delete),
                    "{what}: snapshot count after the operation"
                );
            }
        }
        eprintln!("snapshot {name}: {} crash states", states.len());
    }
    qcow2_tests::record_evidence(
        "crash_write-snapshots",
        &format!("crash_write snapshots: {total} crash states checked, 0 violations"),
    );
}

/// Power loss while a snapshot is applied (the A/B rollback of a firmware): every crash state opens, has
/// exact refcounts and COPIED flags (after the repair a dirty one gets), and is the old disk (its size and
/// content) or the snapshot's: the size and the L1 table switch with one header write. The snapshot is taken
/// at 1 MiB, the disk then grown to 2 MiB and rewritten, so that the two are told apart by their size too.
#[test]
fn crash_snapshot_apply() {
    let mut total = 0;
    for opts in [
        "cluster_size=4096",
        "cluster_size=512",
        "cluster_size=4096,lazy_refcounts=on",
    ] {
        let s = Scratch::new();
        let img = s.qcow2("a.qcow2", opts, 1 << 20);
        let mut cmds = Vec::new();
        for i in 0..8u64 {
            let flag = if i % 3 == 0 { "-c " } else { "" };
            cmds.push(format!("write {flag}-P {} {} 8192", i + 1, i * 131072));
        }
        qemu_io_cmds(&img, "qcow2", &cmds);
        let at_snapshot = guest_view(&img);
        qemu_img_ok(["snapshot", "-c", "good", img.to_str().unwrap()]);
        qemu_img_ok(["resize", img.to_str().unwrap(), "2M"]);
        qemu_io_cmds(
            &img,
            "qcow2",
            &[
                "write -P 0x66 0 512k".to_string(),
                "write -P 0x67 1536k 64k".to_string(),
            ],
        );
        let before = guest_view(&img);
        let initial = std::fs::read(&img).unwrap();
        let (old_cells, new_cells) = (exactly(&before), exactly(&at_snapshot));
        let states = states_of(&initial, |dev| {
            let mut image = open_recorded(dev, None);
            let at = image.layers()[0].qcow2().unwrap().header.snapshots_offset;
            image.apply_snapshot(at).unwrap();
            image.close().unwrap();
        });
        let last = states.len() - 1;
        for (i, (state, what)) in states.iter().enumerate() {
            let what = format!("apply {opts}: {what}");
            let size = u64::from_be_bytes(state[24..32].try_into().unwrap());
            let allowed = match size {
                s if s == 2 << 20 => &old_cells,
                s if s == 1 << 20 => &new_cells,
                s => panic!("{what}: virtual size {s} is neither the old nor the snapshot's"),
            };
            if i == last {
                assert_eq!(size, 1 << 20, "{what}: the snapshot was not applied");
            }
            total += 1;
            verify_sampled(
                &s,
                state,
                &None,
                allowed,
                &what,
                total % 13 == 0 || i == last,
            );
        }
        eprintln!("apply {opts}: {} crash states", states.len());
    }
    qcow2_tests::record_evidence(
        "crash_write-snapshot-apply",
        &format!("crash_write snapshot apply: {total} crash states checked, 0 violations"),
    );
}

/// Power loss while lazy refcounts are turned on or off (`qemu-img amend -o lazy_refcounts=...`): every
/// crash state opens, is consistent, and reads as the disk did.
#[test]
fn crash_amend_lazy_refcounts() {
    let mut total = 0;
    for (opts, on) in [
        ("cluster_size=4096", true),
        ("cluster_size=4096,lazy_refcounts=on", false),
    ] {
        let s = Scratch::new();
        let img = s.qcow2("l.qcow2", opts, 1 << 20);
        qemu_io_cmds(&img, "qcow2", &["write -P 9 0 192k".to_string()]);
        let initial = std::fs::read(&img).unwrap();
        let allowed = exactly(&guest_view(&img));
        let states = states_of(&initial, |dev| {
            let mut image = open_recorded(dev, None);
            image.set_lazy_refcounts(on).unwrap();
            image.close().unwrap();
        });
        let last = states.len() - 1;
        for (i, (state, what)) in states.iter().enumerate() {
            let what = format!("lazy_refcounts={on} ({opts}): {what}");
            total += 1;
            let checked = verify_sampled(&s, state, &None, &allowed, &what, i == last);
            if i == last {
                let compatible = u64::from_be_bytes(checked[80..88].try_into().unwrap());
                assert_eq!(compatible & 1 == 1, on, "{what}: the bit is not as asked");
            }
        }
    }
    qcow2_tests::record_evidence(
        "crash_write-amend",
        &format!("crash_write amend lazy_refcounts: {total} crash states checked, 0 violations"),
    );
}

/// The version and backing file name the first cluster of `state` declares.
fn declared(state: &[u8]) -> (u32, Vec<u8>) {
    let version = u32::from_be_bytes(state[4..8].try_into().unwrap());
    let at = u64::from_be_bytes(state[8..16].try_into().unwrap()) as usize;
    let len = u32::from_be_bytes(state[16..20].try_into().unwrap()) as usize;
    let name = if at == 0 {
        Vec::new()
    } else {
        state[at..at + len].to_vec()
    };
    (version, name)
}

/// Power loss while the first cluster is rewritten: the upgrade to version 3 (`amend -o compat=1.1`) and a
/// new backing file name (`rebase -u`), with backing names short enough for the first sector and long
/// enough to be kept aside meanwhile, and clusters with and without the feature name table. Every crash
/// state opens, is consistent, reads as the disk did, and declares the old version and name or the new
/// ones, never a mix.
#[test]
fn crash_header_rewrite() {
    let s = Scratch::new();
    let deep = s.path(
        &[
            "d".repeat(200),
            "e".repeat(200),
            "f".repeat(200),
            "g".repeat(200),
        ]
        .join("/"),
    );
    std::fs::create_dir_all(&deep).unwrap();
    let long_base = deep.join("base.qcow2");
    let short_base = s.path("b.qcow2");
    for base in [&long_base, &short_base] {
        qemu_img_ok([
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            base.as_os_str(),
            "1M".as_ref(),
        ]);
        qemu_io_cmds(base, "qcow2", &["write -P 5 0 1M".to_string()]);
    }
    let base_bytes = std::fs::read(&short_base).unwrap();
    let (long, short) = (
        long_base.to_str().unwrap().to_string(),
        short_base.to_str().unwrap().to_string(),
    );
    enum Change {
        Upgrade,
        Backing(Option<String>),
    }
    let cases = [
        ("compat=0.10,cluster_size=65536", &long, Change::Upgrade),
        ("compat=0.10,cluster_size=4096", &long, Change::Upgrade),
        ("compat=0.10,cluster_size=512", &short, Change::Upgrade),
        (
            "cluster_size=65536",
            &long,
            Change::Backing(Some(short.clone())),
        ),
        (
            "cluster_size=4096",
            &short,
            Change::Backing(Some(long.clone())),
        ),
        ("cluster_size=65536", &short, Change::Backing(None)),
    ];
    let mut total = 0;
    for (opts, from, change) in cases {
        let img = s.create("h.qcow2", "qcow2", opts, 1 << 20, Some((from, "qcow2")));
        qemu_io_cmds(&img, "qcow2", &["write -P 9 64k 128k".to_string()]);
        let initial = std::fs::read(&img).unwrap();
        let old = declared(&initial);
        let new = match &change {
            Change::Upgrade => (3, old.1.clone()),
            Change::Backing(name) => (old.0, name.clone().unwrap_or_default().into_bytes()),
        };
        // Where the new name is gone, the backing file's data is too; keep it only where both name one.
        let allowed = exactly(&guest_view(&img));
        let base = Some(base_bytes.clone());
        let states = states_of(&initial, |dev| {
            let mut image = open_recorded(dev, base.clone());
            match &change {
                Change::Upgrade => image.upgrade_to_v3().unwrap(),
                Change::Backing(name) => image
                    .set_backing_file(name.as_deref().map(|name| qcow2_core::write::BackingFile {
                        name,
                        format: Some("qcow2"),
                    }))
                    .unwrap(),
            }
            image.close().unwrap();
        });
        let last = states.len() - 1;
        for (i, (state, what)) in states.iter().enumerate() {
            let what = format!("header rewrite ({opts}): {what}");
            total += 1;
            let now = declared(state);
            assert!(
                now == old || now == new,
                "{what}: declares version {} and backing file {:?}",
                now.0,
                String::from_utf8_lossy(&now.1)
            );
            if i == last {
                assert_eq!(now, new, "{what}: the final state");
            }
            if now.1.is_empty() && !old.1.is_empty() {
                // Without a backing file the base's data is gone, as rebase -u promises.
                check_refcounts(state).unwrap_or_else(|e| panic!("{what}: {e}"));
                continue;
            }
            verify_sampled(&s, state, &base, &allowed, &what, i == last || i % 7 == 0);
        }
    }
    qcow2_tests::record_evidence(
        "crash_write-header",
        &format!("crash_write header rewrite: {total} crash states checked, 0 violations"),
    );
}

/// `bytes` opened read-only (with `base` as its backing file).
/// What the first internal snapshot of `state` holds, read through the engine.
fn first_snapshot(state: &[u8], base: &Option<Vec<u8>>, len: usize) -> Vec<u8> {
    let mut image = open_read_only(state, base).unwrap();
    let at = image.layers()[0].qcow2().unwrap().header.snapshots_offset;
    let (entry, _) = image.read_snapshot(0, at).unwrap();
    image.view_snapshot(&entry).unwrap();
    let mut out = vec![0u8; len];
    image.read_at(0, &mut out).unwrap();
    out
}

/// Power loss during the downgrade to version 2 (`amend -o compat=0.10`): zero clusters expanded (dropped,
/// written as zeros over a backing file, kept where they own a host cluster, moved off a host cluster a
/// snapshot shares), then the header rewritten. Every crash state opens, is consistent, reads as the disk
/// and the snapshot did, and is version 3 until the final header write makes it version 2.
#[test]
fn crash_downgrade() {
    let s = Scratch::new();
    let base = s.qcow2("base.qcow2", "cluster_size=4096", 1 << 20);
    qemu_io_cmds(&base, "qcow2", &["write -P 5 0 1M".to_string()]);
    let base_bytes = std::fs::read(&base).unwrap();
    let mut total = 0;
    for (opts, backed, after_snapshot) in [
        ("cluster_size=4096", true, false),
        ("cluster_size=65536", false, false),
        ("cluster_size=4096,lazy_refcounts=on", true, true),
        ("cluster_size=512", false, true),
    ] {
        let img = s.create(
            "d.qcow2",
            "qcow2",
            opts,
            1 << 20,
            backed.then(|| (base.to_str().unwrap(), "qcow2")),
        );
        qemu_io_cmds(
            &img,
            "qcow2",
            &[
                "write -P 1 0 256k".to_string(),
                "write -z 64k 64k".to_string(),
                "write -z 512k 128k".to_string(),
            ],
        );
        qemu_img_ok(["snapshot", "-c", "one", img.to_str().unwrap()]);
        if after_snapshot {
            // Zero clusters whose host clusters the snapshot still reads.
            qemu_io_cmds(&img, "qcow2", &["write -z 128k 64k".to_string()]);
        }
        let initial = std::fs::read(&img).unwrap();
        let allowed = exactly(&guest_view(&img));
        let base = backed.then(|| base_bytes.clone());
        let snapshot = first_snapshot(&initial, &base, 1 << 20);
        let states = states_of(&initial, |dev| {
            let mut image = open_recorded(dev, base.clone());
            image.downgrade_to_v2().unwrap();
            image.close().unwrap();
        });
        let last = states.len() - 1;
        for (i, (state, what)) in states.iter().enumerate() {
            let what = format!("downgrade ({opts}): {what}");
            total += 1;
            let version = u32::from_be_bytes(state[4..8].try_into().unwrap());
            assert!(version == 3 || version == 2, "{what}: version {version}");
            if i == last {
                assert_eq!(version, 2, "{what}: the final state");
            }
            let checked =
                verify_sampled(&s, state, &base, &allowed, &what, i == last || i % 11 == 0);
            assert!(
                first_snapshot(&checked, &base, 1 << 20) == snapshot,
                "{what}: the snapshot reads differently"
            );
        }
    }
    qcow2_tests::record_evidence(
        "crash_write-downgrade",
        &format!("crash_write downgrade: {total} crash states checked, 0 violations"),
    );
}

/// Power loss while an image is emptied after a commit (`Image::make_empty`): the fresh-layout reset of a
/// version 3 image (4 KiB and 64 KiB clusters) and the drop of every cluster (version 2, a snapshot). Every
/// crash state opens, is consistent but for leaks, and each part of the disk reads as the image did or as
/// its backing file does (which, after a commit, is the same); the last state reads as the backing file.
#[test]
fn crash_make_empty() {
    let s = Scratch::new();
    let base = s.qcow2("base.qcow2", "cluster_size=4096", 1 << 20);
    qemu_io_cmds(&base, "qcow2", &["write -P 7 0 768k".to_string()]);
    let base_bytes = std::fs::read(&base).unwrap();
    let backing_view = guest_view(&base);
    let mut total = 0;
    for (opts, snapshot) in [
        ("cluster_size=4096", false),
        ("cluster_size=65536", false),
        ("cluster_size=4096,compat=0.10", false),
        ("cluster_size=4096", true),
    ] {
        let img = s.create(
            "e.qcow2",
            "qcow2",
            opts,
            1 << 20,
            Some((base.to_str().unwrap(), "qcow2")),
        );
        let mut cmds = vec![
            "write -P 1 0 128k".to_string(),
            "write -P 2 512k 64k".to_string(),
            "write -P 3 832k 64k".to_string(),
        ];
        if !opts.contains("0.10") {
            cmds.push("write -z 256k 64k".to_string());
        }
        qemu_io_cmds(&img, "qcow2", &cmds);
        if snapshot {
            qemu_img_ok(["snapshot", "-c", "s", img.to_str().unwrap()]);
        }
        let initial = std::fs::read(&img).unwrap();
        let before = guest_view(&img);
        let mut allowed = exactly(&before);
        for (i, cell) in backing_view.chunks(CELL).enumerate() {
            allowed[i].add(cell[0]);
        }
        let base = Some(base_bytes.clone());
        let states = states_of(&initial, |dev| {
            let mut image = open_recorded(dev, base.clone());
            image.make_empty().unwrap();
            image.close().unwrap();
        });
        let last = states.len() - 1;
        for (i, (state, what)) in states.iter().enumerate() {
            let what = format!("make_empty ({opts}, snapshot {snapshot}): {what}");
            total += 1;
            let allowed = if i == last {
                exactly(&backing_view)
            } else {
                allowed.clone()
            };
            verify_sampled(&s, state, &base, &allowed, &what, i == last || i % 5 == 0);
        }
    }
    qcow2_tests::record_evidence(
        "crash_write-make-empty",
        &format!("crash_write make_empty: {total} crash states checked, 0 violations"),
    );
}

/// Power loss while clusters are preallocated (`resize --preallocation=metadata` maps the new area that
/// way): every crash state opens, is consistent but for leaks, and reads as before (a preallocated cluster
/// reads as zeros, like the unallocated one it was), with a freed hole inside the file reused and zeroed.
#[test]
fn crash_preallocate_metadata() {
    let s = Scratch::new();
    let mut total = 0;
    for opts in ["cluster_size=4096", "cluster_size=65536,extended_l2=on"] {
        let img = s.qcow2("p.qcow2", opts, 1 << 20);
        qemu_io_cmds(
            &img,
            "qcow2",
            &[
                "write -P 1 0 64k".to_string(),
                "write -P 2 192k 64k".to_string(),
                "write -P 3 512k 64k".to_string(),
                // A hole inside the file: stale bytes that must not show through.
                "discard 192k 64k".to_string(),
            ],
        );
        let initial = std::fs::read(&img).unwrap();
        let allowed = exactly(&guest_view(&img));
        let states = states_of(&initial, |dev| {
            let mut image = open_recorded(dev, None);
            image.preallocate_metadata(0, 1 << 20).unwrap();
            image.close().unwrap();
        });
        let last = states.len() - 1;
        for (i, (state, what)) in states.iter().enumerate() {
            let what = format!("preallocate ({opts}): {what}");
            total += 1;
            verify_sampled(&s, state, &None, &allowed, &what, i == last || i % 13 == 0);
        }
    }
    qcow2_tests::record_evidence(
        "crash_write-preallocate",
        &format!("crash_write preallocate_metadata: {total} crash states checked, 0 violations"),
    );
}

/// Power loss while writing right after a snapshot was applied in the same session (the A/B rollback of a
/// firmware, which then boots the rolled-back disk read-write), with lazy refcounts, over a backing file,
/// on a disk with room after the image but that cannot grow (a firmware disk): every crash state opens for
/// writing, the repair of a dirty one staying inside the disk (a rebuilt refcount structure goes after the
/// last used cluster where there is room), and reads as the snapshot's disk with each written range old or
/// new.
#[test]
fn crash_writes_after_apply() {
    let s = Scratch::new();
    let base = s.qcow2("base.qcow2", "", 2 << 20);
    qemu_io_cmds(&base, "qcow2", &["write -P 5 0 2M".to_string()]);
    let base_bytes = std::fs::read(&base).unwrap();
    let writes: [(u64, usize, u8); 3] =
        [(4096, 8192, 9), (1 << 20, 4096, 8), (1536 << 10, 65536, 7)];
    let mut total = 0;
    for opts in ["lazy_refcounts=on", "lazy_refcounts=off"] {
        let img = s.create(
            "w.qcow2",
            "qcow2",
            opts,
            2 << 20,
            Some((base.to_str().unwrap(), "qcow2")),
        );
        qemu_io_cmds(
            &img,
            "qcow2",
            &[
                "write -P 1 0 256k".to_string(),
                "write -P 2 1M 128k".to_string(),
            ],
        );
        qemu_img_ok(["snapshot", "-c", "good", img.to_str().unwrap()]);
        let at_snapshot = guest_view(&img);
        qemu_io_cmds(&img, "qcow2", &["write -z 0 1M".to_string()]);
        let broken = guest_view(&img);
        // 1 MiB of room after the data.
        let mut initial = std::fs::read(&img).unwrap();
        initial.resize(initial.len().next_multiple_of(512) + (1 << 20), 0);
        let disk_len = initial.len();
        let (mut rolled, mut old) = (exactly(&at_snapshot), exactly(&broken));
        for (off, len, byte) in writes {
            for c in (off as usize / CELL)..((off as usize + len) / CELL) {
                rolled[c].add(byte);
                old[c].add(byte);
            }
        }
        let mut either = rolled.clone();
        for (cell, o) in either.iter_mut().zip(&old) {
            for v in 0..=255u8 {
                if o.has(v) {
                    cell.add(v);
                }
            }
        }
        let base = Some(base_bytes.clone());
        let states = states_of(&initial, |dev| {
            let mut image = open_recorded(dev, base.clone());
            let at = image.layers()[0].qcow2().unwrap().header.snapshots_offset;
            image.apply_snapshot(at).unwrap();
            for (off, len, byte) in writes {
                image.write_at(off, &vec![byte; len]).unwrap();
            }
            // No close: the power goes.
            std::mem::forget(image);
        });
        for (state, what) in &states {
            let what = format!("writes after apply ({opts}): {what}");
            total += 1;
            let image = open_writable_bytes(state, &base)
                .unwrap_or_else(|e| panic!("{what}: writable open: {e}"));
            let repaired = image.close().unwrap().data;
            assert!(
                repaired.len() <= disk_len,
                "{what}: the repair grew the disk from {disk_len} to {} bytes",
                repaired.len()
            );
            // Each part of the disk as the broken disk or the snapshot's had it, or as written.
            verify(&repaired, &base, &either, &what);
        }
    }
    qcow2_tests::record_evidence(
        "crash_write-writes-after-apply",
        &format!("crash_write writes after apply: {total} crash states checked, 0 violations"),
    );
}
