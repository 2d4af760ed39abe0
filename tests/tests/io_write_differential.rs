//! The project's "done" test for writes: random write, zero and discard sequences applied through
//! `qcow2 io` and through qemu-io to copies of the same image give identical guest contents, and
//! `qemu-img check` finds both images clean.

use std::ffi::OsString;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Sequences run by this binary's tests so far.
static RUN: AtomicU64 = AtomicU64::new(0);

/// Records the sequences run so far (every test adds to the count; the last one to finish has the total).
fn record() {
    let n = RUN.load(Ordering::SeqCst);
    qcow2_tests::record_evidence(
        "io_write_differential",
        &format!(
            "io_write_differential: {n} random sequences through qcow2 io and qemu-io, identical contents, clean checks"
        ),
    );
}

use qcow2_tests::ops::{Op, ops, twin_images};
use qcow2_tests::{Scratch, qcow2, qemu_img, qemu_img_ok, qemu_io_cmds};

fn raw(s: &Scratch, img: &Path, name: &str) -> Vec<u8> {
    let out = s.path(name);
    qemu_img_ok([
        "convert".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        img.as_os_str(),
        out.as_os_str(),
    ]);
    std::fs::read(out).unwrap()
}

fn assert_clean(img: &Path, who: &str, cmds: &[String]) {
    let out = qemu_img(["check".as_ref(), img.as_os_str()]);
    assert!(
        out.code == Some(0),
        "qemu-img check after {who}'s writes is not clean:\n{}\ncommands: {cmds:?}",
        out.describe()
    );
}

/// Runs `cmds` through `qcow2 io` on `ours` and qemu-io on `theirs`; each must succeed and leave a clean image.
fn both_tools(ours: &Path, theirs: &Path, cmds: &[String], what: &str) {
    let mut args: Vec<OsString> = vec!["io".into(), "-f".into(), "qcow2".into()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.into());
    }
    args.push(ours.into());
    let out = qcow2(&args);
    let text = out.stdout_str() + &out.stderr_str();
    assert!(
        out.success() && !text.contains("failed"),
        "qcow2 io failed ({what}):\n{}",
        out.describe()
    );
    qemu_io_cmds(theirs, "qcow2", cmds);
    assert_clean(ours, "qcow2 io", cmds);
    assert_clean(theirs, "qemu-io", cmds);
}

/// `seeds` random sequences of `count` operations on an image made with `opts`.
fn sequences(
    opts: &str,
    size: u64,
    cluster: u64,
    backing: Option<&str>,
    setup: &[&str],
    seeds: u64,
) {
    let s = Scratch::new();
    let (ours, theirs) = twin_images(&s, opts, size, backing, setup, false);
    for seed in 0..seeds {
        let seq = ops(seed.wrapping_mul(7919) ^ size ^ cluster, size, cluster, 30);
        let cmds: Vec<String> = seq.iter().map(Op::qemu_io).collect();
        both_tools(&ours, &theirs, &cmds, &format!("{opts}, seed {seed}"));
        let a = raw(&s, &ours, "ours.raw");
        let b = raw(&s, &theirs, "theirs.raw");
        if let Some(diff) = qcow2_tests::bytes_diff(&a, &b) {
            panic!("{opts}, seed {seed}: contents differ: {diff}\ncommands: {cmds:?}");
        }
        RUN.fetch_add(1, Ordering::SeqCst);
    }
    record();
}

