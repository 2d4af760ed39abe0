//! Damaged-image generator for `check` and `repair`: valid images made by qemu-img and qemu-io (snapshots
//! for shared clusters, compressed clusters, extended L2), then metadata edited in pure Rust to leak
//! clusters, lower or zero refcounts, flip COPIED flags, set reserved bits, misalign entries, break
//! subcluster bitmaps or drop a refcount block. [`run_case`] compares our `check` (human, JSON, `-r leaks`,
//! `-r all`) with qemu-img's on copies of the same damaged image.

use std::path::{Path, PathBuf};

use crate::malformed::{
    INCOMPAT_CORRUPT, INCOMPAT_DIRTY, Image, L1_OFFSET_MASK, L2_COPIED, L2_OFFSET_MASK, L2_ZERO,
    REFCOUNT_TABLE_OFFSET,
};
use crate::{Output, Scratch, qcow2, qemu_img, qemu_img_ok, qemu_io_cmds};

/// One damaged image and what to expect of it.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// Name (also the test's name).
    pub name: &'static str,
    /// Builds the damaged image.
    pub build: fn(&Scratch) -> PathBuf,
    /// Our `-r all` lays the image out as qemu-img's does (no refcount rebuild), so the whole report after
    /// the repair (image end offset included) must match.
    pub same_layout_after_repair: bool,
    /// qemu-img's `-r all` fails on this image (its rebuild trips its own overlap check); ours must repair
    /// it so that qemu-img then finds it clean.
    pub qemu_all_fails: bool,
}

/// Every case.
pub fn cases() -> Vec<Case> {
    macro_rules! case {
        ($name:ident, $same:expr) => {
            Case {
                name: stringify!($name),
                build: $name,
                same_layout_after_repair: $same,
                qemu_all_fails: false,
            }
        };
        ($name:ident, $same:expr, qemu_fails) => {
            Case {
                name: stringify!($name),
                build: $name,
                same_layout_after_repair: $same,
                qemu_all_fails: true,
            }
        };
    }
    vec![
        case!(clean_plain, true),
        case!(clean_snapshot, true),
        case!(clean_compressed, true),
        case!(clean_extended_l2, true),
        case!(clean_small_clusters, true),
        case!(clean_refcount_bits_1, true),
        case!(clean_refcount_bits_8, true),
        case!(clean_refcount_bits_64, true),
        case!(clean_v2, true),
        case!(leaked_cluster, true),
        case!(leaked_clusters_at_end, true),
        case!(refcount_too_high_shared, true),
        case!(refcount_too_low, true),
        case!(refcount_zero_used, false),
        case!(refcount_zero_l2_table, false),
        case!(copied_flag_cleared_l2, true),
        case!(copied_flag_set_on_shared, true),
        case!(copied_flag_cleared_l1, true),
        case!(l1_reserved_bits, true),
        case!(l2_reserved_bits, true),
        case!(l2_data_unaligned, true),
        case!(l2_prealloc_unaligned, true),
        case!(l1_unaligned, true),
        case!(extl2_bad_bitmap, true),
        case!(extl2_unallocated_with_alloc_bits, true),
        case!(missing_refcount_block, false),
        case!(refcount_table_reserved_bits, false, qemu_fails),
        case!(refcount_block_unaligned, false, qemu_fails),
        case!(compressed_copied_flag, true),
        case!(compressed_refcount_low, true),
        case!(snapshot_l2_refcount_low, true),
        case!(dirty_with_leak, true),
        case!(corrupt_bit_clean, true),
        case!(data_past_end, true),
        case!(lazy_refcounts_crash, false),
        case!(rebuild_small_clusters, false),
        case!(bitmaps_clean, true),
        case!(bitmap_directory_leaked, true),
        case!(extl2_prealloc_unaligned, true),
        case!(two_entries_one_cluster, true),
        case!(overflow_refcount_bits_1, true),
        case!(snapshot_l1_unaligned, true),
        case!(leak_refcount_bits_4, true),
        case!(clean_data_file, true),
        case!(data_file_copied_cleared, true),
    ]
}

// ---------------------------------------------------------------------------------------------------------
// Image access

pub fn load(path: &Path) -> Image {
    Image {
        bytes: std::fs::read(path).expect("read image"),
    }
}

