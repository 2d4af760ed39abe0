//! qemu-io's cache modes in `qcow2 io` (`-t/--cache=MODE`, `-n/--nocache`).
//!
//! * SIGKILL at random moments: `qcow2 io` runs a long list of commands (writes of distinct patterns at
//!   scattered offsets, each allocating a cluster, many in new L2 tables; zero writes and discards over
//!   earlier writes; a `flush` now and then) and is killed with SIGKILL after a random number of reports.
//!   In the write-through modes (the default, `writethrough`, `directsync`) every command whose report was
//!   printed must read back through qemu-io exactly; in every mode the commands before the last `flush` that
//!   completed must (a flush writes cached metadata back to the file even with `unsafe`), and `qemu-img
//!   check` must find no corruption (leaked clusters are allowed).
//! * The options are parsed as qemu-io parses them: the same exit codes and messages for invalid modes and
//!   missing values, and the same output and image for every valid spelling.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use qcow2_tests::{
    Output, Scratch, assert_text_eq, drop_timing_lines, qcow2, qcow2_bin, qemu_img, qemu_io,
};

/// Cluster size of the test images: small, so that 2 MiB of guest space needs its own L2 table.
const CLUSTER: u64 = 4096;
/// Guest size: 128 L2 tables' worth of 4 KiB clusters.
const SIZE: u64 = 256 << 20;
/// Commands per run.
const COMMANDS: usize = 240;
/// A `flush` every this many commands.
const FLUSH_EVERY: usize = 30;
/// Longest a killed run may take.
const RUN_LIMIT: Duration = Duration::from_secs(20);

/// xorshift64*: deterministic, seedable.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A guest range and the byte it must read as once the commands that set it are durable.
#[derive(Debug, Clone, Copy)]
struct Region {
    offset: u64,
    len: u64,
    byte: u8,
}

/// One command of a run and what it does to the expected image.
#[derive(Debug, Clone)]
enum Step {
    /// A write of `regions[region]` with its byte (a new cluster).
    Write { region: usize },
    /// `write -z` or `discard` over `regions[region]`: it reads as zeros afterwards.
    Zero { region: usize },
    /// `flush` (prints nothing).
    Flush,
}

struct Plan {
    regions: Vec<Region>,
    steps: Vec<Step>,
    cmds: Vec<String>,
}

fn plan(seed: u64) -> Plan {
    let mut rng = Rng::new(seed);
    let clusters = SIZE / CLUSTER;
    let mut used = std::collections::HashSet::new();
    let (mut regions, mut steps, mut cmds) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..COMMANDS {
        if i % FLUSH_EVERY == FLUSH_EVERY - 1 {
            steps.push(Step::Flush);
            cmds.push("flush".to_string());
            continue;
        }
        // Now and then zero or discard the cluster of an earlier write.
        if i % 9 == 8 && !regions.is_empty() {
            let region = rng.below(regions.len() as u64) as usize;
            let r: Region = regions[region];
            let cluster_start = r.offset / CLUSTER * CLUSTER;
            let discard = rng.below(2) == 0;
            cmds.push(if discard {
                format!("discard {cluster_start} {CLUSTER}")
            } else {
                format!("write -z {} {}", r.offset, r.len)
            });
            steps.push(Step::Zero { region });
            continue;
        }
        // A new cluster, anywhere in the disk; the write stays inside it.
        let cluster = loop {
            let c = rng.below(clusters);
            if used.insert(c) {
                break c;
            }
        };
        let start = rng.below(CLUSTER / 2);
        let len = 1 + rng.below(CLUSTER - start);
        let byte = 1 + (i % 255) as u8;
        let offset = cluster * CLUSTER + start;
        regions.push(Region { offset, len, byte });
        steps.push(Step::Write {
            region: regions.len() - 1,
        });
        cmds.push(format!("write -P {byte:#x} {offset} {len}"));
    }
    Plan {
        regions,
        steps,
        cmds,
    }
}

/// What one killed run printed.
struct Run {
    /// Report lines ("wrote ..." / "discard ..."), in order.
    reports: Vec<String>,
    /// Killed by our SIGKILL before it could finish.
    killed: bool,
    stderr: String,
}

