//! `qcow2 measure` against `qemu-img measure`: the same text and JSON, for `--size` with qcow2 options
//! (cluster sizes, refcount widths, extended L2, compat, preallocation, a backing file), for raw and qcow2
//! sources (holes, zero clusters, a backing chain, persistent bitmaps, an internal snapshot), for encrypted
//! targets (the LUKS area of each cipher, legacy AES), and the same message and exit code for every
//! mistake.

use qcow2_tests::{Output, Scratch, noise, qcow2, qemu_img, qemu_img_ok, qemu_io_cmds, write_at};

/// Exit code, stdout, and stderr with the program name taken off every line (without qemu-img's "Try
/// 'qemu-img measure --help'" line after a usage error, which the tool does not print).
fn text(out: &Output) -> (Option<i32>, String, String) {
    let err: Vec<String> = out
        .messages()
        .into_iter()
        .filter(|l| !l.starts_with("Try '"))
        .collect();
    (out.code, out.stdout_str(), err.join("\n"))
}

fn same(args: &[&str]) {
    let mut all = vec!["measure"];
    all.extend_from_slice(args);
    let (o, t) = (qcow2(&all), qemu_img(&all));
    assert_eq!(text(&o), text(&t), "measure {args:?}");
}

/// An encrypted target adds its LUKS area, in whole clusters, to both sizes; a missing or unknown secret
/// and legacy AES (no secret asked for) as qemu-img answers them.
#[test]
fn encrypted_targets_match_qemu_img() {
    let secret = "secret,id=s0,data=measure";
    for size in ["0", "1G", "100G"] {
        for o in [
            "encrypt.format=luks,encrypt.key-secret=s0",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg=aes-128",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc",
            "encrypt.format=luks,encrypt.key-secret=s0,cluster_size=512",
            "encrypt.format=luks,encrypt.key-secret=s0,cluster_size=2M,preallocation=full",
            "encrypt.format=luks",
            "encrypt.format=luks,encrypt.key-secret=nope",
            "encrypt.format=aes",
            "encryption=on",
        ] {
            same(&["--object", secret, "-O", "qcow2", "-o", o, "--size", size]);
            same(&[
                "--object",
                secret,
                "--output=json",
                "-O",
                "qcow2",
                "-o",
                o,
                "--size",
                size,
            ]);
        }
    }
}

#[test]
fn sizes_match_qemu_img() {
    for size in ["0", "1000", "1G", "100G", "1T"] {
        same(&["--size", size]);
        same(&["--output=json", "--size", size]);
        for o in [
            "",
            "cluster_size=512",
            "cluster_size=4k,refcount_bits=1",
            "cluster_size=2M,refcount_bits=64",
            "extended_l2=on",
            "extended_l2=on,cluster_size=16k",
            "compat=0.10",
            "preallocation=metadata",
            "preallocation=falloc",
            "preallocation=full",
            "backing_file=x.qcow2",
            "refcount_bits=8,lazy_refcounts=on",
        ] {
            let mut args = vec!["-O", "qcow2", "--size", size];
            if !o.is_empty() {
                args.extend(["-o", o]);
            }
            same(&args);
        }
    }
    same(&["-O", "qcow2", "-o", "size=5G"]);
    same(&[
        "--output=json",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=64k",
        "-o",
        "size=3G",
    ]);
}

