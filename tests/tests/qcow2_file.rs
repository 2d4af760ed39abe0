//! The hosted library's file type, `Qcow2File`, against QEMU: what it writes (through `Write` + `Seek` and
//! the positional calls) equals what qemu-io writes given the same requests and checks clean; what it reads
//! (through `Read` + `Seek`) equals what `qemu-img convert` reads; and its failures carry the right
//! `ErrorKind`.

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use qcow2_hosted::shared::SharedDisk;
use qcow2_hosted::{CacheMode, DiskError, ErrorKind, ImageFormat, Qcow2File};
use qcow2_tests::ops::{Op, ops, twin_images};
use qcow2_tests::{Scratch, bytes_diff, qemu_img, qemu_img_ok, qemu_io_cmds};

/// The guest contents of `img` as qemu-img reads them.
fn qemu_raw(s: &Scratch, img: &Path, name: &str) -> Vec<u8> {
    let out = s.path(name);
    qemu_img_ok([
        "convert".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        img.as_os_str(),
        out.as_os_str(),
    ]);
    std::fs::read(out).unwrap()
}

fn assert_check_clean(img: &Path, what: &str) {
    let out = qemu_img(["check".as_ref(), img.as_os_str()]);
    assert_eq!(
        out.code,
        Some(0),
        "qemu-img check after {what} is not clean:\n{}",
        out.describe()
    );
}

/// `qemu-img compare` (format probing off) finds `a` and `b` identical.
fn assert_same_guest(a: &Path, fa: &str, b: &Path, fb: &str, what: &str) {
    let out = qemu_img([
        "compare".as_ref(),
        "-f".as_ref(),
        fa.as_ref(),
        "-F".as_ref(),
        fb.as_ref(),
        a.as_os_str(),
        b.as_os_str(),
    ]);
    assert_eq!(
        out.code,
        Some(0),
        "qemu-img compare {} {}: {what}:\n{}",
        a.display(),
        b.display(),
        out.describe()
    );
}

/// Applies `op` to `file`: writes through `Seek` + `Write` when `stream`, else positionally.
fn apply(file: &mut Qcow2File, op: &Op, stream: bool) {
    match *op {
        Op::Write { off, len, byte } => {
            let data = vec![byte; len as usize];
            if stream {
                // Seek from a position the request does not start at, then write as a file.
                file.seek(SeekFrom::End(-1)).unwrap();
                let to = file.seek(SeekFrom::Start(off)).unwrap();
                assert_eq!(to, off);
                file.write_all(&data).unwrap();
                assert_eq!(file.stream_position().unwrap(), off + len);
            } else {
                file.write_at(off, &data).unwrap();
            }
        }
        Op::Zero { off, len, unmap } => file.write_zeroes(off, len, unmap).unwrap(),
        Op::Discard { off, len } => file.discard(off, len).unwrap(),
        Op::Flush => Write::flush(file).unwrap(),
    }
}

/// Reads the whole disk through `Read`, in pieces of `chunk` bytes from a rewound position.
fn read_all(file: &mut Qcow2File, chunk: usize) -> Vec<u8> {
    file.rewind().unwrap();
    let mut all = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
    }
    all
}

/// Random write, zero, discard and flush sequences applied through `Qcow2File` and through qemu-io to twin
/// images give the same guest contents, and both images check clean. `Read` on our image returns those
/// contents.
fn random_sequences(opts: &str, size: u64, cluster: u64, backing: Option<&str>, cache: CacheMode) {
    let s = Scratch::new();
    let (ours, theirs) = twin_images(&s, opts, size, backing, &[], false);
    for seed in 0..3u64 {
        let seq = ops(seed * 104_729 + cluster, size, cluster, 30);
        let cmds: Vec<String> = seq.iter().map(Op::qemu_io).collect();
        let mut file = Qcow2File::options()
            .read_write(true)
            .cache(cache)
            .open(&ours)
            .unwrap();
        for (i, op) in seq.iter().enumerate() {
            apply(&mut file, op, i % 2 == 0);
        }
        file.close().unwrap();
        qemu_io_cmds(&theirs, "qcow2", &cmds);
        let what = format!("{opts} backing {backing:?}, seed {seed}, commands {cmds:?}");
        assert_check_clean(&ours, &format!("Qcow2File's writes ({what})"));
        assert_check_clean(&theirs, &format!("qemu-io's writes ({what})"));
        assert_same_guest(&ours, "qcow2", &theirs, "qcow2", &what);
        let expected = qemu_raw(&s, &theirs, "theirs.raw");
        let mut file = Qcow2File::open(&ours).unwrap();
        let got = read_all(&mut file, 12_345);
        if let Some(diff) = bytes_diff(&got, &expected) {
            panic!("{what}: Read through Qcow2File differs from qemu-img's view: {diff}");
        }
    }
}

