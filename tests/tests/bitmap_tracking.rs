//! Persistent dirty bitmaps kept up to date by our writes, compared with QEMU's: the same qemu-io commands
//! run through `qcow2 io` and through qemu-io on copies of one image with enabled, disabled and in-use
//! bitmaps must leave the same bitmaps (names, flags, granularities and dirty bits, read by an independent
//! decoder), the same guest view, and an image `qemu-img check` finds clean. Operations that change the
//! whole guest view (`snapshot -a`, `commit`'s emptying) set every bit; a downgrade to version 2 drops them.

use std::ffi::OsString;
use std::path::Path;

use qcow2_tests::bitmaps::{AUTO, Bitmap, IN_USE, bits_of, decode};
use qcow2_tests::{Scratch, qcow2, qcow2_ok, qemu_img, qemu_img_ok, qemu_io_cmds};

fn bitmaps(path: &Path) -> Vec<Bitmap> {
    decode(&std::fs::read(path).unwrap())
}

fn ours_io(img: &Path, cmds: &[String]) {
    let mut args: Vec<OsString> = vec!["io".into(), "-f".into(), "qcow2".into()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.into());
    }
    args.push(img.into());
    let out = qcow2(&args);
    assert!(
        out.success() && !out.stdout_str().contains("failed"),
        "qcow2 io failed:\n{}",
        out.describe()
    );
}

fn assert_check_clean(img: &Path) {
    let out = qemu_img(["check".as_ref(), img.as_os_str()]);
    assert_eq!(out.code, Some(0), "qemu-img check:\n{}", out.describe());
}

fn assert_same_guest(a: &Path, b: &Path) {
    let out = qemu_img(["compare".as_ref(), a.as_os_str(), b.as_os_str()]);
    assert_eq!(out.code, Some(0), "guest views differ:\n{}", out.describe());
}

/// An image with three bitmaps: `on` (enabled, granularity `g`), `off` (disabled) and `fine` (enabled,
/// 512-byte granularity), some of whose bits QEMU set already.
fn image(s: &Scratch, name: &str, opts: &str, size: u64, g: u64) -> std::path::PathBuf {
    let img = s.qcow2(name, opts, size);
    let p = img.to_str().unwrap();
    qemu_img_ok(["bitmap", "--add", "-g", &g.to_string(), p, "on"]);
    qemu_img_ok(["bitmap", "--add", "--disable", p, "off"]);
    qemu_img_ok(["bitmap", "--add", "-g", "512", p, "fine"]);
    qemu_io_cmds(&img, "qcow2", &["write -P 5 0 3k".to_string()]);
    img
}

/// The same commands through both tools leave the same bitmaps; ours is clean and reads the same.
fn same_as_qemu(s: &Scratch, opts: &str, size: u64, g: u64, cmds: &[String]) -> Vec<Bitmap> {
    let ours = image(s, "ours.qcow2", opts, size, g);
    let theirs = s.path("theirs.qcow2");
    std::fs::copy(&ours, &theirs).unwrap();
    ours_io(&ours, cmds);
    qemu_io_cmds(&theirs, "qcow2", cmds);
    assert_check_clean(&ours);
    assert_same_guest(&ours, &theirs);
    let (a, b) = (bitmaps(&ours), bitmaps(&theirs));
    assert_eq!(a.len(), 3, "{opts}: {a:?}");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            (&x.name, x.flags, x.granularity_bits),
            (&y.name, y.flags, y.granularity_bits),
            "{opts}"
        );
        assert_eq!(
            x.bits.len(),
            y.bits.len(),
            "{opts}: bitmap {}: {} dirty bits, qemu-io leaves {}",
            x.name,
            x.bits.len(),
            y.bits.len()
        );
        assert_eq!(x.bits, y.bits, "{opts}: bitmap {}", x.name);
    }
    // qemu-img reads the same flags back.
    let info = |p: &Path| {
        let v: serde_json::Value =
            serde_json::from_str(&qemu_img_ok(["info", "--output=json", p.to_str().unwrap()]))
                .unwrap();
        v["format-specific"]["data"]["bitmaps"].clone()
    };
    assert_eq!(info(&ours), info(&theirs), "{opts}");
    a
}

