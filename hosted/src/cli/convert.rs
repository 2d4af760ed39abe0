//! `qemu-img convert`: copy the guest view of one disk into another, the way qemu-img does it.
//!
//! The copy itself ([`copy_guest_data`]) writes through a [`VirtualDiskWrite`], so any writable output
//! plugs in: [`convert_to_raw`] creates a sparse raw file and copies into it; a qcow2 output only needs the
//! new image created and opened writable (`-c` then goes through compressed cluster writes).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;

use crate::cache::CacheMode;
use crate::cli::progress::Progress;
use crate::disk::{DiskError, VirtualDisk, VirtualDiskWrite, write_compressed_range};
use crate::raw_disk::RawDisk;

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

/// After a write to the target: in a write-through cache mode, the write is made durable before the next.
fn written(dst: &mut dyn VirtualDiskWrite, cache: CacheMode) -> Result<(), DiskError> {
    if cache.writethrough {
        dst.flush()?;
    }
    Ok(())
}

/// How [`copy_guest_data`] copies.
#[derive(Debug, Clone, Copy)]
pub struct CopyOptions {
    /// Print qemu-img's progress lines on the output.
    pub progress: bool,
    /// Write every cluster that holds data compressed (`qemu-img convert -c`); the output must take
    /// compressed writes ([`VirtualDiskWrite::compressed_cluster_size`]).
    pub compress: bool,
    /// The target's cache mode (`-t`): with `writethrough` every write is flushed; with `unsafe` (qemu-img
    /// convert's default) nothing is made durable, not even at the end; otherwise the target is flushed once,
    /// when it is closed.
    pub cache: CacheMode,
}

/// Converts `disk` into the raw file `dst` (created or truncated), with qemu-img's progress on `out` when
/// `progress` is set.
pub fn convert_to_raw(
    disk: &mut dyn VirtualDisk,
    dst: &str,
    opts: CopyOptions,
    out: &mut dyn Write,
) -> Result<(), ConvertError> {
    let size = disk.virtual_size();
    let total_sectors = size.div_ceil(SECTOR);
    let file = OpenOptions::new()
        .read(true)
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
    let mut target = RawDisk::new_writable(file, dst).map_err(|e| ConvertError(e.0))?;
    target.set_no_flush(opts.cache.no_flush);
    copy_guest_data(disk, &mut target, dst, opts, out)?;
    Box::new(target)
        .close()
        .map_err(|e| ConvertError(format!("{dst}: {e}")))
}

/// Converts `disk` into a new qcow2 image `dst`, created as `qemu-img create -f qcow2 -o OPTIONS` would (the
/// virtual size is the source's), then filled with the source's data runs; with `compress`, every cluster
/// that holds data is written compressed (clusters that do not compress are written as they are).
pub fn convert_to_qcow2(
    disk: &mut dyn VirtualDisk,
    dst: &str,
    options: &[String],
    opts: CopyOptions,
    out: &mut dyn Write,
) -> Result<(), ConvertError> {
    let args = crate::cli::create::CreateArgs {
        quiet: true,
        format: Some("qcow2".to_string()),
        options: options.to_vec(),
        file: dst.to_string(),
        size: Some(disk.virtual_size().to_string()),
        ..Default::default()
    };
    crate::cli::create::run_create(&args, &mut std::io::sink()).map_err(|e| ConvertError(e.0))?;
    let mut target = crate::open::open_disk_writable_cache(dst, Some("qcow2"), opts.cache)
        .map_err(|e| ConvertError(e.0))?;
    copy_guest_data(disk, target.disk.as_mut(), dst, opts, out)?;
    target
        .disk
        .close()
        .map_err(|e| ConvertError(format!("{dst}: {e}")))
}