pub fn save(path: &Path, img: &Image) {
    std::fs::write(path, &img.bytes).expect("write image");
}

/// Refcount width in bits.
fn refcount_bits(img: &Image) -> u32 {
    if img.version() >= 3 {
        1 << img.u32(crate::malformed::REFCOUNT_ORDER)
    } else {
        16
    }
}

/// (byte position, bit shift) of the refcount of host cluster `cluster` (its refcount block must exist).
fn refcount_pos(img: &Image, cluster: u64) -> (usize, u32) {
    let bits = u64::from(refcount_bits(img));
    let per_block = img.cluster_size() * 8 / bits;
    let table = img.u64(REFCOUNT_TABLE_OFFSET);
    let block = img.u64((table + 8 * (cluster / per_block)) as usize);
    assert_ne!(block, 0, "no refcount block for cluster {cluster}");
    let bit = (cluster % per_block) * bits;
    ((block + bit / 8) as usize, (bit % 8) as u32)
}

pub fn refcount(img: &Image, cluster: u64) -> u64 {
    let bits = refcount_bits(img);
    let (pos, shift) = refcount_pos(img, cluster);
    match bits {
        1 | 2 | 4 => u64::from(img.u8(pos) >> shift) & ((1 << bits) - 1),
        8 => u64::from(img.u8(pos)),
        16 => u64::from(u16::from_be_bytes([img.u8(pos), img.u8(pos + 1)])),
        32 => u64::from(img.u32(pos)),
        _ => img.u64(pos),
    }
}

pub fn set_refcount(img: &mut Image, cluster: u64, v: u64) {
    let bits = refcount_bits(img);
    let (pos, shift) = refcount_pos(img, cluster);
    match bits {
        1 | 2 | 4 => {
            let mask = (((1u16 << bits) - 1) << shift) as u8;
            let b = (img.u8(pos) & !mask) | (((v as u8) << shift) & mask);
            img.set_u8(pos, b);
        }
        8 => img.set_u8(pos, v as u8),
        16 => img.put(pos, &(v as u16).to_be_bytes()),
        32 => img.set_u32(pos, v as u32),
        _ => img.set_u64(pos, v),
    }
}

/// Host cluster index of the data of guest cluster `g`.
fn data_cluster(img: &Image, g: u64) -> u64 {
    (img.l2_entry(g) & L2_OFFSET_MASK) >> img.cluster_bits()
}

// ---------------------------------------------------------------------------------------------------------
// Base images

const SIZE: u64 = 4 << 20;

fn io(img: &Path, cmds: &[&str]) {
    let cmds: Vec<String> = cmds.iter().map(|s| s.to_string()).collect();
    qemu_io_cmds(img, "qcow2", &cmds);
}

/// 64 KiB clusters, guest clusters 0, 1, 16 and 48 written.
fn base(scratch: &Scratch, name: &str, opts: &str) -> PathBuf {
    let img = scratch.qcow2(name, opts, SIZE);
    io(
        &img,
        &[
            "write -P 0x11 0 128k",
            "write -P 0x22 1M 64k",
            "write -P 0x33 3M 512",
        ],
    );
    img
}

/// [`base`] + snapshot `s1` + guest cluster 1 rewritten (clusters 0, 16, 48 shared with the snapshot).
fn base_snapshot(scratch: &Scratch, name: &str) -> PathBuf {
    let img = base(scratch, name, "");
    qemu_img_ok([
        "snapshot".as_ref(),
        "-c".as_ref(),
        "s1".as_ref(),
        img.as_os_str(),
    ]);
    io(&img, &["write -P 0x44 64k 64k"]);
    img
}

fn base_compressed(scratch: &Scratch, name: &str) -> PathBuf {
    let img = scratch.qcow2(name, "", SIZE);
    io(
        &img,
        &[
            "write -c -P 0x55 0 64k",
            "write -c -P 0x56 64k 64k",
            "write -c -P 0x57 128k 64k",
            "write -P 0x58 1M 64k",
        ],
    );
    img
}

fn base_extl2(scratch: &Scratch, name: &str) -> PathBuf {
    let img = scratch.qcow2(name, "extended_l2=on,cluster_size=64k", SIZE);
    io(
        &img,
        &[
            "write -P 0x61 0 4k",
            "write -P 0x62 64k 64k",
            "write -z 132k 8k",
            "write -P 0x63 1M 2k",
        ],
    );
    img
}

