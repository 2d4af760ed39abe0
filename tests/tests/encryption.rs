//! Encrypted qcow2 images (LUKS, crypt_method 2, and legacy AES, crypt_method 1) against qemu-img and
//! qemu-io, both ways:
//!
//! * images made by `qemu-img create` (a matrix of ciphers, modes, IV generators, hashes, cluster sizes,
//!   extended L2, a v2 image) and written by qemu-io read back through `qcow2 io -r` with `read -P`, over the
//!   whole disk; our unaligned writes then read back through qemu-io, and `qemu-img check` stays clean;
//! * images made by `qcow2 create` open in qemu-io and qemu-img with the secret, `qemu-img info` reports the
//!   cipher asked for, data written by either tool reads back in the other, `qemu-img check` is clean;
//!   aes-192 in cbc/ecb mode (on which qemu-img aborts) is refused with one line;
//! * a second passphrase added by `qemu-img amend` in key slot 1 opens the image in our tool;
//! * wrong passphrase, missing secret, unknown secret id (`io`, `map`, `convert`, `compare`, `check`): our
//!   messages and exit codes are qemu's;
//! * legacy AES images, made by either tool, read and written by both;
//! * hostile LUKS headers (fields patched in a qemu-img image) are refused fast, with qemu's message where
//!   qemu gives one, never with a panic.
//!
//! Every run of our tool is checked by the harness: finished within its time limit, no panic, no signal.
//! The test reads are built from a model of the disk (every write applied to a byte array), so each byte
//! of the virtual disk is verified, the unwritten ones as zeros.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qcow2_tests::{
    Output, Scratch, assert_clean_error, check_info_human, check_info_json, qcow2, qemu_img,
    qemu_io, run_qemu_tool_limited,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

const PASS: &str = "encryption-test-passphrase";

/// `secret,id=ID,data=PASS` for `--object`.
fn secret(id: &str, pass: &str) -> String {
    format!("secret,id={id},data={pass}")
}

/// `driver=qcow2,file.filename=IMG,encrypt.key-secret=ID` for `--image-opts`.
fn image_opts(img: &Path, id: &str) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret={id}",
        img.display()
    )
}

/// The arguments that open `img` with passphrase `pass` under secret id `id`.
fn open_args(img: &Path, id: &str, pass: &str) -> Vec<String> {
    vec![
        "--object".into(),
        secret(id, pass),
        "--image-opts".into(),
        image_opts(img, id),
    ]
}