/// Copies the guest view of `src` into `dst` (a new, empty disk of at least the same size, so that what
/// is not written reads as zeros): data runs are written, zero runs skipped, with qemu-img's progress on
/// `out` when asked. `dst_name` names the output in messages.
pub fn copy_guest_data(
    src: &mut dyn VirtualDisk,
    dst: &mut dyn VirtualDiskWrite,
    dst_name: &str,
    opts: CopyOptions,
    out: &mut dyn Write,
) -> Result<(), ConvertError> {
    let size = src.virtual_size();
    let total_sectors = size.div_ceil(SECTOR);
    let mut prog = Progress::new(opts.progress, 1.0);
    let io = |e: std::io::Error| ConvertError(format!("{dst_name}: {}", DiskError::os_text(&e)));
    prog.print(0.0, 100, out).map_err(io)?;

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
        let (data, len) = data_status(src, sector * SECTOR, n * SECTOR)
            .map_err(|e| status_err(sector * SECTOR, e))?;
        let n = len.div_ceil(SECTOR);
        if data {
            allocated += n;
        }
        sector += n;
    }

    let write_err =
        |off: u64, e: DiskError| ConvertError(format!("error while writing at byte {off}: {e}"));
    let read_err =
        |off: u64, e: DiskError| ConvertError(format!("error while reading at byte {off}: {e}"));

    if opts.compress {
        return copy_compressed(src, dst, allocated, opts.cache, &mut prog, out)
            .and_then(|()| prog.print(100.0, 0, out).map_err(io))
            .and_then(|()| prog.end(out).map_err(io));
    }

    // Second pass: copy data runs in 2 MiB pieces, leaving zero runs as holes.
    let mut buf = vec![0u8; (BUF_SECTORS * SECTOR) as usize];
    let mut done: u64 = 0;
    let mut sector = 0;
    while sector < total_sectors {
        let n = (total_sectors - sector).min(MAX_REQUEST_SECTORS);
        let (data, len) = data_status(src, sector * SECTOR, n * SECTOR)
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
            src.read_at(off, &mut chunk[..readable])
                .map_err(|e| read_err(off, e))?;
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
                    dst.write_at(off + start as u64, &chunk[start..end])
                        .and_then(|()| written(dst, opts.cache))
                        .map_err(|e| write_err(off + start as u64, e))?;
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

/// Most threads a compressed conversion compresses on.
const MAX_COMPRESS_THREADS: usize = 16;

/// Most bytes of source clusters a compressed conversion holds at once (twice this: the batch being
/// compressed and the next one being read).
const BATCH_BYTES: usize = 16 << 20;

/// The source's clusters that hold data, in guest order, for a compressed conversion; prints progress as
/// it reads.
struct ClusterReader<'a> {
    src: &'a mut dyn VirtualDisk,
    /// The source's size, and the end of the last request (whole sectors).
    vsize: u64,
    size: u64,
    cluster: u64,
    off: u64,
    done: u64,
    allocated: u64,
    prog: &'a mut Progress,
    out: &'a mut dyn Write,
}

impl ClusterReader<'_> {
    /// Up to `n` more clusters that are not all zeros, each with its guest offset (the last cluster of the
    /// disk may be shorter); empty at the end.
    fn next_batch(&mut self, n: usize) -> Result<Vec<(u64, Vec<u8>)>, ConvertError> {
        let mut batch = Vec::with_capacity(n);
        while batch.len() < n && self.off < self.size {
            let off = self.off;
            let len = (self.size - off).min(self.cluster);
            self.off += len;
            let (data, status_len) = data_status(self.src, off, len).map_err(|e| {
                ConvertError(format!(
                    "error while reading block status at offset {off}: {e}"
                ))
            })?;
            if !data && status_len >= len {
                continue;
            }
            let mut chunk = vec![0u8; len as usize];
            let readable = (self.vsize - off).min(len) as usize;
            self.src
                .read_at(off, &mut chunk[..readable])
                .map_err(|e| ConvertError(format!("error while reading at byte {off}: {e}")))?;
            self.done += len.div_ceil(SECTOR);
            self.prog
                .print(
                    (100.0 * self.done.min(self.allocated) as f64 / self.allocated.max(1) as f64)
                        as f32,
                    0,
                    self.out,
                )
                .map_err(|e| ConvertError(DiskError::os_text(&e)))?;
            if chunk.iter().any(|&b| b != 0) {
                batch.push((off, chunk));
            }
        }
        Ok(batch)
    }
}

