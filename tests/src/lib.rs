//! Harness for the interop tests: drives the real `qcow2` binary and QEMU's `qemu-img` / `qemu-io` as
//! subprocesses, builds images with QEMU in temporary directories, and compares what both sides say.
//!
//! * [`qcow2_bin`] builds the tool once per process (`$CARGO build -p qcow2-hosted --bin qcow2`, same profile
//!   and target directory as the running test) and returns its path. `QCOW2_BIN=/path/to/tool` overrides it
//!   (useful to run the suite against an installed build, or to check the harness against a stand-in).
//! * [`qemu_img`] / [`qemu_io`] run QEMU's tools; they are required, a missing tool panics (no test skips).
//!   They come from PATH, or from `QCOW2_QEMU_DIR=/dir` (holding `qemu-img` and `qemu-io`, e.g. the QEMU 7.2
//!   that `.ci/qemu72.sh` unpacks), with `QCOW2_QEMU_LIBS` added to their `LD_LIBRARY_PATH` when set;
//!   [`qemu_version`] says which version runs.
//! * Every child is killed after its time limit and the test fails ([`TOOL_TIMEOUT`] for our tool).
//! * [`check_image`] is the interop check of one image: raw conversion, `info` (JSON, JSON with the backing
//!   chain, human) and `map` (JSON, human) must equal qemu-img's.
//! * [`malformed`] builds hostile images from valid ones made by qemu-img.

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod bitmaps;
pub mod crash;
pub mod crash_harness;
pub mod damage;
pub mod images;
pub mod lying;
pub mod malformed;
pub mod ops;
pub mod repair_overlap;

/// Our tool must finish any command within this time, whatever the input.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(10);
/// QEMU's tools get longer: they are the reference, not the subject.
pub const QEMU_TIMEOUT: Duration = Duration::from_secs(120);

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// What a finished (or killed) child did.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, for messages.
    pub cmdline: String,
    /// Exit code; `None` if killed by a signal (or by us after the time limit).
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    /// The stderr lines with the program's name ("qcow2: ", "qemu-img: ", "qemu-io: ") taken off, so that
    /// the tools' messages compare.
    pub fn messages(&self) -> Vec<String> {
        self.stderr_str()
            .lines()
            .map(|l| {
                l.strip_prefix("qcow2: ")
                    .or_else(|| l.strip_prefix("qemu-img: "))
                    .or_else(|| l.strip_prefix("qemu-io: "))
                    .unwrap_or(l)
                    .to_string()
            })
            .collect()
    }
    /// stderr as this tool would print it: without qemu-img's "Try '... --help' for more info" line after a
    /// usage error (the one line the tool leaves out) and with "qemu-img" spelled "qcow2".
    pub fn stderr_as_ours(&self) -> String {
        self.stderr_str()
            .lines()
            .filter(|l| !l.starts_with("Try '"))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
            .replace("qemu-img", "qcow2")
    }
    /// The first of [`Output::messages`] ("" when stderr is empty).
    pub fn first_message(&self) -> String {
        self.messages().into_iter().next().unwrap_or_default()
    }
    /// A multi-line description for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "`{}`: exit {:?}{} after {:.2?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            self.code,
            if self.timed_out {
                " (KILLED: time limit)"
            } else {
                ""
            },
            self.elapsed,
            truncate(&self.stdout_str(), 4000),
            truncate(&self.stderr_str(), 4000)
        )
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        s.to_string()
    } else {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}... ({} bytes more)", &s[..end], s.len() - end)
    }
}

fn cmdline(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            let _ = write!(s, "'{a}'");
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Runs `cmd` with stdin closed and stdout/stderr captured, killing it after `timeout`.
/// Returns `Err` only if the program could not be started at all.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> std::io::Result<Output> {
    let line = cmdline(cmd);
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut out_pipe = child.stdout.take().expect("piped stdout");
    let mut err_pipe = child.stderr.take().expect("piped stderr");
    let out_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    Ok(Output {
        cmdline: line,
        code: if timed_out { None } else { status.code() },
        stdout,
        stderr,
        timed_out,
        elapsed,
    })
}

// ---------------------------------------------------------------------------------------------------------
// Locating and building the tool

/// Path of the `qcow2` binary, built once per process with the same profile as this test binary.
pub fn qcow2_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(build_qcow2_bin)
}

