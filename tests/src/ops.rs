//! Random guest operations (writes of one pattern byte, zero writes, discards, flushes), shared by the
//! tests that compare the engine, the `qcow2 io` command and qemu-io, and the images they start from.

use std::path::PathBuf;

use crate::{Scratch, qemu_img_ok, qemu_io_cmds};

/// One guest operation.
#[derive(Debug, Clone)]
pub enum Op {
    /// Write `len` bytes of `byte` at `off`.
    Write {
        /// Guest offset.
        off: u64,
        /// Length in bytes.
        len: u64,
        /// The pattern byte.
        byte: u8,
    },
    /// Write zeroes (`write -z`, with `-u` when `unmap`).
    Zero {
        /// Guest offset.
        off: u64,
        /// Length in bytes.
        len: u64,
        /// Allow unmapping.
        unmap: bool,
    },
    /// Discard.
    Discard {
        /// Guest offset.
        off: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Flush.
    Flush,
}

impl Op {
    /// The same operation as a qemu-io command.
    pub fn qemu_io(&self) -> String {
        match self {
            Op::Write { off, len, byte } => format!("write -P {byte} {off} {len}"),
            Op::Zero { off, len, unmap } => {
                format!("write -z {}{off} {len}", if *unmap { "-u " } else { "" })
            }
            Op::Discard { off, len } => format!("discard {off} {len}"),
            Op::Flush => "flush".to_string(),
        }
    }
}

/// A small deterministic generator.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A value below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

/// Random operations over a disk of `size` bytes with `cluster` sized clusters: aligned and unaligned, small
/// and multi-cluster.
pub fn ops(seed: u64, size: u64, cluster: u64, count: usize) -> Vec<Op> {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut out = Vec::new();
    for _ in 0..count {
        let unit = match r.below(3) {
            0 => 512,
            1 => cluster,
            _ => cluster / 4 + 512,
        }
        .max(512);
        let len = (1 + r.below(4)) * unit;
        let len = len.min(size);
        let off = (r.below(size - len + 1) / 512) * 512;
        let op = match r.below(10) {
            0..=5 => Op::Write {
                off,
                len,
                byte: (1 + r.below(250)) as u8,
            },
            6 | 7 => Op::Zero {
                off,
                len,
                unmap: r.below(2) == 0,
            },
            8 => Op::Discard { off, len },
            _ => Op::Flush,
        };
        out.push(op);
    }
    out
}

/// Two identical starting images, `a.qcow2` in the scratch directory and `b/a.qcow2`, each with its own
/// backing file (`base.qcow2`, a qcow2 image made with `backing` options and holding two patterns) and
/// external data file (when `opts` names `data_file=data.img`). `setup` qemu-io commands run on the image
/// before it is copied; with `snapshot`, an internal snapshot `snap` is taken after them.
pub fn twin_images(
    s: &Scratch,
    opts: &str,
    size: u64,
    backing: Option<&str>,
    setup: &[&str],
    snapshot: bool,
) -> (PathBuf, PathBuf) {
    let base = s.path("base.qcow2");
    let top = s.path("a.qcow2");
    let mut create: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    if !opts.is_empty() {
        create.push("-o".into());
        create.push(opts.into());
    }
    if let Some(bopts) = backing {
        let mut b: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
        if !bopts.is_empty() {
            b.push("-o".into());
            b.push(bopts.into());
        }
        b.push(base.display().to_string());
        b.push(size.to_string());
        qemu_img_ok(&b);
        qemu_io_cmds(
            &base,
            "qcow2",
            &[
                format!("write -P 0x11 0 {}", size / 2),
                format!("write -P 0x22 {} {}", size / 2 + 4096, size / 4),
            ],
        );
        create.extend(["-b", "base.qcow2", "-F", "qcow2"].map(String::from));
    }
    create.push(top.display().to_string());
    create.push(size.to_string());
    // Relative data file names are created relative to the working directory.
    let made = crate::qemu_command("qemu-img")
        .args(&create)
        .current_dir(s.dir())
        .status()
        .expect("qemu-img is required");
    assert!(made.success(), "qemu-img {create:?} failed");
    let setup: Vec<String> = setup.iter().map(|c| c.to_string()).collect();
    qemu_io_cmds(&top, "qcow2", &setup);
    if snapshot {
        qemu_img_ok([
            "snapshot".as_ref(),
            "-c".as_ref(),
            "snap".as_ref(),
            top.as_os_str(),
        ]);
    }
    // The copy lives in its own directory with its own backing and data files.
    let other = s.path("b");
    std::fs::create_dir(&other).expect("create the copy's directory");
    for f in ["a.qcow2", "base.qcow2", "data.img"] {
        if s.path(f).exists() {
            std::fs::copy(s.path(f), other.join(f)).expect("copy an image file");
        }
    }
    (top, other.join("a.qcow2"))
}
