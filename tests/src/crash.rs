//! Power-loss simulation: a block device that records every write and flush, crash states built from that
//! record (any subset of the writes since the last completed flush, multi-sector writes torn at sector
//! granularity), and an independent reference counter that says whether a crash state is consistent.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use qcow2_core::format::{
    ClusterKind, Header, IncompatibleFeatures, L1Entry, L2Entry, L2Format, refcount_get,
};
use qcow2_core::{BlockDevice, BlockDeviceWrite};

/// Sector size of the simulated device.
pub const SECTOR: usize = 512;

/// One thing that happened on a device.
#[derive(Debug, Clone)]
pub enum Event {
    /// A write of whole sectors.
    Write {
        /// Which device (0 = the image, 1 = its external data file).
        dev: u8,
        /// Byte offset.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// A completed flush of one device.
    Flush {
        /// Which device.
        dev: u8,
    },
    /// The harness starts guest operation `n`.
    OpStart(usize),
    /// Guest operation `n` completed.
    OpEnd(usize),
}

/// A shared event record.
pub type Log = Rc<RefCell<Vec<Event>>>;

/// An in-memory device that records what is done to it.
#[derive(Debug)]
pub struct SimDevice {
    /// Current content.
    pub data: Vec<u8>,
    /// Which device this is, in the log.
    pub id: u8,
    /// The record (shared with the harness).
    pub log: Log,
    /// Writes are refused (a backing file).
    pub read_only: bool,
}

/// Error of [`SimDevice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimError;

impl std::fmt::Display for SimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("simulated device error")
    }
}

impl BlockDevice for SimDevice {
    type Error = SimError;
    fn block_size(&self) -> usize {
        SECTOR
    }
    fn size(&mut self) -> Result<u64, SimError> {
        Ok(self.data.len() as u64)
    }
    fn read_blocks(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), SimError> {
        let start = (lba as usize) * SECTOR;
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.data.get(start + i).copied().unwrap_or(0);
        }
        Ok(())
    }
}

impl BlockDeviceWrite for SimDevice {
    fn write_blocks(&mut self, lba: u64, buf: &[u8]) -> Result<(), SimError> {
        if self.read_only {
            return Err(SimError);
        }
        let start = (lba as usize) * SECTOR;
        if self.data.len() < start + buf.len() {
            self.data.resize(start + buf.len(), 0);
        }
        self.data[start..start + buf.len()].copy_from_slice(buf);
        self.log.borrow_mut().push(Event::Write {
            dev: self.id,
            offset: start as u64,
            data: buf.to_vec(),
        });
        Ok(())
    }
    fn flush(&mut self) -> Result<(), SimError> {
        self.log.borrow_mut().push(Event::Flush { dev: self.id });
        Ok(())
    }
    /// A file that grows is recorded as a write of zeros over the new part (durable at the next flush, like
    /// any write); one that shrinks is not recorded: the engine only trims what holds nothing (free clusters
    /// past the last used one).
    fn set_size(&mut self, len: u64) -> Result<bool, SimError> {
        if self.read_only {
            return Err(SimError);
        }
        let (old, new) = (self.data.len(), len as usize);
        if new > old {
            let start = old / SECTOR * SECTOR;
            let mut grown = self.data[start..].to_vec();
            grown.resize(new.div_ceil(SECTOR) * SECTOR - start, 0);
            self.write_blocks((start / SECTOR) as u64, &grown)?;
        }
        self.data.resize(new, 0);
        Ok(true)
    }
    /// Recorded as a write of zeros (a discarded range may read as zeros, or keep its bytes if lost).
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), SimError> {
        let start = offset as usize;
        let end = (start + len as usize).min(self.data.len());
        if start >= end {
            return Ok(());
        }
        let zeros = vec![0u8; end - start];
        let lba = start / SECTOR;
        if !start.is_multiple_of(SECTOR) || !zeros.len().is_multiple_of(SECTOR) {
            return Ok(());
        }
        self.write_blocks(lba as u64, &zeros)
    }
}

/// A small deterministic generator for choosing subsets.
#[derive(Debug, Clone)]
pub struct Pick(pub u64);