#[test]
fn random_writes_default_image_match_qemu_io() {
    random_sequences("", 4 << 20, 65536, None, CacheMode::WRITEBACK);
}

#[test]
fn random_writes_small_clusters_v2_writethrough_match_qemu_io() {
    random_sequences(
        "compat=0.10,cluster_size=4096",
        2 << 20,
        4096,
        None,
        CacheMode::WRITETHROUGH,
    );
}

#[test]
fn random_writes_over_backing_file_unsafe_cache_match_qemu_io() {
    random_sequences(
        "cluster_size=16384",
        4 << 20,
        16384,
        Some(""),
        CacheMode::UNSAFE,
    );
}

#[test]
fn random_writes_extended_l2_over_backing_file_match_qemu_io() {
    random_sequences(
        "extended_l2=on,cluster_size=65536",
        4 << 20,
        65536,
        Some(""),
        CacheMode::WRITEBACK,
    );
}

/// A fixed script through every writing call, applied to a qemu-img image through `Qcow2File`, and by
/// qemu-io to a raw file and to a twin qcow2 image: all three hold the same guest contents.
#[test]
fn scripted_writes_equal_a_raw_file_and_qemu_io() {
    let s = Scratch::new();
    let size: u64 = 3 << 20;
    let ours = s.qcow2("ours.qcow2", "cluster_size=65536", size);
    let twin = s.qcow2("twin.qcow2", "cluster_size=65536", size);
    let raw = s.create("ref.raw", "raw", "", size, None);
    let cmds: Vec<String> = [
        "write -P 0x61 1000 70000",
        "write -P 0x62 131072 196608",
        "write -P 0x63 3145723 5",
        "write -z 1500 300",
        "write -z -u 196608 65536",
        "discard 262144 65536",
        "write -P 0x64 65536 65536",
        "write -z 2097152 1048576",
        "write -c -P 0x65 1048576 131072",
    ]
    .map(String::from)
    .to_vec();

    let mut f = Qcow2File::options().read_write(true).open(&ours).unwrap();
    // write -P 0x61 1000 70000: a stream write in three pieces.
    f.seek(SeekFrom::Start(1000)).unwrap();
    f.write_all(&[0x61; 30000]).unwrap();
    f.write_all(&[0x61; 25000]).unwrap();
    assert_eq!(f.seek(SeekFrom::Current(-25000)).unwrap(), 31000);
    assert_eq!(f.seek(SeekFrom::Current(25000)).unwrap(), 56000);
    f.write_all(&[0x61; 15000]).unwrap();
    assert_eq!(f.stream_position().unwrap(), 71000);
    f.write_at(131072, &[0x62; 196608]).unwrap();
    // The last five bytes of the disk, positioned from the end.
    assert_eq!(f.seek(SeekFrom::End(-5)).unwrap(), size - 5);
    assert_eq!(f.write(&[0x63; 5]).unwrap(), 5);
    f.write_zeroes(1500, 300, false).unwrap();
    f.write_zeroes(196608, 65536, true).unwrap();
    f.discard(262144, 65536).unwrap();
    f.write_at(65536, &[0x64; 65536]).unwrap();
    f.write_zeroes(2 << 20, 1 << 20, false).unwrap();
    f.write_compressed_at(1 << 20, &[0x65; 131072]).unwrap();
    assert_eq!(
        f.write_compressed_at((1 << 20) + 512, &[0x65; 65536])
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidArgument,
        "a misaligned compressed write"
    );
    f.flush().unwrap();
    f.close().unwrap();

    // A raw file takes no compressed writes: the same bytes, plainly.
    let raw_cmds: Vec<String> = cmds
        .iter()
        .map(|c| c.replace("write -c ", "write "))
        .collect();
    qemu_io_cmds(&raw, "raw", &raw_cmds);
    qemu_io_cmds(&twin, "qcow2", &cmds);
    assert_check_clean(&ours, "the scripted writes");
    assert_same_guest(&ours, "qcow2", &raw, "raw", "against the raw file");
    assert_same_guest(
        &ours,
        "qcow2",
        &twin,
        "qcow2",
        "against qemu-io's qcow2 twin",
    );

    // Read back with a seek into the middle: the bytes are the raw file's.
    let expected = std::fs::read(&raw).unwrap();
    let mut f = Qcow2File::open(&ours).unwrap();
    f.seek(SeekFrom::Start(990)).unwrap();
    let mut piece = vec![0u8; 1000];
    f.read_exact(&mut piece).unwrap();
    assert_eq!(piece, expected[990..1990]);
    let got = read_all(&mut f, 65536 + 7);
    assert_eq!(got.len() as u64, size);
    if let Some(diff) = bytes_diff(&got, &expected) {
        panic!("Read differs from the raw file: {diff}");
    }
}

