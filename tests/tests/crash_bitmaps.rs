//! Power loss while persistent bitmaps change: guest writes that keep enabled bitmaps up to date, and the
//! `qemu-img bitmap` actions (add, remove, clear, enable, disable, merge). Every crash state must open, be
//! clean for an independent refcount counter and for `qemu-img check` (leaks allowed), read the old or the
//! new data, and hold bitmaps that are either marked in use (never trusted) or consistent with exactly the
//! bits before or after the operation. The crash states are built as in `crash_write`.

use qcow2_tests::bitmaps::{AUTO, Bitmap, IN_USE, bits_of, decode};
use qcow2_tests::crash::SimDevice;
use qcow2_tests::crash_harness::{CELL, exactly, open_recorded, states_of, verify_sampled};
use qcow2_tests::{Scratch, guest_view, qemu_img_ok, qemu_io_cmds};

/// Power loss while writes keep persistent bitmaps up to date (clusters of 512 B, where a write covers a
/// whole bitmap cluster and its table entry becomes "all ones", and 4 KiB; eager and lazy refcounts): every
/// crash state opens, `qemu-img check` finds no corruption, the data is old or new, and each enabled bitmap
/// is either marked in use (inconsistent, never trusted) or consistent with exactly the bits before the
/// session or exactly those after it; the disabled bitmap never changes.
#[test]
fn crash_bitmap_writes() {
    let s = Scratch::new();
    let size = 4u64 << 20;
    let writes: [(u64, usize, u8); 4] = [
        (0, 4096, 1),
        (2 << 20, 2 << 20, 2),
        (384 << 10, 128, 3),
        (1 << 20, 65536, 4),
    ];
    let mut total = 0;
    for opts in [
        "cluster_size=512",
        "cluster_size=4096",
        "cluster_size=4096,lazy_refcounts=on",
    ] {
        let img = s.qcow2("b.qcow2", opts, size);
        let p = img.to_str().unwrap();
        qemu_img_ok(["bitmap", "--add", "-g", "4096", p, "on"]);
        qemu_img_ok(["bitmap", "--add", "--disable", p, "off"]);
        qemu_img_ok(["bitmap", "--add", "-g", "512", p, "fine"]);
        qemu_io_cmds(
            &img,
            "qcow2",
            &[
                "write -P 9 2M 8k".to_string(),
                "write -P 8 3M 1k".to_string(),
            ],
        );
        let initial = std::fs::read(&img).unwrap();
        let before = decode(&initial);
        let mut after = before.clone();
        for b in after.iter_mut().filter(|b| b.flags & 2 != 0) {
            for &(off, len, _) in &writes {
                b.bits
                    .extend(bits_of(b.granularity_bits, off, len as u64, size));
            }
            b.bits
                .extend(bits_of(b.granularity_bits, 3 << 20, 4096, size));
        }
        let mut allowed = exactly(&guest_view(&img));
        for &(off, len, byte) in &writes {
            for cell in &mut allowed[off as usize / CELL..(off as usize + len) / CELL] {
                cell.add(byte);
            }
        }
        for cell in &mut allowed[(3 << 20) / CELL..((3 << 20) + 4096) / CELL] {
            cell.add(0);
        }
        let states = states_of(&initial, |dev| {
            let mut image = open_recorded(dev, None);
            for &(off, len, byte) in &writes {
                image.write_at(off, &vec![byte; len]).unwrap();
            }
            image.write_zeroes(3 << 20, 4096, false).unwrap();
            image.close().unwrap();
        });
        let last = states.len() - 1;
        for (i, (state, what)) in states.iter().enumerate() {
            let what = format!("bitmap writes ({opts}): {what}");
            total += 1;
            let checked =
                verify_sampled(&s, state, &None, &allowed, &what, i == last || i % 7 == 0);
            let now = decode(&checked);
            assert_eq!(now.len(), 3, "{what}");
            for ((b, old), new) in now.iter().zip(&before).zip(&after) {
                if b.flags & IN_USE != 0 && i != last {
                    continue;
                }
                assert_eq!(b.flags, old.flags, "{what}: bitmap {}", b.name);
                if i == last {
                    assert_eq!(
                        b.bits, new.bits,
                        "{what}: bitmap {} after the close",
                        b.name
                    );
                } else {
                    assert!(
                        b.bits == old.bits || b.bits == new.bits,
                        "{what}: consistent bitmap {} with bits that are neither the old nor the new",
                        b.name
                    );
                }
            }
        }
    }
    qcow2_tests::record_evidence(
        "crash_write-bitmaps",
        &format!("crash_write bitmap writes: {total} crash states checked, 0 violations"),
    );
}