impl Pick {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Which writes of the unflushed tail survive a crash.
#[derive(Debug, Clone)]
pub enum Survivors {
    /// None of them.
    None,
    /// All of them.
    All,
    /// A pseudo-random subset, with some multi-sector writes torn (a random subset of their sectors).
    Random(u64),
}

/// The content of device `dev` after a crash right after event `k`: the initial bytes, every write up to that
/// device's last flush before `k`, and `survivors` of the writes after it. Returns the bytes and how many
/// writes were in the unflushed tail.
pub fn crash_state(
    initial: &[u8],
    events: &[Event],
    dev: u8,
    k: usize,
    survivors: &Survivors,
) -> (Vec<u8>, usize) {
    let events = &events[..k.min(events.len())];
    let last_flush = events
        .iter()
        .rposition(|e| matches!(e, Event::Flush { dev: d } if *d == dev));
    let mut out = initial.to_vec();
    let apply = |out: &mut Vec<u8>, offset: u64, data: &[u8]| {
        let start = offset as usize;
        if out.len() < start + data.len() {
            out.resize(start + data.len(), 0);
        }
        out[start..start + data.len()].copy_from_slice(data);
    };
    let split = last_flush.map_or(0, |i| i + 1);
    for e in &events[..split] {
        if let Event::Write {
            dev: d,
            offset,
            data,
        } = e
            && *d == dev
        {
            apply(&mut out, *offset, data);
        }
    }
    let tail: Vec<(u64, &Vec<u8>)> = events[split..]
        .iter()
        .filter_map(|e| match e {
            Event::Write {
                dev: d,
                offset,
                data,
            } if *d == dev => Some((*offset, data)),
            _ => None,
        })
        .collect();
    match survivors {
        Survivors::None => {}
        Survivors::All => {
            for (offset, data) in &tail {
                apply(&mut out, *offset, data);
            }
        }
        Survivors::Random(seed) => {
            let mut p = Pick(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
            for (offset, data) in &tail {
                match p.next_u64() % 4 {
                    0 => {}
                    1 if data.len() > SECTOR => {
                        // Torn: some of its sectors reach the medium.
                        for (i, sector) in data.chunks(SECTOR).enumerate() {
                            if p.next_u64().is_multiple_of(2) {
                                apply(&mut out, offset + (i * SECTOR) as u64, sector);
                            }
                        }
                    }
                    _ => apply(&mut out, *offset, data),
                }
            }
        }
    }
    (out, tail.len())
}

fn be64(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    match b.get(at..at + 8) {
        Some(s) => u64::from_be_bytes(s.try_into().unwrap()),
        None => 0,
    }
}

fn be32(b: &[u8], at: u64) -> u32 {
    let at = at as usize;
    match b.get(at..at + 4) {
        Some(s) => u32::from_be_bytes(s.try_into().unwrap()),
        None => 0,
    }
}

/// What the reference counter found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RefReport {
    /// Clusters whose refcount is below their number of references (with their numbers).
    pub corruptions: Vec<String>,
    /// Clusters with a refcount above their references.
    pub leaks: usize,
}

/// Counts references to every host cluster of the qcow2 image `img` (active L1/L2, snapshots and their
/// tables, refcount structures) and compares them with the stored refcounts; also checks COPIED flags in
/// the active tables and that every entry decodes. Written independently of the engine's write path.
pub fn check_refcounts(img: &[u8]) -> Result<RefReport, String> {
    let h = Header::parse(img).map_err(|e| format!("header: {e:?}"))?;
    let cs = h.cluster_size();
    let cb = h.cluster_bits;
    let external = h
        .incompatible_features
        .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE);
    let fmt = L2Format {
        cluster_bits: cb,
        v3: h.version >= 3,
        extended: h.extended_l2(),
        external_data: external,
    };
    let mut refs: HashMap<u64, u64> = HashMap::new();
    let mut report = RefReport::default();
    let add_range = |refs: &mut HashMap<u64, u64>, start: u64, len: u64| {
        if len == 0 {
            return;
        }
        for c in (start >> cb)..=((start + len - 1) >> cb) {
            *refs.entry(c).or_default() += 1;
        }
    };
    add_range(&mut refs, 0, cs);
    // The LUKS area of an encrypted image (the full-disk-encryption header extension: offset, length).
    if h.version >= 3 || h.crypt_method == 2 {
        let mut at = if h.version >= 3 {
            u64::from(h.header_length)
        } else {
            72
        };
        while at + 8 <= cs.min(img.len() as u64) {
            let magic = u32::from_be_bytes(img[at as usize..at as usize + 4].try_into().unwrap());
            let len = u64::from(u32::from_be_bytes(
                img[at as usize + 4..at as usize + 8].try_into().unwrap(),
            ));
            if magic == 0 {
                break;
            }
            if magic == 0x0537_be77 && len == 16 {
                add_range(&mut refs, be64(img, at + 8), be64(img, at + 16));
            }
            at += 8 + len.div_ceil(8) * 8;
        }
    }
    add_range(&mut refs, h.l1_table_offset, u64::from(h.l1_size) * 8);
    add_range(
        &mut refs,
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
    );
    // Refcount blocks.
    let rt_entries = u64::from(h.refcount_table_clusters) * cs / 8;
    let mut blocks = Vec::new();
    for i in 0..rt_entries {
        let e = be64(img, h.refcount_table_offset + i * 8);
        let off = e & !0x1ff;
        if e & 0x1ff != 0 {
            return Err(format!("refcount table entry {i} has reserved bits"));
        }
        if off != 0 {
            if !off.is_multiple_of(cs) {
                return Err(format!("refcount block {i} unaligned"));
            }
            add_range(&mut refs, off, cs);
        }
        blocks.push(off);
    }
    let order = h.refcount_order;
    let block_bits = cb + 3 - order;
    let refcount = |c: u64| -> u64 {
        let b = *blocks.get((c >> block_bits) as usize).unwrap_or(&0);
        if b == 0 {
            return 0;
        }
        let idx = (c & ((1 << block_bits) - 1)) as usize;
        let end = (b + cs) as usize;
        match img.get(b as usize..end) {
            Some(block) => refcount_get(block, order, idx).unwrap_or(0),
            // A block past the end of the file reads as zeros.
            None => {
                let mut block = vec![0u8; cs as usize];
                let have = img.len().saturating_sub(b as usize);
                if have > 0 {
                    block[..have].copy_from_slice(&img[b as usize..]);
                }
                refcount_get(&block, order, idx).unwrap_or(0)
            }
        }
    };
    // One L1 table and everything below it.
    let walk_l1 = |refs: &mut HashMap<u64, u64>,
                   l1: u64,
                   l1_size: u64,
                   active: bool,
                   copied_errors: &mut Vec<(u64, bool, &'static str)>|
     -> Result<(), String> {
        for i in 0..l1_size {
            let e = L1Entry(be64(img, l1 + i * 8));
            let l2 = e
                .l2_offset(cs)
                .map_err(|_| format!("L1 entry {i} is invalid"))?;
            let Some(l2) = l2 else { continue };
            add_range(refs, l2, cs);
            if active {
                copied_errors.push((l2, e.copied(), "L1"));
            }
            let esize = h.l2_entry_size();
            for j in 0..h.l2_entries() {
                let at = l2 + j * esize;
                let entry = L2Entry {
                    word: be64(img, at),
                    bitmap: if fmt.extended { be64(img, at + 8) } else { 0 },
                };
                let kind = entry
                    .classify(fmt)
                    .map_err(|_| format!("L2 entry at {at:#x} is invalid"))?;
                match kind {
                    ClusterKind::Data { host } | ClusterKind::Zero { host: Some(host) }
                        if !external =>
                    {
                        add_range(refs, host, cs);
                        if active {
                            copied_errors.push((host, entry.copied(), "L2"));
                        }
                    }
                    ClusterKind::Compressed(d) => {
                        add_range(refs, d.offset, d.len);
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    };
    let mut copied = Vec::new();
    walk_l1(
        &mut refs,
        h.l1_table_offset,
        u64::from(h.l1_size),
        true,
        &mut copied,
    )?;
    // Snapshots.
    let mut at = h.snapshots_offset;
    let mut unused = Vec::new();
    for _ in 0..h.nb_snapshots {
        let l1 = be64(img, at);
        let l1_size = u64::from(be32(img, at + 8));
        let id_len = u64::from(be32(img, at + 12) >> 16);
        let name_len = u64::from(be32(img, at + 12) & 0xffff);
        let extra = u64::from(be32(img, at + 36));
        add_range(&mut refs, l1, l1_size * 8);
        walk_l1(&mut refs, l1, l1_size, false, &mut unused)?;
        at = (at + 40 + extra + id_len + name_len).next_multiple_of(8);
    }
    if h.nb_snapshots > 0 {
        add_range(&mut refs, h.snapshots_offset, at - h.snapshots_offset);
    }
    let mut clusters: Vec<_> = refs.iter().map(|(c, r)| (*c, *r)).collect();
    clusters.sort();
    for (c, r) in &clusters {
        let rc = refcount(*c);
        if rc < *r {
            report
                .corruptions
                .push(format!("cluster {c}: refcount {rc} < references {r}"));
        }
    }
    for (host, flag, table) in copied {
        let rc = refcount(host >> cb);
        if (rc == 1) != flag {
            report.corruptions.push(format!(
                "{table} entry for {host:#x}: COPIED={flag} with refcount {rc}"
            ));
        }
    }
    // Leaks: any cluster below the end of the file with a refcount but no reference.
    let file_clusters = (img.len() as u64).div_ceil(cs);
    for c in 0..file_clusters
        .max(rt_entries << block_bits)
        .min(file_clusters + 4096)
    {
        if !refs.contains_key(&c) && refcount(c) > 0 {
            report.leaks += 1;
        }
    }
    Ok(report)
}
