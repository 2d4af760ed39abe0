//! Model-based property tests of the write engine: random sequences of write, write_zeroes, discard, read,
//! flush, close-and-reopen, resize and internal snapshots (create, apply, delete) on an in-memory device,
//! against a flat byte array (and one per snapshot), over cluster sizes, refcount widths, extended L2,
//! compat 0.10 and backing files. After every sequence the image is closed and must have
//! no corruption and no leaked cluster (an independent reference counter), and must read back as the model.
//!
//! Starting images come from `qemu-img create` once per configuration. `PROPTEST_CASES` sets the number of
//! cases per configuration (the default runs 10,500 in all).

use std::sync::OnceLock;

use proptest::prelude::*;
use qcow2_core::engine::{FileRequest, Resolver};
use qcow2_core::{Buffers, Error, Image, MemDevice};
use qcow2_tests::crash::check_refcounts;
use qcow2_tests::{Scratch, qemu_img_ok, qemu_io_cmds};

type Dev = MemDevice<Vec<u8>>;
type Img = Image<Dev, Vec<u8>, qcow2_alloc::AllocDecompressor, 4, 6, qcow2_core::WriteState>;

/// Room for the image to grow in memory.
const CAPACITY: usize = 24 << 20;

#[derive(Debug, Clone, Copy)]
struct Config {
    opts: &'static str,
    size: u64,
    cluster: u64,
    backing: bool,
    v3: bool,
}

const CONFIGS: [Config; 7] = [
    Config {
        opts: "cluster_size=4096",
        size: 1 << 20,
        cluster: 4096,
        backing: false,
        v3: true,
    },
    Config {
        opts: "cluster_size=512,refcount_bits=1",
        size: 512 << 10,
        cluster: 512,
        backing: false,
        v3: true,
    },
    Config {
        opts: "cluster_size=1024,refcount_bits=64",
        size: 1 << 20,
        cluster: 1024,
        backing: true,
        v3: true,
    },
    Config {
        opts: "cluster_size=16384,extended_l2=on",
        size: 2 << 20,
        cluster: 16384,
        backing: true,
        v3: true,
    },
    Config {
        opts: "cluster_size=2048,compat=0.10",
        size: 1 << 20,
        cluster: 2048,
        backing: true,
        v3: false,
    },
    Config {
        opts: "cluster_size=65536,lazy_refcounts=on",
        size: 2 << 20,
        cluster: 65536,
        backing: false,
        v3: true,
    },
    Config {
        opts: "cluster_size=4096",
        size: (1 << 20) + 1536,
        cluster: 4096,
        backing: true,
        v3: true,
    },
];

/// A starting image and its backing file's bytes.
type Template = (Vec<u8>, Option<Vec<u8>>);

/// The starting images, one per configuration.
fn templates() -> &'static Vec<Template> {
    static T: OnceLock<Vec<Template>> = OnceLock::new();
    T.get_or_init(|| {
        let s = Scratch::new();
        CONFIGS
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let img = s.path(&format!("t{i}.qcow2"));
                let base = s.path(&format!("b{i}.qcow2"));
                let size = c.size.to_string();
                let mut backing = None;
                if c.backing {
                    qemu_img_ok(["create", "-q", "-f", "qcow2", base.to_str().unwrap(), &size]);
                    qemu_io_cmds(
                        &base,
                        "qcow2",
                        &[
                            format!("write -P 0x11 0 {}", c.size / 2),
                            format!("write -P 0x22 {} {}", c.size * 3 / 4, c.size / 8),
                        ],
                    );
                    backing = Some(std::fs::read(&base).unwrap());
                    qemu_img_ok([
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-o",
                        c.opts,
                        "-b",
                        base.file_name().unwrap().to_str().unwrap(),
                        "-F",
                        "qcow2",
                        img.to_str().unwrap(),
                        &size,
                    ]);
                } else {
                    qemu_img_ok([
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-o",
                        c.opts,
                        img.to_str().unwrap(),
                        &size,
                    ]);
                }
                (std::fs::read(&img).unwrap(), backing)
            })
            .collect()
    })
}

struct Backing(Option<Vec<u8>>);

