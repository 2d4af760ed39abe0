//! The host files an image names: backing and external data files that are not regular files (a FIFO, a
//! directory, a socket, a character device) are refused at once, by every command, with QEMU's message; and a
//! backing file whose format was probed never points the tool at a host file, whatever name it stores.
//!
//! Every run of our tool goes through the harness's time limit (`qcow2_tests::qcow2`), so an open that
//! blocks (a FIFO nobody writes to) fails the test instead of hanging it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use qcow2_tests::malformed::Image;
use qcow2_tests::{
    Output, Scratch, assert_clean_error, qcow2, qemu_img, qemu_img_ok, qemu_io, qemu_io_cmds,
};

/// A non-regular file kind, made at `path`.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Fifo,
    Directory,
    Socket,
}

const KINDS: [Kind; 3] = [Kind::Fifo, Kind::Directory, Kind::Socket];

/// A character device every Linux machine has.
const CHAR_DEVICE: &str = "/dev/null";

fn make(kind: Kind, path: &Path) {
    let _ = std::fs::remove_file(path);
    match kind {
        Kind::Fifo => {
            let st = std::process::Command::new("mkfifo")
                .arg(path)
                .status()
                .expect("run mkfifo");
            assert!(st.success(), "mkfifo {} failed", path.display());
        }
        Kind::Directory => std::fs::create_dir(path).expect("create dir"),
        Kind::Socket => {
            // The listener is dropped, the socket file stays (nobody listens: opening it gives ENXIO).
            std::os::unix::net::UnixListener::bind(path).expect("bind socket");
        }
    }
}

/// Every command that opens the image's chain, with the image last (and what it needs around it).
fn commands(img: &Path, scratch: &Scratch) -> Vec<Vec<OsString>> {
    let i = || OsString::from(img);
    let out_raw = scratch.path("out.raw").into_os_string();
    let out_qcow2 = scratch.path("out.qcow2").into_os_string();
    let v = |args: &[&str]| -> Vec<OsString> {
        let mut a: Vec<OsString> = args.iter().map(OsString::from).collect();
        a.push(i());
        a
    };
    // (`info` without --backing-chain opens the image alone, as qemu-img does: it is not among them.)
    vec![
        v(&["info", "--backing-chain"]),
        v(&["info", "--backing-chain", "--output=json"]),
        v(&["map"]),
        v(&["map", "--output=json"]),
        vec!["convert".into(), "-O".into(), "raw".into(), i(), out_raw],
        vec![
            "convert".into(),
            "-O".into(),
            "qcow2".into(),
            i(),
            out_qcow2,
        ],
        vec!["compare".into(), i(), i()],
        v(&["io", "-r", "-c", "read -v 0 512"]),
        v(&["io", "-c", "write -P 0x11 0 512"]),
        v(&["bench", "-c", "1"]),
        v(&["bench", "-c", "1", "-w"]),
    ]
}

/// Runs `args` and asserts that it failed at once, in one line, with QEMU's words for `name`.
fn assert_refused(args: &[OsString], name: &str) -> Output {
    let out = qcow2(args);
    assert_clean_error(&out);
    let want = format!("'file' driver requires '{name}' to be a regular file");
    assert!(
        out.stderr_str().contains(&want),
        "expected \"{want}\":\n{}",
        out.describe()
    );
    out
}

/// An overlay over `backing` (a name relative to the overlay's directory), with the backing format declared
/// as `fmt` or, with `None`, not declared (the tool then probes it).
fn overlay(scratch: &Scratch, name: &str, backing: &str, fmt: Option<&str>) -> PathBuf {
    let path = scratch.path(name);
    qemu_img_ok([
        OsString::from("create"),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-u".into(),
        "-b".into(),
        backing.into(),
        "-F".into(),
        fmt.unwrap_or("raw").into(),
        path.clone().into(),
        "1M".into(),
    ]);
    if fmt.is_none() {
        let mut img = Image {
            bytes: std::fs::read(&path).expect("read overlay"),
        };
        img.set_backing(Some(backing), None);
        img.write_to(&path);
    }
    path
}

/// An image (`data_file_raw=on`) whose external data file is `data` in the scratch directory, stored by its
/// full name (QEMU resolves a relative data file name against its working directory, not the image's); with
/// `kind`, the data file is then replaced by a file of that kind.
fn with_data_file(scratch: &Scratch, name: &str, data: &str, kind: Option<Kind>) -> PathBuf {
    let img = scratch.path(name);
    let data_path = scratch.path(data);
    qemu_img_ok([
        OsString::from("create"),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-o".into(),
        format!("data_file={},data_file_raw=on", data_path.display()).into(),
        img.clone().into(),
        "1M".into(),
    ]);
    if let Some(kind) = kind {
        std::fs::remove_file(&data_path).expect("remove data file");
        make(kind, &data_path);
    }
    img
}