#[test]
fn sources_match_qemu_img() {
    let s = Scratch::new();
    let raw = s.path("holes.raw");
    write_at(&raw, 0, &noise(1, 300_000));
    write_at(&raw, 5 << 20, &noise(2, 70_000));
    write_at(&raw, (9 << 20) - 1, &[1]);
    let base = s.qcow2("base.qcow2", "cluster_size=4096", 8 << 20);
    qemu_io_cmds(
        &base,
        "qcow2",
        &[
            "write -P 0x11 0 1M".to_string(),
            "write -z 2M 1M".to_string(),
            "write -P 0x22 3001k 5k".to_string(),
        ],
    );
    qemu_img_ok(["snapshot", "-c", "snap", base.to_str().unwrap()]);
    qemu_io_cmds(&base, "qcow2", &["write -P 0x33 6M 1M".to_string()]);
    let top = s.path("top.qcow2");
    qemu_img_ok([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    qemu_io_cmds(&top, "qcow2", &["write -P 0x44 7M 100k".to_string()]);
    let bm = s.qcow2("bitmaps.qcow2", "", 100 << 20);
    for (name, g) in [("b", None), ("a-longer-bitmap-name", Some("4k"))] {
        let mut args = vec!["bitmap", "--add"];
        if let Some(g) = g {
            args.extend(["-g", g]);
        }
        args.extend([bm.to_str().unwrap(), name]);
        qemu_img_ok(&args);
    }
    let v2 = s.qcow2("v2.qcow2", "compat=0.10", 4 << 20);
    qemu_io_cmds(&v2, "qcow2", &["write -P 0x55 1M 1M".to_string()]);
    for src in [&raw, &base, &top, &bm, &v2] {
        let f = src.to_str().unwrap();
        for args in [
            vec![f],
            vec!["--output=json", f],
            vec!["-O", "qcow2", f],
            vec!["-O", "qcow2", "--output=json", f],
            vec!["-O", "qcow2", "-o", "cluster_size=4k", f],
            vec!["-O", "qcow2", "-o", "compat=0.10", f],
            vec!["-O", "qcow2", "-o", "extended_l2=on,cluster_size=32k", f],
            vec!["-O", "qcow2", "-o", "preallocation=full", f],
            vec!["-O", "qcow2", "-o", "backing_file=x.qcow2", f],
        ] {
            same(&args);
        }
    }
    same(&["-O", "qcow2", "-l", "snap", base.to_str().unwrap()]);
    same(&[
        "-O",
        "qcow2",
        "-l",
        "snapshot.name=snap",
        base.to_str().unwrap(),
    ]);
    same(&["-O", "qcow2", "-f", "raw", raw.to_str().unwrap()]);
}

#[test]
fn mistakes_match_qemu_img() {
    let s = Scratch::new();
    let img = s.qcow2("img.qcow2", "", 1 << 20);
    let f = img.to_str().unwrap();
    for args in [
        &[][..],
        &["-f", "raw"],
        &["-l", "x"],
        &["--size", "1G", f],
        &[f, f],
        &["--size", "abc"],
        &["--size", "-1"],
        &["--output=xml", "--size", "1"],
        &["-O", "foo", "--size", "1G"],
        &["-O", "qcow2", "-o", "foo=bar", "--size", "1G"],
        &["-O", "raw", "-o", "cluster_size=4k", "--size", "1G"],
        &["-O", "qcow2", "-o", "cluster_size=abc", "--size", "1G"],
        &["-O", "qcow2", "-o", "lazy_refcounts=maybe", "--size", "1G"],
        &["-O", "qcow2", "-o", "refcount_bits=x", "--size", "1G"],
        &["-O", "qcow2", "-o", "cluster_size=3000", "--size", "1G"],
        &["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1G"],
        &[
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=8",
            "--size",
            "1G",
        ],
        &["-O", "qcow2", "-o", "compat=2", "--size", "1G"],
        &["-O", "qcow2", "-o", "preallocation=bogus", "--size", "1G"],
        &[
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=4k",
            "--size",
            "1G",
        ],
        &["-O", "qcow2", "-o", "cluster_size=512", "--size", "100T"],
        &["-l", "nope", f],
        &["-l", "snapshot.idx=1", f],
        &["missing.qcow2"],
    ] {
        same(args);
        let mut all = vec!["measure"];
        all.extend_from_slice(args);
        assert_eq!(qcow2(&all).code, Some(1), "{args:?}");
    }
}
