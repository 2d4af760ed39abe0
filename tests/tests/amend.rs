//! `qcow2 amend` against `qemu-img amend` on copies of the same images: `lazy_refcounts` on and off, `size`
//! (grow and shrink, exact), `compat` and `refcount_bits` naming what the image has, several `-o`, on v3
//! images of several cluster sizes: the results byte-identical and clean; every mistake qemu-img refuses
//! gives its message and exit code; what this tool does not amend (encryption) is refused before anything
//! changes; another refcount width byte-identical to qemu-img's. Version 2 images upgraded and version 3 images downgraded (`compat`, alone and with
//! other options): with snapshots, zero clusters, backing files with short and long names, byte-identical.

use std::path::Path;

use qcow2_tests::{Output, Scratch, assert_files_equal, qcow2, qemu_img, qemu_io_cmds};

fn amend(tool: fn(&[&str]) -> Output, args: &[&str], file: &Path) -> Output {
    let mut all = vec!["amend"];
    all.extend_from_slice(args);
    all.push(file.to_str().unwrap());
    tool(&all)
}

/// Runs `amend ARGS` with both tools on copies of `img`; compares exit code, messages and, on success,
/// the files (and `qemu-img check`).
fn both(s: &Scratch, img: &Path, args: &[&str], what: &str) -> Output {
    let (ours, theirs) = (s.path("ours.qcow2"), s.path("theirs.qcow2"));
    std::fs::copy(img, &ours).unwrap();
    std::fs::copy(img, &theirs).unwrap();
    let o = amend(|a| qcow2(a), args, &ours);
    let t = amend(|a| qemu_img(a), args, &theirs);
    let what = format!("{what}: amend {args:?}");
    assert_eq!(
        o.code,
        t.code,
        "{what}:\n{}\n{}",
        o.describe(),
        t.describe()
    );
    assert_eq!(o.stderr_as_ours(), t.stderr_as_ours(), "{what}: messages");
    if o.success() {
        assert_files_equal(&ours, &theirs, &what);
        let c = qemu_img(["check".as_ref(), ours.as_os_str()]);
        assert_eq!(c.code, Some(0), "{what}: {}", c.describe());
    } else {
        // Refused: left as qemu-img leaves it (unchanged, or changed by the steps before the refusal).
        assert_files_equal(&ours, &theirs, &format!("{what} (refused)"));
    }
    o
}

#[test]
fn options_match_qemu_img() {
    let s = Scratch::new();
    for opts in [
        "",
        "cluster_size=4096",
        "cluster_size=512,lazy_refcounts=on",
        "cluster_size=2M",
    ] {
        let img = s.qcow2("img.qcow2", opts, 8 << 20);
        qemu_io_cmds(
            &img,
            "qcow2",
            &[
                "write -P 1 0 1M".to_string(),
                "write -P 2 6M 1M".to_string(),
            ],
        );
        for args in [
            vec!["-o", "lazy_refcounts=on"],
            vec!["-o", "lazy_refcounts=off"],
            vec!["-o", "lazy_refcounts"],
            vec!["-o", "lazy_refcounts=on,lazy_refcounts=off"],
            vec!["-o", "size=64M"],
            vec!["-o", "size=2M"],
            vec!["-o", "lazy_refcounts=on", "-o", "size=1G"],
            vec!["-o", "compat=1.1,refcount_bits=16"],
            vec!["-q", "-p", "-o", "compat=v3"],
            vec!["-o", "compat=0.10,lazy_refcounts=on"],
        ] {
            both(&s, &img, &args, opts);
        }
        for args in [
            vec!["-o", "extended_l2=on"],
            vec!["-o", "cluster_size=4k"],
            vec!["-o", "bogus=1"],
            vec!["-o", "lazy_refcounts=maybe"],
            vec!["-o", "size=abc"],
            vec!["-o", "backing_file=x"],
            vec!["-o", "backing_fmt=raw"],
            vec!["-o", "data_file=x"],
            vec!["-o", "data_file_raw=on"],
            vec!["-o", "refcount_bits=3"],
            vec!["-o", "compat=2.0"],
            vec!["-f", "raw", "-o", "size=1M"],
            vec![],
        ] {
            let o = both(&s, &img, &args, opts);
            assert!(!o.success());
        }
    }
    // Lazy refcounts on a version 2 image: refused by both.
    let v2 = s.qcow2("v2.qcow2", "compat=0.10", 1 << 20);
    both(&s, &v2, &["-o", "lazy_refcounts=on"], "v2");
    both(&s, &v2, &["-o", "lazy_refcounts=off"], "v2");
}

