//! `qcow2 convert -l SNAPSHOT`: converting an internal snapshot instead of the active disk, with every form
//! of `-l` qemu-img takes (an ID or a name, `snapshot.id=`, `snapshot.name=`, both), compared byte for byte
//! with qemu-img's output, and its refusals (unknown snapshot, bad parameter, raw source, several sources)
//! with qemu-img's messages and exit codes.

use std::path::Path;

use qcow2_tests::{Output, Scratch, qcow2, qemu_img, qemu_img_ok, qemu_io_cmds};

/// Runs `convert ARGS SRC... OUT` with both tools (outputs `ours.raw` and `qemu.raw`), and returns both
/// results.
fn both(s: &Scratch, args: &[&str], srcs: &[&Path]) -> (Output, Output) {
    let run = |out: &str, tool: fn(&[&str]) -> Output| {
        let out = s.path(out);
        let _ = std::fs::remove_file(&out);
        let mut all = vec!["convert"];
        all.extend_from_slice(args);
        all.extend(srcs.iter().map(|p| p.to_str().unwrap()));
        all.push(out.to_str().unwrap());
        tool(&all)
    };
    (
        run("ours.raw", |a| qcow2(a)),
        run("qemu.raw", |a| qemu_img(a)),
    )
}

#[test]
fn snapshots_convert_as_qemu_img_converts_them() {
    let s = Scratch::new();
    let img = s.qcow2("snap.qcow2", "cluster_size=4096", 4 << 20);
    let cmd = |c: &str| c.to_string();
    qemu_io_cmds(&img, "qcow2", &[cmd("write -P 0x11 0 1M")]);
    qemu_img_ok(["snapshot", "-c", "first", img.to_str().unwrap()]);
    qemu_io_cmds(
        &img,
        "qcow2",
        &[cmd("write -P 0x22 512k 1M"), cmd("write -z 0 64k")],
    );
    qemu_img_ok(["snapshot", "-c", "second", img.to_str().unwrap()]);
    qemu_io_cmds(
        &img,
        "qcow2",
        &[cmd("write -P 0x33 3M 256k"), cmd("discard 512k 64k")],
    );
    let active = s.path("active.raw");
    qemu_img_ok([
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        active.to_str().unwrap(),
    ]);
    let mut seen = Vec::new();
    for spec in [
        "first",
        "1",
        "second",
        "2",
        "snapshot.id=1",
        "snapshot.name=second",
        "snapshot.id=2,snapshot.name=second",
    ] {
        let (ours, qemu) = both(&s, &["-O", "raw", "-l", spec], &[&img]);
        assert!(ours.success(), "-l {spec}: {}", ours.describe());
        assert!(qemu.success(), "-l {spec}: {}", qemu.describe());
        let ours_bytes = std::fs::read(s.path("ours.raw")).unwrap();
        qcow2_tests::assert_bytes_equal(
            &ours_bytes,
            &std::fs::read(s.path("qemu.raw")).unwrap(),
            &format!("convert -l {spec}"),
        );
        assert_ne!(
            ours_bytes,
            std::fs::read(&active).unwrap(),
            "-l {spec} gave the active disk"
        );
        seen.push(ours_bytes);
    }
    assert_ne!(seen[0], seen[2], "both snapshots read the same");
    // To qcow2: the guest view is the snapshot's.
    let out = s.path("snap1.qcow2");
    let conv = qcow2([
        "convert",
        "-O",
        "qcow2",
        "-l",
        "first",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(conv.success(), "{}", conv.describe());
    let first = s.path("first.raw");
    std::fs::write(&first, &seen[0]).unwrap();
    let cmp = qemu_img([
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        first.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(cmp.code, Some(0), "{}", cmp.describe());
    assert_eq!(
        qemu_img(["check", out.to_str().unwrap()]).code,
        Some(0),
        "check"
    );

    // Refusals: the same messages and exit codes.
    let raw = s.path("plain.raw");
    std::fs::write(&raw, vec![0u8; 65536]).unwrap();
    for (args, srcs) in [
        (vec!["-l", "third"], vec![img.as_path()]),
        (vec!["-l", "snapshot.id=1,snapshot.name=second"], vec![&img]),
        (vec!["-l", "snapshot.idx=1"], vec![&img]),
        (vec!["-l", "snapshot.id=1,size=2"], vec![&img]),
        (vec!["-l", "first"], vec![&img, &img]),
        (vec!["-f", "raw", "-l", "first"], vec![&raw]),
    ] {
        let (ours, qemu) = both(&s, &args, &srcs);
        assert_eq!(ours.code, qemu.code, "{args:?}: {}", ours.describe());
        assert_eq!(ours.code, Some(1), "{args:?}: {}", ours.describe());
        assert_eq!(ours.messages(), qemu.messages(), "{args:?}");
        assert!(
            !s.path("ours.raw").exists(),
            "{args:?}: a refused conversion left its output"
        );
    }
}
