//! The power-loss tests' shared harness: the engine image type they open, the backing-file resolver, the
//! guest model's allowed values per cell, crash states of a recorded run, and the check of one crash state
//! (it opens, its refcounts are consistent for an independent counter and for `qemu-img check`, and every
//! cell reads a value the model allows).

use std::cell::RefCell;
use std::rc::Rc;

use qcow2_core::engine::{FileRequest, Resolver};
use qcow2_core::{Buffers, Error, Image};

use crate::crash::{Event, Log, SimDevice, SimError, Survivors, check_refcounts, crash_state};
use crate::{Scratch, qemu_img};

/// The model's unit: every operation the generators make starts and ends on a multiple of it.
pub const CELL: usize = 128;

/// The engine image the power-loss tests open.
pub type Img =
    Image<SimDevice, Vec<u8>, qcow2_alloc::AllocDecompressor, 16, 8, qcow2_core::WriteState>;

/// Supplies the (read-only) backing file.
#[derive(Debug)]
pub struct Backing(pub Option<Vec<u8>>, pub Log);

impl Resolver<SimDevice> for Backing {
    fn backing_file(&mut self, _r: FileRequest<'_>) -> Result<SimDevice, Error<SimError>> {
        let data = self
            .0
            .clone()
            .ok_or(Error::Unavailable { what: "no backing" })?;
        Ok(SimDevice {
            data,
            id: 2,
            log: self.1.clone(),
            read_only: true,
        })
    }
    fn data_file(&mut self, _r: FileRequest<'_>) -> Result<SimDevice, Error<SimError>> {
        Err(Error::Unavailable {
            what: "no data file",
        })
    }
    /// Encrypted images of the power-loss tests are made with [`PASSPHRASE`].
    fn passphrase(&mut self, _depth: usize) -> Option<&[u8]> {
        Some(PASSPHRASE)
    }
}

/// The passphrase of every encrypted image the power-loss tests make.
pub const PASSPHRASE: &[u8] = b"crash-test";

pub fn buffers(small: bool) -> Buffers<Vec<u8>> {
    Buffers {
        bounce: vec![0u8; if small { 512 } else { 65536 }],
        metadata: vec![0u8; if small { 8 * 512 } else { 8 * 4096 }],
    }
}

/// A 256-bit set of byte values.
#[derive(Debug, Clone, Copy, Default)]
pub struct Values([u64; 4]);

impl Values {
    pub fn add(&mut self, v: u8) {
        self.0[(v >> 6) as usize] |= 1 << (v & 63);
    }
    pub fn has(&self, v: u8) -> bool {
        self.0[(v >> 6) as usize] & (1 << (v & 63)) != 0
    }
}

pub fn verify(state: &[u8], base: &Option<Vec<u8>>, allowed: &[Values], what: &str) -> Vec<u8> {
    let version = u32::from_be_bytes(state[4..8].try_into().unwrap());
    let dirty = version >= 3 && u64::from_be_bytes(state[72..80].try_into().unwrap()) & 1 != 0;
    let mut bytes = state.to_vec();
    if dirty {
        // Lazy refcounts: the writable open rebuilds the refcounts first.
        let image = open_writable_bytes(&bytes, base)
            .unwrap_or_else(|e| panic!("{what}: writable open of the dirty image: {e}"));
        bytes = image.close().unwrap().data;
    }
    let report = check_refcounts(&bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        report.corruptions.is_empty(),
        "{what}: {:?}",
        report.corruptions
    );
    let mut image = open_read_only(&bytes, base).unwrap_or_else(|e| panic!("{what}: open: {e}"));
    let mut sector = vec![0u8; 256 * CELL];
    for chunk in 0..allowed.len().div_ceil(256) {
        let n = (allowed.len() - chunk * 256).min(256);
        let buf = &mut sector[..n * CELL];
        image
            .read_at((chunk * 256 * CELL) as u64, buf)
            .unwrap_or_else(|e| panic!("{what}: read: {e}"));
        for i in 0..n {
            let s = &buf[i * CELL..(i + 1) * CELL];
            let idx = chunk * 256 + i;
            assert!(
                s.iter().all(|&b| b == s[0]) && allowed[idx].has(s[0]),
                "{what}: bytes at {:#x} read {:?}.. which is neither their old nor their new data",
                idx * CELL,
                &s[..8]
            );
        }
    }
    bytes
}

