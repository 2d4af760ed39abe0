//! `--version`, `-V`, `--help` and `-h` (for the tool and for every command) and unknown options, against
//! qemu-img and qemu-io 10: the same exit codes and streams, the same layout, and help texts that list only
//! options both tools accept. The version banner names this tool, never QEMU. Usage errors stay one line (the
//! project's rule), where QEMU adds a "Try '... --help'" line.

use std::ffi::OsString;

use qcow2_tests::{Output, Scratch, assert_clean_error, qcow2, qemu_img, qemu_io};

/// The commands the tool has that qemu-img has too (`io` is qemu-io's command line).
const IMG_COMMANDS: [&str; 15] = [
    "amend", "bench", "bitmap", "check", "commit", "compare", "convert", "create", "dd", "info",
    "map", "measure", "rebase", "resize", "snapshot",
];

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

fn assert_ok_stdout_only(out: &Output) {
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(out.stderr.is_empty(), "{}", out.describe());
    assert!(!out.stdout.is_empty(), "{}", out.describe());
}

/// The option names a help text lists (lines that start with two spaces and a dash), with whether each
/// takes a value: `-f, --format FMT` gives ("-f", true) and ("--format", true).
fn options(help: &str) -> Vec<(String, bool)> {
    let mut v = Vec::new();
    for line in help.lines() {
        let Some(rest) = line.strip_prefix("  -") else {
            continue;
        };
        let rest = format!("-{rest}");
        let tokens: Vec<&str> = rest.split_whitespace().collect();
        let names: Vec<&str> = tokens
            .iter()
            .take_while(|t| t.starts_with('-'))
            .copied()
            .collect();
        let after = tokens.get(names.len()).copied().unwrap_or("");
        let metavar = !after.is_empty()
            && (after.contains('|')
                || after
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c == '_' || c == '['));
        for n in names {
            let n = n.trim_end_matches(',');
            let (name, eq) = match n.split_once('=') {
                Some((name, _)) => (name, true),
                None => (n, false),
            };
            v.push((name.to_string(), metavar || eq));
        }
    }
    v
}

fn unknown(out: &Output) -> bool {
    let e = out.stderr_str();
    e.contains("unrecognized option") || e.contains("invalid option")
}

/// `args` for trying `opt` (with a throwaway value when it takes one) on command `cmd` (None: qemu-io).
fn try_args(cmd: Option<&str>, opt: &str, takes: bool, file: &OsString) -> Vec<OsString> {
    let mut a: Vec<OsString> = cmd.into_iter().map(OsString::from).collect();
    if opt.starts_with("--") && takes {
        a.push(format!("{opt}=x").into());
    } else {
        a.push(opt.into());
        if takes {
            a.push("x".into());
        }
    }
    a.push(file.clone());
    a
}

#[test]
fn version_banner_has_qemu_img_layout_and_names_this_tool() {
    let ours_first = format!("qcow2 version {} (qcow2-hosted)", env!("CARGO_PKG_VERSION"));
    for args in [
        vec!["--version"],
        vec!["-V"],
        vec!["--version", "info"],
        vec!["-V", "--bogus"],
    ] {
        let ours = qcow2(&args);
        let theirs = qemu_img(&args);
        assert_ok_stdout_only(&ours);
        assert_ok_stdout_only(&theirs);
        let (o, t) = (ours.stdout_str(), theirs.stdout_str());
        let (o, t) = (lines(&o), lines(&t));
        assert_eq!(o.len(), t.len(), "{args:?}\n{o:?}\n{t:?}");
        assert_eq!(o[0], ours_first);
        assert!(t[0].starts_with("qemu-img version "), "{t:?}");
        assert!(o[1].starts_with("Copyright (c) ") && t[1].starts_with("Copyright (c) "));
        assert!(
            !o.iter().any(|l| l.contains("QEMU") || l.contains("qemu")),
            "{o:?}"
        );
    }
    // qemu-io's -V and --version: the same two lines.
    for flag in ["-V", "--version"] {
        let ours = qcow2(["io", flag]);
        let theirs = qemu_io([flag]);
        assert_ok_stdout_only(&ours);
        assert_ok_stdout_only(&theirs);
        assert_eq!(ours.stdout_str(), qcow2(["--version"]).stdout_str());
        assert_eq!(
            lines(&ours.stdout_str()).len(),
            lines(&theirs.stdout_str()).len()
        );
    }
}

