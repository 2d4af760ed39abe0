//! `qcow2 convert -O qcow2 [-c] [-o OPTIONS]`: the output has the source's guest content
//! (`qemu-img compare`), is clean in `qemu-img check`, is made with the options given, and with `-c` stores
//! compressible clusters compressed (deflate or zstd) in a form qemu-img reads.

use std::path::Path;

use qcow2_tests::{Scratch, noise, qcow2, qemu_img, qemu_img_ok, qemu_io_cmds, text, write_at};

fn convert_and_verify(s: &Scratch, src: &Path, args: &[&str], name: &str) -> serde_json::Value {
    let dst = s.path(name);
    let mut all: Vec<&str> = vec!["convert", "-O", "qcow2"];
    all.extend_from_slice(args);
    all.push(src.to_str().unwrap());
    all.push(dst.to_str().unwrap());
    let out = qcow2(&all);
    assert!(out.success(), "{}", out.describe());
    let cmp = qemu_img(["compare", src.to_str().unwrap(), dst.to_str().unwrap()]);
    assert!(cmp.code == Some(0), "{args:?}: {}", cmp.describe());
    let check = qemu_img(["check", dst.to_str().unwrap()]);
    assert!(check.code == Some(0), "{args:?}: {}", check.describe());
    let info = qemu_img_ok(["info", "--output=json", dst.to_str().unwrap()]);
    serde_json::from_str(&info).unwrap()
}

/// Compressed clusters as `qemu-img check` counts them (its JSON has this in every QEMU version; `map`'s
/// "compressed" key is newer).
fn compressed_extents(img: &Path) -> u64 {
    let out = qemu_img(["check", "--output=json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["compressed-clusters"].as_u64().unwrap_or(0)
}

#[test]
fn from_raw_and_qcow2_sources() {
    let s = Scratch::new();
    // A raw source with text (compressible), noise (not) and holes.
    let raw = s.path("src.raw");
    write_at(&raw, 0, &text(1, 300_000));
    write_at(&raw, 1 << 20, &noise(2, 200_000));
    write_at(&raw, (3 << 20) - 4096, &text(3, 4096));
    // A qcow2 source with a backing file and compressed clusters.
    let base = s.qcow2("base.qcow2", "cluster_size=4096", 2 << 20);
    qemu_io_cmds(&base, "qcow2", &["write -P 0x21 0 1M".to_string()]);
    let top = s.path("top.qcow2");
    qemu_img_ok([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
        "2M",
    ]);
    qemu_io_cmds(
        &top,
        "qcow2",
        &[
            "write -c -P 0x33 512k 256k".to_string(),
            "write -P 0x44 1536k 4k".to_string(),
        ],
    );
    for src in [&raw, &top] {
        let info = convert_and_verify(&s, src, &[], "plain.qcow2");
        assert_eq!(info["cluster-size"], 65536);
        assert_eq!(compressed_extents(&s.path("plain.qcow2")), 0);
        let info = convert_and_verify(
            &s,
            src,
            &["-o", "cluster_size=16384,refcount_bits=8,extended_l2=on"],
            "opts.qcow2",
        );
        assert_eq!(info["cluster-size"], 16384);
        assert_eq!(info["format-specific"]["data"]["refcount-bits"], 8);
        assert_eq!(info["format-specific"]["data"]["extended-l2"], true);
        for (args, ty) in [
            (vec!["-c"], "zlib"),
            (vec!["-c", "-o", "compression_type=zstd"], "zstd"),
            (vec!["-c", "-o", "cluster_size=512"], "zlib"),
        ] {
            let info = convert_and_verify(&s, src, &args, "c.qcow2");
            assert_eq!(info["format-specific"]["data"]["compression-type"], ty);
            assert!(
                compressed_extents(&s.path("c.qcow2")) > 0,
                "{args:?}: nothing was stored compressed"
            );
        }
    }
}

#[test]
fn refusals() {
    let s = Scratch::new();
    let src = s.qcow2("a.qcow2", "", 1 << 20);
    let dst = s.path("b.raw");
    let out = qcow2([
        "convert",
        "-c",
        "-O",
        "raw",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr_str()
            .contains("Compression not supported for this file format")
    );
    let out = qcow2([
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=3000",
        src.to_str().unwrap(),
        s.path("c.qcow2").to_str().unwrap(),
    ]);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        out.stderr_str()
            .contains("Cluster size must be a power of two"),
        "{}",
        out.describe()
    );
    assert!(
        !s.path("c.qcow2").exists(),
        "a refused conversion left a file behind"
    );
}