/// Unaligned writes, zero writes, compressed writes and discards, with clusters of 512 B to 64 KiB (and
/// extended L2), bitmap granularities from 512 B to 1 MiB, and writes that cover whole bitmap clusters.
#[test]
fn writes_set_the_bits_qemu_sets() {
    let s = Scratch::new();
    let cmds: Vec<String> = [
        "write -P 1 100 5",
        "write -P 2 65535 2",
        "write -P 3 1M 192k",
        "write -z 3M 1M",
        "write -z 4608 512",
        "write -c -P 4 6M 2M",
        "discard 7M 64k",
        "write -P 6 8M 4M",
        "write -P 7 15M 1M",
    ]
    .iter()
    .map(|c| c.to_string())
    .collect();
    let mut cases = 0;
    for (opts, g) in [
        ("cluster_size=512", 512u64),
        ("cluster_size=4096", 65536),
        ("cluster_size=65536", 4096),
        ("cluster_size=65536,extended_l2=on", 1 << 20),
        ("cluster_size=2097152", 65536),
    ] {
        let result = same_as_qemu(&s, opts, 16 << 20, g, &cmds);
        // The enabled bitmaps gained the written ranges; the disabled one did not change.
        let on = &result[0];
        assert!(
            bits_of(on.granularity_bits, 1 << 20, 192 << 10, 16 << 20)
                .all(|b| on.bits.contains(&b))
        );
        assert!(result[1].bits.is_empty() && result[1].flags == 0, "{opts}");
        cases += 1;
    }
    qcow2_tests::record_evidence(
        "bitmap_tracking",
        &format!(
            "bitmap tracking: {cases} layouts x {} commands, bits identical to qemu-io's",
            cmds.len()
        ),
    );
}

/// A second session adds to the first one's bits; a bitmap QEMU left in use (inconsistent) is left in use
/// and unchanged, as QEMU leaves it.
#[test]
fn sessions_accumulate_and_in_use_bitmaps_stay() {
    let s = Scratch::new();
    let first = vec!["write -P 1 0 64k".to_string()];
    let second = vec![
        "write -P 2 5M 64k".to_string(),
        "write -P 3 100k 1".to_string(),
    ];
    let ours = image(&s, "ours.qcow2", "cluster_size=65536", 8 << 20, 65536);
    // Mark "fine" in use, as a crash would have left it.
    let mut bytes = std::fs::read(&ours).unwrap();
    let before = decode(&bytes);
    let fine_flags_at = flags_offset(&bytes, "fine");
    bytes[fine_flags_at + 3] |= IN_USE as u8;
    std::fs::write(&ours, &bytes).unwrap();
    let theirs = s.path("theirs.qcow2");
    std::fs::copy(&ours, &theirs).unwrap();
    for cmds in [&first, &second] {
        ours_io(&ours, cmds);
        qemu_io_cmds(&theirs, "qcow2", cmds);
    }
    assert_check_clean(&ours);
    let (a, b) = (bitmaps(&ours), bitmaps(&theirs));
    assert_eq!(a, b);
    assert_eq!(a[2].flags, AUTO | IN_USE);
    assert_eq!(a[2].bits, before[2].bits, "an in-use bitmap is not touched");
    assert_eq!(a[0].flags, AUTO);
    assert!(a[0].bits.contains(&0) && a[0].bits.contains(&80) && a[0].bits.contains(&1));
}

/// Byte offset of the flags of bitmap `name` in the image.
fn flags_offset(img: &[u8], name: &str) -> usize {
    let u32_at = |at: usize| u32::from_be_bytes(img[at..at + 4].try_into().unwrap()) as usize;
    let mut at = u32_at(100);
    while u32_at(at) != 0x2385_2875 {
        at += 8 + u32_at(at + 4).next_multiple_of(8);
    }
    let count = u32_at(at + 8);
    let mut e = u64::from_be_bytes(img[at + 24..at + 32].try_into().unwrap()) as usize;
    for _ in 0..count {
        let name_len = u16::from_be_bytes([img[e + 18], img[e + 19]]) as usize;
        if &img[e + 24..e + 24 + name_len] == name.as_bytes() {
            return e + 12;
        }
        e += (24 + name_len).next_multiple_of(8);
    }
    panic!("no bitmap {name}");
}

