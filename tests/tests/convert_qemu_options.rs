//! `qcow2 convert` with qemu-img convert's options, run side by side with qemu-img on copies of the same
//! inputs: `-S` (raw output byte-identical, with the same holes), `-m`, `-W`, `-C`, `--salvage`, `-B`/`-F` and
//! `-o backing_file` (qcow2 output byte-identical), `-n` into existing raw and qcow2 targets that hold data,
//! `--target-is-zero`, several sources of sizes that are not multiples of 512, and the refusals (same message
//! after the program name, same exit code, the target created or not as qemu-img leaves it).

use std::path::{Path, PathBuf};

use qcow2_tests::{
    Output, Scratch, noise, qcow2, qemu_img, qemu_img_ok, qemu_io_cmds, text, write_at,
};

/// Runs `convert ARGS SRCS... DST` with one tool.
fn convert(tool: fn(&[&str]) -> Output, args: &[&str], srcs: &[&Path], dst: &Path) -> Output {
    let mut all = vec!["convert"];
    all.extend_from_slice(args);
    all.extend(srcs.iter().map(|p| p.to_str().unwrap()));
    all.push(dst.to_str().unwrap());
    tool(&all)
}

fn ours(a: &[&str]) -> Output {
    qcow2(a)
}

fn theirs(a: &[&str]) -> Output {
    qemu_img(a)
}

/// Converts with both tools into `NAME.ours` and `NAME.qemu` (each made from `prepare` first, when given)
/// and returns both paths, both runs having succeeded.
fn both(
    s: &Scratch,
    name: &str,
    args: &[&str],
    srcs: &[&Path],
    prepare: Option<&dyn Fn(&Path)>,
) -> (PathBuf, PathBuf) {
    let (a, b) = (
        s.path(&format!("{name}.ours")),
        s.path(&format!("{name}.qemu")),
    );
    for (tool, dst) in [(ours as fn(&[&str]) -> Output, &a), (theirs, &b)] {
        let _ = std::fs::remove_file(dst);
        if let Some(p) = prepare {
            p(dst);
        }
        let out = convert(tool, args, srcs, dst);
        assert!(out.success(), "{name} {args:?}: {}", out.describe());
    }
    (a, b)
}

/// `qemu-img map --output=json` of an image (raw maps show the file's holes).
fn map(img: &Path, fmt: &str) -> String {
    qemu_img_ok(["map", "--output=json", "-f", fmt, img.to_str().unwrap()])
}

fn same_bytes(a: &Path, b: &Path, what: &str) {
    qcow2_tests::assert_files_equal(a, b, what);
}

/// A raw source with data and zero runs of many lengths (some not aligned to 4 KiB), its size not a
/// multiple of 4 KiB.
fn holey_source(s: &Scratch) -> PathBuf {
    let src = s.path("holey.raw");
    let mut data = text(1, 3 << 20);
    let mut at = 0usize;
    for (gap, len) in [
        (512usize, 7000usize),
        (3072, 5000),
        (4096, 9000),
        (8192, 3000),
        (100 << 10, 20000),
        (70 << 10, 512),
        (1536, 65536),
        (600 << 10, 4096),
    ] {
        at += len;
        data[at..at + gap].fill(0);
        at += gap;
    }
    data.truncate((3 << 20) - 1536);
    std::fs::write(&src, &data).unwrap();
    src
}

