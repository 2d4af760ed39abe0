//! Lying-metadata generator: valid images made by qemu-img and qemu-io (with a snapshot, a persistent bitmap,
//! compressed clusters), then one piece of metadata edited to lie: a refcount of 0 (or no refcount block at
//! all) under a live table, an L1 or L2 entry, a preallocated zero cluster, a compressed descriptor or a
//! bitmap table entry that names a cluster holding other metadata.
//!
//! [`run_lie`] runs each write-type request of [`OPS`] with our tool on a fresh copy and asserts the rule
//! for writes into such images: when our tool reports success, every guest byte outside the request reads
//! as before and `qemu-img check` finds no more corruptions than before; when it refuses, the image is byte
//! for byte as it was (but for the header's incompatible-features field, where the corrupt bit may be set).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::damage::{load, save, set_refcount};
use crate::malformed::{
    INCOMPATIBLE_FEATURES, Image, L1_OFFSET_MASK, L2_COMPRESSED, L2_COPIED, L2_ZERO, NB_SNAPSHOTS,
    REFCOUNT_TABLE_OFFSET, SNAPSHOTS_OFFSET,
};
use crate::{Output, Scratch, qcow2, qemu_img, qemu_img_ok, qemu_io_cmds};

/// Cluster size of every base image: small, so that a few MiB hold several L2 tables.
pub const CLUSTER: u64 = 4096;
/// Virtual size of every base image.
pub const SIZE: u64 = 8 << 20;
/// Guest offset of the cluster most lies are about (allocated in every base image).
pub const TARGET: u64 = 0;
/// Guest offset in the second L2 table's range (allocated in every base image).
pub const SECOND: u64 = 2 << 20;

const EXT_BITMAPS: u32 = 0x2385_2875;

/// The base images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// Data in three L2 tables' ranges, a compressed cluster.
    Plain,
    /// As `Plain`, then an internal snapshot and more writes (shared clusters, a snapshot L1 table).
    Snapshot,
    /// As `Plain`, with a persistent bitmap (a bitmap directory and table).
    Bitmap,
}

/// Builds a base image.
pub fn build_base(scratch: &Scratch, base: Base) -> PathBuf {
    let img = scratch.qcow2("base.qcow2", &format!("cluster_size={CLUSTER}"), SIZE);
    let writes = [
        "write -P 0x11 0 65536",
        "write -P 0x22 2097152 65536",
        "write -P 0x33 4194304 8192",
        "write -c -P 0x44 6291456 4096",
    ];
    qemu_io_cmds(&img, "qcow2", &writes.map(String::from));
    match base {
        Base::Plain => {}
        Base::Snapshot => {
            qemu_img_ok([
                OsStr::new("snapshot"),
                OsStr::new("-c"),
                OsStr::new("s1"),
                img.as_os_str(),
            ]);
            qemu_io_cmds(&img, "qcow2", &["write -P 0x55 4096 4096".to_string()]);
        }
        Base::Bitmap => {
            qemu_img_ok([
                OsStr::new("bitmap"),
                OsStr::new("--add"),
                img.as_os_str(),
                OsStr::new("b0"),
            ]);
        }
    }
    img
}

/// Where the base image's metadata lives.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub l1: u64,
    pub refcount_table: u64,
    pub refcount_block: u64,
    /// The L2 table for guest offset [`TARGET`].
    pub l2_first: u64,
    /// The L2 table for guest offset [`SECOND`].
    pub l2_second: u64,
    pub snapshot_table: Option<u64>,
    pub snapshot_l1: Option<u64>,
    pub bitmap_directory: Option<u64>,
    pub bitmap_table: Option<u64>,
}

impl Layout {
    pub fn of(img: &Image) -> Layout {
        let refcount_table = img.u64(REFCOUNT_TABLE_OFFSET);
        let nb_snapshots = img.u32(NB_SNAPSHOTS);
        let snapshot_table = (nb_snapshots != 0).then(|| img.u64(SNAPSHOTS_OFFSET));
        let snapshot_l1 = snapshot_table.map(|t| img.u64(t as usize));
        let bitmaps = img
            .extensions()
            .into_iter()
            .find(|(t, _)| *t == EXT_BITMAPS)
            .map(|(_, d)| u64::from_be_bytes(d[16..24].try_into().unwrap()));
        let bitmap_table = bitmaps.map(|dir| img.u64(dir as usize));
        Layout {
            l1: img.l1_offset(),
            refcount_table,
            refcount_block: img.u64(refcount_table as usize),
            l2_first: img.l2_table_for(TARGET / CLUSTER),
            l2_second: img.l2_table_for(SECOND / CLUSTER),
            snapshot_table,
            snapshot_l1,
            bitmap_directory: bitmaps,
            bitmap_table,
        }
    }
}