fn build_qcow2_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("QCOW2_BIN") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "QCOW2_BIN={} does not exist", p.display());
        return p;
    }
    // .../<target-dir>[/<triple>]/<profile>/deps/<test-binary>
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a parent directory");
    let profile_dir = if deps.file_name() == Some(OsStr::new("deps")) {
        deps.parent().expect("deps has a parent")
    } else {
        deps
    };
    let profile = profile_dir
        .file_name()
        .expect("profile directory name")
        .to_string_lossy()
        .into_owned();
    let mut target_dir = profile_dir
        .parent()
        .expect("target directory")
        .to_path_buf();
    let mut triple = None;
    // Cargo marks the root of a target directory with CACHEDIR.TAG; with `--target T` the profile
    // directory sits one level lower, under <target-dir>/T.
    if !target_dir.join("CACHEDIR.TAG").exists()
        && let Some(parent) = target_dir.parent()
        && parent.join("CACHEDIR.TAG").exists()
    {
        triple = target_dir.file_name().map(|t| t.to_os_string());
        target_dir = parent.to_path_buf();
    }
    let workspace_manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("Cargo.toml");
    let cargo = std::env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(OsString::from))
        .unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .arg("--quiet")
        .arg("--manifest-path")
        .arg(&workspace_manifest)
        .arg("-p")
        .arg("qcow2-hosted")
        .arg("--bin")
        .arg("qcow2")
        .env("CARGO_TARGET_DIR", &target_dir);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.arg("--profile").arg(other);
        }
    }
    if let Some(t) = &triple {
        cmd.arg("--target").arg(t);
    }
    let out = run_with_timeout(&mut cmd, Duration::from_secs(1800))
        .unwrap_or_else(|e| panic!("cannot run cargo ({}): {e}", cargo.to_string_lossy()));
    assert!(
        out.success(),
        "building the qcow2 tool failed:\n{}",
        out.describe()
    );
    let bin = profile_dir.join(format!("qcow2{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "cargo built qcow2-hosted but {} does not exist",
        bin.display()
    );
    bin
}

/// Runs our tool with the [`TOOL_TIMEOUT`]; asserts it finished in time and did not panic or die of a signal.
pub fn qcow2<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(qcow2_bin());
    cmd.args(args);
    let out = run_with_timeout(&mut cmd, TOOL_TIMEOUT)
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", qcow2_bin().display()));
    assert_sane(&out);
    out
}

/// The rules for any run of our tool: finished within the time limit, no panic, not killed by a signal.
pub fn assert_sane(out: &Output) {
    assert!(
        !out.timed_out,
        "qcow2 did not finish within {TOOL_TIMEOUT:?}:\n{}",
        out.describe()
    );
    assert!(
        out.code.is_some(),
        "qcow2 was killed by a signal:\n{}",
        out.describe()
    );
    assert_ne!(out.code, Some(101), "qcow2 panicked:\n{}", out.describe());
    assert!(
        !out.stderr_str().contains("panicked"),
        "qcow2 panicked:\n{}",
        out.describe()
    );
}

/// A failed run of our tool must say why in exactly one line on stderr.
pub fn assert_clean_error(out: &Output) {
    assert!(
        !out.success(),
        "expected qcow2 to fail:\n{}",
        out.describe()
    );
    if let Err(e) = check_one_line_stderr(out) {
        panic!("{e}");
    }
}

