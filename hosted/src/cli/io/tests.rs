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
