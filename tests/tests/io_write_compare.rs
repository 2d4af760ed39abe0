//! `qcow2 io` write commands (`write` with -P/-z/-u/-c/-s, `discard`, `flush`, `aio_flush`) against
//! qemu-io 10: the same command lines run on two copies of one image, one through each tool. Both must
//! agree on the exit status and on what they print (timing lines dropped, `-C` lines reduced to their byte
//! and op counts); the two resulting images must read the same through qemu-img (`qemu-img compare`), and
//! ours must pass `qemu-img check`.
//!
//! qemu-io prints "write failed: ..." on stdout, the tool on stderr (its one-line-error rule), and
//! qemu-io's error_report() lines start with "qemu-io: " where ours start with "qcow2: ". The comparison
//! takes the failure lines out of stdout and compares them, with stderr, as a sorted list of messages.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use qcow2_tests::images::{chain_qcow2, chain_raw_base, compressed, plain};
use qcow2_tests::{
    Output, Scratch, assert_text_eq, noise, qcow2, qemu_img, qemu_img_ok, qemu_io,
    size_for_cluster, text, varied_writes, write_at,
};

const MIB: u64 = 1 << 20;

/// How strictly failure messages are compared.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reasons {
    /// "write failed: Input/output error" must match word for word.
    Exact,
    /// Only "write failed:" must match: the reason comes from the engine, which words it its own way.
    Prefix,
}

/// A `-C` line ("bytes,ops,h:mm:ss.cc,rate,rate") reduced to what does not depend on timing.
fn machine_report(line: &str) -> Option<String> {
    let f: Vec<&str> = line.split(',').collect();
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (f.len() == 5 && numeric(f[0]) && numeric(f[1]) && f[2].contains(':'))
        .then(|| format!("-C {},{}", f[0], f[1]))
}

fn is_failure(line: &str) -> bool {
    [
        "read failed: ",
        "write failed: ",
        "discard failed: ",
        "flush failed: ",
    ]
    .iter()
    .any(|p| line.starts_with(p))
}

/// (stdout without timing and failure lines, sorted messages).
fn normalize(out: &Output, qemu: bool, reasons: Reasons) -> (String, Vec<String>) {
    let mut text = String::new();
    let mut msgs = Vec::new();
    for l in out.stdout_str().lines() {
        if l.contains(" ops; ") && l.contains(" sec (") {
            continue;
        }
        if let Some(m) = machine_report(l) {
            text.push_str(&m);
            text.push('\n');
        } else if is_failure(l) {
            msgs.push(l.to_string());
        } else {
            text.push_str(l);
            text.push('\n');
        }
    }
    for l in out.stderr_str().lines() {
        // qemu-io's warning about a probed raw image (three lines); the tool does not print it.
        if qemu
            && (l.starts_with("WARNING: Image format was not specified")
                || l.starts_with("         "))
        {
            continue;
        }
        let l = match l.strip_prefix("qemu-io: ") {
            Some(rest) if qemu => format!("qcow2: {rest}"),
            _ => l.to_string(),
        };
        msgs.push(l);
    }
    if reasons == Reasons::Prefix {
        for m in msgs.iter_mut() {
            if is_failure(m)
                && let Some(colon) = m.find(": ")
            {
                m.truncate(colon + 1);
            }
        }
    }
    msgs.sort();
    (text, msgs)
}

/// The two copies a comparison works on.
struct Pair {
    ours: PathBuf,
    qemu: PathBuf,
    fmt: &'static str,
}

/// Copies `img` twice (next to it, so relative backing names still resolve).
fn pair(img: &Path, fmt: &'static str, tag: &str) -> Pair {
    let name = img.file_name().unwrap().to_string_lossy().into_owned();
    let dir = img.parent().unwrap();
    let ours = dir.join(format!("{tag}-ours-{name}"));
    let qemu = dir.join(format!("{tag}-qemu-{name}"));
    std::fs::copy(img, &ours).unwrap();
    std::fs::copy(img, &qemu).unwrap();
    Pair { ours, qemu, fmt }
}

