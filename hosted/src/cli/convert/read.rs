//! The read side of a conversion: the sources as one disk ([`Sources`]), qemu-img's block-status walk
//! ([`Plan`]: data, zeros, or left to the target's backing file), and the pieces read in guest order
//! ([`Reader`]), with their progress ([`Printer`]).

use super::*;

/// Several sources read as one disk, one after the other (qemu-img convert with more than one source);
/// each source takes whole sectors, its last one padded with zeros.
pub struct Sources<'a> {
    parts: Vec<&'a mut (dyn VirtualDisk + Send)>,
    /// Where each part starts, and the total, in bytes (multiples of 512).
    starts: Vec<u64>,
    size: u64,
}

impl std::fmt::Debug for Sources<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("starts", &self.starts)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl<'a> Sources<'a> {
    /// The concatenation of `parts`, in order.
    pub fn new(parts: Vec<&'a mut (dyn VirtualDisk + Send)>) -> Sources<'a> {
        let mut starts = Vec::with_capacity(parts.len());
        let mut size = 0u64;
        for p in &parts {
            starts.push(size);
            size = size.saturating_add(p.virtual_size().div_ceil(SECTOR) * SECTOR);
        }
        Sources {
            parts,
            starts,
            size,
        }
    }

    /// The part holding byte `offset`, with the offset inside it.
    pub(super) fn part(&self, offset: u64) -> (usize, u64) {
        let i = self
            .starts
            .partition_point(|&s| s <= offset)
            .saturating_sub(1);
        (i, offset - self.starts[i])
    }

    /// The length of part `i` in whole sectors.
    pub(super) fn part_len(&self, i: usize) -> u64 {
        self.starts.get(i + 1).copied().unwrap_or(self.size) - self.starts[i]
    }
}

impl VirtualDisk for Sources<'_> {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn bitmap_dirty_runs(
        &mut self,
        name: &str,
        f: &mut crate::disk::DirtyRunSink<'_>,
    ) -> Result<(), DiskError> {
        match self.parts.as_mut_slice() {
            [one] => one.bitmap_dirty_runs(name, f),
            _ => Err(DiskError::new(format!("Dirty bitmap '{name}' not found"))),
        }
    }

    fn read_at(&mut self, mut offset: u64, mut buf: &mut [u8]) -> Result<(), DiskError> {
        while !buf.is_empty() {
            let (i, inner) = self.part(offset);
            let n = (self.part_len(i) - inner).min(buf.len() as u64) as usize;
            let (now, rest) = buf.split_at_mut(n);
            let part = &mut self.parts[i];
            let readable = part.virtual_size().saturating_sub(inner).min(n as u64) as usize;
            part.read_at(inner, &mut now[..readable])?;
            now[readable..].fill(0);
            offset += n as u64;
            buf = rest;
        }
        Ok(())
    }

    fn map_extent(&mut self, offset: u64, max_len: u64) -> Result<MapExtent, DiskError> {
        let (i, inner) = self.part(offset);
        let part = &mut self.parts[i];
        let size = part.virtual_size();
        let len = max_len.min(self.starts.get(i + 1).map_or(u64::MAX, |e| e - offset));
        if inner >= size {
            // The padding of a last partial sector (only reached when the size is not a multiple of 512).
            return Ok(MapExtent {
                start: offset,
                length: len,
                depth: 0,
                present: false,
                zero: true,
                data: false,
                compressed: false,
                offset: None,
                file: None,
            });
        }
        let mut e = part.map_extent(inner, len.min(size - inner))?;
        e.start = offset;
        if inner + e.length == size {
            // The extent ends the part: it covers the padding up to the next sector too.
            e.length = len.min(size.div_ceil(SECTOR) * SECTOR - inner);
        }
        Ok(e)
    }
}

/// What qemu-img does with a range of the source (its `ImgConvertBlockStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Status {
    /// Read it and write what is not zeros.
    Data,
    /// Reads as zeros: write zeros unless the target already reads as zeros there.
    Zero,
    /// Unallocated in the source's top image: left unallocated, so the target's backing file shows through.
    Backing,
}

pub(super) fn warn(opts: &CopyOptions, msg: String) {
    if !opts.quiet {
        eprintln!("qcow2: warning: {msg}");
    }
}

/// qemu-img's `convert_iteration_sectors`: walks the source by block status.
pub(super) struct Plan {
    pub(super) total: u64,
    pub(super) status: Status,
    pub(super) next_status: u64,
    pub(super) cluster: u64,
}

