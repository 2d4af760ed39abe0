//! `qcow2 bitmap` against `qemu-img bitmap` 10: the same sequences of actions run through both tools on
//! copies of one image (clusters of 512 B to 2 MiB, bitmaps enabled, disabled and in use, writes in between)
//! must give the same exit codes and messages and leave the same bitmaps (names, flags, granularities and
//! dirty bits, read by an independent decoder); ours must be clean for `qemu-img check` and read the same.
//! Where the bitmap clusters land can differ (qemu-img rewrites every bitmap when it closes an image).

use std::path::{Path, PathBuf};

use qcow2_tests::bitmaps::{IN_USE, decode};
use qcow2_tests::{Output, Scratch, qcow2, qemu_img, qemu_img_ok, qemu_io_cmds};

/// The messages of a run, with QEMU's node names ("#block123") and our file names in their place made
/// comparable.
fn messages(out: &Output) -> Vec<String> {
    out.messages()
        .into_iter()
        .filter(|m| !m.starts_with("Try '"))
        .map(|m| {
            let m = match (m.find("persistent in '"), m.find("bitmaps to ")) {
                (Some(at), _) => {
                    let start = at + "persistent in '".len();
                    let end = start + m[start..].find('\'').unwrap_or(0);
                    format!("{}NODE{}", &m[..start], &m[end..])
                }
                (None, Some(at)) => {
                    let start = at + "bitmaps to ".len();
                    let end = start + m[start..].find(':').unwrap_or(0);
                    format!("{}NODE{}", &m[..start], &m[end..])
                }
                _ => m,
            };
            m.replace("qemu-img", "qcow2")
        })
        .collect()
}

struct Pair {
    ours: PathBuf,
    theirs: PathBuf,
}

impl Pair {
    fn new(s: &Scratch, img: &Path) -> Pair {
        let ours = s.path("ours.qcow2");
        let theirs = s.path("theirs.qcow2");
        std::fs::copy(img, &ours).unwrap();
        std::fs::copy(img, &theirs).unwrap();
        Pair { ours, theirs }
    }

    /// `bitmap ARGS... FILE NAME` (FILE_ARGS after the file name) through both tools: same code, same
    /// messages, same bitmaps; ours clean and reading the same.
    fn bitmap(&self, args: &[&str], name: &str) -> i32 {
        let run = |tool: fn(Vec<String>) -> Output, file: &Path| {
            let mut a: Vec<String> = vec!["bitmap".into()];
            a.extend(args.iter().map(|s| s.to_string()));
            a.push(file.to_str().unwrap().into());
            a.push(name.into());
            tool(a)
        };
        let o = run(qcow2, &self.ours);
        let q = run(qemu_img, &self.theirs);
        let what = format!("bitmap {} {name}", args.join(" "));
        assert_eq!(
            o.code,
            q.code,
            "{what}:\nours {}\nqemu-img {}",
            o.describe(),
            q.describe()
        );
        assert_eq!(messages(&o), messages(&q), "{what}: messages");
        self.same(&what);
        o.code.unwrap_or(-1)
    }

    fn same(&self, what: &str) {
        let a = decode(&std::fs::read(&self.ours).unwrap());
        let b = decode(&std::fs::read(&self.theirs).unwrap());
        assert_eq!(a, b, "{what}: bitmaps");
        let check = qemu_img(["check".as_ref(), self.ours.as_os_str()]);
        assert_eq!(
            check.code,
            Some(0),
            "{what}: qemu-img check:\n{}",
            check.describe()
        );
        let cmp = qemu_img([
            "compare".as_ref(),
            self.ours.as_os_str(),
            self.theirs.as_os_str(),
        ]);
        assert_eq!(
            cmp.code,
            Some(0),
            "{what}: guest views differ:\n{}",
            cmp.describe()
        );
    }