/// The second pass of a compressed conversion: cluster by cluster in guest order, skipping clusters that
/// read as zeros and writing every other one compressed (or plain where it does not compress). When the
/// target's compressor may run on other threads, batches of clusters are compressed on every core while
/// the next batch is read; the writes stay in guest order on this thread.
fn copy_compressed(
    src: &mut dyn VirtualDisk,
    dst: &mut dyn VirtualDiskWrite,
    allocated: u64,
    cache: CacheMode,
    prog: &mut Progress,
    out: &mut dyn Write,
) -> Result<(), ConvertError> {
    let vsize = src.virtual_size();
    let cluster = dst.compressed_cluster_size().map_err(|e| {
        ConvertError(format!(
            "Compression not supported for this file format: {e}"
        ))
    })?;
    let step = usize::try_from(cluster)
        .ok()
        .filter(|&c| c > 0)
        .ok_or_else(|| ConvertError("cluster size out of range".to_string()))?;
    let compressor = dst.thread_compressor();
    let workers = match compressor {
        Some(_) => std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_COMPRESS_THREADS),
        None => 1,
    };
    let batch_len = (workers * 4).min((BATCH_BYTES / step).max(workers));
    let mut reader = ClusterReader {
        src,
        vsize,
        // Requests cover whole sectors; the last cluster ends at the end of the last sector.
        size: vsize.div_ceil(SECTOR) * SECTOR,
        cluster,
        off: 0,
        done: 0,
        allocated,
        prog,
        out,
    };
    let mut current = reader.next_batch(batch_len)?;
    while !current.is_empty() {
        let (compressed, next) = match compressor {
            Some(tc) if workers > 1 => std::thread::scope(|s| {
                let per = current.len().div_ceil(workers);
                let handles: Vec<_> = current
                    .chunks(per)
                    .map(|part| {
                        s.spawn(move || {
                            part.iter()
                                .map(|(_, data)| tc.compress(data))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                let next = reader.next_batch(batch_len);
                let mut compressed = Vec::with_capacity(current.len());
                for h in handles {
                    compressed.extend(h.join().map_err(|_| {
                        ConvertError("a compression thread stopped unexpectedly".to_string())
                    })?);
                }
                Ok::<_, ConvertError>((Some(compressed), next?))
            })?,
            _ => (None, Vec::new()),
        };
        for (i, (off, data)) in current.iter().enumerate() {
            match &compressed {
                Some(c) => dst.write_precompressed(*off, data, c.get(i).and_then(|c| c.as_deref())),
                None => write_compressed_range(dst, *off, data),
            }
            .and_then(|()| written(dst, cache))
            .map_err(|e| {
                ConvertError(format!(
                    "error while compressing sector {}: {e}",
                    off / SECTOR
                ))
            })?;
        }
        current = match compressed {
            Some(_) => next,
            None => reader.next_batch(batch_len)?,
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::MapExtent;

    /// A disk in memory; as an output it records which clusters were written compressed.
    struct Mem {
        data: Vec<u8>,
        compressed: Vec<u64>,
    }

    impl VirtualDisk for Mem {
        fn virtual_size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
            let o = offset as usize;
            buf.copy_from_slice(&self.data[o..o + buf.len()]);
            Ok(())
        }
        fn map_extent(&mut self, offset: u64, max_len: u64) -> Result<MapExtent, DiskError> {
            // Whole 4 KiB blocks: data unless all zero.
            let o = offset as usize;
            let end = ((o / 4096 + 1) * 4096).min(o + max_len as usize);
            let zero = self.data[o..end].iter().all(|&b| b == 0);
            Ok(MapExtent {
                start: offset,
                length: (end - o) as u64,
                depth: 0,
                present: !zero,
                zero,
                data: !zero,
                compressed: false,
                offset: None,
                file: None,
            })
        }
    }

    impl VirtualDiskWrite for Mem {
        fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
            let o = offset as usize;
            self.data[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> Result<(), DiskError> {
            self.data[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
            self.write_zeroes(offset, len, true)
        }
        fn compressed_cluster_size(&self) -> Result<u64, DiskError> {
            Ok(4096)
        }
        fn write_compressed(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
            self.compressed.push(offset);
            self.write_at(offset, data)
        }
        fn flush(&mut self) -> Result<(), DiskError> {
            Ok(())
        }
        fn close(self: Box<Self>) -> Result<(), DiskError> {
            Ok(())
        }
    }

    #[test]
    fn copies_into_any_writable_disk() {
        let mut data = vec![0u8; 40_000];
        data[100..200].fill(7);
        data[20_000..30_000].fill(9);
        data[39_999] = 1;
        for compress in [false, true] {
            let mut src = Mem {
                data: data.clone(),
                compressed: Vec::new(),
            };
            let mut dst = Mem {
                data: vec![0u8; 40_448],
                compressed: Vec::new(),
            };
            let mut out = Vec::new();
            let opts = CopyOptions {
                progress: false,
                compress,
                cache: CacheMode::WRITEBACK,
            };
            copy_guest_data(&mut src, &mut dst, "dst", opts, &mut out).unwrap();
            assert!(dst.data[..40_000] == data[..]);
            if compress {
                // Clusters 0, 4..7 and the last (partial) one hold data.
                assert_eq!(dst.compressed, [0, 16384, 20480, 24576, 28672, 36864]);
            } else {
                assert!(dst.compressed.is_empty());
            }
        }
    }

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