/// Whether the bitmaps `now` of a crash state are `expected`, where a bitmap marked in use counts as any
/// content (QEMU never trusts it).
fn matches(now: &[Bitmap], expected: &[Bitmap]) -> bool {
    now.len() == expected.len()
        && now.iter().zip(expected).all(|(n, e)| {
            n.name == e.name
                && n.granularity_bits == e.granularity_bits
                && (n.flags & IN_USE != 0 || (n.flags == e.flags && n.bits == e.bits))
        })
}

/// Power loss during each `qemu-img bitmap` action through the engine (add, remove, clear, enable, merge),
/// with clusters of 512 B (bitmaps of several clusters) and 4 KiB (eager and lazy refcounts): every crash
/// state is consistent, reads the same data, and has the bitmaps from before the action or after it (an
/// in-use one counting as either); the state after the close has exactly the bitmaps after it.
#[test]
fn crash_bitmap_edits() {
    let s = Scratch::new();
    let size = 4u64 << 20;
    let mut total = 0;
    type Edit = fn(&mut qcow2_tests::crash_harness::Img);
    let edits: [(&str, Edit); 6] = [
        ("add", |i| {
            i.add_bitmap(&qcow2_core::write::NewBitmap {
                name: "n",
                granularity_bits: 12,
                enabled: true,
            })
            .unwrap()
        }),
        ("remove", |i| i.remove_bitmap("a").unwrap()),
        ("clear", |i| i.clear_bitmap("a").unwrap()),
        ("enable", |i| i.set_bitmap_enabled("d", true).unwrap()),
        ("disable", |i| i.set_bitmap_enabled("a", false).unwrap()),
        ("merge", |i| i.merge_bitmap("d", "a").unwrap()),
    ];
    for opts in [
        "cluster_size=512",
        "cluster_size=4096",
        "cluster_size=4096,lazy_refcounts=on",
    ] {
        let img = s.qcow2("e.qcow2", opts, size);
        let p = img.to_str().unwrap();
        qemu_img_ok(["bitmap", "--add", "-g", "512", p, "a"]);
        qemu_img_ok(["bitmap", "--add", "-g", "512", p, "d"]);
        qemu_io_cmds(
            &img,
            "qcow2",
            &[
                "write -P 1 0 64k".to_string(),
                "write -P 2 2M 1M".to_string(),
            ],
        );
        qemu_img_ok(["bitmap", "--disable", p, "d"]);
        qemu_io_cmds(&img, "qcow2", &["write -P 3 3M 4k".to_string()]);
        let initial = std::fs::read(&img).unwrap();
        let before = decode(&initial);
        let allowed = exactly(&guest_view(&img));
        for (what, edit) in edits {
            let mut after = before.clone();
            match what {
                "add" => after.push(Bitmap {
                    name: "n".into(),
                    flags: AUTO,
                    granularity_bits: 12,
                    bits: Default::default(),
                }),
                "remove" => {
                    after.remove(0);
                }
                "clear" => after[0].bits.clear(),
                "enable" => after[1].flags = AUTO,
                "disable" => after[0].flags = 0,
                _ => {
                    let a = after[0].bits.clone();
                    assert!(!a.is_subset(&after[1].bits), "the merge adds bits");
                    after[1].bits.extend(a);
                }
            }
            let states = states_of(&initial, |dev| {
                let mut image = open_recorded(dev, None);
                edit(&mut image);
                image.close().unwrap();
            });
            let last = states.len() - 1;
            for (i, (state, how)) in states.iter().enumerate() {
                let label = format!("bitmap {what} ({opts}): {how}");
                total += 1;
                let checked =
                    verify_sampled(&s, state, &None, &allowed, &label, i == last || i % 5 == 0);
                let now = decode(&checked);
                if i == last {
                    assert_eq!(now, after, "{label}: bitmaps after the close");
                } else {
                    assert!(
                        matches(&now, &before) || matches(&now, &after),
                        "{label}: bitmaps neither before nor after:\n{now:?}"
                    );
                }
            }
        }
        // The writes of the session after an addition set the new bitmap's bits too.
        let states = states_of(&initial, |dev| {
            let mut image = open_recorded(dev, None);
            edits[0].1(&mut image);
            image.write_at(1 << 20, &[9u8; 8192]).unwrap();
            image.close().unwrap();
        });
        let (state, _) = states.last().unwrap();
        let n = decode(state).into_iter().find(|b| b.name == "n").unwrap();
        assert_eq!(n.bits, bits_of(12, 1 << 20, 8192, size).collect());
    }
    qcow2_tests::record_evidence(
        "crash_bitmaps-edits",
        &format!("crash_bitmaps edits: {total} crash states checked, 0 violations"),
    );
}