fn edit(path: PathBuf, f: impl FnOnce(&mut Image)) -> PathBuf {
    let mut img = load(&path);
    f(&mut img);
    save(&path, &img);
    path
}

// ---------------------------------------------------------------------------------------------------------
// Cases

fn clean_plain(s: &Scratch) -> PathBuf {
    base(s, "clean.qcow2", "")
}

fn clean_snapshot(s: &Scratch) -> PathBuf {
    base_snapshot(s, "clean-snap.qcow2")
}

fn clean_compressed(s: &Scratch) -> PathBuf {
    base_compressed(s, "clean-comp.qcow2")
}

fn clean_extended_l2(s: &Scratch) -> PathBuf {
    base_extl2(s, "clean-extl2.qcow2")
}

fn clean_small_clusters(s: &Scratch) -> PathBuf {
    let img = s.qcow2("clean-512.qcow2", "cluster_size=512", SIZE);
    io(
        &img,
        &[
            "write -P 0x11 0 300k",
            "write -P 0x12 2M 40k",
            "write -c -P 0x13 3M 512",
        ],
    );
    qemu_img_ok([
        "snapshot".as_ref(),
        "-c".as_ref(),
        "s1".as_ref(),
        img.as_os_str(),
    ]);
    io(&img, &["write -P 0x14 100k 10k"]);
    img
}

fn clean_refcount_bits_1(s: &Scratch) -> PathBuf {
    base(s, "clean-rb1.qcow2", "refcount_bits=1")
}

fn clean_refcount_bits_8(s: &Scratch) -> PathBuf {
    let img = base(s, "clean-rb8.qcow2", "refcount_bits=8");
    qemu_img_ok([
        "snapshot".as_ref(),
        "-c".as_ref(),
        "s1".as_ref(),
        img.as_os_str(),
    ]);
    img
}

fn clean_refcount_bits_64(s: &Scratch) -> PathBuf {
    base(s, "clean-rb64.qcow2", "refcount_bits=64")
}

fn clean_v2(s: &Scratch) -> PathBuf {
    base(s, "clean-v2.qcow2", "compat=0.10")
}

/// A cluster appended to the file with refcount 1 and no reference.
fn leaked_cluster(s: &Scratch) -> PathBuf {
    edit(base(s, "leak.qcow2", ""), |img| {
        let cs = img.cluster_size();
        let n = img.bytes.len() as u64 / cs;
        img.bytes.resize(((n + 1) * cs) as usize, 0);
        set_refcount(img, n, 1);
    })
}

/// Three clusters at the end of the file leaked, one of them with refcount 3.
fn leaked_clusters_at_end(s: &Scratch) -> PathBuf {
    edit(base(s, "leak3.qcow2", ""), |img| {
        let cs = img.cluster_size();
        let n = img.bytes.len() as u64 / cs;
        img.bytes.resize(((n + 3) * cs) as usize, 0);
        set_refcount(img, n, 1);
        set_refcount(img, n + 1, 3);
        set_refcount(img, n + 2, 1);
    })
}

/// A data cluster with refcount 2 and one reference (a leak, and a COPIED mismatch).
fn refcount_too_high_shared(s: &Scratch) -> PathBuf {
    edit(base(s, "high.qcow2", ""), |img| {
        let c = data_cluster(img, 16);
        set_refcount(img, c, 2);
    })
}

/// A cluster shared with a snapshot whose refcount says 1.
fn refcount_too_low(s: &Scratch) -> PathBuf {
    edit(base_snapshot(s, "low.qcow2"), |img| {
        let c = data_cluster(img, 0);
        assert_eq!(refcount(img, c), 2);
        set_refcount(img, c, 1);
    })
}

/// A used data cluster with refcount 0: needs a refcount rebuild.
fn refcount_zero_used(s: &Scratch) -> PathBuf {
    edit(base(s, "zero-used.qcow2", ""), |img| {
        let c = data_cluster(img, 1);
        set_refcount(img, c, 0);
    })
}

/// The L2 table's own refcount is 0.
fn refcount_zero_l2_table(s: &Scratch) -> PathBuf {
    edit(base(s, "zero-l2.qcow2", ""), |img| {
        let l2 = img.l2_table_for(0) >> img.cluster_bits();
        set_refcount(img, l2, 0);
    })
}