    /// qemu-io commands on both copies (QEMU's writes set the bits in both, checked by [`Pair::same`]).
    fn io(&self, cmds: &[&str]) {
        let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
        qemu_io_cmds(&self.ours, "qcow2", &cmds);
        qemu_io_cmds(&self.theirs, "qcow2", &cmds);
        self.same(&format!("after qemu-io {cmds:?}"));
    }
}

/// Every action and their combinations, with writes in between, for clusters of 512 B, 64 KiB and 2 MiB.
#[test]
fn actions_match_qemu_img() {
    let s = Scratch::new();
    let mut runs = 0;
    for opts in [
        "cluster_size=512",
        "cluster_size=65536",
        "cluster_size=2097152",
    ] {
        let img = s.qcow2("img.qcow2", opts, 64 << 20);
        qemu_io_cmds(&img, "qcow2", &["write -P 1 0 1M".to_string()]);
        let p = Pair::new(&s, &img);
        let steps: &[(&[&str], &str)] = &[
            (&["--add"], "a"),
            (&["--add", "-g", "512"], "fine"),
            (&["--add", "--disable", "-g", "1M"], "off"),
            (&["--add", "-g", "2G"], "huge"),
            (&["--add", "-g", "0"], "dflt"),
            (&["--add", "-g", "4294967808"], "wrapped"),
        ];
        for (args, name) in steps {
            assert_eq!(p.bitmap(args, name), 0);
            runs += 1;
        }
        p.io(&["write -P 2 3M 100k", "write -z 20M 2M", "write -P 3 63M 1M"]);
        let steps: &[(&[&str], &str)] = &[
            (&["--merge", "a"], "off"),
            (&["--merge", "fine"], "dflt"),
            (&["--clear"], "a"),
            (&["--disable"], "fine"),
            (&["--enable"], "off"),
            (&["--remove"], "huge"),
            (&["--clear", "--enable", "--merge", "dflt"], "a"),
            (&["--add", "--merge", "off", "--disable"], "late"),
        ];
        for (args, name) in steps {
            assert_eq!(p.bitmap(args, name), 0);
            runs += 1;
        }
        p.io(&["write -P 4 10M 64k", "discard 3M 64k"]);
        for name in ["a", "fine", "off", "dflt", "wrapped", "late"] {
            assert_eq!(p.bitmap(&["--remove"], name), 0);
            runs += 1;
        }
        // The last removal ended the bitmaps extension.
        let info = qemu_img_ok(["info", p.ours.to_str().unwrap()]);
        assert!(!info.contains("bitmaps:"), "{info}");
    }
    qcow2_tests::record_evidence(
        "bitmap_command",
        &format!(
            "bitmap command: {runs} actions identical to qemu-img bitmap (bits, flags, messages)"
        ),
    );
}

/// Merging from another image (`-b`, `-F`), with another granularity.
#[test]
fn merge_from_another_image() {
    let s = Scratch::new();
    let src = s.qcow2("src.qcow2", "cluster_size=4096", 16 << 20);
    qemu_img_ok(["bitmap", "--add", "-g", "4k", src.to_str().unwrap(), "s"]);
    qemu_io_cmds(
        &src,
        "qcow2",
        &["write 5000 3".to_string(), "write 8M 1M".to_string()],
    );
    let img = s.qcow2("img.qcow2", "cluster_size=65536", 16 << 20);
    qemu_img_ok(["bitmap", "--add", "-g", "64k", img.to_str().unwrap(), "t"]);
    let p = Pair::new(&s, &img);
    let src = src.to_str().unwrap();
    assert_eq!(p.bitmap(&["--merge", "s", "-b", src], "t"), 0);
    assert_eq!(
        p.bitmap(&["--merge", "s", "-b", src, "-F", "qcow2"], "t"),
        0
    );
    assert_ne!(p.bitmap(&["--merge", "nope", "-b", src], "t"), 0);
    assert_ne!(p.bitmap(&["--merge", "s", "-b", src, "-F", "raw"], "t"), 0);
    assert_ne!(p.bitmap(&["--merge", "s", "-b", "missing.qcow2"], "t"), 0);
    let t = &decode(&std::fs::read(&p.ours).unwrap())[0];
    assert!(t.bits.contains(&0) && t.bits.contains(&128), "{t:?}");
}