/// Runs `cmds` through both tools (with `opts` such as "-r" before them) and compares what they say.
/// Returns whether qemu-io succeeded.
fn run_both(p: &Pair, opts: &[&str], cmds: &[String], reasons: Reasons) -> bool {
    run_both_as(p, true, opts, cmds, reasons)
}

/// [`run_both`], with the format given (`-f`) or left to the probe.
fn run_both_as(
    p: &Pair,
    give_format: bool,
    opts: &[&str],
    cmds: &[String],
    reasons: Reasons,
) -> bool {
    let mut args: Vec<OsString> = Vec::new();
    if give_format {
        args.extend(["-f".into(), p.fmt.into()]);
    }
    args.extend(opts.iter().map(OsString::from));
    for c in cmds {
        args.push("-c".into());
        args.push(c.into());
    }
    let mut ours_args: Vec<OsString> = vec!["io".into()];
    ours_args.extend(args.iter().cloned());
    ours_args.push(p.ours.clone().into());
    args.push(p.qemu.clone().into());
    let ours = qcow2(&ours_args);
    let qemu = qemu_io(&args);
    let what = format!("io {cmds:?} on {}", p.ours.display());
    assert_eq!(
        ours.success(),
        qemu.success(),
        "{what}: exit status differs\nours: {}\nqemu: {}",
        ours.describe(),
        qemu.describe()
    );
    let (o_text, o_msgs) = normalize(&ours, false, reasons);
    let (q_text, q_msgs) = normalize(&qemu, true, reasons);
    assert_text_eq(&format!("{what} (stdout)"), &o_text, &q_text);
    assert_text_eq(
        &format!("{what} (messages)"),
        &o_msgs.join("\n"),
        &q_msgs.join("\n"),
    );
    qemu.success()
}

/// The two copies read the same, and ours is a consistent qcow2 image.
fn assert_same_result(p: &Pair) {
    let args: [&OsStr; 7] = [
        "compare".as_ref(),
        "-f".as_ref(),
        p.fmt.as_ref(),
        "-F".as_ref(),
        p.fmt.as_ref(),
        p.ours.as_os_str(),
        p.qemu.as_os_str(),
    ];
    let out = qemu_img(args);
    assert_eq!(
        out.code,
        Some(0),
        "the image written by us reads differently from qemu-io's:\n{}",
        out.describe()
    );
    if p.fmt == "qcow2" {
        let out = qemu_img(["check".as_ref(), p.ours.as_os_str()]);
        assert_eq!(
            out.code,
            Some(0),
            "qemu-img check of our image:\n{}",
            out.describe()
        );
    }
}

/// `qemu-img map --output=json` of both copies with host offsets removed: same allocation status
/// (present, zero, data, compressed) everywhere.
fn assert_same_status(p: &Pair) {
    let map = |img: &Path| {
        let text = qemu_img_ok([
            "map".as_ref(),
            "--output=json".as_ref(),
            "-f".as_ref(),
            p.fmt.as_ref(),
            img.as_os_str(),
        ]);
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        for e in v.as_array_mut().unwrap() {
            e.as_object_mut().unwrap().remove("offset");
        }
        // Neighbours that only differed by host offset merge.
        let mut merged: Vec<serde_json::Value> = Vec::new();
        for e in v.as_array().unwrap() {
            if let Some(last) = merged.last_mut() {
                let same = ["depth", "present", "zero", "data", "compressed"]
                    .iter()
                    .all(|k| last[k] == e[k]);
                if same {
                    let len = last["length"].as_u64().unwrap() + e["length"].as_u64().unwrap();
                    last["length"] = len.into();
                    continue;
                }
            }
            merged.push(e.clone());
        }
        serde_json::to_string_pretty(&merged).unwrap()
    };
    assert_text_eq(
        &format!("map of {} (offsets ignored)", p.ours.display()),
        &map(&p.ours),
        &map(&p.qemu),
    );
}

