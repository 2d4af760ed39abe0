//! The `qcow2` command-line tool: argument parsing, and qemu-img's and qemu-io's text, JSON and exit codes,
//! one module a command (`info`, `map`, `check`, `convert`, `compare`, `create`, `dd`, `measure`, `resize`,
//! `snapshot`, `amend`, `bitmap`, `rebase`, `commit`, `bench`, `io`) plus their shared output helpers (`json`, `size`, `progress`, `help`). It uses the library only
//! through its public API: [`crate::open`], [`crate::disk`], [`crate::cache`], [`crate::qcow2_disk`],
//! [`crate::shared`].

mod amend;
pub mod bench;
mod bitmap;
pub mod check;
mod commit;
pub mod compare;
pub mod convert;
pub mod create;
mod dd;
pub(crate) mod encrypt;
pub mod help;
pub mod info;
pub mod io;
pub mod json;
pub mod map;
mod measure;
mod object;
pub mod progress;
mod rebase;
mod resize;
pub mod size;
mod snapshot;

use crate::{cache, disk, open};
use std::ffi::OsString;
use std::io::Write;

use lexopt::Arg;

use crate::cli::map::{MapError, OutputFormat};

/// Program name used in messages.
const PROG: &str = "qcow2";

/// qemu-img's warning for a raw image whose format was probed.
pub(crate) const PROBED_RAW_WARNING: &str = "WARNING: Image format was not specified for '{}' and probing guessed raw.
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.
         Specify the 'raw' format explicitly to remove the restrictions.";

/// A command-line problem: the one-line message (without the program name) and the exit code.
struct Fail {
    msg: String,
    code: i32,
}

fn fail(msg: impl Into<String>) -> Fail {
    Fail {
        msg: msg.into(),
        code: 1,
    }
}

/// The program name as getopt prints it for command `cmd` ("qcow2 info"; "qcow2" before any command).
fn who(cmd: &str) -> String {
    if cmd.is_empty() {
        PROG.to_string()
    } else {
        format!("{PROG} {cmd}")
    }
}

/// Turns a lexopt error into qemu-img's getopt wording for command `cmd` ("" before any command).
fn opt_error(cmd: &str, e: lexopt::Error) -> Fail {
    let prog = who(cmd);
    let msg = match e {
        lexopt::Error::MissingValue { option: Some(o) } if o.starts_with("--") => {
            format!("{prog}: option '{o}' requires an argument")
        }
        lexopt::Error::MissingValue { option: Some(o) } => {
            format!(
                "{prog}: option requires an argument -- '{}'",
                o.trim_start_matches('-')
            )
        }
        lexopt::Error::UnexpectedValue { option, .. } => {
            format!("{prog}: option '{option}' doesn't allow an argument")
        }
        other => format!("{prog}: {other}"),
    };
    fail(msg)
}

fn unknown_option(cmd: &str, arg: Arg<'_>) -> Fail {
    let prog = who(cmd);
    match arg {
        Arg::Short(c) => fail(format!("{prog}: invalid option -- '{c}'")),
        Arg::Long(l) => fail(format!("{prog}: unrecognized option '--{l}'")),
        Arg::Value(v) => fail(format!(
            "{prog}: unexpected argument '{}'",
            v.to_string_lossy()
        )),
    }
}

