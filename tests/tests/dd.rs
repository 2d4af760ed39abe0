//! `qcow2 dd` against `qemu-img dd` on copies of the same inputs: raw and qcow2 outputs byte-identical for
//! block sizes, counts and skips (including a skip past the end, an odd block size and base-0 numbers), from
//! raw and qcow2 inputs; the same message and exit code for every mistake.

use std::path::Path;

use qcow2_tests::{Output, Scratch, noise, qcow2, qemu_img, qemu_io_cmds, write_at};

fn dd(tool: fn(&[&str]) -> Output, args: &[&str], input: &Path, output: &Path) -> Output {
    let (i, o) = (
        format!("if={}", input.display()),
        format!("of={}", output.display()),
    );
    let mut all = vec!["dd"];
    all.extend_from_slice(args);
    all.push(&i);
    all.push(&o);
    tool(&all)
}

fn ours(a: &[&str]) -> Output {
    qcow2(a)
}

fn theirs(a: &[&str]) -> Output {
    qemu_img(a)
}

#[test]
fn outputs_match_qemu_img() {
    let s = Scratch::new();
    let raw = s.path("in.raw");
    write_at(&raw, 0, &noise(1, 3_000_000));
    write_at(&raw, 4_999_999, &[7]);
    let q = s.qcow2("in.qcow2", "cluster_size=4096", 3 << 20);
    qemu_io_cmds(
        &q,
        "qcow2",
        &[
            "write -P 0x11 0 1M".to_string(),
            "write -z 256k 64k".to_string(),
            "write -P 0x22 2M 100k".to_string(),
        ],
    );
    let cases: [&[&str]; 12] = [
        &[],
        &["bs=1k", "count=3", "skip=2"],
        &["bs=64k"],
        &["bs=1M", "count=2"],
        &["bs=4097", "skip=100"],
        &["skip=99999999"],
        &["bs=1.5k", "count=2"],
        &["count=0x10"],
        &["count=010", "bs=1k"],
        &["bs=1M", "bs=256k", "count=3"],
        &["-O", "qcow2"],
        &["-O", "qcow2", "bs=3k", "count=100", "skip=7"],
    ];
    for (input, fmt) in [(&raw, "raw"), (&q, "qcow2")] {
        for args in cases {
            let mut all = vec!["-f", fmt];
            all.extend_from_slice(args);
            let (a, b) = (s.path("out.ours"), s.path("out.qemu"));
            let _ = std::fs::remove_file(&a);
            let _ = std::fs::remove_file(&b);
            let o = dd(ours, &all, input, &a);
            let t = dd(theirs, &all, input, &b);
            assert_eq!(
                o.code,
                t.code,
                "{all:?}: {}\n{}",
                o.describe(),
                t.describe()
            );
            assert!(o.success(), "{all:?}: {}", o.describe());
            assert_eq!(
                o.first_message().replace(".ours", ""),
                t.first_message().replace(".qemu", "")
            );
            qcow2_tests::assert_files_equal(&a, &b, &format!("dd {all:?} from {fmt}"));
        }
    }
}

#[test]
fn mistakes_match_qemu_img() {
    let s = Scratch::new();
    let raw = s.path("in.raw");
    write_at(&raw, 0, &noise(2, 100_000));
    let cases: [&[&str]; 14] = [
        &["bs=0"],
        &["bs=abc"],
        &["bs=3G"],
        &["bs=-1"],
        &["count=-1"],
        &["count=abc"],
        &["count=1k"],
        &["skip=abc"],
        &["skip=1k"],
        &["count="],
        &["foo=1"],
        &["junk"],
        &["-O", "foo"],
        &["-f", "qcow2"],
    ];
    for args in cases {
        let (a, b) = (s.path("x.ours"), s.path("x.qemu"));
        let o = dd(ours, args, &raw, &a);
        let t = dd(theirs, args, &raw, &b);
        assert_eq!(o.code, Some(1), "{args:?}: {}", o.describe());
        assert_eq!(o.code, t.code, "{args:?}: {}", t.describe());
        assert_eq!(
            o.first_message().replace("x.ours", "X"),
            t.first_message().replace("x.qemu", "X"),
            "{args:?}"
        );
        assert_eq!(a.exists(), b.exists(), "{args:?}: output left or not");
    }
    // Missing operands, a missing input, an output that cannot be made.
    for args in [&["dd"][..], &["dd", "if=x"], &["dd", "of=x"]] {
        let (o, t) = (qcow2(args), qemu_img(args));
        assert_eq!(o.code, t.code);
        assert_eq!(o.first_message(), t.first_message(), "{args:?}");
    }
    let missing = s.path("missing.raw");
    let bad_out = Path::new("/nonexistent-dir/out.raw");
    for (input, output) in [
        (missing.as_path(), s.path("y").as_path().to_owned()),
        (raw.as_path(), bad_out.to_owned()),
    ] {
        let o = dd(ours, &[], input, &output);
        let t = dd(theirs, &[], input, &output);
        assert_eq!(o.code, Some(1));
        assert_eq!(o.code, t.code);
        assert_eq!(o.first_message(), t.first_message());
    }
}
