//! `qcow2 rebase` against `qemu-img rebase` on copies of the same chains: safe mode onto another qcow2
//! backing file (shorter than the image), a raw one, none (`-b ""`) and the backing file's own backing file;
//! unsafe mode (`-u`) with a new name and with none; on images of several cluster sizes, extended L2 and
//! version 2. The results are byte-identical, `qemu-img check` is clean, and in safe mode the guest sees
//! what it saw through the old chain (`qemu-img compare`). With `-c` (compressed copies, whose deflate
//! streams differ between implementations) the guest view and the check are compared. Every mistake gives
//! qemu-img's message and exit code.

use std::path::Path;

use qcow2_tests::{
    Output, Scratch, assert_files_equal, qcow2, qemu_img, qemu_img_ok, qemu_io_cmds,
};

fn rebase(tool: fn(&[&str]) -> Output, args: &[&str], file: &Path) -> Output {
    let mut all = vec!["rebase"];
    all.extend_from_slice(args);
    all.push(file.to_str().unwrap());
    tool(&all)
}

/// Runs `rebase ARGS` with both tools on copies of `img` (in the same directory); compares exit codes,
/// messages and the files; checks the result and, in safe mode, that the guest view did not change.
fn both(s: &Scratch, img: &Path, args: &[&str], identical: bool, what: &str) {
    let (ours, theirs) = (s.path("ours.qcow2"), s.path("theirs.qcow2"));
    std::fs::copy(img, &ours).unwrap();
    std::fs::copy(img, &theirs).unwrap();
    let o = rebase(|a| qcow2(a), args, &ours);
    let t = rebase(|a| qemu_img(a), args, &theirs);
    let what = format!("{what}: rebase {args:?}");
    assert_eq!(
        o.code,
        t.code,
        "{what}:\n{}\n{}",
        o.describe(),
        t.describe()
    );
    assert_eq!(o.stderr_as_ours(), t.stderr_as_ours(), "{what}: messages");
    assert_eq!(o.stdout_str(), t.stdout_str(), "{what}: output");
    if !o.success() {
        assert_files_equal(&ours, img, &format!("{what} (refused: unchanged)"));
        return;
    }
    if identical {
        assert_files_equal(&ours, &theirs, &what);
    }
    if !args.iter().any(|a| a.starts_with("/an/")) {
        // (A backing file that does not exist cannot be opened to check the image.)
        let c = qemu_img(["check".as_ref(), ours.as_os_str()]);
        assert_eq!(c.code, Some(0), "{what}: {}", c.describe());
    }
    if !args.contains(&"-u") {
        let cmp = qemu_img(["compare".as_ref(), img.as_os_str(), ours.as_os_str()]);
        assert_eq!(
            cmp.code,
            Some(0),
            "{what}: the guest view changed: {}",
            cmp.describe()
        );
    }
}

#[test]
fn results_match_qemu_img() {
    let s = Scratch::new();
    let grand = s.qcow2("grand.qcow2", "cluster_size=4096", 8 << 20);
    qemu_io_cmds(
        &grand,
        "qcow2",
        &["write -P 7 0 8M".to_string(), "write -z 2M 1M".to_string()],
    );
    let base = s.create(
        "base.qcow2",
        "qcow2",
        "",
        8 << 20,
        Some(("grand.qcow2", "qcow2")),
    );
    qemu_io_cmds(
        &base,
        "qcow2",
        &[
            "write -P 1 0 3M".to_string(),
            "write -P 2 5M 1M".to_string(),
            "write -z 6M 512k".to_string(),
        ],
    );
    let other = s.qcow2("other.qcow2", "", 6 << 20);
    qemu_io_cmds(
        &other,
        "qcow2",
        &[
            "write -P 1 0 1M".to_string(),
            "write -P 3 1M 1M".to_string(),
            "write -P 2 5M 512k".to_string(),
        ],
    );
    s.create("other.raw", "raw", "", 8 << 20, None);
    for opts in [
        "cluster_size=65536",
        "cluster_size=4096",
        "cluster_size=512",
        "cluster_size=2M",
        "cluster_size=65536,extended_l2=on",
        "compat=0.10",
        "cluster_size=4096,lazy_refcounts=on",
    ] {
        let img = s.create(
            "top.qcow2",
            "qcow2",
            opts,
            8 << 20,
            Some(("base.qcow2", "qcow2")),
        );
        qemu_io_cmds(
            &img,
            "qcow2",
            &[
                "write -P 9 512k 100k".to_string(),
                "write -P 8 4M 64k".to_string(),
                "write -z 7M 64k".to_string(),
            ],
        );
        for args in [
            vec!["-b", "other.qcow2", "-F", "qcow2"],
            vec!["-b", "other.raw", "-F", "raw"],
            vec!["-b", ""],
            vec!["-b", "grand.qcow2", "-F", "qcow2"],
            vec!["-u", "-b", "other.qcow2", "-F", "qcow2"],
            vec!["-u", "-b", "/an/absolute/name.qcow2", "-F", "qcow2"],
            vec!["-u"],
            vec!["-u", "-b", ""],
            vec![
                "-q",
                "-p",
                "-t",
                "none",
                "-T",
                "writeback",
                "-b",
                "other.qcow2",
                "-F",
                "qcow2",
            ],
        ] {
            both(&s, &img, &args, true, opts);
        }
        if !opts.contains("extended_l2") {
            // qemu-img 10 aborts on -c with extended L2 entries.
            both(
                &s,
                &img,
                &["-c", "-b", "other.qcow2", "-F", "qcow2"],
                false,
                opts,
            );
        }
    }
}

#[test]
fn mistakes_match_qemu_img() {
    let s = Scratch::new();
    let base = s.qcow2("base.qcow2", "", 1 << 20);
    let img = s.create(
        "top.qcow2",
        "qcow2",
        "",
        1 << 20,
        Some(("base.qcow2", "qcow2")),
    );
    let raw = s.create("plain.raw", "raw", "", 1 << 20, None);
    let _ = base;
    for args in [
        vec![],
        vec!["-b", "base.qcow2"],
        vec!["-u", "-b", "base.qcow2"],
        vec!["-b", "base.qcow2", "-F", "bogus"],
        vec!["-b", "missing.qcow2", "-F", "qcow2"],
        vec!["-b", "base.qcow2", "-F", "qcow2", "extra.qcow2"],
        vec!["-x"],
        vec!["--backing"],
    ] {
        both(&s, &img, &args, true, "top");
    }
    let o = rebase(
        |a| qcow2(a),
        &["-f", "raw", "-b", "base.qcow2", "-F", "qcow2"],
        &raw,
    );
    let t = rebase(
        |a| qemu_img(a),
        &["-f", "raw", "-b", "base.qcow2", "-F", "qcow2"],
        &raw,
    );
    assert_eq!((o.code, o.stderr_as_ours()), (t.code, t.stderr_as_ours()));
    let help = qcow2(["rebase", "--help"]);
    assert_eq!(help.code, Some(0));
    assert!(help.stdout_str().contains("qcow2 rebase"));
    qemu_img_ok(["check", img.to_str().unwrap()]);
}