/// `qcow2 CMD --help`: the command's help on stdout, exit 0 (as qemu-img).
fn print_help(cmd: &str, out: &mut dyn Write) -> Result<i32, Fail> {
    let text = help::command_help(cmd).unwrap_or_default();
    out.write_all(text.as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    Ok(0)
}

/// A long option without a value ("--help"): getopt's error for "--help=x".
fn no_value(cmd: &str, name: &str, p: &mut lexopt::Parser) -> Result<(), Fail> {
    match p.optional_value() {
        Some(_) => Err(fail(format!(
            "{}: option '--{name}' doesn't allow an argument",
            who(cmd)
        ))),
        None => Ok(()),
    }
}

/// `qcow2 --help`: the tool's help on stdout, exit 0.
fn print_main_help(out: &mut dyn Write) -> Result<i32, Fail> {
    out.write_all(help::main_help().as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    Ok(0)
}

/// `--version`: the version banner on stdout, exit 0 (as qemu-img and qemu-io).
fn print_version(out: &mut dyn Write) -> Result<i32, Fail> {
    out.write_all(help::version().as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    Ok(0)
}

fn os_to_string(v: OsString) -> Result<String, Fail> {
    v.into_string().map_err(|v| {
        fail(format!(
            "invalid UTF-8 in argument '{}'",
            v.to_string_lossy()
        ))
    })
}

fn value(cmd: &str, p: &mut lexopt::Parser) -> Result<String, Fail> {
    os_to_string(p.value().map_err(|e| opt_error(cmd, e))?)
}

/// A qemu-img `cvtnum` argument of `what` ("buffer size for sparse output", "granularity"): a size with an
/// optional suffix, 0 to `i64::MAX`.
fn cvtnum(what: &str, v: &str) -> Result<u64, Fail> {
    match size::parse_size(v) {
        Ok(n) => Ok(n),
        Err(size::SizeError::Invalid) if !v.trim_start().starts_with('-') => {
            Err(fail(format!("Invalid {what} specified: '{v}'.")))
        }
        Err(_) => Err(fail(format!(
            "Invalid {what} specified. Must be between 0 and {}.",
            i64::MAX
        ))),
    }
}

fn parse_output(v: &str) -> Result<OutputFormat, Fail> {
    match v {
        "human" => Ok(OutputFormat::Human),
        "json" => Ok(OutputFormat::Json),
        other => Err(fail(format!(
            "--output expects 'human' or 'json' not '{other}'"
        ))),
    }
}

/// qemu-img's message for an image that did not open.
/// The image an argument names: a file name, or with `--image-opts` an option string as qemu-img takes one
/// (`driver=qcow2|raw` or probed, `file.filename=PATH`, `file.driver=file`, a comma inside a value doubled).
/// Returns the file to open and its format; a string qemu-img would refuse gets its message.
fn resolve_image(
    arg: &str,
    image_opts: bool,
    fmt: Option<&str>,
) -> Result<(String, Option<String>), Fail> {
    if !image_opts {
        return Ok((arg.to_string(), fmt.map(str::to_string)));
    }
    if fmt.is_some() {
        return Err(fail("--image-opts and --format are mutually exclusive"));
    }
    let refuse = |m: String| fail(format!("Could not open '{arg}': {m}"));
    // Split at single commas; ",," is a comma inside a value.
    let mut items = Vec::new();
    let mut item = String::new();
    let mut chars = arg.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                item.push(',');
            }
            ',' => items.push(std::mem::take(&mut item)),
            c => item.push(c),
        }
    }
    items.push(item);
    if !arg.contains('=') {
        return Err(refuse(format!(
            "Cannot find device='{arg}' nor node-name='{arg}'"
        )));
    }
    let (mut driver, mut path, mut file_keys, mut others) = (None, None, false, Vec::new());
    let mut key_secret = None;
    let mut backing_secrets: Vec<(usize, String)> = Vec::new();
    for item in &items {
        let (k, v) = item.split_once('=').unwrap_or((item.as_str(), "on"));
        match k {
            "driver" => driver = Some(v.to_string()),
            "file.filename" => {
                path = Some(v.to_string());
                file_keys = true;
            }
            "file.driver" => {
                if v != "file" {
                    return Err(refuse(format!("Unknown driver '{v}'")));
                }
                file_keys = true;
            }
            "filename" => {}
            "encrypt.key-secret" if driver.as_deref() != Some("raw") => {
                key_secret = Some(v.to_string())
            }
            "encrypt.format" if driver.as_deref() != Some("raw") && matches!(v, "luks" | "aes") => {
            }
            // `backing.encrypt.key-secret`, `backing.backing.encrypt.key-secret`, ...: a backing file's.
            _ if k.starts_with("backing.") && k.ends_with(".encrypt.key-secret") => {
                let depth = k.matches("backing.").count();
                backing_secrets.push((depth, v.to_string()));
            }
            _ => others.push(k.to_string()),
        }
    }
    if driver.is_none() && !file_keys {
        return Err(refuse("Must specify either driver or file".to_string()));
    }
    if let Some(d) = driver.as_deref().filter(|d| *d != "qcow2" && *d != "raw") {
        return Err(refuse(format!("Unknown driver '{d}'")));
    }
    let Some(path) = path else {
        return Err(refuse(
            "A block device must be specified for \"file\"".to_string(),
        ));
    };
    if let Some(k) = others.iter().find_map(|k| k.strip_prefix("file.")) {
        return Err(refuse(format!(
            "Block protocol 'file' doesn't support the option '{k}'"
        )));
    }
    if let Some(k) = others.first() {
        // The format that would have refused it: the one named, or the one the file has.
        let format = match &driver {
            Some(d) => d.clone(),
            None => open::open_disk(&path, None)
                .map_err(|e| open_error(arg, e))?
                .chain
                .first()
                .map(|i| i.format.clone())
                .unwrap_or_default(),
        };
        return Err(refuse(format!(
            "Block format '{format}' does not support the option '{k}'"
        )));
    }
    if let Some(id) = key_secret {
        // The image (and only it) opens with the secret's value as its passphrase.
        let Some(value) = object::secret(&id) else {
            return Err(refuse(format!("No secret with id '{id}'")));
        };
        crate::chain::add_passphrase(&path, &value);
    }
    for (depth, id) in backing_secrets {
        let Some(value) = object::secret(&id) else {
            return Err(refuse(format!("No secret with id '{id}'")));
        };
        crate::chain::add_backing_passphrase(&path, depth, &value);
    }
    Ok((path, driver))
}

