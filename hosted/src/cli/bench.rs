//! `qcow2 bench`: qemu-img bench's workload and output, run through this engine.
//!
//! The request stream is qemu-img's: `count` requests of `buffer_size` bytes, the first at `offset`, each next
//! one `step_size` bytes further (the buffer size when 0), wrapping modulo the image's size. The buffer is
//! filled with the pattern byte (writes write it). With `--flush-interval=N` every N requests are followed by
//! a flush (after the requests in flight complete, unless `--no-drain`). The figure printed is the time from
//! the first request to the last completion; opening and closing the image are outside it, as in qemu-img.
//!
//! Queue depth: the engine serves one request at a time per opened image. For reads with a depth above 1,
//! `min(depth, max(cores, 4))` worker threads each open their own read-only handle of the image (each with
//! its own bounded metadata cache) and take the next request from a shared counter, so that up to that many
//! requests are in flight at once, as in qemu-img's thread pool: requests that wait for the disk overlap, and
//! CPU work (decompression) spreads over the cores. Writes go through the one writable handle, one request at a time, in
//! qemu-img's order: the engine has a single writer, and its write ordering depends on that.
//!
//! `-t` and `-i`/`-n` are accepted with qemu-img's values; the engine always does buffered positional I/O
//! (`pread`/`pwrite`), which is what qemu-img's default (`-t writeback -i threads`) does too. With `-t
//! writethrough` or `-t directsync` every write is followed by a flush, as QEMU does for those modes.

use crate::aligned::AlignedBuf;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::disk::{DiskError, VirtualDisk, VirtualDiskWrite};

/// Read workers (each with its own handle) a read benchmark at a queue depth of at least this uses even on a
/// machine with fewer cores (requests waiting for the disk overlap; more would cost a metadata cache each).
pub const MIN_READERS: u64 = 4;

/// What `qcow2 bench` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchOptions {
    /// Number of requests.
    pub count: u64,
    /// Requests in flight at once.
    pub depth: u64,
    /// Bytes per request.
    pub buffer_size: u64,
    /// Distance between the starts of consecutive requests (0: the buffer size).
    pub step_size: u64,
    /// Guest offset of the first request.
    pub offset: u64,
    /// Write instead of read.
    pub write: bool,
    /// Byte the buffer is filled with.
    pub pattern: u8,
    /// Flush after every this many requests (0: never).
    pub flush_interval: u64,
    /// Do not wait for the requests in flight before a flush.
    pub no_drain: bool,
    /// Flush after every write (`-t writethrough`, `-t directsync`).
    pub write_through: bool,
    /// Image format (`-f`), probed when `None`.
    pub format: Option<String>,
    /// No output.
    pub quiet: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            count: 75000,
            depth: 64,
            buffer_size: 4096,
            step_size: 0,
            offset: 0,
            write: false,
            pattern: 0,
            flush_interval: 0,
            no_drain: false,
            write_through: false,
            format: None,
            quiet: false,
        }
    }
}

/// Guest offset of request `i`: qemu-img's running `offset += step; offset %= size`, in closed form.
fn request_offset(o: &BenchOptions, size: u64, i: u64) -> u64 {
    if size == 0 {
        return if i == 0 { o.offset } else { 0 };
    }
    if i == 0 {
        return o.offset;
    }
    let step = u128::from(effective_step(o));
    ((u128::from(o.offset) + step * u128::from(i)) % u128::from(size)) as u64
}

fn effective_step(o: &BenchOptions) -> u64 {
    if o.step_size == 0 {
        o.buffer_size
    } else {
        o.step_size
    }
}

fn failed(e: DiskError) -> DiskError {
    DiskError::new(format!("Failed request: {e}"))
}

/// The header line qemu-img bench prints before it starts.
pub fn header(o: &BenchOptions) -> String {
    let mut s = format!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})\n",
        o.count,
        if o.write { "write" } else { "read" },
        o.buffer_size,
        o.depth,
        o.offset,
        effective_step(o)
    );
    if o.flush_interval > 0 {
        s.push_str(&format!(
            "Sending flush every {} requests\n",
            o.flush_interval
        ));
    }
    s
}

