//! Malformed-image generator, in the spirit of QEMU's iotests 080 (header and table validation) and 060
//! (overlaps, the corrupt bit).
//!
//! Each [`Case`] starts from a valid image made by qemu-img ([`Base`]) and edits its bytes in pure Rust
//! ([`Image`]); a few cases add more files next to it (backing loops, deep chains). [`Case::expect`] records,
//! per operation (`info`, `map`, `convert -O raw`, `io -c 'read 0 64k'`), whether our tool must refuse the
//! image ([`Expect::Error`]), must read it ([`Expect::Ok`], output equal to QEMU's where QEMU succeeds too)
//! or may do either ([`Expect::Either`], where refusing early is as good as QEMU's lazier behaviour).
//! Whatever the expectation, where QEMU refuses our tool must refuse too.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::{Scratch, qemu_img_ok, qemu_io_cmds, text, write_at};

// Header field offsets (big-endian).
pub const MAGIC: usize = 0;
pub const VERSION: usize = 4;
pub const BACKING_FILE_OFFSET: usize = 8;
pub const BACKING_FILE_SIZE: usize = 16;
pub const CLUSTER_BITS: usize = 20;
pub const SIZE: usize = 24;
pub const CRYPT_METHOD: usize = 32;
pub const L1_SIZE: usize = 36;
pub const L1_TABLE_OFFSET: usize = 40;
pub const REFCOUNT_TABLE_OFFSET: usize = 48;
pub const REFCOUNT_TABLE_CLUSTERS: usize = 56;
pub const NB_SNAPSHOTS: usize = 60;
pub const SNAPSHOTS_OFFSET: usize = 64;
pub const INCOMPATIBLE_FEATURES: usize = 72;
pub const COMPATIBLE_FEATURES: usize = 80;
pub const AUTOCLEAR_FEATURES: usize = 88;
pub const REFCOUNT_ORDER: usize = 96;
pub const HEADER_LENGTH: usize = 100;
pub const COMPRESSION_TYPE: usize = 104;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_F857;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;

pub const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L2_COMPRESSED: u64 = 1 << 62;
pub const L2_COPIED: u64 = 1 << 63;
pub const L2_ZERO: u64 = 1;

/// The bytes of a qcow2 image, with accessors for the fields the generator edits. Panics on images it does
/// not understand: it is only ever given valid images made by qemu-img (or edits of them).
#[derive(Debug, Clone)]
pub struct Image {
    pub bytes: Vec<u8>,
}

