//! The `io` command: a subset of qemu-io (`read`, `write`, `discard`, `flush`, `aio_flush`, `length`,
//! `help`, `quit`) with its syntax, messages and exit status.
//!
//! qemu-io prints "read failed: ..." (and "write failed", "discard failed") on stdout; this tool keeps the
//! words but sends them to stderr, so that a failing run says why in one line on stderr like every other
//! error of the tool. Everything else goes where qemu-io sends it.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::cache::CacheMode;
use crate::cli::size::{SizeError, cvtstr, parse_pattern, parse_size, timestr};
use crate::disk::{VirtualDisk, VirtualDiskWrite, in_range, write_compressed_range};

/// qemu-io's largest request (BDRV_REQUEST_MAX_BYTES).
const MAX_REQUEST: u64 = 2_147_483_136;

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdStatus {
    /// Succeeded.
    Ok,
    /// Failed (the exit status becomes 1).
    Failed,
    /// `quit`: stop running commands.
    Quit,
}

struct CommandDef {
    name: &'static str,
    alt: Option<&'static str>,
    args: &'static str,
    oneline: &'static str,
    argmin: usize,
    argmax: Option<usize>,
    needs_file: bool,
    /// Needs the image open for writing (qemu-io's `BLK_PERM_WRITE`).
    writes: bool,
}

/// The image the commands work on: opened read-only (`-r`) or for writing.
pub enum IoDisk<'a> {
    /// Read-only: commands that write fail with "Block node is read-only".
    ReadOnly(&'a mut dyn VirtualDisk),
    /// Read-write.
    Writable(&'a mut dyn VirtualDiskWrite),
}

impl std::fmt::Debug for IoDisk<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoDisk::ReadOnly(_) => "IoDisk::ReadOnly",
            IoDisk::Writable(_) => "IoDisk::Writable",
        })
    }
}

/// An image opened by the `io` command.
#[derive(Debug)]
pub enum OpenedIo {
    /// With `-r`.
    ReadOnly(crate::open::OpenedImage),
    /// Without `-r`.
    Writable(crate::open::OpenedWritable),
}

impl OpenedIo {
    /// `qemu-img info`'s view of the chain.
    pub fn chain(&self) -> &[crate::disk::ImageInfo] {
        match self {
            OpenedIo::ReadOnly(i) => &i.chain,
            OpenedIo::Writable(i) => &i.chain,
        }
    }

    /// The disk, for [`run_command`].
    pub fn disk(&mut self) -> IoDisk<'_> {
        match self {
            OpenedIo::ReadOnly(i) => IoDisk::ReadOnly(i.disk.as_mut()),
            OpenedIo::Writable(i) => IoDisk::Writable(i.disk.as_mut()),
        }
    }

    /// Closes the image (a writable one is flushed and closed cleanly).
    pub fn close(self) -> Result<(), crate::disk::DiskError> {
        match self {
            OpenedIo::ReadOnly(_) => Ok(()),
            OpenedIo::Writable(i) => i.disk.close(),
        }
    }
}

impl IoDisk<'_> {
    fn read(&mut self) -> &mut dyn VirtualDisk {
        match self {
            IoDisk::ReadOnly(d) => &mut **d,
            IoDisk::Writable(d) => &mut **d,
        }
    }
}

