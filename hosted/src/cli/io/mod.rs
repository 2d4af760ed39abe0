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
mod requests;
use requests::{discard_cmd, read_cmd, write_cmd};

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
mod tests;