#[test]
fn sparse_sizes_parallelism_and_copy_modes_match_qemu_img() {
    let s = Scratch::new();
    let src = holey_source(&s);
    let args_list: [&[&str]; 9] = [
        &[],
        &["-S", "0"],
        &["-S", "512"],
        &["-S", "64k"],
        &["-m", "1"],
        &["-m", "16"],
        &["-W"],
        &["-C"],
        &["--salvage"],
    ];
    for extra in args_list {
        let mut args = vec!["-f", "raw", "-O", "raw"];
        args.extend_from_slice(extra);
        let (a, b) = both(&s, "raw", &args, &[&src], None);
        same_bytes(&a, &b, &format!("convert {extra:?} -O raw"));
        assert_eq!(map(&a, "raw"), map(&b, "raw"), "{extra:?}: holes differ");
        let mut args = vec!["-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(extra);
        let (a, b) = both(&s, "q", &args, &[&src], None);
        if extra == ["-W"] {
            // qemu-img's out-of-order writes allocate clusters in whatever order they finish: only the
            // guest content is the same.
            let cmp = qemu_img(["compare", a.to_str().unwrap(), b.to_str().unwrap()]);
            assert_eq!(cmp.code, Some(0), "-W: {}", cmp.describe());
        } else {
            same_bytes(&a, &b, &format!("convert {extra:?} -O qcow2"));
        }
        assert_eq!(qemu_img(["check", a.to_str().unwrap()]).code, Some(0));
    }
}

#[test]
fn backing_files_match_qemu_img() {
    let s = Scratch::new();
    let base = s.qcow2("base.qcow2", "", 4 << 20);
    qemu_io_cmds(&base, "qcow2", &["write -P 0x11 0 4M".to_string()]);
    let top = s.path("top.qcow2");
    qemu_img_ok([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        top.to_str().unwrap(),
        "6M",
    ]);
    qemu_io_cmds(
        &top,
        "qcow2",
        &[
            "write -P 0x22 64k 128k".to_string(),
            "write -z 1M 64k".to_string(),
            "write -P 0x33 2000k 3k".to_string(),
            "write -P 0x44 5M 64k".to_string(),
        ],
    );
    // A base shorter than the target: past its end, what reads as zeros is not written.
    let short = s.qcow2("short.qcow2", "", 3 << 20);
    qemu_io_cmds(&short, "qcow2", &["write -P 0x55 0 3M".to_string()]);
    let bases = [base.to_str().unwrap(), short.to_str().unwrap()];
    for b in bases {
        let option = format!("backing_file={b},backing_fmt=qcow2");
        for args in [
            vec!["-O", "qcow2", "-B", b, "-F", "qcow2"],
            vec!["-O", "qcow2", "-o", &option],
        ] {
            let (x, y) = both(&s, "b", &args, &[&top], None);
            same_bytes(&x, &y, &format!("convert {args:?}"));
            assert_eq!(qemu_img(["check", x.to_str().unwrap()]).code, Some(0));
        }
    }
    // The output holds only what the overlay holds: its guest view is the overlay's.
    let (x, _) = both(
        &s,
        "b",
        &["-O", "qcow2", "-B", bases[0], "-F", "qcow2"],
        &[&top],
        None,
    );
    let cmp = qemu_img(["compare", top.to_str().unwrap(), x.to_str().unwrap()]);
    assert_eq!(cmp.code, Some(0), "{}", cmp.describe());
    let m = map(&x, "qcow2");
    assert!(
        m.contains("\"depth\": 1"),
        "nothing left to the backing file:\n{m}"
    );
}

#[test]
fn existing_targets_and_several_sources_match_qemu_img() {
    let s = Scratch::new();
    let src = holey_source(&s);
    let size = std::fs::metadata(&src).unwrap().len();
    // -n into targets that hold data everywhere: zeros must be written.
    let full_raw: &dyn Fn(&Path) = &|p: &Path| std::fs::write(p, vec![0xa5u8; 4 << 20]).unwrap();
    let (a, b) = both(
        &s,
        "nraw",
        &["-n", "-f", "raw", "-O", "raw"],
        &[&src],
        Some(full_raw),
    );
    same_bytes(&a, &b, "convert -n into a full raw file");
    let full_qcow2: &dyn Fn(&Path) = &|p: &Path| {
        qemu_img_ok(["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "4M"]);
        qemu_io_cmds(p, "qcow2", &["write -P 0xa5 0 4M".to_string()]);
    };
    let (a, b) = both(
        &s,
        "nq",
        &["-n", "-f", "raw", "-O", "qcow2"],
        &[&src],
        Some(full_qcow2),
    );
    assert_eq!(
        map(&a, "qcow2"),
        map(&b, "qcow2"),
        "-n into a full qcow2 image"
    );
    let cmp = qemu_img([
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        src.to_str().unwrap(),
        a.to_str().unwrap(),
    ]);
    // The target is larger than the source: compare reports the extra part only if it is not zeros.
    assert!(matches!(cmp.code, Some(0) | Some(1)), "{}", cmp.describe());
    assert_eq!(qemu_img(["check", a.to_str().unwrap()]).code, Some(0));
    let mut got = vec![0u8; size as usize];
    let raw_of_a = s.path("nq.raw");
    qemu_img_ok([
        "convert",
        "-O",
        "raw",
        a.to_str().unwrap(),
        raw_of_a.to_str().unwrap(),
    ]);
    got.copy_from_slice(&std::fs::read(&raw_of_a).unwrap()[..size as usize]);
    assert!(
        got == std::fs::read(&src).unwrap(),
        "-n: guest view differs"
    );
    // --target-is-zero on a fresh target.
    let fresh: &dyn Fn(&Path) = &|p: &Path| {
        qemu_img_ok(["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "4M"]);
    };
    let (a, b) = both(
        &s,
        "tz",
        &["-n", "--target-is-zero", "-f", "raw", "-O", "qcow2"],
        &[&src],
        Some(fresh),
    );
    same_bytes(&a, &b, "convert -n --target-is-zero");

    // Several sources, of sizes that are not multiples of 512.
    let one = s.path("one.raw");
    std::fs::write(&one, noise(3, 1000)).unwrap();
    let two = s.qcow2("two.qcow2", "cluster_size=4096", 1 << 20);
    qemu_io_cmds(&two, "qcow2", &["write -P 0x77 4k 300k".to_string()]);
    let three = s.path("three.raw");
    write_at(&three, 0, &text(4, 70_000));
    let srcs: [&Path; 3] = [&one, &two, &three];
    let (a, b) = both(&s, "cat", &["-O", "raw"], &srcs, None);
    same_bytes(&a, &b, "convert of three sources");
    let (a, b) = both(&s, "catq", &["-O", "qcow2"], &srcs, None);
    same_bytes(&a, &b, "convert of three sources to qcow2");
}

#[test]
fn refusals_match_qemu_img() {
    let s = Scratch::new();
    let src = s.qcow2("src.qcow2", "", 1 << 20);
    let base = s.qcow2("b.qcow2", "", 1 << 20);
    let existing = s.path("existing.img");
    let b = base.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["-m", "0"],
        vec!["-m", "17"],
        vec!["-m", "x"],
        vec!["-r", "abc"],
        vec!["-r", "-1"],
        vec!["-S", "abc"],
        vec!["-S", "513"],
        vec!["-S", "17M"],
        vec!["-S", "-1"],
        vec!["-c", "-C"],
        vec!["-S", "4k", "-C"],
        vec!["-C", "--salvage"],
        vec!["--target-is-zero"],
        vec!["-O", "raw", "-B", b, "-F", "qcow2"],
        vec!["-O", "qcow2", "-B", b],
        vec!["-O", "qcow2", "-o", "backing_file=b.qcow2"],
        vec!["-O", "foo"],
        vec!["-c"],
        vec!["-c", "-O", "qcow2", "-o", "preallocation=metadata"],
        vec!["-t", "foo"],
        vec!["-T", "foo"],
        vec!["-O", "qcow2", "-o", "cluster_size=3000"],
        vec!["-O", "qcow2", "-o", "foo=bar"],
        vec!["-n", "-O", "raw"],
    ];
    for args in &cases {
        let dst = s.path("refused.img");
        let _ = std::fs::remove_file(&dst);
        let o = convert(ours, args, &[&src], &dst);
        let ours_made = dst.exists();
        let _ = std::fs::remove_file(&dst);
        let q = convert(theirs, args, &[&src], &dst);
        let qemu_made = dst.exists();
        assert_eq!(
            o.code,
            q.code,
            "{args:?}: {}\n{}",
            o.describe(),
            q.describe()
        );
        assert_eq!(o.code, Some(1), "{args:?}: {}", o.describe());
        assert_eq!(
            o.first_message(),
            q.first_message(),
            "{args:?}: {}\n{}",
            o.describe(),
            q.describe()
        );
        assert_eq!(ours_made, qemu_made, "{args:?}: the target was left or not");
    }
    // -n with -o, and two sources with a backing file for the target.
    std::fs::write(&existing, vec![0u8; 1 << 20]).unwrap();
    for (args, srcs) in [
        (vec!["-n", "-o", "cluster_size=4k"], vec![src.as_path()]),
        (
            vec!["-O", "qcow2", "-B", b, "-F", "qcow2"],
            vec![&src, &src],
        ),
    ] {
        let o = convert(ours, &args, &srcs, &existing);
        let q = convert(theirs, &args, &srcs, &existing);
        assert_eq!(o.code, q.code, "{args:?}: {}", o.describe());
        assert_eq!(o.first_message(), q.first_message(), "{args:?}");
    }
    // qemu-img reports this one and exits 0 (it does not convert); we exit 1.
    let o = convert(
        ours,
        &[
            "-n",
            "--target-is-zero",
            "-O",
            "qcow2",
            "-B",
            b,
            "-F",
            "qcow2",
        ],
        &[&src],
        &existing,
    );
    let q = convert(
        theirs,
        &[
            "-n",
            "--target-is-zero",
            "-O",
            "qcow2",
            "-B",
            b,
            "-F",
            "qcow2",
        ],
        &[&src],
        &existing,
    );
    assert_eq!(o.code, Some(1));
    assert_eq!(o.first_message(), q.first_message());
}

/// `--salvage` over an image whose one L2 entry names an unaligned cluster: both tools go on, warn about
/// the same sectors (block status, then the read, as qemu-img), write zeros there and the same output.
#[test]
fn salvage_warns_about_the_sectors_qemu_img_warns_about() {
    let s = Scratch::new();
    let img = s.qcow2("damaged.qcow2", "", 1 << 20);
    qemu_io_cmds(&img, "qcow2", &["write -P 0x11 0 256k".to_string()]);
    let mut bytes = qcow2_tests::malformed::Image {
        bytes: std::fs::read(&img).unwrap(),
    };
    let e = bytes.l2_entry(1);
    bytes.set_l2_entry(1, e | 0x200);
    bytes.write_to(&img);
    let copy = s.path("damaged-copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    let (a, b) = (s.path("ours.raw"), s.path("qemu.raw"));
    let o = convert(ours, &["--salvage", "-O", "raw"], &[&img], &a);
    let q = convert(theirs, &["--salvage", "-O", "raw"], &[&copy], &b);
    assert!(o.success(), "{}", o.describe());
    assert!(q.success(), "{}", q.describe());
    same_bytes(&a, &b, "convert --salvage");
    // The warnings name the same offsets in the same order (the error texts differ: ours names the
    // corruption, qemu-img says "Input/output error" after one line about it).
    let offsets = |out: &Output| -> Vec<String> {
        out.stderr_str()
            .lines()
            .filter_map(|l| l.split(": warning: ").nth(1))
            .map(|w| w.split(": ").next().unwrap().to_string())
            .collect()
    };
    let (ow, qw) = (offsets(&o), offsets(&q));
    assert_eq!(ow.len(), 384, "{}", o.describe());
    assert_eq!(ow, qw);
    // Without --salvage the conversion fails.
    let o = convert(ours, &["-O", "raw"], &[&img], &a);
    let q = convert(theirs, &["-O", "raw"], &[&copy], &b);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert_eq!(o.code, q.code);
}

/// `-o preallocation=...` gives qemu-img's image byte for byte, and `-p` prints qemu-img's progress lines
/// byte for byte (and nothing else on stdout).
#[test]
fn preallocation_and_progress_match_qemu_img() {
    let s = Scratch::new();
    let src = holey_source(&s);
    for p in ["metadata", "falloc", "full"] {
        let option = format!("preallocation={p}");
        let (a, b) = both(
            &s,
            "pre",
            &["-f", "raw", "-O", "qcow2", "-o", &option],
            &[&src],
            None,
        );
        same_bytes(&a, &b, &format!("convert -o {option}"));
    }
    let (a, b) = (s.path("p.ours"), s.path("p.qemu"));
    let o = convert(ours, &["-p", "-f", "raw", "-O", "raw"], &[&src], &a);
    let q = convert(theirs, &["-p", "-f", "raw", "-O", "raw"], &[&src], &b);
    assert!(o.success() && q.success(), "{}", o.describe());
    assert!(o.stdout.ends_with(b"(100.00/100%)\r\n"), "{}", o.describe());
    assert_eq!(o.stdout_str(), q.stdout_str());
    // -q silences it.
    let o = convert(ours, &["-p", "-q", "-f", "raw", "-O", "raw"], &[&src], &a);
    assert!(o.success() && o.stdout.is_empty(), "{}", o.describe());
}
