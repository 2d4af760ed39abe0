//! The `qcow2` tool against the real qemu-img / qemu-io on raw images: same stdout, same exit codes, one-line
//! errors. qemu-img and qemu-io must be installed; these tests fail (they do not skip) when they are missing.

use std::path::Path;

use qcow2_tests::{Scratch, qcow2, qemu_img, qemu_io};

/// A scratch directory whose paths are strings (the tools' arguments here).
struct Dir(Scratch);

impl Dir {
    fn new() -> Dir {
        Dir(Scratch::new())
    }
    fn path(&self, f: &str) -> String {
        self.0.path(f).to_str().unwrap().to_string()
    }
}

/// Runs a QEMU tool through the shared harness (which fails the test when the tool is missing).
fn qemu(tool: &str, args: &[&str]) -> (i32, String, String) {
    let o = match tool {
        "qemu-img" => qemu_img(args),
        "qemu-io" => qemu_io(args),
        other => panic!("unknown QEMU tool {other}"),
    };
    (o.code.unwrap_or(-1), o.stdout_str(), o.stderr_str())
}

/// Runs our tool (the built binary, through the shared harness).
fn tool(args: &[&str]) -> (i32, String, String) {
    let o = qcow2(args);
    (o.code.unwrap_or(-1), o.stdout_str(), o.stderr_str())
}

/// A 4 MiB raw image with data at 1 MiB (0xab), an explicit zero block at 2 MiB and a byte near the end.
fn make_raw(dir: &Dir, name: &str) -> String {
    let p = dir.path(name);
    assert_eq!(
        qemu("qemu-img", &["create", "-q", "-f", "raw", &p, "4M"]).0,
        0
    );
    let (code, _, err) = qemu(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1M 64k",
            "-c",
            "write -P 0 2M 64k",
            "-c",
            "write -P 7 4190000 1",
            &p,
        ],
    );
    assert_eq!(code, 0, "{err}");
    p
}

