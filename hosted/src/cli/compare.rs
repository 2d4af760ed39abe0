//! `qemu-img compare`: exit 0 when the guest views are equal, 1 when they differ, 2 and up on errors.

use std::io::Write;

use crate::cli::progress::Progress;
use crate::disk::{DiskError, MapExtent, VirtualDisk};

/// qemu-img's compare buffer: 2 MiB.
const IO_BUF: u64 = 2 << 20;
const SECTOR: usize = 512;

/// Block status the way `bdrv_block_status_above` reports it, for the comparison of strict mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Status {
    allocated: bool,
    zero: bool,
    data: bool,
    offset_valid: bool,
    compressed: bool,
    eof: bool,
}

fn status_of(e: &MapExtent, size: u64) -> Status {
    Status {
        allocated: e.present,
        zero: e.zero,
        data: e.data,
        offset_valid: e.offset.is_some(),
        compressed: e.compressed,
        eof: e.start + e.length >= size,
    }
}

/// An image taking part in a comparison.
pub struct Side<'a> {
    /// The name the user gave (used in messages).
    pub name: &'a str,
    /// The image.
    pub disk: &'a mut dyn VirtualDisk,
}

impl std::fmt::Debug for Side<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Side")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Options of `compare`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CompareOptions {
    /// `-s`: fail on different sizes or allocation.
    pub strict: bool,
    /// `-q`: print nothing but errors.
    pub quiet: bool,
    /// `-p`: progress.
    pub progress: bool,
}

/// The result: exit code, and an error message for stderr (codes above 1).
#[derive(Debug, PartialEq, Eq)]
pub struct CompareResult {
    /// 0 identical, 1 different, 3 block status error, 4 read error.
    pub code: i32,
    /// Message for stderr, if any.
    pub error: Option<String>,
}

/// qemu-img's `compare_buffers`: whether the first sector differs, and how many bytes (whole sectors) share
/// that result.
fn compare_buffers(a: &[u8], b: &[u8]) -> (bool, usize) {
    let n = a.len();
    let first = n.min(SECTOR);
    let res = a[..first] != b[..first];
    let mut i = first;
    while i < n {
        let len = (n - i).min(SECTOR);
        if (a[i..i + len] != b[i..i + len]) != res {
            break;
        }
        i += len;
    }
    (res, i)
}

/// Offset of the first sector holding a non-zero byte.
fn find_nonzero(buf: &[u8]) -> Option<usize> {
    buf.chunks(SECTOR)
        .position(|c| c.iter().any(|&b| b != 0))
        .map(|i| i * SECTOR)
}

fn read(side: &mut Side<'_>, offset: u64, buf: &mut [u8]) -> Result<(), CompareResult> {
    side.disk
        .read_at(offset, buf)
        .map_err(|e: DiskError| CompareResult {
            code: 4,
            error: Some(format!(
                "Error while reading offset {offset} of {}: {e}",
                side.name
            )),
        })
}

fn status(side: &mut Side<'_>, offset: u64) -> Result<(MapExtent, Status), CompareResult> {
    let size = side.disk.virtual_size();
    let e = side
        .disk
        .map_extent(offset, size - offset)
        .map_err(|_| CompareResult {
            code: 3,
            error: Some(format!("Sector allocation test failed for {}", side.name)),
        })?;
    let st = status_of(&e, size);
    Ok((e, st))
}

/// `check_empty_sectors`: Ok(true) when the range reads as zeros; prints the mismatch otherwise.
fn check_empty(
    side: &mut Side<'_>,
    offset: u64,
    len: u64,
    buf: &mut [u8],
    opts: &CompareOptions,
    out: &mut dyn Write,
) -> Result<bool, CompareResult> {
    let buf = &mut buf[..len as usize];
    read(side, offset, buf)?;
    if let Some(idx) = find_nonzero(buf) {
        if !opts.quiet {
            let _ = writeln!(out, "Content mismatch at offset {}!", offset + idx as u64);
        }
        return Ok(false);
    }
    Ok(true)
}