/// Runs the benchmark on the image `path` and prints qemu-img bench's lines to `out`.
pub fn run_bench(path: &str, o: &BenchOptions, out: &mut dyn Write) -> Result<(), DiskError> {
    let buf_len = usize::try_from(o.buffer_size).map_err(|_| DiskError::new("buffer too large"))?;
    let text = |out: &mut dyn Write, s: &str| {
        if !o.quiet {
            let _ = out.write_all(s.as_bytes());
            let _ = out.flush();
        }
    };
    if o.write {
        let opened = crate::open::open_disk_writable(path, o.format.as_deref())
            .map_err(|e| DiskError::new(format!("Could not open '{path}': {e}")))?;
        let mut disk = opened.disk;
        text(out, &header(o));
        let buf = AlignedBuf::new(buf_len, o.pattern);
        let size = disk.virtual_size();
        let start = Instant::now();
        let result = write_requests(disk.as_mut(), o, size, &buf);
        let elapsed = start.elapsed();
        result?;
        text(
            out,
            &format!("Run completed in {:.3} seconds.\n", elapsed.as_secs_f64()),
        );
        return disk.close();
    }
    let opened = crate::open::open_disk(path, o.format.as_deref())
        .map_err(|e| DiskError::new(format!("Could not open '{path}': {e}")))?;
    let first = opened.disk;
    let size = first.virtual_size();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let workers = o.depth.min(cores.max(MIN_READERS)).min(o.count).max(1);
    // The other workers' handles are opened before the clock starts, as qemu-img opens its image first.
    let mut disks = vec![first];
    for _ in 1..workers {
        let d = crate::open::open_disk(path, o.format.as_deref())
            .map_err(|e| DiskError::new(format!("Could not open '{path}': {e}")))?;
        disks.push(d.disk);
    }
    text(out, &header(o));
    let next = AtomicU64::new(0);
    let start = Instant::now();
    let results: Vec<Result<(), DiskError>> = if let [only] = disks.as_mut_slice() {
        vec![read_requests(only.as_mut(), o, size, buf_len, &next)]
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = disks
                .iter_mut()
                .map(|d| {
                    let next = &next;
                    s.spawn(move || read_requests(d.as_mut(), o, size, buf_len, next))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(DiskError::new("a worker thread failed")))
                })
                .collect()
        })
    };
    let elapsed = start.elapsed();
    for r in results {
        r?;
    }
    text(
        out,
        &format!("Run completed in {:.3} seconds.\n", elapsed.as_secs_f64()),
    );
    Ok(())
}

fn check_range(size: u64, offset: u64, len: u64) -> Result<(), DiskError> {
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(failed(DiskError::new("Input/output error")));
    }
    Ok(())
}

fn read_requests(
    disk: &mut (dyn VirtualDisk + Send),
    o: &BenchOptions,
    size: u64,
    buf_len: usize,
    next: &AtomicU64,
) -> Result<(), DiskError> {
    let mut aligned = AlignedBuf::new(buf_len, o.pattern);
    let buf = &mut aligned[..];
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= o.count {
            return Ok(());
        }
        let offset = request_offset(o, size, i);
        check_range(size, offset, o.buffer_size)?;
        disk.read_at(offset, buf).map_err(failed)?;
    }
}

fn write_requests(
    disk: &mut (dyn VirtualDiskWrite + Send),
    o: &BenchOptions,
    size: u64,
    buf: &[u8],
) -> Result<(), DiskError> {
    for i in 0..o.count {
        let offset = request_offset(o, size, i);
        check_range(size, offset, o.buffer_size)?;
        disk.write_at(offset, buf).map_err(failed)?;
        if o.write_through {
            disk.flush().map_err(failed)?;
        }
        if o.flush_interval > 0 && (i + 1) % o.flush_interval == 0 {
            disk.flush().map_err(failed)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_wrap_like_qemu_img() {
        let o = BenchOptions {
            offset: 4096,
            step_size: 8192,
            ..BenchOptions::default()
        };
        let size = 16384;
        let mut running = o.offset;
        for i in 0..20 {
            assert_eq!(request_offset(&o, size, i), running);
            running = (running + 8192) % size;
        }
    }

    #[test]
    fn header_matches_qemu_img() {
        let o = BenchOptions {
            count: 10,
            depth: 2,
            write: true,
            flush_interval: 3,
            ..BenchOptions::default()
        };
        assert_eq!(
            header(&o),
            "Sending 10 write requests, 4096 bytes each, 2 in parallel (starting at offset 0, step size 4096)\n\
             Sending flush every 3 requests\n"
        );
    }
}