/// Applying a snapshot and emptying an overlay (commit) change what the guest sees everywhere: every bit of
/// the enabled bitmaps is set, the disabled one is left alone, and the image is clean.
#[test]
fn whole_disk_changes_set_every_bit() {
    let s = Scratch::new();
    let size = 4u64 << 20;
    let img = image(&s, "a.qcow2", "cluster_size=4096", size, 65536);
    qemu_img_ok(["snapshot", "-c", "snap", img.to_str().unwrap()]);
    qemu_io_cmds(&img, "qcow2", &["write -P 9 1M 64k".to_string()]);
    qcow2_ok(["snapshot", "-a", "snap", img.to_str().unwrap()]);
    assert_check_clean(&img);
    let after = bitmaps(&img);
    for b in [&after[0], &after[2]] {
        let all: Vec<u64> = bits_of(b.granularity_bits, 0, size, size).collect();
        assert_eq!(
            b.bits.len(),
            all.len(),
            "bitmap {} after snapshot -a",
            b.name
        );
        assert_eq!(b.flags, AUTO);
    }
    assert!(after[1].bits.is_empty());

    let base = s.qcow2("base.qcow2", "", size);
    let top = s.create(
        "top.qcow2",
        "qcow2",
        "cluster_size=4096",
        size,
        Some((base.to_str().unwrap(), "qcow2")),
    );
    qemu_img_ok(["bitmap", "--add", top.to_str().unwrap(), "t"]);
    qemu_io_cmds(&top, "qcow2", &["write -P 1 0 64k".to_string()]);
    qcow2_ok(["commit", top.to_str().unwrap()]);
    assert_check_clean(&top);
    assert_check_clean(&base);
    let t = &bitmaps(&top)[0];
    assert_eq!(
        t.bits.len() as u64,
        size >> t.granularity_bits,
        "every bit after the overlay was emptied"
    );
}

/// A downgrade to version 2 drops the bitmaps (version 2 cannot tell a stale bitmap); the image is clean.
#[test]
fn downgrade_drops_bitmaps() {
    let s = Scratch::new();
    let img = image(&s, "d.qcow2", "", 4 << 20, 65536);
    qcow2_ok(["amend", "-o", "compat=0.10", img.to_str().unwrap()]);
    assert_check_clean(&img);
    let info = qemu_img_ok(["info", img.to_str().unwrap()]);
    assert!(!info.contains("bitmaps"), "{info}");
}

/// Resizing keeps the bitmaps as qemu-img's resize does: bits past a shrunk end cleared (an "all ones"
/// entry cut to the bits that stay), the new area clear, tables shortened or lengthened (into new clusters
/// when they outgrow theirs: 512-byte clusters, where a table cluster covers 128 MiB at 512 B a bit); an
/// inconsistent bitmap refuses the resize with qemu-img's message.
#[test]
fn resize_resizes_bitmaps_as_qemu_img() {
    let s = Scratch::new();
    let mut cases = 0;
    for opts in ["cluster_size=512", "cluster_size=65536"] {
        let ours = image(&s, "ours.qcow2", opts, 64 << 20, 65536);
        ours_io(
            &ours,
            &[
                "write -P 1 60M 4M".to_string(),
                "write -P 2 30M 2M".to_string(),
                "write -P 3 63M 512".to_string(),
            ],
        );
        let theirs = s.path("theirs.qcow2");
        std::fs::copy(&ours, &theirs).unwrap();
        for size in ["62M", "1G", "33M", "31M", "200M", "+1M"] {
            let args = |p: &Path| -> Vec<OsString> {
                vec![
                    "resize".into(),
                    "-q".into(),
                    "--shrink".into(),
                    p.into(),
                    size.into(),
                ]
            };
            let o = qcow2(args(&ours));
            let q = qemu_img(args(&theirs));
            assert_eq!(o.code, q.code, "{opts} resize {size}:\n{}", o.describe());
            assert_check_clean(&ours);
            assert_same_guest(&ours, &theirs);
            assert_eq!(bitmaps(&ours), bitmaps(&theirs), "{opts} resize {size}");
            cases += 1;
        }
    }
    // An inconsistent bitmap: qemu-img's refusal, nothing changed.
    let img = image(&s, "u.qcow2", "", 4 << 20, 65536);
    let mut bytes = std::fs::read(&img).unwrap();
    let at = flags_offset(&bytes, "on");
    bytes[at + 3] |= IN_USE as u8;
    std::fs::write(&img, &bytes).unwrap();
    let copy = s.path("u2.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    let o = qcow2(["resize".as_ref(), img.as_os_str(), "8M".as_ref()]);
    let q = qemu_img(["resize".as_ref(), copy.as_os_str(), "8M".as_ref()]);
    assert_eq!((o.code, o.messages()), (q.code, q.messages()));
    assert_eq!(std::fs::read(&img).unwrap(), bytes);
    qcow2_tests::record_evidence(
        "bitmap_tracking-resize",
        &format!("bitmaps resized: {cases} resizes, bits identical to qemu-img's"),
    );
}