fn open_error(path: &str, e: disk::DiskError) -> Fail {
    fail(format!("Could not open '{path}': {e}"))
}

fn cmd_check(
    p: &mut lexopt::Parser,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, Fail> {
    let mut image_opts = false;
    let mut opts = check::CheckOptions {
        file: String::new(),
        shown: None,
        format: None,
        output: check::CheckOutput::Human,
        quiet: false,
        repair: None,
    };
    let mut files = Vec::new();
    let mut objects = crate::cli::object::Objects::default();
    while let Some(arg) = p.next().map_err(|e| opt_error("check", e))? {
        match arg {
            Arg::Long("object") => objects.add(&value("check", p)?)?,
            Arg::Short('h') => return print_help("check", out),
            Arg::Long("help") => {
                return no_value("check", "help", p).and_then(|()| print_help("check", out));
            }
            Arg::Short('f') | Arg::Long("format") => opts.format = Some(value("check", p)?),
            Arg::Long("output") => {
                opts.output = match parse_output(&value("check", p)?)? {
                    OutputFormat::Json => check::CheckOutput::Json,
                    OutputFormat::Human => check::CheckOutput::Human,
                }
            }
            Arg::Short('q') | Arg::Long("quiet") => opts.quiet = true,
            Arg::Short('r') | Arg::Long("repair") => {
                opts.repair = Some(match value("check", p)?.as_str() {
                    "leaks" => qcow2_core::check::RepairMode::Leaks,
                    "all" => qcow2_core::check::RepairMode::All,
                    _ => {
                        return Err(fail(
                            "Unknown option value for -r (expecting 'leaks' or 'all')",
                        ));
                    }
                })
            }
            Arg::Short('U') | Arg::Long("force-share") => {}
            Arg::Long("image-opts") => image_opts = true,
            Arg::Value(v) => files.push(os_to_string(v)?),
            other => return Err(unknown_option("check", other)),
        }
    }
    let [file] = files.as_slice() else {
        return Err(fail("Expecting one image file name"));
    };
    let (path, fmt) = resolve_image(file, image_opts, opts.format.as_deref())?;
    opts.shown = image_opts.then(|| file.clone());
    opts.file = path;
    opts.format = fmt;
    let end = check::run_check(&opts, out, err);
    match end.error {
        Some(msg) => Err(Fail {
            msg,
            code: end.code,
        }),
        None => Ok(end.code),
    }
}

fn cmd_map(p: &mut lexopt::Parser, out: &mut dyn Write) -> Result<i32, Fail> {
    let mut image_opts = false;
    let (mut fmt, mut output, mut files) = (None, OutputFormat::Human, Vec::new());
    let mut objects = crate::cli::object::Objects::default();
    while let Some(arg) = p.next().map_err(|e| opt_error("map", e))? {
        match arg {
            Arg::Long("object") => objects.add(&value("map", p)?)?,
            Arg::Short('h') => return print_help("map", out),
            Arg::Long("help") => {
                return no_value("map", "help", p).and_then(|()| print_help("map", out));
            }
            Arg::Short('f') | Arg::Long("format") => fmt = Some(value("map", p)?),
            Arg::Long("output") => output = parse_output(&value("map", p)?)?,
            Arg::Short('U') | Arg::Long("force-share") => {}
            Arg::Long("image-opts") => image_opts = true,
            Arg::Value(v) => files.push(os_to_string(v)?),
            other => return Err(unknown_option("map", other)),
        }
    }
    let [file] = files.as_slice() else {
        return Err(fail("Expecting one image file name"));
    };
    let (path, fmt) = resolve_image(file, image_opts, fmt.as_deref())?;
    let mut img = open::open_disk(&path, fmt.as_deref()).map_err(|e| open_error(file, e))?;
    match map::write_map(img.disk.as_mut(), output, out) {
        Ok(()) => Ok(0),
        Err(MapError::Message(m)) => {
            let _ = out.flush();
            Err(fail(m))
        }
        Err(MapError::Io(e)) => Err(fail(e.to_string())),
    }
}

/// A qemu-img bench number (`qemu_strtoul` base 0, at most INT_MAX; 0 only where `zero_ok`).
fn bench_int(v: &str, zero_ok: bool) -> Option<u64> {
    let t = v.trim();
    let n = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8).ok()?
    } else {
        t.parse().ok()?
    };
    (n <= i32::MAX as u64 && (zero_ok || n > 0)).then_some(n)
}