impl Plan {
    /// The status at `sector` and for how many sectors it lasts (in whole clusters when compressing).
    pub(super) fn next(
        &mut self,
        src: &mut dyn VirtualDisk,
        sector: u64,
        opts: &CopyOptions,
    ) -> Result<(Status, u64), ConvertError> {
        let mut n = (self.total - sector).min(MAX_REQUEST_SECTORS);
        let backing_sectors = opts
            .target_backing_size
            .filter(|_| opts.target_has_backing)
            .map(|b| b.div_ceil(SECTOR));
        let mut post_backing_zero = false;
        if let Some(b) = backing_sectors {
            if sector >= b {
                post_backing_zero = true;
            } else if sector + n > b {
                n = b - sector;
            }
        }
        if self.next_status <= sector {
            let (e, count) = loop {
                match src.map_extent(sector * SECTOR, n * SECTOR) {
                    Ok(e) => {
                        let count = e.length.div_ceil(SECTOR).clamp(1, n);
                        break (Some(e), count);
                    }
                    Err(e) if opts.salvage => {
                        if n == 1 {
                            warn(
                                opts,
                                format!(
                                    "error while reading block status at offset {}: {e}",
                                    sector * SECTOR
                                ),
                            );
                            break (None, 1);
                        }
                        n = n.div_ceil(4);
                    }
                    Err(e) => {
                        return Err(ConvertError(format!(
                            "error while reading block status at offset {}: {e}",
                            sector * SECTOR
                        )));
                    }
                }
            };
            n = count;
            self.status = match e {
                None => Status::Data,
                // Unallocated in the source's top image, which has a backing file.
                Some(e)
                    if opts.target_has_backing && !(e.present && e.depth == 0) && e.depth > 0 =>
                {
                    Status::Backing
                }
                Some(e) if e.zero => {
                    if post_backing_zero {
                        Status::Backing
                    } else {
                        Status::Zero
                    }
                }
                Some(_) => Status::Data,
            };
            self.next_status = sector + n;
        }
        n = n.min(self.next_status - sector);
        // With -S 0, zeros are written as data.
        let data =
            self.status == Status::Data || (opts.min_sparse == 0 && self.status == Status::Zero);
        if data {
            // One buffer at a time; a compressed conversion reads one cluster at a time.
            n = n.min(if opts.compress {
                self.cluster
            } else {
                BUF_SECTORS
            });
        }
        if opts.compress {
            // Compressed clusters are written whole: a run shorter than a cluster is data.
            if n < self.cluster {
                n = self.cluster.min(self.total - sector);
                self.status = Status::Data;
            } else {
                n -= n % self.cluster;
            }
        }
        let status = if opts.min_sparse == 0 && self.status == Status::Zero {
            Status::Data
        } else {
            self.status
        };
        Ok((status, n))
    }
}

/// Reads `buf.len()` bytes at `offset`; with `--salvage`, a failing read is retried sector by sector and the
/// sectors that cannot be read become zeros.
pub(super) fn read_source(
    src: &mut dyn VirtualDisk,
    offset: u64,
    buf: &mut [u8],
    opts: &CopyOptions,
) -> Result<(), ConvertError> {
    let err =
        |off: u64, e: DiskError| ConvertError(format!("error while reading at byte {off}: {e}"));
    match src.read_at(offset, buf) {
        Ok(()) => Ok(()),
        Err(e) if !opts.salvage => Err(err(offset, e)),
        Err(_) => {
            for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
                let off = offset + i as u64 * SECTOR;
                if let Err(e) = src.read_at(off, sector) {
                    warn(opts, format!("error while reading offset {off}: {e}"));
                    sector.fill(0);
                }
            }
            Ok(())
        }
    }
}

/// One piece of the copy, in guest order.
pub(super) struct Piece {
    pub(super) sector: u64,
    pub(super) sectors: u64,
    pub(super) status: Status,
    /// The data read (for [`Status::Data`]).
    pub(super) buf: AlignedBuf,
    /// For compressed writes: the cluster compressed on another thread (`None` inside: it does not
    /// compress), or not compressed yet.
    pub(super) compressed: Option<Option<Vec<u8>>>,
}

/// Where progress goes: qemu-img's progress lines on the output.
pub(super) struct Printer<'a> {
    pub(super) prog: &'a mut Progress,
    pub(super) out: &'a mut dyn Write,
}

impl Printer<'_> {
    pub(super) fn print(&mut self, percent: f32) -> Result<(), ConvertError> {
        self.prog
            .print(percent, 0, self.out)
            .map_err(|e| ConvertError(DiskError::os_text(&e)))
    }

    /// The next piece from `reader`, with the progress it made printed.
    pub(super) fn next(
        &mut self,
        reader: &mut Reader<'_>,
        buf: AlignedBuf,
        opts: &CopyOptions,
    ) -> Result<Option<Piece>, ConvertError> {
        let p = reader.next(buf, opts)?;
        if let Some(percent) = reader.progress.take() {
            self.print(percent)?;
        }
        Ok(p)
    }
}

/// The read side of the copy: the source's pieces in guest order.
pub(super) struct Reader<'a> {
    pub(super) src: &'a mut (dyn VirtualDisk + Send),
    pub(super) plan: Plan,
    pub(super) sector: u64,
    pub(super) done: u64,
    pub(super) allocated: u64,
    /// Progress made by the last piece taken, to be printed.
    pub(super) progress: Option<f32>,
    /// When the copy started (for `-r`).
    pub(super) started: std::time::Instant,
}

impl Reader<'_> {
    /// The next piece, read into `buf` (resized to it) when it is data; `None` at the end.
    pub(super) fn next(
        &mut self,
        mut buf: AlignedBuf,
        opts: &CopyOptions,
    ) -> Result<Option<Piece>, ConvertError> {
        if self.sector >= self.plan.total {
            return Ok(None);
        }
        let sector = self.sector;
        let (status, n) = self.plan.next(self.src, sector, opts)?;
        self.sector += n;
        if status == Status::Data {
            self.done += n;
            self.progress = Some((100.0 * self.done as f64 / self.allocated.max(1) as f64) as f32);
            if let Some(rate) = opts.rate {
                // -r: wait until the data read so far is within the rate.
                let due = std::time::Duration::from_secs_f64(
                    (self.done - n) as f64 * SECTOR as f64 / rate as f64,
                );
                if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            buf.set_len((n * SECTOR) as usize);
            if self.plan.status == Status::Data {
                read_source(self.src, sector * SECTOR, &mut buf, opts)?;
            } else {
                // -S 0 over a zero run.
                buf.fill(0);
            }
        } else {
            buf.set_len(0);
        }
        Ok(Some(Piece {
            sector,
            sectors: n,
            status,
            buf,
            compressed: None,
        }))
    }
}
