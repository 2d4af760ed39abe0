//! The write engine against qemu-io: the same random write, zero and discard sequences applied by the engine
//! (through `qcow2-core` directly) and by qemu-io to copies of one image give the same guest content, and
//! `qemu-img check` finds no corruption and no leak in what the engine wrote.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use qcow2_core::engine::{FileRequest, Resolver};
use qcow2_core::{Error, Image};
use qcow2_hosted::file::FileDevice;
use qcow2_tests::ops::{Op, ops, twin_images};
use qcow2_tests::{Scratch, qemu_img, qemu_img_ok, qemu_io_cmds};

/// Opens backing files read-only, relative to the top image's directory.
struct DirResolver(PathBuf);

impl Resolver<FileDevice> for DirResolver {
    fn backing_file(
        &mut self,
        request: FileRequest<'_>,
    ) -> Result<FileDevice, Error<std::io::Error>> {
        let name = String::from_utf8_lossy(request.name).to_string();
        Ok(FileDevice::new(File::open(self.0.join(name))?))
    }
    fn data_file(&mut self, request: FileRequest<'_>) -> Result<FileDevice, Error<std::io::Error>> {
        let name = String::from_utf8_lossy(request.name).to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.0.join(name))?;
        Ok(FileDevice::new(file))
    }
}

fn apply_ours(img: &Path, ops: &[Op]) {
    let file = OpenOptions::new().read(true).write(true).open(img).unwrap();
    let dir = img.parent().unwrap().to_path_buf();
    let mut image: qcow2_alloc::HeapImage<FileDevice> = Image::open_writable(
        FileDevice::new(file),
        qcow2_alloc::buffers(),
        qcow2_alloc::AllocDecompressor::default(),
        &mut DirResolver(dir),
    )
    .unwrap_or_else(|e| panic!("open_writable {}: {e}", img.display()));
    for op in ops {
        let res = match op {
            Op::Write { off, len, byte } => image.write_at(*off, &vec![*byte; *len as usize]),
            Op::Zero { off, len, unmap } => image.write_zeroes(*off, *len, *unmap),
            Op::Discard { off, len } => image.discard(*off, *len),
            Op::Flush => image.flush(),
        };
        res.unwrap_or_else(|e| panic!("{op:?} on {}: {e}", img.display()));
    }
    image.close().unwrap();
}

/// The same with firmware-sized buffers: a 512-byte bounce block (so copies go through a 512-byte stack
/// chunk) and four 512-byte metadata slices (so dirty slices are written back under pressure all the time).
fn apply_small(img: &Path, ops: &[Op]) {
    let file = OpenOptions::new().read(true).write(true).open(img).unwrap();
    let dir = img.parent().unwrap().to_path_buf();
    let buffers = qcow2_core::Buffers {
        bounce: vec![0u8; 512],
        metadata: vec![0u8; 4 * 512],
    };
    let mut image: Image<
        FileDevice,
        Vec<u8>,
        qcow2_alloc::AllocDecompressor,
        16,
        4,
        qcow2_core::WriteState,
    > = Image::open_writable(
        FileDevice::new(file),
        buffers,
        qcow2_alloc::AllocDecompressor::default(),
        &mut DirResolver(dir),
    )
    .unwrap_or_else(|e| panic!("open_writable {}: {e}", img.display()));
    for op in ops {
        let res = match op {
            Op::Write { off, len, byte } => image.write_at(*off, &vec![*byte; *len as usize]),
            Op::Zero { off, len, unmap } => image.write_zeroes(*off, *len, *unmap),
            Op::Discard { off, len } => image.discard(*off, *len),
            Op::Flush => image.flush(),
        };
        res.unwrap_or_else(|e| panic!("{op:?} on {} (small buffers): {e}", img.display()));
    }
    image.close().unwrap();
}

fn raw(scratch: &Scratch, img: &Path, name: &str) -> Vec<u8> {
    let out = scratch.path(name);
    qemu_img_ok([
        "convert".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        img.as_os_str(),
        out.as_os_str(),
    ]);
    std::fs::read(out).unwrap()
}

fn assert_check_clean(img: &Path) {
    let out = qemu_img(["check".as_ref(), "--output=json".as_ref(), img.as_os_str()]);
    assert!(
        out.code == Some(0),
        "qemu-img check of {} is not clean:\n{}",
        img.display(),
        out.describe()
    );
}