#[test]
fn non_regular_backing_files_are_refused_at_once() {
    let s = Scratch::new();
    for kind in KINDS {
        let name = format!("{kind:?}");
        make(kind, &s.path(&name));
        for (fmt, tag) in [
            (Some("raw"), "raw"),
            (Some("qcow2"), "qcow2"),
            (None, "probed"),
        ] {
            let top = overlay(&s, &format!("over-{name}-{tag}.qcow2"), &name, fmt);
            let before = std::fs::read(&top).unwrap();
            let shown = s.path(&name).to_string_lossy().into_owned();
            for args in commands(&top, &s) {
                let out = assert_refused(&args, &shown);
                // `info --backing-chain` opens each image alone, as qemu-img does: the message names the
                // backing file itself.
                let want = if args.iter().any(|a| a == "--backing-chain") {
                    format!("Could not open '{shown}': ")
                } else {
                    "Could not open backing file: ".to_string()
                };
                assert!(out.stderr_str().contains(&want), "{}", out.describe());
            }
            assert_eq!(
                std::fs::read(&top).unwrap(),
                before,
                "a refused open changed {}",
                top.display()
            );
        }
    }
    // A character device, named by its absolute path.
    let top = overlay(&s, "over-chardev.qcow2", CHAR_DEVICE, Some("raw"));
    for args in commands(&top, &s) {
        assert_refused(&args, CHAR_DEVICE);
    }
}

#[test]
fn non_regular_data_files_are_refused_at_once() {
    let s = Scratch::new();
    for kind in KINDS {
        let data = format!("data-{kind:?}");
        let img = with_data_file(&s, &format!("df-{kind:?}.qcow2"), &data, Some(kind));
        let before = std::fs::read(&img).unwrap();
        let shown = s.path(&data).to_string_lossy().into_owned();
        for args in commands(&img, &s) {
            let out = assert_refused(&args, &shown);
            // QEMU names no "data file" in this message: the file driver's words come straight after the
            // image's name.
            assert!(
                !out.stderr_str().contains("data file"),
                "{}",
                out.describe()
            );
        }
        assert_eq!(std::fs::read(&img).unwrap(), before);
        // check reads the image's own metadata only: it must end by itself too.
        let out = qcow2([OsString::from("check"), img.clone().into()]);
        assert!(out.code.is_some(), "{}", out.describe());
    }
    // The same image over a regular data file opens (the refusals above are the file's kind, nothing else).
    let img = with_data_file(&s, "df-regular.qcow2", "data-regular", None);
    qemu_io_cmds(&img, "qcow2", &["write -P 0x5c 0 4k".to_string()]);
    let out = qcow2([
        OsString::from("io"),
        "-r".into(),
        "-c".into(),
        "read -P 0x5c 0 4k".into(),
        img.clone().into(),
    ]);
    assert!(out.success(), "{}", out.describe());
}

#[test]
fn non_regular_image_names_are_refused_at_once() {
    let s = Scratch::new();
    for kind in KINDS {
        let p = s.path(&format!("{kind:?}"));
        make(kind, &p);
        let shown = p.to_string_lossy().into_owned();
        let mut all = commands(&p, &s);
        all.push(vec!["check".into(), p.clone().into()]);
        all.push(vec![
            "check".into(),
            "-r".into(),
            "all".into(),
            p.clone().into(),
        ]);
        for args in all {
            assert_refused(&args, &shown);
        }
        // create opens the backing file (for its size, unless -u) and refuses it the same way.
        let new = s.path(&format!("new-{kind:?}.qcow2"));
        let args: Vec<OsString> = vec![
            "create".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "-b".into(),
            p.clone().into(),
            "-F".into(),
            "raw".into(),
            new.clone().into(),
        ];
        let out = qcow2(&args);
        assert_clean_error(&out);
        assert!(
            out.stderr_str().contains("to be a regular file"),
            "{}",
            out.describe()
        );
    }
}