impl Image {
    pub fn u8(&self, off: usize) -> u8 {
        self.bytes[off]
    }
    pub fn u32(&self, off: usize) -> u32 {
        u32::from_be_bytes(self.bytes[off..off + 4].try_into().unwrap())
    }
    pub fn u64(&self, off: usize) -> u64 {
        u64::from_be_bytes(self.bytes[off..off + 8].try_into().unwrap())
    }
    fn grow_to(&mut self, end: usize) {
        if self.bytes.len() < end {
            self.bytes.resize(end, 0);
        }
    }
    pub fn set_u8(&mut self, off: usize, v: u8) {
        self.grow_to(off + 1);
        self.bytes[off] = v;
    }
    pub fn set_u32(&mut self, off: usize, v: u32) {
        self.grow_to(off + 4);
        self.bytes[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_u64(&mut self, off: usize, v: u64) {
        self.grow_to(off + 8);
        self.bytes[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }
    pub fn put(&mut self, off: usize, data: &[u8]) {
        self.grow_to(off + data.len());
        self.bytes[off..off + data.len()].copy_from_slice(data);
    }

    pub fn version(&self) -> u32 {
        self.u32(VERSION)
    }
    pub fn cluster_bits(&self) -> u32 {
        self.u32(CLUSTER_BITS)
    }
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits()
    }
    pub fn header_length(&self) -> usize {
        if self.version() >= 3 {
            self.u32(HEADER_LENGTH) as usize
        } else {
            72
        }
    }
    pub fn incompatible(&self) -> u64 {
        if self.version() >= 3 {
            self.u64(INCOMPATIBLE_FEATURES)
        } else {
            0
        }
    }
    pub fn set_incompatible(&mut self, bits: u64) {
        self.set_u64(INCOMPATIBLE_FEATURES, bits);
    }
    pub fn extended_l2(&self) -> bool {
        self.incompatible() & INCOMPAT_EXTL2 != 0
    }
    pub fn l1_offset(&self) -> u64 {
        self.u64(L1_TABLE_OFFSET)
    }
    pub fn l1_size(&self) -> u32 {
        self.u32(L1_SIZE)
    }
    /// File offset of L1 entry `i`.
    pub fn l1_entry_pos(&self, i: u64) -> usize {
        (self.l1_offset() + 8 * i) as usize
    }
    /// Host offset of the L2 table for guest cluster `guest_cluster` (panics if unallocated).
    pub fn l2_table_for(&self, guest_cluster: u64) -> u64 {
        let entries = self.l2_entries();
        let l1 = self.u64(self.l1_entry_pos(guest_cluster / entries)) & L1_OFFSET_MASK;
        assert_ne!(
            l1, 0,
            "base image has no L2 table for guest cluster {guest_cluster}"
        );
        l1
    }
    /// L2 entries a table (cluster_size / 8, or / 16 with extended L2).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2() { 16 } else { 8 }
    }
    /// File offset of the (first word of the) L2 entry of guest cluster `guest_cluster`.
    pub fn l2_entry_pos(&self, guest_cluster: u64) -> usize {
        let entries = self.l2_entries();
        let width = if self.extended_l2() { 16 } else { 8 };
        (self.l2_table_for(guest_cluster) + width * (guest_cluster % entries)) as usize
    }
    pub fn l2_entry(&self, guest_cluster: u64) -> u64 {
        self.u64(self.l2_entry_pos(guest_cluster))
    }
    pub fn set_l2_entry(&mut self, guest_cluster: u64, v: u64) {
        let p = self.l2_entry_pos(guest_cluster);
        self.set_u64(p, v);
    }
    /// Extended L2 only: the subcluster bitmap of guest cluster `guest_cluster`.
    pub fn set_l2_bitmap(&mut self, guest_cluster: u64, v: u64) {
        assert!(self.extended_l2());
        let p = self.l2_entry_pos(guest_cluster) + 8;
        self.set_u64(p, v);
    }

    /// End of the header extension area (backing file name, or end of cluster 0).
    fn ext_area_end(&self) -> usize {
        match self.u64(BACKING_FILE_OFFSET) {
            0 => self.cluster_size() as usize,
            b => b as usize,
        }
    }

    /// The header extensions (type, data), end marker excluded.
    pub fn extensions(&self) -> Vec<(u32, Vec<u8>)> {
        let mut v = Vec::new();
        let mut off = self.header_length();
        let end = self.ext_area_end();
        while off + 8 <= end {
            let ty = self.u32(off);
            let len = self.u32(off + 4) as usize;
            if ty == EXT_END {
                break;
            }
            v.push((ty, self.bytes[off + 8..off + 8 + len].to_vec()));
            off += 8 + len.div_ceil(8) * 8;
        }
        v
    }

    /// The backing file name, if any.
    pub fn backing_name(&self) -> Option<Vec<u8>> {
        let off = self.u64(BACKING_FILE_OFFSET) as usize;
        let len = self.u32(BACKING_FILE_SIZE) as usize;
        (off != 0).then(|| self.bytes[off..off + len].to_vec())
    }

    /// Rewrites the header extensions and the backing file name after the header, in cluster 0, the way
    /// QEMU lays them out (extensions padded to 8, end marker, then the name).
    pub fn rewrite_cluster0(&mut self, exts: &[(u32, Vec<u8>)], backing: Option<&[u8]>) {
        let start = self.header_length();
        let cs = self.cluster_size() as usize;
        let mut area = Vec::new();
        for (ty, data) in exts {
            area.extend_from_slice(&ty.to_be_bytes());
            area.extend_from_slice(&(data.len() as u32).to_be_bytes());
            area.extend_from_slice(data);
            area.resize(area.len().div_ceil(8) * 8, 0);
        }
        area.extend_from_slice(&[0; 8]);
        let name_off = start + area.len();
        if let Some(name) = backing {
            area.extend_from_slice(name);
        }
        assert!(
            start + area.len() <= cs,
            "header extensions overflow cluster 0"
        );
        self.bytes[start..cs].fill(0);
        self.put(start, &area);
        match backing {
            Some(name) => {
                self.set_u64(BACKING_FILE_OFFSET, name_off as u64);
                self.set_u32(BACKING_FILE_SIZE, name.len() as u32);
            }
            None => {
                self.set_u64(BACKING_FILE_OFFSET, 0);
                self.set_u32(BACKING_FILE_SIZE, 0);
            }
        }
    }

    /// Sets (or removes) the backing file name and its format extension.
    pub fn set_backing(&mut self, name: Option<&str>, format: Option<&str>) {
        let mut exts: Vec<_> = self
            .extensions()
            .into_iter()
            .filter(|(t, _)| *t != EXT_BACKING_FORMAT)
            .collect();
        if let Some(f) = format {
            exts.insert(0, (EXT_BACKING_FORMAT, f.as_bytes().to_vec()));
        }
        self.rewrite_cluster0(&exts, name.map(str::as_bytes));
    }

    /// Appends a feature name table entry (type 0 incompatible, 1 compatible, 2 autoclear).
    pub fn add_feature_name(&mut self, ty: u8, bit: u8, name: &str) {
        let mut exts = self.extensions();
        let mut entry = vec![0u8; 48];
        entry[0] = ty;
        entry[1] = bit;
        entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
        match exts.iter_mut().find(|(t, _)| *t == EXT_FEATURE_TABLE) {
            Some((_, data)) => data.extend_from_slice(&entry),
            None => exts.push((EXT_FEATURE_TABLE, entry)),
        }
        let backing = self.backing_name();
        self.rewrite_cluster0(&exts, backing.as_deref());
    }

    pub fn write_to(&self, path: &Path) {
        std::fs::write(path, &self.bytes)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

/// The valid images the cases start from. All are 4 MiB virtual, 64 KiB clusters unless said otherwise,
/// with guest data in the first 64 KiB (so `read 0 64k` touches an allocated cluster) and an L2 table for
/// guest clusters 0..8191.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// compat=1.1; data in guest clusters 0, 1 and 16 (pattern 0x5a / 0x6b).
    V3,
    /// compat=0.10, same data.
    V2,
    /// compat=1.1, cluster 0 and 1 deflate-compressed (text), converted with `qemu-img convert -c`.
    Compressed,
    /// compat=1.1, extended_l2=on: subclusters 0..3 of cluster 0 written, subcluster 8 zeroed.
    ExtL2,
}

pub const BASE_SIZE: u64 = 4 << 20;

/// Builds a base image with qemu-img / qemu-io in `scratch` and returns its bytes.
pub fn build_base(base: Base, scratch: &Scratch) -> Image {
    let name = format!("base-{base:?}.qcow2");
    let path = match base {
        Base::V3 | Base::V2 => {
            let compat = if base == Base::V3 { "1.1" } else { "0.10" };
            let p = scratch.qcow2(
                &name,
                &format!("compat={compat},cluster_size=65536"),
                BASE_SIZE,
            );
            qemu_io_cmds(
                &p,
                "qcow2",
                &[
                    "write -P 0x5a 0 69632".to_string(),
                    "write -P 0x6b 1048576 4096".to_string(),
                ],
            );
            p
        }
        Base::Compressed => {
            let raw = scratch.path("base-src.raw");
            write_at(&raw, 0, &text(7, 128 * 1024));
            write_at(&raw, BASE_SIZE - 4096, &text(8, 4096));
            let p = scratch.path(&name);
            qemu_img_ok([
                "convert".as_ref(),
                "-c".as_ref(),
                "-f".as_ref(),
                "raw".as_ref(),
                "-O".as_ref(),
                "qcow2".as_ref(),
                "-o".as_ref(),
                "cluster_size=65536".as_ref(),
                raw.as_os_str(),
                p.as_os_str(),
            ]);
            p
        }
        Base::ExtL2 => {
            let p = scratch.qcow2(&name, "extended_l2=on,cluster_size=65536", BASE_SIZE);
            qemu_io_cmds(
                &p,
                "qcow2",
                &[
                    "write -P 0x5a 0 8192".to_string(),
                    "write -z 16384 2048".to_string(),
                ],
            );
            p
        }
    };
    Image {
        bytes: std::fs::read(&path).expect("read base"),
    }
}

/// What our tool must do with a case, per operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Non-zero exit with exactly one line on stderr.
    Error,
    /// Success, with output equal to QEMU's where QEMU succeeds too.
    Ok,
    /// Either of the above (QEMU is lazier than a careful reader has to be).
    Either,
}

/// The operations run on every case, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `info FILE` (human)
    Info,
    /// `map FILE` (human)
    Map,
    /// `convert -O raw FILE OUT`
    Convert,
    /// `io -c 'read 0 64k' FILE`
    Io,
}

