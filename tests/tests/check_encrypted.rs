//! `qcow2 check` (and `check -r`) on LUKS-encrypted images made by qemu-img: the LUKS area is metadata that
//! the check counts as referenced, as QEMU's does. The reports, JSON and exit codes must equal qemu-img's,
//! and a repair must leave a sound image byte for byte as it was (a check that took the area for leaked
//! clusters would free it, and a rebuild could then put refcount blocks over the LUKS header).

use qcow2_tests::{Scratch, qcow2, qemu_img, qemu_io};

const SECRET: &str = "secret,id=s0,data=check-passphrase";

fn opts(path: &std::path::Path) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=s0",
        path.display()
    )
}

/// `check ARGS` on `img` with the secret, through both tools.
fn both(img: &std::path::Path, args: &[&str]) -> (qcow2_tests::Output, qcow2_tests::Output) {
    let mut a: Vec<String> = vec!["check".into()];
    a.extend(args.iter().map(|s| s.to_string()));
    a.extend([
        "--object".into(),
        SECRET.into(),
        "--image-opts".into(),
        opts(img),
    ]);
    (qcow2(&a), qemu_img(&a))
}

#[test]
fn check_and_repair_encrypted_images() {
    let s = Scratch::new();
    for extra in [
        "cluster_size=65536",
        "cluster_size=4096",
        "cluster_size=65536,compat=0.10",
    ] {
        let img = s.path("enc.qcow2");
        let _ = std::fs::remove_file(&img);
        let out = qemu_img([
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            SECRET,
            "-o",
            &format!("encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,{extra}"),
            img.to_str().unwrap(),
            "8M",
        ]);
        assert!(out.success(), "{}", out.describe());
        let io = qemu_io([
            "--object",
            SECRET,
            "--image-opts",
            &opts(&img),
            "-c",
            "write -P 0x5c 4096 200000",
            "-c",
            "write -z 1M 64k",
        ]);
        assert!(io.success(), "{}", io.describe());
        let before = std::fs::read(&img).unwrap();
        for args in [&[][..], &["--output=json"][..]] {
            let (ours, theirs) = both(&img, args);
            assert_eq!(ours.code, theirs.code, "check {args:?} ({extra})");
            assert_eq!(
                ours.code,
                Some(0),
                "check {args:?} ({extra}): {}",
                ours.describe()
            );
            let strip = |t: String| t.replace(&opts(&img), img.to_str().unwrap());
            assert_eq!(
                strip(ours.stdout_str()),
                strip(theirs.stdout_str()),
                "check {args:?} ({extra})"
            );
        }
        for mode in ["leaks", "all"] {
            let (ours, _) = both(&img, &["-r", mode]);
            assert_eq!(
                ours.code,
                Some(0),
                "check -r {mode} ({extra}): {}",
                ours.describe()
            );
            assert!(
                std::fs::read(&img).unwrap() == before,
                "check -r {mode} changed a sound encrypted image ({extra})"
            );
        }
        let read = qemu_io([
            "-r",
            "--object",
            SECRET,
            "--image-opts",
            &opts(&img),
            "-c",
            "read -P 0x5c 4096 200000",
            "-c",
            "read -P 0 1M 64k",
        ]);
        let text = read.stdout_str();
        assert!(
            read.success() && !text.contains("verification failed"),
            "{text}"
        );
    }
}