/// Drops qemu-io's timing line (the numbers differ from run to run).
fn without_timing(s: &str) -> String {
    s.lines()
        .filter(|l| !l.contains(" ops; "))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn info_and_map_match_qemu_img() {
    let dir = Dir::new();
    let img = make_raw(&dir, "a.raw");
    for args in [
        vec!["info", img.as_str()],
        vec!["info", "--output=json", img.as_str()],
        vec!["info", "--backing-chain", "--output=json", img.as_str()],
        vec!["info", "-f", "raw", "--output", "human", img.as_str()],
        vec!["map", img.as_str()],
        vec!["map", "--output=json", img.as_str()],
    ] {
        let (qcode, qout, _) = qemu("qemu-img", &args);
        let (code, out, err) = tool(&args);
        assert_eq!(
            (code, out.as_str()),
            (qcode, qout.as_str()),
            "{args:?}: {err}"
        );
    }
    // Odd-sized and empty files.
    let odd = dir.path("odd.raw");
    std::fs::write(&odd, b"abc").unwrap();
    let empty = dir.path("empty.raw");
    std::fs::write(&empty, b"").unwrap();
    for f in [&odd, &empty] {
        for args in [
            vec!["map", "--output=json", f.as_str()],
            vec!["info", "--output=json", f.as_str()],
        ] {
            assert_eq!(tool(&args).1, qemu("qemu-img", &args).1, "{args:?}");
        }
    }
}

#[test]
fn convert_matches_qemu_img() {
    let dir = Dir::new();
    let img = make_raw(&dir, "a.raw");
    let (ours, theirs) = (dir.path("ours.raw"), dir.path("theirs.raw"));
    let (qcode, qout, _) = qemu("qemu-img", &["convert", "-p", "-O", "raw", &img, &theirs]);
    let (code, out, err) = tool(&["convert", "-p", "-O", "raw", &img, &ours]);
    assert_eq!((code, out.as_str()), (qcode, qout.as_str()), "{err}");
    assert_eq!(
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap()
    );
    // Same holes: qemu-img map of both outputs agrees.
    let map = |f: &str| qemu("qemu-img", &["map", "--output=json", f]).1;
    assert_eq!(map(&ours), map(&theirs));
    assert!(Path::new(&ours).metadata().unwrap().len() == 4 << 20);
}

#[test]
fn compare_matches_qemu_img() {
    let dir = Dir::new();
    let a = make_raw(&dir, "a.raw");
    let b = make_raw(&dir, "b.raw");
    let c = make_raw(&dir, "c.raw");
    assert_eq!(
        qemu("qemu-io", &["-f", "raw", "-c", "write -P 1 3000000 1", &c]).0,
        0
    );
    let big = dir.path("big.raw");
    std::fs::copy(&a, &big).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&big)
        .unwrap()
        .set_len(5 << 20)
        .unwrap();
    let missing = dir.path("missing.raw");
    for args in [
        vec!["compare", a.as_str(), b.as_str()],
        vec!["compare", "-s", a.as_str(), b.as_str()],
        vec!["compare", a.as_str(), c.as_str()],
        vec!["compare", "-q", a.as_str(), c.as_str()],
        vec!["compare", "-s", a.as_str(), c.as_str()],
        vec!["compare", a.as_str(), big.as_str()],
        vec!["compare", "-s", big.as_str(), a.as_str()],
        vec!["compare", "-p", c.as_str(), big.as_str()],
        vec!["compare", a.as_str(), missing.as_str()],
        vec!["compare", "-f", "qcow2", a.as_str(), b.as_str()],
    ] {
        let (qcode, qout, _) = qemu("qemu-img", &args);
        let (code, out, err) = tool(&args);
        assert_eq!(
            (code, out.as_str()),
            (qcode, qout.as_str()),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn io_read_matches_qemu_io() {
    let dir = Dir::new();
    let img = make_raw(&dir, "a.raw");
    for cmds in [
        vec!["read -P 0xab 1M 64k"],
        vec!["read -P 0xab 1M 68k", "read 0 512"],
        vec!["read -v 1048570 40"],
        vec!["read 4M 1", "read 1x 1", "read 0 3G", "read -P 0x1ff 0 1"],
        vec!["read -q -P 7 4190000 1", "length"],
        vec!["quit", "read 0 1"],
    ] {
        let mut args = vec!["-f", "raw", "-r"];
        for c in &cmds {
            args.extend(["-c", c]);
        }
        args.push(&img);
        let (qcode, qout, _) = qemu("qemu-io", &args);
        let mut ours = vec!["io"];
        ours.extend(&args);
        let (code, out, err) = tool(&ours);
        // The tool sends qemu-io's "read failed: ..." lines to stderr, word for word; the rest is stdout.
        let (q_failed, q_rest): (Vec<&str>, Vec<&str>) =
            qout.lines().partition(|l| l.starts_with("read failed: "));
        let q_rest: String = q_rest.iter().map(|l| format!("{l}\n")).collect();
        assert_eq!(
            (code, without_timing(&out)),
            (qcode, without_timing(&q_rest)),
            "{cmds:?}: {err}"
        );
        let failed: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("read failed: "))
            .collect();
        assert_eq!(failed, q_failed, "{cmds:?}");
    }
    // Errors qemu-io prints on stderr.
    let (code, _, err) = tool(&["io", "-r", "-c", "bogus 1", "-c", "read 0", &img]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "command \"bogus\" not found\nbad argument count 1 to read, expected at least 2 arguments\n"
    );
}

#[test]
fn bad_input_gives_one_line_errors() {
    let dir = Dir::new();
    let img = make_raw(&dir, "a.raw");
    let missing = dir.path("missing");
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["info", &missing],
            format!(
                "qcow2: Could not open '{missing}': Could not open '{missing}': No such file or directory\n"
            ),
        ),
        (
            vec!["info", "-f", "qcow2", &img],
            format!("qcow2: Could not open '{img}': Image is not in qcow2 format\n"),
        ),
        (
            vec!["info", "--output=xml", &img],
            "qcow2: --output expects 'human' or 'json' not 'xml'\n".into(),
        ),
        (
            vec!["info", "--bogus", &img],
            "qcow2 info: unrecognized option '--bogus'\n".into(),
        ),
        (vec!["map"], "qcow2: Expecting one image file name\n".into()),
        (vec!["nope"], "qcow2: Command not found: nope\n".into()),
        (vec![], "qcow2: Not enough arguments\n".into()),
        (
            vec!["io", "-c", "read 0 1", &missing],
            format!(
                "qcow2: can't open device {missing}: Could not open '{missing}': No such file or directory\n"
            ),
        ),
    ];
    for (args, expected) in cases {
        let (code, out, err) = tool(&args);
        assert_eq!(code, 1, "{args:?}");
        assert_eq!(out, "", "{args:?}");
        assert_eq!(err, expected, "{args:?}");
    }
}