/// What this tool does not amend is refused with a message that says so, and the image is left alone.
#[test]
fn unsupported_changes_are_refused() {
    let s = Scratch::new();
    let img = s.qcow2("img.qcow2", "", 1 << 20);
    let (opt, what) = ("encrypt.new-secret=s0", "'encrypt.new-secret'");
    let before = std::fs::read(&img).unwrap();
    let o = qcow2(["amend", "-o", opt, img.to_str().unwrap()]);
    assert_eq!(o.code, Some(1), "{opt}: {}", o.describe());
    assert_eq!(
        o.stderr_str(),
        format!("qcow2: Amending {what} is not supported by this tool\n")
    );
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "{opt} changed the image"
    );
}

/// `refcount_bits` to every width from every layout, byte-identical to qemu-img: 512 B to 64 KiB clusters
/// (qemu-img walks every refcount its refcount table could cover: with 2 MiB clusters, for hours),
/// lazy refcounts, internal snapshots (refcounts of 2, which 1-bit refcounts refuse with qemu-img's message
/// and the same file), compressed clusters, images whose data fills the old refcount table (so that the new
/// blocks grow it), and together with `compat`, `lazy_refcounts` and `size`.
#[test]
fn refcount_width_matches_qemu_img() {
    let s = Scratch::new();
    let mut runs = 0;
    for (opts, setup) in [
        ("", "write -P 1 0 1M"),
        ("cluster_size=512", "write -P 1 0 7680k"),
        ("cluster_size=4096,lazy_refcounts=on", "write -P 1 1M 3M"),
        ("cluster_size=4096,refcount_bits=64", "write -c -P 2 0 64k"),
        ("cluster_size=4096,refcount_bits=1", "write -P 3 0 64k"),
        ("cluster_size=512", "snapshot"),
    ] {
        let img = s.qcow2("img.qcow2", opts, 16 << 20);
        if setup == "snapshot" {
            qemu_io_cmds(&img, "qcow2", &["write -P 4 0 256k".to_string()]);
            qemu_img(["snapshot", "-c", "one", img.to_str().unwrap()]);
            qemu_io_cmds(&img, "qcow2", &["write -P 5 64k 64k".to_string()]);
        } else {
            qemu_io_cmds(&img, "qcow2", &[setup.to_string()]);
        }
        for bits in [1, 2, 4, 8, 16, 32, 64] {
            let opt = format!("refcount_bits={bits}");
            both(&s, &img, &["-o", &opt], &format!("{opts} {setup}"));
            runs += 1;
        }
        for args in [
            "refcount_bits=8,lazy_refcounts=on,size=64M",
            "refcount_bits=2,compat=0.10",
            "refcount_bits=16,compat=0.10",
        ] {
            both(&s, &img, &["-o", args], &format!("{opts} {setup}"));
            runs += 1;
        }
    }
    let v2 = s.qcow2("v2.qcow2", "compat=0.10", 4 << 20);
    qemu_io_cmds(&v2, "qcow2", &["write -P 1 0 1M".to_string()]);
    for args in [
        "refcount_bits=8",
        "refcount_bits=8,compat=1.1",
        "refcount_bits=16",
    ] {
        both(&s, &v2, &["-o", args], "v2");
        runs += 1;
    }
    qcow2_tests::record_evidence(
        "amend-refcount-bits",
        &format!("amend refcount_bits: {runs} runs byte-identical to qemu-img amend"),
    );
}