/// COPIED cleared on an L2 entry whose cluster has refcount 1.
fn copied_flag_cleared_l2(s: &Scratch) -> PathBuf {
    edit(base(s, "copied-l2.qcow2", ""), |img| {
        let e = img.l2_entry(1);
        img.set_l2_entry(1, e & !L2_COPIED);
    })
}

/// COPIED set on an L2 entry whose cluster is shared with a snapshot.
fn copied_flag_set_on_shared(s: &Scratch) -> PathBuf {
    edit(base_snapshot(s, "copied-shared.qcow2"), |img| {
        let e = img.l2_entry(16);
        assert_eq!(e & L2_COPIED, 0);
        img.set_l2_entry(16, e | L2_COPIED);
    })
}

/// COPIED cleared on the active L1 entry.
fn copied_flag_cleared_l1(s: &Scratch) -> PathBuf {
    edit(base(s, "copied-l1.qcow2", ""), |img| {
        let p = img.l1_entry_pos(0);
        let e = img.u64(p);
        img.set_u64(p, e & !L2_COPIED);
    })
}

fn l1_reserved_bits(s: &Scratch) -> PathBuf {
    edit(base(s, "l1-reserved.qcow2", ""), |img| {
        let p = img.l1_entry_pos(0);
        let e = img.u64(p);
        img.set_u64(p, e | 0x0100_0000_0000_0000);
    })
}

fn l2_reserved_bits(s: &Scratch) -> PathBuf {
    edit(base(s, "l2-reserved.qcow2", ""), |img| {
        let e = img.l2_entry(16);
        img.set_l2_entry(16, e | 0x2);
    })
}

/// A data cluster entry pointing 512 bytes into its cluster.
fn l2_data_unaligned(s: &Scratch) -> PathBuf {
    edit(base(s, "l2-unaligned.qcow2", ""), |img| {
        let e = img.l2_entry(16);
        img.set_l2_entry(16, e + 0x200);
    })
}

/// A preallocated zero cluster whose offset is unaligned (repair turns it into a plain zero cluster).
fn l2_prealloc_unaligned(s: &Scratch) -> PathBuf {
    edit(base(s, "prealloc-unaligned.qcow2", ""), |img| {
        let e = img.l2_entry(16);
        img.set_l2_entry(16, (e + 0x200) | L2_ZERO);
    })
}

/// The active L1 entry pointing 512 bytes into the L2 table's cluster.
fn l1_unaligned(s: &Scratch) -> PathBuf {
    edit(base(s, "l1-unaligned.qcow2", ""), |img| {
        let p = img.l1_entry_pos(0);
        let e = img.u64(p);
        img.set_u64(p, e + 0x200);
    })
}

/// Extended L2: a subcluster both allocated and zero.
fn extl2_bad_bitmap(s: &Scratch) -> PathBuf {
    edit(base_extl2(s, "extl2-bad.qcow2"), |img| {
        img.set_l2_bitmap(1, 0x0000_0001_ffff_ffff);
    })
}

/// Extended L2: an unallocated cluster with allocation bits.
fn extl2_unallocated_with_alloc_bits(s: &Scratch) -> PathBuf {
    edit(base_extl2(s, "extl2-unalloc.qcow2"), |img| {
        img.set_l2_bitmap(5, 0x3);
    })
}

/// The refcount table's first entry is zero: every refcount reads 0.
fn missing_refcount_block(s: &Scratch) -> PathBuf {
    edit(base(s, "no-refblock.qcow2", ""), |img| {
        let t = img.u64(REFCOUNT_TABLE_OFFSET) as usize;
        img.set_u64(t, 0);
    })
}

fn refcount_table_reserved_bits(s: &Scratch) -> PathBuf {
    edit(base(s, "reftable-reserved.qcow2", ""), |img| {
        let t = img.u64(REFCOUNT_TABLE_OFFSET) as usize;
        let e = img.u64(t);
        img.set_u64(t, e | 0x1);
    })
}

fn refcount_block_unaligned(s: &Scratch) -> PathBuf {
    edit(base(s, "refblock-unaligned.qcow2", ""), |img| {
        let t = img.u64(REFCOUNT_TABLE_OFFSET) as usize;
        let e = img.u64(t);
        img.set_u64(t, e + 0x200);
    })
}