/// Runs `qcow2 io [cache_args] -c ... img` and kills it with SIGKILL once `kill_after` reports were seen.
fn run_and_kill(img: &Path, cache_args: &[&str], cmds: &[String], kill_after: usize) -> Run {
    let mut args: Vec<OsString> = vec!["io".into(), "-f".into(), "qcow2".into()];
    args.extend(cache_args.iter().map(OsString::from));
    for c in cmds {
        args.push("-c".into());
        args.push(c.into());
    }
    args.push(img.into());
    let mut child = Command::new(qcow2_bin())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qcow2");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut stderr_pipe = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr_pipe.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let mut reports = Vec::new();
    let mut sent_kill = false;
    loop {
        let left = RUN_LIMIT.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if line.starts_with("wrote ") || line.starts_with("discard ") {
                    reports.push(line);
                    if reports.len() >= kill_after && !sent_kill {
                        // Child::kill sends SIGKILL.
                        let _ = child.kill();
                        sent_kill = true;
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "qcow2 io {cache_args:?} ran for more than {RUN_LIMIT:?} ({} reports)",
                    reports.len()
                );
            }
        }
    }
    let status = child.wait().expect("wait for qcow2");
    reader.join().expect("stdout reader");
    let stderr = err_reader.join().expect("stderr reader");
    let killed = status.signal() == Some(9);
    assert!(
        killed || status.code() == Some(0),
        "qcow2 io {cache_args:?} ended with {status:?}; stderr:\n{stderr}"
    );
    Run {
        reports,
        killed,
        stderr,
    }
}

/// The regions whose content is certain once the commands before `durable` are durable, with their bytes:
/// a region that a later command touches (it may have landed or not, or be half done when the process died)
/// is left out.
fn expected(plan: &Plan, durable: usize) -> Vec<Region> {
    let mut want: Vec<Option<Region>> = vec![None; plan.regions.len()];
    for step in &plan.steps[..durable] {
        match *step {
            Step::Write { region } => want[region] = Some(plan.regions[region]),
            Step::Zero { region } => {
                want[region] = Some(Region {
                    byte: 0,
                    ..plan.regions[region]
                })
            }
            Step::Flush => {}
        }
    }
    for step in &plan.steps[durable..] {
        if let Step::Write { region } | Step::Zero { region } = *step {
            want[region] = None;
        }
    }
    want.into_iter().flatten().collect()
}

/// Reads every region through qemu-io and returns the ones that do not hold their byte.
fn mismatches(img: &Path, regions: &[Region]) -> Vec<String> {
    let mut bad = Vec::new();
    for chunk in regions.chunks(100) {
        let mut args: Vec<OsString> = vec!["-r".into(), "-f".into(), "qcow2".into()];
        for r in chunk {
            args.push("-c".into());
            args.push(format!("read -q -P {:#x} {} {}", r.byte, r.offset, r.len).into());
        }
        args.push(img.into());
        let out = qemu_io(&args);
        let text = out.stdout_str() + &out.stderr_str();
        assert!(
            !text.contains("read failed") && !text.contains("Could not open"),
            "qemu-io cannot read the image:\n{}",
            out.describe()
        );
        bad.extend(
            text.lines()
                .filter(|l| l.contains("Pattern verification failed"))
                .map(str::to_string),
        );
    }
    bad
}

/// `qemu-img check`: no corruption (0 = clean, 3 = leaked clusters only).
fn assert_no_corruption(img: &Path, what: &str) {
    let out = qemu_img([
        "check".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        img.as_os_str(),
    ]);
    assert!(
        matches!(out.code, Some(0 | 3)),
        "{what}: qemu-img check finds the image damaged:\n{}",
        out.describe()
    );
}

/// The command index of every report: reports come in command order, one per command except `flush`.
fn reported_commands(plan: &Plan, run: &Run) -> usize {
    let mut idx = 0;
    for (n, line) in run.reports.iter().enumerate() {
        while matches!(plan.steps.get(idx), Some(Step::Flush)) {
            idx += 1;
        }
        let cmd = plan
            .cmds
            .get(idx)
            .unwrap_or_else(|| panic!("report {n} ({line}) has no command"));
        // "wrote 123/123 bytes at offset 456" for "write ... 456 123" (or "discard 4096 4096").
        let mut words = cmd.split(' ').rev();
        let (len, off) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        assert!(
            line.ends_with(&format!(" {len}/{len} bytes at offset {off}")),
            "report {n} `{line}` does not belong to command {idx} `{cmd}`"
        );
        idx += 1;
    }
    idx
}