const READ: CommandDef = CommandDef {
    name: "read",
    alt: Some("r"),
    args: "[-abCqrv] [-P pattern [-s off] [-l len]] off len",
    oneline: "reads a number of bytes at a specified offset",
    argmin: 2,
    argmax: None,
    needs_file: true,
    writes: false,
};
const LENGTH: CommandDef = CommandDef {
    name: "length",
    alt: None,
    args: "",
    oneline: "gets the length of the current file",
    argmin: 0,
    argmax: Some(0),
    needs_file: true,
    writes: false,
};
const HELP: CommandDef = CommandDef {
    name: "help",
    alt: Some("?"),
    args: "[command]",
    oneline: "help for one or all commands",
    argmin: 0,
    argmax: Some(1),
    needs_file: false,
    writes: false,
};
const QUIT: CommandDef = CommandDef {
    name: "quit",
    alt: Some("q"),
    args: "",
    oneline: "exit the program",
    argmin: 0,
    argmax: Some(0),
    needs_file: false,
    writes: false,
};
const WRITE: CommandDef = CommandDef {
    name: "write",
    alt: Some("w"),
    args: "[-bcCfnqruz] [-P pattern | -s source_file] off len",
    oneline: "writes a number of bytes at a specified offset",
    argmin: 2,
    argmax: None,
    needs_file: true,
    writes: true,
};
const DISCARD: CommandDef = CommandDef {
    name: "discard",
    alt: Some("d"),
    args: "[-Cq] off len",
    oneline: "discards a number of bytes at a specified offset",
    argmin: 2,
    argmax: None,
    needs_file: true,
    writes: true,
};
const FLUSH: CommandDef = CommandDef {
    name: "flush",
    alt: Some("f"),
    args: "",
    oneline: "flush all in-core file state to disk",
    argmin: 0,
    argmax: Some(0),
    needs_file: true,
    writes: false,
};
const AIO_FLUSH: CommandDef = CommandDef {
    name: "aio_flush",
    alt: None,
    args: "",
    oneline: "completes all outstanding aio requests",
    argmin: 0,
    argmax: Some(0),
    needs_file: true,
    writes: false,
};
/// Sorted by name, as qemu-io lists them.
const COMMANDS: [&CommandDef; 8] = [
    &AIO_FLUSH, &DISCARD, &FLUSH, &HELP, &LENGTH, &QUIT, &READ, &WRITE,
];

const READ_HELP: &str = "
 reads a range of bytes from the given offset

 Example:
 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 -b, -- read from the VM state rather than the virtual disk
 -C, -- report statistics in a machine parsable format
 -l, -- length for pattern verification (only with -P)
 -p, -- ignored for backwards compatibility
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -s, -- start offset for pattern verification (only with -P)
 -v, -- dump buffer to standard output

";

const WRITE_HELP: &str = "
 writes a range of bytes from the given offset

 Example:
 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -b, -- write to the VM state rather than the virtual disk
 -c, -- write compressed data with blk_write_compressed
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -n, -- with -z, don't allow slow fallback
 -p, -- ignored for backwards compatibility
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -s, -- use a pattern file to fill the write buffer
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_pwrite_zeroes

";

const DISCARD_HELP: &str = "
 discards a range of bytes from the given offset

 Example:
 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file

 Discards a segment of the currently open file.
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics

";

fn usage_line(c: &CommandDef) -> String {
    usage_line_as(c.name, c)
}

/// The one-line usage with the command called `name` (qemu-io's `help ALIAS` shows the alias).
fn usage_line_as(name: &str, c: &CommandDef) -> String {
    if c.args.is_empty() {
        format!("{name} -- {}", c.oneline)
    } else {
        format!("{name} {} -- {}", c.args, c.oneline)
    }
}

/// Result of GNU-style getopt with argument permutation over a command's arguments.
struct Parsed<'a> {
    opts: Vec<(char, Option<&'a str>)>,
    operands: Vec<&'a str>,
}

/// Parses `args` (without the command name) against a getopt spec like "bCl:pP:qrs:v". On an error prints
/// getopt's message on `err` and returns `None`.
fn getopt<'a>(cmd: &str, spec: &str, args: &[&'a str], err: &mut dyn Write) -> Option<Parsed<'a>> {
    let mut opts = Vec::new();
    let mut operands = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i];
        i += 1;
        if a == "--" {
            operands.extend_from_slice(&args[i..]);
            break;
        }
        if !a.starts_with('-') || a.len() == 1 {
            operands.push(a);
            continue;
        }
        let chars: Vec<char> = a[1..].chars().collect();
        let mut j = 0;
        while j < chars.len() {
            let c = chars[j];
            j += 1;
            let Some(pos) = spec.find(c).filter(|_| c != ':') else {
                let _ = writeln!(err, "{cmd}: invalid option -- '{c}'");
                return None;
            };
            let takes_arg = spec[pos + c.len_utf8()..].starts_with(':');
            if !takes_arg {
                opts.push((c, None));
                continue;
            }
            if j < chars.len() {
                // The rest of this word is the argument.
                let byte_off = 1 + chars[..j].iter().map(|c| c.len_utf8()).sum::<usize>();
                opts.push((c, Some(&a[byte_off..])));
            } else if i < args.len() {
                opts.push((c, Some(args[i])));
                i += 1;
            } else {
                let _ = writeln!(err, "{cmd}: option requires an argument -- '{c}'");
                return None;
            }
            break;
        }
    }
    Some(Parsed { opts, operands })
}

