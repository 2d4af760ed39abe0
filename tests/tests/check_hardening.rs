//! Check, repair and open on images built to find where the tool's walks and limits differ from QEMU's:
//! a persistent bitmap behind thousands of header extensions, extension areas cut short, bitmap directories
//! and tables beyond QEMU's limits, sparse files of terabytes, and repairs of tables that run over the header
//! and over guest data. Each case compares our verdict and exit code with qemu-img's; every run of our tool is
//! bounded by the harness's time limit, so a hang fails instead of hanging.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qcow2_tests::damage::{assert_same, copy, run_pair};
use qcow2_tests::malformed::Image;
use qcow2_tests::{Scratch, qcow2, qemu_img, qemu_img_ok, qemu_io_cmds, run_qemu_tool_limited};

/// An image extension type no one defines (QEMU ignores unknown extensions).
const UNKNOWN_EXT: u32 = 0x7a7a_0001;

fn load(p: &Path) -> Image {
    Image {
        bytes: std::fs::read(p).unwrap(),
    }
}

/// A 64 MiB image with data in a few clusters and one persistent bitmap made by qemu-img.
fn with_bitmap(s: &Scratch, name: &str) -> PathBuf {
    let p = s.qcow2(name, "cluster_size=65536", 64 << 20);
    qemu_io_cmds(
        &p,
        "qcow2",
        &[
            "write -P 0x11 0 128k".to_string(),
            "write -P 0x22 32M 64k".to_string(),
        ],
    );
    qemu_img_ok([
        "bitmap".as_ref(),
        "--add".as_ref(),
        p.as_os_str(),
        "b0".as_ref(),
    ]);
    // Mark something in the bitmap so that it owns a data cluster, not just its table.
    qemu_img_ok([
        "bitmap".as_ref(),
        "--enable".as_ref(),
        p.as_os_str(),
        "b0".as_ref(),
    ]);
    qemu_io_cmds(&p, "qcow2", &["write -P 0x33 1M 64k".to_string()]);
    p
}

