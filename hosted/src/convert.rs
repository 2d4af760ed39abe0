//! `qemu-img convert -O raw`: copy the guest view into a sparse raw file, the way qemu-img does it.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;

use crate::disk::{DiskError, VirtualDisk};
use crate::progress::Progress;

const SECTOR: u64 = 512;
/// qemu-img's copy buffer: 2 MiB.
const BUF_SECTORS: u64 = 4096;
/// Largest block-status request (QEMU's BDRV_REQUEST_MAX_SECTORS).
const MAX_REQUEST_SECTORS: u64 = 2_147_483_136 / SECTOR;
/// Zero runs shorter than this many sectors are written anyway (qemu-img's default `-S 4k`).
const MIN_SPARSE: usize = 8;
/// Zero runs are aligned to this many sectors.
const ALIGNMENT: u64 = 8;

fn sector_is_zero(buf: &[u8], sector: usize) -> bool {
    let start = sector * SECTOR as usize;
    buf[start..(start + SECTOR as usize).min(buf.len())]
        .iter()
        .all(|&b| b == 0)
}

/// qemu-img's `is_allocated_sectors`: whether the first sector of `buf` (n sectors, the first at
/// `sector_num`) holds data, and for how many sectors that status lasts once aligned.
fn allocated_run(buf: &[u8], n: usize, sector_num: u64) -> (bool, usize) {
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
    let tail = ((sector_num + i as u64) & (ALIGNMENT - 1)) as usize;
    if tail != 0 {
        if is_zero && i <= tail {
            // A zero run that is only the tail of an aligned block: the data after it rewrites that block.
            is_zero = false;
        }
        if !is_zero {
            i = (i + ALIGNMENT as usize - tail).min(n);
        } else {
            i -= tail;
        }
    }
    (!is_zero, i)
}

