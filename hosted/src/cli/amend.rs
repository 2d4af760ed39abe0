//! `qemu-img amend`: changes options of an existing qcow2 image in place, with qemu-img's arguments and
//! messages. Amended here: `size` (as `resize`, exact, a smaller size allowed) and `lazy_refcounts`;
//! `compat` and `refcount_bits` when they name what the image has already. The other options qemu-img
//! amends (another compatibility level or refcount width, the backing file, the data file, encryption
//! keys) are refused with a message that says so, before anything changes.

use std::io::Write;

use lexopt::Arg;
use qcow2_core::create::Preallocation;

use crate::cli::size::parse_size;
use crate::cli::{
    Fail, fail, no_value, open_error, opt_error, os_to_string, print_help, resolve_image,
    unknown_option, value,
};
use crate::open;

/// The options qemu-img's qcow2 driver amends.
const AMEND_KEYS: [&str; 13] = [
    "backing_file",
    "backing_fmt",
    "compat",
    "data_file",
    "data_file_raw",
    "encrypt.iter-time",
    "encrypt.keyslot",
    "encrypt.new-secret",
    "encrypt.old-secret",
    "encrypt.state",
    "lazy_refcounts",
    "refcount_bits",
    "size",
];
/// Options qcow2 takes only when an image is created.
const CREATE_ONLY_KEYS: [&str; 8] = [
    "cluster_size",
    "extended_l2",
    "preallocation",
    "compression_type",
    "encryption",
    "encrypt.format",
    "nocow",
    "extent_size_hint",
];