fn check_writes(img: &Path, fmt: &'static str, tag: &str, cmds: &[String]) -> Pair {
    let p = pair(img, fmt, tag);
    assert!(
        run_both(&p, &[], cmds, Reasons::Exact),
        "qemu-io failed on {cmds:?}"
    );
    assert_same_result(&p);
    p
}

/// `-P` checks of what [`varied_writes`] left behind, and a flush.
fn verify_varied(cluster: u64, size: u64) -> Vec<String> {
    let c = cluster;
    let mut cmds = vec![
        format!("read -q -P 0x11 {} {}", c / 2 - 100, c + 300),
        format!("read -q -P 0x22 {} 513", 3 * c + 7),
        format!("read -q -P 0x33 {} {}", 5 * c, c),
        // (the single 0xff byte at size / 2 + 3 may land at the start of this zeroed cluster)
        format!("read -q -P 0 {} {}", 6 * c + c / 2, c / 2),
        format!("read -q -P 0x33 {} {}", 7 * c, c),
        format!(
            "read -q -P 0 {} {}",
            10 * c,
            (11 * c).min(size - c - 1000) - 10 * c
        ),
        format!("read -q -P 0xa5 {} 1500", size - c - 1000),
        "flush".to_string(),
        "aio_flush".to_string(),
    ];
    // Unless the write near the end of the disk covered it.
    if size - c - 1000 > 11 * c {
        cmds.push(format!("read -q -P 0x55 {} 1", 11 * c));
    }
    cmds
}

fn fresh_varied(cluster: u64, opts: &str) {
    let s = Scratch::new();
    let size = size_for_cluster(cluster);
    let opts = if opts.is_empty() {
        format!("cluster_size={cluster}")
    } else {
        format!("{opts},cluster_size={cluster}")
    };
    let img = s.qcow2("fresh.qcow2", &opts, size);
    let mut cmds = varied_writes(cluster, size);
    cmds.extend(verify_varied(cluster, size));
    let p = check_writes(&img, "qcow2", "varied", &cmds);
    assert_same_status(&p);
}

#[test]
fn writes_on_fresh_images_512() {
    fresh_varied(512, "");
}

#[test]
fn writes_on_fresh_images_4k() {
    fresh_varied(4096, "");
}

#[test]
fn writes_on_fresh_images_64k() {
    fresh_varied(65536, "");
}

#[test]
fn writes_on_fresh_images_2m() {
    fresh_varied(2 << 20, "");
}

#[test]
fn writes_on_fresh_images_v2() {
    fresh_varied(65536, "compat=0.10");
}

#[test]
fn writes_on_fresh_images_extended_l2() {
    fresh_varied(65536, "extended_l2=on");
}

#[test]
fn writes_on_fresh_images_refcount_bits() {
    fresh_varied(4096, "refcount_bits=1");
    fresh_varied(65536, "refcount_bits=64");
}

#[test]
fn writes_on_fresh_images_lazy_refcounts() {
    fresh_varied(65536, "lazy_refcounts=on");
}

