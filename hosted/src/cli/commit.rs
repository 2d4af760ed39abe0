//! `qemu-img commit`: writes what an image holds over its backing file (or over an image further down the
//! chain, `-b`) into that file, then empties the image (unless `-d` or `-b`), with qemu-img's arguments,
//! messages and exit codes. The ranges allocated above the base are copied in order, in pieces of at most
//! 512 KiB; zero clusters become zero writes (dropping what the base held there), a base shorter than the
//! image grows first. The base then reads as the image did; where its clusters land can differ from
//! qemu-img's, whose commit runs as a mirror job with requests in flight together: its own base files differ
//! from run to run of the same commit. The base is flushed before the image is emptied, so a power loss
//! leaves the guest's disk as it was (`tests/crash_commit.rs`). The emptied image is qemu-img's byte for byte.

use std::io::Write;

use lexopt::Arg;
use qcow2_core::create::Preallocation;

use crate::cli::rebase::run;
use crate::cli::size::parse_size;
use crate::cli::{
    Fail, fail, no_value, open_error, opt_error, os_to_string, print_help, resolve_image,
    unknown_option, value,
};
use crate::open;

/// QEMU's commit job buffer.
const COMMIT_BUFFER_SIZE: u64 = 512 << 10;

pub(super) fn cmd_commit(p: &mut lexopt::Parser, out: &mut dyn Write) -> Result<i32, Fail> {
    let (mut fmt, mut image_opts, mut quiet, mut drop) = (None, false, false, false);
    let mut base = None::<String>;
    let mut files = Vec::new();
    let mut objects = crate::cli::object::Objects::default();
    while let Some(arg) = p.next().map_err(|e| opt_error("commit", e))? {
        match arg {
            Arg::Long("object") => objects.add(&value("commit", p)?)?,
            Arg::Short('h') => return print_help("commit", out),
            Arg::Long("help") => {
                no_value("commit", "help", p)?;
                return print_help("commit", out);
            }
            Arg::Short('f') | Arg::Long("format") => fmt = Some(value("commit", p)?),
            Arg::Short('t') | Arg::Long("cache") => {
                value("commit", p)?;
            }
            Arg::Short('b') | Arg::Long("base") => {
                base = Some(value("commit", p)?);
                drop = true;
            }
            Arg::Short('d') | Arg::Long("drop") => drop = true,
            Arg::Short('r') | Arg::Long("rate") => {
                let v = value("commit", p)?;
                if parse_size(&v).is_err() {
                    return Err(fail(format!("Invalid rate limit specified: '{v}'.")));
                }
            }
            Arg::Short('q') | Arg::Long("quiet") => quiet = true,
            Arg::Short('p') | Arg::Long("progress") => {}
            Arg::Long("image-opts") => image_opts = true,
            Arg::Value(v) => files.push(os_to_string(v)?),
            other => return Err(unknown_option("commit", other)),
        }
    }
    let [file] = files.as_slice() else {
        return Err(fail("Expecting one image file name"));
    };
    let (path, fmt) = resolve_image(file, image_opts, fmt.as_deref())?;
    let mut top =
        open::open_disk_writable(&path, fmt.as_deref()).map_err(|e| open_error(file, e))?;
    let chain = top.chain.clone();
    let found = match (&base, chain.len()) {
        (_, 0 | 1) => Err(fail("Image does not have a backing file")),
        (None, _) => Ok(1),
        (Some(b), _) => {
            // As QEMU looks it up: by the name as given, or by the file it names from the image's directory.
            let wanted = std::fs::canonicalize(crate::chain::combine(&path, b)).ok();
            chain
                .iter()
                .skip(1)
                .position(|i| {
                    i.filename == *b
                        || wanted.as_ref().is_some_and(|w| {
                            std::fs::canonicalize(&i.filename).is_ok_and(|f| f == *w)
                        })
                })
                .map(|i| i + 1)
                .ok_or_else(|| {
                    fail(format!(
                        "Did not find '{b}' in the backing chain of '{file}'"
                    ))
                })
        }
    };
    let depth = match found {
        Ok(d) => d,
        Err(f) => {
            let _ = top.disk.close();
            return Err(f);
        }
    };
    let done = commit_into(&mut top, depth);
    let done = done.and_then(|()| {
        if drop {
            Ok(())
        } else {
            top.disk
                .make_empty()
                .map_err(|e| fail(format!("Failed to empty {file}: {e}")))
        }
    });
    let closed = top.disk.close();
    done?;
    closed.map_err(|e| fail(e.to_string()))?;
    if !quiet {
        out.write_all(b"Image committed.\n")
            .map_err(|e| fail(e.to_string()))?;
    }
    Ok(0)
}

/// Copies what the images above depth `depth` hold into the image at that depth.
fn commit_into(top: &mut open::OpenedWritable, depth: usize) -> Result<(), Fail> {
    let info = top.chain.get(depth).cloned().ok_or(fail("no base image"))?;
    let mut base = open::open_disk_writable(&info.filename, Some(&info.format))
        .map_err(|e| open_error(&info.filename, e))?;
    let io = |e: crate::disk::DiskError| fail(e.to_string());
    let size = top.disk.virtual_size();
    let mut result = Ok(());
    if base.disk.virtual_size() < size {
        result = base.disk.resize(size, Preallocation::Off).map_err(io);
    }
    let below = u32::try_from(depth).unwrap_or(u32::MAX);
    let mut buf = Vec::new();
    let mut offset = 0u64;
    while result.is_ok() && offset < size {
        let cap = COMMIT_BUFFER_SIZE.min(size - offset);
        let step = (|| {
            let (above, n) = run(top.disk.as_mut(), offset, cap, |e| {
                e.present && e.depth < below
            })?;
            if !above {
                return Ok(n);
            }
            // Zero clusters become zero writes; data, even data that reads as zeros, is copied.
            let (zero, n) = run(top.disk.as_mut(), offset, n, |e| e.zero && !e.data)?;
            if zero {
                base.disk.write_zeroes(offset, n, true).map_err(io)?;
            } else {
                buf.resize(usize::try_from(n).unwrap_or(0), 0);
                top.disk.read_at(offset, &mut buf).map_err(io)?;
                base.disk.write_at(offset, &buf).map_err(io)?;
            }
            Ok(n)
        })();
        match step {
            Ok(n) => offset += n,
            Err(e) => result = Err(e),
        }
    }
    let closed = base.disk.close().map_err(io);
    result.and(closed)
}