/// Power loss while an image with bitmaps grows (its bitmap table outgrows its cluster and moves) and
/// shrinks (an "all ones" entry is cut to the bits that stay): every crash state is consistent, reads the
/// data that both sizes share, and has the bitmaps from before or after (an in-use one counting as either).
#[test]
fn crash_bitmap_resize() {
    let s = Scratch::new();
    let mut total = 0;
    // The "all ones" entry comes from marking the bitmap (14 to 16 MiB) rather than from writing 2 MiB of
    // data, which would make every crash state a large image.
    for (from, to) in [(16u64 << 20, 136u64 << 20), (16 << 20, 15 << 20)] {
        let img = s.qcow2("r.qcow2", "cluster_size=512", from);
        let p = img.to_str().unwrap();
        qemu_img_ok(["bitmap", "--add", "-g", "512", p, "a"]);
        qemu_img_ok(["bitmap", "--add", "-g", "64k", "--disable", p, "d"]);
        let initial = {
            let dev = SimDevice {
                data: std::fs::read(&img).unwrap(),
                id: 0,
                log: Default::default(),
                read_only: false,
            };
            let mut image = open_recorded(dev, None);
            image.write_at(14 << 20, &[7u8; 65536]).unwrap();
            let a = image.find_bitmap(b"a").unwrap().unwrap();
            image.mark_bitmap(&a, 14 << 20, 2 << 20).unwrap();
            image.close().unwrap().data
        };
        std::fs::write(&img, &initial).unwrap();
        let before = decode(&initial);
        let view = guest_view(&img);
        let allowed = exactly(&view[..(from.min(to)) as usize]);
        let states = states_of(&initial, |dev| {
            let mut image = open_recorded(dev, None);
            image.resize(to).unwrap();
            image.close().unwrap();
        });
        let after = decode(&states.last().unwrap().0);
        assert_eq!(after.len(), 2);
        assert!(after.iter().all(|b| b.flags & IN_USE == 0));
        let last = states.len() - 1;
        for (i, (state, how)) in states.iter().enumerate() {
            let label = format!("resize {from} -> {to}: {how}");
            total += 1;
            let checked =
                verify_sampled(&s, state, &None, &allowed, &label, i == last || i % 5 == 0);
            let now = decode(&checked);
            assert!(
                matches(&now, &before) || matches(&now, &after),
                "{label}: bitmaps neither before nor after:\n{now:?}"
            );
        }
        let expected: Vec<u64> = bits_of(9, 14 << 20, 2 << 20, to).collect();
        assert_eq!(
            after[0].bits,
            expected.into_iter().collect(),
            "resize to {to}"
        );
    }
    qcow2_tests::record_evidence(
        "crash_bitmaps-resize",
        &format!("crash_bitmaps resize: {total} crash states checked, 0 violations"),
    );
}