/// An image qemu-io wrote (plain, compressed and zero clusters, over a backing file, across subclusters)
/// reads through `Read` + `Seek` exactly as `qemu-img convert` reads it, and positional reads agree.
#[test]
fn reads_what_qemu_io_wrote() {
    let s = Scratch::new();
    let size: u64 = 4 << 20;
    let base = s.qcow2("base.qcow2", "cluster_size=4096", size);
    qemu_io_cmds(
        &base,
        "qcow2",
        &[
            "write -P 0x11 0 2M".to_string(),
            "write -c -P 0x22 2M 64k".to_string(),
        ],
    );
    let top = s.create(
        "top.qcow2",
        "qcow2",
        "extended_l2=on,cluster_size=65536",
        size,
        Some(("base.qcow2", "qcow2")),
    );
    qemu_io_cmds(
        &top,
        "qcow2",
        &[
            "write -P 0x33 5000 10000".to_string(),
            "write -c -P 0x44 1M 128k".to_string(),
            "write -z 1536k 100k".to_string(),
            "write -P 0x55 4194000 304".to_string(),
            "discard 3M 64k".to_string(),
        ],
    );
    let expected = qemu_raw(&s, &top, "top.raw");
    let mut f = Qcow2File::open(&top).unwrap();
    assert_eq!(f.virtual_size(), size);
    assert!(!f.is_writable());
    assert_eq!(f.image_info().len(), 2, "the backing chain is opened");
    for chunk in [4096, 100_000, 1 << 20] {
        let got = read_all(&mut f, chunk);
        if let Some(diff) = bytes_diff(&got, &expected) {
            panic!("reading in {chunk}-byte pieces: {diff}");
        }
    }
    // Reads across the end are short; at the end they return 0.
    f.seek(SeekFrom::End(-10)).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(f.read(&mut buf).unwrap(), 10);
    assert_eq!(&buf[..10], &expected[expected.len() - 10..]);
    assert_eq!(f.read(&mut buf).unwrap(), 0);
    f.seek(SeekFrom::Start(size + 100)).unwrap();
    assert_eq!(f.read(&mut buf).unwrap(), 0);
    let mut piece = vec![0u8; 70_000];
    f.read_at(1_000_000, &mut piece).unwrap();
    assert_eq!(piece, expected[1_000_000..1_070_000]);
}

/// The `ErrorKind` of a failure, whether it came back as a `DiskError` or inside a `std::io::Error`.
fn kind_of_io(e: std::io::Error) -> ErrorKind {
    DiskError::from(e).kind()
}

fn header_patch(path: &Path, offset: u64, bytes: &[u8]) {
    qcow2_tests::write_at(path, offset, bytes);
}