fn compressed_copied_flag(s: &Scratch) -> PathBuf {
    edit(base_compressed(s, "comp-copied.qcow2"), |img| {
        let e = img.l2_entry(1);
        img.set_l2_entry(1, e | L2_COPIED);
    })
}

/// The host cluster holding compressed data shared by several compressed clusters has refcount 1.
fn compressed_refcount_low(s: &Scratch) -> PathBuf {
    edit(base_compressed(s, "comp-low.qcow2"), |img| {
        let x = 62 - (img.cluster_bits() - 8);
        let off = img.l2_entry(0) & ((1u64 << x) - 1);
        let c = off >> img.cluster_bits();
        let r = refcount(img, c);
        assert!(r >= 2, "compressed clusters should share host cluster {c}");
        set_refcount(img, c, r - 1);
    })
}

/// A snapshot's L2 table (shared with the active L1) has refcount 1.
fn snapshot_l2_refcount_low(s: &Scratch) -> PathBuf {
    edit(base_snapshot(s, "snap-l2-low.qcow2"), |img| {
        // After the snapshot and a write, the active L1 has its own L2 table; the snapshot's L1 holds the
        // old one: find a cluster with refcount 1 referenced from a snapshot L1 by lowering the snapshot's L2.
        let snap_l1 = img.u64(img.u64(crate::malformed::SNAPSHOTS_OFFSET) as usize);
        let l2 = img.u64(snap_l1 as usize) & L1_OFFSET_MASK;
        let c = l2 >> img.cluster_bits();
        let r = refcount(img, c);
        set_refcount(img, c, r.saturating_sub(1).max(1));
        if r == 1 {
            // Not shared: make it look leaked instead.
            set_refcount(img, c, 2);
        }
    })
}

/// Dirty bit (as lazy refcounts leave it) and a leaked cluster.
fn dirty_with_leak(s: &Scratch) -> PathBuf {
    edit(base(s, "dirty.qcow2", "lazy_refcounts=on"), |img| {
        let cs = img.cluster_size();
        let n = img.bytes.len() as u64 / cs;
        img.bytes.resize(((n + 1) * cs) as usize, 0);
        set_refcount(img, n, 1);
        let f = img.incompatible();
        img.set_incompatible(f | INCOMPAT_DIRTY);
    })
}

/// The corrupt bit on an image with nothing wrong (repair clears it).
fn corrupt_bit_clean(s: &Scratch) -> PathBuf {
    edit(base(s, "corrupt-bit.qcow2", ""), |img| {
        let f = img.incompatible();
        img.set_incompatible(f | INCOMPAT_CORRUPT);
    })
}

/// An L2 entry pointing far past the end of the file.
fn data_past_end(s: &Scratch) -> PathBuf {
    edit(base(s, "past-end.qcow2", ""), |img| {
        let e = img.l2_entry(16);
        img.set_l2_entry(16, (e & !L2_OFFSET_MASK) | (100 << 20));
    })
}

/// Lazy refcounts and a crash (qemu-io's `abort`) after allocating writes: dirty bit, refcounts 0 on used
/// clusters (the repair QEMU runs when it next opens the image for writing).
fn lazy_refcounts_crash(s: &Scratch) -> PathBuf {
    let img = s.qcow2("lazy.qcow2", "lazy_refcounts=on", SIZE);
    let out = crate::qemu_io([
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-c".as_ref(),
        "write -P 0x71 0 256k".as_ref(),
        "-c".as_ref(),
        "write -P 0x72 1M 64k".as_ref(),
        "-c".as_ref(),
        "abort".as_ref(),
        img.as_os_str(),
    ]);
    assert!(!out.success(), "qemu-io abort should not exit cleanly");
    assert_ne!(
        load(&img).incompatible() & INCOMPAT_DIRTY,
        0,
        "no dirty bit after the crash"
    );
    img
}

/// 512-byte clusters, hundreds of them, and the first refcount block gone: the rebuild spans several passes
/// of a small scratch buffer.
fn rebuild_small_clusters(s: &Scratch) -> PathBuf {
    let img = s.qcow2("rebuild-512.qcow2", "cluster_size=512", SIZE);
    io(&img, &["write -P 0x11 0 300k", "write -P 0x12 2M 40k"]);
    edit(img, |img| {
        let t = img.u64(REFCOUNT_TABLE_OFFSET) as usize;
        img.set_u64(t, 0);
    })
}