/// Compares two images the way `qemu-img compare` does, printing its messages on `out`.
pub fn compare<'a>(
    a: &mut Side<'a>,
    b: &mut Side<'a>,
    opts: &CompareOptions,
    out: &mut dyn Write,
) -> CompareResult {
    let mut prog = Progress::new(opts.progress && !opts.quiet, 2.0);
    let r = compare_inner(a, b, opts, &mut prog, out);
    let _ = prog.end(out);
    match r {
        Ok(code) => CompareResult { code, error: None },
        Err(e) => e,
    }
}

fn compare_inner<'a>(
    a: &mut Side<'a>,
    b: &mut Side<'a>,
    opts: &CompareOptions,
    prog: &mut Progress,
    out: &mut dyn Write,
) -> Result<i32, CompareResult> {
    let size1 = a.disk.virtual_size();
    let size2 = b.disk.virtual_size();
    let total = size1.min(size2);
    let base = size1.max(size2);
    let say = |out: &mut dyn Write, msg: &str| {
        if !opts.quiet {
            let _ = writeln!(out, "{msg}");
        }
    };
    let _ = prog.print(0.0, 100, out);
    if opts.strict && size1 != size2 {
        say(out, "Strict mode: Image size mismatch!");
        return Ok(1);
    }
    let mut buf1 = vec![0u8; IO_BUF as usize];
    let mut buf2 = vec![0u8; IO_BUF as usize];
    let mut offset = 0u64;
    while offset < total {
        let (e1, s1) = status(a, offset)?;
        let (e2, s2) = status(b, offset)?;
        let mut chunk = e1.length.min(e2.length).max(1);
        if opts.strict && s1 != s2 {
            say(
                out,
                &format!("Strict mode: Offset {offset} block status mismatch!"),
            );
            return Ok(1);
        }
        if s1.zero && s2.zero {
            // Both read as zeros.
        } else if s1.allocated == s2.allocated {
            if s1.allocated {
                chunk = chunk.min(IO_BUF);
                let n = chunk as usize;
                read(a, offset, &mut buf1[..n])?;
                read(b, offset, &mut buf2[..n])?;
                let (differs, same) = compare_buffers(&buf1[..n], &buf2[..n]);
                if differs || same != n {
                    let at = offset + if differs { 0 } else { same as u64 };
                    say(out, &format!("Content mismatch at offset {at}!"));
                    return Ok(1);
                }
            }
        } else {
            chunk = chunk.min(IO_BUF);
            let side = if s1.allocated { &mut *a } else { &mut *b };
            if !check_empty(side, offset, chunk, &mut buf1, opts, out)? {
                return Ok(1);
            }
        }
        offset += chunk;
        let _ = prog.print((chunk as f32 / base as f32) * 100.0, 100, out);
    }
    if size1 != size2 {
        say(out, "Warning: Image size mismatch!");
        let over = if size1 > size2 { &mut *a } else { &mut *b };
        while offset < base {
            let (e, s) = status(over, offset)?;
            let mut chunk = e.length.max(1);
            if s.allocated && !s.zero {
                chunk = chunk.min(IO_BUF);
                if !check_empty(over, offset, chunk, &mut buf1, opts, out)? {
                    return Ok(1);
                }
            }
            offset += chunk;
            let _ = prog.print((chunk as f32 / base as f32) * 100.0, 100, out);
        }
    }
    say(out, "Images are identical.");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_compare_by_sector() {
        let a = vec![0u8; 2048];
        let mut b = a.clone();
        assert_eq!(compare_buffers(&a, &b), (false, 2048));
        b[1500] = 1;
        assert_eq!(compare_buffers(&a, &b), (false, 1024));
        b[10] = 1;
        assert_eq!(compare_buffers(&a, &b), (true, 512));
        assert_eq!(find_nonzero(&b), Some(0));
        assert_eq!(find_nonzero(&b[512..]), Some(512));
        assert_eq!(find_nonzero(&a), None);
    }
}
