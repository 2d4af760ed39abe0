//! The requests of `qcow2 io`: `read`, `write` and `discard` with qemu-io's options, buffers and reports.

use super::*;

/// Parses a number operand, printing qemu-io's message when it does not parse.
fn operand(arg: &str, out: &mut dyn Write) -> Option<u64> {
    match parse_size(arg) {
        Ok(v) => Some(v),
        Err(e) => {
            cvtnum_error(e, arg, out);
            None
        }
    }
}

/// A buffer of `len` bytes of `byte`, or `None` if the memory is not there.
fn filled_buffer(len: u64, byte: u8) -> Option<Vec<u8>> {
    let len = usize::try_from(len).ok()?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(len).ok()?;
    buf.resize(len, byte);
    Some(buf)
}

/// qemu-io's `qemu_io_alloc_from_file`: the first `len` bytes of `path`, repeated to fill `len` bytes.
/// Failures are reported on `err` the way qemu-io does (`perror`).
fn buffer_from_file(path: &str, len: u64, err: &mut dyn Write) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            let _ = writeln!(err, "{path}: {}", crate::disk::DiskError::os_text(&e));
            return None;
        }
    };
    let Some(mut buf) = filled_buffer(len, 0) else {
        let _ = writeln!(err, "{path}: Cannot allocate memory");
        return None;
    };
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = writeln!(err, "{path}: {}", crate::disk::DiskError::os_text(&e));
                return None;
            }
        }
    }
    if got == 0 {
        let _ = writeln!(err, "{path}: file is empty");
        return None;
    }
    for i in got..buf.len() {
        buf[i] = buf[i - got];
    }
    Some(buf)
}

