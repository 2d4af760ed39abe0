//! `qemu-img rebase`: puts an image on another backing file, or none, with qemu-img's arguments, messages
//! and exit codes.
//!
//! Safe mode (the default) keeps what the guest sees: wherever the image does not hold the data itself and
//! the old backing chain and the new backing file differ, the old content is written into the image first,
//! as qemu-img writes it (ranges widened to whole clusters, zero writes where the old content is all zeros,
//! compressed clusters with `-c`); then the backing file name and format in the header are replaced. Unsafe
//! mode (`-u`) only replaces the name and format.

use std::io::Write;

use lexopt::Arg;

use crate::chain::combine;
use crate::cli::{
    Fail, fail, no_value, open_error, opt_error, os_to_string, print_help, resolve_image,
    unknown_option, value,
};
use crate::disk::VirtualDiskWrite;
use crate::open;

/// How much qemu-img's rebase reads at a time.
const IO_BUF_SIZE: u64 = 2 << 20;

/// Format names qemu-img knows (any other `-F` is "Invalid format name").
const QEMU_FORMATS: [&str; 21] = [
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "luks",
    "nbd",
    "null-co",
    "parallels",
    "qcow",
    "qcow2",
    "qed",
    "raw",
    "vdi",
    "vmdk",
    "vpc",
];

pub(super) fn cmd_rebase(p: &mut lexopt::Parser, out: &mut dyn Write) -> Result<i32, Fail> {
    let (mut fmt, mut image_opts, mut unsafe_mode, mut compress) = (None, false, false, false);
    let (mut backing, mut backing_fmt) = (None::<String>, None::<String>);
    let mut files = Vec::new();
    let mut objects = crate::cli::object::Objects::default();
    while let Some(arg) = p.next().map_err(|e| opt_error("rebase", e))? {
        match arg {
            Arg::Long("object") => objects.add(&value("rebase", p)?)?,
            Arg::Short('h') => return print_help("rebase", out),
            Arg::Long("help") => {
                no_value("rebase", "help", p)?;
                return print_help("rebase", out);
            }
            Arg::Short('f') | Arg::Long("format") => fmt = Some(value("rebase", p)?),
            Arg::Short('b') | Arg::Long("backing") => backing = Some(value("rebase", p)?),
            Arg::Short('F') | Arg::Long("backing-format") => {
                backing_fmt = Some(value("rebase", p)?);
            }
            Arg::Short('t' | 'T') | Arg::Long("cache" | "backing-cache") => {
                value("rebase", p)?;
            }
            Arg::Short('u') | Arg::Long("backing-unsafe") => unsafe_mode = true,
            Arg::Short('c') | Arg::Long("compress") => compress = true,
            Arg::Short('q' | 'p' | 'U') | Arg::Long("quiet" | "progress" | "force-share") => {}
            Arg::Long("image-opts") => image_opts = true,
            Arg::Value(v) => files.push(os_to_string(v)?),
            other => return Err(unknown_option("rebase", other)),
        }
    }
    let [file] = files.as_slice() else {
        return Err(fail("Expecting one image file name"));
    };
    if !unsafe_mode && backing.is_none() {
        return Err(fail(
            "Must specify backing file (-b) or use unsafe mode (-u)",
        ));
    }
    if let Some(f) = backing_fmt.as_deref()
        && !QEMU_FORMATS.contains(&f)
    {
        return Err(fail(format!("Invalid format name: '{f}'")));
    }
    // An empty name (or none, in unsafe mode) removes the backing file.
    let backing = backing.filter(|b| !b.is_empty());
    let (path, fmt) = resolve_image(file, image_opts, fmt.as_deref())?;
    let mut opened =
        open::open_disk_writable(&path, fmt.as_deref()).map_err(|e| open_error(file, e))?;
    let change_error = |why: &str| {
        fail(format!(
            "Could not change the backing file to '{}': {why}",
            backing.as_deref().unwrap_or("")
        ))
    };
    let is_qcow2 = opened.chain.first().is_some_and(|i| i.format == "qcow2");
    let refusal = if backing.is_some() && backing_fmt.is_none() {
        Some(change_error("backing format must be specified"))
    } else if !is_qcow2 {
        Some(change_error("Operation not supported"))
    } else {
        None
    };
    if let Some(f) = refusal {
        let _ = opened.disk.close();
        return Err(f);
    }
    let mut done = Ok(());
    if !unsafe_mode {
        done = copy_differences(
            &mut opened,
            &path,
            backing.as_deref().zip(backing_fmt.as_deref()),
            compress,
        );
    }
    if done.is_ok() {
        done = opened
            .disk
            .set_backing_file(backing.as_deref().map(|b| (b, backing_fmt.as_deref())))
            .map_err(|e| change_error(&e.to_string()));
    }
    let closed = opened.disk.close();
    done?;
    closed.map_err(|e| fail(e.to_string()))?;
    Ok(0)
}