/// Writes (any size and alignment), zero writes and discards leave the image file as qemu-io leaves it: a
/// request's new clusters right after its previous host cluster where that is free, else one contiguous run
/// past free holes too short for it, new L2 tables first, a whole zero cluster given back with `-u` (and the
/// space of given-back clusters released in the file, qemu-io's discard=unmap). After random sequences (run
/// one after another on the same images, with and without backing files), the two files are byte for byte
/// the same (and `qemu-img map` the same, for a readable message where they are not). `LAYOUT_SEEDS=N` runs N
/// sequences per layout (4 by default).
#[test]
fn files_identical_after_random_writes() {
    let mut runs = 0;
    for (opts, size, cluster, backing) in [
        ("", 8u64 << 20, 65536u64, None),
        (
            "cluster_size=4096",
            4 << 20,
            4096,
            Some("cluster_size=65536"),
        ),
        (
            "cluster_size=65536,extended_l2=on",
            4 << 20,
            65536,
            Some(""),
        ),
        ("cluster_size=4096", 4 << 20, 4096, None),
        ("cluster_size=512", 2 << 20, 512, None),
        ("cluster_size=1024,refcount_bits=64", 2 << 20, 1024, None),
        ("compat=0.10,cluster_size=4096", 4 << 20, 4096, None),
        ("lazy_refcounts=on,cluster_size=8192", 4 << 20, 8192, None),
        ("cluster_size=16384,extended_l2=on", 4 << 20, 16384, None),
        ("cluster_size=2M", 16 << 20, 2 << 20, None),
    ] {
        let s = Scratch::new();
        let (ours, theirs) = twin_images(&s, opts, size, backing, &[], false);
        for seed in 0..std::env::var("LAYOUT_SEEDS").map_or(4u64, |v| v.parse().unwrap()) {
            let seq = ops(seed.wrapping_mul(104_729) ^ cluster, size, cluster, 40);
            let cmds: Vec<String> = seq.iter().map(Op::qemu_io).collect();
            if std::env::var_os("LAYOUT_PRINT").is_some() {
                eprintln!("SEQ {}", serde_json::to_string(&cmds).unwrap());
            }
            both_tools(&ours, &theirs, &cmds, &format!("{opts}, seed {seed}"));
            let (ma, mb) = (map(&ours), map(&theirs));
            if ma == mb {
                let (a, b) = (
                    std::fs::read(&ours).unwrap(),
                    std::fs::read(&theirs).unwrap(),
                );
                if let Some(d) = qcow2_tests::bytes_diff(&a, &b) {
                    panic!("{opts}, seed {seed}: files differ: {d}\ncommands: {cmds:?}");
                }
            }
            if ma != mb {
                let diff = ma.lines().zip(mb.lines()).find(|(x, y)| x != y);
                panic!(
                    "{opts}, seed {seed}: layouts differ (ours, qemu-io): {diff:?}\ncommands: {cmds:?}"
                );
            }
            runs += 1;
        }
    }
    qcow2_tests::record_evidence(
        "io_write_differential-layout",
        &format!(
            "io_write_differential files: {runs} sequences of writes, zero writes and discards, each pair of files byte-identical to qemu-io's"
        ),
    );
}

/// `qemu-img map --output=json` of an image.
fn map(img: &Path) -> String {
    qemu_img_ok([
        "map".as_ref(),
        "--output=json".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        img.as_os_str(),
    ])
}

#[test]
fn default_options() {
    sequences("", 8 << 20, 65536, None, &[], 6);
}

#[test]
fn cluster_sizes_and_refcount_widths() {
    for (opts, cluster) in [
        ("cluster_size=512,refcount_bits=1", 512),
        ("cluster_size=4096,refcount_bits=8", 4096),
        ("cluster_size=16384,refcount_bits=64", 16384),
        ("cluster_size=2M", 2 << 20),
    ] {
        sequences(opts, 8 << 20, cluster, None, &[], 3);
    }
}

#[test]
fn compat_010_and_lazy_refcounts() {
    sequences("compat=0.10", 4 << 20, 65536, None, &[], 3);
    sequences("lazy_refcounts=on", 4 << 20, 65536, None, &[], 3);
}

#[test]
fn extended_l2() {
    sequences("extended_l2=on", 8 << 20, 65536, None, &[], 4);
    sequences(
        "extended_l2=on,cluster_size=16k",
        4 << 20,
        16384,
        Some(""),
        &[],
        3,
    );
}

