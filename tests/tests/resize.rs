//! `qcow2 resize` against `qemu-img resize` on copies of the same images: the resulting files byte-identical
//! (grow within the L1 table, L1 growth across many clusters, shrink that frees data, L2 tables and refcount
//! blocks and cuts the file, relative sizes), for cluster sizes 512 B to 2 MiB, v2 and v3, extended L2,
//! refcount widths, compressed clusters, internal snapshots, lazy refcounts and a backing file longer than the
//! image; `qemu-img check` clean after each; raw files; and the same message, exit code and untouched file for
//! every refusal.

use std::path::Path;

use qcow2_tests::{
    Output, Scratch, assert_files_equal, qcow2, qemu_img, qemu_img_ok, qemu_io_cmds,
};

/// Runs `resize ARGS` with both tools on copies of `img`; asserts the same exit code, stdout and messages
/// (program names aside) and, on success, byte-identical files that `qemu-img check` finds clean.
fn both(s: &Scratch, img: &Path, args: &[&str], what: &str) -> Output {
    let (ours, theirs) = (s.path("ours.img"), s.path("theirs.img"));
    std::fs::copy(img, &ours).unwrap();
    std::fs::copy(img, &theirs).unwrap();
    let run = |tool: fn(&[&str]) -> Output, file: &Path| {
        let mut all = vec!["resize"];
        let (opts, size) = args.split_at(args.len() - 1);
        all.extend_from_slice(opts);
        let f = file.to_str().unwrap();
        all.push(f);
        all.extend_from_slice(size);
        tool(&all)
    };
    let o = run(|a| qcow2(a), &ours);
    let t = run(|a| qemu_img(a), &theirs);
    let what = format!("{what}: resize {args:?}");
    assert_eq!(
        o.code,
        t.code,
        "{what}:\n{}\n{}",
        o.describe(),
        t.describe()
    );
    assert_eq!(o.stdout_str(), t.stdout_str(), "{what}: stdout");
    let norm = |out: &Output, name: &str| out.stderr_as_ours().replace(name, "IMG");
    assert_eq!(
        norm(&o, ours.to_str().unwrap()),
        norm(&t, theirs.to_str().unwrap()),
        "{what}: messages"
    );
    assert_files_equal(&ours, &theirs, &what);
    if o.success() && std::fs::read(&ours).unwrap().starts_with(b"QFI\xfb") {
        let c = qemu_img(["check".as_ref(), ours.as_os_str()]);
        assert_eq!(c.code, Some(0), "{what}: qemu-img check:\n{}", c.describe());
    }
    o
}

/// An image with data spread over its whole size: a written cluster-sized run every `stride` bytes.
fn filled(
    s: &Scratch,
    name: &str,
    opts: &str,
    size: u64,
    stride: u64,
    compressed: bool,
) -> std::path::PathBuf {
    let img = s.qcow2(name, opts, size);
    let mut cmds = Vec::new();
    let mut at = 0;
    let mut byte = 1u8;
    while at < size {
        let len = 4096.min(size - at);
        let c = if compressed && byte.is_multiple_of(3) {
            "-c "
        } else {
            ""
        };
        if c.is_empty() || len == 4096 {
            cmds.push(format!("write {c}-P {byte} {at} {len}"));
        }
        at += stride;
        byte = byte.wrapping_add(1).max(1);
    }
    qemu_io_cmds(&img, "qcow2", &cmds);
    img
}

