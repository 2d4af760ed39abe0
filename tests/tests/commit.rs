//! `qcow2 commit` against `qemu-img commit` on copies of the same chains (three qcow2 images, or a qcow2
//! image over a raw one): into the backing file (then emptied), with `-d` (kept), with `-b` into the
//! backing file's backing file; zero clusters over data, data that reads as zeros, a base shorter than the
//! image, version 2 and snapshots (emptied by dropping every cluster). Compared: exit codes, output and
//! messages; the emptied image byte for byte; every image of the chain as the guest sees it, which must be
//! what the committed image showed before; `qemu-img check` on every file.

use std::path::{Path, PathBuf};

use qcow2_tests::{
    Output, Scratch, assert_files_equal, guest_view, qcow2, qemu_img, qemu_img_ok, qemu_io_cmds,
};

/// Copies the files `names` of a chain from `from` to `to`.
fn copy_chain(from: &Path, to: &Path, names: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for n in names {
        std::fs::copy(from.join(n), to.join(n)).unwrap();
    }
}

fn run_in(tool: fn(&[&str]) -> Output, dir: &Path, args: &[&str]) -> Output {
    let mut all = vec!["commit"];
    all.extend_from_slice(args);
    let top = dir.join(args.last().unwrap());
    let mut owned: Vec<String> = all.iter().map(|s| s.to_string()).collect();
    *owned.last_mut().unwrap() = top.to_str().unwrap().to_string();
    let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
    tool(&refs)
}

/// Runs `commit ARGS` with both tools, each on its own copy of the chain `names` in `src`.
fn both(s: &Scratch, src: &Path, names: &[&str], args: &[&str], what: &str) {
    let (ours, theirs): (PathBuf, PathBuf) = (s.path("ours"), s.path("theirs"));
    let _ = std::fs::remove_dir_all(&ours);
    let _ = std::fs::remove_dir_all(&theirs);
    copy_chain(src, &ours, names);
    copy_chain(src, &theirs, names);
    let top = *names.last().unwrap();
    let before = guest_view(&src.join(top));
    let o = run_in(|a| qcow2(a), &ours, args);
    let t = run_in(|a| qemu_img(a), &theirs, args);
    let what = format!("{what}: commit {args:?}");
    assert_eq!(
        o.code,
        t.code,
        "{what}:\n{}\n{}",
        o.describe(),
        t.describe()
    );
    assert_eq!(o.stdout_str(), t.stdout_str(), "{what}: output");
    assert_eq!(
        o.stderr_as_ours().replace("/ours/", "/"),
        t.stderr_as_ours().replace("/theirs/", "/"),
        "{what}: messages"
    );
    if !o.success() {
        for n in names {
            assert_files_equal(
                &ours.join(n),
                &src.join(n),
                &format!("{what}: {n} unchanged"),
            );
        }
        return;
    }
    assert_files_equal(
        &ours.join(top),
        &theirs.join(top),
        &format!("{what}: {top}"),
    );
    for n in names {
        let (a, b) = (ours.join(n), theirs.join(n));
        assert_eq!(
            guest_view(&a),
            guest_view(&b),
            "{what}: {n} reads differently from qemu-img's"
        );
        let c = qemu_img(["check".as_ref(), a.as_os_str()]);
        let raw = c.code == Some(63) && c.stderr_str().contains("does not support checks");
        assert!(c.code == Some(0) || raw, "{what}: {n}: {}", c.describe());
    }
    // The committed image still shows what it showed.
    assert!(
        guest_view(&ours.join(top)) == before,
        "{what}: the guest view changed"
    );
}

#[test]
fn results_match_qemu_img() {
    let s = Scratch::new();
    for (opts, base_fmt) in [
        ("cluster_size=65536", "qcow2"),
        ("cluster_size=4096", "qcow2"),
        ("cluster_size=512", "qcow2"),
        ("cluster_size=65536,extended_l2=on", "qcow2"),
        ("compat=0.10", "qcow2"),
        ("cluster_size=65536", "raw"),
    ] {
        let src = s.path("src");
        let _ = std::fs::remove_dir_all(&src);
        std::fs::create_dir_all(&src).unwrap();
        let g = src.join("g.img");
        let mut c = vec!["create", "-q", "-f", base_fmt];
        if base_fmt == "qcow2" {
            c.extend(["-o", opts]);
        }
        c.extend([g.to_str().unwrap(), "6M"]);
        qemu_img_ok(&c);
        qemu_io_cmds(&g, base_fmt, &["write -P 7 0 6M".to_string()]);
        let b = src.join("b.qcow2");
        qemu_img_ok([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            "-b",
            "g.img",
            "-F",
            base_fmt,
            b.to_str().unwrap(),
            "8M",
        ]);
        qemu_io_cmds(&b, "qcow2", &["write -P 1 0 4M".to_string()]);
        let t = src.join("t.qcow2");
        qemu_img_ok([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            t.to_str().unwrap(),
            "8M",
        ]);
        let mut cmds = vec![
            "write -P 3 3M 100k".to_string(),
            "write -P 0 3584k 64k".to_string(),
            "write -P 5 6M 1M".to_string(),
        ];
        if !opts.contains("0.10") {
            cmds.push("write -z 1M 128k".to_string());
            cmds.push("write -z -u 2M 128k".to_string());
        }
        qemu_io_cmds(&t, "qcow2", &cmds);
        let names = ["g.img", "b.qcow2", "t.qcow2"];
        for args in [
            vec!["t.qcow2"],
            vec!["-d", "t.qcow2"],
            vec!["-q", "-p", "-t", "none", "-r", "1M", "t.qcow2"],
            vec!["-b", "g.img", "t.qcow2"],
        ] {
            both(&s, &src, &names, &args, opts);
        }
        if base_fmt == "qcow2" && !opts.contains("0.10") {
            // With a snapshot the image is emptied by dropping every cluster.
            qemu_img_ok(["snapshot", "-c", "s", t.to_str().unwrap()]);
            both(&s, &src, &names, &["t.qcow2"], &format!("{opts}, snapshot"));
        }
    }
}

#[test]
fn mistakes_match_qemu_img() {
    let s = Scratch::new();
    let src = s.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let b = src.join("b.qcow2");
    qemu_img_ok(["create", "-q", "-f", "qcow2", b.to_str().unwrap(), "1M"]);
    let t = src.join("t.qcow2");
    qemu_img_ok([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        t.to_str().unwrap(),
        "1M",
    ]);
    let names = ["b.qcow2", "t.qcow2"];
    for args in [
        vec!["b.qcow2"],
        vec!["-b", "nonexist", "t.qcow2"],
        vec!["-b", "t.qcow2", "t.qcow2"],
        vec!["-r", "1x", "t.qcow2"],
        vec!["-x", "t.qcow2"],
    ] {
        both(&s, &src, &names, &args, "mistake");
    }
    for args in [vec!["commit"], vec!["commit", "a", "b"]] {
        let (o, t) = (qcow2(&args), qemu_img(&args));
        assert_eq!(
            (o.code, o.stderr_as_ours()),
            (t.code, t.stderr_as_ours()),
            "{args:?}"
        );
    }
}
