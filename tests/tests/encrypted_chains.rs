//! Backing chains that mix encrypted and plain images, made by qemu-img: a LUKS overlay of a plain base, a
//! plain overlay of a LUKS base, and a LUKS overlay of a LUKS base with another passphrase (given with
//! `backing.encrypt.key-secret`, as qemu-img takes it). Our guest view (`qcow2 convert -O raw`) must equal
//! qemu-img's; our writes into the overlay must read back in qemu-io and leave it clean for `qemu-img
//! check`; a missing secret gives qemu-img's message and exit code.

use qcow2_tests::{Scratch, qcow2, qemu_img, qemu_io};

const TOP: &str = "secret,id=top,data=top-passphrase";
const BASE: &str = "secret,id=base,data=base-passphrase";

fn run(args: &[String]) -> qcow2_tests::Output {
    qemu_io(args)
}

fn secrets() -> Vec<String> {
    vec![
        "--object".into(),
        TOP.into(),
        "--object".into(),
        BASE.into(),
    ]
}

#[test]
fn mixed_chains() {
    let s = Scratch::new();
    let luks =
        |id: &str| format!("encrypt.format=luks,encrypt.key-secret={id},encrypt.iter-time=10");
    // (base encrypted, top encrypted)
    for (base_enc, top_enc) in [(false, true), (true, false), (true, true)] {
        let what = format!("base encrypted {base_enc}, top encrypted {top_enc}");
        let base = s.path("base.qcow2");
        let top = s.path("top.qcow2");
        let _ = std::fs::remove_file(&base);
        let _ = std::fs::remove_file(&top);
        let mut a = vec![
            "create".to_string(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
        ];
        a.extend(secrets());
        if base_enc {
            a.extend(["-o".into(), luks("base")]);
        }
        a.extend([base.to_str().unwrap().into(), "4M".into()]);
        let o = qemu_img(&a);
        assert!(o.success(), "{what}: create base: {}", o.describe());
        let mut a = vec![
            "create".to_string(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
        ];
        a.extend(secrets());
        if top_enc {
            a.extend(["-o".into(), luks("top")]);
        }
        a.extend([
            "-b".into(),
            "base.qcow2".into(),
            "-F".into(),
            "qcow2".into(),
        ]);
        a.extend([top.to_str().unwrap().into(), "4M".into()]);
        let o = qemu_img(&a);
        assert!(o.success(), "{what}: create top: {}", o.describe());
        let base_opts = format!(
            "driver=qcow2,file.filename={}{}",
            base.display(),
            if base_enc {
                ",encrypt.key-secret=base"
            } else {
                ""
            }
        );
        let top_opts = format!(
            "driver=qcow2,file.filename={}{}{}",
            top.display(),
            if top_enc {
                ",encrypt.key-secret=top"
            } else {
                ""
            },
            if base_enc {
                ",backing.encrypt.key-secret=base"
            } else {
                ""
            }
        );
        let io = |opts: &str, cmds: &[&str]| {
            let mut a = secrets();
            a.extend(["--image-opts".into(), opts.to_string()]);
            for c in cmds {
                a.extend(["-c".into(), c.to_string()]);
            }
            a
        };
        let out = run(&io(&base_opts, &["write -P 1 0 4M"]));
        assert!(out.success(), "{what}: {}", out.describe());
        let out = run(&io(&top_opts, &["write -P 2 64k 100k", "write -z 1M 4k"]));
        assert!(out.success(), "{what}: {}", out.describe());

        // The same guest view through both tools.
        let view = |tool: fn(Vec<String>) -> qcow2_tests::Output, out: &std::path::Path| {
            let mut a = vec!["convert".to_string()];
            a.extend(secrets());
            a.extend([
                "--image-opts".into(),
                top_opts.clone(),
                "-O".into(),
                "raw".into(),
            ]);
            a.push(out.to_str().unwrap().into());
            let o = tool(a);
            assert!(o.success(), "{what}: {}", o.describe());
            std::fs::read(out).unwrap()
        };
        let ours = view(qcow2, &s.path("ours.raw"));
        let theirs = view(qemu_img, &s.path("theirs.raw"));
        assert!(ours == theirs, "{what}: guest views differ");

        // Our writes (unaligned, across the backing data), read back by qemu-io.
        let mut a = vec!["io".to_string()];
        a.extend(io(
            &top_opts,
            &["write -P 3 3000 70000", "write -P 4 2M 512"],
        ));
        let out = qcow2(&a);
        assert!(out.success(), "{what}: {}", out.describe());
        let out = run(&io(
            &top_opts,
            &[
                "read -P 1 0 3000",
                "read -P 3 3000 70000",
                "read -P 2 73000 91840",
                "read -P 0 1M 4k",
                "read -P 4 2M 512",
                "read -P 1 2097664 1024",
            ],
        ));
        let text = out.stdout_str();
        assert!(
            out.success() && !text.contains("verification failed"),
            "{what}: {text}{}",
            out.stderr_str()
        );
        let mut a = vec!["check".to_string()];
        a.extend(secrets());
        a.extend(["--image-opts".into(), top_opts.clone()]);
        let c = qemu_img(&a);
        assert!(c.success(), "{what}: {}", c.describe());

        // Without the base's secret: qemu-img's message and exit code.
        if base_enc {
            let no_base = top_opts.replace(",backing.encrypt.key-secret=base", "");
            let mut a = vec!["map".to_string()];
            a.extend(secrets());
            a.extend(["--image-opts".into(), no_base]);
            let (o, t) = (qcow2(&a), qemu_img(&a));
            assert_eq!(o.code, t.code, "{what}");
            assert_eq!(o.messages(), t.messages(), "{what}");
        }
    }
}