/// One lie: the base it needs, and the edit (which returns the guest offset the lie is about).
#[derive(Debug, Clone, Copy)]
pub struct Lie {
    pub name: &'static str,
    pub base: Base,
    pub apply: fn(&mut Image, &Layout) -> u64,
}

fn zero_refcount(img: &mut Image, host: u64) {
    set_refcount(img, host / CLUSTER, 0);
}

fn point_l2_entry(img: &mut Image, guest: u64, host: u64, copied: bool) {
    let flag = if copied { L2_COPIED } else { 0 };
    img.set_l2_entry(guest / CLUSTER, host | flag);
}

fn point_l1_entry(img: &mut Image, guest: u64, host: u64) {
    let entries = img.l2_entries();
    let pos = img.l1_entry_pos(guest / CLUSTER / entries);
    img.set_u64(pos, (host & L1_OFFSET_MASK) | L2_COPIED);
}

macro_rules! lie {
    ($name:ident, $base:ident, |$img:ident, $l:ident| $body:expr) => {
        Lie {
            name: stringify!($name),
            base: Base::$base,
            apply: {
                fn f($img: &mut Image, $l: &Layout) -> u64 {
                    let _ = &$l;
                    $body
                }
                f
            },
        }
    };
}

/// Every lie.
pub fn lies() -> Vec<Lie> {
    vec![
        // Controls: no lie at all.
        lie!(truthful_plain, Plain, |_i, _l| TARGET),
        lie!(truthful_snapshot, Snapshot, |_i, _l| TARGET),
        lie!(truthful_bitmap, Bitmap, |_i, _l| TARGET),
        // Refcount 0 (or none) under a live table: the allocator would hand it out.
        lie!(refcount0_active_l2, Plain, |i, l| {
            zero_refcount(i, l.l2_second);
            TARGET
        }),
        lie!(refcount0_l1, Plain, |i, l| {
            zero_refcount(i, l.l1);
            TARGET
        }),
        lie!(refcount0_refcount_block, Plain, |i, l| {
            zero_refcount(i, l.refcount_block);
            TARGET
        }),
        lie!(refcount0_refcount_table, Plain, |i, l| {
            zero_refcount(i, l.refcount_table);
            TARGET
        }),
        lie!(refcount0_header, Plain, |i, _l| {
            zero_refcount(i, 0);
            TARGET
        }),
        lie!(refcount0_snapshot_l1, Snapshot, |i, l| {
            zero_refcount(i, l.snapshot_l1.unwrap());
            TARGET
        }),
        lie!(refcount0_snapshot_table, Snapshot, |i, l| {
            zero_refcount(i, l.snapshot_table.unwrap());
            TARGET
        }),
        lie!(refcount0_bitmap_directory, Bitmap, |i, l| {
            zero_refcount(i, l.bitmap_directory.unwrap());
            TARGET
        }),
        lie!(refcount0_bitmap_table, Bitmap, |i, l| {
            zero_refcount(i, l.bitmap_table.unwrap());
            TARGET
        }),
        lie!(refcount_table_entry_zero, Plain, |i, l| {
            i.set_u64(l.refcount_table as usize, 0);
            TARGET
        }),
        lie!(refcount_block_past_end, Plain, |i, l| {
            let past = (i.bytes.len() as u64).next_multiple_of(CLUSTER) + 64 * CLUSTER;
            i.set_u64(l.refcount_table as usize, past);
            TARGET
        }),
        // L2 entries naming other metadata, with and without COPIED.
        lie!(l2_copied_to_refcount_block, Plain, |i, l| {
            point_l2_entry(i, TARGET, l.refcount_block, true);
            TARGET
        }),
        lie!(l2_to_refcount_block, Plain, |i, l| {
            point_l2_entry(i, TARGET, l.refcount_block, false);
            TARGET
        }),
        lie!(l2_copied_to_refcount_table, Plain, |i, l| {
            point_l2_entry(i, TARGET, l.refcount_table, true);
            TARGET
        }),
        lie!(l2_copied_to_l1, Plain, |i, l| {
            point_l2_entry(i, TARGET, l.l1, true);
            TARGET
        }),
        lie!(l2_copied_to_other_l2, Plain, |i, l| {
            point_l2_entry(i, TARGET, l.l2_second, true);
            TARGET
        }),
        lie!(l2_to_other_l2, Plain, |i, l| {
            point_l2_entry(i, TARGET, l.l2_second, false);
            TARGET
        }),
        lie!(l2_copied_to_own_l2, Plain, |i, l| {
            point_l2_entry(i, TARGET, l.l2_first, true);
            TARGET
        }),
        lie!(l2_copied_to_snapshot_table, Snapshot, |i, l| {
            point_l2_entry(i, TARGET, l.snapshot_table.unwrap(), true);
            TARGET
        }),
        lie!(l2_copied_to_snapshot_l1, Snapshot, |i, l| {
            point_l2_entry(i, TARGET, l.snapshot_l1.unwrap(), true);
            TARGET
        }),
        lie!(l2_copied_to_bitmap_directory, Bitmap, |i, l| {
            point_l2_entry(i, TARGET, l.bitmap_directory.unwrap(), true);
            TARGET
        }),
        lie!(l2_copied_to_bitmap_table, Bitmap, |i, l| {
            point_l2_entry(i, TARGET, l.bitmap_table.unwrap(), true);
            TARGET
        }),
        // L1 entries naming other metadata as an L2 table.
        lie!(l1_to_refcount_block, Plain, |i, l| {
            point_l1_entry(i, SECOND, l.refcount_block);
            SECOND
        }),
        lie!(l1_to_refcount_table, Plain, |i, l| {
            point_l1_entry(i, SECOND, l.refcount_table);
            SECOND
        }),
        lie!(l1_to_l1, Plain, |i, l| {
            point_l1_entry(i, SECOND, l.l1);
            SECOND
        }),
        lie!(l1_to_other_l2, Plain, |i, l| {
            point_l1_entry(i, SECOND, l.l2_first);
            SECOND
        }),
        lie!(l1_to_snapshot_l1, Snapshot, |i, l| {
            point_l1_entry(i, SECOND, l.snapshot_l1.unwrap());
            SECOND
        }),
        lie!(l1_to_snapshot_table, Snapshot, |i, l| {
            point_l1_entry(i, SECOND, l.snapshot_table.unwrap());
            SECOND
        }),
        lie!(l1_to_bitmap_directory, Bitmap, |i, l| {
            point_l1_entry(i, SECOND, l.bitmap_directory.unwrap());
            SECOND
        }),
        // A preallocated zero cluster and a compressed descriptor over live tables.
        lie!(prealloc_zero_over_l2, Plain, |i, l| {
            let guest = TARGET + 20 * CLUSTER;
            i.set_l2_entry(guest / CLUSTER, l.l2_second | L2_ZERO | L2_COPIED);
            guest
        }),
        lie!(prealloc_zero_over_refcount_block, Plain, |i, l| {
            let guest = TARGET + 20 * CLUSTER;
            i.set_l2_entry(guest / CLUSTER, l.refcount_block | L2_ZERO | L2_COPIED);
            guest
        }),
        lie!(compressed_over_l2, Plain, |i, l| {
            let guest = TARGET + 21 * CLUSTER;
            // One 512-byte sector at the L2 table (cluster_bits 12: no extra sectors).
            i.set_l2_entry(guest / CLUSTER, L2_COMPRESSED | l.l2_second);
            guest
        }),
        lie!(compressed_over_refcount_table, Plain, |i, l| {
            let guest = TARGET + 21 * CLUSTER;
            i.set_l2_entry(guest / CLUSTER, L2_COMPRESSED | l.refcount_table);
            guest
        }),
        // A bitmap table entry naming a live L2 table (the engine frees bitmap clusters before writing).
        lie!(bitmap_table_entry_to_l2, Bitmap, |i, l| {
            i.set_u64(l.bitmap_table.unwrap() as usize, l.l2_second);
            TARGET
        }),
    ]
}