/// qemu-img's `is_allocated_sectors_min`: like [`allocated_run`], but a data run swallows zero runs shorter
/// than `min` sectors that follow it.
fn allocated_run_min(buf: &[u8], n: usize, min: usize, sector_num: u64) -> (bool, usize) {
    let min = min.min(n);
    let (data, first) = allocated_run(buf, n, sector_num);
    if !data {
        return (false, first);
    }
    let mut used = first;
    let mut checked = first;
    let mut left = n - first;
    while left > 0 {
        let off = checked * SECTOR as usize;
        let (d, run) = allocated_run(&buf[off..], left, sector_num + checked as u64);
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

/// What went wrong in a conversion: the one-line message after "prog: ".
#[derive(Debug)]
pub struct ConvertError(pub String);

/// Block status of a range for conversion: true if it must be copied as data.
fn data_status(
    disk: &mut dyn VirtualDisk,
    offset: u64,
    len: u64,
) -> Result<(bool, u64), DiskError> {
    let size = disk.virtual_size();
    if offset >= size {
        return Ok((false, len));
    }
    let e = disk.map_extent(offset, len.min(size - offset))?;
    Ok((!e.zero, e.length.clamp(1, len)))
}

/// Converts `disk` into the raw file `dst` (created or truncated), with qemu-img's progress on `out` when
/// `progress` is set.
pub fn convert_to_raw(
    disk: &mut dyn VirtualDisk,
    dst: &str,
    progress: bool,
    out: &mut dyn Write,
) -> Result<(), ConvertError> {
    let size = disk.virtual_size();
    let total_sectors = size.div_ceil(SECTOR);
    let mut prog = Progress::new(progress, 1.0);
    let io = |e: std::io::Error| ConvertError(format!("{dst}: {}", DiskError::os_text(&e)));
    prog.print(0.0, 100, out).map_err(io)?;

    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)
        .map_err(|e| {
            ConvertError(format!(
                "{dst}: error while converting raw: Could not create '{dst}': {}",
                DiskError::os_text(&e)
            ))
        })?;
    file.set_len(total_sectors * SECTOR).map_err(|e| {
        ConvertError(format!(
            "{dst}: Could not resize file: {}",
            DiskError::os_text(&e)
        ))
    })?;

    // Like QEMU's file driver, allocate the first block of a new file (QEMU does it so that later opens can
    // probe the alignment), so that the result has the same holes as qemu-img's.
    let first = (total_sectors * SECTOR).min(4096) as usize;
    if first > 0 {
        file.write_all_at(&vec![0u8; first], 0).map_err(|e| {
            ConvertError(format!(
                "{dst}: Could not write to the new file: {}",
                DiskError::os_text(&e)
            ))
        })?;
    }

    // First pass: how many sectors hold data, for the progress bar.
    let status_err = |off: u64, e: DiskError| {
        ConvertError(format!(
            "error while reading block status at offset {off}: {e}"
        ))
    };
    let mut allocated: u64 = 0;
    let mut sector = 0;
    while sector < total_sectors {
        let n = (total_sectors - sector).min(MAX_REQUEST_SECTORS);
        let (data, len) = data_status(disk, sector * SECTOR, n * SECTOR)
            .map_err(|e| status_err(sector * SECTOR, e))?;
        let n = len.div_ceil(SECTOR);
        if data {
            allocated += n;
        }
        sector += n;
    }

    // Second pass: copy data runs in 2 MiB pieces, leaving zero runs as holes.
    let mut buf = vec![0u8; (BUF_SECTORS * SECTOR) as usize];
    let mut done: u64 = 0;
    let mut sector = 0;
    while sector < total_sectors {
        let n = (total_sectors - sector).min(MAX_REQUEST_SECTORS);
        let (data, len) = data_status(disk, sector * SECTOR, n * SECTOR)
            .map_err(|e| status_err(sector * SECTOR, e))?;
        let run_end = sector + len.div_ceil(SECTOR);
        if !data {
            sector = run_end;
            continue;
        }
        while sector < run_end {
            let n = (run_end - sector).min(BUF_SECTORS);
            done += n;
            prog.print((100.0 * done as f64 / allocated as f64) as f32, 0, out)
                .map_err(io)?;
            let bytes = (n * SECTOR) as usize;
            let chunk = &mut buf[..bytes];
            let off = sector * SECTOR;
            let readable = (size - off).min(bytes as u64) as usize;
            chunk[readable..].fill(0);
            disk.read_at(off, &mut chunk[..readable])
                .map_err(|e| ConvertError(format!("error while reading at byte {off}: {e}")))?;
            let mut i = 0usize;
            while i < n as usize {
                let (is_data, run) = allocated_run_min(
                    &chunk[i * SECTOR as usize..],
                    n as usize - i,
                    MIN_SPARSE,
                    sector + i as u64,
                );
                let run = run.max(1);
                if is_data {
                    let start = i * SECTOR as usize;
                    let end = (i + run) * SECTOR as usize;
                    file.write_all_at(&chunk[start..end], off + start as u64)
                        .map_err(|e| {
                            ConvertError(format!(
                                "error while writing at byte {}: {}",
                                off + start as u64,
                                DiskError::os_text(&e)
                            ))
                        })?;
                }
                i += run;
            }
            sector += n;
        }
    }
    prog.print(100.0, 0, out).map_err(io)?;
    prog.end(out).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sectors(pattern: &[u8]) -> Vec<u8> {
        pattern
            .iter()
            .flat_map(|&b| std::iter::repeat_n(b, 512))
            .collect()
    }

    #[test]
    fn zero_runs_align_like_qemu() {
        // 8 data sectors, 8 zero sectors: two aligned runs.
        let buf = sectors(&[1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(allocated_run(&buf, 16, 0), (true, 8));
        assert_eq!(allocated_run(&buf[8 * 512..], 8, 8), (false, 8));
        // A data run ending mid-block is extended to the block end.
        let buf = sectors(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(allocated_run(&buf, 16, 0), (true, 8));
        // A zero run ending mid-block is cut back to the block start.
        let buf = sectors(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]);
        assert_eq!(allocated_run(&buf, 16, 0), (false, 8));
        // A zero run that is only a block's tail is data.
        let buf = sectors(&[0, 0, 1, 1]);
        assert_eq!(allocated_run(&buf, 4, 5), (true, 3));
        assert_eq!(allocated_run(&buf, 4, 6), (false, 2));
    }

    #[test]
    fn short_zero_gaps_stay_in_the_write() {
        let buf = sectors(&[
            1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0,
        ]);
        assert_eq!(allocated_run_min(&buf, 32, 8, 0), (true, 16));
        let buf = sectors(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(allocated_run_min(&buf, 16, 8, 0), (false, 16));
    }
}