#[test]
fn failures_carry_their_kind() {
    let s = Scratch::new();

    // A missing image: the OS error's kind, also through std::io::Error.
    let e = Qcow2File::open(s.path("missing.qcow2")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io(std::io::ErrorKind::NotFound), "{e}");
    assert!(e.to_string().contains("No such file or directory"), "{e}");
    let io: std::io::Error = e.clone().into();
    assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    assert_eq!(io.to_string(), e.to_string());
    assert_eq!(
        DiskError::from(io),
        e,
        "the DiskError survives the round trip"
    );

    // Writing to a read-only handle, positionally and through Write; nothing is written.
    let img = s.qcow2("ro.qcow2", "", 1 << 20);
    let before = std::fs::read(&img).unwrap();
    let mut f = Qcow2File::open(&img).unwrap();
    assert_eq!(f.write_at(0, b"x").unwrap_err().kind(), ErrorKind::ReadOnly);
    assert_eq!(
        f.write_zeroes(0, 512, false).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    assert_eq!(f.discard(0, 65536).unwrap_err().kind(), ErrorKind::ReadOnly);
    let e = f.write(b"x").unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
    assert_eq!(kind_of_io(e), ErrorKind::ReadOnly);
    f.close().unwrap();
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "a read-only image was changed"
    );

    // Writes past the end: refused whole, positionally and through Write.
    let mut f = Qcow2File::options().read_write(true).open(&img).unwrap();
    let e = f.write_at((1 << 20) - 2, b"abc").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e}");
    assert_eq!(
        f.write_zeroes(1 << 20, 1, false).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        f.write_at(u64::MAX, b"a").unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    f.seek(SeekFrom::End(-1)).unwrap();
    let e = f.write_all(b"ab").unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    assert_eq!(kind_of_io(e), ErrorKind::OutOfRange);
    let mut one = [0u8; 2];
    assert_eq!(
        f.read_at((1 << 20) - 1, &mut one).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    assert!(f.seek(SeekFrom::Current(-(2 << 20))).is_err());
    f.close().unwrap();
    assert_check_clean(&img, "refused writes");
    let mut f = Qcow2File::open(&img).unwrap();
    assert!(
        read_all(&mut f, 65536).iter().all(|&b| b == 0),
        "a refused write changed the guest contents"
    );
    drop(f);

    // Not a qcow2 image (bad magic): refused as qcow2, readable as raw only when asked for.
    let bad = s.path("bad-magic.qcow2");
    std::fs::copy(&img, &bad).unwrap();
    header_patch(&bad, 0, b"QFI\x00");
    let e = Qcow2File::open(&bad).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage, "{e}");
    assert_eq!(
        Qcow2File::options()
            .read_write(true)
            .open(&bad)
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidImage
    );
    let raw = Qcow2File::options()
        .format(ImageFormat::Probe)
        .open(&bad)
        .unwrap();
    assert_eq!(raw.image_info()[0].format, "raw");

    // An invalid header field (cluster_bits 99).
    let bits = s.path("cluster-bits.qcow2");
    std::fs::copy(&img, &bits).unwrap();
    header_patch(&bits, 20, &99u32.to_be_bytes());
    let e = Qcow2File::open(&bits).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage, "{e}");

    // An incompatible feature this library does not know: unsupported, not invalid.
    let feature = s.path("feature.qcow2");
    std::fs::copy(&img, &feature).unwrap();
    header_patch(&feature, 72, &(1u64 << 40).to_be_bytes());
    let e = Qcow2File::open(&feature).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let out = qemu_img(["info".as_ref(), feature.as_os_str()]);
    assert!(
        !out.success(),
        "qemu-img opens an unknown incompatible feature"
    );

    // The corrupt bit: readable, not writable.
    let corrupt = s.path("corrupt-bit.qcow2");
    std::fs::copy(&img, &corrupt).unwrap();
    header_patch(&corrupt, 72, &2u64.to_be_bytes());
    let e = Qcow2File::options()
        .read_write(true)
        .open(&corrupt)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    let mut f = Qcow2File::open(&corrupt).unwrap();
    f.read_at(0, &mut one).unwrap();

    // Metadata that turns out inconsistent while reading: an L1 entry naming an unaligned L2 table.
    let l1 = s.path("l1.qcow2");
    std::fs::copy(&img, &l1).unwrap();
    let header = std::fs::read(&l1).unwrap();
    let l1_offset = u64::from_be_bytes(header[40..48].try_into().unwrap());
    header_patch(&l1, l1_offset, &((1u64 << 63) | 0x30_0200).to_be_bytes());
    let mut f = Qcow2File::open(&l1).unwrap();
    let e = f.read_at(0, &mut one).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    let e = f.read(&mut one).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);

    // A missing backing file: the OS error's kind (qemu-io fails to open it too).
    s.qcow2("gone.qcow2", "", 1 << 20);
    let top = s.create(
        "orphan.qcow2",
        "qcow2",
        "",
        1 << 20,
        Some(("gone.qcow2", "qcow2")),
    );
    std::fs::remove_file(s.path("gone.qcow2")).unwrap();
    let qemu = qcow2_tests::qemu_io([
        "-r".as_ref(),
        "-c".as_ref(),
        "read 0 512".as_ref(),
        top.as_os_str(),
    ]);
    assert!(!qemu.success(), "qemu-io opened it: {}", qemu.describe());
    let e = Qcow2File::open(&top).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io(std::io::ErrorKind::NotFound), "{e}");
}

