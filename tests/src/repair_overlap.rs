//! Images whose tables run over other structures, for `check -r all`: an L1 entry with only reserved bits
//! (its L2 table is then cluster 0, the header with the backing file name), L1 entries naming a data cluster,
//! a refcount block or the L1 table itself as an L2 table, and active or snapshot L1 tables at QEMU's largest
//! size, running past their real end over L2 tables, refcount blocks and guest data.
//!
//! [`run_case`] repairs one copy with qemu-img and another with our tool and asserts the rules a repair must
//! keep: it never changes a byte of the header cluster other than the fields a repair may update (the
//! refcount table's location, the incompatible feature bits) nor of a guest data cluster; afterwards
//! qemu-img check finds no more corruptions than before; and where qemu-img refuses the repair, ours refuses
//! too, with a message that says why.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::malformed::{
    INCOMPAT_CORRUPT, Image, L1_SIZE, L1_TABLE_OFFSET, L2_COPIED, NB_SNAPSHOTS,
    REFCOUNT_TABLE_OFFSET, SNAPSHOTS_OFFSET,
};
use crate::{Output, Scratch, qcow2, qemu_img, qemu_img_ok, qemu_io_cmds};

/// QEMU's largest L1 table: 32 MiB of entries.
const MAX_L1_ENTRIES: u32 = 32 * 1024 * 1024 / 8;

/// One image and its name.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub name: &'static str,
    /// Edits the undamaged image (built by [`base`]).
    pub damage: fn(&mut Image),
    /// The base has an internal snapshot.
    pub snapshot: bool,
}

/// Every case.
pub fn cases() -> Vec<Case> {
    macro_rules! case {
        ($name:ident) => {
            Case {
                name: stringify!($name),
                damage: $name,
                snapshot: false,
            }
        };
        ($name:ident, snapshot) => {
            Case {
                name: stringify!($name),
                damage: $name,
                snapshot: true,
            }
        };
    }
    vec![
        case!(l1_entry_reserved_bit_offset_zero),
        case!(l1_entry_copied_offset_zero),
        case!(l1_entry_names_a_data_cluster),
        case!(l1_entry_names_the_refcount_block),
        case!(l1_entry_names_the_l1_table),
        case!(l1_at_qemus_largest_size),
        case!(snapshot_l1_at_qemus_largest_size, snapshot),
        case!(l1_at_qemus_largest_size_with_snapshot, snapshot),
    ]
}

/// 2 GiB virtual (four L1 entries), 64 KiB clusters, a raw backing file (so the backing file name lives in
/// the header cluster), data in guest clusters 0, 1 and at 600 MiB (the second L2 table).
fn base(s: &Scratch, snapshot: bool) -> PathBuf {
    std::fs::write(s.path("backing.raw"), vec![0x99u8; 1 << 20]).unwrap();
    let p = s.create(
        "img.qcow2",
        "qcow2",
        "cluster_size=65536",
        2 << 30,
        Some(("backing.raw", "raw")),
    );
    let cmds = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    qemu_io_cmds(
        &p,
        "qcow2",
        &cmds(&["write -P 0x11 0 128k", "write -P 0x22 600M 64k"]),
    );
    if snapshot {
        qemu_img_ok([
            "snapshot".as_ref(),
            "-c".as_ref(),
            "s1".as_ref(),
            p.as_os_str(),
        ]);
        qemu_io_cmds(&p, "qcow2", &cmds(&["write -P 0x33 64k 64k"]));
    }
    p
}

fn set_l1(img: &mut Image, index: u64, v: u64) {
    let p = img.l1_entry_pos(index);
    img.set_u64(p, v);
}

fn l1_entry_reserved_bit_offset_zero(img: &mut Image) {
    set_l1(img, 2, 1 << 1);
}

fn l1_entry_copied_offset_zero(img: &mut Image) {
    set_l1(img, 2, L2_COPIED | 1 << 3);
}

fn l1_entry_names_a_data_cluster(img: &mut Image) {
    let data = img.l2_entry(0) & crate::malformed::L2_OFFSET_MASK;
    set_l1(img, 2, L2_COPIED | data);
}

fn l1_entry_names_the_refcount_block(img: &mut Image) {
    let table = img.u64(REFCOUNT_TABLE_OFFSET) as usize;
    let block = img.u64(table);
    set_l1(img, 2, L2_COPIED | block);
}

fn l1_entry_names_the_l1_table(img: &mut Image) {
    let l1 = img.u64(L1_TABLE_OFFSET);
    set_l1(img, 2, L2_COPIED | l1);
}

fn l1_at_qemus_largest_size(img: &mut Image) {
    img.set_u32(L1_SIZE, MAX_L1_ENTRIES);
}

fn snapshot_l1_at_qemus_largest_size(img: &mut Image) {
    assert_eq!(img.u32(NB_SNAPSHOTS), 1);
    let at = img.u64(SNAPSHOTS_OFFSET) as usize;
    img.set_u32(at + 8, MAX_L1_ENTRIES);
}

fn l1_at_qemus_largest_size_with_snapshot(img: &mut Image) {
    img.set_u32(L1_SIZE, MAX_L1_ENTRIES);
}

