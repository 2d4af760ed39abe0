//! `qcow2 create` against `qemu-img create`: the same arguments must give byte-identical files, the same
//! "Formatting" line, the same errors (exit code 1), and images that `qemu-img check` finds clean.

use std::ffi::OsString;
use std::path::Path;

use qcow2_tests::{
    Output, Scratch, assert_bytes_equal, assert_clean_error, qcow2, qemu_img, qemu_img_ok,
};

/// Replaces the image path in a tool's text so the two runs compare.
fn normalize(text: &str, path: &Path) -> String {
    text.replace(&path.display().to_string(), "IMG")
}

/// The message of a failed run without the program name prefix, first line only.
fn error_line(out: &Output, path: &Path) -> String {
    let err = out.stderr_str();
    let first = err.lines().next().unwrap_or("");
    let first = first
        .strip_prefix("qemu-img: ")
        .or_else(|| first.strip_prefix("qcow2: "))
        .unwrap_or(first);
    normalize(first, path)
}

fn args(opts: &str, extra: &[&str], img: &Path, size: Option<&str>) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["create".into(), "-f".into(), "qcow2".into()];
    if !opts.is_empty() {
        a.push("-o".into());
        a.push(opts.into());
    }
    a.extend(extra.iter().map(OsString::from));
    a.push(img.into());
    if let Some(s) = size {
        a.push(s.into());
    }
    a
}

/// Creates the image with both tools (qemu-img first); compares the printed line and the whole files, and
/// runs `qemu-img check` on ours. `data_file`, if given, is the external data file both images name: it is
/// compared too.
fn compare_with(
    s: &Scratch,
    name: &str,
    opts: &str,
    size: Option<&str>,
    extra: &[&str],
    data_file: Option<&Path>,
) {
    let q = s.path(&format!("q-{name}.qcow2"));
    let m = s.path(&format!("m-{name}.qcow2"));
    let qout = qemu_img(args(opts, extra, &q, size));
    assert!(
        qout.success(),
        "qemu-img create failed:\n{}",
        qout.describe()
    );
    let qdata = data_file.map(|d| std::fs::read(d).expect("qemu-img's data file"));
    if let Some(d) = data_file {
        std::fs::remove_file(d).unwrap();
    }
    let mout = qcow2(args(opts, extra, &m, size));
    assert!(mout.success(), "qcow2 create failed:\n{}", mout.describe());
    assert_eq!(
        normalize(&mout.stdout_str(), &m),
        normalize(&qout.stdout_str(), &q),
        "Formatting line for -o '{opts}' {extra:?} {size:?}"
    );
    let qb = std::fs::read(&q).unwrap();
    let mb = std::fs::read(&m).unwrap();
    assert_bytes_equal(&mb, &qb, &format!("create -o '{opts}' {extra:?} {size:?}"));
    if let (Some(d), Some(qd)) = (data_file, qdata) {
        let md = std::fs::read(d).expect("our data file");
        assert_bytes_equal(&md, &qd, &format!("data file of -o '{opts}'"));
    }
    if extra.contains(&"-u") {
        // The backing file may not exist: `qemu-img check` would not open the image.
        return;
    }
    let check = qemu_img([
        OsString::from("check"),
        OsString::from("-f"),
        OsString::from("qcow2"),
        m.clone().into(),
    ]);
    assert!(
        check.success() && check.stdout_str().contains("No errors were found"),
        "qemu-img check on our image:\n{}",
        check.describe()
    );
    let _ = std::fs::remove_file(&q);
    let _ = std::fs::remove_file(&m);
}

fn compare(opts: &str, size: &str) {
    let s = Scratch::new();
    compare_with(&s, "img", opts, Some(size), &[], None);
}

#[test]
fn default_1m() {
    compare("", "1M");
}

#[test]
fn default_64m() {
    compare("", "64M");
}

#[test]
fn default_1g() {
    compare("", "1G");
}

#[test]
fn cluster_size_512() {
    compare("cluster_size=512", "1G");
}

#[test]
fn cluster_size_4k() {
    compare("cluster_size=4k", "1G");
}

#[test]
fn cluster_size_64k() {
    compare("cluster_size=64k", "1G");
}

#[test]
fn cluster_size_1m() {
    compare("cluster_size=1M", "1G");
}

#[test]
fn cluster_size_2m() {
    compare("cluster_size=2M", "1G");
}

#[test]
fn refcount_bits_1() {
    compare("refcount_bits=1", "1G");
}

#[test]
fn refcount_bits_8() {
    compare("refcount_bits=8", "1G");
}

#[test]
fn refcount_bits_64() {
    compare("refcount_bits=64", "1G");
}

#[test]
fn extended_l2_1g() {
    compare("extended_l2=on,cluster_size=64k", "1G");
}

#[test]
fn extended_l2_64m() {
    compare("extended_l2=on,cluster_size=64k", "64M");
}

#[test]
fn compat_0_10() {
    compare("compat=0.10", "1G");
}

