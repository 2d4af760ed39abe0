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

/// `-t CACHE` and `-T SRC_CACHE` as qemu-img convert takes them: every mode QEMU knows gives the same
/// result (raw output byte-identical to qemu-img's, qcow2 output with the source's content, clean), and a
/// mode QEMU does not know is refused with its message and exit code, the source's checked first.
#[test]
fn cache_modes() {
    let s = Scratch::new();
    let raw = s.path("src.raw");
    write_at(&raw, 0, &text(5, 200_000));
    write_at(&raw, 1 << 20, &noise(6, 100_000));
    write_at(&raw, (2 << 20) - 512, &text(7, 512));
    let qemu_raw = s.path("qemu.raw");
    qemu_img_ok([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        raw.to_str().unwrap(),
        qemu_raw.to_str().unwrap(),
    ]);
    for mode in [
        "unsafe",
        "writeback",
        "writethrough",
        "none",
        "directsync",
        "off",
    ] {
        let to_raw = s.path(&format!("{mode}.raw"));
        let out = qcow2([
            "convert",
            "-t",
            mode,
            "-T",
            mode,
            "-f",
            "raw",
            "-O",
            "raw",
            raw.to_str().unwrap(),
            to_raw.to_str().unwrap(),
        ]);
        assert!(out.success(), "-t {mode}: {}", out.describe());
        qcow2_tests::assert_files_equal(&to_raw, &qemu_raw, &format!("convert -t {mode} -O raw"));
        for extra in [&["-t", mode][..], &["-t", mode, "-c"][..]] {
            let name = format!("{mode}{}.qcow2", extra.len());
            let mut args = vec!["-f", "raw"];
            args.extend_from_slice(extra);
            convert_and_verify(&s, &raw, &args, &name);
        }
    }
    for (args, line) in [
        (&["-t", "fast"][..], "Invalid cache option: fast"),
        (&["-T", "slow"][..], "Invalid source cache option: slow"),
        (
            &["-t", "fast", "-T", "slow"][..],
            "Invalid source cache option: slow",
        ),
    ] {
        let dst = s.path("refused.qcow2");
        let mut all = vec!["convert", "-O", "qcow2"];
        all.extend_from_slice(args);
        all.extend([raw.to_str().unwrap(), dst.to_str().unwrap()]);
        let ours = qcow2(&all);
        let mut theirs = all.clone();
        theirs[0] = "convert";
        let qemu = qemu_img(&theirs);
        assert_eq!(ours.code, qemu.code, "{args:?}: {}", ours.describe());
        assert_eq!(ours.code, Some(1));
        assert_eq!(ours.stderr_str().trim(), format!("qcow2: {line}"));
        assert_eq!(qemu.stderr_str().trim(), format!("qemu-img: {line}"));
        let _ = std::fs::remove_file(&dst);
    }
}

/// `-c` compresses on every core and writes in guest order: the image is byte for byte the one that
/// compressed writes of the same clusters, one at a time in guest order, make (`qcow2 io -c 'write -c'`),
/// and it equals the source; many clusters, some that do not compress, holes, and a last cluster that the
/// disk's end cuts short.
#[test]
fn parallel_compression_writes_in_guest_order() {
    let s = Scratch::new();
    let raw = s.path("src.raw");
    let cluster = 65_536u64;
    let size = (6 << 20) + 3 * 512;
    for i in 0..48u64 {
        if i % 5 == 3 {
            continue;
        }
        let data = if i % 7 == 2 {
            noise(100 + i, 65_536)
        } else {
            text(200 + i, 65_536)
        };
        write_at(&raw, i * 2 * cluster, &data);
    }
    write_at(&raw, size - 700, &text(9, 700));
    let args = ["-f", "raw", "-c", "-o", "cluster_size=65536"];
    let info = convert_and_verify(&s, &raw, &args, "converted.qcow2");
    assert_eq!(
        info["virtual-size"].as_u64(),
        Some(size.div_ceil(512) * 512)
    );
    assert!(compressed_extents(&s.path("converted.qcow2")) > 30);

    let one_by_one = s.path("one_by_one.qcow2");
    let out = qcow2([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536",
        one_by_one.to_str().unwrap(),
        &(size.div_ceil(512) * 512).to_string(),
    ]);
    assert!(out.success(), "{}", out.describe());
    let bytes = std::fs::read(&raw).unwrap();
    let mut cmds = Vec::new();
    let mut off = 0u64;
    while off < bytes.len() as u64 {
        let end = (off + cluster).min(size.div_ceil(512) * 512);
        let mut piece = bytes[off as usize..(end as usize).min(bytes.len())].to_vec();
        piece.resize((end - off) as usize, 0);
        if piece.iter().any(|&b| b != 0) {
            let file = s.path(&format!("cluster{off}"));
            std::fs::write(&file, &piece).unwrap();
            cmds.push(format!(
                "write -c -s {} {off} {}",
                file.display(),
                end - off
            ));
        }
        off = end;
    }
    let mut io: Vec<&str> = vec!["io", "-f", "qcow2"];
    for c in &cmds {
        io.extend(["-c", c.as_str()]);
    }
    io.push(one_by_one.to_str().unwrap());
    let out = qcow2(&io);
    assert!(out.success(), "{}", out.describe());
    qcow2_tests::assert_files_equal(
        &s.path("converted.qcow2"),
        &one_by_one,
        "convert -c against compressed writes one at a time",
    );
}
