//! `qcow2 snapshot` against `qemu-img snapshot` on copies of the same images: after the same sequence of
//! creates and deletes the files are byte-identical but for each snapshot's date (cluster sizes 512 B to
//! 2 MiB, v2 and v3, extended L2, compressed clusters, refcount widths, lazy refcounts, a backing file,
//! snapshots of snapshots); `qemu-img check` is clean after every step, each snapshot reads as the disk did
//! when it was taken, `-l` prints qemu-img's table, and every mistake gives qemu-img's message and exit code.

use std::path::Path;

use qcow2_tests::{
    Output, Scratch, assert_bytes_equal, qcow2, qemu_img, qemu_img_ok, qemu_io_cmds,
};

/// The file with every snapshot's date (seconds and nanoseconds) zeroed: the one thing the tools may differ in.
fn without_dates(path: &Path) -> Vec<u8> {
    let mut d = std::fs::read(path).unwrap();
    let u32_at = |d: &[u8], at: usize| u32::from_be_bytes(d[at..at + 4].try_into().unwrap());
    let nb = u32_at(&d, 60);
    let mut at = u64::from_be_bytes(d[64..72].try_into().unwrap()) as usize;
    for _ in 0..nb {
        d[at + 16..at + 24].fill(0);
        let (id, name, extra) = (
            (u32_at(&d, at + 12) >> 16) as usize,
            (u32_at(&d, at + 12) & 0xffff) as usize,
            u32_at(&d, at + 36) as usize,
        );
        at += (40 + extra + id + name).next_multiple_of(8);
    }
    d
}

fn run(tool: fn(&[&str]) -> Output, args: &[&str], file: &Path) -> Output {
    let mut all = vec!["snapshot"];
    all.extend_from_slice(args);
    let f = file.to_str().unwrap();
    all.push(f);
    tool(&all)
}

/// Runs one step with both tools (ours on `ours`, qemu-img on `theirs`) and compares everything.
fn step(ours: &Path, theirs: &Path, args: &[&str], what: &str) -> bool {
    step_with(ours, theirs, args, what, true)
}

/// [`step`]; without `identical`, a success is compared by guest content and check alone.
fn step_with(ours: &Path, theirs: &Path, args: &[&str], what: &str, identical: bool) -> bool {
    let before = std::fs::read(ours).unwrap();
    let o = run(|a| qcow2(a), args, ours);
    let t = run(|a| qemu_img(a), args, theirs);
    let what = format!("{what}: snapshot {args:?}");
    assert_eq!(
        o.code,
        t.code,
        "{what}:\n{}\n{}",
        o.describe(),
        t.describe()
    );
    assert_eq!(
        o.stderr_str().replace(ours.to_str().unwrap(), "IMG"),
        t.stderr_as_ours().replace(theirs.to_str().unwrap(), "IMG"),
        "{what}: messages"
    );
    if o.success() && identical {
        assert_bytes_equal(&without_dates(ours), &without_dates(theirs), &what);
    } else if o.success() {
        let c = qemu_img(["compare".as_ref(), ours.as_os_str(), theirs.as_os_str()]);
        assert_eq!(c.code, Some(0), "{what}: {}", c.describe());
    } else {
        // A refusal changes nothing (qemu-img may leave counts it made behind: leaks).
        assert_bytes_equal(&std::fs::read(ours).unwrap(), &before, &what);
        std::fs::copy(ours, theirs).unwrap();
    }
    let c = qemu_img(["check".as_ref(), ours.as_os_str()]);
    assert_eq!(c.code, Some(0), "{what}: qemu-img check:\n{}", c.describe());
    // Both tools list the same table for our file.
    let (lo, lt) = (
        run(|a| qcow2(a), &["-l"], ours),
        run(|a| qemu_img(a), &["-l"], ours),
    );
    assert_eq!(lo.stdout_str(), lt.stdout_str(), "{what}: -l");
    o.success()
}

