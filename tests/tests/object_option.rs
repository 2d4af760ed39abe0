//! `--object` on every command that takes it (and on `io`, as qemu-io takes it): well-formed secrets and
//! throttle groups are accepted and the command runs as without them; every malformed definition gets
//! qemu-img's (qemu-io's) message and exit code, before anything is opened.

use qcow2_tests::{Scratch, qcow2, qemu_img, qemu_io};

#[test]
fn objects_match_qemu_img() {
    let s = Scratch::new();
    let img = s.qcow2("o.qcow2", "", 1 << 20);
    let img = img.to_str().unwrap().to_string();
    let pw = s.path("pw.txt");
    std::fs::write(&pw, b"secret").unwrap();
    let pw_spec = format!("secret,id=s0,file={}", pw.display());
    let missing = format!("secret,id=s0,file={}", s.path("missing.txt").display());
    let specs: Vec<&str> = vec![
        "secret,id=s0,data=abc",
        "secret,id=s0,data=YWJj,format=base64",
        "qom-type=secret,id=s1,data=x",
        "secret,id=s0,data=x,id=s1",
        &pw_spec,
        "throttle-group,id=t0",
        "secret",
        "secret,bogus=1",
        "bogus,id=x",
        "secret,id=s0",
        &missing,
        "secret,id=s0,data=a,format=hex",
        "secret,id=s0,data=abc,bogus=1",
        "secret,id=s0,data=a,file=x",
        "secret,id=a b,data=x",
        "secret,id=s0,data=x,keyid=k",
        "iothread,id=io0",
        "rng-random,id=r",
        "id=x",
        "",
    ];
    let commands: Vec<Vec<String>> = vec![
        vec!["info".into(), img.clone()],
        vec!["check".into(), img.clone()],
        vec!["map".into(), img.clone()],
        vec!["compare".into(), img.clone(), img.clone()],
        vec!["snapshot".into(), "-l".into(), img.clone()],
        vec!["measure".into(), img.clone()],
        vec![
            "create".into(),
            "-f".into(),
            "qcow2".into(),
            s.path("n.qcow2").to_str().unwrap().into(),
            "1M".into(),
        ],
        vec![
            "convert".into(),
            "-O".into(),
            "raw".into(),
            img.clone(),
            s.path("c.raw").to_str().unwrap().into(),
        ],
        vec!["resize".into(), img.clone(), "1M".into()],
        vec![
            "amend".into(),
            "-o".into(),
            "lazy_refcounts=off".into(),
            img.clone(),
        ],
    ];
    for cmd in &commands {
        for spec in &specs {
            let mut args: Vec<&str> = vec![cmd[0].as_str(), "--object", spec];
            args.extend(cmd[1..].iter().map(String::as_str));
            let (o, t) = (qcow2(&args), qemu_img(&args));
            assert_eq!(
                o.code,
                t.code,
                "{args:?}:\n{}\n{}",
                o.describe(),
                t.describe()
            );
            assert_eq!(o.stderr_as_ours(), t.stderr_as_ours(), "{args:?}: messages");
        }
    }
    // Two objects with one id.
    let args = [
        "info",
        "--object",
        "secret,id=s0,data=x",
        "--object",
        "secret,id=s0,data=y",
        &img,
    ];
    let (o, t) = (qcow2(args), qemu_img(args));
    assert_eq!((o.code, o.stderr_as_ours()), (t.code, t.stderr_as_ours()));
    // qemu-io's --object.
    for spec in ["secret,id=s0,data=abc", "secret", "bogus,id=x"] {
        let o = qcow2(["io", "--object", spec, "-c", "read 0 512", &img]);
        let t = qemu_io(["--object", spec, "-c", "read 0 512", &img]);
        assert_eq!(
            o.code,
            t.code,
            "io {spec}:\n{}\n{}",
            o.describe(),
            t.describe()
        );
        assert_eq!(
            o.stderr_str()
                .replace("qcow2 io", "qemu-io")
                .replace("qcow2", "qemu-io"),
            t.stderr_str(),
            "io {spec}: messages"
        );
    }
}