pub fn seeds() -> u64 {
    std::env::var("QCOW2_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4)
}

pub fn states_of(initial: &[u8], f: impl FnOnce(SimDevice)) -> Vec<(Vec<u8>, String)> {
    let log: Log = Rc::new(RefCell::new(Vec::new()));
    f(SimDevice {
        data: initial.to_vec(),
        id: 0,
        log: log.clone(),
        read_only: false,
    });
    let events = log.borrow().clone();
    let mut out = Vec::new();
    for k in 0..=events.len() {
        if k > 0
            && !matches!(
                events[k - 1],
                Event::Write { dev: 0, .. } | Event::Flush { dev: 0 }
            )
        {
            continue;
        }
        let mut kinds = vec![Survivors::None, Survivors::All];
        for r in 0..seeds() {
            kinds.push(Survivors::Random((k as u64) << 8 | r));
        }
        for s in kinds {
            let (state, tail) = crash_state(initial, &events, 0, k, &s);
            if tail == 0 && !matches!(s, Survivors::None) {
                continue;
            }
            out.push((state, format!("crash after event {k} ({s:?})")));
        }
    }
    out
}

pub fn open_recorded(dev: SimDevice, base: Option<Vec<u8>>) -> Img {
    let log = dev.log.clone();
    Image::open_writable(
        dev,
        buffers(false),
        qcow2_alloc::AllocDecompressor::default(),
        &mut Backing(base, log),
    )
    .unwrap()
}

/// One allowed value per cell: the one `content` holds (each cell of it uniform).
pub fn exactly(content: &[u8]) -> Vec<Values> {
    content
        .chunks(CELL)
        .map(|cell| {
            assert!(cell.iter().all(|&b| b == cell[0]), "cells must be uniform");
            let mut v = Values::default();
            v.add(cell[0]);
            v
        })
        .collect()
}

/// Checks one crash state ([`verify`]) and, with `sample`, runs `qemu-img check` on what was checked too,
/// which must find no corruption (leaks allowed).
pub fn verify_sampled(
    s: &Scratch,
    state: &[u8],
    base: &Option<Vec<u8>>,
    allowed: &[Values],
    what: &str,
    sample: bool,
) -> Vec<u8> {
    let checked = verify(state, base, allowed, what);
    if sample {
        let path = s.path("state.qcow2");
        std::fs::write(&path, &checked).unwrap();
        let out = qemu_img(["check".as_ref(), path.as_os_str()]);
        assert!(
            matches!(out.code, Some(0) | Some(3)),
            "{what}: qemu-img check reports corruption:\n{}",
            out.describe()
        );
    }
    checked
}

pub fn open_read_only(bytes: &[u8], base: &Option<Vec<u8>>) -> Result<Img, Error<SimError>> {
    let log: Log = Rc::new(RefCell::new(Vec::new()));
    let dev = SimDevice {
        data: bytes.to_vec(),
        id: 0,
        log: log.clone(),
        read_only: true,
    };
    Image::open(
        dev,
        buffers(false),
        qcow2_alloc::AllocDecompressor::default(),
        &mut Backing(base.clone(), log),
    )
}

/// Opens a copy of `bytes` for writing (with `base` as its backing file), unrecorded: what a writer that
/// finds the image after a power loss does (a dirty image's refcounts are rebuilt).
pub fn open_writable_bytes(bytes: &[u8], base: &Option<Vec<u8>>) -> Result<Img, Error<SimError>> {
    let log: Log = Rc::new(RefCell::new(Vec::new()));
    let dev = SimDevice {
        data: bytes.to_vec(),
        id: 0,
        log: log.clone(),
        read_only: false,
    };
    Image::open_writable(
        dev,
        buffers(false),
        qcow2_alloc::AllocDecompressor::default(),
        &mut Backing(base.clone(), log),
    )
}

/// An image a resize is tried on under power loss ([`resize_states`]).
#[derive(Debug)]
pub struct ResizeCase {
    pub name: &'static str,
    pub opts: &'static str,
    pub size: u64,
    pub new_size: u64,
    /// Over a 4 MiB backing file full of data (longer than the image).
    pub backing: bool,
    /// With an internal snapshot, then a write over it.
    pub snapshot: bool,
    /// Every third 16 KiB piece compressed.
    pub compressed: bool,
}

/// Makes `c`'s image (data one byte value per 16 KiB, the last sector written, a freed cluster left inside the
/// file), runs `resize` on it through the recording device, and checks every crash state: it opens, its
/// refcounts are consistent (a sample through `qemu-img check` too), and it is the old disk (old size, old
/// data) or the new one (new size, the old data, zeros after); the last one the new one. Returns how many
/// states it checked.
pub fn resize_states(c: &ResizeCase, resize: impl FnOnce(&mut Img)) -> usize {
    use crate::{guest_view, qemu_img_ok, qemu_io_cmds};
    let s = Scratch::new();
    let img = s.path("r.qcow2");
    let mut base_bytes = None;
    if c.backing {
        let base = s.qcow2("base.qcow2", "", 4 << 20);
        qemu_io_cmds(&base, "qcow2", &["write -P 0x33 0 4M".to_string()]);
        base_bytes = Some(std::fs::read(&base).unwrap());
        s.create(
            "r.qcow2",
            "qcow2",
            c.opts,
            c.size,
            Some(("base.qcow2", "qcow2")),
        );
    } else {
        s.qcow2("r.qcow2", c.opts, c.size);
    }
    let mut cmds = Vec::new();
    let mut at = 0;
    while at + 4096 <= c.size {
        let flag = if c.compressed && (at / 16384) % 3 == 0 {
            "-c "
        } else {
            ""
        };
        cmds.push(format!(
            "write {flag}-P {} {at} 4096",
            (at / 16384) % 250 + 1
        ));
        at += 16384;
    }
    cmds.push(format!("write -P 0x77 {} 512", c.size - 512));
    cmds.push("discard 16k 4k".to_string());
    qemu_io_cmds(&img, "qcow2", &cmds);
    if c.snapshot {
        qemu_img_ok(["snapshot", "-c", "one", img.to_str().unwrap()]);
        qemu_io_cmds(&img, "qcow2", &["write -P 0xee 2M 64k".to_string()]);
    }
    let initial = std::fs::read(&img).unwrap();
    let old = guest_view(&img);
    let mut new = old.clone();
    new.resize(c.new_size as usize, 0);
    let (old_cells, new_cells) = (exactly(&old), exactly(&new));
    let log_base = base_bytes.clone();
    let states = states_of(&initial, |dev| {
        let mut image = open_recorded(dev, log_base);
        resize(&mut image);
        image.close().unwrap();
    });
    let last = states.len() - 1;
    for (i, (state, what)) in states.iter().enumerate() {
        let what = format!("resize {}: {what}", c.name);
        let size = u64::from_be_bytes(state[24..32].try_into().unwrap());
        let allowed = if size == c.size && i != last {
            &old_cells
        } else if size == c.new_size {
            &new_cells
        } else {
            panic!("{what}: virtual size {size} is neither the old nor the new one");
        };
        verify_sampled(
            &s,
            state,
            &base_bytes,
            allowed,
            &what,
            i == last || i % 29 == 0,
        );
    }
    eprintln!("resize {}: {} crash states", c.name, states.len());
    states.len()
}