fn cmd_bench(p: &mut lexopt::Parser, out: &mut dyn Write) -> Result<i32, Fail> {
    let mut image_opts = false;
    let mut o = bench::BenchOptions::default();
    let mut files = Vec::new();
    while let Some(arg) = p.next().map_err(|e| opt_error("bench", e))? {
        match arg {
            Arg::Short('h') => return print_help("bench", out),
            Arg::Long("help") => {
                return no_value("bench", "help", p).and_then(|()| print_help("bench", out));
            }
            Arg::Short('c') | Arg::Long("count") => {
                o.count = bench_int(&value("bench", p)?, true)
                    .ok_or_else(|| fail("Invalid request count specified"))?
            }
            Arg::Short('d') | Arg::Long("depth") => {
                o.depth = bench_int(&value("bench", p)?, false)
                    .ok_or_else(|| fail("Invalid queue depth specified"))?
            }
            Arg::Short('f') | Arg::Long("format") => o.format = Some(value("bench", p)?),
            Arg::Short('n') | Arg::Long("native") => {}
            Arg::Short('i') | Arg::Long("aio") => {
                let v = value("bench", p)?;
                if !matches!(v.as_str(), "threads" | "native" | "io_uring") {
                    return Err(fail(format!("Invalid aio option: {v}")));
                }
            }
            Arg::Short('o') | Arg::Long("offset") => {
                o.offset = size::parse_size(&value("bench", p)?)
                    .map_err(|_| fail("Invalid offset specified"))?
            }
            Arg::Short('q') => o.quiet = true,
            Arg::Short('s') | Arg::Long("buffer-size") => {
                o.buffer_size = size::parse_size(&value("bench", p)?)
                    .ok()
                    .filter(|&n| n > 0 && n <= i32::MAX as u64)
                    .ok_or_else(|| fail("Invalid buffer size specified"))?
            }
            Arg::Short('S') | Arg::Long("step-size") => {
                o.step_size = size::parse_size(&value("bench", p)?)
                    .ok()
                    .filter(|&n| n <= i32::MAX as u64)
                    .ok_or_else(|| fail("Invalid step size specified"))?
            }
            Arg::Short('t') | Arg::Long("cache") => {
                let v = value("bench", p)?;
                o.write_through = cache::CacheMode::parse(&v)
                    .ok_or_else(|| fail("Invalid cache mode"))?
                    .writethrough;
            }
            Arg::Short('w') | Arg::Long("write") => o.write = true,
            Arg::Short('U') | Arg::Long("force-share") => {}
            Arg::Long("pattern") => {
                o.pattern = size::parse_pattern(&value("bench", p)?)
                    .ok_or_else(|| fail("Invalid pattern byte specified"))?
            }
            Arg::Long("flush-interval") => {
                o.flush_interval = bench_int(&value("bench", p)?, true)
                    .ok_or_else(|| fail("Invalid flush interval specified"))?
            }
            Arg::Long("no-drain") => o.no_drain = true,
            Arg::Long("image-opts") => image_opts = true,
            Arg::Value(v) => files.push(os_to_string(v)?),
            other => return Err(unknown_option("bench", other)),
        }
    }
    if o.flush_interval > 0 && !o.write {
        return Err(fail("--flush-interval is only available in write tests"));
    }
    if o.no_drain && o.flush_interval == 0 {
        return Err(fail("--no-drain requires --flush-interval"));
    }
    let [file] = files.as_slice() else {
        return Err(fail("Expecting one image file name"));
    };
    let (path, fmt) = resolve_image(file, image_opts, o.format.as_deref())?;
    o.format = fmt;
    bench::run_bench(&path, &o, out).map_err(|e| {
        // Named as the command line named it.
        fail(e.0.replacen(
            &format!("Could not open '{path}': "),
            &format!("Could not open '{file}': "),
            1,
        ))
    })?;
    Ok(0)
}

