//! `--image-opts` as qemu-img takes it (`driver=qcow2|raw` or probed, `file.filename=PATH`,
//! `file.driver=file`, doubled commas), for info, map, check, compare, measure, convert, dd, bench and io: the same
//! output, messages and exit codes as qemu-img, for good option strings and for each kind of mistake.

use qcow2_tests::{Output, Scratch, qcow2, qemu_img, qemu_io_cmds, write_at};

fn key(out: &Output) -> (Option<i32>, String, Vec<String>) {
    (out.code, out.stdout_str(), out.messages())
}

#[test]
fn image_opts_match_qemu_img() {
    let s = Scratch::new();
    let img = s.qcow2("img.qcow2", "cluster_size=4096", 1 << 20);
    qemu_io_cmds(&img, "qcow2", &["write -P 0x11 0 300k".to_string()]);
    let raw = s.path("plain.raw");
    write_at(&raw, 0, &[7u8; 70_000]);
    let comma = s.path("a,b.qcow2");
    std::fs::copy(&img, &comma).unwrap();
    let (i, r) = (img.to_str().unwrap(), raw.to_str().unwrap());
    let specs = [
        format!("driver=qcow2,file.filename={i}"),
        format!("driver=qcow2,file.driver=file,file.filename={i}"),
        format!("file.filename={i}"),
        format!("driver=raw,file.filename={r}"),
        format!(
            "file.filename={}",
            comma.to_str().unwrap().replace(',', ",,")
        ),
        format!("driver=qcow2,file.filename={i},foo=bar"),
        format!("file.filename={i},foo=1"),
        format!("file.filename={r},foo=1"),
        format!("driver=qcow2,file.filename={i},file.foo=1"),
        format!("driver=qcow2,file.filename={r}"),
        format!(
            "driver=qcow2,file.filename={}",
            s.path("missing.qcow2").display()
        ),
        format!("driver=foo,file.filename={i}"),
        format!("driver=qcow2,file.driver=foo,file.filename={i}"),
        format!("driver=raw,filename={r}"),
        format!("filename={r}"),
        "driver=qcow2".to_string(),
        i.to_string(),
    ];
    for spec in &specs {
        for cmd in [
            &["info"][..],
            &["info", "--output=json"],
            &["map", "--output=json"],
            &["check"],
            &["measure", "-O", "qcow2"],
        ] {
            let mut args: Vec<&str> = cmd.to_vec();
            args.extend(["--image-opts", spec]);
            assert_eq!(key(&qcow2(&args)), key(&qemu_img(&args)), "{args:?}");
        }
        let args = ["compare", "--image-opts", spec, spec];
        assert_eq!(key(&qcow2(args)), key(&qemu_img(args)), "{args:?}");
    }
    // bench and io (qemu-io's "can't open:" without a device name).
    for spec in &specs[..specs.len() - 1] {
        // (The timing line differs from run to run: exit code and messages only.)
        let args = ["bench", "-c", "10", "--image-opts", spec];
        let (o, t) = (qcow2(args), qemu_img(args));
        assert_eq!((o.code, o.messages()), (t.code, t.messages()), "{args:?}");
        let args = ["-r", "-c", "read -q 0 512", "--image-opts", spec];
        let mut ours = vec!["io"];
        ours.extend(args);
        assert_eq!(
            key(&qcow2(&ours)),
            key(&qcow2_tests::qemu_io(args)),
            "{args:?}"
        );
    }
    // With --format: refused.
    for cmd in ["info", "map", "check"] {
        let args = [cmd, "--image-opts", "-f", "qcow2", &specs[0]];
        assert_eq!(key(&qcow2(args)), key(&qemu_img(args)), "{args:?}");
    }
    // Copies: the same output as qemu-img's.
    let (a, b) = (s.path("a.raw"), s.path("b.raw"));
    let args = |out: &std::path::Path| {
        [
            "convert",
            "--image-opts",
            "-O",
            "raw",
            &specs[0],
            out.to_str().unwrap(),
        ]
        .map(String::from)
    };
    let (o, t) = (qcow2(args(&a)), qemu_img(args(&b)));
    assert!(
        o.success() && t.success(),
        "{}\n{}",
        o.describe(),
        t.describe()
    );
    qcow2_tests::assert_files_equal(&a, &b, "convert --image-opts");
    let (ia, ib) = (format!("if={}", specs[0]), format!("of={}", a.display()));
    let ob = format!("of={}", b.display());
    let o = qcow2(["dd", "--image-opts", "bs=64k", &ia, &ib]);
    let t = qemu_img(["dd", "--image-opts", "bs=64k", &ia, &ob]);
    assert!(o.success() && t.success(), "{}", o.describe());
    qcow2_tests::assert_files_equal(&a, &b, "dd --image-opts");
}