#[test]
fn results_match_qemu_img() {
    let s = Scratch::new();
    let images: [(&str, &str, u64, u64, bool); 9] = [
        ("64k", "", 64 << 20, 3 << 20, false),
        ("512", "cluster_size=512", 4 << 20, 96 << 10, false),
        (
            "4k v2",
            "cluster_size=4096,compat=0.10",
            16 << 20,
            1 << 20,
            false,
        ),
        (
            "16k extl2",
            "cluster_size=16384,extended_l2=on",
            16 << 20,
            1 << 20,
            false,
        ),
        ("2M", "cluster_size=2M", 64 << 20, 5 << 20, false),
        (
            "1k refbits=1",
            "cluster_size=1024,refcount_bits=1",
            4 << 20,
            100 << 10,
            false,
        ),
        (
            "4k refbits=64",
            "cluster_size=4096,refcount_bits=64",
            8 << 20,
            300 << 10,
            false,
        ),
        (
            "4k compressed",
            "cluster_size=4096",
            8 << 20,
            200 << 10,
            true,
        ),
        (
            "lazy",
            "cluster_size=4096,lazy_refcounts=on",
            8 << 20,
            300 << 10,
            false,
        ),
    ];
    for (n, (name, opts, size, stride, compressed)) in images.into_iter().enumerate() {
        let img = filled(&s, &format!("{n}.qcow2"), opts, size, stride, compressed);
        let sizes = [
            format!("+{}", size / 4),
            format!("{}", size * 64),
            format!("{}", size + 512),
            "+0".to_string(),
        ];
        for size_arg in &sizes {
            both(&s, &img, &[size_arg], name);
        }
        let shrinks = [
            format!("{}", size / 2),
            format!("{}", size / 3 / 512 * 512),
            "512".to_string(),
            format!("-{}", size / 8),
        ];
        for size_arg in &shrinks {
            both(&s, &img, &["--shrink", size_arg], name);
        }
    }
}

/// Shrinking images with internal snapshots (the snapshot keeps its clusters; shared L2 tables are copied
/// before their entries are dropped) and growing them.
#[test]
fn images_with_snapshots() {
    let s = Scratch::new();
    for (opts, size) in [
        ("cluster_size=4096", 8u64 << 20),
        ("cluster_size=512", 2 << 20),
    ] {
        let img = filled(&s, "snap.qcow2", opts, size, size / 16, false);
        qemu_img_ok(["snapshot", "-c", "one", img.to_str().unwrap()]);
        qemu_io_cmds(&img, "qcow2", &[format!("write -P 0x77 {} 64k", size / 2)]);
        for args in [
            vec!["--shrink".to_string(), (size / 4).to_string()],
            vec![(size * 100).to_string()],
            vec!["--shrink".to_string(), "-1M".to_string()],
        ] {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            both(&s, &img, &args, opts);
        }
        // v2 with a snapshot: refused by both, nothing changed.
        let v2 = s.qcow2("v2.qcow2", "compat=0.10", 1 << 20);
        qemu_img_ok(["snapshot", "-c", "one", v2.to_str().unwrap()]);
        let o = both(&s, &v2, &["2M"], "v2 with a snapshot");
        assert!(!o.success());
    }
}

/// Growing an image whose backing file is longer: the new area reads as zeros, not as the backing file's
/// data, in both tools' results.
#[test]
fn backing_file_does_not_show_through() {
    let s = Scratch::new();
    let base = s.qcow2("base.qcow2", "", 4 << 20);
    qemu_io_cmds(&base, "qcow2", &["write -P 0x33 0 4M".to_string()]);
    for opts in ["", "cluster_size=16384,extended_l2=on", "compat=0.10"] {
        let top = s.create(
            "top.qcow2",
            "qcow2",
            opts,
            1 << 20,
            Some(("base.qcow2", "qcow2")),
        );
        qemu_io_cmds(&top, "qcow2", &["write -P 0x44 4096 8192".to_string()]);
        for size in ["3M", "+2560k", "8M"] {
            both(&s, &top, &[size], opts);
            let ours = s.path("ours.img");
            let io = qemu_img([
                "compare".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                ours.as_os_str(),
                top.as_os_str(),
            ]);
            // The old area is unchanged; the new one is zero (compare says the sizes differ only in zeros).
            assert_eq!(io.code, Some(0), "{opts} {size}: {}", io.describe());
        }
    }
}

