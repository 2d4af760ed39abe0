//! `qemu-img dd`: copies blocks of an image (from `skip` blocks in, up to `count` blocks from its start) into
//! a new raw or qcow2 image, block by block, every block written (zeros too), as qemu-img dd does.

use std::io::Write;

use lexopt::Arg;

use crate::cli::convert::{ConvertError, CopyOptions, Target, open_target};
use crate::cli::{
    Fail, fail, no_value, open_error, opt_error, os_to_string, print_help, resolve_image, size,
    unknown_option, value,
};
use crate::open;

/// What the command line asked for.
#[derive(Debug)]
struct DdArgs {
    fmt: Option<String>,
    out_fmt: String,
    /// Block size in bytes (1 to `i32::MAX`).
    bs: u64,
    count: Option<u64>,
    skip: Option<u64>,
    input: Option<String>,
    output: Option<String>,
}

/// A `count=` or `skip=` value: an integer in C's base-0 notation (`0x` hex, leading `0` octal), 0 to
/// `i64::MAX`, no suffix (qemu-img's `qemu_strtoi64`).
fn blocks(what: &str, v: &str) -> Result<u64, Fail> {
    let invalid = || fail(format!("Invalid {what} specified: '{v}'."));
    let t = v.trim_start();
    let (negative, digits) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let parsed = if let Some(h) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        u64::from_str_radix(h, 16)
    } else if digits.len() > 1 && digits.starts_with('0') {
        u64::from_str_radix(&digits[1..], 8)
    } else {
        digits.parse::<u64>()
    };
    match parsed {
        Ok(n) if !negative && n <= i64::MAX as u64 => Ok(n),
        Ok(_) => Err(fail(format!(
            "Invalid {what} specified. Must be between 0 and {}.",
            i64::MAX
        ))),
        Err(e) if matches!(e.kind(), std::num::IntErrorKind::PosOverflow) => Err(fail(format!(
            "Invalid {what} specified. Must be between 0 and {}.",
            i64::MAX
        ))),
        Err(_) => Err(invalid()),
    }
}

/// `bs=`: a size with an optional suffix, 1 to `i32::MAX` (qemu-img's `cvtnum_full`).
fn block_size(v: &str) -> Result<u64, Fail> {
    let range = || {
        fail(format!(
            "Invalid bs specified. Must be between 1 and {}.",
            i32::MAX
        ))
    };
    match size::parse_size(v) {
        Ok(n) if (1..=i32::MAX as u64).contains(&n) => Ok(n),
        Ok(_) | Err(size::SizeError::TooLarge) => Err(range()),
        Err(size::SizeError::Invalid) if v.trim_start().starts_with('-') => Err(range()),
        Err(size::SizeError::Invalid) => Err(fail(format!("Invalid bs specified: '{v}'."))),
    }
}

pub(super) fn cmd_dd(p: &mut lexopt::Parser, out: &mut dyn Write) -> Result<i32, Fail> {
    let mut a = DdArgs {
        fmt: None,
        out_fmt: "raw".to_string(),
        bs: 512,
        count: None,
        skip: None,
        input: None,
        output: None,
    };
    let mut operands = Vec::new();
    let mut image_opts = false;
    while let Some(arg) = p.next().map_err(|e| opt_error("dd", e))? {
        match arg {
            Arg::Short('h') => return print_help("dd", out),
            Arg::Long("help") => {
                return no_value("dd", "help", p).and_then(|()| print_help("dd", out));
            }
            Arg::Short('f') | Arg::Long("format") => a.fmt = Some(value("dd", p)?),
            Arg::Short('O') | Arg::Long("output-format") => a.out_fmt = value("dd", p)?,
            Arg::Short('U') | Arg::Long("force-share") => {}
            Arg::Long("image-opts") => image_opts = true,
            Arg::Value(v) => operands.push(os_to_string(v)?),
            other => return Err(unknown_option("dd", other)),
        }
    }
    for operand in &operands {
        let Some((key, v)) = operand.split_once('=') else {
            return Err(fail(format!("unrecognized operand {operand}")));
        };
        match key {
            "bs" => a.bs = block_size(v)?,
            "count" => a.count = Some(blocks("count", v)?),
            "skip" => a.skip = Some(blocks("skip", v)?),
            "if" => a.input = Some(v.to_string()),
            "of" => a.output = Some(v.to_string()),
            _ => return Err(fail(format!("unrecognized operand {key}"))),
        }
    }
    let (Some(input), Some(output)) = (a.input.clone(), a.output.clone()) else {
        return Err(fail("Must specify both input and output files"));
    };
    let (path, fmt) = resolve_image(&input, image_opts, a.fmt.as_deref())?;
    let mut src = open::open_disk(&path, fmt.as_deref()).map_err(|e| open_error(&input, e))?;
    let target = match a.out_fmt.as_str() {
        "raw" => Target::NewRaw,
        "qcow2" => Target::NewQcow2 {
            options: Vec::new(),
            backing: None,
            backing_fmt: None,
        },
        _ => return Err(fail("Unknown file format")),
    };
    let mut size = src.disk.virtual_size();
    if let Some(count) = a.count
        && let Some(end) = count.checked_mul(a.bs).filter(|&e| e < size)
    {
        size = end;
    }
    // A skip past the end makes an empty image, with a warning (as dd(1)).
    let start = a
        .skip
        .map_or(Some(0), |s| s.checked_mul(a.bs).filter(|&o| o <= size));
    let out_size = start.map_or(0, |s| size - s);
    // qemu-img dd opens its output with the default cache mode: made durable when closed.
    let mut opts = CopyOptions {
        cache: crate::cache::CacheMode::WRITEBACK,
        ..CopyOptions::default()
    };
    // Images are made in whole sectors.
    let made = out_size.div_ceil(512) * 512;
    let mut dst = open_target(&output, &target, made, &mut opts).map_err(|e| {
        fail(e.0.replace(
            &format!("{output}: error while converting {}: ", a.out_fmt),
            &format!("{output}: error while creating output image: "),
        ))
    })?;
    let mut in_pos = match start {
        Some(s) => s,
        None => {
            eprintln!(
                "{}: {input}: cannot skip to specified offset",
                crate::cli::PROG
            );
            size
        }
    };
    let mut buf = crate::aligned::AlignedBuf::new(a.bs as usize, 0);
    let mut out_pos = 0u64;
    while in_pos < size {
        let n = (size - in_pos).min(a.bs) as usize;
        src.disk
            .read_at(in_pos, &mut buf[..n])
            .map_err(|e| fail(format!("error while reading from input image file: {e}")))?;
        dst.write_at(out_pos, &buf[..n])
            .map_err(|e| fail(format!("error while writing to output image file: {e}")))?;
        in_pos += n as u64;
        out_pos += n as u64;
    }
    dst.close()
        .map_err(|e| ConvertError(format!("{output}: {e}")))
        .map_err(|e| fail(e.0))?;
    Ok(0)
}