fn with_bitmap(s: &Scratch, name: &str) -> PathBuf {
    let img = s.qcow2(name, "", SIZE);
    qemu_img_ok([
        "bitmap".as_ref(),
        "--add".as_ref(),
        img.as_os_str(),
        "b0".as_ref(),
    ]);
    io(&img, &["write -P 0x81 0 64k", "write -P 0x82 2M 64k"]);
    img
}

/// A persistent dirty bitmap with allocated bitmap data (its directory, table and data are refcounted).
fn bitmaps_clean(s: &Scratch) -> PathBuf {
    with_bitmap(s, "bitmap.qcow2")
}

/// The bitmap directory's cluster with refcount 2.
fn bitmap_directory_leaked(s: &Scratch) -> PathBuf {
    edit(with_bitmap(s, "bitmap-leak.qcow2"), |img| {
        let mut off = img.header_length();
        let dir = loop {
            let ty = img.u32(off);
            let len = img.u32(off + 4) as usize;
            assert_ne!(ty, 0, "no bitmaps extension");
            if ty == 0x2385_2875 {
                break img.u64(off + 8 + 16);
            }
            off += 8 + len.div_ceil(8) * 8;
        };
        let c = dir >> img.cluster_bits();
        let r = refcount(img, c);
        set_refcount(img, c, r + 1);
    })
}

/// Extended L2: an allocated entry with no allocated subcluster at an unaligned offset (repair clears it).
fn extl2_prealloc_unaligned(s: &Scratch) -> PathBuf {
    edit(base_extl2(s, "extl2-prealloc.qcow2"), |img| {
        let e = img.l2_entry(1);
        img.set_l2_entry(1, e + 0x200);
        img.set_l2_bitmap(1, 0xffff_ffff_0000_0000);
    })
}

/// Two L2 entries (both COPIED) pointing at the same data cluster; the other one's cluster leaks.
fn two_entries_one_cluster(s: &Scratch) -> PathBuf {
    edit(base(s, "two-entries.qcow2", ""), |img| {
        let e = img.l2_entry(0);
        img.set_l2_entry(16, e);
    })
}

/// The same with 1-bit refcounts: the second reference overflows.
fn overflow_refcount_bits_1(s: &Scratch) -> PathBuf {
    edit(base(s, "overflow.qcow2", "refcount_bits=1"), |img| {
        let e = img.l2_entry(0);
        img.set_l2_entry(16, e);
    })
}

/// A snapshot whose L1 table offset is not cluster-aligned.
fn snapshot_l1_unaligned(s: &Scratch) -> PathBuf {
    edit(base_snapshot(s, "snap-l1.qcow2"), |img| {
        let t = img.u64(crate::malformed::SNAPSHOTS_OFFSET) as usize;
        let l1 = img.u64(t);
        img.set_u64(t, l1 + 0x200);
    })
}

/// 4-bit refcounts (sub-byte packing) and a leak at the end of the file.
fn leak_refcount_bits_4(s: &Scratch) -> PathBuf {
    edit(base(s, "leak-rb4.qcow2", "refcount_bits=4"), |img| {
        let cs = img.cluster_size();
        let n = img.bytes.len() as u64 / cs;
        img.bytes.resize(((n + 2) * cs) as usize, 0);
        set_refcount(img, n, 3);
        set_refcount(img, n + 1, 1);
    })
}

/// An external data file: its clusters are not refcounted.
fn clean_data_file(s: &Scratch) -> PathBuf {
    // An absolute name: qemu-img and qemu-io resolve a relative one against their working directory.
    let data = s.path("datafile.raw");
    let img = s.qcow2(
        "datafile.qcow2",
        &format!("data_file={}", data.display()),
        SIZE,
    );
    io(&img, &["write -P 0x91 0 128k", "write -P 0x92 1M 64k"]);
    img
}