/// Mistakes, refusals and inconsistent bitmaps: qemu-img's messages and exit codes, nothing changed.
#[test]
fn mistakes_match_qemu_img() {
    let s = Scratch::new();
    let img = s.qcow2("img.qcow2", "", 64 << 20);
    qemu_img_ok(["bitmap", "--add", img.to_str().unwrap(), "b"]);
    qemu_img_ok(["bitmap", "--add", img.to_str().unwrap(), "u"]);
    // "u" in use, as a crash leaves it.
    let mut bytes = std::fs::read(&img).unwrap();
    let dir = {
        let bm = decode(&bytes);
        assert_eq!(bm.len(), 2);
        let u32_at = |d: &[u8], at: usize| u32::from_be_bytes(d[at..at + 4].try_into().unwrap());
        let mut at = u32_at(&bytes, 100) as usize;
        while u32_at(&bytes, at) != 0x2385_2875 {
            at += 8 + (u32_at(&bytes, at + 4) as usize).next_multiple_of(8);
        }
        u64::from_be_bytes(bytes[at + 24..at + 32].try_into().unwrap()) as usize
    };
    // The second entry follows the first (24 bytes and "b", padded to 32).
    bytes[dir + 32 + 15] |= IN_USE as u8;
    std::fs::write(&img, &bytes).unwrap();
    let p = Pair::new(&s, &img);
    let long = "x".repeat(1024);
    let cases: &[(&[&str], &str)] = &[
        (&[], "b"),
        (&["--add"], "b"),
        (&["--remove"], "nope"),
        (&["--clear"], "nope"),
        (&["--enable"], "nope"),
        (&["--disable"], "nope"),
        (&["--merge", "nope"], "b"),
        (&["--merge", "b"], "nope"),
        (&["--clear"], "u"),
        (&["--enable"], "u"),
        (&["--disable"], "u"),
        (&["--merge", "u"], "b"),
        (&["--merge", "b"], "u"),
        (&["-g", "64k", "--remove"], "b"),
        (&["--add", "-g", "abc"], "c"),
        (&["--add", "-g", "-1"], "c"),
        (&["--add", "-g", "100"], "c"),
        (&["--add", "-g", "3000"], "c"),
        (&["--add", "-g", "4G"], "c"),
        (&["--add", "-g", "1E"], "c"),
        (&["--add"], ""),
        (&["--add"], &long),
        (&["-b", "x.qcow2", "--add"], "c"),
        (&["-F", "qcow2", "--merge", "b"], "c"),
        (&["--add", "--add"], "twice"),
        (&["--add", "-q"], "c"),
        (&["--remove"], "u"),
    ];
    for (args, name) in cases {
        p.bitmap(args, name);
    }
    // A version 2 image and a raw one.
    let v2 = s.qcow2("v2.qcow2", "compat=0.10", 1 << 20);
    let p = Pair::new(&s, &v2);
    assert_ne!(p.bitmap(&["--add"], "b"), 0);
    let raw = s.path("r.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    for args in [
        &["--add"][..],
        &["--add", "-f", "raw"],
        &["--remove", "-f", "raw"],
    ] {
        let mut a = vec!["bitmap"];
        a.extend(args);
        a.extend([raw.to_str().unwrap(), "b"]);
        let (o, q) = (qcow2(&a), qemu_img(&a));
        assert_eq!(o.code, q.code, "{a:?}");
        assert_eq!(messages(&o), messages(&q), "{a:?}");
    }
    // Too large a bitmap for QEMU's limits.
    let big = s.qcow2("big.qcow2", "cluster_size=4096", 4 << 40);
    let p = Pair::new(&s, &big);
    assert_ne!(p.bitmap(&["--add", "-g", "512"], "b"), 0);
}