fn sv(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// `io` arguments: `[-r] OPEN... -c CMD...` (qemu-io's order; ours takes the same).
fn io_args(read_only: bool, open: &[String], cmds: &[String]) -> Vec<String> {
    let mut a = Vec::new();
    if read_only {
        a.push("-r".to_string());
    }
    for c in cmds {
        a.push("-c".into());
        a.push(c.clone());
    }
    a.extend(open.iter().cloned());
    a
}

fn ours_io(read_only: bool, open: &[String], cmds: &[String]) -> Output {
    let mut a = vec!["io".to_string()];
    a.extend(io_args(read_only, open, cmds));
    qcow2(&a)
}

fn qemu_io_run(read_only: bool, open: &[String], cmds: &[String]) -> Output {
    qemu_io(io_args(read_only, open, cmds))
}

/// An `io` run whose every command must have succeeded: exit code 0, no pattern mismatch, no failure line.
fn assert_io_ok(out: &Output, what: &str) {
    let text = out.stdout_str() + &out.stderr_str();
    assert!(
        out.success() && !text.contains("Pattern verification failed") && !text.contains(" failed"),
        "{what}: every command must succeed:\n{}",
        out.describe()
    );
}

/// `qemu-img check` with the secret reports no errors (exit code 0).
fn assert_qemu_check_clean(img: &Path, id: &str, pass: &str, what: &str) {
    let mut a = vec!["check".to_string()];
    a.extend(open_args(img, id, pass));
    let out = qemu_img(&a);
    assert!(
        out.success()
            && out
                .stdout_str()
                .contains("No errors were found on the image."),
        "{what}: qemu-img check must find no errors:\n{}",
        out.describe()
    );
}

// ---------------------------------------------------------------------------------------------------------
// A model of the virtual disk

/// One write, as a qemu-io command and as its effect on the model.
#[derive(Clone, Copy)]
enum Op {
    Pattern(u8, u64, u64),
    Zero(u64, u64),
}

impl Op {
    fn cmd(self) -> String {
        match self {
            Op::Pattern(p, off, len) => format!("write -P {p:#04x} {off} {len}"),
            Op::Zero(off, len) => format!("write -z {off} {len}"),
        }
    }
    fn apply(self, disk: &mut [u8]) {
        let (byte, off, len) = match self {
            Op::Pattern(p, off, len) => (p, off, len),
            Op::Zero(off, len) => (0, off, len),
        };
        disk[off as usize..(off + len) as usize].fill(byte);
    }
}

struct Model {
    disk: Vec<u8>,
}

impl Model {
    fn new(size: u64) -> Model {
        Model {
            disk: vec![0; size as usize],
        }
    }
    /// Applies `ops` and returns them as qemu-io commands.
    fn write(&mut self, ops: &[Op]) -> Vec<String> {
        ops.iter()
            .map(|op| {
                op.apply(&mut self.disk);
                op.cmd()
            })
            .collect()
    }
    /// `read -P` commands covering the whole disk, one per run of equal bytes.
    fn reads(&self) -> Vec<String> {
        let mut cmds = Vec::new();
        let mut start = 0usize;
        while start < self.disk.len() {
            let b = self.disk[start];
            let end = self.disk[start..]
                .iter()
                .position(|&x| x != b)
                .map_or(self.disk.len(), |n| start + n);
            cmds.push(format!("read -P {b:#04x} {start} {}", end - start));
            start = end;
        }
        cmds
    }
}

/// Virtual size for a cluster size: 8 MiB, or 16 clusters.
fn size_for(cluster: u64) -> u64 {
    (8 * MIB).max(16 * cluster)
}

/// The first round of writes (by whichever tool did not make the image): unaligned patterns, a write
/// spanning clusters, zero writes (aligned and not), the end of the disk, a single byte.
fn first_writes(c: u64, size: u64) -> Vec<Op> {
    vec![
        Op::Pattern(0x11, 100, 1000),
        Op::Pattern(0x22, c + 7, 513),
        // clusters 2..5, unaligned on both ends
        Op::Pattern(0x33, 3 * c - 100, 2 * c + 300),
        // a zero write in its middle, a whole cluster
        Op::Zero(3 * c, c),
        Op::Pattern(0x44, 8 * c + 1, 4097),
        // an unaligned zero write inside data
        Op::Zero(8 * c + 1000, 100),
        Op::Pattern(0x55, size - 1500, 1500),
        Op::Pattern(0xff, size / 2 + 3, 1),
    ]
}

/// The second round (by the other tool), over and between the first.
fn second_writes(c: u64, size: u64) -> Vec<Op> {
    vec![
        Op::Pattern(0x66, 50, 70),
        // three bytes across the boundary of clusters 1 and 2
        Op::Pattern(0x77, 2 * c - 1, 3),
        Op::Pattern(0x88, 5 * c + 333, c + 1000),
        Op::Zero(8 * c + 10, 20),
        Op::Pattern(0x99, 10 * c + 511, 513),
        Op::Pattern(0xaa, 12 * c - 700, 1400),
        Op::Zero(size - 1000, 200),
    ]
}

// ---------------------------------------------------------------------------------------------------------
// 1. Images made by qemu-img

/// qemu-img makes a LUKS image with `opts`, qemu-io writes, ours reads everything back; ours writes more,
/// qemu-io reads everything back; qemu-img check is clean.
fn qemu_made_luks(opts: &str, cluster: u64) {
    let s = Scratch::new();
    let img = s.path("qemu-luks.qcow2");
    let size = size_for(cluster);
    let what = format!("qemu-img create -o {opts}");
    let out = qemu_img([
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "--object".into(),
        secret("s0", PASS),
        "-o".into(),
        format!("encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,{opts}"),
        img.display().to_string(),
        size.to_string(),
    ]);
    assert!(out.success(), "{what}:\n{}", out.describe());
    let open = open_args(&img, "s0", PASS);
    let mut model = Model::new(size);

    let cmds = model.write(&first_writes(cluster, size));
    assert_io_ok(
        &qemu_io_run(false, &open, &cmds),
        &format!("{what}: qemu-io writes"),
    );
    assert_io_ok(
        &ours_io(true, &open, &model.reads()),
        &format!("{what}: qcow2 io -r reads qemu-io's writes"),
    );

    let cmds = model.write(&second_writes(cluster, size));
    assert_io_ok(
        &ours_io(false, &open, &cmds),
        &format!("{what}: qcow2 io writes"),
    );
    assert_io_ok(
        &qemu_io_run(true, &open, &model.reads()),
        &format!("{what}: qemu-io reads our writes"),
    );
    assert_io_ok(
        &ours_io(true, &open, &model.reads()),
        &format!("{what}: qcow2 io -r reads its own writes"),
    );
    assert_qemu_check_clean(&img, "s0", PASS, &what);
}

#[test]
fn qemu_luks_aes128_xts_sha1_cluster_512() {
    qemu_made_luks(
        "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=xts,encrypt.hash-alg=sha1,cluster_size=512",
        512,
    );
}

#[test]
fn qemu_luks_aes256_xts_sha256_cluster_64k() {
    qemu_made_luks(
        "encrypt.cipher-alg=aes-256,encrypt.cipher-mode=xts,encrypt.hash-alg=sha256,cluster_size=65536",
        64 * KIB,
    );
}

#[test]
fn qemu_luks_aes256_cbc_essiv_sha512_cluster_2m() {
    qemu_made_luks(
        "encrypt.cipher-alg=aes-256,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,\
         encrypt.hash-alg=sha512,cluster_size=2M",
        2 * MIB,
    );
}

#[test]
fn qemu_luks_aes128_cbc_plain64_sha256_extended_l2() {
    qemu_made_luks(
        "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64,\
         encrypt.hash-alg=sha256,extended_l2=on,cluster_size=64k",
        64 * KIB,
    );
}

#[test]
fn qemu_luks_aes128_cbc_plain64_sha512_cluster_4k() {
    qemu_made_luks(
        "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64,\
         encrypt.hash-alg=sha512,cluster_size=4096",
        4 * KIB,
    );
}

#[test]
fn qemu_luks_v2_image() {
    qemu_made_luks(
        "encrypt.cipher-alg=aes-256,encrypt.cipher-mode=xts,encrypt.hash-alg=sha1,compat=0.10",
        64 * KIB,
    );
}

// ---------------------------------------------------------------------------------------------------------
// 2. Images made by our tool

/// What `qemu-img info --output=json` must say about the encryption.
struct Expect {
    cipher_alg: &'static str,
    cipher_mode: &'static str,
    ivgen_alg: &'static str,
    hash_alg: &'static str,
}

/// Ours makes a LUKS image with `opts`; qemu-img info reports it as asked; ours writes, qemu-io reads;
/// qemu-io writes, ours reads; qemu-img check is clean.
fn ours_made_luks(opts: &str, cluster: u64, expect: Expect) {
    let s = Scratch::new();
    let img = s.path("ours-luks.qcow2");
    let size = size_for(cluster);
    let what = format!("qcow2 create -o {opts}");
    let out = qcow2([
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "--object".into(),
        secret("s0", PASS),
        "-o".into(),
        format!("encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,{opts}"),
        img.display().to_string(),
        size.to_string(),
    ]);
    assert!(out.success(), "{what}:\n{}", out.describe());

    // What qemu-img sees in it.
    let info = qemu_img(["info", "--output=json", img.to_str().unwrap()]);
    assert!(
        info.success(),
        "{what}: qemu-img info:\n{}",
        info.describe()
    );
    let v: serde_json::Value = serde_json::from_str(&info.stdout_str())
        .unwrap_or_else(|e| panic!("{what}: qemu-img info JSON ({e}):\n{}", info.describe()));
    assert_eq!(v["encrypted"], true, "{what}: {}", info.stdout_str());
    let enc = &v["format-specific"]["data"]["encrypt"];
    for (key, want) in [
        ("format", "luks"),
        ("cipher-alg", expect.cipher_alg),
        ("cipher-mode", expect.cipher_mode),
        ("ivgen-alg", expect.ivgen_alg),
        ("hash-alg", expect.hash_alg),
    ] {
        assert_eq!(
            enc[key],
            want,
            "{what}: qemu-img info says {key} = {}:\n{}",
            enc[key],
            info.stdout_str()
        );
    }
    let human = qemu_img(["info", img.to_str().unwrap()]);
    assert!(
        human.success() && human.stdout_str().contains("\nencrypted: yes\n"),
        "{what}: qemu-img info must say 'encrypted: yes':\n{}",
        human.describe()
    );
    // And our info says the same as qemu-img's.
    check_info_json(&img, &[]);
    check_info_human(&img, &[]);
    assert_qemu_check_clean(&img, "s0", PASS, &format!("{what} (fresh)"));

    let open = open_args(&img, "s0", PASS);
    let mut model = Model::new(size);
    let cmds = model.write(&first_writes(cluster, size));
    assert_io_ok(
        &ours_io(false, &open, &cmds),
        &format!("{what}: qcow2 io writes"),
    );
    assert_io_ok(
        &qemu_io_run(true, &open, &model.reads()),
        &format!("{what}: qemu-io reads our writes"),
    );

    let cmds = model.write(&second_writes(cluster, size));
    assert_io_ok(
        &qemu_io_run(false, &open, &cmds),
        &format!("{what}: qemu-io writes"),
    );
    assert_io_ok(
        &ours_io(true, &open, &model.reads()),
        &format!("{what}: qcow2 io -r reads qemu-io's writes"),
    );
    assert_qemu_check_clean(&img, "s0", PASS, &what);
}

#[test]
fn ours_luks_aes128_xts_sha1_cluster_512() {
    ours_made_luks(
        "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=xts,encrypt.hash-alg=sha1,cluster_size=512",
        512,
        Expect {
            cipher_alg: "aes-128",
            cipher_mode: "xts",
            ivgen_alg: "plain64",
            hash_alg: "sha1",
        },
    );
}

#[test]
fn ours_luks_aes128_xts_sha1_cluster_4k() {
    ours_made_luks(
        "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=xts,encrypt.hash-alg=sha1,cluster_size=4k",
        4 * KIB,
        Expect {
            cipher_alg: "aes-128",
            cipher_mode: "xts",
            ivgen_alg: "plain64",
            hash_alg: "sha1",
        },
    );
}

#[test]
fn ours_luks_aes256_cbc_essiv_sha512_cluster_2m() {
    ours_made_luks(
        "encrypt.cipher-alg=aes-256,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,\
         encrypt.hash-alg=sha512,cluster_size=2M",
        2 * MIB,
        Expect {
            cipher_alg: "aes-256",
            cipher_mode: "cbc",
            ivgen_alg: "essiv",
            hash_alg: "sha512",
        },
    );
}

#[test]
fn ours_luks_aes192_xts_plain_extended_l2() {
    ours_made_luks(
        "encrypt.cipher-alg=aes-192,encrypt.cipher-mode=xts,encrypt.ivgen-alg=plain,\
         extended_l2=on,cluster_size=64k",
        64 * KIB,
        Expect {
            cipher_alg: "aes-192",
            cipher_mode: "xts",
            ivgen_alg: "plain",
            hash_alg: "sha256",
        },
    );
}

/// aes-192 in cbc or ecb mode has key material of 192 000 bytes, not whole sectors: qemu-img stops on an
/// assertion making such an image, ours refuses it with one line.
#[test]
fn ours_refuses_aes192_cbc_and_ecb() {
    let s = Scratch::new();
    for mode in ["cbc", "ecb"] {
        let img = s.path(&format!("aes192-{mode}.qcow2"));
        let out = qcow2([
            "create".to_string(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "--object".into(),
            secret("s0", PASS),
            "-o".into(),
            format!(
                "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,\
                 encrypt.cipher-alg=aes-192,encrypt.cipher-mode={mode}"
            ),
            img.display().to_string(),
            "8M".into(),
        ]);
        assert_clean_error(&out);
        assert!(
            out.stderr_str()
                .contains(&format!("aes-192-{mode} is not supported")),
            "{}",
            out.describe()
        );
    }
}

#[test]
fn ours_luks_defaults_v2_image() {
    ours_made_luks(
        "compat=0.10",
        64 * KIB,
        Expect {
            cipher_alg: "aes-256",
            cipher_mode: "xts",
            ivgen_alg: "plain64",
            hash_alg: "sha256",
        },
    );
}

// ---------------------------------------------------------------------------------------------------------
// 3. Several key slots

#[test]
fn second_passphrase_added_by_qemu_img_amend() {
    let s = Scratch::new();
    let img = s.path("slots.qcow2");
    let out = qemu_img([
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "--object".into(),
        secret("s0", "old-passphrase"),
        "-o".into(),
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10".into(),
        img.display().to_string(),
        "4M".into(),
    ]);
    assert!(out.success(), "{}", out.describe());
    let old = open_args(&img, "s0", "old-passphrase");
    let new = open_args(&img, "s1", "new-passphrase");
    assert_io_ok(
        &qemu_io_run(
            false,
            &old,
            &sv(&["write -P 0x5a 100 100000", "write -P 0xa5 3M 4097"]),
        ),
        "qemu-io writes with the first passphrase",
    );

    let mut amend = sv(&[
        "amend",
        "--object",
        &secret("s0", "old-passphrase"),
        "--object",
        &secret("s1", "new-passphrase"),
        "--image-opts",
        &image_opts(&img, "s0"),
        "-o",
        "encrypt.keyslot=1,encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time=10",
    ]);
    let out = qemu_img(&amend);
    assert!(out.success(), "qemu-img amend:\n{}", out.describe());
    let info = qemu_img(["info", "--output=json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&info.stdout_str()).unwrap();
    let slots = &v["format-specific"]["data"]["encrypt"]["slots"];
    assert_eq!(slots[0]["active"], true, "{}", info.stdout_str());
    assert_eq!(slots[1]["active"], true, "{}", info.stdout_str());

    let reads = sv(&[
        "read -P 0 0 100",
        "read -P 0x5a 100 100000",
        "read -P 0 100100 100",
        "read -P 0xa5 3M 4097",
    ]);
    assert_io_ok(
        &ours_io(true, &new, &reads),
        "qcow2 io -r with the passphrase of key slot 1",
    );
    assert_io_ok(
        &ours_io(true, &old, &reads),
        "qcow2 io -r with the passphrase of key slot 0",
    );
    // Ours writes through the second passphrase; qemu-io reads through the first.
    assert_io_ok(
        &ours_io(false, &new, &sv(&["write -P 0x3c 2M 777"])),
        "qcow2 io writes with the passphrase of key slot 1",
    );
    assert_io_ok(
        &qemu_io_run(
            true,
            &old,
            &sv(&["read -P 0x3c 2M 777", "read -P 0x5a 100 100000"]),
        ),
        "qemu-io reads our write with the passphrase of key slot 0",
    );

    // Slot 0 erased: the first passphrase no longer opens the image, in either tool, the second still does.
    amend = sv(&[
        "amend",
        "--object",
        &secret("s1", "new-passphrase"),
        "--image-opts",
        &image_opts(&img, "s1"),
        "-o",
        "encrypt.keyslot=0,encrypt.state=inactive",
    ]);
    let out = qemu_img(&amend);
    assert!(
        out.success(),
        "qemu-img amend (erase slot 0):\n{}",
        out.describe()
    );
    let ours = ours_io(true, &old, &sv(&["read 0 1"]));
    let qemu = qemu_io_run(true, &old, &sv(&["read 0 1"]));
    assert_clean_error(&ours);
    assert_eq!(
        ours.code,
        qemu.code,
        "{}\n{}",
        ours.describe(),
        qemu.describe()
    );
    assert_eq!(
        ours.messages(),
        vec!["can't open: Invalid password, cannot unlock any keyslot".to_string()],
        "{}",
        ours.describe()
    );
    assert_eq!(ours.messages(), qemu.messages(), "{}", qemu.describe());
    assert_io_ok(
        &ours_io(true, &new, &reads),
        "qcow2 io -r with the passphrase of key slot 1 after slot 0 was erased",
    );
}

// ---------------------------------------------------------------------------------------------------------
// 4. Messages and exit codes

/// A qemu-img LUKS image with a little data.
fn luks_image(s: &Scratch, name: &str) -> PathBuf {
    let img = s.path(name);
    let out = qemu_img([
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "--object".into(),
        secret("s0", PASS),
        "-o".into(),
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10".into(),
        img.display().to_string(),
        "4M".into(),
    ]);
    assert!(out.success(), "{}", out.describe());
    assert_io_ok(
        &qemu_io_run(
            false,
            &open_args(&img, "s0", PASS),
            &sv(&["write -P 0x11 0 64k"]),
        ),
        "qemu-io writes",
    );
    img
}

/// Runs `args` through qemu's `tool` ("qemu-img" or "qemu-io") and through ours (`qcow2 ARGS` or `qcow2 io
/// ARGS`): both fail with the same exit code, ours with one line, and the messages are the same with the
/// program's name spelled "qcow2". Returns our one message.
fn same_failure(tool: &str, args: &[String]) -> String {
    let qemu = if tool == "qemu-io" {
        qemu_io(args)
    } else {
        qemu_img(args)
    };
    let mut ours_args = Vec::new();
    if tool == "qemu-io" {
        ours_args.push("io".to_string());
    }
    ours_args.extend(args.iter().cloned());
    let ours = qcow2(&ours_args);
    assert!(
        !qemu.success(),
        "{tool} was expected to fail:\n{}",
        qemu.describe()
    );
    assert_clean_error(&ours);
    assert_eq!(
        ours.code,
        qemu.code,
        "exit codes differ\nours: {}\nqemu: {}",
        ours.describe(),
        qemu.describe()
    );
    let spell = |m: Vec<String>| -> Vec<String> {
        m.into_iter()
            .map(|l| l.replace("qemu-img", "qcow2").replace("qemu-io", "qcow2"))
            .collect()
    };
    assert_eq!(
        spell(ours.messages()),
        spell(qemu.messages()),
        "messages differ\nours: {}\nqemu: {}",
        ours.describe(),
        qemu.describe()
    );
    ours.first_message()
}

#[test]
fn wrong_passphrase() {
    let s = Scratch::new();
    let img = luks_image(&s, "wrong.qcow2");
    let bad = open_args(&img, "s0", "not-the-passphrase");
    for ro in [true, false] {
        let m = same_failure("qemu-io", &io_args(ro, &bad, &sv(&["read 0 1"])));
        assert_eq!(m, "can't open: Invalid password, cannot unlock any keyslot");
    }
    let mut a = vec!["map".to_string()];
    a.extend(bad.iter().cloned());
    let m = same_failure("qemu-img", &a);
    assert!(
        m.ends_with("': Invalid password, cannot unlock any keyslot"),
        "{m}"
    );
}

#[test]
fn missing_secret() {
    let s = Scratch::new();
    let img = luks_image(&s, "nosecret.qcow2");
    let f = img.to_str().unwrap();
    let want =
        format!("Could not open '{f}': Parameter 'encrypt.key-secret' is required for cipher");
    for args in [
        sv(&["map", f]),
        sv(&["map", "--output=json", f]),
        sv(&["convert", "-O", "raw", f, &format!("{f}.raw")]),
    ] {
        assert_eq!(same_failure("qemu-img", &args), want, "{args:?}");
    }
    let m = same_failure("qemu-io", &sv(&["-c", "read 0 1", f]));
    assert_eq!(
        m,
        format!("can't open device {f}: Parameter 'encrypt.key-secret' is required for cipher")
    );
    // qemu-img compare says it its own way (exit code 2); ours must match too.
    let q = qemu_img(["compare", f, f]);
    let o = qcow2(["compare", f, f]);
    assert_eq!(o.code, q.code, "{}\n{}", o.describe(), q.describe());
    assert_eq!(
        o.messages(),
        q.messages(),
        "{}\n{}",
        o.describe(),
        q.describe()
    );
    // info needs no secret, in either tool.
    check_info_json(&img, &[]);
}

/// `qemu-img check` opens an encrypted image with its key: without the secret, or with a wrong passphrase,
/// it fails (exit code 1) before checking anything. Ours must say the same and exit the same way.
#[test]
fn check_needs_the_secret() {
    let s = Scratch::new();
    let img = luks_image(&s, "check-secret.qcow2");
    let f = img.to_str().unwrap();
    let shown = image_opts(&img, "s0");
    let wrong = open_args(&img, "s0", "not-the-passphrase");
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            sv(&["check", f]),
            format!("Could not open '{f}': Parameter 'encrypt.key-secret' is required for cipher"),
        ),
        (
            sv(&["check", "--output=json", f]),
            format!("Could not open '{f}': Parameter 'encrypt.key-secret' is required for cipher"),
        ),
        (
            [sv(&["check"]), wrong.clone()].concat(),
            format!("Could not open '{shown}': Invalid password, cannot unlock any keyslot"),
        ),
    ];
    let mut failures = Vec::new();
    for (args, want) in cases {
        let r = std::panic::catch_unwind(|| same_failure("qemu-img", &args));
        match r {
            Ok(m) if m == want => {}
            Ok(m) => failures.push(format!("{args:?}: message {m:?}, want {want:?}")),
            Err(e) => failures.push(format!(
                "{args:?}: {}",
                e.downcast_ref::<String>().cloned().unwrap_or_default()
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} check case(s) differ from qemu-img:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn unknown_secret_id() {
    let s = Scratch::new();
    let img = luks_image(&s, "unknown.qcow2");
    // The secret given is s0, the image asks for "nope".
    let open = sv(&[
        "--object",
        &secret("s0", PASS),
        "--image-opts",
        &image_opts(&img, "nope"),
    ]);
    let m = same_failure("qemu-io", &io_args(true, &open, &sv(&["read 0 1"])));
    assert_eq!(m, "can't open: No secret with id 'nope'");
    let mut a = vec!["map".to_string()];
    a.extend(open.iter().cloned());
    let m = same_failure("qemu-img", &a);
    assert!(m.ends_with("': No secret with id 'nope'"), "{m}");
}

// ---------------------------------------------------------------------------------------------------------
// 5. Legacy AES

fn legacy_aes(ours_creates: bool, opts: &str) {
    let s = Scratch::new();
    let img = s.path("aes.qcow2");
    let size = MIB;
    let cluster = if opts.contains("cluster_size=512") {
        512
    } else {
        64 * KIB
    };
    let what = format!(
        "{} create -o encrypt.format=aes,{opts}",
        if ours_creates { "qcow2" } else { "qemu-img" }
    );
    let args = vec![
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "--object".into(),
        secret("s0", "pass"),
        "-o".into(),
        format!(
            "encrypt.format=aes,encrypt.key-secret=s0{}{opts}",
            if opts.is_empty() { "" } else { "," }
        ),
        img.display().to_string(),
        size.to_string(),
    ];
    let out = if ours_creates {
        qcow2(&args)
    } else {
        qemu_img(&args)
    };
    assert!(out.success(), "{what}:\n{}", out.describe());
    let human = qemu_img(["info", img.to_str().unwrap()]);
    assert!(
        human.success() && human.stdout_str().contains("\nencrypted: yes\n"),
        "{what}: qemu-img info must say 'encrypted: yes':\n{}",
        human.describe()
    );
    let info = qemu_img(["info", "--output=json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&info.stdout_str()).unwrap();
    assert_eq!(
        v["format-specific"]["data"]["encrypt"]["format"],
        "aes",
        "{what}: {}",
        info.stdout_str()
    );

    let open = open_args(&img, "s0", "pass");
    let mut model = Model::new(size);
    let cmds = model.write(&first_writes(cluster, size));
    assert_io_ok(
        &qemu_io_run(false, &open, &cmds),
        &format!("{what}: qemu-io writes"),
    );
    assert_io_ok(
        &ours_io(true, &open, &model.reads()),
        &format!("{what}: qcow2 io -r reads qemu-io's writes"),
    );
    let cmds = model.write(&second_writes(cluster, size));
    assert_io_ok(
        &ours_io(false, &open, &cmds),
        &format!("{what}: qcow2 io writes"),
    );
    assert_io_ok(
        &qemu_io_run(true, &open, &model.reads()),
        &format!("{what}: qemu-io reads our writes"),
    );
    assert_qemu_check_clean(&img, "s0", "pass", &what);

    // Legacy AES cannot tell a wrong passphrase: both tools open the image and read garbage.
    let wrong = open_args(&img, "s0", "wrong");
    let cmds = sv(&["read -P 0x11 1100 1"]);
    let q = qemu_io_run(true, &wrong, &cmds);
    let o = ours_io(true, &wrong, &cmds);
    for out in [&q, &o] {
        assert!(
            !out.success() && out.stdout_str().contains("Pattern verification failed"),
            "{what}: a wrong AES passphrase reads garbage:\n{}",
            out.describe()
        );
    }
    assert_eq!(o.code, q.code, "{}\n{}", o.describe(), q.describe());
}

#[test]
fn legacy_aes_made_by_qemu_img() {
    legacy_aes(false, "");
}

#[test]
fn legacy_aes_v2_cluster_512_made_by_qemu_img() {
    legacy_aes(false, "compat=0.10,cluster_size=512");
}

#[test]
fn legacy_aes_made_by_ours() {
    legacy_aes(true, "");
}

// ---------------------------------------------------------------------------------------------------------
// 6. Hostile LUKS headers

/// Offset of the LUKS area in a qcow2 image, from the header extension 0x0537be77 (be64 offset, be64
/// length). The extensions start after the header: at its `header_length` (offset 100) in a v3 image, at
/// byte 72 in a v2 one.
fn luks_offset(file: &[u8]) -> usize {
    let be32 = |o: usize| u32::from_be_bytes(file[o..o + 4].try_into().unwrap());
    let be64 = |o: usize| u64::from_be_bytes(file[o..o + 8].try_into().unwrap());
    let mut p = if be32(4) >= 3 { be32(100) as usize } else { 72 };
    loop {
        let (magic, len) = (be32(p), be32(p + 4) as usize);
        assert_ne!(magic, 0, "no LUKS header extension");
        if magic == 0x0537_be77 {
            let off = be64(p + 8);
            assert!(be64(p + 16) >= 592, "LUKS area too short");
            return off as usize;
        }
        p += 8 + len.div_ceil(8) * 8;
    }
}

struct Hostile {
    what: &'static str,
    /// Offset in the LUKS header, and the big-endian value written there.
    at: usize,
    value: Patch,
    /// Our message after "can't open: " (exact), or a part of it.
    message: &'static str,
    exact: bool,
    /// Whether qemu-io gives a message to compare (it takes hours on some of these).
    qemu_compares: bool,
}

#[derive(Clone, Copy)]
enum Patch {
    U16(u16),
    U32(u32),
}

const SLOT0: usize = 208;

fn hostile_cases() -> Vec<Hostile> {
    vec![
        Hostile {
            what: "key slot 0 stripes 0",
            at: SLOT0 + 44,
            value: Patch::U32(0),
            message: "Keyslot 0 is corrupted (stripes 0 != 4000)",
            exact: true,
            qemu_compares: true,
        },
        Hostile {
            what: "key slot 0 iterations 0",
            at: SLOT0 + 4,
            value: Patch::U32(0),
            message: "Keyslot 0 iteration count is zero",
            exact: true,
            qemu_compares: true,
        },
        Hostile {
            what: "key slot 0 iterations 0xffffffff",
            at: SLOT0 + 4,
            value: Patch::U32(0xffff_ffff),
            message: "iteration count 4294967295",
            exact: false,
            // qemu-io runs PBKDF2 4 billion times (hours): nothing to compare.
            qemu_compares: false,
        },
        Hostile {
            what: "master key iterations 0",
            at: 164,
            value: Patch::U32(0),
            message: "LUKS key iteration count is zero",
            exact: true,
            qemu_compares: true,
        },
        Hostile {
            what: "key slot 0 key offset sector 1",
            at: SLOT0 + 40,
            value: Patch::U32(1),
            message: "Keyslot 0 is overlapping with the LUKS header",
            exact: true,
            qemu_compares: true,
        },
        Hostile {
            what: "key bytes 40",
            at: 108,
            value: Patch::U32(40),
            message: "Algorithm 'aes' with key size 20 bytes not supported",
            exact: true,
            qemu_compares: true,
        },
        Hostile {
            what: "magic broken",
            at: 0,
            value: Patch::U32(0x1234_5678),
            message: "Volume is not in LUKS format",
            exact: true,
            qemu_compares: true,
        },
        Hostile {
            what: "version 2",
            at: 6,
            value: Patch::U16(2),
            message: "LUKS version 2 is not supported",
            exact: true,
            qemu_compares: true,
        },
        Hostile {
            what: "payload offset 0",
            at: 104,
            value: Patch::U32(0),
            message: "LUKS payload is overlapping with the header",
            exact: true,
            qemu_compares: true,
        },
        Hostile {
            what: "key slot 0 state neither enabled nor disabled",
            at: SLOT0,
            value: Patch::U32(0x1234),
            message: "Keyslot 0 state (active/disable) is corrupted",
            exact: true,
            qemu_compares: true,
        },
    ]
}

#[test]
fn hostile_luks_headers() {
    let s = Scratch::new();
    let base = luks_image(&s, "hostile-base.qcow2");
    let original = std::fs::read(&base).unwrap();
    let luks = luks_offset(&original);
    // The slot the passphrase unlocks is slot 0, enabled.
    assert_eq!(&original[luks..luks + 6], b"LUKS\xba\xbe");
    assert_eq!(
        &original[luks + SLOT0..luks + SLOT0 + 4],
        &0x00AC_71F3u32.to_be_bytes()
    );
    let mut failures = Vec::new();
    for case in hostile_cases() {
        let img = s.path("hostile.qcow2");
        let mut bytes = original.clone();
        let at = luks + case.at;
        match case.value {
            Patch::U16(v) => bytes[at..at + 2].copy_from_slice(&v.to_be_bytes()),
            Patch::U32(v) => bytes[at..at + 4].copy_from_slice(&v.to_be_bytes()),
        }
        std::fs::write(&img, &bytes).unwrap();
        let open = open_args(&img, "s0", PASS);
        let cmds = sv(&["read -P 0x11 0 64k"]);
        for ro in [true, false] {
            let ours = ours_io(ro, &open, &cmds);
            let m = ours.first_message();
            let got = m.strip_prefix("can't open: ").unwrap_or(&m);
            let ok_message = if case.exact {
                got == case.message
            } else {
                got.contains(case.message)
            };
            if ours.code != Some(1)
                || ours.stderr_str().contains("panicked")
                || ours.elapsed > Duration::from_secs(5)
                || !ok_message
                || !m.starts_with("can't open: ")
                || qcow2_tests::check_one_line_stderr(&ours).is_err()
            {
                failures.push(format!(
                    "{} (read-only {ro}): want exit 1 within 5 s, one line \"can't open: {}{}\":\n{}",
                    case.what,
                    if case.exact { "" } else { "...contains " },
                    case.message,
                    ours.describe()
                ));
                continue;
            }
            if case.qemu_compares && ro {
                let mut a: Vec<std::ffi::OsString> = Vec::new();
                a.extend(io_args(ro, &open, &cmds).into_iter().map(Into::into));
                let refs: Vec<&std::ffi::OsStr> = a.iter().map(|x| x.as_os_str()).collect();
                let qemu = run_qemu_tool_limited("qemu-io", &refs, Duration::from_secs(60));
                let qm = qemu.first_message();
                if qemu.code != ours.code || qm != m {
                    failures.push(format!(
                        "{}: qemu-io says otherwise\nours: {}\nqemu: {}",
                        case.what,
                        ours.describe(),
                        qemu.describe()
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} hostile header case(s) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