/// `compat=1.1` on version 2 images: the header rewritten as qemu-img rewrites it (the feature name table
/// for clusters over 4 KiB, the backing file name and format moved), snapshots kept, byte-identical; with
/// lazy refcounts and a new size in the same command; and qemu-img's error where the first cluster has no
/// room.
#[test]
fn upgrade_matches_qemu_img() {
    let s = Scratch::new();
    let deep = s.path(&["d".repeat(200), "e".repeat(200), "f".repeat(200)].join("/"));
    std::fs::create_dir_all(&deep).unwrap();
    let long_base = deep.join("base.qcow2");
    let short_base = s.path("b.qcow2");
    for base in [&long_base, &short_base] {
        s.create(base.to_str().unwrap(), "qcow2", "", 8 << 20, None);
        qemu_io_cmds(base, "qcow2", &["write -P 5 0 8M".to_string()]);
    }
    for cs in ["512", "4096", "65536", "2M"] {
        for base in [None, Some(&short_base), Some(&long_base)] {
            if cs == "512" && base == Some(&long_base) {
                // qemu-img cannot create it: the name does not fit in the first cluster.
                continue;
            }
            let what = format!("cluster_size={cs}, backing {base:?}");
            let img = s.create(
                "v2.qcow2",
                "qcow2",
                &format!("compat=0.10,cluster_size={cs}"),
                8 << 20,
                base.map(|b| (b.to_str().unwrap(), "qcow2")),
            );
            qemu_io_cmds(&img, "qcow2", &["write -P 1 0 1M".to_string()]);
            qemu_img(["snapshot", "-c", "one", img.to_str().unwrap()]);
            qemu_io_cmds(&img, "qcow2", &["write -P 2 512k 1M".to_string()]);
            for args in [
                vec!["-o", "compat=1.1"],
                vec!["-o", "compat=v3,lazy_refcounts=on"],
                vec!["-o", "compat=1.1", "-o", "size=16M"],
            ] {
                both(&s, &img, &args, &what);
            }
        }
    }
}

/// `compat=0.10` on version 3 images: zero clusters expanded (dropped without a backing file, written as
/// zeros over one, kept where they own a host cluster), in the active table and a snapshot's, the header
/// rewritten without the feature name table; byte-identical to qemu-img and clean. What version 2 cannot
/// hold gets qemu-img's message, and the image is left alone.
#[test]
fn downgrade_matches_qemu_img() {
    let s = Scratch::new();
    let base = s.qcow2("base.qcow2", "", 8 << 20);
    qemu_io_cmds(&base, "qcow2", &["write -P 5 0 8M".to_string()]);
    let zeros = [
        "write -P 1 0 1M".to_string(),
        "write -z 1M 1M".to_string(),
        "write -P 3 3M 64k".to_string(),
        "write -z 3M 32k".to_string(),
        "write -z 5M 64k".to_string(),
    ];
    for cs in ["512", "4096", "65536", "2M"] {
        for backed in [false, true] {
            for (extra, snapshot) in [("", false), (",lazy_refcounts=on", false), ("", true)] {
                let what =
                    format!("cluster_size={cs}{extra}, backed {backed}, snapshot {snapshot}");
                let img = s.create(
                    "v3.qcow2",
                    "qcow2",
                    &format!("cluster_size={cs}{extra}"),
                    8 << 20,
                    backed.then(|| (base.to_str().unwrap(), "qcow2")),
                );
                qemu_io_cmds(&img, "qcow2", &zeros);
                if snapshot {
                    qemu_img(["snapshot", "-c", "one", img.to_str().unwrap()]);
                }
                for args in [
                    vec!["-o", "compat=0.10"],
                    vec!["-o", "compat=v2,lazy_refcounts=off"],
                    vec!["-o", "compat=0.10,size=4M"],
                ] {
                    both(&s, &img, &args, &what);
                }
            }
        }
    }
    for (opts, setup) in [
        ("refcount_bits=8", ""),
        ("extended_l2=on", ""),
        ("compression_type=zstd", "write -c 0 64k"),
        ("compression_type=zstd", "write 0 64k"),
        ("", "snapshot-then-resize"),
    ] {
        let img = s.qcow2("r.qcow2", opts, 8 << 20);
        if setup == "snapshot-then-resize" {
            qemu_img(["snapshot", "-c", "one", img.to_str().unwrap()]);
            qemu_img(["resize", img.to_str().unwrap(), "16M"]);
        } else if !setup.is_empty() {
            qemu_io_cmds(&img, "qcow2", &[setup.to_string()]);
        }
        both(&s, &img, &["-o", "compat=0.10"], &format!("{opts} {setup}"));
    }
}