/// qemu-img info's list of bitmap names.
fn qemu_bitmaps(img: &Path) -> Vec<String> {
    let out = qemu_img_ok(["info".as_ref(), "--output=json".as_ref(), img.as_os_str()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| b["name"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The bitmap of [`with_bitmap`] behind `n` empty unknown extensions.
fn bitmap_behind_extensions(s: &Scratch, n: usize) -> PathBuf {
    let p = with_bitmap(s, "bitmap-exts.qcow2");
    let mut img = load(&p);
    let mut exts: Vec<(u32, Vec<u8>)> = vec![(UNKNOWN_EXT, Vec::new()); n];
    exts.extend(img.extensions());
    let backing = img.backing_name();
    img.rewrite_cluster0(&exts, backing.as_deref());
    img.write_to(&p);
    p
}

/// Check and `check -r leaks` agree with qemu-img on a valid image whose bitmap extension comes after 2000
/// unknown extensions (more than the old limits of the check's and the engine's walks), and `-r leaks` leaves
/// the bitmap's clusters alone: qemu-img still finds the image clean and lists the bitmap.
#[test]
fn bitmap_behind_2000_extensions_is_not_leaked() {
    let s = Scratch::new();
    let img = bitmap_behind_extensions(&s, 2000);
    assert_eq!(qemu_bitmaps(&img), ["b0"], "qemu-img must see the bitmap");
    for args in [&[][..], &["--output=json"][..]] {
        let (o, q) = run_pair(args, &copy(&s, &img, "o"), &copy(&s, &img, "q"));
        assert_same(&format!("check {args:?}"), &o, &q, true, true);
        assert_eq!(q.code, Some(0), "{}", q.describe());
    }
    for mode in ["leaks", "all"] {
        let ours = copy(&s, &img, &format!("r-{mode}"));
        let out = qcow2(["check", "-r", mode, ours.to_str().unwrap()]);
        assert_eq!(out.code, Some(0), "check -r {mode}:\n{}", out.describe());
        let after = qemu_img(["check".as_ref(), ours.as_os_str()]);
        assert_eq!(
            after.code,
            Some(0),
            "qemu-img check after our -r {mode}:\n{}",
            after.describe()
        );
        assert_eq!(qemu_bitmaps(&ours), ["b0"], "bitmap lost by -r {mode}");
        assert_eq!(
            std::fs::read(&ours).unwrap(),
            std::fs::read(&img).unwrap(),
            "-r {mode} changed a clean image"
        );
    }
    // A write keeps the bitmap up to date; the image stays clean for qemu-img.
    let w = copy(&s, &img, "w");
    let out = qcow2(["io", "-c", "write -P 0x44 2M 64k", w.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let after = qemu_img(["check".as_ref(), w.as_os_str()]);
    assert_eq!(
        after.code,
        Some(0),
        "after our write:\n{}",
        after.describe()
    );
}

/// The extension walk goes to the end of the first cluster as QEMU's does: an image whose end marker is
/// preceded by as many extensions as fit in 64 KiB opens in both tools, and `info` agrees.
#[test]
fn extensions_filling_the_first_cluster() {
    let s = Scratch::new();
    let p = s.qcow2("full.qcow2", "cluster_size=65536", 1 << 20);
    let mut img = load(&p);
    let room = (65536 - img.header_length() - 8) / 8;
    let mut exts = img.extensions();
    let used: usize = exts.iter().map(|(_, d)| 8 + d.len().div_ceil(8) * 8).sum();
    exts.extend(vec![(UNKNOWN_EXT, Vec::new()); room - used / 8]);
    img.rewrite_cluster0(&exts, None);
    img.write_to(&p);
    let q = qemu_img(["info".as_ref(), "--output=json".as_ref(), p.as_os_str()]);
    let o = qcow2(["info", "--output=json", p.to_str().unwrap()]);
    assert_eq!(
        o.code,
        q.code,
        "ours:\n{}\nqemu-img:\n{}",
        o.describe(),
        q.describe()
    );
    assert_eq!(q.code, Some(0));
    let (o, q) = run_pair(&[], &copy(&s, &p, "o"), &copy(&s, &p, "q"));
    assert_same("check", &o, &q, true, true);
}

/// Extension areas that end inside an extension: where qemu-img refuses the image, so do we, and the
/// reverse.
#[test]
fn extension_area_cut_short() {
    let s = Scratch::new();
    for (name, cut) in [
        ("inside-data", 12u64),
        ("inside-header", 4),
        ("at-end-marker", 8),
    ] {
        let p = s.qcow2(&format!("{name}.qcow2"), "cluster_size=65536", 1 << 20);
        let mut img = load(&p);
        img.rewrite_cluster0(&[(UNKNOWN_EXT, vec![7u8; 16])], Some(b"backing.raw"));
        // The backing file name starts `cut` bytes into the extension area.
        let name_at = img.header_length() as u64 + cut;
        img.put(name_at as usize, b"backing.raw");
        img.set_u64(qcow2_tests::malformed::BACKING_FILE_OFFSET, name_at);
        img.write_to(&p);
        std::fs::write(s.path("backing.raw"), vec![0u8; 1 << 20]).unwrap();
        let q = qemu_img(["info".as_ref(), "-U".as_ref(), p.as_os_str()]);
        let o = qcow2(["info", "-U", p.to_str().unwrap()]);
        assert_eq!(
            o.code,
            q.code,
            "{name}: info verdicts differ\nours:\n{}\nqemu-img:\n{}",
            o.describe(),
            q.describe()
        );
    }
}

/// Sets the bitmap directory entry field at byte `field` of the first entry.
fn edit_first_bitmap_entry(p: &Path, f: impl FnOnce(&mut Image, usize)) {
    let mut img = load(p);
    let (_, data) = img
        .extensions()
        .into_iter()
        .find(|(t, _)| *t == 0x2385_2875)
        .expect("bitmaps extension");
    let dir = u64::from_be_bytes(data[16..24].try_into().unwrap()) as usize;
    f(&mut img, dir);
    img.write_to(p);
}

/// Bitmap directories QEMU's open refuses: every command of ours refuses them too (info, check, a write),
/// at once, and a refused write leaves the image unchanged.
#[test]
fn bitmap_directories_beyond_qemus_constraints() {
    let s = Scratch::new();
    type Edit = fn(&mut Image, usize);
    let cases: [(&str, Edit); 6] = [
        // A table of 2^24 entries with 64 KiB clusters: 1 TiB of bitmap data, over QEMU's 512 MiB.
        ("huge-table", |img, d| img.set_u32(d + 8, 1 << 24)),
        ("granularity-8", |img, d| img.bytes[d + 17] = 8),
        ("granularity-32", |img, d| img.bytes[d + 17] = 32),
        ("reserved-flag", |img, d| img.set_u32(d + 12, 1 << 5)),
        ("extra-data", |img, d| img.set_u32(d + 20, 8)),
        ("unaligned-table", |img, d| {
            let t = img.u64(d);
            img.set_u64(d, t + 512)
        }),
    ];
    let base = with_bitmap(&s, "bm.qcow2");
    for (name, edit) in cases {
        let p = copy(&s, &base, name);
        edit_first_bitmap_entry(&p, edit);
        let before = std::fs::read(&p).unwrap();
        let q = qemu_img(["info".as_ref(), p.as_os_str()]);
        assert_eq!(
            q.code,
            Some(1),
            "{name}: qemu-img info should refuse:\n{}",
            q.describe()
        );
        let o = qcow2(["info", p.to_str().unwrap()]);
        assert_eq!(o.code, q.code, "{name}: info\nours:\n{}", o.describe());
        let (o, q) = run_pair(&[], &copy(&s, &p, "o"), &copy(&s, &p, "q"));
        assert_eq!(
            o.code,
            q.code,
            "{name}: check\nours:\n{}\nqemu:\n{}",
            o.describe(),
            q.describe()
        );
        let o = qcow2(["io", "-c", "write 0 64k", p.to_str().unwrap()]);
        assert_ne!(
            o.code,
            Some(0),
            "{name}: our write must be refused:\n{}",
            o.describe()
        );
        assert!(
            o.stderr_str().contains("bitmap"),
            "{name}: the error should name the bitmap problem:\n{}",
            o.describe()
        );
        assert_eq!(
            std::fs::read(&p).unwrap(),
            before,
            "{name}: refused write changed the image"
        );
    }
}

/// A bitmaps extension claiming 65535 bitmaps over a directory of 64 MiB of small entries, and one claiming
/// more than 65535: both refused at once, as qemu-img refuses them.
#[test]
fn bitmap_directory_with_huge_entry_counts() {
    let s = Scratch::new();
    let base = with_bitmap(&s, "bm.qcow2");
    for (name, nb) in [("max-count", 65535u32), ("over-max", 65536)] {
        let p = copy(&s, &base, name);
        let mut img = load(&p);
        let bpos = {
            // Offset of the bitmaps extension's data in cluster 0.
            let mut off = img.header_length();
            loop {
                let (t, len) = (img.u32(off), img.u32(off + 4) as usize);
                if t == 0x2385_2875 {
                    break off + 8;
                }
                off += 8 + len.div_ceil(8) * 8;
            }
        };
        img.set_u32(bpos, nb);
        // The directory grows to the most QEMU allows; the entries past the first are copies of it.
        let dir = img.u64(bpos + 16) as usize;
        let entry = img.bytes[dir..dir + 32].to_vec();
        let size = 1024 * 65535usize;
        let dir = img.bytes.len().next_multiple_of(65536);
        img.bytes.resize(dir + size, 0);
        for i in 0..(size / 32).min(nb as usize) {
            // Same table, distinct 4-character names (QEMU refuses two bitmaps of one name).
            img.put(dir + i * 32, &entry);
            img.put(dir + i * 32 + 18, &4u16.to_be_bytes());
            img.put(dir + i * 32 + 24, format!("{i:04x}").as_bytes());
        }
        img.set_u64(bpos + 8, (nb as u64 * 32).min(size as u64));
        img.set_u64(bpos + 16, dir as u64);
        img.write_to(&p);
        let before = std::fs::read(&p).unwrap();
        // QEMU loads every bitmap's data when it opens the image: with 65535 valid bitmaps it is still at
        // work after minutes, which means it accepts the image. It refuses an invalid one at once.
        let q = run_qemu_tool_limited(
            "qemu-img",
            &["info".as_ref(), p.as_os_str()],
            Duration::from_secs(10),
        );
        let refused = !q.timed_out && q.code != Some(0);
        let o = qcow2(["info", p.to_str().unwrap()]);
        assert_eq!(
            o.code != Some(0),
            refused,
            "{name}: info verdicts differ\nours:\n{}\nqemu:\n{}",
            o.describe(),
            q.describe()
        );
        assert!(o.elapsed.as_secs() < 5, "{name}: info took {:?}", o.elapsed);
        let c = qcow2(["check", p.to_str().unwrap()]);
        // (Every copied entry names the same table: check reports those shared clusters, as qemu-img would.)
        if refused {
            assert_eq!(c.code, Some(1), "{name}: check\n{}", c.describe());
        }
        assert!(
            c.elapsed.as_secs() < 5,
            "{name}: check took {:?}",
            c.elapsed
        );
        let o = qcow2(["io", "-c", "write 0 64k", p.to_str().unwrap()]);
        assert!(
            o.elapsed.as_secs() < 5,
            "{name}: the write took {:?}",
            o.elapsed
        );
        if refused {
            assert_ne!(
                o.code,
                Some(0),
                "{name}: our write must be refused:\n{}\nqemu-img:\n{}",
                o.describe(),
                q.describe()
            );
            assert_eq!(
                std::fs::read(&p).unwrap(),
                before,
                "{name}: refused write changed the image"
            );
        } else if o.success() {
            // The moved directory left its old cluster leaked; our write kept (or, where it could not,
            // disowned) the bitmaps without damaging anything (no corruption, at most that leak).
            let after = qemu_img(["check".as_ref(), p.as_os_str()]);
            assert!(
                matches!(after.code, Some(0) | Some(3)),
                "{name}: after our write:\n{}",
                after.describe()
            );
        } else {
            // The moved directory has no refcount and every entry names the same table: before its first
            // write the engine refuses such bitmap metadata, changing nothing but the corrupt bit.
            assert!(
                o.stderr_str().contains("bitmap"),
                "{name}: the refusal should name the bitmap structure:\n{}",
                o.describe()
            );
            let mut after = std::fs::read(&p).unwrap();
            let mut was = before.clone();
            after[72..80].fill(0);
            was[72..80].fill(0);
            assert!(after == was, "{name}: a refused write changed the image");
        }
    }
}

/// Check of sparse files of terabytes with 512-byte clusters: past QEMU's limit of INT_MAX clusters both
/// tools refuse at once ("Check failed: File too large"); below it ours ends in a time that follows what the
/// image references (a reference near the end of a 512 GiB file included), with qemu-img's report.
#[test]
fn sparse_terabyte_files() {
    let s = Scratch::new();
    let base = s.qcow2("sparse.qcow2", "cluster_size=512", 1 << 20);
    qemu_io_cmds(&base, "qcow2", &["write -P 0x5a 0 4k".to_string()]);
    for (name, len, reference_near_end) in [
        ("2t", 2u64 << 40, false),
        ("1t", 1 << 40, false),
        ("1023g", 1023 << 30, false),
        ("512g-referenced", 512 << 30, true),
    ] {
        let p = copy(&s, &base, name);
        if reference_near_end {
            // Guest cluster 1 moved to a cluster near the end of the file (its refcount stays 0 there).
            let mut img = load(&p);
            let at = img.l2_entry_pos(1);
            img.set_u64(at, (1 << 63) | (len - 4 * 512));
            img.write_to(&p);
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len)
            .unwrap();
        let outputs: &[&[&str]] = if name == "1023g" {
            &[&[]]
        } else {
            &[&[], &["--output=json"]]
        };
        for args in outputs {
            let (o, q) = run_pair(args, &p, &p);
            assert_same(&format!("{name}: check {args:?}"), &o, &q, true, true);
            if len > (1 << 40) - 512 {
                assert!(
                    q.stderr_str().contains("File too large"),
                    "{}",
                    q.describe()
                );
            }
        }
        if len >= 1 << 40 {
            let head = || {
                let mut b = vec![0u8; 1 << 16];
                let f = std::fs::File::open(&p).unwrap();
                std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 0).unwrap();
                b
            };
            let before = head();
            let o = qcow2(["check", "-r", "all", p.to_str().unwrap()]);
            assert_eq!(o.code, Some(1), "{name}: -r all\n{}", o.describe());
            assert!(
                o.stderr_str().contains("File too large"),
                "{}",
                o.describe()
            );
            assert_eq!(head(), before, "{name}: a refused repair changed the image");
            assert_eq!(std::fs::metadata(&p).unwrap().len(), len);
        }
    }
}

macro_rules! repair_overlap_tests {
    ($($name:ident),* $(,)?) => {
        mod repair_overlap {
            $(
                #[test]
                fn $name() {
                    qcow2_tests::repair_overlap::run_case(stringify!($name));
                }
            )*

            /// Every case has a test above.
            #[test]
            fn every_case_has_a_test() {
                let tested = [$(stringify!($name)),*];
                let cases = qcow2_tests::repair_overlap::cases();
                for c in &cases {
                    assert!(tested.contains(&c.name), "case {} has no test", c.name);
                }
                assert_eq!(tested.len(), cases.len());
            }
        }
    };
}

repair_overlap_tests!(
    l1_entry_reserved_bit_offset_zero,
    l1_entry_copied_offset_zero,
    l1_entry_names_a_data_cluster,
    l1_entry_names_the_refcount_block,
    l1_entry_names_the_l1_table,
    l1_at_qemus_largest_size,
    snapshot_l1_at_qemus_largest_size,
    l1_at_qemus_largest_size_with_snapshot,
);

/// 3000 valid in-use bitmaps whose tables have 8192 entries each (the most QEMU allows with 64 KiB clusters: 512 MiB
/// of bitmap data), each table in a cluster of its own: a write leaves them alone (in use, as QEMU does) in
/// bounded time, and a downgrade to version 2 disowns them all in bounded time (the tables are read a chunk
/// at a time, not an entry per device read); qemu-img finds the image clean after each.
#[test]
fn many_bitmaps_with_large_tables_are_handled_quickly() {
    let s = Scratch::new();
    let p = with_bitmap(&s, "many.qcow2");
    let mut img = load(&p);
    let cs = 65536usize;
    let nb = 3000usize;
    // Bitmaps extension data in cluster 0.
    let ext = {
        let mut off = img.header_length();
        loop {
            let (t, len) = (img.u32(off), img.u32(off + 4) as usize);
            assert_ne!(t, 0, "no bitmaps extension");
            if t == 0x2385_2875 {
                break off + 8;
            }
            off += 8 + len.div_ceil(8) * 8;
        }
    };
    let old_dir = img.u64(ext + 16) as usize;
    let first = img.bytes[old_dir..old_dir + 24].to_vec();
    // New directory and tables after the end of the file, each given refcount 1.
    let dir = img.bytes.len().next_multiple_of(cs);
    let dir_size = nb * 32;
    let dir_clusters = dir_size.div_ceil(cs);
    let tables = dir + dir_clusters * cs;
    img.bytes.resize(tables + nb * cs, 0);
    for i in 0..nb {
        let at = dir + i * 32;
        img.put(at, &first);
        img.set_u64(at, (tables + i * cs) as u64);
        img.set_u32(at + 8, 8192);
        // In use: QEMU does not load its data (a consistent bitmap's table must be exactly the disk's size).
        img.set_u32(at + 12, 1);
        img.put(at + 18, &4u16.to_be_bytes());
        img.put(at + 20, &0u32.to_be_bytes());
        img.put(at + 24, format!("{i:04x}").as_bytes());
    }
    img.set_u32(ext, nb as u32);
    img.set_u64(ext + 8, dir_size as u64);
    img.set_u64(ext + 16, dir as u64);
    // Refcounts: the old directory is now unused, the new clusters used once.
    let reftable = img.u64(qcow2_tests::malformed::REFCOUNT_TABLE_OFFSET) as usize;
    let block = img.u64(reftable) as usize;
    assert!(
        tables / cs + nb < cs / 2,
        "one refcount block covers everything"
    );
    img.put(block + 2 * (old_dir / cs), &0u16.to_be_bytes());
    // And so are the old bitmap's table and the data cluster it names.
    let old_table = u64::from_be_bytes(first[..8].try_into().unwrap()) as usize;
    let old_data = (img.u64(old_table) & 0x00ff_ffff_ffff_fe00) as usize;
    assert_ne!(old_data, 0, "the bitmap owns a data cluster");
    img.put(block + 2 * (old_table / cs), &0u16.to_be_bytes());
    img.put(block + 2 * (old_data / cs), &0u16.to_be_bytes());
    for c in dir / cs..tables / cs + nb {
        img.put(block + 2 * c, &1u16.to_be_bytes());
    }
    img.write_to(&p);
    // The image is valid: qemu-img check agrees with ours (a check reads every table once).
    let (o, q) = run_pair(&[], &copy(&s, &p, "o"), &copy(&s, &p, "q"));
    assert_same("check", &o, &q, true, true);
    assert_eq!(q.code, Some(0), "{}", q.describe());
    let o = qcow2(["io", "-c", "write -P 0x44 2M 64k", p.to_str().unwrap()]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(o.elapsed.as_secs() < 3, "the write took {:?}", o.elapsed);
    let after = qemu_img(["check".as_ref(), p.as_os_str()]);
    assert_eq!(
        after.code,
        Some(0),
        "after our write:\n{}",
        after.describe()
    );
    assert_eq!(qemu_bitmaps(&p).len(), nb, "in-use bitmaps are left alone");
    let o = qcow2(["amend", "-o", "compat=0.10", p.to_str().unwrap()]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(
        o.elapsed.as_secs() < 3,
        "the downgrade took {:?}",
        o.elapsed
    );
    let after = qemu_img(["check".as_ref(), p.as_os_str()]);
    assert_eq!(
        after.code,
        Some(0),
        "after our downgrade:\n{}",
        after.describe()
    );
    assert!(qemu_bitmaps(&p).is_empty());
}
