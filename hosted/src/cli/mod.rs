//! The `qcow2` command-line tool: argument parsing, and qemu-img's and qemu-io's text, JSON and exit codes,
//! one module a command (`info`, `map`, `check`, `convert`, `compare`, `create`, `bench`, `io`) plus their
//! shared output helpers (`json`, `size`, `progress`, `help`). It uses the library only through its public
//! API: [`crate::open`], [`crate::disk`], [`crate::cache`], [`crate::qcow2_disk`], [`crate::shared`].

pub mod bench;
pub mod check;
pub mod compare;
pub mod convert;
pub mod create;
pub mod help;
pub mod info;
pub mod io;
pub mod json;
pub mod map;
pub mod progress;
pub mod size;

use crate::{cache, disk, open};
use std::ffi::OsString;
use std::io::Write;

use lexopt::Arg;

use crate::cli::map::{MapError, OutputFormat};

/// Program name used in messages.
const PROG: &str = "qcow2";

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
fn open_error(path: &str, e: disk::DiskError) -> Fail {
    fail(format!("Could not open '{path}': {e}"))
}

fn cmd_info(p: &mut lexopt::Parser, out: &mut dyn Write) -> Result<i32, Fail> {
    let (mut fmt, mut output, mut chain, mut files) =
        (None, OutputFormat::Human, false, Vec::new());
    while let Some(arg) = p.next().map_err(|e| opt_error("info", e))? {
        match arg {
            Arg::Short('h') => return print_help("info", out),
            Arg::Long("help") => {
                return no_value("info", "help", p).and_then(|()| print_help("info", out));
            }
            Arg::Short('f') | Arg::Long("format") => fmt = Some(value("info", p)?),
            Arg::Long("output") => output = parse_output(&value("info", p)?)?,
            Arg::Short('b') | Arg::Long("backing-chain") => chain = true,
            Arg::Short('U') | Arg::Long("force-share") => {}
            Arg::Value(v) => files.push(os_to_string(v)?),
            other => return Err(unknown_option("info", other)),
        }
    }
    let [file] = files.as_slice() else {
        return Err(fail("Expecting one image file name"));
    };
    let img = open::open_disk(file, fmt.as_deref()).map_err(|e| open_error(file, e))?;
    if img.chain.is_empty() {
        return Err(fail(format!(
            "Could not open '{file}': no image information"
        )));
    }
    let text = match output {
        OutputFormat::Json => info::format_info_json(&img.chain, chain),
        OutputFormat::Human => info::format_info_human_chain(&img.chain, chain),
    };
    out.write_all(text.as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    Ok(0)
}

fn cmd_check(
    p: &mut lexopt::Parser,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, Fail> {
    let mut opts = check::CheckOptions {
        file: String::new(),
        format: None,
        output: check::CheckOutput::Human,
        quiet: false,
        repair: None,
    };
    let mut files = Vec::new();
    while let Some(arg) = p.next().map_err(|e| opt_error("check", e))? {
        match arg {
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
            Arg::Value(v) => files.push(os_to_string(v)?),
            other => return Err(unknown_option("check", other)),
        }
    }
    let [file] = files.as_slice() else {
        return Err(fail("Expecting one image file name"));
    };
    opts.file = file.clone();
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
    let (mut fmt, mut output, mut files) = (None, OutputFormat::Human, Vec::new());
    while let Some(arg) = p.next().map_err(|e| opt_error("map", e))? {
        match arg {
            Arg::Short('h') => return print_help("map", out),
            Arg::Long("help") => {
                return no_value("map", "help", p).and_then(|()| print_help("map", out));
            }
            Arg::Short('f') | Arg::Long("format") => fmt = Some(value("map", p)?),
            Arg::Long("output") => output = parse_output(&value("map", p)?)?,
            Arg::Short('U') | Arg::Long("force-share") => {}
            Arg::Value(v) => files.push(os_to_string(v)?),
            other => return Err(unknown_option("map", other)),
        }
    }
    let [file] = files.as_slice() else {
        return Err(fail("Expecting one image file name"));
    };
    let mut img = open::open_disk(file, fmt.as_deref()).map_err(|e| open_error(file, e))?;
    match map::write_map(img.disk.as_mut(), output, out) {
        Ok(()) => Ok(0),
        Err(MapError::Message(m)) => {
            let _ = out.flush();
            Err(fail(m))
        }
        Err(MapError::Io(e)) => Err(fail(e.to_string())),
    }
}

/// A qemu-img `cvtnum` argument of `what` ("buffer size for sparse output", "rate limit"): a size with an
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

fn cmd_convert(p: &mut lexopt::Parser, out: &mut dyn Write) -> Result<i32, Fail> {
    let (mut fmt, mut out_fmt, mut progress, mut quiet, mut files) =
        (None, None, false, false, Vec::new());
    let (mut options, mut backing, mut backing_fmt, mut snapshot) =
        (Vec::new(), None, None, None::<String>);
    let (mut no_create, mut target_is_zero, mut explicit_sparse) = (false, false, false);
    let mut copy = convert::CopyOptions::default();
    // qemu-img convert's default for the target: `unsafe` (nothing is made durable; the image is consistent
    // once the tool has exited, unless the host goes down).
    let (mut cache, mut src_cache) = (None, None);
    while let Some(arg) = p.next().map_err(|e| opt_error("convert", e))? {
        match arg {
            Arg::Short('h') => return print_help("convert", out),
            Arg::Long("help") => {
                return no_value("convert", "help", p).and_then(|()| print_help("convert", out));
            }
            Arg::Short('f') | Arg::Long("source-format") => fmt = Some(value("convert", p)?),
            Arg::Short('O') => out_fmt = Some(value("convert", p)?),
            Arg::Short('o') => options.push(value("convert", p)?),
            Arg::Short('B') | Arg::Long("backing") => backing = Some(value("convert", p)?),
            Arg::Short('F') | Arg::Long("backing-format") => {
                backing_fmt = Some(value("convert", p)?)
            }
            Arg::Short('l') => snapshot = Some(value("convert", p)?),
            Arg::Short('c') => copy.compress = true,
            Arg::Short('C') | Arg::Long("copy-range-offloading") => copy.copy_range = true,
            Arg::Short('n') => no_create = true,
            Arg::Long("target-is-zero") => target_is_zero = true,
            Arg::Long("salvage") => copy.salvage = true,
            Arg::Short('W') | Arg::Long("oob-writes") => {}
            Arg::Short('S') | Arg::Long("sparse-size") => {
                let v = value("convert", p)?;
                let n = cvtnum("buffer size for sparse output", &v)?;
                if !n.is_multiple_of(512) || n / 512 > convert::MAX_MIN_SPARSE {
                    return Err(fail(format!(
                        "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up \
                         to {}. Select 0 to disable sparse detection (fully allocates output).",
                        convert::MAX_MIN_SPARSE * 512
                    )));
                }
                copy.min_sparse = n / 512;
                explicit_sparse = true;
            }
            Arg::Short('m') | Arg::Long("parallel") => {
                let v = value("convert", p)?;
                let n = bench_int(&v, true).ok_or_else(|| {
                    fail(format!("Invalid number of coroutines specified: '{v}'."))
                })?;
                if n < 1 || n > convert::MAX_PARALLEL as u64 {
                    return Err(fail(format!(
                        "Invalid number of coroutines specified. Must be between 1 and {}.",
                        convert::MAX_PARALLEL
                    )));
                }
                copy.parallel = n as usize;
            }
            Arg::Short('r') | Arg::Long("rate") => {
                let v = value("convert", p)?;
                copy.rate = Some(cvtnum("rate limit", &v)?).filter(|&r| r > 0);
            }
            Arg::Short('t') => cache = Some(value("convert", p)?),
            Arg::Short('T') | Arg::Long("source-cache") => src_cache = Some(value("convert", p)?),
            Arg::Short('p') => progress = true,
            Arg::Short('q') | Arg::Long("quiet") => quiet = true,
            Arg::Short('U') | Arg::Long("force-share") => {}
            Arg::Value(v) => files.push(os_to_string(v)?),
            other => return Err(unknown_option("convert", other)),
        }
    }
    // qemu-img's checks, in its order.
    if copy.compress && copy.copy_range {
        return Err(fail("Cannot enable copy offloading when -c is used"));
    }
    if explicit_sparse && copy.copy_range {
        return Err(fail("Cannot enable copy offloading when -S is used"));
    }
    if copy.copy_range && copy.salvage {
        return Err(fail("Cannot use copy offloading in salvaging mode"));
    }
    if no_create && !options.is_empty() {
        return Err(fail("-o has no effect when skipping image creation"));
    }
    if target_is_zero && !no_create {
        return Err(fail("--target-is-zero requires use of -n flag"));
    }
    if files.len() < 2 {
        return Err(fail("Must specify image file name"));
    }
    // The source is only read, through the page cache, but its mode must be one QEMU knows; qemu-img checks
    // it before the target's.
    if let Some(v) = src_cache.filter(|v| cache::CacheMode::parse(v).is_none()) {
        return Err(fail(format!("Invalid source cache option: {v}")));
    }
    let dst = files.pop().unwrap_or_default();
    let mut opened = Vec::with_capacity(files.len());
    for src in &files {
        opened.push(open::open_disk(src, fmt.as_deref()).map_err(|e| open_error(src, e))?);
    }
    if let Some(spec) = &snapshot {
        let loaded = match snapshot_param(spec)? {
            Some((id, name)) => opened[0].disk.load_snapshot(id.as_deref(), name.as_deref()),
            None if files.len() > 1 => {
                return Err(fail("No support for concatenating multiple snapshot"));
            }
            // An ID first, then a name (qemu-img's bdrv_snapshot_load_tmp_by_id_or_name).
            None => match opened[0].disk.load_snapshot(Some(spec), None) {
                Err(e) if e.kind() == disk::ErrorKind::NotFound => {
                    opened[0].disk.load_snapshot(None, Some(spec))
                }
                other => other,
            },
        };
        loaded.map_err(|e| fail(format!("Failed to load snapshot: {e}")))?;
    }
    let qcow2 = match out_fmt.as_deref() {
        None | Some("raw") => false,
        Some("qcow2") => true,
        Some(other) => return Err(fail(format!("Unknown file format '{other}'"))),
    };
    // -o backing_file=... names the backing file as -B does.
    let backing_option = options.iter().any(|o| {
        o.split(',')
            .any(|kv| kv.split('=').next() == Some("backing_file"))
    });
    copy.target_has_backing = backing.is_some() || backing_option;
    if target_is_zero && copy.target_has_backing {
        return Err(fail(
            "Cannot use --target-is-zero when the destination image has a backing file",
        ));
    }
    if files.len() > 1 && copy.target_has_backing {
        return Err(fail(
            "Having a backing file for the target makes no sense when concatenating multiple input images",
        ));
    }
    let target = if no_create {
        convert::Target::Existing {
            format: out_fmt.clone(),
        }
    } else if qcow2 {
        let fmt_option = options.iter().any(|o| {
            o.split(',')
                .any(|kv| kv.split('=').next() == Some("backing_fmt"))
        });
        if copy.target_has_backing && backing_fmt.is_none() && !fmt_option {
            return Err(fail("Use of backing file requires explicit backing format"));
        }
        if copy.compress
            && options.iter().any(|o| {
                o.split(',').any(|kv| {
                    kv.strip_prefix("preallocation=")
                        .is_some_and(|v| v != "off")
                })
            })
        {
            return Err(fail(
                "Compression and preallocation not supported at the same time",
            ));
        }
        convert::Target::NewQcow2 {
            options,
            backing,
            backing_fmt,
        }
    } else {
        if copy.compress {
            return Err(fail("Compression not supported for this file format"));
        }
        if copy.target_has_backing {
            return Err(fail("Backing file not supported for file format 'raw'"));
        }
        if !options.is_empty() {
            return Err(fail(
                "Invalid option for raw output: this tool takes -o for qcow2 output only",
            ));
        }
        convert::Target::NewRaw
    };
    let parts = opened
        .iter_mut()
        .map(|o| -> &mut (dyn disk::VirtualDisk + Send) { o.disk.as_mut() })
        .collect();
    let mut src = convert::Sources::new(parts);
    copy.cache = match cache.as_deref().map(cache::CacheMode::parse) {
        Some(Some(mode)) => mode,
        None => cache::CacheMode::UNSAFE,
        Some(None) => {
            // qemu-img checks the target's cache mode only once it has created the target.
            if !no_create {
                let made = convert::open_target(
                    &dst,
                    &target,
                    disk::VirtualDisk::virtual_size(&src),
                    &mut copy,
                );
                made.and_then(|t| t.close().map_err(|e| convert::ConvertError(e.0)))
                    .map_err(|e| fail(e.0))?;
            }
            return Err(fail(format!(
                "Invalid cache option: {}",
                cache.unwrap_or_default()
            )));
        }
    };
    copy.progress = progress && !quiet;
    copy.quiet = quiet;
    // The target reads as zeros where nothing is written: a new image without a backing file (and with
    // sparse detection on), or what the user asserts with --target-is-zero.
    copy.target_zeroed =
        target_is_zero || (!no_create && copy.min_sparse != 0 && !copy.target_has_backing);
    convert::convert(&mut src, &dst, &target, copy, out).map_err(|e| fail(e.0))?;
    Ok(0)
}

/// A `-l` argument as qemu-img parses it: `snapshot.id=ID,snapshot.name=NAME` (either or both) gives
/// `Some((id, name))`; anything else is an ID or a name (`None`).
#[allow(clippy::type_complexity)]
fn snapshot_param(s: &str) -> Result<Option<(Option<String>, Option<String>)>, Fail> {
    if !s.starts_with("snapshot.") {
        return Ok(None);
    }
    let (mut id, mut name) = (None, None);
    for kv in s.split(',') {
        let (key, v) = match kv.split_once('=') {
            Some((k, v)) => (k, v.to_string()),
            None => {
                // QEMU's short-form boolean: "key" means "key=on".
                eprintln!(
                    "{PROG}: warning: short-form boolean option '{kv}' deprecated\nPlease use {kv}=on instead"
                );
                (kv, "on".to_string())
            }
        };
        match key {
            "snapshot.id" => id = Some(v),
            "snapshot.name" => name = Some(v),
            _ => {
                return Err(fail(format!(
                    "Invalid parameter '{key}'\n{PROG}: Failed in parsing snapshot param '{s}'"
                )));
            }
        }
    }
    Ok(Some((id, name)))
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
    bench::run_bench(file, &o, out).map_err(|e| fail(e.0))?;
    Ok(0)
}

fn cmd_compare(p: &mut lexopt::Parser, out: &mut dyn Write) -> Result<i32, Fail> {
    let (mut fmt1, mut fmt2, mut files) = (None, None, Vec::new());
    let mut opts = compare::CompareOptions::default();
    // Usage errors exit with 1 like qemu-img's; only failures to open or read exit with 2 and up.
    while let Some(arg) = p.next().map_err(|e| opt_error("compare", e))? {
        match arg {
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
            Arg::Value(v) => files.push(os_to_string(v)?),
            other => return Err(unknown_option("compare", other)),
        }
    }
    let [f1, f2] = files.as_slice() else {
        return Err(fail("Expecting two image file names"));
    };
    let mut a = open::open_disk(f1, fmt1.as_deref()).map_err(|e| Fail {
        code: 2,
        ..open_error(f1, e)
    })?;
    let mut b = open::open_disk(f2, fmt2.as_deref()).map_err(|e| Fail {
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
    while let Some(arg) = p.next().map_err(|e| opt_error("create", e))? {
        match arg {
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
    let (mut fmt, mut cmds, mut files) = (None, Vec::new(), Vec::new());
    let mut read_only = false;
    // qemu-io's default: every write is durable before it is reported.
    let mut cache = cache::CacheMode::default();
    while let Some(arg) = p.next().map_err(|e| opt_error("io", e))? {
        match arg {
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
    // Like qemu-io, `io` opens images read-write unless -r.
    let mut img = match files.first() {
        Some(f) if read_only => Some(io::OpenedIo::ReadOnly(
            open::open_disk(f, fmt.as_deref())
                .map_err(|e| fail(format!("can't open device {f}: {e}")))?,
        )),
        Some(f) => Some(io::OpenedIo::Writable(
            open::open_disk_writable_cache(f, fmt.as_deref(), cache)
                .map_err(|e| fail(format!("can't open device {f}: {e}")))?,
        )),
        None => None,
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
            Some("info") => cmd_info(&mut p, out),
            Some("check") => cmd_check(&mut p, out, err),
            Some("map") => cmd_map(&mut p, out),
            Some("convert") => cmd_convert(&mut p, out),
            Some("compare") => cmd_compare(&mut p, out),
            Some("io") => cmd_io(&mut p, out, err),
            Some("create") => cmd_create(&mut p, out),
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