/// An external data file and an L2 entry without COPIED (its refcount counts as 1).
fn data_file_copied_cleared(s: &Scratch) -> PathBuf {
    let data = s.path("datafile-copied.raw");
    let img = s.qcow2(
        "datafile-copied.qcow2",
        &format!("data_file={}", data.display()),
        SIZE,
    );
    io(&img, &["write -P 0x93 0 128k"]);
    edit(img, |img| {
        let e = img.l2_entry(1);
        img.set_l2_entry(1, e & !L2_COPIED);
    })
}

// ---------------------------------------------------------------------------------------------------------
// Running a case

/// Our tool's output with the file names made equal to qemu-img's.
pub fn run_pair(args: &[&str], ours: &Path, theirs: &Path) -> (Output, Output) {
    let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    a.insert(0, "check".into());
    let mut qa = a.clone();
    qa.push(theirs.to_str().unwrap().into());
    a.push(ours.to_str().unwrap().into());
    let q = qemu_img(&qa);
    let mut o = qcow2(&a);
    let on = ours.to_str().unwrap();
    let tn = theirs.to_str().unwrap();
    o.stdout = o.stdout_str().replace(on, tn).into_bytes();
    o.stderr = o
        .stderr_str()
        .lines()
        .map(|l| match l.strip_prefix("qcow2: Check failed") {
            Some(rest) => format!("qemu-img: Check failed{rest}\n"),
            None => format!("{l}\n"),
        })
        .collect::<String>()
        .into_bytes();
    (o, q)
}

pub fn assert_same(what: &str, o: &Output, q: &Output, stdout: bool, stderr: bool) {
    assert_eq!(
        o.code,
        q.code,
        "{what}: exit codes differ\nours:\n{}\nqemu-img:\n{}",
        o.describe(),
        q.describe()
    );
    if stdout {
        assert_eq!(
            o.stdout_str(),
            q.stdout_str(),
            "{what}: stdout differs\nours:\n{}\nqemu-img:\n{}",
            o.describe(),
            q.describe()
        );
    }
    if stderr {
        assert_eq!(
            o.stderr_str(),
            q.stderr_str(),
            "{what}: stderr differs\nours:\n{}\nqemu-img:\n{}",
            o.describe(),
            q.describe()
        );
    }
}

pub fn json_numbers(out: &Output) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(&out.stdout_str())
        .unwrap_or_else(|e| panic!("bad JSON ({e}):\n{}", out.describe()));
    if let Some(m) = v.as_object_mut() {
        m.remove("image-end-offset");
        m.remove("filename");
    }
    v
}

/// The guest content as raw bytes (`None` if qemu-img cannot read the image).
pub fn guest_bytes(s: &Scratch, img: &Path, tag: &str) -> Option<Vec<u8>> {
    let raw = s.path(&format!("{tag}.raw"));
    let out = qemu_img([
        "convert".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        img.as_os_str(),
        raw.as_os_str(),
    ]);
    out.success()
        .then(|| std::fs::read(&raw).expect("read raw"))
}

pub fn copy(s: &Scratch, img: &Path, tag: &str) -> PathBuf {
    let p = s.path(&format!("{tag}.qcow2"));
    std::fs::copy(img, &p).expect("copy image");
    p
}

