//! An independent reader of persistent dirty bitmaps (the bitmaps header extension, the directory, the
//! tables and the bitmap data), for comparing what our writes leave with what QEMU's leave: each bitmap's
//! name, flags, granularity and the set of its dirty bits.

use std::collections::BTreeSet;

/// The bitmaps header extension's magic.
const EXT_BITMAPS: u32 = 0x2385_2875;
/// Bitmap flag: in use (not saved consistently).
pub const IN_USE: u32 = 1;
/// Bitmap flag: enabled (tracks writes).
pub const AUTO: u32 = 2;

/// One persistent bitmap as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    pub name: String,
    pub flags: u32,
    pub granularity_bits: u8,
    /// Dirty bits (bit `i` covers guest bytes `i << granularity_bits` onwards), up to the disk's end.
    pub bits: BTreeSet<u64>,
}

fn u32_at(d: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(d[at..at + 4].try_into().unwrap())
}

fn u64_at(d: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(d[at..at + 8].try_into().unwrap())
}

/// The bitmaps of the qcow2 image `img` (empty when the autoclear bit or the extension is missing).
pub fn decode(img: &[u8]) -> Vec<Bitmap> {
    if u32_at(img, 4) < 3 || u64_at(img, 88) & 1 == 0 {
        return Vec::new();
    }
    let cs = 1u64 << u32_at(img, 20);
    let disk = u64_at(img, 24);
    let mut at = u32_at(img, 100) as usize;
    let (count, dir) = loop {
        let (kind, len) = (u32_at(img, at), u32_at(img, at + 4) as usize);
        if kind == 0 {
            return Vec::new();
        }
        if kind == EXT_BITMAPS {
            break (u32_at(img, at + 8), u64_at(img, at + 24) as usize);
        }
        at += 8 + len.next_multiple_of(8);
    };
    let mut out = Vec::new();
    let mut e = dir;
    for _ in 0..count {
        let table = u64_at(img, e) as usize;
        let table_size = u32_at(img, e + 8) as usize;
        let flags = u32_at(img, e + 12);
        let granularity_bits = img[e + 17];
        let name_len = u16::from_be_bytes([img[e + 18], img[e + 19]]) as usize;
        let extra = u32_at(img, e + 20) as usize;
        let name =
            String::from_utf8_lossy(&img[e + 24 + extra..e + 24 + extra + name_len]).into_owned();
        let total = disk.div_ceil(1 << granularity_bits);
        let per_entry = cs * 8;
        let mut bits = BTreeSet::new();
        for t in 0..table_size {
            let word = u64_at(img, table + 8 * t);
            let base = t as u64 * per_entry;
            let end = (base + per_entry).min(total);
            if word == 1 {
                bits.extend(base..end);
            } else if word & 0x00ff_ffff_ffff_fe00 != 0 {
                let data = (word & 0x00ff_ffff_ffff_fe00) as usize;
                for b in base..end {
                    let k = (b - base) as usize;
                    if img[data + k / 8] >> (k % 8) & 1 != 0 {
                        bits.insert(b);
                    }
                }
            }
        }
        out.push(Bitmap {
            name,
            flags,
            granularity_bits,
            bits,
        });
        e += (24 + name_len + extra).next_multiple_of(8);
    }
    out
}

/// The bits a bitmap of granularity `1 << granularity_bits` gains from a write of guest bytes
/// `[offset, offset + len)` on a disk of `disk` bytes.
pub fn bits_of(
    granularity_bits: u8,
    offset: u64,
    len: u64,
    disk: u64,
) -> impl Iterator<Item = u64> {
    let end = (offset + len).min(disk);
    if end > offset {
        (offset >> granularity_bits)..((end - 1) >> granularity_bits) + 1
    } else {
        0..0
    }
}