/// The requests tried on every lie, `{T}` standing for the lie's guest offset. (name, qemu-io command,
/// written range relative to `{T}` as (start, len), what the range reads as afterwards: a byte pattern, or
/// `None` for zeros).
pub const OPS: &[(&str, &str, i64, u64, Option<u8>)] = &[
    ("write", "write -P 0x77 {T} 4096", 0, 4096, Some(0x77)),
    (
        "partial write",
        "write -P 0x78 {T+512} 512",
        512,
        512,
        Some(0x78),
    ),
    ("write zeroes", "write -z {T} 4096", 0, 4096, None),
    ("write zeroes unmap", "write -z -u {T} 4096", 0, 4096, None),
    ("discard", "discard {T} 4096", 0, 4096, None),
    // Allocations elsewhere: new data clusters and a new L2 table.
    (
        "allocating write",
        "write -P 0x79 7340032 8192",
        -1,
        8192,
        Some(0x79),
    ),
    (
        "compressed write",
        "write -c -P 0x7a 7864320 4096",
        -2,
        4096,
        Some(0x7a),
    ),
];

/// Guest content as one of the tools reads it: qemu-img's view when it can read the image, ours otherwise.
fn guest_view(scratch: &Scratch, img: &Path, name: &str, use_qemu: bool) -> Option<Vec<u8>> {
    let out = scratch.path(name);
    let _ = std::fs::remove_file(&out);
    let args = [
        OsStr::new("convert"),
        OsStr::new("-f"),
        OsStr::new("qcow2"),
        OsStr::new("-O"),
        OsStr::new("raw"),
        img.as_os_str(),
        out.as_os_str(),
    ];
    let o = if use_qemu {
        qemu_img(args)
    } else {
        qcow2(args)
    };
    if !o.success() {
        return None;
    }
    std::fs::read(&out).ok()
}