#[test]
fn lazy_refcounts() {
    compare("lazy_refcounts=on", "1G");
}

#[test]
fn compression_type_zstd() {
    compare("compression_type=zstd", "1G");
}

#[test]
fn preallocation_metadata() {
    compare("preallocation=metadata", "1M");
}

#[test]
fn preallocation_falloc() {
    compare("preallocation=falloc", "1M");
}

#[test]
fn preallocation_full() {
    compare("preallocation=full", "1M");
}

#[test]
fn one_tib() {
    compare("", "1T");
    compare("cluster_size=2M", "1T");
    compare("cluster_size=4k,refcount_bits=64", "1T");
}

#[test]
fn preallocation_corners() {
    // A refcount block falls exactly at an allocation's start; several refcount blocks; subcluster-rounded
    // file end; a multi-block refcount area for falloc; unaligned and empty sizes.
    compare("preallocation=metadata,cluster_size=512", "5M");
    compare(
        "preallocation=metadata,cluster_size=4k,refcount_bits=1",
        "300M",
    );
    compare("preallocation=metadata,extended_l2=on", "1000");
    compare("preallocation=falloc,cluster_size=4k", "300M");
    compare("preallocation=falloc,extended_l2=on,cluster_size=16k", "5M");
    compare("preallocation=full,cluster_size=1k,refcount_bits=2", "5M");
    compare("preallocation=metadata,compat=0.10", "1049088");
    compare("preallocation=falloc", "0");
    // The refcount table outgrows its cluster while metadata is allocated.
    compare(
        "preallocation=metadata,cluster_size=512,refcount_bits=64",
        "5M",
    );
    compare("preallocation=metadata,cluster_size=512", "20M");
    compare("cluster_size=512,refcount_bits=1", "120G");
    compare("", "1000");
}

#[test]
fn backing_qcow2_size_from_backing() {
    let s = Scratch::new();
    let base = s.create("base.qcow2", "qcow2", "", 64 << 20, None);
    let b = base.display().to_string();
    compare_with(&s, "ovl", "", None, &["-b", &b, "-F", "qcow2"], None);
    compare_with(
        &s,
        "ovl-sized",
        "",
        Some("1G"),
        &["-b", &b, "-F", "qcow2"],
        None,
    );
    compare_with(
        &s,
        "ovl-v2",
        "compat=0.10",
        None,
        &["-b", &b, "-F", "qcow2"],
        None,
    );
    compare_with(
        &s,
        "ovl-opts",
        &format!("backing_file={b},backing_fmt=qcow2"),
        None,
        &[],
        None,
    );
    compare_with(
        &s,
        "ovl-prealloc",
        "extended_l2=on,preallocation=metadata",
        Some("5M"),
        &["-b", &b, "-F", "qcow2"],
        None,
    );
    compare_with(
        &s,
        "ovl-unsafe",
        "",
        Some("5M"),
        &["-u", "-b", "/nonexistent/base", "-F", "qcow2"],
        None,
    );
}

#[test]
fn backing_raw() {
    let s = Scratch::new();
    let base = s.create("base.raw", "raw", "", 32 << 20, None);
    let b = base.display().to_string();
    compare_with(&s, "ovl", "", None, &["-b", &b, "-F", "raw"], None);
    compare_with(
        &s,
        "ovl-4k",
        "cluster_size=4k",
        Some("1G"),
        &["-b", &b, "-F", "raw"],
        None,
    );
}

#[test]
fn data_file() {
    let s = Scratch::new();
    let d = s.path("img.data");
    let dn = d.display().to_string();
    compare_with(
        &s,
        "df",
        &format!("data_file={dn}"),
        Some("1M"),
        &[],
        Some(&d),
    );
    compare_with(
        &s,
        "df-raw",
        &format!("data_file={dn},data_file_raw=on"),
        Some("1M"),
        &[],
        Some(&d),
    );
    compare_with(
        &s,
        "df-meta",
        &format!("data_file={dn},preallocation=metadata"),
        Some("3M"),
        &[],
        Some(&d),
    );
    let base = s.create("base.qcow2", "qcow2", "", 4 << 20, None);
    let b = base.display().to_string();
    compare_with(
        &s,
        "df-backing",
        &format!("data_file={dn}"),
        None,
        &["-b", &b, "-F", "qcow2"],
        Some(&d),
    );
}

#[test]
fn quiet_prints_nothing() {
    let s = Scratch::new();
    let m = s.path("q.qcow2");
    let out = qcow2([
        OsString::from("create"),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        m.clone().into(),
        "1M".into(),
    ]);
    assert!(out.success(), "{}", out.describe());
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "{}",
        out.describe()
    );
}