#[test]
fn backing_and_compressed() {
    sequences("", 4 << 20, 65536, Some("cluster_size=4096"), &[], 4);
    sequences(
        "",
        4 << 20,
        65536,
        None,
        &["write -c -P 0x33 0 1M", "write -c -P 0x44 2M 512k"],
        4,
    );
}

#[test]
fn preallocated_images() {
    for opts in [
        "preallocation=metadata",
        "preallocation=falloc",
        "preallocation=full,cluster_size=4096",
        "preallocation=metadata,extended_l2=on",
        "preallocation=metadata,compat=0.10",
    ] {
        sequences(
            opts,
            4 << 20,
            if opts.contains("4096") { 4096 } else { 65536 },
            None,
            &[],
            3,
        );
    }
}

#[test]
fn snapshot_shared_clusters() {
    for opts in ["", "extended_l2=on", "cluster_size=4096,refcount_bits=64"] {
        let cluster = if opts.contains("4096") { 4096 } else { 65536 };
        let s = Scratch::new();
        let (ours, theirs) = twin_images(
            &s,
            opts,
            4 << 20,
            None,
            &["write -P 0x55 0 3M", "write -c -P 0x66 3M 512k"],
            true,
        );
        let before = raw(&s, &ours, "before.raw");
        for seed in 0..3u64 {
            let seq = ops(seed * 31 + 5, 4 << 20, cluster, 30);
            let cmds: Vec<String> = seq.iter().map(Op::qemu_io).collect();
            let mut args: Vec<OsString> = vec!["io".into(), "-f".into(), "qcow2".into()];
            for c in &cmds {
                args.push("-c".into());
                args.push(c.into());
            }
            args.push(ours.clone().into());
            let out = qcow2(&args);
            assert!(out.success(), "{}", out.describe());
            qemu_io_cmds(&theirs, "qcow2", &cmds);
            assert_clean(&ours, "qcow2 io", &cmds);
            let a = raw(&s, &ours, "ours.raw");
            let b = raw(&s, &theirs, "theirs.raw");
            if let Some(diff) = qcow2_tests::bytes_diff(&a, &b) {
                panic!("{opts}, seed {seed}: contents differ: {diff}\ncommands: {cmds:?}");
            }
            RUN.fetch_add(1, Ordering::SeqCst);
        }
        record();
        // The snapshot still holds what it held, read through qemu-img.
        let snap = s.path("snap.raw");
        qemu_img_ok([
            "convert".as_ref(),
            "-l".as_ref(),
            "snap".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            ours.as_os_str(),
            snap.as_os_str(),
        ]);
        assert!(
            std::fs::read(&snap).unwrap() == before,
            "{opts}: snapshot changed"
        );
        // And after `snapshot -a` the image reads it back.
        qemu_img_ok([
            "snapshot".as_ref(),
            "-a".as_ref(),
            "snap".as_ref(),
            ours.as_os_str(),
        ]);
        assert_clean(&ours, "snapshot -a", &[]);
        assert!(
            raw(&s, &ours, "applied.raw") == before,
            "{opts}: snapshot -a"
        );
    }
}

/// Many more sequences over a spread of images (with the tests above, over 200 in all).
#[test]
fn many_sequences() {
    for (opts, cluster, backing) in [
        ("", 65536, None),
        ("cluster_size=4096", 4096, Some("")),
        ("cluster_size=1024,refcount_bits=2", 1024, None),
        (
            "extended_l2=on,cluster_size=32k",
            32768,
            Some("cluster_size=4096"),
        ),
        ("compat=0.10,cluster_size=8192", 8192, None),
        (
            "lazy_refcounts=on,cluster_size=16384,refcount_bits=32",
            16384,
            Some(""),
        ),
    ] {
        sequences(opts, 4 << 20, cluster, backing, &[], 25);
    }
}