/// `qemu-img check`'s corruption count (None when it cannot check the image).
fn corruptions(img: &Path) -> Option<u64> {
    let o = qemu_img([
        OsStr::new("check"),
        OsStr::new("--output=json"),
        img.as_os_str(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    Some(v.get("corruptions").and_then(|c| c.as_u64()).unwrap_or(0))
}

fn ours_succeeded(o: &Output) -> bool {
    let text = o.stdout_str() + &o.stderr_str();
    o.success() && !text.contains("failed")
}

/// Runs every request of [`OPS`] on fresh copies of the lie's image; returns what each did, for the
/// evidence, and panics with every violation of the rule.
pub fn run_lie(lie: &Lie) -> Vec<String> {
    let scratch = Scratch::new();
    let base = build_base(&scratch, lie.base);
    let mut img = load(&base);
    let layout = Layout::of(&img);
    let target = (lie.apply)(&mut img, &layout);
    let lied = scratch.path("lied.qcow2");
    save(&lied, &img);
    let mut failures = Vec::new();
    let mut outcomes = Vec::new();
    for (op, cmd, rel, len, fill) in OPS {
        let path = scratch.path("work.qcow2");
        std::fs::copy(&lied, &path).expect("copy image");
        let start = match *rel {
            -1 => 7_340_032,
            -2 => 7_864_320,
            r => target + r as u64,
        };
        let cmd = cmd
            .replace("{T}", &target.to_string())
            .replace("{T+512}", &(target + 512).to_string());
        let use_qemu = guest_view(&scratch, &path, "before.raw", true).is_some();
        let before_view = guest_view(&scratch, &path, "before.raw", use_qemu);
        let before_bytes = std::fs::read(&path).expect("read image");
        let before_corrupt = corruptions(&path);
        let ours = qcow2([
            OsStr::new("io"),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            OsStr::new("-c"),
            OsStr::new(&cmd),
            path.as_os_str(),
        ]);
        let what = format!("lie {}, {op} ({cmd})", lie.name);
        if ours.code.is_none() || ours.stderr_str().contains("panicked") {
            failures.push(format!("{what}: did not end cleanly:\n{}", ours.describe()));
            continue;
        }
        let after_bytes = std::fs::read(&path).expect("read image");
        if !ours_succeeded(&ours) {
            outcomes.push(format!("{op}: refused"));
            let mut a = after_bytes.clone();
            let mut b = before_bytes.clone();
            // The corrupt bit may be set.
            for v in [&mut a, &mut b] {
                if v.len() >= INCOMPATIBLE_FEATURES + 8 {
                    v[INCOMPATIBLE_FEATURES..INCOMPATIBLE_FEATURES + 8].fill(0);
                }
            }
            if a != b {
                let first = a.iter().zip(&b).position(|(x, y)| x != y);
                failures.push(format!(
                    "{what}: refused, but the image changed (lengths {} -> {}, first difference at {first:?}):\n{}",
                    b.len(),
                    a.len(),
                    ours.describe()
                ));
            }
            continue;
        }
        outcomes.push(format!("{op}: accepted"));
        let after_corrupt = corruptions(&path);
        if let (Some(b), Some(a)) = (before_corrupt, after_corrupt)
            && a > b
        {
            failures.push(format!(
                "{what}: accepted, and qemu-img check finds {a} corruptions where it found {b}"
            ));
        }
        if before_corrupt.is_some() && after_corrupt.is_none() {
            failures.push(format!(
                "{what}: accepted, and qemu-img check can no longer check the image"
            ));
        }
        if let Some(before) = before_view {
            match guest_view(&scratch, &path, "after.raw", use_qemu) {
                None => failures.push(format!(
                    "{what}: accepted, and the image no longer reads (with {})",
                    if use_qemu { "qemu-img" } else { "our tool" }
                )),
                Some(after) => {
                    let (s, e) = (start as usize, (start + len) as usize);
                    let outside_same = before.len() == after.len()
                        && before[..s] == after[..s]
                        && before[e..] == after[e..];
                    if !outside_same {
                        let first = before
                            .iter()
                            .zip(&after)
                            .enumerate()
                            .position(|(i, (x, y))| x != y && !(s..e).contains(&i));
                        failures.push(format!(
                            "{what}: accepted, and guest bytes outside the request changed (first at {first:?})"
                        ));
                    }
                    let want = fill.unwrap_or(0);
                    if after.get(s..e).is_none_or(|r| r.iter().any(|&x| x != want)) {
                        failures.push(format!(
                            "{what}: accepted, but the request's range does not read as written"
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    outcomes
}