/// Safe mode's copy: every range the image does not allocate itself where the old chain and the new
/// backing file (`None`: nothing, all zeros) read differently gets the old content, as qemu-img writes it.
fn copy_differences(
    opened: &mut open::OpenedWritable,
    path: &str,
    new_backing: Option<(&str, &str)>,
    compress: bool,
) -> Result<(), Fail> {
    let mut new = match new_backing {
        Some((name, format)) => {
            let real = combine(path, name);
            let o = open::open_disk(&real, Some(format))
                .map_err(|e| fail(format!("Could not open new backing file '{name}': {e}")))?;
            Some(o.disk)
        }
        None => None,
    };
    let top = opened.chain.first().cloned();
    let cluster = top.as_ref().and_then(|i| i.cluster_size).unwrap_or(65536);
    let subclusters = top
        .as_ref()
        .and_then(|i| i.qcow2.as_ref())
        .is_some_and(|q| q.extended_l2 == Some(true));
    let align = if subclusters { cluster / 32 } else { cluster };
    let size = opened.disk.virtual_size();
    let new_size = new.as_ref().map_or(0, |n| n.virtual_size());
    let io = |e: crate::disk::DiskError| fail(e.to_string());
    let mut old_buf = Vec::new();
    let mut new_buf = Vec::new();
    // Where the new backing file is in the old chain, only what the images above it hold can differ.
    let prefix = new_backing.and_then(|(name, _)| {
        let real = std::fs::canonicalize(combine(path, name)).ok()?;
        opened
            .chain
            .iter()
            .skip(1)
            .position(|i| std::fs::canonicalize(&i.filename).is_ok_and(|f| f == real))
    });
    let prefix = prefix.map(|i| i as u32 + 1);
    let disk = &mut opened.disk;
    let mut offset = 0u64;
    while offset < size {
        let cap = IO_BUF_SIZE.min(size - offset);
        let (allocated, mut n) = run(disk.as_mut(), offset, cap, |e| e.depth == 0 && e.present)?;
        if allocated {
            offset += n;
            continue;
        }
        if let Some(k) = prefix {
            let (above, m) = run(disk.as_mut(), offset, n, |e| e.present && e.depth < k)?;
            n = m;
            if !above {
                offset += n;
                continue;
            }
        }
        // Whole (sub)clusters, so that no write needs copy-on-write.
        let start = offset - offset % align;
        let end = (offset + n).div_ceil(align).saturating_mul(align).min(size);
        let len = usize::try_from(end - start).map_err(|_| fail("request too large"))?;
        old_buf.resize(len, 0);
        new_buf.clear();
        new_buf.resize(len, 0);
        disk.read_at(start, &mut old_buf).map_err(io)?;
        if let Some(new) = new.as_mut()
            && start < new_size
        {
            let upto = usize::try_from(new_size.min(end) - start).unwrap_or(len);
            new.read_at(start, &mut new_buf[..upto]).map_err(io)?;
        }
        let old_is_zero = old_buf.iter().all(|&b| b == 0);
        // Runs of (sub)clusters where the two differ; a final `None` ends the last run.
        let blocks = old_buf
            .chunks(align as usize)
            .zip(new_buf.chunks(align as usize));
        let mut at = start;
        let mut run: Option<(u64, u64)> = None;
        for pair in blocks.map(Some).chain([None]) {
            let differs = pair.map(|(a, b)| (a != b, a.len() as u64));
            match (differs, run) {
                (Some((true, block)), Some((s, l))) => run = Some((s, l + block)),
                (Some((true, block)), None) => run = Some((at, block)),
                (_, Some(r)) => {
                    write_old(
                        disk.as_mut(),
                        r,
                        start,
                        &old_buf,
                        old_is_zero,
                        compress,
                        cluster,
                    )?;
                    run = None;
                }
                (_, None) => {}
            }
            at += differs.map_or(0, |(_, block)| block);
        }
        offset = end;
    }
    Ok(())
}

/// The run of extents from `offset` (at most `cap` bytes) for which `pred` says the same as for the first:
/// that answer and the run's length.
pub(super) fn run(
    disk: &mut dyn VirtualDiskWrite,
    offset: u64,
    cap: u64,
    pred: impl Fn(&crate::disk::MapExtent) -> bool,
) -> Result<(bool, u64), Fail> {
    let io = |e: crate::disk::DiskError| fail(e.to_string());
    let first = disk.map_extent(offset, cap).map_err(io)?;
    let value = pred(&first);
    let mut len = first.length.max(1);
    while len < cap {
        let e = disk.map_extent(offset + len, cap - len).map_err(io)?;
        if pred(&e) != value {
            break;
        }
        len += e.length.max(1);
    }
    Ok((value, len.min(cap)))
}

/// Writes the old content of `(at, len)` (in `old`, which starts at guest offset `start`) into the image:
/// zeros as a zero write, compressed clusters with `compress`.
fn write_old(
    disk: &mut dyn VirtualDiskWrite,
    (at, len): (u64, u64),
    start: u64,
    old: &[u8],
    zero: bool,
    compress: bool,
    cluster: u64,
) -> Result<(), Fail> {
    let io = |e: crate::disk::DiskError| fail(e.to_string());
    if zero {
        return disk.write_zeroes(at, len, false).map_err(io);
    }
    let from = usize::try_from(at - start).unwrap_or(0);
    let data = &old[from..from + len as usize];
    if !compress {
        return disk.write_at(at, data).map_err(io);
    }
    for (i, chunk) in data.chunks(cluster as usize).enumerate() {
        let off = at + i as u64 * cluster;
        if off.is_multiple_of(cluster) && chunk.len() as u64 == cluster {
            disk.write_compressed(off, chunk).map_err(io)?;
        } else {
            disk.write_at(off, chunk).map_err(io)?;
        }
    }
    Ok(())
}