#[test]
fn raw_files() {
    let s = Scratch::new();
    let raw = s.path("r.raw");
    std::fs::write(&raw, vec![0x5au8; 3000]).unwrap();
    for args in [
        vec!["-f", "raw", "1M"],
        vec!["-f", "raw", "+1000"],
        vec!["-f", "raw", "--shrink", "1000"],
        vec!["-f", "raw", "--preallocation=falloc", "2M"],
        vec!["-f", "raw", "--preallocation=full", "2M"],
        vec!["-f", "raw", "--preallocation=metadata", "2M"],
        vec!["-f", "raw", "1000"],
        vec!["-q", "-f", "raw", "+4k"],
        vec!["+4k"],
    ] {
        both(&s, &raw, &args, "raw");
    }
}

/// Every mistake gives qemu-img's message and exit code, and leaves the image as it was.
#[test]
fn refusals_match_qemu_img() {
    let s = Scratch::new();
    let img = filled(
        &s,
        "img.qcow2",
        "cluster_size=4096",
        4 << 20,
        1 << 20,
        false,
    );
    let cases: [&[&str]; 15] = [
        &["3M"],
        &["--shrink", "0"],
        &["--shrink", "-8M"],
        &["+1"],
        &["1000001"],
        &["abc"],
        &["--preallocation=bogus", "+1M"],
        &["--preallocation=full", "--shrink", "1M"],
        &["--preallocation=metadata", "4M"],
        &["--preallocation=falloc", "4M"],
        &["--preallocation=full", "+0"],
        &["-f", "raw", "--shrink", "-4M"],
        &["1E"],
        &["8E"],
        &["--bogus", "1M"],
    ];
    for args in cases {
        let before = std::fs::read(&img).unwrap();
        let o = both(&s, &img, args, "refusal");
        assert!(!o.success(), "{args:?} succeeded");
        assert_eq!(
            std::fs::read(s.path("ours.img")).unwrap(),
            before,
            "{args:?} changed the image"
        );
    }
    // Missing and extra arguments, and a file that does not exist.
    for args in [
        vec!["resize"],
        vec!["resize", "x"],
        vec!["resize", "a", "b", "c"],
        vec!["resize", "-q", "-1M", "x"],
        vec!["resize", s.path("none.qcow2").to_str().unwrap(), "1M"],
        vec![
            "resize",
            "-f",
            "qcow2",
            s.path("none.raw").to_str().unwrap(),
            "1M",
        ],
    ] {
        let o = qcow2(&args);
        let t = qemu_img(&args);
        assert_eq!(o.code, t.code, "{args:?}");
        assert_eq!(o.stderr_str(), t.stderr_as_ours(), "{args:?}");
    }
}

/// `--preallocation=metadata` when growing: every new cluster mapped to a host cluster that reads as zeros
/// (with extended L2, reserved with no subcluster allocated), placed as qemu-img places them (past a free
/// hole too short for the run, new L2 tables first), the file grown to cover them; byte-identical.
#[test]
fn metadata_preallocation_matches_qemu_img() {
    let s = Scratch::new();
    for opts in [
        "cluster_size=65536",
        "cluster_size=4096",
        "cluster_size=512",
        "cluster_size=2M",
        "cluster_size=65536,extended_l2=on",
        "compat=0.10",
        "cluster_size=4096,refcount_bits=1",
    ] {
        let img = s.qcow2("p.qcow2", opts, 1 << 20);
        qemu_io_cmds(
            &img,
            "qcow2",
            &[
                "write -P 1 0 64k".to_string(),
                "write -P 2 960k 64k".to_string(),
            ],
        );
        for size in ["4M", "+40M"] {
            both(&s, &img, &["--preallocation=metadata", size], opts);
        }
    }
}