fn cmd_compare(p: &mut lexopt::Parser, out: &mut dyn Write) -> Result<i32, Fail> {
    let mut image_opts = false;
    let (mut fmt1, mut fmt2, mut files) = (None, None, Vec::new());
    let mut opts = compare::CompareOptions::default();
    // Usage errors exit with 1 like qemu-img's; only failures to open or read exit with 2 and up.
    let mut objects = crate::cli::object::Objects::default();
    while let Some(arg) = p.next().map_err(|e| opt_error("compare", e))? {
        match arg {
            Arg::Long("object") => objects
                .add(&value("compare", p)?)
                .map_err(|e| Fail { code: 2, ..e })?,
            Arg::Short('h') => return print_help("compare", out),
            Arg::Long("help") => {
                return no_value("compare", "help", p).and_then(|()| print_help("compare", out));
            }
            Arg::Short('f') | Arg::Long("a-format") => fmt1 = Some(value("compare", p)?),
            Arg::Short('F') | Arg::Long("b-format") => fmt2 = Some(value("compare", p)?),
            Arg::Short('s') | Arg::Long("strict") => opts.strict = true,
            Arg::Short('q') | Arg::Long("quiet") => opts.quiet = true,
            Arg::Short('p') => opts.progress = true,
            Arg::Short('U') | Arg::Long("force-share") => {}
            Arg::Long("image-opts") => image_opts = true,
            Arg::Value(v) => files.push(os_to_string(v)?),
            other => return Err(unknown_option("compare", other)),
        }
    }
    let [f1, f2] = files.as_slice() else {
        return Err(fail("Expecting two image file names"));
    };
    let (p1, fmt1) =
        resolve_image(f1, image_opts, fmt1.as_deref()).map_err(|e| Fail { code: 2, ..e })?;
    let (p2, fmt2) =
        resolve_image(f2, image_opts, fmt2.as_deref()).map_err(|e| Fail { code: 2, ..e })?;
    let mut a = open::open_disk(&p1, fmt1.as_deref()).map_err(|e| Fail {
        code: 2,
        ..open_error(f1, e)
    })?;
    let mut b = open::open_disk(&p2, fmt2.as_deref()).map_err(|e| Fail {
        code: 2,
        ..open_error(f2, e)
    })?;
    let r = compare::compare(
        &mut compare::Side {
            name: f1,
            disk: a.disk.as_mut(),
        },
        &mut compare::Side {
            name: f2,
            disk: b.disk.as_mut(),
        },
        &opts,
        out,
    );
    match r.error {
        Some(msg) => Err(Fail { msg, code: r.code }),
        None => Ok(r.code),
    }
}