pub(super) fn write_cmd(
    disk: &mut dyn VirtualDiskWrite,
    args: &[&str],
    writethrough: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> CmdStatus {
    let usage = |out: &mut dyn Write| {
        let _ = writeln!(out, "{}", usage_line(&WRITE));
        CmdStatus::Failed
    };
    let Some(p) = getopt("write", "bcCfnpP:qrs:uz", args, err) else {
        return usage(out);
    };
    let (mut bflag, mut cflag, mut big_c, mut fua, mut nflag) = (false, false, false, false, false);
    let (mut pflag, mut qflag, mut rflag, mut uflag, mut zflag) =
        (false, false, false, false, false);
    let mut pattern = 0xcdu8;
    let mut source: Option<&str> = None;
    for (c, arg) in p.opts {
        let arg = arg.unwrap_or("");
        match c {
            'b' => bflag = true,
            'c' => cflag = true,
            'C' => big_c = true,
            'f' => fua = true,
            'n' => nflag = true,
            'p' => {}
            'P' => {
                pflag = true;
                match parse_pattern(arg) {
                    Some(v) => pattern = v,
                    None => {
                        let _ = writeln!(out, "{arg} is not a valid pattern byte");
                        return CmdStatus::Failed;
                    }
                }
            }
            'q' => qflag = true,
            'r' => rflag = true,
            's' => source = Some(arg),
            'u' => uflag = true,
            'z' => zflag = true,
            _ => return usage(out),
        }
    }
    if p.operands.len() != 2 {
        return usage(out);
    }
    let refuse = |out: &mut dyn Write, msg: &str| {
        let _ = writeln!(out, "{msg}");
        CmdStatus::Failed
    };
    if bflag && zflag {
        return refuse(out, "-b and -z cannot be specified at the same time");
    }
    if fua && (bflag || cflag) {
        return refuse(out, "-f and -b or -c cannot be specified at the same time");
    }
    if nflag && !zflag {
        return refuse(out, "-n requires -z to be specified");
    }
    if uflag && !zflag {
        return refuse(out, "-u requires -z to be specified");
    }
    if u8::from(zflag) + u8::from(pflag) + u8::from(source.is_some()) > 1 {
        return refuse(
            out,
            "Only one of -z, -P, and -s can be specified at the same time",
        );
    }
    let Some(offset) = operand(p.operands[0], out) else {
        return CmdStatus::Failed;
    };
    let Some(count) = operand(p.operands[1], out) else {
        return CmdStatus::Failed;
    };
    if count > MAX_REQUEST && !nflag {
        let _ = writeln!(
            out,
            "length cannot exceed {MAX_REQUEST} without -n, given {}",
            p.operands[1]
        );
        return CmdStatus::Failed;
    }
    if bflag || cflag {
        if offset % 512 != 0 {
            let _ = writeln!(out, "{offset} is not a sector-aligned value for 'offset'");
            return CmdStatus::Failed;
        }
        if count % 512 != 0 {
            let _ = writeln!(out, "{count} is not a sector-aligned value for 'count'");
            return CmdStatus::Failed;
        }
    }
    let mut buf = Vec::new();
    if !zflag {
        buf = match source {
            Some(path) => match buffer_from_file(path, count, err) {
                Some(b) => b,
                None => return CmdStatus::Failed,
            },
            None => match filled_buffer(count, pattern) {
                Some(b) => b,
                None => {
                    let _ = writeln!(err, "write failed: Cannot allocate memory");
                    return CmdStatus::Failed;
                }
            },
        };
    } else if rflag {
        return refuse(out, "cannot combine zero write with registered I/O buffer");
    }

    let t1 = Instant::now();
    let result = if bflag {
        // The VM state area is not part of what this tool reads or writes.
        Err(crate::disk::ENOTSUP.to_string())
    } else if cflag && !zflag {
        write_compressed_range(disk, offset, &buf).map_err(|e| e.0)
    } else if !in_range(disk, offset, count) {
        Err(crate::disk::EIO.to_string())
    } else if count == 0 {
        Ok(())
    } else if zflag {
        disk.write_zeroes(offset, count, uflag).map_err(|e| e.0)
    } else {
        disk.write_at(offset, &buf).map_err(|e| e.0)
    };
    // Force Unit Access, or a write-through cache: the data is durable when the write completes.
    let result = result.and_then(|()| {
        if (fua || writethrough) && count > 0 {
            disk.flush().map_err(|e| e.0)
        } else {
            Ok(())
        }
    });
    let elapsed = t1.elapsed();
    if let Err(msg) = result {
        let _ = writeln!(err, "write failed: {msg}");
        return CmdStatus::Failed;
    }
    if !qflag {
        print_report("wrote", elapsed, offset, count, big_c, out);
    }
    CmdStatus::Ok
}

pub(super) fn discard_cmd(
    disk: &mut dyn VirtualDiskWrite,
    args: &[&str],
    writethrough: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> CmdStatus {
    let usage = |out: &mut dyn Write| {
        let _ = writeln!(out, "{}", usage_line(&DISCARD));
        CmdStatus::Failed
    };
    let Some(p) = getopt("discard", "Cq", args, err) else {
        return usage(out);
    };
    let (mut big_c, mut qflag) = (false, false);
    for (c, _) in p.opts {
        match c {
            'C' => big_c = true,
            'q' => qflag = true,
            _ => return usage(out),
        }
    }
    if p.operands.len() != 2 {
        return usage(out);
    }
    let Some(offset) = operand(p.operands[0], out) else {
        return CmdStatus::Failed;
    };
    let Some(count) = operand(p.operands[1], out) else {
        return CmdStatus::Failed;
    };
    if count > MAX_REQUEST {
        let _ = writeln!(
            out,
            "length cannot exceed {MAX_REQUEST}, given {}",
            p.operands[1]
        );
        return CmdStatus::Failed;
    }
    let t1 = Instant::now();
    let result = if !in_range(disk, offset, count) {
        Err(crate::disk::EIO.to_string())
    } else if count == 0 {
        Ok(())
    } else {
        disk.discard(offset, count).map_err(|e| e.0)
    };
    // qemu-io does not flush a discard even in write-through mode; this tool does, so that no command that
    // changes the image is reported before it is durable.
    let result = result.and_then(|()| {
        if writethrough && count > 0 {
            disk.flush().map_err(|e| e.0)
        } else {
            Ok(())
        }
    });
    let elapsed = t1.elapsed();
    if let Err(msg) = result {
        let _ = writeln!(err, "discard failed: {msg}");
        return CmdStatus::Failed;
    }
    if !qflag {
        print_report("discard", elapsed, offset, count, big_c, out);
    }
    CmdStatus::Ok
}

pub(super) fn read_cmd(
    disk: &mut dyn VirtualDisk,
    args: &[&str],
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> CmdStatus {
    let usage = |out: &mut dyn Write| {
        let _ = writeln!(out, "{}", usage_line(&READ));
        CmdStatus::Failed
    };
    let Some(p) = getopt("read", "bCl:pP:qrs:v", args, err) else {
        return usage(out);
    };
    let (mut bflag, mut cflag, mut qflag, mut vflag) = (false, false, false, false);
    let mut pattern: Option<u8> = None;
    let mut pattern_offset: u64 = 0;
    let mut pattern_count: Option<u64> = None;
    let mut sflag = false;
    for (c, arg) in p.opts {
        let arg = arg.unwrap_or("");
        match c {
            'b' => bflag = true,
            'C' => cflag = true,
            'l' => match parse_size(arg) {
                Ok(v) => pattern_count = Some(v),
                Err(e) => {
                    cvtnum_error(e, arg, out);
                    return CmdStatus::Failed;
                }
            },
            'p' | 'r' => {}
            'P' => match parse_pattern(arg) {
                Some(v) => pattern = Some(v),
                None => {
                    let _ = writeln!(out, "{arg} is not a valid pattern byte");
                    return CmdStatus::Failed;
                }
            },
            'q' => qflag = true,
            's' => match parse_size(arg) {
                Ok(v) => {
                    pattern_offset = v;
                    sflag = true;
                }
                Err(e) => {
                    cvtnum_error(e, arg, out);
                    return CmdStatus::Failed;
                }
            },
            'v' => vflag = true,
            _ => return usage(out),
        }
    }
    if p.operands.len() != 2 {
        return usage(out);
    }
    let offset = match parse_size(p.operands[0]) {
        Ok(v) => v,
        Err(e) => {
            cvtnum_error(e, p.operands[0], out);
            return CmdStatus::Failed;
        }
    };
    let count = match parse_size(p.operands[1]) {
        Ok(v) => v,
        Err(e) => {
            cvtnum_error(e, p.operands[1], out);
            return CmdStatus::Failed;
        }
    };
    if count > MAX_REQUEST {
        let _ = writeln!(
            out,
            "length cannot exceed {MAX_REQUEST}, given {}",
            p.operands[1]
        );
        return CmdStatus::Failed;
    }
    if pattern.is_none() && (pattern_count.is_some() || sflag) {
        return usage(out);
    }
    let pattern_count = pattern_count.unwrap_or(count.wrapping_sub(pattern_offset));
    if (pattern_count as i64) < 0
        || pattern_count
            .checked_add(pattern_offset)
            .is_none_or(|end| end > count)
    {
        let _ = writeln!(out, "pattern verification range exceeds end of read data");
        return CmdStatus::Failed;
    }
    if bflag {
        let _ = writeln!(out, "read failed: Operation not supported");
        return CmdStatus::Failed;
    }
    let mut buf = vec![0xabu8; count as usize];
    let size = disk.virtual_size();
    let t1 = Instant::now();
    let result = if offset > size || size - offset < count {
        Err("Input/output error".to_string())
    } else if count == 0 {
        Ok(())
    } else {
        disk.read_at(offset, &mut buf).map_err(|e| e.0)
    };
    let elapsed = t1.elapsed();
    if let Err(msg) = result {
        // qemu-io prints this on stdout; the tool keeps its words but sends failures to stderr, so that a
        // failing run is one line on stderr like every other error of the tool.
        let _ = writeln!(err, "read failed: {msg}");
        return CmdStatus::Failed;
    }
    let mut status = CmdStatus::Ok;
    if let Some(pat) = pattern {
        let start = pattern_offset as usize;
        let end = start + pattern_count as usize;
        if buf[start..end].iter().any(|&b| b != pat) {
            let _ = writeln!(
                out,
                "Pattern verification failed at offset {}, {} bytes",
                offset + pattern_offset,
                pattern_count
            );
            status = CmdStatus::Failed;
        }
    }
    if qflag {
        return status;
    }
    if vflag {
        let _ = dump_buffer(&buf, offset, out);
    }
    print_report("read", elapsed, offset, count, cflag, out);
    status
}