/// `--preallocation=falloc|full` when growing: new refcount structures after the last cluster in use (a new
/// refcount table, the old one freed), the new clusters in one run after them (zeros written for `full`),
/// mapped by L2 tables allocated as qemu-img allocates them, a cluster holding an unaligned old end copied;
/// byte-identical, the new area reading zeros (through a longer backing file too), `qemu-img check` clean.
#[test]
fn falloc_and_full_preallocation_match_qemu_img() {
    let s = Scratch::new();
    let base = s.qcow2("base.qcow2", "cluster_size=65536", 8 << 20);
    qemu_io_cmds(&base, "qcow2", &["write -P 9 0 8M".to_string()]);
    let mut checked = 0;
    for (opts, old, backing) in [
        ("cluster_size=65536", 1 << 20, false),
        ("cluster_size=4096", 1 << 20, false),
        ("cluster_size=512", 1 << 20, false),
        ("cluster_size=2M", 1 << 20, false),
        ("cluster_size=65536,extended_l2=on", 1 << 20, false),
        ("compat=0.10", 1 << 20, false),
        ("cluster_size=4096,refcount_bits=1", 1 << 20, false),
        ("cluster_size=4096,refcount_bits=64", 1 << 20, false),
        ("cluster_size=4096,lazy_refcounts=on", 1 << 20, false),
        ("cluster_size=65536", 100 << 10, false),
        ("cluster_size=16384,extended_l2=on", 100 << 10, false),
        ("cluster_size=65536", 1 << 20, true),
        ("cluster_size=65536,extended_l2=on", 1 << 20, true),
        ("cluster_size=4096,compat=0.10", 1 << 20, true),
    ] {
        let img = if backing {
            s.create("p.qcow2", "qcow2", opts, old, Some(("base.qcow2", "qcow2")))
        } else {
            s.qcow2("p.qcow2", opts, old)
        };
        let last = old.min(1 << 20) - 64 * 1024;
        let mut cmds = vec![
            "write -P 1 0 64k".to_string(),
            format!("write -P 2 {last} 64k"),
            // A freed cluster at the end: the file is longer than its last cluster in use.
            "write -P 3 0 4k".to_string(),
            format!("discard {last} 64k"),
        ];
        if old >= 1 << 20 && !opts.contains("2M") {
            cmds.push("write -c -P 4 128k 64k".to_string());
        }
        qemu_io_cmds(&img, "qcow2", &cmds);
        for mode in ["falloc", "full"] {
            for size in ["4M", "+40M"] {
                let what = format!(
                    "{opts}, {old} bytes{}",
                    if backing { ", backing" } else { "" }
                );
                let o = both(&s, &img, &[&format!("--preallocation={mode}"), size], &what);
                assert!(o.success(), "{what}: {}", o.describe());
                // The old disk as it was, the new area zeros.
                let ours = s.path("ours.img");
                let read = qcow2_tests::qemu_io([
                    "-f".as_ref(),
                    "qcow2".as_ref(),
                    "-c".as_ref(),
                    format!("read -P 0 {old} 1M").as_ref(),
                    "-c".as_ref(),
                    "read -P 3 0 4k".as_ref(),
                    ours.as_os_str(),
                ]);
                assert!(
                    read.success() && !read.stdout_str().contains("fail"),
                    "{what} {mode} {size}: {}",
                    read.describe()
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 56);
}

/// An encrypted image is refused (its new clusters would not read as zeros; qemu-img leaves them reading
/// as noise), the file untouched.
#[test]
fn falloc_of_an_encrypted_image_is_refused() {
    let s = Scratch::new();
    let img = s.path("e.qcow2");
    let secret = "secret,id=s0,data=pass";
    qemu_img_ok([
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        secret,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        img.to_str().unwrap(),
        "1M",
    ]);
    let before = std::fs::read(&img).unwrap();
    let opts = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=s0",
        img.display()
    );
    let o = qcow2([
        "resize",
        "--object",
        secret,
        "--image-opts",
        "--preallocation=falloc",
        &opts,
        "2M",
    ]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(o.stderr_str().contains("encrypted"), "{}", o.describe());
    assert_eq!(std::fs::read(&img).unwrap(), before);
}