fn cmd_create(p: &mut lexopt::Parser, out: &mut dyn Write) -> Result<i32, Fail> {
    let mut args = create::CreateArgs::default();
    let mut files = Vec::new();
    let mut objects = crate::cli::object::Objects::default();
    while let Some(arg) = p.next().map_err(|e| opt_error("create", e))? {
        match arg {
            Arg::Long("object") => objects.add(&value("create", p)?)?,
            Arg::Short('h') => return print_help("create", out),
            Arg::Long("help") => {
                return no_value("create", "help", p).and_then(|()| print_help("create", out));
            }
            Arg::Short('q') | Arg::Long("quiet") => args.quiet = true,
            Arg::Short('f') | Arg::Long("format") => args.format = Some(value("create", p)?),
            Arg::Short('o') | Arg::Long("options") => args.options.push(value("create", p)?),
            Arg::Short('b') | Arg::Long("backing") => args.backing = Some(value("create", p)?),
            Arg::Short('F') | Arg::Long("backing-format") => {
                args.backing_fmt = Some(value("create", p)?)
            }
            Arg::Short('u') | Arg::Long("backing-unsafe") => args.unsafe_backing = true,
            Arg::Value(v) => files.push(os_to_string(v)?),
            other => return Err(unknown_option("create", other)),
        }
    }
    let mut files = files.into_iter();
    args.file = files
        .next()
        .ok_or_else(|| fail("Expecting image file name"))?;
    args.size = files.next();
    if let Some(extra) = files.next() {
        return Err(fail(format!("Unexpected argument: {extra}")));
    }
    create::run_create(&args, out).map_err(|e| fail(e.0))?;
    Ok(0)
}

fn cmd_io(p: &mut lexopt::Parser, out: &mut dyn Write, err: &mut dyn Write) -> Result<i32, Fail> {
    let mut image_opts = false;
    let (mut fmt, mut cmds, mut files) = (None, Vec::new(), Vec::new());
    let mut read_only = false;
    // qemu-io's default: every write is durable before it is reported.
    let mut cache = cache::CacheMode::default();
    let mut objects = crate::cli::object::Objects::default();
    while let Some(arg) = p.next().map_err(|e| opt_error("io", e))? {
        match arg {
            Arg::Long("object") => objects.add(&value("io", p)?)?,
            Arg::Short('h') => return print_help("io", out),
            Arg::Long("help") => {
                return no_value("io", "help", p).and_then(|()| print_help("io", out));
            }
            Arg::Short('V') => return print_version(out),
            Arg::Long("version") => {
                return no_value("io", "version", p).and_then(|()| print_version(out));
            }
            Arg::Short('f') | Arg::Long("format") => fmt = Some(value("io", p)?),
            Arg::Short('c') | Arg::Long("cmd") => cmds.push(value("io", p)?),
            Arg::Short('r') | Arg::Long("read-only") => read_only = true,
            Arg::Short('t') | Arg::Long("cache") => {
                let v = value("io", p)?;
                cache = cache::CacheMode::parse(&v)
                    .ok_or_else(|| fail(format!("Invalid cache option: {v}")))?;
            }
            Arg::Short('n') | Arg::Long("nocache") => cache = cache.nocache(),
            Arg::Short('U') | Arg::Long("force-share") => {}
            Arg::Long("image-opts") => image_opts = true,
            Arg::Value(v) => files.push(os_to_string(v)?),
            other => return Err(unknown_option("io", other)),
        }
    }
    if files.len() > 1 {
        return Err(fail(
            "Usage: qcow2 io [-f FMT] [-r] [-n] [-t CACHE] -c CMD [-c CMD ...] [FILE]",
        ));
    }
    if cmds.is_empty() {
        return Err(fail("io: no command given (use -c)"));
    }
    // With --image-opts, qemu-io names no device in its message.
    let (path, fmt) = match files.first() {
        Some(f) => {
            let (p, fmt) = resolve_image(f, image_opts, fmt.as_deref()).map_err(|e| {
                let prefix = format!("Could not open '{f}': ");
                fail(format!(
                    "can't open: {}",
                    e.msg.strip_prefix(&prefix).unwrap_or(&e.msg)
                ))
            })?;
            (Some(p), fmt)
        }
        None => (None, fmt),
    };
    let cant_open = |f: &str, e: disk::DiskError| {
        if image_opts {
            fail(format!("can't open: {e}"))
        } else {
            fail(format!("can't open device {f}: {e}"))
        }
    };
    // Like qemu-io, `io` opens images read-write unless -r.
    let mut img = match (files.first(), &path) {
        (Some(f), Some(p)) if read_only => Some(io::OpenedIo::ReadOnly(
            open::open_disk(p, fmt.as_deref()).map_err(|e| cant_open(f, e))?,
        )),
        (Some(f), Some(p)) => {
            let mut w = open::open_disk_writable_cache(p, fmt.as_deref(), cache)
                .map_err(|e| cant_open(f, e))?;
            // qemu-io opens images with discard=unmap: freed clusters are released in the file.
            w.disk.pass_discards(true);
            Some(io::OpenedIo::Writable(w))
        }
        _ => None,
    };
    // An image marked corrupt may only be read.
    if let (Some(i), Some(f)) = (&img, files.first())
        && !read_only
        && i.chain()
            .first()
            .and_then(|c| c.qcow2.as_ref())
            .is_some_and(|q| q.corrupt == Some(true))
    {
        return Err(fail(format!(
            "can't open device {f}: qcow2: Image is corrupt; cannot be opened read/write"
        )));
    }
    let mut failed = false;
    for c in &cmds {
        let disk = img.as_mut().map(|i| i.disk());
        match io::run_command_cached(disk, c, cache, out, err) {
            io::CmdStatus::Ok => {}
            io::CmdStatus::Failed => failed = true,
            io::CmdStatus::Quit => break,
        }
    }
    if let Some(i) = img {
        i.close().map_err(|e| fail(e.0))?;
    }
    Ok(i32::from(failed))
}

