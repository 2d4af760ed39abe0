//! Power loss while an encrypted image is written: qemu-img makes LUKS images (4 KiB clusters; 64 KiB with
//! extended L2 and a backing file) and a legacy AES one, the engine writes into them (unaligned writes whose
//! partial sectors are read, patched and rewritten whole, copy-on-write that re-encrypts for the new place,
//! zero writes), and every crash state must open with the passphrase, be clean for an independent refcount
//! counter and for `qemu-img check` (given the secret), and read each cell's old or new data, never
//! ciphertext or a mix.

use qcow2_tests::crash_harness::{
    CELL, PASSPHRASE, exactly, open_read_only, open_recorded, states_of, verify,
};
use qcow2_tests::{Scratch, qemu_img, qemu_img_ok, qemu_io};

const SECRET: &str = "secret,id=s0,data=crash-test";

/// The guest view of encrypted image bytes, read through the engine (with [`PASSPHRASE`]).
fn view(bytes: &[u8], base: &Option<Vec<u8>>, size: u64) -> Vec<u8> {
    let mut image = open_read_only(bytes, base).unwrap();
    let mut out = vec![0u8; size as usize];
    image.read_at(0, &mut out).unwrap();
    out
}

/// Writes uniform-cell patterns with qemu-io into `img` (opened with the secret).
fn qemu_io_secret(img: &std::path::Path, cmds: &[&str]) {
    let opts = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=s0",
        img.display()
    );
    let mut args = vec![
        "--object".to_string(),
        SECRET.to_string(),
        "--image-opts".to_string(),
        opts,
    ];
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    let out = qemu_io(&args);
    let text = out.stdout_str();
    assert!(
        out.success() && !text.contains("verification failed"),
        "qemu-io {args:?}: {text}{}",
        out.stderr_str()
    );
}