/// The "Recognized commands" section: (name, description).
fn command_list(help: &str) -> Vec<(String, String)> {
    help.lines()
        .skip_while(|l| !l.starts_with("Recognized commands"))
        .skip(2)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| {
            let (n, d) = l.trim_start().split_once(" - ")?;
            Some((n.to_string(), d.to_string()))
        })
        .collect()
}

#[test]
fn main_help_has_qemu_img_layout() {
    for flag in ["--help", "-h"] {
        let ours = qcow2([flag]);
        let theirs = qemu_img([flag]);
        assert_ok_stdout_only(&ours);
        assert_ok_stdout_only(&theirs);
        let (o, t) = (ours.stdout_str(), theirs.stdout_str());
        // It starts with the version banner, as qemu-img's.
        assert!(o.starts_with(&qcow2(["--version"]).stdout_str()), "{o}");
        assert!(t.starts_with(&qemu_img(["--version"]).stdout_str()), "{t}");
        for (mine, qemus) in [
            (
                "  qcow2 [standard options] COMMAND [--help | command options]",
                "  qemu-img [standard options] COMMAND [--help | command options]",
            ),
            ("Standard options:", "Standard options:"),
            ("  -h, --help", "  -h, --help"),
            ("  -V, --version", "  -V, --version"),
            ("Supported image formats:", "Supported image formats:"),
        ] {
            assert!(lines(&o).contains(&mine), "{mine:?} missing:\n{o}");
            assert!(lines(&t).contains(&qemus), "{qemus:?} missing:\n{t}");
        }
        // Every command listed is one the tool runs; those qemu-img has are described as qemu-img does.
        let (ol, tl) = (command_list(&o), command_list(&t));
        assert!(!tl.is_empty(), "{t}");
        let names: Vec<&str> = ol.iter().map(|(n, _)| n.as_str()).collect();
        let mut want: Vec<&str> = IMG_COMMANDS.to_vec();
        want.push("io");
        want.sort_unstable();
        assert_eq!(names, want, "{o}");
        for (n, d) in &ol {
            if let Some((_, td)) = tl.iter().find(|(tn, _)| tn == n) {
                assert_eq!(d, td, "description of {n}");
            } else {
                assert_eq!(n, "io", "{n} is listed but qemu-img has no such command");
            }
            let h = qcow2([n.as_str(), "--help"]);
            assert_ok_stdout_only(&h);
        }
    }
}

#[test]
fn command_help_has_qemu_img_layout_and_lists_accepted_options() {
    let s = Scratch::new();
    let file: OsString = s.path("no-such-image").into();
    for cmd in IMG_COMMANDS {
        for flag in ["--help", "-h"] {
            let ours = qcow2([cmd, flag]);
            let theirs = qemu_img([cmd, flag]);
            assert_ok_stdout_only(&ours);
            assert_ok_stdout_only(&theirs);
            let (o, t) = (ours.stdout_str(), theirs.stdout_str());
            let (ol, tl) = (lines(&o), lines(&t));
            assert_eq!(ol[0], "Usage:", "{o}");
            assert_eq!(tl[0], "Usage:", "{t}");
            assert_eq!(ol[1], tl[1], "{cmd}: description line");
            assert_eq!(ol[2], "");
            assert!(ol[3].starts_with(&format!("  qcow2 {cmd} ")), "{o}");
            assert!(tl[3].starts_with(&format!("  qemu-img {cmd} ")), "{t}");
            let args_at = ol.iter().position(|l| *l == "Arguments:").expect(&o);
            assert!(tl.contains(&"Arguments:"));
            assert_eq!(ol[args_at + 1], "  -h, --help", "{o}");
            assert!(
                o.ends_with("\n\n") == t.ends_with("\n\n"),
                "{cmd}: trailing blank line"
            );

            // Every option ours lists is one qemu-img lists for the command, and both tools accept it.
            let theirs_opts: Vec<String> = options(&t).into_iter().map(|(n, _)| n).collect();
            let ours_opts = options(&o);
            assert!(ours_opts.len() >= 3, "{o}");
            for (opt, takes) in ours_opts {
                assert!(
                    theirs_opts.contains(&opt),
                    "{cmd}: {opt} is not among qemu-img's options {theirs_opts:?}"
                );
                if opt == "-h" || opt == "--help" {
                    continue;
                }
                let args = try_args(Some(cmd), &opt, takes, &file);
                let ours = qcow2(&args);
                assert!(!unknown(&ours), "we reject {opt}:\n{}", ours.describe());
                let theirs = qemu_img(&args);
                assert!(
                    !unknown(&theirs),
                    "qemu-img rejects {opt}:\n{}",
                    theirs.describe()
                );
            }
        }
        // -h among other options still prints the help.
        let ours = qcow2([cmd, "-q", "-h"]);
        let theirs = qemu_img([cmd, "-q", "-h"]);
        assert_eq!(ours.code, theirs.code, "{cmd} -q -h");
    }
}