/// Runs case `name`: check (human and JSON) and both repair modes, ours against qemu-img's.
pub fn run_case(name: &str) {
    let case = cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no damage case {name}"));
    let s = Scratch::new();
    let img = (case.build)(&s);

    // Plain check: human and JSON, text for text.
    for args in [&[][..], &["--output=json"][..]] {
        let (o, q) = run_pair(args, &copy(&s, &img, "o"), &copy(&s, &img, "q"));
        assert_same(&format!("{name}: check {args:?}"), &o, &q, true, true);
    }
    let before = guest_bytes(&s, &img, "before");

    // -r leaks.
    let (o_img, q_img) = (copy(&s, &img, "ol"), copy(&s, &img, "ql"));
    let (o, q) = run_pair(&["-r", "leaks", "--output=json"], &o_img, &q_img);
    let rebuild_needed = q.stderr_str().contains("need to rebuild");
    assert_same(
        &format!("{name}: check -r leaks"),
        &o,
        &q,
        !rebuild_needed,
        true,
    );
    // QEMU rewrites persistent bitmaps whenever it opens an image for writing: no byte comparison then.
    let bitmaps = load(&img).u64(crate::malformed::AUTOCLEAR_FEATURES) & 1 != 0;
    if !bitmaps && matches!(q.code, Some(0) | Some(2) | Some(3)) {
        assert_eq!(
            std::fs::read(&o_img).unwrap(),
            std::fs::read(&q_img).unwrap(),
            "{name}: -r leaks left different images"
        );
    }

    // -r all.
    let (o_img, q_img) = (copy(&s, &img, "oa"), copy(&s, &img, "qa"));
    let (o, q) = run_pair(&["-r", "all", "--output=json"], &o_img, &q_img);
    if case.qemu_all_fails {
        assert_eq!(
            q.code,
            Some(1),
            "{name}: qemu-img -r all was expected to fail:\n{}",
            q.describe()
        );
        assert_eq!(
            o.code,
            Some(0),
            "{name}: our -r all failed:\n{}",
            o.describe()
        );
        let after = qemu_img(["check".as_ref(), o_img.as_os_str()]);
        assert_eq!(
            after.code,
            Some(0),
            "{name}: not clean after our repair:\n{}",
            after.describe()
        );
        let bits = load(&o_img).incompatible();
        assert_eq!(
            bits & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT),
            0,
            "{name}: dirty or corrupt bit left set"
        );
        let ours = guest_bytes(&s, &o_img, "after-ours");
        assert!(
            ours.is_some() && ours == before,
            "{name}: guest data changed by our repair"
        );
        return;
    }
    if case.same_layout_after_repair {
        assert_same(&format!("{name}: check -r all"), &o, &q, true, true);
        assert!(
            bitmaps || std::fs::read(&o_img).unwrap() == std::fs::read(&q_img).unwrap(),
            "{name}: -r all left different images"
        );
    } else {
        assert_same(&format!("{name}: check -r all"), &o, &q, false, false);
        assert_eq!(
            json_numbers(&o),
            json_numbers(&q),
            "{name}: -r all reports differ\nours:\n{}\nqemu-img:\n{}",
            o.describe(),
            q.describe()
        );
    }
    // The human text of both repair modes, where the repair leaves the same layout.
    if case.same_layout_after_repair && !case.qemu_all_fails {
        for mode in ["leaks", "all"] {
            let (oh, qh) = (copy(&s, &img, "oh"), copy(&s, &img, "qh"));
            let (o, q) = run_pair(&["-r", mode], &oh, &qh);
            let need_rebuild = q.stderr_str().contains("need to rebuild");
            assert_same(
                &format!("{name}: check -r {mode} (human)"),
                &o,
                &q,
                !need_rebuild,
                true,
            );
        }
    }
    // After our repair, both tools agree on the state, and it is qemu-img's state after its own repair.
    let (o2, q2) = run_pair(&["--output=json"], &o_img, &o_img);
    assert_same(
        &format!("{name}: check after our -r all"),
        &o2,
        &q2,
        true,
        false,
    );
    let q3 = qemu_img([
        "check".as_ref(),
        "--output=json".as_ref(),
        q_img.as_os_str(),
    ]);
    assert_eq!(
        o2.code,
        q3.code,
        "{name}: state after repair differs\nours:\n{}\nqemu-img's repair:\n{}",
        o2.describe(),
        q3.describe()
    );
    assert_eq!(
        json_numbers(&o2),
        json_numbers(&q3),
        "{name}: state after repair differs"
    );
    // Guest data: what qemu-img reads after our repair is what it reads after its own, and what it read
    // before the damage was repaired wherever it could read it then.
    if o2.code == Some(0) {
        let bits = load(&o_img).incompatible();
        assert_eq!(
            bits & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT),
            0,
            "{name}: dirty or corrupt bit left set"
        );
    }
    let ours = guest_bytes(&s, &o_img, "after-ours");
    let theirs = guest_bytes(&s, &q_img, "after-qemu");
    assert_eq!(
        ours.is_some(),
        theirs.is_some(),
        "{name}: readability after repair"
    );
    if let (Some(a), Some(b)) = (&ours, &theirs) {
        assert!(
            a == b,
            "{name}: guest data after our repair differs from qemu-img's"
        );
    }
    if let (Some(a), Some(b)) = (&ours, &before)
        && q3.code == Some(0)
    {
        assert!(a == b, "{name}: guest data changed by the repair");
    }
}