/// Overwrites, zeroes and discards over data qemu-io wrote before (in-place writes, copy-on-write of
/// partially covered zero clusters, freeing allocated clusters).
#[test]
fn overwrites_of_existing_data() {
    let s = Scratch::new();
    let c = 65536u64;
    let img = plain(&s, "old.qcow2", "", c);
    let pat = s.path("pattern.txt");
    std::fs::write(&pat, text(9, 3000)).unwrap();
    let cmds = vec![
        format!("write -P 0x66 {} {}", c / 2, 2 * c),
        format!("write -P 0x67 {} 100", 6 * c + 5),
        format!("write -z {} {}", 5 * c + 10, 20),
        format!("write -z {} {}", 7 * c, 2 * c),
        format!("write -z -u {} {}", 0, c),
        format!("discard {} {}", 3 * c, 2 * c),
        format!("discard {} {}", 20 * c + 1, c),
        format!("write -s {} {} {}", pat.display(), 9 * c + 333, 10_000),
        format!("write -q -P 0x68 {} {}", 40 * c - 1, 2),
        format!("read -P 0x66 {} {}", c, c + c / 2),
        format!("read -P 0x67 {} 100", 6 * c + 5),
        format!("read -P 0 {} {}", 7 * c, 2 * c),
        "flush".to_string(),
    ];
    let p = check_writes(&img, "qcow2", "over", &cmds);
    assert_same_status(&p);
}

/// Writes into the top of backing chains: copy-on-write of partial clusters from the backing file, zero
/// writes and discards that must hide the backing file's data.
#[test]
fn writes_over_backing_chains() {
    let s = Scratch::new();
    for (top, tag) in [
        (chain_qcow2(&s), "qchain"),
        (chain_raw_base(&s), "rawchain"),
    ] {
        let cmds = vec![
            "write -P 0x71 100 200".to_string(),
            "write -P 0x72 65000 70000".to_string(),
            "write -z 200000 5000".to_string(),
            "write -z 262144 65536".to_string(),
            "write -z -u 327680 131072".to_string(),
            "discard 524288 65536".to_string(),
            "write -P 0x73 1048000 1000".to_string(),
            "read -P 0x71 100 200".to_string(),
            "read -P 0 262144 65536".to_string(),
            "flush".to_string(),
        ];
        let p = check_writes(&top, "qcow2", tag, &cmds);
        assert_same_status(&p);
    }
}

fn compressed_writes(cluster: u64, ctype: &str) {
    let s = Scratch::new();
    let c = cluster;
    // A size that ends in a partial cluster (when clusters are bigger than 4 KiB).
    let size = 16 * c + 4096;
    let img = s.qcow2(
        "comp.qcow2",
        &format!("cluster_size={c},compression_type={ctype}"),
        size,
    );
    let textfile = s.path("text.bin");
    std::fs::write(&textfile, text(3, (3 * c) as usize)).unwrap();
    let noisefile = s.path("noise.bin");
    std::fs::write(&noisefile, noise(4, (2 * c) as usize)).unwrap();
    let mixed = s.path("mixed.bin");
    let mut m = text(5, c as usize);
    m.extend(noise(6, c as usize));
    std::fs::write(&mixed, m).unwrap();
    let cmds = vec![
        // compressible: the default pattern, text
        format!("write -c 0 {c}"),
        format!("write -c -s {} {} {}", textfile.display(), c, 3 * c),
        // incompressible: written as plain clusters
        format!("write -c -s {} {} {}", noisefile.display(), 4 * c, 2 * c),
        // one compressible and one incompressible cluster in one request
        format!("write -c -s {} {} {}", mixed.display(), 6 * c, 2 * c),
        format!("write -c -P 0 {} {}", 8 * c, c),
        // the last, partial cluster (the request ends at the end of the disk)
        format!("write -c -P 0x3c {} {}", 16 * c, size - 16 * c),
        format!("read -P 0xcd 0 {c}"),
        format!("read -P 0 {} {}", 8 * c, c),
        format!("read -P 0x3c {} {}", 16 * c, size - 16 * c),
        // copy-on-write of a compressed cluster
        format!("write -P 0x3d {} 100", c + 7),
        format!("read -P 0x3d {} 100", c + 7),
        "flush".to_string(),
    ];
    let p = check_writes(&img, "qcow2", "comp", &cmds);
    assert_same_status(&p);
    // Ours reads back what qemu-io wrote and the other way round.
    let p2 = pair(&p.qemu, "qcow2", "back");
    run_both(
        &p2,
        &["-r"],
        &[
            format!("read -P 0xcd 0 {c}"),
            format!("read -v {} 64", 2 * c + 100),
        ],
        Reasons::Exact,
    );
}

