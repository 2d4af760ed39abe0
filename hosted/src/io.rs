//! The `io` command: a read-only subset of qemu-io (`read`, `length`, `help`, `quit`) with its syntax,
//! messages and exit status.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::disk::VirtualDisk;
use crate::size::{SizeError, cvtstr, parse_pattern, parse_size, timestr};

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
}

const READ: CommandDef = CommandDef {
    name: "read",
    alt: Some("r"),
    args: "[-abCqrv] [-P pattern [-s off] [-l len]] off len",
    oneline: "reads a number of bytes at a specified offset",
    argmin: 2,
    argmax: None,
    needs_file: true,
};
const LENGTH: CommandDef = CommandDef {
    name: "length",
    alt: None,
    args: "",
    oneline: "gets the length of the current file",
    argmin: 0,
    argmax: Some(0),
    needs_file: true,
};
const HELP: CommandDef = CommandDef {
    name: "help",
    alt: Some("?"),
    args: "[command]",
    oneline: "help for one or all commands",
    argmin: 0,
    argmax: Some(1),
    needs_file: false,
};
const QUIT: CommandDef = CommandDef {
    name: "quit",
    alt: Some("q"),
    args: "",
    oneline: "exit the program",
    argmin: 0,
    argmax: Some(0),
    needs_file: false,
};
const COMMANDS: [&CommandDef; 4] = [&HELP, &LENGTH, &QUIT, &READ];

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

fn usage_line(c: &CommandDef) -> String {
    if c.args.is_empty() {
        format!("{} -- {}", c.name, c.oneline)
    } else {
        format!("{} {} -- {}", c.name, c.args, c.oneline)
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
        let _ = writeln!(out, "read {count}/{count} bytes at offset {offset}");
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
        let _ = writeln!(out, "{}", usage_line(c));
        if c.name == "read" {
            let _ = write!(out, "{READ_HELP}");
        }
        return CmdStatus::Ok;
    }
    for c in COMMANDS {
        let _ = writeln!(out, "{}", usage_line(c));
    }
    let _ = writeln!(out, "\nUse 'help commandname' for extended help.");
    CmdStatus::Ok
}

/// Runs one qemu-io command line (split on spaces as qemu-io does).
pub fn run_command(
    disk: Option<&mut dyn VirtualDisk>,
    line: &str,
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
    if def.needs_file && disk.is_none() {
        let _ = writeln!(err, "no file open, try 'help open'");
        return CmdStatus::Failed;
    }
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
    match def.name {
        "read" => match disk {
            Some(d) => read_cmd(d, args, out, err),
            None => CmdStatus::Failed,
        },
        "length" => match disk {
            Some(d) => {
                let _ = writeln!(out, "{}", cvtstr(d.virtual_size() as f64));
                CmdStatus::Ok
            }
            None => CmdStatus::Failed,
        },
        "help" => help_cmd(args, out),
        _ => CmdStatus::Quit,
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

    fn run(disk: &mut Mem, cmd: &str) -> (CmdStatus, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let st = run_command(Some(disk), cmd, &mut out, &mut err);
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
