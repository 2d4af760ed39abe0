//! The copy loops: several workers that store data into the target in parallel ([`copy_parallel`]), a
//! reader and a writer thread ([`copy_pipelined`], for targets that take no parallel stores), and
//! compression of batches of clusters on every core ([`copy_compressed`]).

use super::*;

/// Uncompressed copy into a target that takes data from several threads ([`VirtualDiskWrite::reserve`]),
/// as qemu-img's coroutines copy: each of a few workers takes the next piece and, still in guest order
/// (under one lock), reads it, writes its zeros and reserves room for its data in the target; then it
/// stores the data itself, while another worker reads, and commits it. The target's layout is the one
/// writing in guest order gives.
pub(super) fn copy_parallel(
    reader: Reader<'_>,
    printer: &mut Printer<'_>,
    dst: &mut (dyn VirtualDiskWrite + Send),
    pw: &ParallelWriter,
    opts: &CopyOptions,
) -> Result<(), ConvertError> {
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, MAX_COPY_THREADS)
        .min(opts.parallel);
    let reader = Mutex::new(reader);
    let dst = Mutex::new(dst);
    let failed = AtomicBool::new(false);
    // A filesystem takes buffered writes to one file one at a time (ext4 and XFS hold the inode's lock
    // exclusively); waiting here sleeps instead of spinning in the kernel on the other writer.
    let store_lock = Mutex::new(());
    let stopped = || ConvertError("a copy thread stopped unexpectedly".to_string());
    let (report, progress) = mpsc::channel::<f32>();
    // One piece: read, zeros written and data reserved in guest order; then the data stored and committed.
    // Errors come with the sector of the piece that met them: of several, the first in guest order is
    // reported (the one a serial copy would have met).
    let copy_one = |buf: AlignedBuf,
                    report: &mpsc::Sender<f32>|
     -> Result<Option<AlignedBuf>, (u64, ConvertError)> {
        let mut first = u64::MAX;
        let run = || -> Result<Option<AlignedBuf>, ConvertError> {
            let mut r = reader.lock().map_err(|_| stopped())?;
            first = r.sector;
            let Some(p) = r.next(buf, opts)? else {
                return Ok(None);
            };
            if let Some(percent) = r.progress.take() {
                // The printing thread is gone only when it failed (and said so).
                let _ = report.send(percent);
            }
            let mut jobs: Vec<(Reservation, usize)> = Vec::new();
            let base = p.sector * SECTOR;
            let planned = {
                let mut d = dst.lock().map_err(|_| stopped())?;
                piece_runs(&p, opts, |off, run| match run {
                    Run::Zeros(len) => write_zeros(&mut **d, off, len, opts),
                    Run::Data(bytes) => {
                        let mut at = 0usize;
                        while at < bytes.len() {
                            let left = (bytes.len() - at) as u64;
                            match d.reserve(off + at as u64, left)? {
                                Reserve::Reserved(res) => {
                                    let n = res.len() as usize;
                                    jobs.push((res, (off - base) as usize + at));
                                    at += n;
                                }
                                Reserve::WriteFirst(n) => {
                                    let n = n.clamp(1, left) as usize;
                                    d.write_at(off + at as u64, &bytes[at..at + n])?;
                                    at += n;
                                }
                            }
                        }
                        Ok(())
                    }
                })
            };
            drop(r);
            let mut jobs = jobs.into_iter();
            let stored = planned.and_then(|()| {
                for (res, start) in jobs.by_ref() {
                    let at = res.guest();
                    let data = &p.buf[start..start + res.len() as usize];
                    let stored = {
                        let _one_at_a_time = store_lock.lock().map_err(|_| stopped())?;
                        pw.store(&res, data)
                    };
                    if let Err(e) = stored {
                        dst.lock().map_err(|_| stopped())?.cancel(res);
                        return Err(ConvertError(format!(
                            "error while writing at byte {at}: {e}"
                        )));
                    }
                    let mut d = dst.lock().map_err(|_| stopped())?;
                    d.commit(res).map_err(|e| {
                        ConvertError(format!("error while writing at byte {at}: {e}"))
                    })?;
                }
                Ok(())
            });
            if stored.is_err() {
                // What was reserved and not stored goes back.
                if let Ok(mut d) = dst.lock() {
                    for (res, _) in jobs {
                        d.cancel(res);
                    }
                }
            }
            stored.map(|()| Some(p.buf))
        };
        run().map_err(|e| (first, e))
    };
    let worker = |report: mpsc::Sender<f32>| -> Result<(), (u64, ConvertError)> {
        let mut buf = AlignedBuf::default();
        while !failed.load(Ordering::Relaxed) {
            match copy_one(buf, &report) {
                Ok(Some(b)) => buf = b,
                Ok(None) => return Ok(()),
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        Ok(())
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let report = report.clone();
                s.spawn(|| worker(report))
            })
            .collect();
        drop(report);
        // This thread prints the progress the workers make, until they are all done.
        let mut printed = Ok(());
        for percent in progress {
            if printed.is_ok() {
                printed = printer.print(percent);
                if printed.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
            }
        }
        let mut first_error: Option<(u64, ConvertError)> = None;
        for h in handles {
            let failed = match h.join() {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(_) => (u64::MAX, stopped()),
            };
            if first_error.as_ref().is_none_or(|(at, _)| failed.0 < *at) {
                first_error = Some(failed);
            }
        }
        match first_error {
            Some((_, e)) => Err(e),
            None => printed,
        }
    })
}