#[test]
fn compressed_writes_deflate_4k() {
    compressed_writes(4096, "zlib");
}

#[test]
fn compressed_writes_deflate_64k() {
    compressed_writes(65536, "zlib");
}

#[test]
fn compressed_writes_deflate_2m() {
    compressed_writes(2 << 20, "zlib");
}

#[test]
fn compressed_writes_deflate_512() {
    compressed_writes(512, "zlib");
}

#[test]
fn compressed_writes_zstd_64k() {
    compressed_writes(65536, "zstd");
}

#[test]
fn compressed_writes_zstd_4k() {
    compressed_writes(4096, "zstd");
}

/// Compressed writes into an image made by `qemu-img convert -c`: onto an unallocated cluster (allowed)
/// and onto allocated ones (QEMU refuses: a compressed write never overwrites).
#[test]
fn compressed_writes_into_converted_image() {
    let s = Scratch::new();
    let c = 65536u64;
    let img = compressed(&s, c, "zlib");
    // cluster 5 of the source was a hole: unallocated in the image
    let p = check_writes(
        &img,
        "qcow2",
        "conv",
        &[format!("write -c -P 0x42 {} {c}", 5 * c)],
    );
    assert_same_status(&p);
    let p = pair(&img, "qcow2", "onto");
    run_both(&p, &[], &[format!("write -c {} {c}", c)], Reasons::Prefix);
    run_both(&p, &[], &["write -c 0 65536".to_string()], Reasons::Prefix);
    assert_same_result(&p);
}

/// Requests qemu-io refuses before or at the block layer: options, numbers, ranges, alignment.
#[test]
fn refused_requests() {
    let s = Scratch::new();
    let c = 65536u64;
    let img = plain(&s, "errs.qcow2", "", c);
    let size = size_for_cluster(c);
    let pat = s.path("empty.bin");
    std::fs::write(&pat, b"").unwrap();
    let single = [
        format!("write {size} 1"),
        format!("write {} 2", size - 1),
        format!("write -z {} 2", size - 1),
        format!("write -z -n {} 3G", 0),
        format!("write {} 0", size + 1),
        format!("write {size} 0"),
        format!("discard {size} 1"),
        format!("discard {} 0", size + 512),
        "write 0 3G".to_string(),
        "discard 0 3G".to_string(),
        "write -u 0 1".to_string(),
        "write -n 0 1".to_string(),
        "write -z -P 1 0 1".to_string(),
        "write -f -c 0 512".to_string(),
        "write -b -z 0 512".to_string(),
        "write -r -z 0 512".to_string(),
        "write -c 1 65536".to_string(),
        "write -c 0 1000".to_string(),
        "write -c 512 65536".to_string(),
        "write -c 0 4096".to_string(),
        format!("write -c {} {}", size - c, 2 * c),
        "write -c 0 0".to_string(),
        format!("write -c {} 0", size + 512),
        "write -P 0x100 0 1".to_string(),
        "write -P x 0 1".to_string(),
        "write 0 1x".to_string(),
        "write 1k".to_string(),
        "write -x 0 1".to_string(),
        "write 0 1 2".to_string(),
        "discard -x 0 1".to_string(),
        "discard 0 1 2".to_string(),
        "discard 0".to_string(),
        "flush 1".to_string(),
        format!("write -s {} 0 10", pat.display()),
        format!("write -s {}/missing 0 10", s.dir().display()),
        format!("write -s {} -P 1 0 10", pat.display()),
    ];
    let p = pair(&img, "qcow2", "errs");
    for cmd in &single {
        run_both(&p, &[], std::slice::from_ref(cmd), Reasons::Exact);
    }
    // Read-only: writes and discards are refused before their arguments are looked at.
    run_both(
        &p,
        &["-r"],
        &[
            "write 0 1".to_string(),
            "write -x 0 1".to_string(),
            "discard 0 1".to_string(),
            "write 0".to_string(),
            "flush".to_string(),
            "aio_flush".to_string(),
            "read -P 0x11 32668 1".to_string(),
        ],
        Reasons::Exact,
    );
    assert_same_result(&p);
}