/// Runs one case: `opts` for the image, an optional backing file made with `backing_opts`, and `setup`
/// qemu-io commands applied before copying.
fn case(name: &str, opts: &str, size: u64, cluster: u64, backing: Option<&str>, setup: &[&str]) {
    let s = Scratch::new();
    let (top, copy) = twin_images(&s, opts, size, backing, setup, name.contains("snapshot"));
    let before = raw(&s, &top, "before.raw");
    for seed in 1..=4u64 {
        let seq = ops(seed ^ size ^ cluster, size, cluster, 40);
        if seed % 2 == 0 {
            apply_small(&top, &seq);
        } else {
            apply_ours(&top, &seq);
        }
        let cmds: Vec<String> = seq.iter().map(Op::qemu_io).collect();
        qemu_io_cmds(&copy, "qcow2", &cmds);
        assert_check_clean(&top);
        let ours = raw(&s, &top, "ours.raw");
        let theirs = raw(&s, &copy, "theirs.raw");
        if let Some(diff) = qcow2_tests::bytes_diff(&ours, &theirs) {
            panic!(
                "{name}, seed {seed}: guest content differs from qemu-io's: {diff}\nops: {seq:?}"
            );
        }
    }
    if name.contains("snapshot") {
        // The snapshot still reads back what it held.
        let snap = s.path("snap.raw");
        qemu_img_ok([
            "convert".as_ref(),
            "-l".as_ref(),
            "snap".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            top.as_os_str(),
            snap.as_os_str(),
        ]);
        assert!(
            std::fs::read(snap).unwrap() == before,
            "{name}: snapshot content changed"
        );
    }
}

#[test]
fn plain_64k() {
    case("plain", "", 8 << 20, 65536, None, &[]);
}

#[test]
fn small_clusters_and_refcount_widths() {
    for (opts, cluster) in [
        ("cluster_size=512", 512),
        ("cluster_size=512,refcount_bits=1", 512),
        ("cluster_size=4096,refcount_bits=8", 4096),
        ("cluster_size=4096,refcount_bits=64", 4096),
        ("cluster_size=1024,refcount_bits=2", 1024),
        ("cluster_size=2048,refcount_bits=4", 2048),
        ("cluster_size=8192,refcount_bits=32", 8192),
    ] {
        case(opts, opts, 2 << 20, cluster, None, &[]);
    }
}

#[test]
fn big_clusters() {
    case("2M", "cluster_size=2M", 16 << 20, 2 << 20, None, &[]);
}

#[test]
fn compat_010() {
    case("v2", "compat=0.10", 4 << 20, 65536, None, &[]);
    case("v2 backing", "compat=0.10", 4 << 20, 65536, Some(""), &[]);
}

#[test]
fn extended_l2() {
    case(
        "extl2",
        "extended_l2=on,cluster_size=64k",
        8 << 20,
        65536,
        None,
        &[],
    );
    case(
        "extl2 backing",
        "extended_l2=on,cluster_size=32k",
        4 << 20,
        32768,
        Some(""),
        &[],
    );
}

#[test]
fn backing_chain() {
    case("backing", "", 4 << 20, 65536, Some(""), &[]);
    case(
        "backing 4k",
        "cluster_size=4096",
        2 << 20,
        4096,
        Some("cluster_size=65536"),
        &[],
    );
}

#[test]
fn compressed_clusters() {
    case(
        "compressed",
        "",
        4 << 20,
        65536,
        None,
        &["write -c -P 0x33 0 1M", "write -c -P 0x44 2M 512k"],
    );
}

#[test]
fn lazy_refcounts() {
    case("lazy", "lazy_refcounts=on", 4 << 20, 65536, None, &[]);
}

#[test]
fn snapshot_shared() {
    case(
        "snapshot",
        "",
        4 << 20,
        65536,
        None,
        &["write -P 0x55 0 3M", "write -c -P 0x66 3M 512k"],
    );
    case(
        "snapshot extl2",
        "extended_l2=on",
        4 << 20,
        65536,
        None,
        &["write -P 0x55 0 3M"],
    );
}

#[test]
fn refcount_table_growth() {
    // 512-byte clusters with 64-bit refcounts: a refcount block covers 64 clusters and the one-cluster
    // refcount table 64 blocks, so writing 8 MiB needs new blocks and a bigger table.
    let s = Scratch::new();
    let img = s.path("g.qcow2");
    qemu_img_ok([
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-o".as_ref(),
        "cluster_size=512,refcount_bits=64".as_ref(),
        img.as_os_str(),
        "16M".as_ref(),
    ]);
    let seq: Vec<Op> = (0..64u64)
        .map(|i| Op::Write {
            off: i * 131072,
            len: 131072,
            byte: (i % 250 + 1) as u8,
        })
        .collect();
    apply_ours(&img, &seq);
    assert_check_clean(&img);
    let data = raw(&s, &img, "g.raw");
    for i in 0..64usize {
        assert!(
            data[i * 131072..(i + 1) * 131072]
                .iter()
                .all(|&b| b == (i % 250 + 1) as u8),
            "chunk {i}"
        );
    }
}