/// `Ok` when stderr is exactly one non-empty line (a final newline allowed).
pub fn check_one_line_stderr(out: &Output) -> Result<(), String> {
    let err = out.stderr_str();
    let body = err.strip_suffix('\n').unwrap_or(&err);
    if body.trim().is_empty() || body.contains('\n') {
        Err(format!(
            "a failing qcow2 run must print exactly one line on stderr:\n{}",
            out.describe()
        ))
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------
// QEMU's tools (required)

/// A `Command` for QEMU's `tool` (`qemu-img`, `qemu-io`): `$QCOW2_QEMU_DIR/tool` when that variable is set,
/// else `tool` from PATH; see [`qemu_env`]. Tests that run QEMU's tools themselves must start them through
/// this, so that the whole suite runs against the chosen QEMU.
pub fn qemu_command(tool: &str) -> Command {
    let mut cmd = match std::env::var_os("QCOW2_QEMU_DIR") {
        Some(dir) if !dir.is_empty() => Command::new(Path::new(&dir).join(tool)),
        _ => Command::new(tool),
    };
    qemu_env(&mut cmd);
    cmd
}

/// Sets up `cmd` (QEMU's tool or a script that runs them by name) for the chosen QEMU: with
/// `QCOW2_QEMU_DIR` set, that directory goes first on PATH and `QCOW2_QEMU_LIBS` (a colon-separated list
/// of library directories, for a QEMU unpacked without its libraries installed) first on LD_LIBRARY_PATH.
/// Without `QCOW2_QEMU_DIR`, nothing changes.
pub fn qemu_env(cmd: &mut Command) {
    let Some(dir) = std::env::var_os("QCOW2_QEMU_DIR").filter(|d| !d.is_empty()) else {
        return;
    };
    let prepend = |first: OsString, var: &str| {
        let mut v = first;
        if let Some(rest) = std::env::var_os(var).filter(|r| !r.is_empty()) {
            v.push(":");
            v.push(rest);
        }
        v
    };
    cmd.env("PATH", prepend(dir, "PATH"));
    if let Some(libs) = std::env::var_os("QCOW2_QEMU_LIBS").filter(|l| !l.is_empty()) {
        cmd.env("LD_LIBRARY_PATH", prepend(libs, "LD_LIBRARY_PATH"));
    }
}

/// The (major, minor) version of the qemu-img in use (see [`qemu_command`]), read once from
/// `qemu-img --version` ("qemu-img version 10.0.2 (...)"). Panics when qemu-img is missing.
pub fn qemu_version() -> (u32, u32) {
    static VERSION: OnceLock<(u32, u32)> = OnceLock::new();
    *VERSION.get_or_init(|| {
        let out = run_qemu_tool("qemu-img", &[OsStr::new("--version")]);
        let text = out.stdout_str();
        let parsed = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("qemu-img version "))
            .and_then(|rest| {
                let mut parts = rest.split(|c: char| !c.is_ascii_digit());
                Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
            });
        parsed.unwrap_or_else(|| panic!("cannot read qemu-img's version:\n{}", out.describe()))
    })
}

/// Whether the QEMU in use prints `info` and `map` the way QEMU 10 does, the version whose exact text the
/// tool reproduces. Older QEMU (7.2 in CI's second run) prints less: no "Child node" section in `info`, no
/// "compressed" key in `map --output=json`. Against those, the text checks below compare what both versions
/// print alike (see [`check_info_json`], [`check_info_human`], [`check_map`]); bytes read, `compare`
/// verdicts and `qemu-img check` results stay strict whatever the version.
pub fn qemu_prints_like_10() -> bool {
    qemu_version() >= (10, 0)
}

fn run_qemu_tool(tool: &str, args: &[&OsStr]) -> Output {
    let out = run_qemu_tool_limited(tool, args, QEMU_TIMEOUT);
    assert!(!out.timed_out, "{tool} did not finish:\n{}", out.describe());
    out
}

/// Runs `qemu-img` or `qemu-io` (chosen by `tool`), killing it after `timeout`; a killed run is returned
/// with `timed_out` set (QEMU itself loops forever on some hostile images, e.g. `map` on a backing loop).
pub fn run_qemu_tool_limited(tool: &str, args: &[&OsStr], timeout: Duration) -> Output {
    let mut cmd = qemu_command(tool);
    cmd.args(args);
    match run_with_timeout(&mut cmd, timeout) {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{} is required by the interop tests and was not found {} \
             (Debian/Ubuntu: apt-get install qemu-utils). These tests do not skip.",
            cmd.get_program().to_string_lossy(),
            if std::env::var_os("QCOW2_QEMU_DIR").is_some_and(|d| !d.is_empty()) {
                "in QCOW2_QEMU_DIR"
            } else {
                "on PATH"
            }
        ),
        Err(e) => panic!("cannot run {tool}: {e}"),
    }
}

/// Runs `qemu-img` with the given arguments (any outcome).
pub fn qemu_img<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let refs: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    run_qemu_tool("qemu-img", &refs)
}

/// Runs `qemu-io` with the given arguments (any outcome).
pub fn qemu_io<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let refs: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    run_qemu_tool("qemu-io", &refs)
}

/// Runs `qemu-img` and panics unless it succeeded; returns stdout.
pub fn qemu_img_ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = qemu_img(args);
    assert!(out.success(), "qemu-img failed:\n{}", out.describe());
    out.stdout_str()
}