/// Runs the tool with `args` (program name first), writing normal output to `out` and messages to `err`;
/// returns the exit code.
pub fn run(args: Vec<OsString>, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let mut p = lexopt::Parser::from_args(args.into_iter().skip(1));
    let result = match p.next() {
        Ok(Some(Arg::Value(cmd))) => match cmd.to_str() {
            Some("info") => info::cmd_info(&mut p, out),
            Some("check") => cmd_check(&mut p, out, err),
            Some("map") => cmd_map(&mut p, out),
            Some("measure") => measure::cmd_measure(&mut p, out),
            Some("convert") => convert::args::cmd_convert(&mut p, out),
            Some("compare") => cmd_compare(&mut p, out),
            Some("io") => cmd_io(&mut p, out, err),
            Some("create") => cmd_create(&mut p, out),
            Some("dd") => dd::cmd_dd(&mut p, out),
            Some("rebase") => rebase::cmd_rebase(&mut p, out),
            Some("commit") => commit::cmd_commit(&mut p, out),
            Some("resize") => resize::cmd_resize(&mut p, out, err),
            Some("amend") => amend::cmd_amend(&mut p, out),
            Some("bitmap") => bitmap::cmd_bitmap(&mut p, err, out),
            Some("snapshot") => snapshot::cmd_snapshot(&mut p, out, err),
            Some("bench") => cmd_bench(&mut p, out),
            Some(other) => Err(fail(format!("Command not found: {other}"))),
            None => Err(fail(format!(
                "Command not found: {}",
                cmd.to_string_lossy()
            ))),
        },
        // Like qemu-img's, the standard options end the run at once, whatever follows them.
        Ok(Some(Arg::Short('h'))) => print_main_help(out),
        Ok(Some(Arg::Long("help"))) => {
            no_value("", "help", &mut p).and_then(|()| print_main_help(out))
        }
        Ok(Some(Arg::Short('V'))) => print_version(out),
        Ok(Some(Arg::Long("version"))) => {
            no_value("", "version", &mut p).and_then(|()| print_version(out))
        }
        Ok(Some(other)) => Err(unknown_option("", other)),
        Ok(None) => Err(fail("Not enough arguments")),
        Err(e) => Err(opt_error("", e)),
    };
    let _ = out.flush();
    match result {
        Ok(code) => code,
        Err(f) => {
            // getopt's messages name the program themselves ("qcow2 info: ...", "qcow2: ...").
            let msg = if f.msg.starts_with(&format!("{PROG} "))
                || f.msg.starts_with(&format!("{PROG}:"))
            {
                f.msg
            } else {
                format!("{PROG}: {}", f.msg)
            };
            let _ = writeln!(err, "{msg}");
            f.code
        }
    }
}