#[test]
fn external_data_file() {
    case("data file", "data_file=data.img", 4 << 20, 65536, None, &[]);
    case(
        "raw data file",
        "data_file=data.img,data_file_raw=on",
        4 << 20,
        65536,
        None,
        &[],
    );
}

fn be64_at(path: &Path, at: u64) -> u64 {
    let d = std::fs::read(path).unwrap();
    u64::from_be_bytes(d[at as usize..at as usize + 8].try_into().unwrap())
}

fn put_be64(path: &Path, at: u64, v: u64) {
    qcow2_tests::write_at(path, at, &v.to_be_bytes());
}

/// Unknown autoclear bits are cleared before the first write; the bitmaps bit stays, and the bitmap gains
/// the bits of the write (and is consistent again after the close).
#[test]
fn autoclear_bits_cleared_before_writing() {
    let s = Scratch::new();
    let img = s.path("bm.qcow2");
    qemu_img_ok(["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"]);
    qemu_img_ok(["bitmap", "--add", img.to_str().unwrap(), "b0"]);
    // A dirty region, so that the bitmap has a data cluster as well as its table and directory.
    qemu_io_cmds(&img, "qcow2", &["write -P 3 1M 1M".to_string()]);
    // An unknown autoclear bit as well.
    put_be64(&img, 88, be64_at(&img, 88) | 1 << 40);
    assert_eq!(be64_at(&img, 88), 1 | 1 << 40);
    apply_ours(
        &img,
        &[Op::Write {
            off: 0,
            len: 65536,
            byte: 7,
        }],
    );
    assert_eq!(be64_at(&img, 88), 1, "autoclear bits after our write");
    assert_check_clean(&img);
    let data = raw(&s, &img, "bm.raw");
    assert!(data[..65536].iter().all(|&b| b == 7));
    assert!(data[1 << 20..2 << 20].iter().all(|&b| b == 3));
    let bitmaps = qcow2_tests::bitmaps::decode(&std::fs::read(&img).unwrap());
    assert_eq!(bitmaps.len(), 1);
    assert_eq!(bitmaps[0].flags, qcow2_tests::bitmaps::AUTO);
    // QEMU's write of 1 MiB at 1 MiB (bits 16 to 31 at 64 KiB a bit), ours at 0.
    assert_eq!(
        bitmaps[0].bits,
        std::iter::once(0u64).chain(16..32).collect()
    );
}