/// What the guest sees in `img` (through its backing chain), as `qemu-img convert -O raw` reads it.
pub fn guest_view(img: &Path) -> Vec<u8> {
    let raw = img.with_extension("guest-view.raw");
    let _ = std::fs::remove_file(&raw);
    qemu_img_ok([
        "convert".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        img.as_os_str(),
        raw.as_os_str(),
    ]);
    let view = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    view
}

/// Runs qemu-io commands on an image (format given explicitly) and panics unless all of them succeeded.
pub fn qemu_io_cmds(img: &Path, fmt: &str, cmds: &[String]) {
    if cmds.is_empty() {
        return;
    }
    let mut args: Vec<OsString> = vec!["-f".into(), fmt.into()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.into());
    }
    args.push(img.into());
    let out = qemu_io(&args);
    let text = out.stdout_str() + &out.stderr_str();
    assert!(
        out.success() && !text.contains("failed"),
        "qemu-io failed:\n{}",
        out.describe()
    );
}

// ---------------------------------------------------------------------------------------------------------
// Scratch directories and image building

/// A temporary directory for one test's images (removed on drop; set QCOW2_TESTS_KEEP=1 to keep it).
#[derive(Debug)]
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Scratch {
    pub fn new() -> Self {
        let mut dir = tempfile::Builder::new()
            .prefix("qcow2-tests-")
            .tempdir()
            .expect("create temp dir");
        if std::env::var_os("QCOW2_TESTS_KEEP").is_some() {
            dir.disable_cleanup(true);
            eprintln!("keeping {}", dir.path().display());
        }
        Scratch { dir }
    }
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `qemu-img create -f FMT [-o OPTS] [-b BACKING -F BFMT] NAME SIZE`. `backing` is passed as given
    /// (a bare file name is resolved by QEMU relative to the new image's directory).
    pub fn create(
        &self,
        name: &str,
        fmt: &str,
        opts: &str,
        size: u64,
        backing: Option<(&str, &str)>,
    ) -> PathBuf {
        let path = self.path(name);
        let mut args: Vec<OsString> = vec!["create".into(), "-q".into(), "-f".into(), fmt.into()];
        if !opts.is_empty() {
            args.push("-o".into());
            args.push(opts.into());
        }
        if let Some((b, bfmt)) = backing {
            args.push("-b".into());
            args.push(b.into());
            args.push("-F".into());
            args.push(bfmt.into());
        }
        args.push(path.clone().into());
        args.push(size.to_string().into());
        qemu_img_ok(&args);
        path
    }

    /// A qcow2 image with the given `-o` options.
    pub fn qcow2(&self, name: &str, opts: &str, size: u64) -> PathBuf {
        self.create(name, "qcow2", opts, size, None)
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), for incompressible data.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Compressible but non-trivial bytes: readable text with a counter.
pub fn text(seed: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 80);
    let mut i = 0u64;
    while v.len() < len {
        let _ = writeln!(
            StringSink(&mut v),
            "qcow2 interop line {i:08} seed {seed} -- the quick brown fox jumps over the lazy dog"
        );
        i += 1;
    }
    v.truncate(len);
    v
}

struct StringSink<'a>(&'a mut Vec<u8>);
impl std::fmt::Write for StringSink<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Writes `data` at `offset` into a plain file (creating or extending it).
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(data).expect("write");
}

/// qemu-io commands writing varied patterns at unaligned offsets and across cluster boundaries, plus zero
/// writes and discards, scaled to the cluster size. Needs a virtual size of at least 12 clusters (and 1 MiB).
/// The `write -z` / `discard` commands are valid in v2 images too (QEMU then writes or deallocates).
pub fn varied_writes(cluster: u64, size: u64) -> Vec<String> {
    assert!(
        size >= 12 * cluster && size >= MIB,
        "virtual size too small"
    );
    let c = cluster;
    vec![
        // crosses the boundary between clusters 0 and 1, unaligned on both ends
        format!("write -P 0x11 {} {}", c / 2 - 100, c + 300),
        // small unaligned write in cluster 3
        format!("write -P 0x22 {} 513", 3 * c + 7),
        // a run over three whole clusters, then a zero write punched in its middle
        format!("write -P 0x33 {} {}", 5 * c, 3 * c),
        format!("write -z {} {}", 6 * c, c),
        // data then discard (unallocates or makes a zero cluster)
        format!("write -P 0x44 {} {}", 9 * c, c),
        format!("discard {} {}", 9 * c, c),
        // zero write with unmap
        format!("write -P 0x55 {} {}", 10 * c + 1, c),
        format!("write -z -u {} {}", 10 * c, c),
        // near the end of the disk, crossing the last cluster boundary
        format!("write -P 0xa5 {} 1500", size - c - 1000),
        // byte-granular: a single byte at an odd place
        format!("write -P 0xff {} 1", size / 2 + 3),
    ]
}