/// qemu-io's message for a number that did not parse.
fn cvtnum_error(e: SizeError, arg: &str, out: &mut dyn Write) {
    let _ = match e {
        SizeError::Invalid => {
            writeln!(
                out,
                "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}"
            )
        }
        SizeError::TooLarge => writeln!(out, "Parsing error: argument too large -- {arg}"),
    };
}

/// qemu-io's hex dump: offset, 16 bytes in hex, the same bytes as text (alphanumerics only).
pub fn dump_buffer(buf: &[u8], offset: u64, out: &mut dyn Write) -> std::io::Result<()> {
    for (i, line) in buf.chunks(16).enumerate() {
        let mut s = format!("{:08x}:  ", offset + (i * 16) as u64);
        for b in line {
            s.push_str(&format!("{b:02x} "));
        }
        s.push(' ');
        for &b in line {
            s.push(if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            });
        }
        writeln!(out, "{s}")?;
    }
    Ok(())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// qemu-io's `print_report`: "OP COUNT/COUNT bytes at offset OFFSET" and the statistics line, or with -C
/// one machine-readable line.
fn print_report(
    op: &str,
    elapsed: Duration,
    offset: u64,
    count: u64,
    cflag: bool,
    out: &mut dyn Write,
) {
    let t = secs(elapsed).max(1e-9);
    if cflag {
        let total_secs = elapsed.as_secs();
        let ts = format!(
            "{}:{:02}:{:05.2}",
            total_secs / 3600,
            (total_secs / 60) % 60,
            (total_secs % 60) as f64 + f64::from(elapsed.subsec_nanos()) / 1e9
        );
        let _ = writeln!(
            out,
            "{},{},{},{:.3},{:.3}",
            count,
            1,
            ts,
            count as f64 / t,
            1.0 / t
        );
    } else {
        let _ = writeln!(out, "{op} {count}/{count} bytes at offset {offset}");
        let _ = writeln!(
            out,
            "{}, {} ops; {} ({}/sec and {:.4} ops/sec)",
            cvtstr(count as f64),
            1,
            timestr(elapsed),
            cvtstr(count as f64 / t),
            1.0 / t
        );
    }
}

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

