//! `qcow2 info` opens the image alone, as qemu-img does: an overlay whose backing file is missing (or
//! unreadable) is described as qemu-img describes it, in text and JSON; with `--backing-chain` each image
//! of the chain is opened alone in turn, as qemu-img opens them: a missing backing file, a loop or a backing
//! file that is not of its stated format fails with qemu-img's message and prints nothing.

use qcow2_tests::{Scratch, assert_sane, qcow2, qemu_img, qemu_img_ok, run_with_timeout};

#[test]
fn overlay_without_its_backing_file() {
    let s = Scratch::new();
    let base = s.qcow2("b.qcow2", "", 1 << 20);
    for (name, fmt) in [("t.qcow2", "qcow2"), ("r.qcow2", "raw")] {
        let img = s.path(name);
        qemu_img_ok([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            fmt,
            img.to_str().unwrap(),
            "1M",
        ]);
    }
    std::fs::remove_file(&base).unwrap();
    for name in ["t.qcow2", "r.qcow2"] {
        let img = s.path(name);
        let img = img.to_str().unwrap();
        for extra in [&[][..], &["--output=json"][..]] {
            let mut args = vec!["info"];
            args.extend_from_slice(extra);
            args.push(img);
            let (o, t) = (qcow2(&args), qemu_img(&args));
            assert_eq!(o.code, Some(0), "{args:?}: {}", o.describe());
            assert_eq!(t.code, Some(0), "{args:?}: {}", t.describe());
            assert_eq!(o.stdout_str(), t.stdout_str(), "{args:?}");
        }
        let args = ["info", "--backing-chain", img];
        let (o, t) = (qcow2(args), qemu_img(args));
        assert_eq!((o.code, t.code), (Some(1), Some(1)), "{args:?}");
        assert_eq!(o.messages(), t.messages(), "{args:?}");
        assert_eq!(
            (o.stdout_str(), t.stdout_str()),
            (String::new(), String::new())
        );
    }
}

/// Chains qemu-img refuses while it walks them: a loop of two images and of one, a backing file that is
/// not of its stated format, a backing file three levels down that is missing. Each image is named as
/// qemu-img names it (its full backing file name, relative to the directory the tools run in).
#[test]
fn chains_refused_while_walking_them() {
    let s = Scratch::new();
    let sub = s.path("sub");
    std::fs::create_dir(&sub).unwrap();
    let dir = s.dir().to_str().unwrap();
    let qemu = |args: &[&str]| {
        let mut cmd = qcow2_tests::qemu_command("qemu-img");
        let out = cmd.args(args).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    let create = |name: &str, backing: Option<(&str, &str)>| {
        let mut args = vec!["create", "-q", "-f", "qcow2", "-u"];
        if let Some((b, f)) = backing {
            args.extend(["-b", b, "-F", f]);
        }
        args.extend([name, "1M"]);
        qemu(&args);
    };
    // A loop: a -> b -> a; one image backed by itself.
    create("a.qcow2", Some(("b.qcow2", "qcow2")));
    create("b.qcow2", Some(("a.qcow2", "qcow2")));
    create("self.qcow2", None);
    qemu(&[
        "rebase",
        "-u",
        "-b",
        "self.qcow2",
        "-F",
        "qcow2",
        "self.qcow2",
    ]);
    // A qcow2 backing file that says it is raw is described as raw; a raw one that says qcow2 fails.
    std::fs::write(s.path("plain.raw"), vec![7u8; 1 << 20]).unwrap();
    create("sub/says-raw.qcow2", Some(("mid.qcow2", "raw")));
    create("sub/mid.qcow2", Some(("../plain.raw", "raw")));
    create("sub/says-qcow2.qcow2", Some(("../plain.raw", "qcow2")));
    // Three levels, the last one missing.
    create("sub/l1.qcow2", Some(("l2.qcow2", "qcow2")));
    create("sub/l2.qcow2", Some(("../l3.qcow2", "qcow2")));
    create("l3.qcow2", Some(("gone.qcow2", "qcow2")));
    let cases = [
        ("a.qcow2", 1),
        ("b.qcow2", 1),
        ("self.qcow2", 1),
        ("sub/says-raw.qcow2", 0),
        ("sub/mid.qcow2", 0),
        ("sub/says-qcow2.qcow2", 1),
        ("sub/l1.qcow2", 1),
        ("l3.qcow2", 1),
    ];
    for (img, code) in cases {
        for extra in [&[][..], &["--output=json"][..]] {
            let mut args = vec!["info", "--backing-chain"];
            args.extend_from_slice(extra);
            args.push(img);
            let run = |mut cmd: std::process::Command| {
                cmd.args(&args).current_dir(dir);
                run_with_timeout(&mut cmd, std::time::Duration::from_secs(60)).unwrap()
            };
            let o = run(std::process::Command::new(qcow2_tests::qcow2_bin()));
            assert_sane(&o);
            let t = run(qcow2_tests::qemu_command("qemu-img"));
            assert_eq!(
                (o.code, t.code),
                (Some(code), Some(code)),
                "{args:?}: {}",
                t.describe()
            );
            assert_eq!(o.messages(), t.messages(), "{args:?}");
            assert_eq!(
                qcow2_tests::drop_disk_size_lines(&qcow2_tests::blank_actual_size(&o.stdout_str())),
                qcow2_tests::drop_disk_size_lines(&qcow2_tests::blank_actual_size(&t.stdout_str())),
                "{args:?}"
            );
        }
    }
}