impl Resolver<Dev> for Backing {
    fn backing_file(
        &mut self,
        _r: FileRequest<'_>,
    ) -> Result<Dev, Error<qcow2_core::io::MemDeviceFull>> {
        let data = self
            .0
            .clone()
            .ok_or(Error::Unavailable { what: "no backing" })?;
        let len = data.len() as u64;
        Ok(MemDevice::with_len(data, len, 512))
    }
    fn data_file(
        &mut self,
        _r: FileRequest<'_>,
    ) -> Result<Dev, Error<qcow2_core::io::MemDeviceFull>> {
        Err(Error::Unavailable {
            what: "no data file",
        })
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: u64,
        len: u64,
        byte: u8,
    },
    Zero {
        off: u64,
        len: u64,
        unmap: bool,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Read {
        off: u64,
        len: u64,
    },
    Flush,
    Reopen,
    /// Two writes made as a parallel copy makes them, into cluster-disjoint ranges (the first in the lower
    /// half of the disk, the second in the upper): the clusters of both that need new host clusters are
    /// reserved (`Image::reserve_clusters`), then the second's are stored and committed before the
    /// first's, which are committed, or with `cancel` dropped.
    Parallel {
        first: (u64, u64, u8),
        second: (u64, u64, u8),
        cancel: bool,
    },
    /// The disk resized to `eighths` / 8 of the configuration's size (2 to 12 eighths, sector-aligned).
    Resize {
        eighths: u64,
    },
    /// An internal snapshot of the disk.
    Snapshot,
    /// The `n`-th snapshot (modulo their number) applied.
    Apply {
        n: usize,
    },
    /// The `n`-th snapshot (modulo their number) deleted.
    Delete {
        n: usize,
    },
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    let range = (0..size, 1u64..=(size / 4)).prop_map(move |(off, len)| (off, len.min(size - off)));
    prop_oneof![
        5 => (range.clone(), 1u8..=255).prop_map(|((off, len), byte)| Op::Write { off, len, byte }),
        2 => (range.clone(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        2 => range.clone().prop_map(|(off, len)| Op::Discard { off, len }),
        2 => range.prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        2 => (0..size / 2, 1..=size / 4, 1u8..=255, 0..size / 2, 1..=size / 4, 1u8..=255, any::<bool>())
            .prop_map(move |(a, alen, ab, b, blen, bb, cancel)| Op::Parallel {
                first: (a, alen, ab),
                second: (size / 2 + b, blen, bb),
                cancel,
            }),
        1 => (2u64..=12).prop_map(|eighths| Op::Resize { eighths }),
        1 => Just(Op::Snapshot),
        1 => any::<usize>().prop_map(|n| Op::Apply { n }),
        1 => any::<usize>().prop_map(|n| Op::Delete { n }),
    ]
}

/// The host offset of the `n`-th entry of the image's snapshot table.
fn snapshot_entry(img: &mut Img, n: usize) -> u64 {
    let h = img.layers()[0].qcow2().unwrap().header;
    let mut at = h.snapshots_offset;
    for _ in 0..n {
        at = img.read_snapshot(0, at).unwrap().1;
    }
    at
}

fn open(bytes: Vec<u8>, len: u64, backing: &Option<Vec<u8>>, small: bool) -> Img {
    let buffers = Buffers {
        bounce: vec![0u8; if small { 512 } else { 8192 }],
        metadata: vec![0u8; if small { 6 * 512 } else { 6 * 2048 }],
    };
    Image::open_writable(
        MemDevice::with_len(bytes, len, 512),
        buffers,
        qcow2_alloc::AllocDecompressor::default(),
        &mut Backing(backing.clone()),
    )
    .unwrap()
}

/// Starts a write of `data` at `off` as a parallel copy does: whole clusters that need new host clusters are
/// reserved (returned with where their data starts in `data`), the rest is written at once.
fn reserve_write(
    img: &mut Img,
    off: u64,
    data: &[u8],
    cluster: u64,
) -> Vec<(qcow2_core::write::Reservation, usize)> {
    let end = off + data.len() as u64;
    let mut at = off;
    let mut reserved = Vec::new();
    while at < end {
        let from = (at - off) as usize;
        if at.is_multiple_of(cluster) && end - at >= cluster {
            let whole = (end - at) / cluster * cluster;
            if let Some(r) = img.reserve_clusters(at, whole).unwrap() {
                at += r.len();
                reserved.push((r, from));
                continue;
            }
        }
        let n = (((at / cluster) + 1) * cluster).min(end) - at;
        img.write_at(at, &data[from..from + n as usize]).unwrap();
        at += n;
    }
    reserved
}

fn close(img: Img) -> (Vec<u8>, u64) {
    let dev = img.close().unwrap();
    let len = dev.content().len() as u64;
    (dev.into_inner(), len)
}

fn run(ci: usize, ops: &[Op], small: bool) -> Result<(), TestCaseError> {
    let c = CONFIGS[ci];
    let (template, backing) = &templates()[ci];
    let mut bytes = template.clone();
    let len = bytes.len() as u64;
    bytes.resize(CAPACITY, 0);
    // The model starts as the backing file's content (or zeros).
    let mut model = vec![0u8; c.size as usize];
    if c.backing {
        model[..(c.size / 2) as usize].fill(0x11);
        model[(c.size * 3 / 4) as usize..(c.size * 7 / 8) as usize].fill(0x22);
    }
    let mut img = open(bytes, len, backing, small);
    // The snapshots' contents, oldest first, as the table lists them.
    let mut snapshots: Vec<Vec<u8>> = Vec::new();
    for o in ops {
        // Ranges are drawn for the configuration's size: clipped to the disk's size now.
        let size = model.len() as u64;
        let clip = |off: u64, len: u64| {
            let off = off % size;
            (off, len.min(size - off).max(1).min(size - off))
        };
        let o = match *o {
            Op::Write { off, len, byte } => {
                let (off, len) = clip(off, len);
                Op::Write { off, len, byte }
            }
            Op::Zero { off, len, unmap } => {
                let (off, len) = clip(off, len);
                Op::Zero { off, len, unmap }
            }
            Op::Discard { off, len } => {
                let (off, len) = clip(off, len);
                Op::Discard { off, len }
            }
            Op::Read { off, len } => {
                let (off, len) = clip(off, len);
                Op::Read { off, len }
            }
            Op::Parallel { .. } if size != c.size => Op::Flush,
            ref other => other.clone(),
        };
        match o {
            Op::Write { off, len, byte } => {
                img.write_at(off, &vec![byte; len as usize]).unwrap();
                model[off as usize..(off + len) as usize].fill(byte);
            }
            Op::Zero { off, len, unmap } => {
                img.write_zeroes(off, len, unmap).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Discard { off, len } => {
                img.discard(off, len).unwrap();
                if c.v3 || !c.backing {
                    let start = off.div_ceil(c.cluster) * c.cluster;
                    let end = if off + len == size {
                        off + len
                    } else {
                        (off + len) / c.cluster * c.cluster
                    };
                    if start < end {
                        model[start as usize..end as usize].fill(0);
                    }
                }
            }
            Op::Read { off, len } => {
                let mut buf = vec![0u8; len as usize];
                img.read_at(off, &mut buf).unwrap();
                prop_assert!(
                    buf == model[off as usize..(off + len) as usize],
                    "read {off}+{len}"
                );
            }
            Op::Flush => img.flush().unwrap(),
            Op::Parallel {
                first,
                second,
                cancel,
            } => {
                // Cluster-disjoint: the first ends a cluster before the middle, the second ends at the end.
                let half = c.size / 2 / c.cluster * c.cluster;
                let clip = |(off, len, byte): (u64, u64, u8), end: u64| {
                    let len = len.min(end.saturating_sub(off));
                    (off, len, byte)
                };
                let (a, b) = (
                    clip(first, half.saturating_sub(c.cluster)),
                    clip(second, c.size),
                );
                let before = model.clone();
                let mut pending = Vec::new();
                for (i, (off, len, byte)) in [a, b].into_iter().enumerate() {
                    if len == 0 {
                        continue;
                    }
                    let data = vec![byte; len as usize];
                    for (r, from) in reserve_write(&mut img, off, &data, c.cluster) {
                        pending.push((i, r, from, data.clone()));
                    }
                    // What was not reserved is written already.
                    model[off as usize..(off + len) as usize].fill(byte);
                }
                // The second's reservations first, then the first's (or their cancellation).
                pending.sort_by_key(|(i, ..)| std::cmp::Reverse(*i));
                for (i, r, from, data) in pending {
                    let (guest, n) = (r.guest() as usize, r.len() as usize);
                    if i == 0 && cancel {
                        img.cancel_reservation(r);
                        // Those clusters keep what they held: the model from before this op.
                        model[guest..guest + n].copy_from_slice(&before[guest..guest + n]);
                    } else {
                        img.store_reserved(&r, &data[from..from + n]).unwrap();
                        img.commit_reservation(r).unwrap();
                    }
                }
            }
            Op::Reopen => {
                let (bytes, len) = close(img);
                img = open(bytes, len, backing, small);
            }
            Op::Resize { eighths } => {
                let new = c.size * eighths / 8 / 512 * 512;
                let backing_len = if c.backing { c.size } else { 0 };
                match img.resize(new) {
                    Ok(()) => model.resize(new as usize, 0),
                    Err(Error::Unsupported { .. })
                        if (!c.v3 && !snapshots.is_empty())
                            || (!c.v3 && backing_len > size && new > size) => {}
                    Err(e) => return Err(TestCaseError::fail(format!("resize to {new}: {e}"))),
                }
            }
            Op::Snapshot => {
                let made = img.create_snapshot(&qcow2_core::write::NewSnapshot {
                    name: b"s",
                    date_sec: 0,
                    date_nsec: 0,
                    vm_clock_nsec: 0,
                });
                match made {
                    Ok(()) => snapshots.push(model.clone()),
                    // 1-bit refcounts cannot count a second reference.
                    Err(Error::Unsupported { .. }) if c.opts.contains("refcount_bits=1") => {}
                    Err(e) => return Err(TestCaseError::fail(format!("snapshot: {e}"))),
                }
            }
            Op::Apply { n } if !snapshots.is_empty() => {
                let n = n % snapshots.len();
                let at = snapshot_entry(&mut img, n);
                img.apply_snapshot(at).unwrap();
                model = snapshots[n].clone();
            }
            Op::Delete { n } if !snapshots.is_empty() => {
                let n = n % snapshots.len();
                let at = snapshot_entry(&mut img, n);
                img.delete_snapshot(at).unwrap();
                snapshots.remove(n);
            }
            Op::Apply { .. } | Op::Delete { .. } => {}
        }
        prop_assert_eq!(
            img.virtual_size(),
            model.len() as u64,
            "virtual size after {:?}",
            o
        );
    }
    let (bytes, len) = close(img);
    let report = check_refcounts(&bytes[..len as usize]).map_err(TestCaseError::fail)?;
    prop_assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    prop_assert_eq!(report.leaks, 0, "leaked clusters");
    if c.v3 {
        prop_assert_eq!(
            u64::from_be_bytes(bytes[72..80].try_into().unwrap()) & 3,
            0,
            "dirty or corrupt bit left set"
        );
    }
    let mut img = open(bytes, len, backing, false);
    let mut all = vec![0u8; model.len()];
    img.read_at(0, &mut all).unwrap();
    prop_assert!(all == model, "final content differs from the model");
    // Every snapshot still holds what the disk held when it was taken.
    for (n, want) in snapshots.iter().enumerate() {
        let at = snapshot_entry(&mut img, n);
        img.apply_snapshot(at).unwrap();
        let mut got = vec![0u8; want.len()];
        img.read_at(0, &mut got).unwrap();
        prop_assert!(
            &got == want,
            "snapshot {} differs from the disk it was taken of",
            n
        );
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

macro_rules! config_test {
    ($name:ident, $index:expr) => {
        proptest! {
            #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]
            #[test]
            fn $name(ops in prop::collection::vec(op(CONFIGS[$index].size), 1..24), small in any::<bool>()) {
                run($index, &ops, small)?;
            }
        }
    };
}

config_test!(clusters_4k, 0);
config_test!(clusters_512_refcount_1, 1);
config_test!(clusters_1k_refcount_64_backing, 2);
config_test!(extended_l2_backing, 3);
config_test!(compat_010_backing, 4);
config_test!(lazy_refcounts_64k, 5);
config_test!(size_not_a_cluster_multiple, 6);

/// Records how many cases the property tests above run.
#[test]
fn case_count() {
    qcow2_tests::record_evidence(
        "model_props",
        &format!(
            "model_props: {} random sequences ({} per configuration x {})",
            cases() as usize * CONFIGS.len(),
            cases(),
            CONFIGS.len()
        ),
    );
}