/// Most threads an uncompressed copy into a [`ParallelWriter`] runs.
pub(super) const MAX_COPY_THREADS: usize = 4;

/// Uncompressed copy: this thread reads the pieces, a writer thread writes them in guest order, with up to
/// `opts.parallel` pieces (at most 4: 8 MiB) between them.
pub(super) fn copy_pipelined(
    reader: &mut Reader<'_>,
    printer: &mut Printer<'_>,
    dst: &mut (dyn VirtualDiskWrite + Send),
    opts: &CopyOptions,
) -> Result<(), ConvertError> {
    if opts.parallel <= 1 {
        while let Some(p) = printer.next(reader, AlignedBuf::default(), opts)? {
            write_piece(dst, &p, opts)?;
        }
        return Ok(());
    }
    let depth = opts.parallel.min(4);
    std::thread::scope(|s| {
        let (to_writer, pieces) = mpsc::sync_channel::<Piece>(depth);
        let (give_back, returned) = mpsc::channel::<AlignedBuf>();
        let writer = s.spawn(move || -> Result<(), ConvertError> {
            for p in pieces {
                write_piece(dst, &p, opts)?;
                // The reader may have finished: then the buffer is dropped here.
                let _ = give_back.send(p.buf);
            }
            Ok(())
        });
        let mut spare = depth + 1;
        let read = (|| {
            loop {
                let buf = if spare > 0 {
                    spare -= 1;
                    AlignedBuf::default()
                } else {
                    match returned.recv() {
                        Ok(b) => b,
                        // The writer stopped (on an error it reports).
                        Err(_) => return Ok(()),
                    }
                };
                let Some(p) = printer.next(reader, buf, opts)? else {
                    return Ok(());
                };
                if to_writer.send(p).is_err() {
                    return Ok(());
                }
            }
        })();
        drop(to_writer);
        let wrote = writer
            .join()
            .map_err(|_| ConvertError("the writer thread stopped unexpectedly".to_string()))?;
        read.and(wrote)
    })
}

/// Most threads a compressed conversion compresses on.
pub(super) const MAX_COMPRESS_THREADS: usize = 16;

/// Most bytes of source clusters a compressed conversion holds at once (twice this: the batch being
/// compressed and the next one being read).
pub(super) const BATCH_BYTES: usize = 16 << 20;

/// Compressed copy, cluster by cluster in guest order. When the target's compressor may run on other
/// threads, batches of clusters are compressed on every core (at most `opts.parallel`) while the next batch
/// is read; the writes stay in guest order on this thread.
pub(super) fn copy_compressed(
    reader: &mut Reader<'_>,
    printer: &mut Printer<'_>,
    dst: &mut (dyn VirtualDiskWrite + Send),
    opts: &CopyOptions,
) -> Result<(), ConvertError> {
    let step = (reader.plan.cluster * SECTOR) as usize;
    let compressor = dst.thread_compressor();
    let workers = match compressor {
        Some(_) => std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_COMPRESS_THREADS)
            .min(opts.parallel.max(1)),
        None => 1,
    };
    let batch_len = (workers * 4).min((BATCH_BYTES / step).max(workers));
    let next_batch =
        |reader: &mut Reader<'_>, printer: &mut Printer<'_>| -> Result<Vec<Piece>, ConvertError> {
            let mut batch = Vec::with_capacity(batch_len);
            let mut data = 0;
            while data < batch_len {
                let Some(p) = printer.next(reader, AlignedBuf::default(), opts)? else {
                    break;
                };
                if p.status == Status::Data {
                    data += 1;
                }
                batch.push(p);
            }
            Ok(batch)
        };
    let mut current = next_batch(reader, printer)?;
    while !current.is_empty() {
        let next = match compressor {
            Some(tc) if workers > 1 => {
                let mut todo: Vec<&mut Piece> = current
                    .iter_mut()
                    .filter(|p| p.status == Status::Data && !is_zero(&p.buf))
                    .collect();
                let per = todo.len().div_ceil(workers).max(1);
                std::thread::scope(|s| {
                    let handles: Vec<_> = todo
                        .chunks_mut(per)
                        .map(|part| {
                            s.spawn(move || {
                                for p in part.iter_mut() {
                                    p.compressed = Some(tc.compress(&p.buf));
                                }
                            })
                        })
                        .collect();
                    let next = next_batch(reader, printer);
                    for h in handles {
                        h.join().map_err(|_| {
                            ConvertError("a compression thread stopped unexpectedly".to_string())
                        })?;
                    }
                    next
                })?
            }
            _ => Vec::new(),
        };
        for p in &current {
            write_piece(dst, p, opts)?;
        }
        current = match compressor {
            Some(_) if workers > 1 => next,
            _ => next_batch(reader, printer)?,
        };
    }
    Ok(())
}
