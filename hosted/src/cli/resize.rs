//! `qemu-img resize`: sets an image's virtual size, or grows or shrinks it by an amount, with qemu-img's
//! arguments (the size is always the last one, so that `-1G` is not taken for an option), checks, messages
//! and exit codes.

use std::io::Write;

use lexopt::Arg;
use qcow2_core::create::Preallocation;

use crate::cli::PROBED_RAW_WARNING;
use crate::cli::size::{SizeError, parse_size};
use crate::cli::{
    Fail, fail, no_value, open_error, opt_error, os_to_string, print_help, resolve_image,
    unknown_option, value,
};
use crate::open;

pub(super) fn cmd_resize(
    p: &mut lexopt::Parser,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, Fail> {
    // A last argument that is a negative number is the size, not an option (as qemu-img takes it).
    let mut raw: Vec<std::ffi::OsString> =
        p.raw_args().map_err(|e| opt_error("resize", e))?.collect();
    let negative = raw.last().and_then(|a| a.to_str()).is_some_and(|a| {
        a.strip_prefix('-')
            .is_some_and(|d| d.starts_with(|c: char| c.is_ascii_digit() || c == '.'))
    });
    let mut size_arg = if negative {
        raw.pop().map(os_to_string).transpose()?
    } else {
        None
    };
    let mut p = lexopt::Parser::from_args(raw);
    let (mut fmt, mut image_opts, mut quiet, mut shrink) = (None, false, false, false);
    let mut prealloc = Preallocation::Off;
    let mut positional = Vec::new();
    let mut objects = crate::cli::object::Objects::default();
    while let Some(arg) = p.next().map_err(|e| opt_error("resize", e))? {
        match arg {
            Arg::Long("object") => objects.add(&value("resize", &mut p)?)?,
            Arg::Short('h') => return print_help("resize", out),
            Arg::Long("help") => {
                no_value("resize", "help", &mut p)?;
                return print_help("resize", out);
            }
            Arg::Short('f') | Arg::Long("format") => fmt = Some(value("resize", &mut p)?),
            Arg::Short('q') | Arg::Long("quiet") => quiet = true,
            Arg::Long("image-opts") => image_opts = true,
            Arg::Long("shrink") => shrink = true,
            Arg::Long("preallocation") => {
                let v = value("resize", &mut p)?;
                prealloc = match v.as_str() {
                    "off" => Preallocation::Off,
                    "metadata" => Preallocation::Metadata,
                    "falloc" => Preallocation::Falloc,
                    "full" => Preallocation::Full,
                    other => return Err(fail(format!("Invalid preallocation mode '{other}'"))),
                };
            }
            Arg::Value(v) => positional.push(os_to_string(v)?),
            other => return Err(unknown_option("resize", other)),
        }
    }
    if size_arg.is_none() && positional.len() >= 2 {
        size_arg = positional.pop();
    }
    let (file, size_arg) = match (positional.as_slice(), size_arg) {
        ([f], Some(size)) => (f.clone(), size),
        ([_, _, ..], Some(_)) => return Err(fail("Extra argument(s) in command line")),
        _ => return Err(fail("Expecting image file name and size")),
    };
    let (relative, amount) = match size_arg.as_bytes().first() {
        Some(b'+') => (1i8, &size_arg[1..]),
        Some(b'-') => (-1, &size_arg[1..]),
        _ => (0, size_arg.as_str()),
    };
    let n = match parse_size(amount) {
        Ok(n) => Some(n),
        // Past i64::MAX: qemu-img's size becomes negative.
        Err(SizeError::TooLarge) => None,
        Err(SizeError::Invalid) => {
            return Err(fail(
                "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, \
                 P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.",
            ));
        }
    };
    let (path, fmt) = resolve_image(&file, image_opts, fmt.as_deref())?;
    let mut opened =
        open::open_disk_writable(&path, fmt.as_deref()).map_err(|e| open_error(&file, e))?;
    if fmt.is_none() && opened.chain.first().is_some_and(|i| i.format == "raw") {
        let _ = writeln!(err, "{}", PROBED_RAW_WARNING.replace("{}", &path));
    }
    let current = opened.disk.virtual_size();
    let total = n.and_then(|n| match relative {
        0 => i64::try_from(n).ok(),
        1 => i64::try_from(current)
            .ok()?
            .checked_add(i64::try_from(n).ok()?),
        _ => i64::try_from(current)
            .ok()?
            .checked_sub(i64::try_from(n).ok()?),
    });
    let total = match total {
        Some(t) if t > 0 => t as u64,
        _ => return Err(fail("New image size must be positive")),
    };
    if total <= current && prealloc != Preallocation::Off {
        return Err(fail("Preallocation can only be used for growing images"));
    }
    if total < current && !shrink {
        let _ = writeln!(
            err,
            "qcow2: Use the --shrink option to perform a shrink operation."
        );
        return Err(fail(
            "warning: Shrinking an image will delete all data beyond the shrunken image's end. Before \
             performing such an operation, make sure there is no important data there.",
        ));
    }
    let resized = opened.disk.resize(total, prealloc);
    let closed = opened.disk.close();
    resized.map_err(|e| fail(e.to_string()))?;
    closed.map_err(|e| fail(e.to_string()))?;
    if !quiet {
        writeln!(out, "Image resized.").map_err(|e| fail(e.to_string()))?;
    }
    Ok(0)
}
