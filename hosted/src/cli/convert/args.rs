//! `qcow2 convert`'s command line: qemu-img convert's options, checked in qemu-img's order with its
//! messages, turned into a [`Target`] and [`CopyOptions`].

use std::io::Write;

use lexopt::Arg;

use super::*;
use crate::cli::{
    Fail, PROG, bench_int, cvtnum, fail, no_value, open_error, opt_error, os_to_string, print_help,
    resolve_image, unknown_option, value,
};
use crate::{cache, disk, open};

pub(in crate::cli) fn cmd_convert(
    p: &mut lexopt::Parser,
    out: &mut dyn Write,
) -> Result<i32, Fail> {
    let (mut fmt, mut out_fmt, mut progress, mut quiet, mut files) =
        (None, None, false, false, Vec::new());
    let (mut options, mut backing, mut backing_fmt, mut snapshot) =
        (Vec::new(), None, None, None::<String>);
    let (mut no_create, mut target_is_zero, mut explicit_sparse) = (false, false, false);
    let (mut image_opts, mut target_image_opts) = (false, false);
    let (mut bitmaps, mut skip_broken) = (false, false);
    let mut copy = CopyOptions::default();
    // qemu-img convert's default for the target: `unsafe` (nothing is made durable; the image is consistent
    // once the tool has exited, unless the host goes down).
    let (mut cache, mut src_cache) = (None, None);
    let mut objects = crate::cli::object::Objects::default();
    while let Some(arg) = p.next().map_err(|e| opt_error("convert", e))? {
        match arg {
            Arg::Long("object") => objects.add(&value("convert", p)?)?,
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
            Arg::Long("bitmaps") => bitmaps = true,
            Arg::Long("skip-broken-bitmaps") => skip_broken = true,
            Arg::Short('W') | Arg::Long("oob-writes") => {}
            Arg::Short('S') | Arg::Long("sparse-size") => {
                let v = value("convert", p)?;
                let n = cvtnum("buffer size for sparse output", &v)?;
                if !n.is_multiple_of(512) || n / 512 > MAX_MIN_SPARSE {
                    return Err(fail(format!(
                        "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up \
                         to {}. Select 0 to disable sparse detection (fully allocates output).",
                        MAX_MIN_SPARSE * 512
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
                if n < 1 || n > MAX_PARALLEL as u64 {
                    return Err(fail(format!(
                        "Invalid number of coroutines specified. Must be between 1 and {}.",
                        MAX_PARALLEL
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
            Arg::Long("image-opts") => image_opts = true,
            Arg::Long("target-image-opts") => target_image_opts = true,
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
    if target_image_opts && !no_create {
        return Err(fail("--target-image-opts requires use of -n flag"));
    }
    if no_create && !options.is_empty() {
        return Err(fail("-o has no effect when skipping image creation"));
    }
    if target_is_zero && !no_create {
        return Err(fail("--target-is-zero requires use of -n flag"));
    }
    if skip_broken && !bitmaps {
        return Err(fail("Use of --skip-broken-bitmaps requires --bitmaps"));
    }
    if files.len() < 2 {
        return Err(fail("Must specify image file name"));
    }
    // The source is only read, through the page cache, but its mode must be one QEMU knows; qemu-img checks
    // it before the target's.
    if let Some(v) = src_cache.filter(|v| cache::CacheMode::parse(v).is_none()) {
        return Err(fail(format!("Invalid source cache option: {v}")));
    }
    let mut dst = files.pop().unwrap_or_default();
    let mut opened = Vec::with_capacity(files.len());
    for src in &files {
        let (path, fmt) = resolve_image(src, image_opts, fmt.as_deref())?;
        opened.push(open::open_disk(&path, fmt.as_deref()).map_err(|e| open_error(src, e))?);
    }
    if let Some(spec) = &snapshot {
        load_snapshot(opened[0].disk.as_mut(), spec, files.len() > 1)?;
    }
    let copied_bitmaps = if bitmaps {
        if files.len() > 1 {
            return Err(fail("Copying bitmaps only possible with single source"));
        }
        Some(source_bitmaps(&opened[0].chain, skip_broken)?)
    } else {
        None
    };
    if target_image_opts {
        // The target named by an option string (its format from `driver=`, else probed).
        let (path, driver) = resolve_image(&dst, true, out_fmt.as_deref())?;
        let probed = match driver {
            Some(d) => Some(d),
            None => {
                let mut magic = [0u8; 4];
                let qcow2 = std::fs::File::open(&path)
                    .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
                    .is_ok()
                    && magic == *b"QFI\xfb";
                if !qcow2 && std::path::Path::new(&path).is_file() {
                    eprintln!("{}", crate::cli::PROBED_RAW_WARNING.replace("{}", &path));
                }
                std::path::Path::new(&path)
                    .is_file()
                    .then(|| if qcow2 { "qcow2" } else { "raw" }.to_string())
            }
        };
        (dst, out_fmt) = (path, probed);
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
        Target::Existing {
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
        if copy.compress
            && options.iter().any(|o| {
                o.split(',').any(|kv| {
                    kv.starts_with("encrypt.format=")
                        || kv
                            .strip_prefix("encryption=")
                            .is_some_and(|v| matches!(v, "on" | "yes" | "true" | "y"))
                })
            })
        {
            return Err(fail(
                "Compression and encryption not supported at the same time",
            ));
        }
        Target::NewQcow2 {
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
        Target::NewRaw
    };
    let parts = opened
        .iter_mut()
        .map(|o| -> &mut (dyn disk::VirtualDisk + Send) { o.disk.as_mut() })
        .collect();
    let mut src = Sources::new(parts);
    copy.cache = match cache.as_deref().map(cache::CacheMode::parse) {
        Some(Some(mode)) => mode,
        None => cache::CacheMode::UNSAFE,
        Some(None) => {
            // qemu-img checks the target's cache mode only once it has created the target.
            if !no_create {
                let made = open_target(
                    &dst,
                    &target,
                    disk::VirtualDisk::virtual_size(&src),
                    &mut copy,
                );
                made.and_then(|t| t.close().map_err(|e| ConvertError(e.0)))
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
    convert_with_bitmaps(&mut src, &dst, &target, copy, copied_bitmaps, out)
        .map_err(|e| fail(e.0))?;
    Ok(0)
}

/// `--bitmaps`: the persistent bitmaps of the source's top image to copy, checked as qemu-img checks them
/// (in its order, the directory's last first): an inconsistent one refuses the conversion, or with
/// `--skip-broken-bitmaps` is left out with a warning.
fn source_bitmaps(chain: &[disk::ImageInfo], skip_broken: bool) -> Result<CopiedBitmaps, Fail> {
    let spec = chain
        .first()
        .and_then(|i| i.qcow2.as_ref())
        .filter(|q| q.compat != "0.10")
        .ok_or_else(|| fail("Source lacks bitmap support"))?;
    let all = spec.bitmaps.clone().unwrap_or_default();
    let in_use = |b: &disk::BitmapInfo| b.flags.iter().any(|f| f == "in-use");
    for b in all.iter().rev().filter(|b| in_use(b)) {
        if !skip_broken {
            return Err(fail(format!(
                "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use '{PROG} bitmap \
                 --remove' to delete it",
                b.name
            )));
        }
        eprintln!("{PROG}: warning: Skipping inconsistent bitmap '{}'", b.name);
    }
    Ok(all
        .iter()
        .filter(|b| !in_use(b))
        .map(|b| {
            (
                b.name.clone(),
                b.granularity,
                b.flags.iter().any(|f| f == "auto"),
            )
        })
        .collect())
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

/// `-l SPEC` (convert, measure): makes `disk` read as the internal snapshot SPEC names, as qemu-img loads it
/// (`snapshot.id=...,snapshot.name=...`, or an ID first, then a name); `several`: there are more sources.
pub(in crate::cli) fn load_snapshot(
    disk: &mut (dyn disk::VirtualDisk + Send),
    spec: &str,
    several: bool,
) -> Result<(), Fail> {
    let loaded = match snapshot_param(spec)? {
        Some((id, name)) => disk.load_snapshot(id.as_deref(), name.as_deref()),
        None if several => {
            return Err(fail("No support for concatenating multiple snapshot"));
        }
        None => match disk.load_snapshot(Some(spec), None) {
            Err(e) if e.kind() == disk::ErrorKind::NotFound => disk.load_snapshot(None, Some(spec)),
            other => other,
        },
    };
    loaded.map_err(|e| fail(format!("Failed to load snapshot: {e}")))
}