#[test]
fn raw_images() {
    let s = Scratch::new();
    for (opts, size) in [
        ("", "1M"),
        ("preallocation=full", "3M"),
        ("preallocation=falloc", "1000"),
    ] {
        let q = s.path("q.raw");
        let m = s.path("m.raw");
        let mut qa: Vec<OsString> = vec!["create".into(), "-f".into(), "raw".into()];
        if !opts.is_empty() {
            qa.push("-o".into());
            qa.push(opts.into());
        }
        let mut ma = qa.clone();
        qa.extend([q.clone().into(), size.into()]);
        ma.extend([m.clone().into(), size.into()]);
        let qout = qemu_img_ok(&qa);
        let mout = qcow2(&ma);
        assert!(mout.success(), "{}", mout.describe());
        assert_eq!(normalize(&mout.stdout_str(), &m), normalize(&qout, &q));
        assert_bytes_equal(
            &std::fs::read(&m).unwrap(),
            &std::fs::read(&q).unwrap(),
            "raw create",
        );
    }
}

/// Bad arguments: the same first error line (after the program name) and exit code 1, and the same
/// "Formatting" line where qemu-img prints one before failing.
#[test]
fn errors_match_qemu_img() {
    let s = Scratch::new();
    let cases: &[(&str, Option<&str>, &[&str])] = &[
        ("cluster_size=1000", Some("1M"), &[]),
        ("cluster_size=4M", Some("1M"), &[]),
        ("refcount_bits=3", Some("1M"), &[]),
        ("refcount_bits=128", Some("1M"), &[]),
        ("refcount_bits=8,compat=0.10", Some("1M"), &[]),
        ("extended_l2=on,cluster_size=8k", Some("1M"), &[]),
        ("extended_l2=on,compat=0.10", Some("1M"), &[]),
        ("lazy_refcounts=on,compat=0.10", Some("1M"), &[]),
        ("compression_type=zstd,compat=0.10", Some("1M"), &[]),
        ("compression_type=lz4", Some("1M"), &[]),
        ("compat=2.0", Some("1M"), &[]),
        ("preallocation=foo", Some("1M"), &[]),
        ("data_file=x,compat=0.10", Some("1M"), &[]),
        ("data_file_raw=on", Some("1M"), &[]),
        ("extended_l2=maybe", Some("1M"), &[]),
        ("lazy_refcounts=1", Some("1M"), &[]),
        ("foo=bar", Some("1M"), &[]),
        ("cluster_size=abc", Some("1M"), &[]),
        ("refcount_bits=abc", Some("1M"), &[]),
        ("backing_fmt=qcow2", Some("1M"), &[]),
        (
            "preallocation=metadata",
            Some("1M"),
            &["-u", "-b", "base", "-F", "qcow2"],
        ),
        ("size=2M", Some("3M"), &[]),
        // Several problems at once: qemu-img's order decides which one is reported.
        ("refcount_bits=3,compat=0.10", Some("1M"), &[]),
        (
            "extended_l2=on,cluster_size=8k,compat=0.10",
            Some("1M"),
            &[],
        ),
        (
            "refcount_bits=8,extended_l2=on,compat=0.10",
            Some("1M"),
            &[],
        ),
        ("data_file_raw=on,backing_fmt=raw", Some("1M"), &[]),
        ("preallocation=foo,compat=2.0", Some("1M"), &[]),
        ("preallocation=foo,compression_type=lz4", Some("1M"), &[]),
        (
            "backing_fmt=raw,compat=0.10,lazy_refcounts=on",
            Some("1M"),
            &[],
        ),
        (
            "data_file=x,compression_type=zstd,compat=0.10",
            Some("1M"),
            &[],
        ),
        (
            "cluster_size=1000,extended_l2=on,compat=0.10",
            Some("1M"),
            &[],
        ),
        ("", None, &[]),
        ("cluster_size=512", Some("1T"), &[]),
        ("", Some("64P"), &[]),
        ("", Some("5M"), &["-u", "-b", "nonexistent", "-F", "qcow2"]),
        ("", None, &["-u", "-b", "nonexistent", "-F", "qcow2"]),
    ];
    for (opts, size, extra) in cases {
        let q = s.path("q.qcow2");
        let m = s.path("m.qcow2");
        let qout = qemu_img(args(opts, extra, &q, *size));
        let mout = qcow2(args(opts, extra, &m, *size));
        if qout.success() {
            // (-u with a size succeeds: covered by the byte comparisons.)
            assert!(mout.success(), "{}", mout.describe());
            continue;
        }
        assert_eq!(qout.code, Some(1), "{}", qout.describe());
        assert_eq!(mout.code, Some(1), "{}", mout.describe());
        assert_clean_error(&mout);
        assert_eq!(
            error_line(&mout, &m),
            error_line(&qout, &q),
            "error for -o '{opts}' {extra:?} {size:?}"
        );
        assert_eq!(
            normalize(&mout.stdout_str(), &m),
            normalize(&qout.stdout_str(), &q),
            "stdout for -o '{opts}' {extra:?} {size:?}"
        );
        let _ = std::fs::remove_file(&q);
        let _ = std::fs::remove_file(&m);
    }
}