/// A failing request among successful ones: the others still run, the run fails.
#[test]
fn failure_among_writes() {
    let s = Scratch::new();
    let c = 65536u64;
    let img = plain(&s, "mixed.qcow2", "", c);
    let size = size_for_cluster(c);
    let p = pair(&img, "qcow2", "mixed");
    run_both(
        &p,
        &[],
        &[
            "write -P 0x5 0 1".to_string(),
            format!("write {size} 1"),
            "write -C -P 0x6 1 1".to_string(),
            "discard -C 65536 65536".to_string(),
            "read -P 0x6 1 1".to_string(),
        ],
        Reasons::Exact,
    );
    assert_same_result(&p);
}

/// An image with an external data file takes no compressed writes.
#[test]
fn compressed_write_with_data_file() {
    let s = Scratch::new();
    let img = s.qcow2(
        "df.qcow2",
        &format!("data_file={}", s.path("df.raw").display()),
        MIB,
    );
    let p = Pair {
        ours: img.clone(),
        qemu: img,
        fmt: "qcow2",
    };
    for cmd in ["write -c 0 65536", "write -c 0 0"] {
        run_both(&p, &[], &[cmd.to_string()], Reasons::Exact);
    }
}

/// Raw images: plain writes, zero writes (with and without unmap), discards; no compressed writes.
#[test]
fn raw_images() {
    let s = Scratch::new();
    let raw = s.path("disk.raw");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(MIB + 1000))
        .unwrap();
    write_at(&raw, 4096, &text(1, 200_000));
    let cmds = vec![
        "write -P 0x21 100 5000".to_string(),
        "write -z 8192 4096".to_string(),
        "write -z -u 16384 65536".to_string(),
        "discard 131072 65536".to_string(),
        // the tail between the end of the file and the next 512-byte boundary
        format!("write -P 0x22 {} 24", MIB + 1000),
        "read -P 0x21 100 5000".to_string(),
        "read -P 0 16384 65536".to_string(),
        "flush".to_string(),
    ];
    check_writes(&raw, "raw", "raw", &cmds);
    let p = pair(&raw, "raw", "rawc");
    for cmd in ["write -c 0 65536", "write -c 0 0", "write -c 2M 0"] {
        run_both(&p, &[], &[cmd.to_string()], Reasons::Exact);
    }
}

/// A raw image opened without a format (probed) refuses writes that would make its first sector look like
/// a qcow2 header (or another format's), as QEMU does; with `-f raw` the same write is allowed.
#[test]
fn probed_raw_keeps_its_first_sector_raw() {
    let s = Scratch::new();
    let raw = s.path("probed.raw");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(MIB))
        .unwrap();
    let magic = s.path("magic.bin");
    std::fs::write(&magic, b"QFI\xfb").unwrap();
    let vmdk = s.path("vmdk.bin");
    std::fs::write(&vmdk, b"KDMV").unwrap();
    let p = pair(&raw, "raw", "probe");
    let cmds = [
        format!("write -s {} 0 512", magic.display()),
        format!("write -s {} 0 4", vmdk.display()),
        format!("write -s {} 512 512", magic.display()),
        "write -P 0x51 0 4096".to_string(),
        "read -P 0x51 0 4096".to_string(),
    ];
    for c in &cmds {
        run_both_as(&p, false, &[], std::slice::from_ref(c), Reasons::Exact);
    }
    assert_same_result(&p);
    run_both(
        &p,
        &[],
        &[format!("write -s {} 0 512", magic.display())],
        Reasons::Exact,
    );
    assert_same_result(&p);
}