pub(super) fn cmd_amend(p: &mut lexopt::Parser, out: &mut dyn Write) -> Result<i32, Fail> {
    let (mut fmt, mut image_opts) = (None, false);
    let mut options: Vec<String> = Vec::new();
    let mut files = Vec::new();
    let mut objects = crate::cli::object::Objects::default();
    while let Some(arg) = p.next().map_err(|e| opt_error("amend", e))? {
        match arg {
            Arg::Long("object") => objects.add(&value("amend", p)?)?,
            Arg::Short('h') => return print_help("amend", out),
            Arg::Long("help") => {
                no_value("amend", "help", p)?;
                return print_help("amend", out);
            }
            Arg::Short('f') | Arg::Long("format") => fmt = Some(value("amend", p)?),
            Arg::Short('o') | Arg::Long("options") => options.push(value("amend", p)?),
            Arg::Short('t') | Arg::Long("cache") => {
                value("amend", p)?;
            }
            Arg::Short('q') | Arg::Long("quiet") | Arg::Short('p') | Arg::Long("progress") => {}
            Arg::Long("force") => {}
            Arg::Long("image-opts") => image_opts = true,
            Arg::Value(v) => files.push(os_to_string(v)?),
            other => return Err(unknown_option("amend", other)),
        }
    }
    if options.is_empty() {
        return Err(fail("Must specify options (-o)"));
    }
    let file = match files.as_slice() {
        [f] => f.clone(),
        [] => return Err(fail("Expecting one image file name")),
        _ => return Err(fail("Expecting one image file name")),
    };
    // Later values win, as in QEMU's option parser; a key without a value is "on".
    let mut given: Vec<(String, String)> = Vec::new();
    for kv in options
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|s| !s.is_empty())
    {
        let (k, v) = kv.split_once('=').unwrap_or((kv, "on"));
        if CREATE_ONLY_KEYS.contains(&k) {
            return Err(fail(format!(
                "Invalid parameter '{k}'\nThis option is only supported for image creation"
            )));
        }
        if !AMEND_KEYS.contains(&k) {
            return Err(fail(format!("Invalid parameter '{k}'")));
        }
        given.retain(|(key, _)| key != k);
        given.push((k.to_string(), v.to_string()));
    }
    let get = |k: &str| {
        given
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let lazy = match get("lazy_refcounts") {
        None => None,
        Some("on") => Some(true),
        Some("off") => Some(false),
        Some(_) => return Err(fail("Parameter 'lazy_refcounts' expects 'on' or 'off'")),
    };
    let size = match get("size") {
        None => None,
        Some(v) => Some(parse_size(v).map_err(|_| {
            fail(
                "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, \
                 T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.",
            )
        })?),
    };
    if let Some(v) = get("refcount_bits")
        && v.parse::<u64>().is_err()
    {
        return Err(fail("Parameter 'refcount_bits' expects a number"));
    }
    let (path, fmt) = resolve_image(&file, image_opts, fmt.as_deref())?;
    let mut opened =
        open::open_disk_writable(&path, fmt.as_deref()).map_err(|e| open_error(&file, e))?;
    let top = opened.chain.first().cloned();
    let Some(top) = top.filter(|i| i.format == "qcow2") else {
        let f = opened
            .chain
            .first()
            .map(|i| i.format.clone())
            .unwrap_or_default();
        let _ = opened.disk.close();
        return Err(fail(format!(
            "Format driver '{f}' does not support option amendment"
        )));
    };
    let specific = top.qcow2.as_ref();
    let version = specific.map_or(3, |s| if s.compat == "0.10" { 2 } else { 3 });
    let refcount_bits = specific.map_or(16, |s| s.refcount_bits);
    let new_version = match get("compat") {
        None => version,
        Some("1.1" | "v3") => 3,
        Some("0.10" | "v2") => 2,
        Some(v) => {
            let _ = opened.disk.close();
            return Err(fail(format!("Unknown compatibility level {v}")));
        }
    };
    // What this tool does not change: refused before anything is written.
    let refuse = |what: &str| fail(format!("Amending {what} is not supported by this tool"));
    let backing_now = (
        top.backing_filename.clone(),
        top.backing_filename_format.clone(),
    );
    let lazy_now = specific.is_some_and(|s| s.lazy_refcounts == Some(true));
    let refusal = (lazy == Some(true) && !lazy_now && new_version < 3)
        .then(|| {
            fail(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use \
                 compat=1.1 or greater)",
            )
        })
        .or_else(|| {
            get("refcount_bits")
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|&b| b != refcount_bits)
                .and_then(|b| {
                    if b == 0 || b > 64 || !b.is_power_of_two() {
                        Some(fail(
                            "Refcount width must be a power of two and may not exceed 64 bits",
                        ))
                    } else if new_version < 3 && b != 16 {
                        Some(fail(
                            "Refcount widths other than 16 bits require compatibility level 1.1 or \
                             above (use compat=1.1 or greater)",
                        ))
                    } else {
                        None
                    }
                })
        })
        .or_else(|| {
            let (file, format) = (get("backing_file"), get("backing_fmt"));
            (file.is_some() || format.is_some())
                .then_some(())
                .filter(|()| file != backing_now.0.as_deref() || format != backing_now.1.as_deref())
                .map(|()| {
                    fail(format!(
                        "Cannot amend the backing file\nYou can use '{} rebase' instead.",
                        crate::cli::PROG
                    ))
                })
        })
        .or_else(|| {
            given
                .iter()
                .map(|(k, _)| k.as_str())
                .find(|k| k.starts_with("encrypt."))
                .map(|k| refuse(&format!("'{k}'")))
        });
    if let Some(f) = refusal {
        let _ = opened.disk.close();
        return Err(f);
    }
    let data_file_raw = match get("data_file_raw") {
        None => None,
        Some("on") => Some(true),
        Some("off") => Some(false),
        Some(_) => {
            let _ = opened.disk.close();
            return Err(fail("Parameter 'data_file_raw' expects 'on' or 'off'"));
        }
    };
    // QEMU's order: the upgrade, the refcount width, the data file, lazy refcounts, the size, the downgrade.
    let mut done = Ok(());
    if new_version > version {
        done = opened.disk.set_compat(new_version);
    }
    let new_refcount_bits = get("refcount_bits")
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&b| b != refcount_bits);
    if let (Ok(()), Some(bits)) = (&done, new_refcount_bits) {
        done = opened.disk.set_refcount_bits(bits);
    }
    if done.is_ok() && (get("data_file").is_some() || data_file_raw.is_some()) {
        let name = get("data_file").map(|n| (!n.is_empty()).then_some(n));
        let raw_now = specific.is_some_and(|s| s.data_file_raw == Some(true));
        done = opened
            .disk
            .set_data_file(name, data_file_raw.unwrap_or(raw_now));
    }
    if let (Ok(()), Some(on)) = (&done, lazy) {
        done = opened.disk.set_lazy_refcounts(on);
    }
    if let (Ok(()), Some(size)) = (&done, size) {
        done = opened.disk.resize(size, Preallocation::Off);
    }
    if done.is_ok() && new_version < version {
        done = opened.disk.set_compat(new_version);
    }
    let closed = opened.disk.close();
    done.map_err(|e| fail(e.to_string()))?;
    closed.map_err(|e| fail(e.to_string()))?;
    Ok(0)
}