#[test]
fn crash_encrypted_writes() {
    assert_eq!(PASSPHRASE, b"crash-test");
    let s = Scratch::new();
    let size = 512u64 << 10;
    let writes: [(u64, usize, u8); 4] = [
        (128, 1024, 1),
        (64 << 10, 8192, 2),
        ((200 << 10) + 384, 640, 3),
        (300 << 10, 70 << 10, 4),
    ];
    let mut total = 0;
    for (opts, with_base) in [
        ("encrypt.format=luks,cluster_size=4096", false),
        (
            "encrypt.format=luks,cluster_size=65536,extended_l2=on",
            true,
        ),
        ("encrypt.format=aes,cluster_size=4096", false),
    ] {
        let img = s.path("e.qcow2");
        let _ = std::fs::remove_file(&img);
        let mut create = vec![
            "create".to_string(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "--object".into(),
            SECRET.into(),
            "-o".into(),
            format!("{opts},encrypt.key-secret=s0"),
        ];
        if opts.contains("luks") {
            create.push("-o".into());
            create.push("encrypt.iter-time=10".into());
        }
        let base = if with_base {
            let raw = s.path("base.raw");
            std::fs::write(&raw, vec![7u8; size as usize]).unwrap();
            create.extend(["-b".into(), "base.raw".into(), "-F".into(), "raw".into()]);
            Some(std::fs::read(&raw).unwrap())
        } else {
            None
        };
        create.push(img.to_str().unwrap().into());
        create.push(size.to_string());
        qemu_img_ok(&create);
        qemu_io_secret(&img, &["write -P 9 0 64k", "write -P 8 256k 4k"]);
        let initial = std::fs::read(&img).unwrap();
        let mut allowed = exactly(&view(&initial, &base, size));
        for &(off, len, byte) in &writes {
            for cell in &mut allowed[off as usize / CELL..(off as usize + len) / CELL] {
                cell.add(byte);
            }
        }
        let zero = (256u64 << 10) + 512;
        for cell in &mut allowed[zero as usize / CELL..(zero as usize + 1024) / CELL] {
            cell.add(0);
        }
        let states = states_of(&initial, |dev| {
            let mut image = open_recorded(dev, base.clone());
            for &(off, len, byte) in &writes {
                image.write_at(off, &vec![byte; len]).unwrap();
            }
            image.write_zeroes(zero, 1024, false).unwrap();
            image.close().unwrap();
        });
        let last = states.len() - 1;
        for (i, (state, how)) in states.iter().enumerate() {
            let what = format!("encrypted writes ({opts}): {how}");
            total += 1;
            let checked = verify(state, &base, &allowed, &what);
            if i == last || i % 9 == 0 {
                let path = s.path("state.qcow2");
                std::fs::write(&path, &checked).unwrap();
                let out = qemu_img([
                    "check".to_string(),
                    "--object".into(),
                    SECRET.into(),
                    "--image-opts".into(),
                    format!(
                        "driver=qcow2,file.filename={},encrypt.key-secret=s0",
                        path.display()
                    ),
                ]);
                assert!(
                    matches!(out.code, Some(0) | Some(3)),
                    "{what}: qemu-img check reports corruption:\n{}",
                    out.describe()
                );
            }
        }
        // The final state reads the new data in qemu-io too.
        std::fs::write(&img, &states[last].0).unwrap();
        let mut cmds: Vec<String> = writes
            .iter()
            .map(|&(off, len, byte)| format!("read -P {byte} {off} {len}"))
            .collect();
        cmds.push(format!("read -P 0 {zero} 1024"));
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io_secret(&img, &refs);
    }
    eprintln!("{total} crash states checked");
}

/// Power loss while a new image is encrypted (`Image::set_up_luks`, as `qcow2 create -o encrypt.format=luks`
/// does after formatting; `set_up_legacy_aes` for `encrypt.format=aes`), with 512 B clusters (the LUKS
/// area spans many refcount blocks' reach, whose blocks are made first) and 64 KiB ones: every crash state
/// is the plain empty image or the encrypted one (opening with the passphrase), consistent for the
/// independent counter (the LUKS area counted as referenced), and reads as zeros; the last one is clean for
/// `qemu-img check` with the secret and reads as zeros in qemu-io.
#[test]
fn crash_encrypting_a_new_image() {
    use qcow2_core::crypto::create::LuksParams;
    use qcow2_core::format::luks::{
        CipherAlgorithm, CipherMode, CipherSpec, HashAlgorithm, IvGenerator,
    };
    let s = Scratch::new();
    let size = 1u64 << 20;
    let mut total = 0;
    for (opts, luks) in [
        ("cluster_size=512", true),
        ("cluster_size=65536", true),
        ("cluster_size=4096", false),
    ] {
        let img = s.qcow2("n.qcow2", opts, size);
        let initial = std::fs::read(&img).unwrap();
        let allowed = exactly(&vec![0u8; size as usize]);
        let states = states_of(&initial, |dev| {
            let mut image = open_recorded(dev, None);
            if luks {
                let params = LuksParams {
                    cipher: CipherSpec {
                        algorithm: CipherAlgorithm::Aes256,
                        mode: CipherMode::Xts,
                        ivgen: IvGenerator::Plain64,
                        ivgen_hash: None,
                    },
                    hash: HashAlgorithm::Sha256,
                    slot_iterations: 1000,
                    master_key_iterations: 1000,
                    uuid: *b"00000000-0000-4000-8000-000000000000\0\0\0\0",
                };
                let mut n = 0u8;
                let mut random = |buf: &mut [u8]| {
                    for b in buf {
                        n = n.wrapping_mul(31).wrapping_add(7);
                        *b = n;
                    }
                };
                image.set_up_luks(&params, PASSPHRASE, &mut random).unwrap();
            } else {
                image.set_up_legacy_aes(PASSPHRASE).unwrap();
            }
            image.close().unwrap();
        });
        let last = states.len() - 1;
        for (i, (state, how)) in states.iter().enumerate() {
            let what = format!("encrypting a new image ({opts}, luks {luks}): {how}");
            total += 1;
            let checked = verify(state, &None, &allowed, &what);
            let crypt = u32::from_be_bytes(checked[32..36].try_into().unwrap());
            assert!(crypt == 0 || crypt == if luks { 2 } else { 1 }, "{what}");
            if i == last {
                assert_ne!(crypt, 0, "{what}: the image is not encrypted at the end");
                std::fs::write(&img, &checked).unwrap();
                let out = qemu_img([
                    "check".to_string(),
                    "--object".into(),
                    SECRET.into(),
                    "--image-opts".into(),
                    format!(
                        "driver=qcow2,file.filename={},encrypt.key-secret=s0",
                        img.display()
                    ),
                ]);
                assert!(out.success(), "{what}: {}", out.describe());
                qemu_io_secret(&img, &["read -P 0 0 1M"]);
            }
        }
    }
    eprintln!("{total} crash states checked");
}