/// Virtual size for a cluster size: a few MiB, or enough for [`varied_writes`].
pub fn size_for_cluster(cluster: u64) -> u64 {
    (4 * MIB).max(12 * cluster)
}

// ---------------------------------------------------------------------------------------------------------
// Comparing outputs

/// Removes every "actual-size" key at any depth.
pub fn strip_actual_size(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove("actual-size");
            for (_, x) in m.iter_mut() {
                strip_actual_size(x);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_actual_size),
        _ => {}
    }
}

/// Replaces the number after every `"actual-size": ` with `#`, keeping the rest of the text as is.
pub fn blank_actual_size(text: &str) -> String {
    const KEY: &str = "\"actual-size\": ";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(KEY) {
        out.push_str(&rest[..i + KEY.len()]);
        rest = &rest[i + KEY.len()..];
        let n = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        out.push('#');
        rest = &rest[n..];
    }
    out.push_str(rest);
    out
}

/// Human `info` output without the "disk size:" lines (they depend on the host's allocation).
pub fn drop_disk_size_lines(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("disk size:"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// qemu-io's stdout without the timing lines ("4 KiB, 1 ops; 00.00 sec (...)").
pub fn drop_timing_lines(text: &str) -> String {
    text.lines()
        .filter(|l| !(l.contains(" ops; ") && l.contains(" sec (")))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Panics with both texts and the first differing line when they differ.
pub fn assert_text_eq(what: &str, ours: &str, qemu: &str) {
    if ours == qemu {
        return;
    }
    let (mut line, mut o, mut q) = (0, "", "");
    for (i, pair) in ours
        .lines()
        .map(Some)
        .chain(std::iter::repeat(None))
        .zip(qemu.lines().map(Some).chain(std::iter::repeat(None)))
        .enumerate()
    {
        if pair.0 != pair.1 {
            line = i + 1;
            o = pair.0.unwrap_or("<none>");
            q = pair.1.unwrap_or("<none>");
            break;
        }
        if pair.0.is_none() && pair.1.is_none() {
            line = i + 1;
            o = "<whitespace or line-ending difference>";
            q = "";
            break;
        }
    }
    panic!(
        "{what}: ours differs from qemu's at line {line}\n  ours: {o}\n  qemu: {q}\n\
         ===== ours =====\n{}\n===== qemu =====\n{}",
        truncate(ours, 6000),
        truncate(qemu, 6000)
    );
}

fn parse_json(what: &str, text: &str) -> serde_json::Value {
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("{what}: not valid JSON ({e}):\n{}", truncate(text, 4000)))
}

/// Runs ours, asserting success, and returns stdout.
pub fn qcow2_ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = qcow2(args);
    assert!(out.success(), "qcow2 failed:\n{}", out.describe());
    out.stdout_str()
}

/// `qcow2 info --output=json [extra] IMG` equals qemu-img's: as JSON ignoring "actual-size", and as text
/// with the actual-size values blanked.
pub fn check_info_json(img: &Path, extra: &[&str]) {
    let mut args: Vec<OsString> = vec!["info".into(), "--output=json".into()];
    args.extend(extra.iter().map(OsString::from));
    args.push(img.into());
    let what = format!("info --output=json {} {}", extra.join(" "), img.display());
    let qemu = qemu_img_ok(&args);
    let ours = qcow2_ok(&args);
    let mut qv = parse_json(&format!("qemu-img {what}"), &qemu);
    let mut ov = parse_json(&format!("qcow2 {what}"), &ours);
    strip_actual_size(&mut qv);
    strip_actual_size(&mut ov);
    let like_10 = qemu_prints_like_10();
    if !like_10 {
        // QEMU 7.2 has no "children" list (the protocol node under each format node).
        strip_key(&mut ov, "children");
    }
    if ov != qv {
        assert_text_eq(
            &format!("{what} (parsed, actual-size ignored)"),
            &serde_json::to_string_pretty(&ov).unwrap(),
            &serde_json::to_string_pretty(&qv).unwrap(),
        );
    }
    if like_10 {
        // The exact text, which only QEMU 10 prints like we do (older ones lack the "children" lines).
        assert_text_eq(
            &format!("{what} (text layout)"),
            &blank_actual_size(&ours),
            &blank_actual_size(&qemu),
        );
    }
}

/// Removes every `key` at any depth.
fn strip_key(v: &mut serde_json::Value, key: &str) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove(key);
            m.values_mut().for_each(|x| strip_key(x, key));
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| strip_key(x, key)),
        _ => {}
    }
}