#[test]
fn io_help_has_qemu_io_layout_and_lists_accepted_options() {
    let s = Scratch::new();
    let file: OsString = s.path("no-such-image").into();
    for flag in ["--help", "-h"] {
        let ours = qcow2(["io", flag]);
        let theirs = qemu_io([flag]);
        assert_ok_stdout_only(&ours);
        assert_ok_stdout_only(&theirs);
        let (o, t) = (ours.stdout_str(), theirs.stdout_str());
        assert_eq!(
            lines(&o)[0],
            lines(&t)[0].replace("qemu-io", "qcow2 io"),
            "usage line"
        );
        assert!(
            o.contains("See 'qcow2 io -c help' for information on available commands."),
            "{o}"
        );
        assert!(t.contains("See 'qemu-io -c help' for information on available commands."));
        let theirs_opts: Vec<String> = options(&t).into_iter().map(|(n, _)| n).collect();
        let ours_opts = options(&o);
        assert!(ours_opts.len() >= 6, "{o}");
        for (opt, takes) in ours_opts {
            assert!(
                theirs_opts.contains(&opt),
                "io: {opt} is not among qemu-io's options {theirs_opts:?}"
            );
            if ["-h", "--help", "-V", "--version"].contains(&opt.as_str()) {
                continue;
            }
            let mut args = try_args(None, &opt, takes, &file);
            let ours = qcow2(std::iter::once(OsString::from("io")).chain(args.clone()));
            assert!(!unknown(&ours), "we reject io {opt}:\n{}", ours.describe());
            // qemu-io without -c reads commands from stdin (closed here); give it one anyway.
            args.insert(0, "quit".into());
            args.insert(0, "-c".into());
            let theirs = qemu_io(&args);
            assert!(
                !unknown(&theirs),
                "qemu-io rejects {opt}:\n{}",
                theirs.describe()
            );
        }
    }
}

/// Unknown and malformed options: qemu-img's exit code, and its first stderr line (with our name).
#[test]
fn unknown_options_fail_as_qemu_img_does() {
    let cases: Vec<Vec<&str>> = vec![
        vec!["--bogus"],
        vec!["-x"],
        vec!["--version=1"],
        vec!["--help=1"],
        vec![],
        vec!["nosuch"],
        vec!["info", "--bogus"],
        vec!["info", "-Z"],
        vec!["info", "--version"],
        vec!["info", "-V"],
        vec!["info", "--help=1"],
        vec!["map", "-f"],
        vec!["check", "--output"],
    ];
    for args in cases {
        let ours = qcow2(&args);
        let theirs = qemu_img(&args);
        assert_eq!(
            ours.code,
            theirs.code,
            "{args:?}\n{}\n{}",
            ours.describe(),
            theirs.describe()
        );
        assert_clean_error(&ours);
        assert!(ours.stdout.is_empty(), "{}", ours.describe());
        let want = theirs
            .stderr_str()
            .lines()
            .next()
            .unwrap_or("")
            .replacen("qemu-img", "qcow2", 1);
        assert_eq!(ours.stderr_str().trim_end(), want, "{args:?}");
    }
    // qemu-io's: the same exit code and error line (qemu-io also prints its usage on stdout).
    for args in [vec!["--bogus"], vec!["-Z"], vec!["--version=1"]] {
        let ours = qcow2(std::iter::once("io").chain(args.iter().copied()));
        let theirs = qemu_io(&args);
        assert_eq!(
            ours.code,
            theirs.code,
            "io {args:?}\n{}\n{}",
            ours.describe(),
            theirs.describe()
        );
        assert_clean_error(&ours);
        let want = theirs
            .stderr_str()
            .lines()
            .next()
            .unwrap_or("")
            .replacen("qemu-io", "qcow2 io", 1);
        assert_eq!(ours.stderr_str().trim_end(), want, "io {args:?}");
    }
}