/// The disk as qemu-img reads snapshot `name` of `img`.
fn snapshot_content(s: &Scratch, img: &Path, name: &str) -> Vec<u8> {
    let out = s.path("snap.raw");
    let _ = std::fs::remove_file(&out);
    qemu_img_ok([
        "convert".as_ref(),
        "-l".as_ref(),
        format!("snapshot.name={name}").as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        img.as_os_str(),
        out.as_os_str(),
    ]);
    std::fs::read(out).unwrap()
}

fn guest(s: &Scratch, img: &Path) -> Vec<u8> {
    let out = s.path("active.raw");
    let _ = std::fs::remove_file(&out);
    qemu_img_ok([
        "convert".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        img.as_os_str(),
        out.as_os_str(),
    ]);
    std::fs::read(out).unwrap()
}

#[test]
fn sequences_match_qemu_img() {
    let kinds: [(&str, u64, bool); 9] = [
        ("", 16 << 20, false),
        ("cluster_size=512", 2 << 20, false),
        ("cluster_size=4096,compat=0.10", 4 << 20, false),
        ("cluster_size=16384,extended_l2=on", 8 << 20, false),
        ("cluster_size=2M", 16 << 20, false),
        ("cluster_size=4096", 4 << 20, true),
        ("cluster_size=1024,refcount_bits=64", 2 << 20, false),
        ("cluster_size=4096,refcount_bits=2", 2 << 20, false),
        ("cluster_size=4096,lazy_refcounts=on", 4 << 20, false),
    ];
    for (opts, size, compressed) in kinds {
        let s = Scratch::new();
        let img = s.qcow2("img.qcow2", opts, size);
        let mut cmds = Vec::new();
        let mut at = 0;
        let mut byte = 1u8;
        while at + 8192 <= size {
            let c = if compressed && byte.is_multiple_of(2) {
                "-c "
            } else {
                ""
            };
            cmds.push(format!("write {c}-P {byte} {at} 8192"));
            at += size / 24 / 4096 * 4096;
            byte += 1;
        }
        qemu_io_cmds(&img, "qcow2", &cmds);
        let (ours, theirs) = (s.path("ours.qcow2"), s.path("theirs.qcow2"));
        std::fs::copy(&img, &ours).unwrap();
        std::fs::copy(&img, &theirs).unwrap();
        let first = guest(&s, &img);
        assert!(step(&ours, &theirs, &["-c", "first"], opts));
        // Writes after the snapshot go to new clusters (COPIED was cleared); the snapshot keeps its data.
        let change = vec![format!("write -P 0xaa 0 {}", size / 3)];
        qemu_io_cmds(&ours, "qcow2", &change);
        qemu_io_cmds(&theirs, "qcow2", &change);
        assert!(
            snapshot_content(&s, &ours, "first") == first,
            "{opts}: first"
        );
        let second = guest(&s, &ours);
        step(&ours, &theirs, &["-c", "second"], opts);
        step(&ours, &theirs, &["-c", "second"], opts);
        // (With 2-bit refcounts both tools refuse: a refcount would pass 3.)
        if step(&ours, &theirs, &["-a", "first"], opts) {
            assert!(guest(&s, &ours) == first, "{opts}: applied first");
        }
        if step(&ours, &theirs, &["-a", "2"], opts) {
            assert!(guest(&s, &ours) == second, "{opts}: applied id 2");
        }
        step(&ours, &theirs, &["-a", "none"], opts);
        step(&ours, &theirs, &["-d", "first"], opts);
        assert_eq!(
            snapshot_content(&s, &ours, "second"),
            second,
            "{opts}: second"
        );
        step(&ours, &theirs, &["-d", "second"], opts);
        step(&ours, &theirs, &["-d", "second"], opts);
        step(&ours, &theirs, &["-d", "second"], opts);
        assert!(guest(&s, &ours) == second, "{opts}: active disk");
        step(&ours, &theirs, &["-l"], opts);
    }
}