pub const OPS: [Op; 4] = [Op::Info, Op::Map, Op::Convert, Op::Io];

/// Extra files a case writes next to its image.
#[derive(Debug)]
pub struct Ctx<'a> {
    /// The directory the image lives in (for absolute names).
    pub dir: &'a Path,
    /// The base image, unedited.
    pub base: &'a Image,
    /// (file name, bytes) written next to the image.
    pub extra: Vec<(String, Vec<u8>)>,
}

/// One malformed image.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub name: &'static str,
    pub base: Base,
    pub edit: fn(&mut Image, &mut Ctx),
    /// Expected outcome of [info, map, convert, io].
    pub expect: [Expect; 4],
    /// Why the expectation is what it is.
    pub note: &'static str,
}

/// File name of the case's image inside its directory.
pub const IMAGE_NAME: &str = "image.qcow2";

impl Case {
    pub fn expect(&self, op: Op) -> Expect {
        self.expect[OPS.iter().position(|o| *o == op).unwrap()]
    }

    /// Builds the case in `scratch`; returns the path of the image to open.
    pub fn build(&self, scratch: &Scratch) -> PathBuf {
        let base = build_base(self.base, scratch);
        let mut img = base.clone();
        let mut ctx = Ctx {
            dir: scratch.dir(),
            base: &base,
            extra: Vec::new(),
        };
        (self.edit)(&mut img, &mut ctx);
        for (name, bytes) in &ctx.extra {
            std::fs::write(scratch.path(name), bytes).expect("write extra file");
        }
        let path = scratch.path(IMAGE_NAME);
        img.write_to(&path);
        path
    }
}

use Expect::{Either as E, Error as X, Ok as K};

const ALL_ERR: [Expect; 4] = [X, X, X, X];
const ALL_OK: [Expect; 4] = [K, K, K, K];
/// The header opens (info works) but the data path must fail.
const INFO_OK_DATA_ERR: [Expect; 4] = [K, X, X, X];
/// info is fine or refused early; everything that reads the backing chain must fail.
const BACKING_REFUSED: [Expect; 4] = [E, X, X, X];