/// Kills `qcow2 io` with `cache_args` at random moments over `seeds` and checks what survived.
/// With `every_report_durable` every reported command must have survived; otherwise only those before the
/// last completed `flush`. Returns how many runs were killed before their end.
fn sigkill_runs(
    cache_args: &[&str],
    seeds: std::ops::Range<u64>,
    every_report_durable: bool,
) -> usize {
    let s = Scratch::new();
    let mut killed_mid_run = 0;
    for seed in seeds {
        let img = s.qcow2(
            &format!("kill-{seed}.qcow2"),
            &format!("cluster_size={CLUSTER}"),
            SIZE,
        );
        let plan = plan(seed);
        let reports_total = plan
            .steps
            .iter()
            .filter(|s| !matches!(s, Step::Flush))
            .count();
        let mut rng = Rng::new(seed ^ 0xdead_beef);
        // Within the first two thirds, so that a fast run cannot finish before the kill lands.
        let kill_after = 1 + rng.below(reports_total as u64 * 2 / 3) as usize;
        let run = run_and_kill(&img, cache_args, &plan.cmds, kill_after);
        assert!(
            !run.stderr.contains("failed") && !run.stderr.contains("panicked"),
            "{cache_args:?} seed {seed}: a command failed:\n{}",
            run.stderr
        );
        let done = reported_commands(&plan, &run);
        if run.killed && done < plan.cmds.len() {
            killed_mid_run += 1;
        }
        let what = format!(
            "qcow2 io {cache_args:?}, seed {seed}, killed after {} reports (asked at {kill_after})",
            run.reports.len()
        );
        assert_no_corruption(&img, &what);
        // Which commands must have survived: all reported ones, or those before the last flush that
        // completed (a report after it proves it did).
        let durable = if every_report_durable || done == plan.cmds.len() {
            done
        } else {
            plan.steps[..done]
                .iter()
                .rposition(|s| matches!(s, Step::Flush))
                .unwrap_or(0)
        };
        let check = expected(&plan, durable);
        eprintln!(
            "{what}: {done} of {} commands reported, {} regions checked",
            plan.cmds.len(),
            check.len()
        );
        let bad = mismatches(&img, &check);
        assert!(
            bad.is_empty(),
            "{what}: {} of the {} regions the first {durable} commands fixed are lost or changed:\n{}",
            bad.len(),
            check.len(),
            bad.join("\n")
        );
    }
    killed_mid_run
}

#[test]
fn sigkill_default_writethrough_loses_no_reported_write() {
    let runs = 8;
    let killed = sigkill_runs(&[], 1..1 + runs, true);
    assert!(
        killed * 2 >= runs as usize,
        "only {killed} of {runs} runs were killed before their end: the test did not test"
    );
}

#[test]
fn sigkill_explicit_writethrough_and_directsync() {
    let killed = sigkill_runs(&["-t", "writethrough"], 100..103, true)
        + sigkill_runs(&["--cache=directsync"], 200..203, true)
        // -n then -t: the later -t wins.
        + sigkill_runs(&["-n", "-t", "writethrough"], 300..302, true);
    assert!(killed >= 4, "only {killed} of 8 runs were killed mid-run");
}

#[test]
fn sigkill_writeback_and_unsafe_keep_flushed_writes_and_consistency() {
    // Reported writes after the last flush may be lost here; the image must stay consistent and what the
    // last completed `flush` covered must be there (with `unsafe` too: a flush still writes the cached
    // metadata back to the file, it only skips the host's fdatasync).
    sigkill_runs(&["-t", "writeback"], 400..405, false);
    sigkill_runs(&["-t", "unsafe"], 500..505, false);
    sigkill_runs(&["-n"], 600..602, false);
    sigkill_runs(&["--cache", "none"], 700..702, false);
}

// ---------------------------------------------------------------------------------------------------------
// Option parsing against qemu-io

/// Runs `qcow2 io ARGS` and `qemu-io ARGS`.
fn both(args: &[OsString]) -> (Output, Output) {
    let mut ours: Vec<OsString> = vec!["io".into()];
    ours.extend(args.iter().cloned());
    (qcow2(&ours), qemu_io(args))
}

/// The error line of a failed run without its program prefix ("qemu-io: ", "qcow2: ", "qcow2 io: ").
fn error_line(out: &Output) -> String {
    let err = out.stderr_str();
    let line = err.lines().next().unwrap_or("").to_string();
    for prefix in ["qemu-io: ", "qcow2 io: ", "qcow2: "] {
        if let Some(rest) = line.strip_prefix(prefix) {
            return rest.to_string();
        }
    }
    line
}

