//! `info` lists persistent bitmaps in the format-specific data exactly as qemu-img does (human and JSON, with
//! and without the backing chain): names, granularities and the "in-use" / "auto" flags, for one bitmap,
//! several, disabled ones, one marked in use, bitmaps behind unknown header extensions, and images whose
//! bitmaps extension is stale (autoclear bit cleared: no bitmaps listed).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use qcow2_tests::malformed::{AUTOCLEAR_FEATURES, Image};
use qcow2_tests::{Scratch, check_info_human, check_info_json, qemu_img_ok, qemu_io_cmds};

const EXT_BITMAPS: u32 = 0x2385_2875;

fn same_as_qemu(img: &Path) {
    for extra in [&[][..], &["--backing-chain"][..]] {
        check_info_human(img, extra);
        check_info_json(img, extra);
    }
}

fn add(img: &Path, name: &str, opts: &[&str]) {
    let mut all: Vec<&OsStr> = vec![OsStr::new("bitmap"), OsStr::new("--add")];
    all.extend(opts.iter().map(OsStr::new));
    all.push(img.as_os_str());
    all.push(OsStr::new(name));
    qemu_img_ok(all);
}

fn image(s: &Scratch, name: &str) -> PathBuf {
    let img = s.qcow2(name, "", 64 << 20);
    qemu_io_cmds(&img, "qcow2", &["write -P 1 0 1M".to_string()]);
    img
}

#[test]
fn one_bitmap() {
    let s = Scratch::new();
    let img = image(&s, "one.qcow2");
    add(&img, "b0", &[]);
    same_as_qemu(&img);
}

#[test]
fn several_bitmaps_with_granularities_and_disabled() {
    let s = Scratch::new();
    let img = image(&s, "several.qcow2");
    add(&img, "first", &[]);
    add(&img, "coarse", &["-g", "1M"]);
    add(&img, "fine-but-disabled", &["-g", "512", "--disable"]);
    add(&img, "a name with spaces", &["-g", "2147483648"]);
    same_as_qemu(&img);
}

#[test]
fn bitmap_marked_in_use() {
    let s = Scratch::new();
    let img = image(&s, "inuse.qcow2");
    add(&img, "busy", &[]);
    add(&img, "idle", &["--disable"]);
    // Set the in-use flag of the first directory entry, as a writer that crashed would leave it.
    let mut i = Image {
        bytes: std::fs::read(&img).unwrap(),
    };
    let (_, data) = i
        .extensions()
        .into_iter()
        .find(|(t, _)| *t == EXT_BITMAPS)
        .expect("bitmaps extension");
    let dir = u64::from_be_bytes(data[16..24].try_into().unwrap()) as usize;
    let flags = i.u32(dir + 12);
    i.set_u32(dir + 12, flags | 1);
    i.write_to(&img);
    same_as_qemu(&img);
}

#[test]
fn bitmaps_in_a_backing_chain_and_behind_unknown_extensions() {
    let s = Scratch::new();
    let base = image(&s, "base.qcow2");
    add(&base, "in-base", &["-g", "128k"]);
    // Unknown extensions before the bitmaps extension.
    let mut i = Image {
        bytes: std::fs::read(&base).unwrap(),
    };
    let mut exts = i.extensions();
    for k in 0..40u32 {
        exts.insert(0, (0x7000_0000 + k, vec![k as u8; 13]));
    }
    let backing = i.backing_name();
    i.rewrite_cluster0(&exts, backing.as_deref());
    i.write_to(&base);
    let top = s.create(
        "top.qcow2",
        "qcow2",
        "",
        64 << 20,
        Some(("base.qcow2", "qcow2")),
    );
    add(&top, "in-top", &[]);
    same_as_qemu(&base);
    same_as_qemu(&top);
}

#[test]
fn stale_bitmaps_extension_lists_nothing() {
    let s = Scratch::new();
    let img = image(&s, "stale.qcow2");
    add(&img, "b0", &[]);
    let mut i = Image {
        bytes: std::fs::read(&img).unwrap(),
    };
    let autoclear = i.u64(AUTOCLEAR_FEATURES);
    i.set_u64(AUTOCLEAR_FEATURES, autoclear & !1);
    i.write_to(&img);
    same_as_qemu(&img);
}