fn write_cmd(
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

fn discard_cmd(
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

fn read_cmd(
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

fn help_cmd(args: &[&str], out: &mut dyn Write) -> CmdStatus {
    if let Some(name) = args.first() {
        let Some(c) = COMMANDS
            .iter()
            .find(|c| c.name == *name || c.alt == Some(name))
        else {
            let _ = writeln!(out, "command {name} not found");
            return CmdStatus::Failed;
        };
        let _ = writeln!(out, "{}", usage_line_as(name, c));
        match c.name {
            "read" => {
                let _ = write!(out, "{READ_HELP}");
            }
            "write" => {
                let _ = write!(out, "{WRITE_HELP}");
            }
            "discard" => {
                let _ = write!(out, "{DISCARD_HELP}");
            }
            _ => {}
        }
        return CmdStatus::Ok;
    }
    for c in COMMANDS {
        let _ = writeln!(out, "{}", usage_line(c));
    }
    let _ = writeln!(out, "\nUse 'help commandname' for extended help.");
    CmdStatus::Ok
}

/// Runs one qemu-io command line (split on spaces as qemu-io does) with qemu-io's default cache mode,
/// `writethrough`.
pub fn run_command(
    disk: Option<IoDisk<'_>>,
    line: &str,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> CmdStatus {
    run_command_cached(disk, line, CacheMode::default(), out, err)
}

/// Runs one qemu-io command line in cache mode `cache`: when it writes through, every command that
/// changes the image (`write` in all its forms, `discard`) flushes it (cached metadata written back, then
/// the host asked for durability) before it reports success, so that a process killed after the report
/// loses nothing it reported. Otherwise only `flush` (and closing the image) does.
pub fn run_command_cached(
    disk: Option<IoDisk<'_>>,
    line: &str,
    cache: CacheMode,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> CmdStatus {
    let words: Vec<&str> = line.split(' ').filter(|w| !w.is_empty()).collect();
    let Some((&name, args)) = words.split_first() else {
        return CmdStatus::Ok;
    };
    let Some(def) = COMMANDS
        .iter()
        .find(|c| c.name == name || c.alt == Some(name))
    else {
        let _ = writeln!(err, "command \"{name}\" not found");
        return CmdStatus::Failed;
    };
    let Some(mut disk) = disk else {
        if def.needs_file {
            let _ = writeln!(err, "no file open, try 'help open'");
            return CmdStatus::Failed;
        }
        return match def.name {
            "help" => help_cmd(args, out),
            _ => CmdStatus::Quit,
        };
    };
    let argc = args.len();
    if argc < def.argmin || def.argmax.is_some_and(|m| argc > m) {
        let expected = match def.argmax {
            None => format!("at least {} arguments", def.argmin),
            Some(max) if max == def.argmin => format!("{max} arguments"),
            Some(max) => format!("between {} and {max} arguments", def.argmin),
        };
        let _ = writeln!(
            err,
            "bad argument count {argc} to {}, expected {expected}",
            def.name
        );
        return CmdStatus::Failed;
    }
    if def.writes && matches!(disk, IoDisk::ReadOnly(_)) {
        // qemu-io fails to take the write permission, and error_report() names the program.
        let _ = writeln!(err, "qcow2: Block node is read-only");
        return CmdStatus::Failed;
    }
    match (def.name, &mut disk) {
        ("read", d) => read_cmd(d.read(), args, out, err),
        ("write", IoDisk::Writable(d)) => write_cmd(&mut **d, args, cache.writethrough, out, err),
        ("discard", IoDisk::Writable(d)) => {
            discard_cmd(&mut **d, args, cache.writethrough, out, err)
        }
        ("flush", IoDisk::Writable(d)) => match d.flush() {
            Ok(()) => CmdStatus::Ok,
            Err(e) => {
                // qemu-io fails silently here; the tool names the reason.
                let _ = writeln!(err, "flush failed: {e}");
                CmdStatus::Failed
            }
        },
        // Nothing is in flight: every request completes before its command returns.
        ("flush" | "aio_flush", _) => CmdStatus::Ok,
        ("length", d) => {
            let _ = writeln!(out, "{}", cvtstr(d.read().virtual_size() as f64));
            CmdStatus::Ok
        }
        ("help", _) => help_cmd(args, out),
        ("quit", _) => CmdStatus::Quit,
        _ => CmdStatus::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{DiskError, MapExtent};

    struct Mem(Vec<u8>);
    impl VirtualDisk for Mem {
        fn virtual_size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
            let o = offset as usize;
            buf.copy_from_slice(&self.0[o..o + buf.len()]);
            Ok(())
        }
        fn map_extent(&mut self, offset: u64, max_len: u64) -> Result<MapExtent, DiskError> {
            Ok(MapExtent {
                start: offset,
                length: max_len,
                depth: 0,
                present: true,
                zero: false,
                data: true,
                compressed: false,
                offset: Some(offset),
                file: None,
            })
        }
    }

    impl VirtualDiskWrite for Mem {
        fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
            let o = offset as usize;
            self.0[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> Result<(), DiskError> {
            self.0[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
            self.write_zeroes(offset, len, true)
        }
        fn compressed_cluster_size(&self) -> Result<u64, DiskError> {
            Ok(4096)
        }
        fn write_compressed(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
            assert_eq!(offset % 4096, 0);
            self.write_at(offset, data)
        }
        fn flush(&mut self) -> Result<(), DiskError> {
            Ok(())
        }
        fn close(self: Box<Self>) -> Result<(), DiskError> {
            Ok(())
        }
    }

    fn run(disk: &mut Mem, cmd: &str) -> (CmdStatus, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let st = run_command(Some(IoDisk::Writable(disk)), cmd, &mut out, &mut err);
        (
            st,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    fn strip_timing(s: &str) -> String {
        s.lines()
            .filter(|l| !l.contains(" ops; "))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    #[test]
    fn read_with_pattern() {
        let mut d = Mem(vec![0xab; 8192]);
        let (st, out, _) = run(&mut d, "read -P 0xab 0 4k");
        assert_eq!(st, CmdStatus::Ok);
        assert_eq!(strip_timing(&out), "read 4096/4096 bytes at offset 0\n");
        assert!(out.lines().nth(1).unwrap().starts_with("4 KiB, 1 ops; "));
        d.0[5000] = 0;
        let (st, out, _) = run(&mut d, "read -P 0xab 4k 4k");
        assert_eq!(st, CmdStatus::Failed);
        assert_eq!(
            strip_timing(&out),
            "Pattern verification failed at offset 4096, 4096 bytes\nread 4096/4096 bytes at offset 4096\n"
        );
        let (st, out, _) = run(&mut d, "read -q -P 0xab 0 4k");
        assert_eq!((st, out.as_str()), (CmdStatus::Ok, ""));
    }

    #[test]
    fn read_errors_like_qemu_io() {
        let mut d = Mem(vec![0; 4096]);
        assert_eq!(
            run(&mut d, "read 4k 1").2,
            "read failed: Input/output error\n"
        );
        assert_eq!(
            run(&mut d, "read 1x 1").1,
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1x\n"
        );
        assert_eq!(
            run(&mut d, "read 0 3G").1,
            "length cannot exceed 2147483136, given 3G\n"
        );
        assert_eq!(
            run(&mut d, "read -P 0x1ff 0 1").1,
            "0x1ff is not a valid pattern byte\n"
        );
        let (st, out, err) = run(&mut d, "read 0 -1");
        assert_eq!(st, CmdStatus::Failed);
        assert_eq!(err, "read: invalid option -- '1'\n");
        assert_eq!(out, format!("{}\n", usage_line(&READ)));
        let (_, _, err) = run(&mut d, "read 0");
        assert_eq!(
            err,
            "bad argument count 1 to read, expected at least 2 arguments\n"
        );
        let (_, _, err) = run(&mut d, "bogus 1");
        assert_eq!(err, "command \"bogus\" not found\n");
        assert_eq!(
            run(&mut d, "read -P 0 -l 5 0 1").1,
            "pattern verification range exceeds end of read data\n"
        );
        assert_eq!(run(&mut d, "quit").0, CmdStatus::Quit);
        assert_eq!(run(&mut d, "length").1, "4 KiB\n");
    }

    fn run_ro(disk: &mut Mem, cmd: &str) -> (CmdStatus, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let st = run_command(Some(IoDisk::ReadOnly(disk)), cmd, &mut out, &mut err);
        (
            st,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn write_patterns_zeroes_and_discard() {
        let mut d = Mem(vec![0xab; 65536]);
        let (st, out, _) = run(&mut d, "write 100 1k");
        assert_eq!(st, CmdStatus::Ok);
        assert_eq!(strip_timing(&out), "wrote 1024/1024 bytes at offset 100\n");
        assert!(d.0[100..1124].iter().all(|&b| b == 0xcd));
        assert_eq!(d.0[99], 0xab);
        assert_eq!(run(&mut d, "w -q -P 0x12 0 10").1, "");
        assert_eq!(d.0[..10], [0x12; 10]);
        let (st, out, _) = run(&mut d, "write -z -u 4096 8192");
        assert_eq!(st, CmdStatus::Ok);
        assert_eq!(strip_timing(&out), "wrote 8192/8192 bytes at offset 4096\n");
        assert!(d.0[4096..12288].iter().all(|&b| b == 0));
        let (st, out, _) = run(&mut d, "discard 12288 4k");
        assert_eq!(st, CmdStatus::Ok);
        assert_eq!(
            strip_timing(&out),
            "discard 4096/4096 bytes at offset 12288\n"
        );
        let (st, out, _) = run(&mut d, "write -c 16k 8k");
        assert_eq!(st, CmdStatus::Ok);
        assert_eq!(
            strip_timing(&out),
            "wrote 8192/8192 bytes at offset 16384\n"
        );
        assert!(d.0[16384..24576].iter().all(|&b| b == 0xcd));
        assert_eq!(run(&mut d, "flush").0, CmdStatus::Ok);
        assert_eq!(run(&mut d, "write 0 0").0, CmdStatus::Ok);
        assert_eq!(run(&mut d, "write 64k 0").0, CmdStatus::Ok);
    }

    #[test]
    fn write_errors_like_qemu_io() {
        let mut d = Mem(vec![0; 65536]);
        let msg = |d: &mut Mem, cmd: &str| {
            let (st, out, err) = run(d, cmd);
            assert_eq!(st, CmdStatus::Failed, "{cmd}");
            format!("{out}{err}")
        };
        assert_eq!(
            msg(&mut d, "write 64k 1"),
            "write failed: Input/output error\n"
        );
        assert_eq!(
            msg(&mut d, "write -z 65535 2"),
            "write failed: Input/output error\n"
        );
        assert_eq!(
            msg(&mut d, "discard 65535 2"),
            "discard failed: Input/output error\n"
        );
        assert_eq!(
            msg(&mut d, "write -c 512 4k"),
            "write failed: Invalid argument\n"
        );
        assert_eq!(
            msg(&mut d, "write -c 0 1k"),
            "write failed: Invalid argument\n"
        );
        assert_eq!(
            msg(&mut d, "write -c 1 4k"),
            "1 is not a sector-aligned value for 'offset'\n"
        );
        assert_eq!(
            msg(&mut d, "write -c 0 1000"),
            "1000 is not a sector-aligned value for 'count'\n"
        );
        assert_eq!(
            msg(&mut d, "write -u 0 1"),
            "-u requires -z to be specified\n"
        );
        assert_eq!(
            msg(&mut d, "write -n 0 1"),
            "-n requires -z to be specified\n"
        );
        assert_eq!(
            msg(&mut d, "write -z -P 1 0 1"),
            "Only one of -z, -P, and -s can be specified at the same time\n"
        );
        assert_eq!(
            msg(&mut d, "write -f -c 0 1"),
            "-f and -b or -c cannot be specified at the same time\n"
        );
        assert_eq!(
            msg(&mut d, "write -b -z 0 1"),
            "-b and -z cannot be specified at the same time\n"
        );
        assert_eq!(
            msg(&mut d, "write -r -z 0 1"),
            "cannot combine zero write with registered I/O buffer\n"
        );
        assert_eq!(
            msg(&mut d, "write 0 3G"),
            "length cannot exceed 2147483136 without -n, given 3G\n"
        );
        assert_eq!(
            msg(&mut d, "discard 0 3G"),
            "length cannot exceed 2147483136, given 3G\n"
        );
        assert_eq!(
            msg(&mut d, "write -x 0 1"),
            format!("{}\nwrite: invalid option -- 'x'\n", usage_line(&WRITE))
        );
        assert_eq!(
            msg(&mut d, "discard 0 1 2"),
            format!("{}\n", usage_line(&DISCARD))
        );
        assert_eq!(
            msg(&mut d, "flush 1"),
            "bad argument count 1 to flush, expected 0 arguments\n"
        );
        assert_eq!(
            run_ro(&mut d, "write -x 0 1").2,
            "qcow2: Block node is read-only\n"
        );
        assert_eq!(run_ro(&mut d, "discard 0 1").0, CmdStatus::Failed);
        assert_eq!(run_ro(&mut d, "flush").0, CmdStatus::Ok);
        assert_eq!(
            run_ro(&mut d, "write 0").2,
            "bad argument count 1 to write, expected at least 2 arguments\n"
        );
    }

    #[test]
    fn write_from_pattern_file() {
        let path = std::env::temp_dir().join(format!("qcow2-io-pat-{}", std::process::id()));
        std::fs::write(&path, b"ab").unwrap();
        let mut d = Mem(vec![0; 4096]);
        let cmd = format!("write -q -s {} 10 5", path.display());
        assert_eq!(run(&mut d, &cmd).0, CmdStatus::Ok);
        assert_eq!(&d.0[10..15], b"ababa");
        std::fs::write(&path, b"").unwrap();
        let (st, _, err) = run(&mut d, &cmd);
        assert_eq!(st, CmdStatus::Failed);
        assert_eq!(err, format!("{}: file is empty\n", path.display()));
        std::fs::remove_file(&path).unwrap();
        let (_, _, err) = run(&mut d, &cmd);
        assert_eq!(
            err,
            format!("{}: No such file or directory\n", path.display())
        );
    }

    /// A [`Mem`] that counts flushes.
    struct Counting(Mem, usize);
    impl VirtualDisk for Counting {
        fn virtual_size(&self) -> u64 {
            self.0.virtual_size()
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
            self.0.read_at(offset, buf)
        }
        fn map_extent(&mut self, offset: u64, max_len: u64) -> Result<MapExtent, DiskError> {
            self.0.map_extent(offset, max_len)
        }
    }
    impl VirtualDiskWrite for Counting {
        fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
            self.0.write_at(offset, buf)
        }
        fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
            self.0.write_zeroes(offset, len, unmap)
        }
        fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
            self.0.discard(offset, len)
        }
        fn compressed_cluster_size(&self) -> Result<u64, DiskError> {
            self.0.compressed_cluster_size()
        }
        fn write_compressed(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
            self.0.write_compressed(offset, data)
        }
        fn flush(&mut self) -> Result<(), DiskError> {
            self.1 += 1;
            Ok(())
        }
        fn close(self: Box<Self>) -> Result<(), DiskError> {
            Ok(())
        }
    }

    #[test]
    fn write_through_flushes_every_command_that_writes() {
        // (command, flushes in write-through mode, flushes in write-back mode)
        let cases = [
            ("write 0 1k", 1, 0),
            ("write -P 1 -q 100 10", 1, 0),
            ("write -z 4k 4k", 1, 0),
            ("write -z -u 4k 4k", 1, 0),
            ("write -c 8k 8k", 1, 0),
            ("discard 0 4k", 1, 0),
            ("write -f 0 1", 1, 1),
            ("flush", 1, 1),
            // Nothing written: nothing to flush.
            ("write 0 0", 0, 0),
            ("discard 0 0", 0, 0),
            ("read 0 1k", 0, 0),
            ("aio_flush", 0, 0),
            // A failed write is not flushed.
            ("write 64k 1", 0, 0),
            ("discard 64k 1", 0, 0),
            ("write -x 0 1", 0, 0),
        ];
        for (cmd, wt, wb) in cases {
            for (mode, want) in [
                (CacheMode::WRITETHROUGH, wt),
                (CacheMode::parse("directsync").unwrap(), wt),
                (CacheMode::WRITEBACK, wb),
                (CacheMode::parse("unsafe").unwrap(), wb),
                (CacheMode::parse("none").unwrap(), wb),
            ] {
                let mut d = Counting(Mem(vec![0; 65536]), 0);
                let (mut out, mut err) = (Vec::new(), Vec::new());
                run_command_cached(
                    Some(IoDisk::Writable(&mut d)),
                    cmd,
                    mode,
                    &mut out,
                    &mut err,
                );
                assert_eq!(d.1, want, "{cmd} in {mode:?}");
            }
        }
        // The default is qemu-io's: write-through.
        let mut d = Counting(Mem(vec![0; 4096]), 0);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        run_command(
            Some(IoDisk::Writable(&mut d)),
            "write 0 1",
            &mut out,
            &mut err,
        );
        assert_eq!(d.1, 1);
    }

    #[test]
    fn help_for_aliases() {
        let mut d = Mem(vec![0; 512]);
        let out = run(&mut d, "help w").1;
        assert!(out.starts_with("w [-bcCfnqruz] [-P pattern | -s source_file] off len -- writes"));
        assert!(out.contains(" -z, -- write zeroes using blk_pwrite_zeroes\n\n"));
        assert_eq!(
            run(&mut d, "help f").1,
            "f -- flush all in-core file state to disk\n"
        );
    }

    #[test]
    fn hex_dump_layout() {
        let mut out = Vec::new();
        let data: Vec<u8> = b"Hello, World! abc~_-xyz 0123456789\0\0\0\0\0\0".to_vec();
        dump_buffer(&data, 0, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "00000000:  48 65 6c 6c 6f 2c 20 57 6f 72 6c 64 21 20 61 62  Hello..World..ab
00000010:  63 7e 5f 2d 78 79 7a 20 30 31 32 33 34 35 36 37  c...xyz.01234567
00000020:  38 39 00 00 00 00 00 00  89......
"
        );
    }
}
