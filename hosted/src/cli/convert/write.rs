//! The write side of a conversion: zero detection inside data (qemu-img's `is_allocated_sectors`, `-S`),
//! and one piece written as qemu-img's `convert_co_write` writes it: data runs, zero runs (left as holes
//! when the target already reads as zeros), or compressed clusters.

use super::*;

pub(super) fn sector_is_zero(buf: &[u8], sector: usize) -> bool {
    let start = sector * SECTOR as usize;
    is_zero(&buf[start..(start + SECTOR as usize).min(buf.len())])
}

/// Whether `buf` holds only zeros. Data usually has a non-zero byte near its start, so the first word is
/// looked at alone; the rest is folded 256 bytes at a time (a loop the compiler vectorises), stopping at the
/// first block that is not zeros.
pub(super) fn is_zero(buf: &[u8]) -> bool {
    let (words, tail) = buf.as_chunks::<16>();
    if words.first().is_some_and(|w| u128::from_ne_bytes(*w) != 0) {
        return false;
    }
    words.chunks(16).all(|block| {
        block
            .iter()
            .fold(0u128, |acc, w| acc | u128::from_ne_bytes(*w))
            == 0
    }) && tail.iter().all(|&b| b == 0)
}

/// qemu-img's `is_allocated_sectors`: whether the first sector of `buf` (n sectors, the first at
/// `sector_num`) holds data, and for how many sectors that status lasts once aligned to `align` sectors (a
/// power of two).
pub(super) fn allocated_run(buf: &[u8], n: usize, sector_num: u64, align: u64) -> (bool, usize) {
    if n == 0 {
        return (false, 0);
    }
    let mut is_zero = sector_is_zero(buf, 0);
    let mut i = 1;
    while i < n && sector_is_zero(buf, i) == is_zero {
        i += 1;
    }
    if i == n {
        return (!is_zero, i);
    }
    let tail = ((sector_num + i as u64) & (align - 1)) as usize;
    if tail != 0 {
        if is_zero && i <= tail {
            // A zero run that is only the tail of an aligned block: the data after it rewrites that block.
            is_zero = false;
        }
        if !is_zero {
            i = (i + align as usize - tail).min(n);
        } else {
            i -= tail;
        }
    }
    (!is_zero, i)
}

/// qemu-img's `is_allocated_sectors_min`: like [`allocated_run`], but a data run swallows zero runs shorter
/// than `min` sectors that follow it.
pub(super) fn allocated_run_min(
    buf: &[u8],
    n: usize,
    min: usize,
    sector_num: u64,
    align: u64,
) -> (bool, usize) {
    let min = min.min(n);
    let (data, first) = allocated_run(buf, n, sector_num, align);
    if !data {
        return (false, first);
    }
    let mut used = first;
    let mut checked = first;
    let mut left = n - first;
    while left > 0 {
        let off = checked * SECTOR as usize;
        let (d, run) = allocated_run(&buf[off..], left, sector_num + checked as u64, align);
        left -= run;
        checked += run;
        if d {
            used = checked;
        } else if run >= min {
            break;
        }
    }
    (true, used)
}

/// After a write to the target: in a write-through cache mode, the write is made durable before the next.
pub(super) fn written(dst: &mut dyn VirtualDiskWrite, cache: CacheMode) -> Result<(), DiskError> {
    if cache.writethrough {
        dst.flush()?;
    }
    Ok(())
}

/// Zeros at `offset`: nothing when the target reads as zeros already, written as zeros otherwise.
pub(super) fn write_zeros(
    dst: &mut dyn VirtualDiskWrite,
    offset: u64,
    len: u64,
    opts: &CopyOptions,
) -> Result<(), DiskError> {
    if opts.target_zeroed {
        return Ok(());
    }
    dst.write_zeroes(offset, len, true)
        .and_then(|()| written(dst, opts.cache))
}

/// What an uncompressed piece asks of the target, run by run: data to write, or zeros.
#[derive(Debug, Clone, Copy)]
pub(super) enum Run<'a> {
    Data(&'a [u8]),
    Zeros(u64),
}

/// qemu-img's `convert_co_write` for an uncompressed piece: calls `apply` with each run at its guest offset,
/// in order (a data piece is split where it holds zeros, `-S`).
pub(super) fn piece_runs(
    p: &Piece,
    opts: &CopyOptions,
    mut apply: impl FnMut(u64, Run<'_>) -> Result<(), DiskError>,
) -> Result<(), ConvertError> {
    let off = p.sector * SECTOR;
    let fail =
        |at: u64, e: DiskError| ConvertError(format!("error while writing at byte {at}: {e}"));
    match p.status {
        Status::Backing => Ok(()),
        Status::Zero => apply(off, Run::Zeros(p.sectors * SECTOR)).map_err(|e| fail(off, e)),
        Status::Data if opts.min_sparse == 0 || opts.copy_range => {
            apply(off, Run::Data(&p.buf)).map_err(|e| fail(off, e))
        }
        Status::Data => {
            let n = p.sectors as usize;
            let mut i = 0usize;
            while i < n {
                let (is_data, run) = allocated_run_min(
                    &p.buf[i * SECTOR as usize..],
                    n - i,
                    opts.min_sparse as usize,
                    p.sector + i as u64,
                    opts.alignment(),
                );
                let run = run.max(1);
                let start = i as u64 * SECTOR;
                let len = run as u64 * SECTOR;
                let what = if is_data {
                    Run::Data(&p.buf[start as usize..(start + len) as usize])
                } else {
                    Run::Zeros(len)
                };
                apply(off + start, what).map_err(|e| fail(off + start, e))?;
                i += run;
            }
            Ok(())
        }
    }
}

/// Applies one run to the target.
pub(super) fn write_run(
    dst: &mut dyn VirtualDiskWrite,
    off: u64,
    run: Run<'_>,
    opts: &CopyOptions,
) -> Result<(), DiskError> {
    match run {
        Run::Data(bytes) => dst
            .write_at(off, bytes)
            .and_then(|()| written(dst, opts.cache)),
        Run::Zeros(len) => write_zeros(dst, off, len, opts),
    }
}

/// qemu-img's `convert_co_write`: writes one piece.
pub(super) fn write_piece(
    dst: &mut dyn VirtualDiskWrite,
    p: &Piece,
    opts: &CopyOptions,
) -> Result<(), ConvertError> {
    if !(opts.compress && p.status == Status::Data) {
        return piece_runs(p, opts, |off, run| write_run(dst, off, run, opts));
    }
    let off = p.sector * SECTOR;
    let fail = |e: DiskError| {
        ConvertError(format!(
            "error while writing at byte {}: {e}",
            p.sector * SECTOR
        ))
    };
    if opts.min_sparse != 0 && is_zero(&p.buf) {
        return write_zeros(dst, off, p.sectors * SECTOR, opts).map_err(fail);
    }
    match &p.compressed {
        Some(c) => dst.write_precompressed(off, &p.buf, c.as_deref()),
        None => write_compressed_range(dst, off, &p.buf),
    }
    .and_then(|()| written(dst, opts.cache))
    .map_err(fail)
}