/// Applying a snapshot taken at another disk size: the disk returns to the snapshot's size and content.
#[test]
fn apply_across_resizes() {
    for opts in ["cluster_size=4096", "cluster_size=512", ""] {
        let s = Scratch::new();
        let img = s.qcow2("img.qcow2", opts, 4 << 20);
        qemu_io_cmds(
            &img,
            "qcow2",
            &[
                "write -P 1 0 64k".to_string(),
                "write -c -P 2 1M 64k".to_string(),
                "write -P 3 3M 8k".to_string(),
            ],
        );
        let at_4m = guest(&s, &img);
        qemu_img_ok(["snapshot", "-c", "four", img.to_str().unwrap()]);
        let (ours, theirs) = (s.path("ours.qcow2"), s.path("theirs.qcow2"));
        for (resize, extra, identical) in [
            (
                vec!["resize", "--shrink", img.to_str().unwrap(), "1M"],
                "write -P 4 0 4k",
                true,
            ),
            (
                vec!["resize", img.to_str().unwrap(), "1G"],
                "write -P 5 900M 64k",
                false,
            ),
        ] {
            let work = s.path("work.qcow2");
            std::fs::copy(&img, &work).unwrap();
            let mut args = resize.clone();
            let last = args.len() - 2;
            args[last] = work.to_str().unwrap();
            qemu_img_ok(&args);
            qemu_io_cmds(&work, "qcow2", &[extra.to_string()]);
            std::fs::copy(&work, &ours).unwrap();
            std::fs::copy(&work, &theirs).unwrap();
            // QEMU first resizes the disk in place, then applies the snapshot; this engine switches to the
            // snapshot's size and table with one header write (a power cut in between must not leave a
            // resized disk that is neither). Growing back to the snapshot's size, the files are the same;
            // shrinking to it, QEMU's resize copies and frees tables on the way (its file keeps them as
            // free clusters at its end): the same disk, other free clusters.
            assert!(step_with(&ours, &theirs, &["-a", "four"], opts, identical));
            assert!(guest(&s, &ours) == at_4m, "{opts} {resize:?}: applied");
        }
    }
}

/// An overlay's snapshot, names qemu-img cuts at 255 bytes, and the refusals.
#[test]
fn names_overlays_and_refusals() {
    let s = Scratch::new();
    let base = s.qcow2("base.qcow2", "", 4 << 20);
    qemu_io_cmds(&base, "qcow2", &["write -P 7 0 4M".to_string()]);
    let top = s.create(
        "top.qcow2",
        "qcow2",
        "",
        4 << 20,
        Some(("base.qcow2", "qcow2")),
    );
    qemu_io_cmds(&top, "qcow2", &["write -P 8 1M 64k".to_string()]);
    let (ours, theirs) = (s.path("ours.qcow2"), s.path("theirs.qcow2"));
    std::fs::copy(&top, &ours).unwrap();
    std::fs::copy(&top, &theirs).unwrap();
    let long = "n".repeat(300);
    for args in [
        vec!["-c", "x"],
        vec!["-c", long.as_str()],
        vec!["-c", ""],
        vec!["-q", "-c", "q"],
        vec!["-d", "nope"],
        vec!["-c", "a", "-d", "b"],
        vec!["-l", "-l"],
        vec!["-d", "x"],
    ] {
        step(&ours, &theirs, &args, "overlay");
    }
    let raw = s.path("r.raw");
    std::fs::write(&raw, vec![0u8; 65536]).unwrap();
    for args in [
        vec!["snapshot", "-c", "x", raw.to_str().unwrap()],
        vec!["snapshot", "-l", raw.to_str().unwrap()],
        vec!["snapshot"],
        vec!["snapshot", "-l", "a", "b"],
        vec!["snapshot", "-c"],
    ] {
        let (o, t) = (qcow2(&args), qemu_img(&args));
        assert_eq!(
            o.code,
            t.code,
            "{args:?}: {}\n{}",
            o.describe(),
            t.describe()
        );
        assert_eq!(o.stderr_as_ours(), t.stderr_as_ours(), "{args:?}");
    }
}