/// A file's image handed to the thread-safe handle takes writes from several threads and closes clean.
#[test]
fn shared_disk_from_a_file() {
    let s = Scratch::new();
    let img = s.qcow2("shared.qcow2", "cluster_size=4096", 1 << 20);
    let file = Qcow2File::options().read_write(true).open(&img).unwrap();
    let shared = SharedDisk::from(file);
    std::thread::scope(|scope| {
        for t in 0..4u8 {
            let shared = shared.clone();
            scope.spawn(move || {
                for i in 0..32u64 {
                    let off = (u64::from(t) * 32 + i) * 8192;
                    shared.write_at(off, &[t + 1; 4096]).unwrap();
                }
            });
        }
    });
    shared.close().unwrap();
    assert_check_clean(&img, "writes from four threads");
    let raw = s.path("expected.raw");
    let mut expected = vec![0u8; 1 << 20];
    for t in 0..4u8 {
        for i in 0..32usize {
            let off = (usize::from(t) * 32 + i) * 8192;
            expected[off..off + 4096].fill(t + 1);
        }
    }
    std::fs::write(&raw, &expected).unwrap();
    assert_same_guest(&img, "qcow2", &raw, "raw", "threads' writes");

    // A read-only file gives a handle that reads and refuses writes.
    let shared = SharedDisk::from(Qcow2File::open(&img).unwrap());
    let mut buf = [0u8; 4096];
    shared.read_at(8192, &mut buf).unwrap();
    assert_eq!(buf, [1u8; 4096]);
    assert_eq!(
        shared.write_at(0, &[1]).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
}

/// `Qcow2File::create` lays the image out as `qemu-img create -f qcow2` does (byte for byte), and an image
/// it made takes writes that qemu-img then reads.
#[test]
fn created_images_equal_qemu_img_create() {
    let s = Scratch::new();
    for (size, opts, ours_opts) in [
        (
            10 << 20,
            "",
            qcow2_hosted::CreateOptions {
                size: 10 << 20,
                ..Default::default()
            },
        ),
        (
            (1 << 30) + 512,
            "cluster_size=4096,compat=0.10",
            qcow2_hosted::CreateOptions {
                size: (1 << 30) + 512,
                cluster_size: 4096,
                compat: qcow2_hosted::qcow2_file::Compat::V2,
                ..Default::default()
            },
        ),
    ] {
        let theirs = s.qcow2("theirs.qcow2", opts, size);
        let ours = s.path("ours.qcow2");
        Qcow2File::create_with(&ours, &ours_opts)
            .unwrap()
            .close()
            .unwrap();
        assert_eq!(
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
            "create {opts:?}: the files differ"
        );
    }
    let ours = s.path("written.qcow2");
    let mut f = Qcow2File::create(&ours, 1 << 20).unwrap();
    f.write_all(b"written by Qcow2File").unwrap();
    f.close().unwrap();
    assert_check_clean(&ours, "create and write");
    let mut args: Vec<OsString> = vec!["-f".into(), "qcow2".into(), "-c".into()];
    args.push("read -P 0 20 1048556".into());
    args.push(ours.clone().into());
    let out = qcow2_tests::qemu_io(&args);
    assert!(
        out.success() && !out.stdout_str().contains("fail"),
        "{}",
        out.describe()
    );
    assert_eq!(&qemu_raw(&s, &ours, "w.raw")[..20], b"written by Qcow2File");

    // Invalid options are refused before anything is created.
    let e = Qcow2File::create_with(
        s.path("bad.qcow2"),
        &qcow2_hosted::CreateOptions {
            size: 1 << 20,
            cluster_size: 1000,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(!s.path("bad.qcow2").exists());
}