macro_rules! case {
    ($name:literal, $base:ident, $expect:expr, $note:literal, |$img:ident, $ctx:ident| $body:block) => {
        Case {
            name: $name,
            base: Base::$base,
            edit: {
                #[allow(unused_variables)]
                fn edit($img: &mut Image, $ctx: &mut Ctx) $body
                edit
            },
            expect: $expect,
            note: $note,
        }
    };
}

/// Every case. At least 35; names are unique and used as test names.
pub fn cases() -> Vec<Case> {
    vec![
        // ---- header (iotests 080)
        case!(
            "bad_magic",
            V3,
            [K, K, K, K],
            "not a qcow2 image: probed as raw, as qemu-img does",
            |img, ctx| {
                img.set_u32(MAGIC, 0x5146_49fc);
            }
        ),
        case!(
            "version_1",
            V3,
            ALL_ERR,
            "qcow v1 is not supported",
            |img, ctx| {
                img.set_u32(VERSION, 1);
            }
        ),
        case!("version_4", V3, ALL_ERR, "unknown version", |img, ctx| {
            img.set_u32(VERSION, 4);
        }),
        case!(
            "cluster_bits_8",
            V3,
            ALL_ERR,
            "cluster size below 512",
            |img, ctx| {
                img.set_u32(CLUSTER_BITS, 8);
            }
        ),
        case!(
            "cluster_bits_22",
            V3,
            ALL_ERR,
            "cluster size above 2 MiB",
            |img, ctx| {
                img.set_u32(CLUSTER_BITS, 22);
            }
        ),
        case!(
            "cluster_bits_63",
            V3,
            ALL_ERR,
            "shift overflow bait",
            |img, ctx| {
                img.set_u32(CLUSTER_BITS, 63);
            }
        ),
        case!(
            "header_length_too_small",
            V3,
            ALL_ERR,
            "v3 header_length < 104",
            |img, ctx| {
                img.set_u32(HEADER_LENGTH, 72);
            }
        ),
        case!(
            "header_length_too_big",
            V3,
            ALL_ERR,
            "header_length > cluster size",
            |img, ctx| {
                img.set_u32(HEADER_LENGTH, 65536 + 8);
            }
        ),
        case!(
            "header_length_unaligned",
            V3,
            [E, E, E, E],
            "header_length not a multiple of 8: extensions start misaligned",
            |img, ctx| {
                img.set_u32(HEADER_LENGTH, 105);
            }
        ),
        case!(
            "backing_file_offset_past_cluster",
            V3,
            ALL_ERR,
            "backing name must be in cluster 0",
            |img, ctx| {
                img.set_u64(BACKING_FILE_OFFSET, 65536 + 512);
                img.set_u32(BACKING_FILE_SIZE, 8);
            }
        ),
        case!(
            "backing_name_too_long",
            V3,
            ALL_ERR,
            "backing name > 1023 bytes",
            |img, ctx| {
                let name = "b".repeat(2000);
                img.set_backing(Some(&name), Some("qcow2"));
            }
        ),
        case!(
            "backing_format_too_long",
            V3,
            ALL_ERR,
            "backing format extension of 16 bytes or more",
            |img, ctx| {
                img.set_backing(Some("backing.qcow2"), Some("qcow2qcow2qcow2qcow2"));
            }
        ),
        case!(
            "refcount_order_7",
            V3,
            ALL_ERR,
            "refcount width 128 bits",
            |img, ctx| {
                img.set_u32(REFCOUNT_ORDER, 7);
            }
        ),
        case!(
            "refcount_table_clusters_0",
            V3,
            ALL_ERR,
            "empty refcount table",
            |img, ctx| {
                img.set_u32(REFCOUNT_TABLE_CLUSTERS, 0);
            }
        ),
        case!(
            "refcount_table_clusters_huge",
            V3,
            ALL_ERR,
            "refcount table beyond QEMU's 8 MiB limit",
            |img, ctx| {
                img.set_u32(REFCOUNT_TABLE_CLUSTERS, 0x00ff_ffff);
            }
        ),
        case!(
            "refcount_table_unaligned",
            V3,
            ALL_ERR,
            "refcount table offset not cluster aligned",
            |img, ctx| {
                let off = img.u64(REFCOUNT_TABLE_OFFSET);
                img.set_u64(REFCOUNT_TABLE_OFFSET, off + 512);
            }
        ),
        case!(
            "refcount_table_past_eof",
            V3,
            [E, E, E, E],
            "refcount table far beyond the end of the file",
            |img, ctx| {
                img.set_u64(REFCOUNT_TABLE_OFFSET, 1 << 40);
            }
        ),
        case!(
            "l1_size_too_small",
            V3,
            ALL_ERR,
            "L1 does not cover the virtual size",
            |img, ctx| {
                img.set_u32(L1_SIZE, 0);
            }
        ),
        case!(
            "l1_size_huge",
            V3,
            ALL_ERR,
            "L1 beyond QEMU's 32 MiB limit",
            |img, ctx| {
                img.set_u32(L1_SIZE, 0x1000_0000);
            }
        ),
        case!(
            "virtual_size_huge",
            V3,
            ALL_ERR,
            "2^62 bytes with the old L1: L1 too small / image too big",
            |img, ctx| {
                img.set_u64(SIZE, 1 << 62);
            }
        ),
        case!(
            "l1_offset_unaligned",
            V3,
            ALL_ERR,
            "L1 not cluster aligned",
            |img, ctx| {
                let off = img.l1_offset();
                img.set_u64(L1_TABLE_OFFSET, off + 8);
            }
        ),
        case!(
            "l1_past_eof",
            V3,
            [K, E, E, E],
            "L1 beyond the end of the file: reads fail",
            |img, ctx| {
                img.set_u64(L1_TABLE_OFFSET, 1 << 40);
            }
        ),
        case!(
            "l1_overlaps_header",
            V3,
            [E, E, E, E],
            "L1 at offset 0: its entries are the header's bytes",
            |img, ctx| {
                img.set_u64(L1_TABLE_OFFSET, 0);
            }
        ),
        case!(
            "l1_entry_unaligned",
            V3,
            INFO_OK_DATA_ERR,
            "L2 table offset not cluster aligned",
            |img, ctx| {
                let p = img.l1_entry_pos(0);
                let v = img.u64(p);
                img.set_u64(p, v + 512);
            }
        ),
        case!(
            "l1_entry_reserved_bits",
            V3,
            [K, E, E, E],
            "reserved bits set in an L1 entry",
            |img, ctx| {
                let p = img.l1_entry_pos(0);
                let v = img.u64(p);
                img.set_u64(p, v | 0x0100_0000_0000_0000);
            }
        ),
        case!(
            "l2_table_past_eof",
            V3,
            [K, E, E, E],
            "L1 entry points far past the end of the file",
            |img, ctx| {
                let p = img.l1_entry_pos(0);
                img.set_u64(p, L2_COPIED | (1 << 40));
            }
        ),
        // ---- L2 entries (iotests 060)
        case!(
            "l2_entry_past_eof",
            V3,
            [K, E, E, E],
            "data cluster far past the end of the file",
            |img, ctx| {
                img.set_l2_entry(0, L2_COPIED | (1 << 40));
            }
        ),
        case!(
            "l2_entry_unaligned",
            V3,
            INFO_OK_DATA_ERR,
            "data cluster offset not cluster aligned",
            |img, ctx| {
                let v = img.l2_entry(0);
                img.set_l2_entry(0, v + 512);
            }
        ),
        case!(
            "l2_entry_reserved_bits",
            V3,
            [K, E, E, E],
            "reserved bits 56..61 set in a standard L2 entry",
            |img, ctx| {
                let v = img.l2_entry(0);
                img.set_l2_entry(0, v | (1 << 57));
            }
        ),
        case!(
            "l2_entry_overlaps_header",
            V3,
            [K, E, E, E],
            "data cluster at host offset 0 (the header)",
            |img, ctx| {
                img.set_l2_entry(0, L2_COPIED);
            }
        ),
        case!(
            "zero_flag_in_v2",
            V2,
            INFO_OK_DATA_ERR,
            "the zero flag does not exist in version 2",
            |img, ctx| {
                let v = img.l2_entry(0);
                img.set_l2_entry(0, v | L2_ZERO);
            }
        ),
        case!(
            "compressed_size_overrun",
            Compressed,
            INFO_OK_DATA_ERR,
            "compressed cluster whose sector count runs far past the end of the file",
            |img, ctx| {
                let v = img.l2_entry(0);
                let x = 70 - img.cluster_bits();
                let mask = (1u64 << x) - 1;
                // offset near the end of the file, maximum sector count
                let off = (img.bytes.len() as u64 - 100) & mask;
                let sectors = ((1u64 << (62 - x)) - 1) << x;
                img.set_l2_entry(0, (v & L2_COMPRESSED) | sectors | off);
            }
        ),
        case!(
            "compressed_data_corrupt",
            Compressed,
            INFO_OK_DATA_ERR,
            "compressed cluster whose deflate stream is garbage",
            |img, ctx| {
                let v = img.l2_entry(0);
                assert_ne!(v & L2_COMPRESSED, 0, "base cluster 0 is not compressed");
                let x = 70 - img.cluster_bits();
                let off = (v & ((1u64 << x) - 1)) as usize;
                for (i, b) in img.bytes[off..off + 256].iter_mut().enumerate() {
                    *b = 0xff ^ (i as u8).wrapping_mul(31);
                }
            }
        ),
        case!(
            "compressed_data_truncated",
            Compressed,
            INFO_OK_DATA_ERR,
            "compressed stream ends before the cluster is full",
            |img, ctx| {
                let v = img.l2_entry(0);
                let x = 70 - img.cluster_bits();
                let off = v & ((1u64 << x) - 1);
                // one sector, starting at the stream's start: far too little input for 64 KiB of text
                img.set_l2_entry(0, L2_COMPRESSED | off);
            }
        ),
        case!(
            "compressed_with_copied",
            Compressed,
            [K, X, E, E],
            "COPIED set on a compressed L2 entry",
            |img, ctx| {
                let v = img.l2_entry(0);
                img.set_l2_entry(0, v | L2_COPIED);
            }
        ),
        case!(
            "extl2_alloc_and_zero",
            ExtL2,
            [K, E, X, X],
            "subcluster 0 marked both allocated and zero",
            |img, ctx| {
                img.set_l2_bitmap(0, (1 << 32) | 0xf);
            }
        ),
        case!(
            "extl2_alloc_bits_unallocated",
            ExtL2,
            [K, E, E, E],
            "alloc bits on an unallocated cluster",
            |img, ctx| {
                img.set_l2_entry(2, 0);
                img.set_l2_bitmap(2, 0x3);
            }
        ),
        case!(
            "extl2_small_clusters",
            V3,
            ALL_ERR,
            "extended L2 bit on a 4 KiB-cluster image",
            |img, ctx| {
                img.set_u32(CLUSTER_BITS, 12);
                img.set_incompatible(INCOMPAT_EXTL2);
            }
        ),
        // ---- feature bits (iotests 036)
        case!(
            "unknown_incompatible_bit",
            V3,
            ALL_ERR,
            "incompatible bit 9",
            |img, ctx| {
                img.set_incompatible(1 << 9);
            }
        ),
        case!(
            "unknown_incompatible_bit_named",
            V3,
            ALL_ERR,
            "incompatible bit 9 named in the feature name table",
            |img, ctx| {
                img.set_incompatible(1 << 9);
                img.add_feature_name(0, 9, "test-feature");
            }
        ),
        case!(
            "unknown_incompatible_bit_63",
            V3,
            ALL_ERR,
            "incompatible bit 63",
            |img, ctx| {
                img.set_incompatible(1 << 63);
            }
        ),
        case!(
            "data_file_bit_without_name",
            V3,
            [E, X, X, X],
            "external data file bit but no data file name",
            |img, ctx| {
                img.set_incompatible(INCOMPAT_DATA_FILE);
            }
        ),
        case!(
            "compression_type_unknown",
            V3,
            ALL_ERR,
            "compression_type 2 with the compression bit",
            |img, ctx| {
                img.set_incompatible(INCOMPAT_COMPRESSION);
                img.set_u8(COMPRESSION_TYPE, 2);
            }
        ),
        case!(
            "compression_type_without_bit",
            V3,
            ALL_ERR,
            "compression_type zstd without the incompatible bit",
            |img, ctx| {
                img.set_u8(COMPRESSION_TYPE, 1);
            }
        ),
        case!(
            "crypt_method_1",
            V3,
            [E, X, X, X],
            "legacy AES encryption",
            |img, ctx| {
                img.set_u32(CRYPT_METHOD, 1);
            }
        ),
        case!(
            "crypt_method_2",
            V3,
            ALL_ERR,
            "LUKS without its header",
            |img, ctx| {
                img.set_u32(CRYPT_METHOD, 2);
            }
        ),
        case!(
            "crypt_method_3",
            V3,
            ALL_ERR,
            "unknown encryption",
            |img, ctx| {
                img.set_u32(CRYPT_METHOD, 3);
            }
        ),
        case!(
            "corrupt_bit",
            V3,
            [K, K, K, X],
            "corrupt: readable read-only; qemu-io opens read-write and is refused",
            |img, ctx| {
                img.set_incompatible(INCOMPAT_CORRUPT);
            }
        ),
        case!(
            "dirty_bit",
            V3,
            ALL_OK,
            "dirty: refcounts may be stale, data is fine",
            |img, ctx| {
                img.set_incompatible(INCOMPAT_DIRTY);
            }
        ),
        case!(
            "v2_ignores_feature_fields",
            V2,
            ALL_OK,
            "v2 has no feature fields: bytes 72.. start the extension area (here an end marker)",
            |img, ctx| {
                img.set_u64(INCOMPATIBLE_FEATURES, INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
            }
        ),
        // ---- header extensions
        case!(
            "extension_length_past_cluster",
            V3,
            ALL_ERR,
            "extension length runs past cluster 0",
            |img, ctx| {
                let hl = img.header_length();
                img.set_u32(hl, 0x1234_5678);
                img.set_u32(hl + 4, 0x0010_0000);
            }
        ),
        case!(
            "extension_length_max",
            V3,
            ALL_ERR,
            "extension length u32::MAX (overflow bait)",
            |img, ctx| {
                let hl = img.header_length();
                img.set_u32(hl, 0x1234_5678);
                img.set_u32(hl + 4, u32::MAX);
            }
        ),
        // ---- snapshots (iotests 080, 261)
        case!(
            "snapshot_count_huge",
            V3,
            ALL_ERR,
            "nb_snapshots beyond QEMU's 65536",
            |img, ctx| {
                img.set_u32(NB_SNAPSHOTS, u32::MAX);
                img.set_u64(SNAPSHOTS_OFFSET, 0x20_0000);
            }
        ),
        case!(
            "snapshot_table_unaligned",
            V3,
            ALL_ERR,
            "snapshot table offset not cluster aligned",
            |img, ctx| {
                img.set_u32(NB_SNAPSHOTS, 1);
                img.set_u64(SNAPSHOTS_OFFSET, 0x10_0200);
            }
        ),
        case!(
            "snapshot_table_past_eof",
            V3,
            [E, E, E, E],
            "snapshot table far beyond the end of the file",
            |img, ctx| {
                img.set_u32(NB_SNAPSHOTS, 1);
                img.set_u64(SNAPSHOTS_OFFSET, 1 << 40);
            }
        ),
        // ---- backing chains
        case!(
            "backing_missing",
            V3,
            BACKING_REFUSED,
            "backing file does not exist",
            |img, ctx| {
                img.set_backing(Some("does-not-exist.qcow2"), Some("qcow2"));
            }
        ),
        case!(
            "backing_loop",
            V3,
            BACKING_REFUSED,
            "image.qcow2 backs other.qcow2 backs image.qcow2",
            |img, ctx| {
                img.set_backing(Some("other.qcow2"), Some("qcow2"));
                let mut other = ctx.base.clone();
                other.set_backing(Some(IMAGE_NAME), Some("qcow2"));
                ctx.extra.push(("other.qcow2".into(), other.bytes));
            }
        ),
        case!(
            "backing_self",
            V3,
            BACKING_REFUSED,
            "image.qcow2 is its own backing file",
            |img, ctx| {
                img.set_backing(Some(IMAGE_NAME), Some("qcow2"));
            }
        ),
        case!(
            "backing_chain_too_deep",
            V3,
            BACKING_REFUSED,
            "24 backing files: deeper than our limit of 16 (QEMU itself has none)",
            |img, ctx| {
                const DEPTH: usize = 24;
                img.set_backing(Some("layer01.qcow2"), Some("qcow2"));
                for i in 1..=DEPTH {
                    let mut layer = ctx.base.clone();
                    if i < DEPTH {
                        let next = format!("layer{:02}.qcow2", i + 1);
                        layer.set_backing(Some(&next), Some("qcow2"));
                    }
                    ctx.extra.push((format!("layer{i:02}.qcow2"), layer.bytes));
                }
            }
        ),
        case!(
            "backing_json",
            V3,
            BACKING_REFUSED,
            "json: pseudo-protocol backing name (could open any host file)",
            |img, ctx| {
                let secret = ctx.dir.join("secret.raw");
                ctx.extra.push(("secret.raw".into(), vec![0x42; 65536]));
                let name = format!(
                    "json:{{\"driver\":\"raw\",\"file\":{{\"driver\":\"file\",\"filename\":\"{}\"}}}}",
                    secret.display()
                );
                img.set_backing(Some(&name), None);
            }
        ),
        case!(
            "backing_nbd",
            V3,
            BACKING_REFUSED,
            "network backing file",
            |img, ctx| {
                img.set_backing(Some("nbd://127.0.0.1:1/export"), Some("raw"));
            }
        ),
        case!(
            "backing_format_unknown",
            V3,
            BACKING_REFUSED,
            "backing format that no driver has",
            |img, ctx| {
                ctx.extra.push(("backing.raw".into(), vec![0x42; 65536]));
                img.set_backing(Some("backing.raw"), Some("nosuchfmt"));
            }
        ),
    ]
}

/// Looks a case up by name.
pub fn case(name: &str) -> Case {
    cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no malformed case named {name}"))
}

/// The command lines of one operation: (ours, qemu's tool, qemu's arguments).
fn op_args(op: Op, img: &Path, scratch: &Scratch) -> (Vec<std::ffi::OsString>, &'static str) {
    let i = img.as_os_str().to_owned();
    match op {
        Op::Info => (vec!["info".into(), i], "qemu-img"),
        Op::Map => (vec!["map".into(), i], "qemu-img"),
        Op::Convert => (
            vec![
                "convert".into(),
                "-O".into(),
                "raw".into(),
                i,
                scratch.path("converted.raw").into(),
            ],
            "qemu-img",
        ),
        Op::Io => (
            vec!["io".into(), "-c".into(), "read 0 64k".into(), i],
            "qemu-io",
        ),
    }
}

/// How long QEMU gets on a malformed image before it counts as refusing it (it hangs on some).
pub const QEMU_MALFORMED_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Runs one operation with QEMU's tool; for `convert`, the output goes to `converted-qemu.raw`. A run
/// killed after [`QEMU_MALFORMED_TIMEOUT`] comes back unsuccessful with `timed_out` set.
pub fn run_qemu_op(op: Op, img: &Path, scratch: &Scratch) -> crate::Output {
    let (mut args, tool) = op_args(op, img, scratch);
    if op == Op::Convert {
        *args.last_mut().unwrap() = scratch.path("converted-qemu.raw").into();
    }
    let skip = usize::from(tool == "qemu-io");
    let refs: Vec<&std::ffi::OsStr> = args[skip..].iter().map(|a| a.as_os_str()).collect();
    crate::run_qemu_tool_limited(tool, &refs, QEMU_MALFORMED_TIMEOUT)
}

/// Runs one operation with our tool; for `convert`, the output goes to `converted-ours.raw`.
pub fn run_our_op(op: Op, img: &Path, scratch: &Scratch) -> crate::Output {
    let (mut args, _) = op_args(op, img, scratch);
    if op == Op::Convert {
        *args.last_mut().unwrap() = scratch.path("converted-ours.raw").into();
    }
    crate::qcow2(&args)
}

/// Builds the case and checks every operation against its expectation and against QEMU. Panics with the
/// list of every violation.
pub fn run_case(name: &str) {
    let case = case(name);
    let scratch = Scratch::new();
    let img = case.build(&scratch);
    let mut failures = Vec::new();
    for op in OPS {
        // Ours first: qemu-io opens read-write and may repair (dirty bit) what it opens. QEMU runs only
        // when ours succeeds: a refusal needs no reference, and QEMU hangs on some of these images.
        let ours = run_our_op(op, &img, &scratch);
        let expect = case.expect(op);
        let what = format!("case {} ({}), {op:?}", case.name, case.note);
        if ours.success() {
            if expect == Expect::Error {
                failures.push(format!(
                    "{what}: expected a clean error, ours succeeded:\n{}",
                    ours.describe()
                ));
                continue;
            }
            let qemu = run_qemu_op(op, &img, &scratch);
            if !qemu.success() {
                failures.push(format!(
                    "{what}: qemu refuses this but ours succeeded:\nqemu: {}\nours: {}",
                    qemu.describe(),
                    ours.describe()
                ));
            } else if let Err(e) = compare_success(op, &ours, &qemu, &scratch) {
                failures.push(format!("{what}: {e}"));
            }
        } else {
            if expect == Expect::Ok {
                failures.push(format!(
                    "{what}: expected success, ours failed:\n{}",
                    ours.describe()
                ));
            }
            if let Err(e) = crate::check_one_line_stderr(&ours) {
                failures.push(format!("{what}: {e}"));
            }
        }
    }
    // Ours only: check, then a write on the image (what a unikernel would do with it). A clean error, or a
    // write that reads back; never a panic or a hang.
    let check = crate::qcow2([OsStr::new("check"), img.as_os_str()]);
    if !matches!(check.code, Some(0..=3) | Some(63)) {
        failures.push(format!(
            "case {}: check ended with {:?}:\n{}",
            case.name,
            check.code,
            check.describe()
        ));
    }
    let write = crate::qcow2([
        OsStr::new("io"),
        OsStr::new("-c"),
        OsStr::new("write -P 0x5a 0 512"),
        img.as_os_str(),
    ]);
    if write.success() {
        let read = crate::qcow2([
            OsStr::new("io"),
            OsStr::new("-r"),
            OsStr::new("-c"),
            OsStr::new("read -P 0x5a 0 512"),
            img.as_os_str(),
        ]);
        let text = read.stdout_str() + &read.stderr_str();
        if !read.success() || text.contains("Pattern verification failed") {
            failures.push(format!(
                "case {}: the write was accepted but does not read back:\n{}",
                case.name,
                read.describe()
            ));
        }
    } else if let Err(e) = crate::check_one_line_stderr(&write) {
        failures.push(format!("case {}, write: {e}", case.name));
    }
    let slowest = [check.elapsed, write.elapsed]
        .into_iter()
        .max()
        .unwrap_or_default();
    eprintln!(
        "case {}: check exit {:?}, write {}, slowest of the two {:.0?}",
        case.name,
        check.code,
        if write.success() {
            "accepted"
        } else {
            "refused"
        },
        slowest
    );
    assert!(
        failures.is_empty(),
        "{} violation(s):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

fn compare_success(
    op: Op,
    ours: &crate::Output,
    qemu: &crate::Output,
    scratch: &Scratch,
) -> Result<(), String> {
    let (o, q) = match op {
        Op::Info => {
            let mut o = ours.stdout_str();
            if !crate::qemu_prints_like_10() {
                o = crate::drop_child_node_sections(&o);
            }
            (
                crate::drop_disk_size_lines(&o),
                crate::drop_disk_size_lines(&qemu.stdout_str()),
            )
        }
        Op::Map => (ours.stdout_str(), qemu.stdout_str()),
        Op::Io => (
            crate::drop_timing_lines(&ours.stdout_str()),
            crate::drop_timing_lines(&qemu.stdout_str()),
        ),
        Op::Convert => {
            let a = std::fs::read(scratch.path("converted-ours.raw")).map_err(|e| e.to_string())?;
            let b = std::fs::read(scratch.path("converted-qemu.raw")).map_err(|e| e.to_string())?;
            return match crate::bytes_diff(&a, &b) {
                None => Ok(()),
                Some(d) => Err(d),
            };
        }
    };
    if o == q {
        Ok(())
    } else {
        Err(format!(
            "output differs from qemu's\n===== ours =====\n{o}\n===== qemu =====\n{q}"
        ))
    }
}