/// Host clusters holding guest data (qemu-img map of the undamaged image).
fn data_clusters(img: &Path) -> BTreeSet<u64> {
    let out = qemu_img_ok(["map".as_ref(), "--output=json".as_ref(), img.as_os_str()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut set = BTreeSet::new();
    for e in v.as_array().unwrap() {
        if e["data"] == true
            && e["depth"] == 0
            && let Some(off) = e["offset"].as_u64()
        {
            let len = e["length"].as_u64().unwrap();
            for c in (off >> 16)..((off + len).div_ceil(65536)) {
                set.insert(c);
            }
        }
    }
    set
}

/// qemu-img check's corruption count (`None` when the check itself fails).
fn corruptions(img: &Path) -> (Option<u64>, Output) {
    let out = qemu_img(["check".as_ref(), "--output=json".as_ref(), img.as_os_str()]);
    let n = serde_json::from_str::<serde_json::Value>(&out.stdout_str())
        .ok()
        .map(|v| v["corruptions"].as_u64().unwrap_or(0));
    (n, out)
}

/// Header bytes a repair may change: the refcount table's offset and size (a rebuild), the incompatible
/// feature bits (dirty, corrupt).
fn may_change(byte: usize) -> bool {
    (48..60).contains(&byte) || (72..80).contains(&byte)
}

/// Runs one case (see the module documentation).
pub fn run_case(name: &str) {
    let case = cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name}"));
    let s = Scratch::new();
    let img = base(&s, case.snapshot);
    let data = data_clusters(&img);
    assert!(!data.is_empty());
    let mut damaged = Image {
        bytes: std::fs::read(&img).unwrap(),
    };
    (case.damage)(&mut damaged);
    damaged.write_to(&img);
    let before = damaged.bytes.clone();
    let (found, q_check) = corruptions(&img);
    // A refused repair sets the corrupt bit, as qemu-img's does; where the header cluster is itself read as
    // an L2 table, that bit is one more "corruption". Compare with the damaged image with that bit set too.
    let marked = s.path("marked.qcow2");
    let mut m = damaged.clone();
    m.set_incompatible(m.incompatible() | INCOMPAT_CORRUPT);
    m.write_to(&marked);
    let found = match (found, corruptions(&marked).0) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };

    let ours = s.path("ours.qcow2");
    let theirs = s.path("theirs.qcow2");
    std::fs::copy(&img, &ours).unwrap();
    std::fs::copy(&img, &theirs).unwrap();
    let q = qemu_img([
        "check".as_ref(),
        "-r".as_ref(),
        "all".as_ref(),
        theirs.as_os_str(),
    ]);
    let o = qcow2(["check", "-r", "all", ours.to_str().unwrap()]);

    // Never a byte of the header cluster other than the fields a repair may update, never guest data.
    let after = std::fs::read(&ours).unwrap();
    let cs = 65536usize;
    for (i, (a, b)) in before.iter().zip(after.iter()).enumerate() {
        if a == b {
            continue;
        }
        assert!(
            i >= cs || may_change(i),
            "{name}: our repair changed header byte {i} ({a:#x} -> {b:#x})\nours:\n{}",
            o.describe()
        );
        assert!(
            !data.contains(&((i / cs) as u64)),
            "{name}: our repair changed guest data at {i:#x}\nours:\n{}",
            o.describe()
        );
    }
    // Where qemu-img refuses the repair, so do we, saying why.
    if q.code == Some(1) {
        assert_eq!(
            o.code,
            Some(1),
            "{name}: qemu-img refused the repair, ours did not\nours:\n{}\nqemu-img:\n{}",
            o.describe(),
            q.describe()
        );
        assert!(
            o.stderr_str().contains("Check failed"),
            "{name}: no clear error:\n{}",
            o.describe()
        );
    }
    // No more corruptions than before.
    let (left, after_check) = corruptions(&ours);
    match (found, left) {
        (Some(f), Some(l)) => assert!(
            l <= f,
            "{name}: {f} corruptions before our repair, {l} after\nbefore:\n{}\nafter:\n{}\nours:\n{}",
            q_check.describe(),
            after_check.describe(),
            o.describe()
        ),
        (None, _) => {}
        (Some(_), None) => panic!(
            "{name}: qemu-img could check the image before our repair, not after:\n{}",
            after_check.describe()
        ),
    }
    // Guest data as qemu-img reads it is unchanged wherever our repair succeeded (and qemu-img could read
    // it before).
    if o.code != Some(1) {
        let orig = s.path("orig.qcow2");
        std::fs::write(&orig, &before).unwrap();
        let readable = qemu_img([
            "convert".as_ref(),
            "-U".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            orig.as_os_str(),
            s.path("probe.raw").as_os_str(),
        ])
        .success();
        if readable {
            let cmp = qemu_img([
                "compare".as_ref(),
                "-U".as_ref(),
                orig.as_os_str(),
                ours.as_os_str(),
            ]);
            assert_eq!(
                cmp.code,
                Some(0),
                "{name}: guest data changed by our repair:\n{}",
                cmp.describe()
            );
        }
    }
}