/// Where QEMU answers at all (a directory: its open fails at once; it blocks on a FIFO just as we used to),
/// our message is its message.
#[test]
fn messages_match_qemu_img() {
    let s = Scratch::new();
    make(Kind::Directory, &s.path("dir"));
    let top = overlay(&s, "over-dir.qcow2", "dir", Some("raw"));
    let data = with_data_file(&s, "df-dir.qcow2", "data-dir", Some(Kind::Directory));
    // Run from the scratch directory with relative names, so that both messages name the files alike.
    for img in [&top, &data] {
        let rel = img.file_name().unwrap();
        for cmd in ["map", "convert"] {
            let mut args: Vec<OsString> = vec![cmd.into()];
            if cmd == "convert" {
                args.extend(["-O".into(), "raw".into()]);
            }
            args.push(rel.into());
            if cmd == "convert" {
                args.push("out.raw".into());
            }
            let ours = in_dir(&s, qcow2_tests::qcow2_bin(), &args);
            let theirs = {
                let mut c = qcow2_tests::qemu_command("qemu-img");
                c.current_dir(s.dir()).args(&args);
                qcow2_tests::run_with_timeout(&mut c, qcow2_tests::QEMU_TIMEOUT).unwrap()
            };
            assert_clean_error(&ours);
            assert!(!theirs.success(), "{}", theirs.describe());
            assert_eq!(
                ours.stderr_str().strip_prefix("qcow2: "),
                theirs.stderr_str().strip_prefix("qemu-img: "),
                "\nours: {}\nqemu: {}",
                ours.describe(),
                theirs.describe()
            );
        }
    }
}

fn in_dir(s: &Scratch, bin: &Path, args: &[OsString]) -> Output {
    let mut c = std::process::Command::new(bin);
    c.current_dir(s.dir()).args(args);
    let out = qcow2_tests::run_with_timeout(&mut c, qcow2_tests::TOOL_TIMEOUT).unwrap();
    qcow2_tests::assert_sane(&out);
    out
}

/// A qcow2 base that stores a name (a backing file, an external data file) pointing at a host file, under
/// an overlay that declares the base's format or not.
fn probed_base_case(s: &Scratch, names_data_file: bool, declared: bool) -> PathBuf {
    let tag = format!(
        "{}-{}",
        if names_data_file { "df" } else { "bk" },
        if declared { "declared" } else { "probed" }
    );
    let host = s.path(&format!("host-{tag}.txt"));
    let base = s.path(&format!("base-{tag}.qcow2"));
    if names_data_file {
        with_data_file(
            s,
            base.file_name().unwrap().to_str().unwrap(),
            host.file_name().unwrap().to_str().unwrap(),
            None,
        );
    } else {
        std::fs::write(&host, b"").unwrap();
        overlay(
            s,
            base.file_name().unwrap().to_str().unwrap(),
            host.file_name().unwrap().to_str().unwrap(),
            Some("raw"),
        );
    }
    // The host file's bytes, written after qemu-img made (and emptied) it.
    let mut secret = b"HOST-FILE-SECRET ".repeat(32);
    secret.resize(1 << 20, 0);
    std::fs::write(&host, &secret).unwrap();
    overlay(
        s,
        &format!("top-{tag}.qcow2"),
        base.file_name().unwrap().to_str().unwrap(),
        declared.then_some("qcow2"),
    )
}

#[test]
fn probed_backing_file_names_no_host_file() {
    let s = Scratch::new();
    for names_data_file in [true, false] {
        // Declared: the chain is followed and the host file's bytes are the guest's (both tools agree).
        let top = probed_base_case(&s, names_data_file, true);
        let read: Vec<OsString> = vec![
            "-r".into(),
            "-c".into(),
            "read -v 0 64".into(),
            top.clone().into(),
        ];
        let mut ours_args = vec![OsString::from("io")];
        ours_args.extend(read.iter().cloned());
        let ours = qcow2(&ours_args);
        let theirs = qemu_io(&read);
        assert!(ours.success(), "{}", ours.describe());
        assert!(theirs.success(), "{}", theirs.describe());
        assert!(
            ours.stdout_str().contains("HOST.FILE.SECRET"),
            "{}",
            ours.describe()
        );
        assert_eq!(
            qcow2_tests::drop_timing_lines(&ours.stdout_str()),
            qcow2_tests::drop_timing_lines(&theirs.stdout_str())
        );

        // Probed: every command that opens the chain refuses it, before reading a byte of the host file.
        let top = probed_base_case(&s, names_data_file, false);
        let what = if names_data_file {
            "names an external data file"
        } else {
            "names a backing file of its own"
        };
        for args in commands(&top, &s) {
            let out = qcow2(&args);
            assert_clean_error(&out);
            let err = out.stderr_str();
            assert!(
                err.contains("probed as qcow2") && err.contains(what),
                "{}",
                out.describe()
            );
            assert!(!out.stdout_str().contains("SECRET"), "{}", out.describe());
        }
        // qemu-img (10) follows the probed file's names: our rule is stricter, as the README says.
        let theirs = qemu_io(&read);
        assert!(
            theirs.success() && theirs.stdout_str().contains("HOST.FILE.SECRET"),
            "qemu-io no longer follows a probed base's names; revisit the README's comparison:\n{}",
            theirs.describe()
        );
        let check = qemu_img(["check".into(), OsString::from(&top)]);
        assert!(check.success(), "{}", check.describe());
    }
}