#[test]
fn invalid_cache_modes_fail_like_qemu_io() {
    let s = Scratch::new();
    let img = s.qcow2("opts.qcow2", "", 1 << 20);
    let i = img.as_os_str().to_owned();
    let cases: Vec<Vec<OsString>> = vec![
        vec![
            "-t".into(),
            "bogus".into(),
            "-c".into(),
            "write 0 4k".into(),
            i.clone(),
        ],
        vec![
            "--cache=WriteBack".into(),
            "-c".into(),
            "write 0 4k".into(),
            i.clone(),
        ],
        vec![
            "--cache".into(),
            "on".into(),
            "-c".into(),
            "write 0 4k".into(),
            i.clone(),
        ],
        vec![
            "-t".into(),
            "".into(),
            "-c".into(),
            "write 0 4k".into(),
            i.clone(),
        ],
        vec![
            "-twriteback ".into(),
            "-c".into(),
            "write 0 4k".into(),
            i.clone(),
        ],
        // The value is taken even when it looks like an option.
        vec!["-t".into(), "-c".into(), "write 0 4k".into(), i.clone()],
        // Read-only does not excuse a bad mode, and a bad mode is reported before anything else.
        vec![
            "-r".into(),
            "-t".into(),
            "direct".into(),
            "-c".into(),
            "read 0 1".into(),
            i.clone(),
        ],
        vec!["-n".into(), "-t".into(), "x".into()],
        // Missing values.
        vec!["-c".into(), "write 0 4k".into(), i.clone(), "-t".into()],
        vec![
            "-c".into(),
            "write 0 4k".into(),
            i.clone(),
            "--cache".into(),
        ],
    ];
    for args in &cases {
        let (ours, qemu) = both(args);
        assert_eq!(
            (ours.code, qemu.code),
            (Some(1), Some(1)),
            "{args:?}: exit codes\nours: {}\nqemu: {}",
            ours.describe(),
            qemu.describe()
        );
        assert_eq!(
            error_line(&ours),
            error_line(&qemu),
            "{args:?}: error message\nours: {}\nqemu: {}",
            ours.describe(),
            qemu.describe()
        );
        assert!(
            ours.stdout.is_empty() && ours.stderr_str().lines().count() == 1,
            "{args:?}: one line on stderr and nothing else:\n{}",
            ours.describe()
        );
    }
    // Nothing was written by any of them.
    let out = qemu_io([
        "-r".as_ref(),
        "-c".as_ref(),
        "read -P 0 0 1M".as_ref(),
        i.as_os_str(),
    ]);
    assert!(
        out.success() && !out.stdout_str().contains("failed"),
        "{}",
        out.describe()
    );
}

#[test]
fn valid_cache_modes_work_like_qemu_io() {
    let s = Scratch::new();
    let spellings: Vec<Vec<&str>> = vec![
        vec![],
        vec!["-t", "writethrough"],
        vec!["-twriteback"],
        vec!["--cache=none"],
        vec!["--cache", "off"],
        vec!["-t", "directsync"],
        vec!["-t", "unsafe"],
        vec!["-n"],
        vec!["--nocache"],
        vec!["-t", "unsafe", "-n"],
        vec!["-n", "-t", "writethrough"],
    ];
    let cmds = [
        "write -P 0x5a 4k 8k",
        "write -z 6k 1k",
        "discard 64k 64k",
        "write -c 128k 64k",
        "flush",
        "read -P 0x5a 4k 2k",
        "read -P 0 6k 1k",
        "aio_flush",
        "length",
    ];
    for (n, opts) in spellings.iter().enumerate() {
        let ours_img = s.qcow2(&format!("ours-{n}.qcow2"), "", 1 << 20);
        let qemu_img_path = s.qcow2(&format!("qemu-{n}.qcow2"), "", 1 << 20);
        let mut args: Vec<OsString> = opts.iter().map(OsString::from).collect();
        for c in cmds {
            args.push("-c".into());
            args.push(c.into());
        }
        let mut ours_args: Vec<OsString> = vec!["io".into()];
        ours_args.extend(args.iter().cloned());
        ours_args.push(ours_img.clone().into());
        let ours = qcow2(&ours_args);
        args.push(qemu_img_path.clone().into());
        let qemu = qemu_io(&args);
        assert_eq!(
            ours.code,
            qemu.code,
            "{opts:?}: exit code\nours: {}\nqemu: {}",
            ours.describe(),
            qemu.describe()
        );
        assert_eq!(ours.code, Some(0), "{opts:?}:\n{}", ours.describe());
        assert_text_eq(
            &format!("io {opts:?} stdout"),
            &drop_timing_lines(&ours.stdout_str()),
            &drop_timing_lines(&qemu.stdout_str()),
        );
        assert_no_corruption(&ours_img, &format!("io {opts:?}"));
        let cmp = qemu_img([
            "compare".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "qcow2".as_ref(),
            ours_img.as_os_str(),
            qemu_img_path.as_os_str(),
        ]);
        assert_eq!(
            cmp.code,
            Some(0),
            "{opts:?}: images differ:\n{}",
            cmp.describe()
        );
    }
}