/// Human `info` without its "Child node '...':" sections (the header line and the lines indented below it),
/// which QEMU 7.2 does not print yet.
pub fn drop_child_node_sections(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut skip_deeper_than: Option<usize> = None;
    for l in text.lines() {
        let indent = l.len() - l.trim_start().len();
        if let Some(depth) = skip_deeper_than {
            if indent > depth {
                continue;
            }
            skip_deeper_than = None;
        }
        if l.trim_start().starts_with("Child node '") {
            skip_deeper_than = Some(indent);
            continue;
        }
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// `map --output=json` text without the `"compressed"` keys, which QEMU 7.2 does not print yet.
pub fn drop_map_compressed_keys(text: &str) -> String {
    text.replace(", \"compressed\": false", "")
        .replace(", \"compressed\": true", "")
}

/// Human `info` equals qemu-img's apart from the "disk size:" lines.
pub fn check_info_human(img: &Path, extra: &[&str]) {
    let mut args: Vec<OsString> = vec!["info".into()];
    args.extend(extra.iter().map(OsString::from));
    args.push(img.into());
    let qemu = qemu_img_ok(&args);
    let mut ours = qcow2_ok(&args);
    if !qemu_prints_like_10() {
        ours = drop_child_node_sections(&ours);
    }
    assert_text_eq(
        &format!("info {} {}", extra.join(" "), img.display()),
        &drop_disk_size_lines(&ours),
        &drop_disk_size_lines(&qemu),
    );
}

/// `map` output equals qemu-img's exactly (`extra` e.g. `["--output=json"]`).
pub fn check_map(img: &Path, extra: &[&str]) {
    let mut args: Vec<OsString> = vec!["map".into()];
    args.extend(extra.iter().map(OsString::from));
    args.push(img.into());
    let what = format!("map {} {}", extra.join(" "), img.display());
    let qemu = qemu_img(&args);
    if !qemu.success() {
        // e.g. human `qemu-img map` refuses images with compressed clusters
        let ours = qcow2(&args);
        assert!(
            !ours.success(),
            "{what}: qemu-img refuses, ours must too:\nqemu: {}\nours: {}",
            qemu.describe(),
            ours.describe()
        );
        assert_clean_error(&ours);
        return;
    }
    let mut ours = qcow2_ok(&args);
    if !qemu_prints_like_10() {
        ours = drop_map_compressed_keys(&ours);
    }
    assert_text_eq(&what, &ours, &qemu.stdout_str());
}

/// `qcow2 convert -O raw` gives the same bytes as `qemu-img convert -O raw`.
pub fn check_convert(scratch: &Scratch, img: &Path) {
    let stem = img.file_name().unwrap().to_string_lossy().into_owned();
    let q = scratch.path(&format!("{stem}.qemu.raw"));
    let o = scratch.path(&format!("{stem}.ours.raw"));
    qemu_img_ok([
        OsStr::new("convert"),
        OsStr::new("-O"),
        OsStr::new("raw"),
        img.as_os_str(),
        q.as_os_str(),
    ]);
    qcow2_ok([
        OsStr::new("convert"),
        OsStr::new("-O"),
        OsStr::new("raw"),
        img.as_os_str(),
        o.as_os_str(),
    ]);
    assert_files_equal(&o, &q, &format!("convert -O raw {}", img.display()));
    let _ = std::fs::remove_file(&q);
    let _ = std::fs::remove_file(&o);
}

/// Byte comparison with the first differing offset in the message.
pub fn assert_files_equal(ours: &Path, qemu: &Path, what: &str) {
    let a = std::fs::read(ours).unwrap_or_else(|e| panic!("{what}: read {}: {e}", ours.display()));
    let b = std::fs::read(qemu).unwrap_or_else(|e| panic!("{what}: read {}: {e}", qemu.display()));
    assert_bytes_equal(&a, &b, what);
}

pub fn assert_bytes_equal(ours: &[u8], qemu: &[u8], what: &str) {
    if let Some(d) = bytes_diff(ours, qemu) {
        panic!("{what}: {d}");
    }
}

/// `None` when equal, else a description of the first difference.
pub fn bytes_diff(ours: &[u8], qemu: &[u8]) -> Option<String> {
    if ours == qemu {
        return None;
    }
    let first = ours
        .iter()
        .zip(qemu)
        .position(|(x, y)| x != y)
        .unwrap_or(ours.len().min(qemu.len()));
    Some(format!(
        "our bytes differ from qemu's: lengths {} vs {}, first difference at offset {first:#x} \
         (ours {:02x?}, qemu {:02x?})",
        ours.len(),
        qemu.len(),
        ours.get(first..(first + 16).min(ours.len())).unwrap_or(&[]),
        qemu.get(first..(first + 16).min(qemu.len())).unwrap_or(&[]),
    ))
}

/// The whole interop check of one image: raw conversion, info (JSON, JSON with backing chain, human, human
/// with backing chain) and map (JSON, human) all equal qemu-img's.
pub fn check_image(scratch: &Scratch, img: &Path) {
    check_convert(scratch, img);
    check_info_json(img, &[]);
    check_info_json(img, &["--backing-chain"]);
    check_info_human(img, &[]);
    check_info_human(img, &["--backing-chain"]);
    check_map(img, &["--output=json"]);
    check_map(img, &[]);
}

/// `qcow2 io -c CMD... IMG` agrees with `qemu-io -c CMD... IMG`: same exit status (zero / non-zero) and the
/// same stdout apart from timing lines. Returns whether qemu-io succeeded.
pub fn check_io(img: &Path, cmds: &[&str]) -> bool {
    let mut args: Vec<OsString> = vec!["io".into()];
    for c in cmds {
        args.push("-c".into());
        args.push((*c).into());
    }
    args.push(img.into());
    let ours = qcow2(&args);
    let qemu = qemu_io(&args[1..]);
    assert_eq!(
        ours.success(),
        qemu.success(),
        "io {cmds:?} {}: exit status differs\nours: {}\nqemu: {}",
        img.display(),
        ours.describe(),
        qemu.describe()
    );
    assert_text_eq(
        &format!(
            "io {cmds:?} {} (stdout, timing lines dropped)",
            img.display()
        ),
        &drop_timing_lines(&ours.stdout_str()),
        &drop_timing_lines(&qemu.stdout_str()),
    );
    qemu.success()
}

/// `qcow2 compare [extra] A B` gives qemu-img compare's exit code and stdout. Returns the exit code.
pub fn check_compare(a: &Path, b: &Path, extra: &[&str]) -> i32 {
    let mut args: Vec<OsString> = vec!["compare".into()];
    args.extend(extra.iter().map(OsString::from));
    args.push(a.into());
    args.push(b.into());
    let ours = qcow2(&args);
    let qemu = qemu_img(&args);
    assert_eq!(
        ours.code,
        qemu.code,
        "compare {}: exit code differs\nours: {}\nqemu: {}",
        args[1..]
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        ours.describe(),
        qemu.describe()
    );
    let code = qemu.code.unwrap();
    if code == 2 {
        assert_clean_error(&ours);
    } else {
        assert_text_eq(
            &format!("compare {} {} (stdout)", a.display(), b.display()),
            &ours.stdout_str(),
            &qemu.stdout_str(),
        );
    }
    code
}

/// Records a line of evidence (how many crash states, cases, sequences a test checked) in
/// `<target-dir>/qcow2-evidence/<name>.txt`, which `.ci/run` prints after the tests, and prints it.
pub fn record_evidence(name: &str, line: &str) {
    eprintln!("{line}");
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    // <target>/<profile>/deps/<binary>
    let Some(target) = exe.parent().and_then(Path::parent).and_then(Path::parent) else {
        return;
    };
    let dir = target.join("qcow2-evidence");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join(format!("{name}.txt")), format!("{line}\n"));
    }
}
