//! `qcow2 convert --bitmaps [--skip-broken-bitmaps]` against qemu-img 10: the target gets the source's
//! persistent bitmaps (names, flags, granularities and dirty bits, read by an independent decoder) as
//! qemu-img's does, with the same guest data; qemu-img's messages and exit codes where it refuses (a target
//! or source that cannot hold bitmaps, several sources, an inconsistent bitmap, the options misused).

use std::path::Path;

use qcow2_tests::bitmaps::{IN_USE, decode};
use qcow2_tests::{Output, Scratch, qcow2, qemu_img, qemu_img_ok, qemu_io_cmds};

fn run(tool: fn(Vec<String>) -> Output, args: &[&str], dst: &Path) -> Output {
    let mut a: Vec<String> = vec!["convert".into()];
    a.extend(args.iter().map(|s| s.to_string()));
    a.push(dst.to_str().unwrap().into());
    tool(a)
}

fn messages(o: &Output) -> Vec<String> {
    o.messages()
        .into_iter()
        .filter(|m| !m.starts_with("Try '"))
        .map(|m| m.replace("qemu-img", "qcow2"))
        .collect()
}

/// `convert ARGS DST` through both tools (DST a fresh name each): same code and messages; on success the
/// same bitmaps, the same guest view, and a clean image.
fn both(s: &Scratch, args: &[&str], what: &str) -> i32 {
    let (ours, theirs) = (s.path("ours.img"), s.path("theirs.img"));
    let _ = std::fs::remove_file(&ours);
    let _ = std::fs::remove_file(&theirs);
    let o = run(qcow2, args, &ours);
    let q = run(qemu_img, args, &theirs);
    assert_eq!(
        o.code,
        q.code,
        "{what}:\n{}\n{}",
        o.describe(),
        q.describe()
    );
    assert_eq!(messages(&o), messages(&q), "{what}: messages");
    if o.success() {
        let (a, b) = (
            decode(&std::fs::read(&ours).unwrap()),
            decode(&std::fs::read(&theirs).unwrap()),
        );
        assert!(!a.is_empty(), "{what}: no bitmaps copied");
        assert_eq!(a, b, "{what}: bitmaps");
        let c = qemu_img(["check".as_ref(), ours.as_os_str()]);
        assert_eq!(c.code, Some(0), "{what}: {}", c.describe());
        let cmp = qemu_img(["compare".as_ref(), ours.as_os_str(), theirs.as_os_str()]);
        assert_eq!(cmp.code, Some(0), "{what}: {}", cmp.describe());
    }
    o.code.unwrap_or(-1)
}

#[test]
fn bitmaps_are_copied_as_qemu_img_copies_them() {
    let s = Scratch::new();
    let src = s.qcow2("src.qcow2", "cluster_size=4096", 16 << 20);
    let p = src.to_str().unwrap();
    qemu_img_ok(["bitmap", "--add", "-g", "4k", p, "a"]);
    qemu_img_ok(["bitmap", "--add", "--disable", p, "d"]);
    qemu_io_cmds(
        &src,
        "qcow2",
        &[
            "write -P 1 1M 64k".to_string(),
            "write -P 2 5M 3M".to_string(),
        ],
    );
    qemu_img_ok(["bitmap", "--enable", p, "d"]);
    qemu_img_ok(["bitmap", "--add", "-g", "1M", "--disable", p, "off"]);
    qemu_io_cmds(&src, "qcow2", &["write -P 3 9M 4k".to_string()]);
    let mut ok = 0;
    for args in [
        vec!["--bitmaps", "-O", "qcow2", p],
        vec!["--bitmaps", "-O", "qcow2", "-o", "cluster_size=512", p],
        vec!["--bitmaps", "-O", "qcow2", "-o", "cluster_size=2M", p],
        vec!["--bitmaps", "-c", "-O", "qcow2", p],
        vec!["--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", p],
    ] {
        assert_eq!(both(&s, &args, &format!("{args:?}")), 0);
        ok += 1;
    }
    for args in [
        vec!["--bitmaps", "-O", "raw", p],
        vec!["--bitmaps", "-O", "qcow2", "-o", "compat=0.10", p],
        vec!["--bitmaps", "-O", "qcow2", p, p],
        vec!["--skip-broken-bitmaps", "-O", "qcow2", p],
    ] {
        assert_ne!(both(&s, &args, &format!("{args:?}")), 0);
    }
    // A raw source, and a source with an inconsistent bitmap.
    let raw = s.path("src.raw");
    std::fs::write(&raw, vec![1u8; 1 << 20]).unwrap();
    assert_ne!(
        both(
            &s,
            &["--bitmaps", "-O", "qcow2", raw.to_str().unwrap()],
            "raw source"
        ),
        0
    );
    let mut bytes = std::fs::read(&src).unwrap();
    let bm = decode(&bytes);
    assert_eq!(bm.len(), 3);
    // The directory's second entry ("d", 32 bytes after the first) in use.
    let u32_at =
        |d: &[u8], at: usize| u32::from_be_bytes(d[at..at + 4].try_into().unwrap()) as usize;
    let mut at = u32_at(&bytes, 100);
    while u32_at(&bytes, at) != 0x2385_2875 {
        at += 8 + u32_at(&bytes, at + 4).next_multiple_of(8);
    }
    let dir = u64::from_be_bytes(bytes[at + 24..at + 32].try_into().unwrap()) as usize;
    bytes[dir + 32 + 15] |= IN_USE as u8;
    let broken = s.path("broken.qcow2");
    std::fs::write(&broken, &bytes).unwrap();
    let b = broken.to_str().unwrap();
    assert_ne!(
        both(&s, &["--bitmaps", "-O", "qcow2", b], "inconsistent"),
        0
    );
    assert_eq!(
        both(
            &s,
            &["--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", b],
            "skipped"
        ),
        0
    );
    qcow2_tests::record_evidence(
        "convert_bitmaps",
        &format!(
            "convert --bitmaps: {ok} conversions with qemu-img's bitmaps, 7 refusals with its messages"
        ),
    );
}