/// An L2 entry that points into the L1 table is caught before the data write: the request fails, the image
/// is marked corrupt, and the L1 table is intact.
#[test]
fn write_into_metadata_marks_corrupt() {
    let s = Scratch::new();
    let img = s.path("c.qcow2");
    qemu_img_ok(["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"]);
    qemu_io_cmds(&img, "qcow2", &["write -P 9 0 64k".to_string()]);
    let l1 = be64_at(&img, 40);
    let l2 = be64_at(&img, l1) & 0x00ff_ffff_ffff_fe00;
    let l1_before = be64_at(&img, l1);
    put_be64(&img, l2, l1 | 1 << 63);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut image: qcow2_alloc::HeapImage<FileDevice> = Image::open_writable(
        FileDevice::new(file),
        qcow2_alloc::buffers(),
        qcow2_alloc::AllocDecompressor::default(),
        &mut DirResolver(s.dir().to_path_buf()),
    )
    .unwrap();
    let err = image.write_at(512, &[1u8; 512]).unwrap_err();
    assert!(
        matches!(err, Error::Corrupt { .. }),
        "expected a corruption error, got {err}"
    );
    assert!(!image.is_writable());
    assert!(matches!(
        image.write_at(0, &[1u8; 512]),
        Err(Error::ReadOnly)
    ));
    drop(image);
    assert_eq!(be64_at(&img, l1), l1_before, "the L1 table was overwritten");
    assert_eq!(be64_at(&img, 72) & 2, 2, "corrupt bit not set");
    let info = qcow2_tests::qemu_img_ok(["info", img.to_str().unwrap()]);
    assert!(info.contains("corrupt: true"), "{info}");
    // The corrupt bit keeps writers away until the image is repaired.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let reopened: Result<qcow2_alloc::HeapImage<FileDevice>, _> = Image::open_writable(
        FileDevice::new(file),
        qcow2_alloc::buffers(),
        qcow2_alloc::AllocDecompressor::default(),
        &mut DirResolver(s.dir().to_path_buf()),
    );
    assert!(matches!(reopened, Err(Error::Corrupt { .. })));
}
/// Lazy refcounts: a writer that stops without closing (as a killed process does: every completed device
/// write is in the file, the cache is lost) leaves a dirty image; the next writable open rebuilds the
/// refcounts, after which `qemu-img check` is clean and every flushed write reads back.
#[test]
fn lazy_refcounts_writer_killed() {
    for small in [false, true] {
        let s = Scratch::new();
        let img = s.path("lazy.qcow2");
        qemu_img_ok([
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-o".as_ref(),
            "lazy_refcounts=on,cluster_size=4096".as_ref(),
            img.as_os_str(),
            "8M".as_ref(),
        ]);
        let size = 8u64 << 20;
        let mut model = vec![0u8; size as usize];
        let flushed = ops(77, size, 4096, 60);
        let unflushed = ops(78, size, 4096, 30);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let buffers = qcow2_core::Buffers {
            bounce: vec![0u8; if small { 512 } else { 65536 }],
            metadata: vec![0u8; if small { 4 * 512 } else { 4 * 4096 }],
        };
        let mut image: Image<
            FileDevice,
            Vec<u8>,
            qcow2_alloc::AllocDecompressor,
            16,
            4,
            qcow2_core::WriteState,
        > = Image::open_writable(
            FileDevice::new(file),
            buffers,
            qcow2_alloc::AllocDecompressor::default(),
            &mut DirResolver(s.dir().to_path_buf()),
        )
        .unwrap();
        let apply = |image: &mut Image<
            FileDevice,
            Vec<u8>,
            qcow2_alloc::AllocDecompressor,
            16,
            4,
            qcow2_core::WriteState,
        >,
                     op: &Op| match op {
            Op::Write { off, len, byte } => {
                image.write_at(*off, &vec![*byte; *len as usize]).unwrap();
            }
            Op::Zero { off, len, unmap } => image.write_zeroes(*off, *len, *unmap).unwrap(),
            Op::Discard { off, len } => image.discard(*off, *len).unwrap(),
            Op::Flush => image.flush().unwrap(),
        };
        for op in &flushed {
            apply(&mut image, op);
        }
        image.flush().unwrap();
        for op in &unflushed {
            apply(&mut image, op);
        }
        // The first burst ends with a flush; only its writes must survive.
        for op in &flushed {
            match op {
                Op::Write { off, len, byte } => {
                    model[*off as usize..(*off + *len) as usize].fill(*byte)
                }
                Op::Zero { off, len, .. } => model[*off as usize..(*off + *len) as usize].fill(0),
                _ => {}
            }
        }
        // Discards before the flush make their range unspecified; track them out of the comparison.
        let discarded: Vec<(u64, u64)> = flushed
            .iter()
            .filter_map(|op| match op {
                Op::Discard { off, len } => Some((*off, *off + *len)),
                _ => None,
            })
            .collect();
        std::mem::forget(image);
        // Reopen for writing: the dirty bit makes it rebuild the refcounts.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let image: qcow2_alloc::HeapImage<FileDevice> = Image::open_writable(
            FileDevice::new(file),
            qcow2_alloc::buffers(),
            qcow2_alloc::AllocDecompressor::default(),
            &mut DirResolver(s.dir().to_path_buf()),
        )
        .unwrap_or_else(|e| panic!("reopening the dirty image: {e}"));
        image.close().unwrap();
        assert_check_clean(&img);
        let data = raw(&s, &img, "lazy.raw");
        // Every range the flushed burst wrote, and the unflushed burst did not touch, reads back.
        let mut later_cover = vec![false; size as usize / 512];
        for (a, b) in unflushed.iter().filter_map(|op| match op {
            Op::Write { off, len, .. } | Op::Zero { off, len, .. } | Op::Discard { off, len } => {
                Some((*off, *off + *len))
            }
            Op::Flush => None,
        }) {
            // A write into a cluster can move the whole cluster: widen to clusters.
            for sector in (a & !4095) / 512..(b.div_ceil(4096) * 4096) / 512 {
                later_cover[sector as usize] = true;
            }
        }
        for (a, b) in discarded {
            for sector in (a & !4095) / 512..(b.div_ceil(4096) * 4096).min(size) / 512 {
                later_cover[sector as usize] = true;
            }
        }
        for (sector, later) in later_cover.iter().enumerate() {
            if *later {
                continue;
            }
            let r = sector * 512..sector * 512 + 512;
            assert!(
                data[r.clone()] == model[r.clone()],
                "small={small}: flushed data lost at sector {sector}"
            );
        }
    }
}

/// A disk whose size is not a multiple of the cluster size: writes into the last, partial cluster copy only
/// what lies inside the disk (found by the create_options fuzz target).
#[test]
fn size_not_a_cluster_multiple() {
    case("unaligned size", "", (4 << 20) + 5120, 65536, None, &[]);
    case(
        "unaligned size, backing",
        "extended_l2=on",
        (2 << 20) + 1536,
        65536,
        Some(""),
        &[],
    );
}
