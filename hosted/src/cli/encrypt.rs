//! Encryption options as qemu-img takes them: `create -o encrypt.format=luks|aes,encrypt.key-secret=ID`
//! (with `encrypt.cipher-alg`, `cipher-mode`, `ivgen-alg`, `ivgen-hash-alg`, `hash-alg`, `iter-time`, and
//! the old `encryption=on`), and the new image's LUKS area built with the OS's randomness and PBKDF2
//! iteration counts calibrated on this machine for `iter-time` milliseconds, as QEMU calibrates them.

use std::time::Instant;

use qcow2_core::crypto::create::{LuksParams, pbkdf2_hmac};
use qcow2_core::format::luks::{
    CipherAlgorithm, CipherMode, CipherSpec, HashAlgorithm, IvGenerator, MAX_ITERATIONS, STRIPES,
    UUID_LEN,
};

use crate::cli::create::CreateError;
use crate::file::FileDevice;

/// The encryption a new image gets.
#[derive(Debug, Clone)]
pub(crate) enum NewEncryption {
    /// LUKS with these choices.
    Luks {
        cipher: CipherSpec,
        hash: HashAlgorithm,
        iter_time_ms: u64,
        passphrase: Vec<u8>,
    },
    /// Legacy AES (`crypt_method` 1).
    Aes { passphrase: Vec<u8> },
}

fn err(m: String) -> CreateError {
    CreateError(m)
}

/// The encryption `create`'s options ask for (`opt(name)` gives an option's text), or `None`.
pub(crate) fn parse_create(
    opt: &dyn Fn(&'static str) -> Option<String>,
    file: &str,
) -> Result<Option<NewEncryption>, CreateError> {
    let legacy = matches!(
        opt("encryption").as_deref(),
        Some("on" | "yes" | "true" | "y")
    );
    let format = match (opt("encrypt.format").as_deref(), legacy) {
        (Some(f), true) => {
            return Err(err(format!(
                "{file}: Options \"encryption\" and \"encrypt.format\" are mutually exclusive (encrypt.format={f})"
            )));
        }
        (None, true) => "aes".to_string(),
        (Some(f), false) => f.to_string(),
        (None, false) => {
            if let Some(k) = [
                "encrypt.key-secret",
                "encrypt.cipher-alg",
                "encrypt.cipher-mode",
                "encrypt.ivgen-alg",
                "encrypt.ivgen-hash-alg",
                "encrypt.hash-alg",
                "encrypt.iter-time",
            ]
            .into_iter()
            .find(|k| opt(k).is_some())
            {
                return Err(err(format!(
                    "{file}: Parameter 'encrypt.format' is required with option '{k}'"
                )));
            }
            return Ok(None);
        }
    };
    if format != "luks" && format != "aes" {
        return Err(err(format!(
            "{file}: Parameter 'encrypt.format' does not accept value '{format}'"
        )));
    }
    let Some(id) = opt("encrypt.key-secret") else {
        return Err(err(format!(
            "{file}: Parameter 'encrypt.key-secret' is required for cipher"
        )));
    };
    let Some(passphrase) = crate::cli::object::secret(&id) else {
        return Err(err(format!("{file}: No secret with id '{id}'")));
    };
    if format == "aes" {
        return Ok(Some(NewEncryption::Aes { passphrase }));
    }
    let unsupported = |what: &str, v: &str| err(format!("{file}: {what} '{v}' is not supported"));
    let algorithm = match opt("encrypt.cipher-alg").as_deref() {
        None | Some("aes-256") => CipherAlgorithm::Aes256,
        Some("aes-128") => CipherAlgorithm::Aes128,
        Some("aes-192") => CipherAlgorithm::Aes192,
        Some(other) => return Err(unsupported("Cipher algorithm", other)),
    };
    let mode = match opt("encrypt.cipher-mode").as_deref() {
        None | Some("xts") => CipherMode::Xts,
        Some("cbc") => CipherMode::Cbc,
        Some("ecb") => CipherMode::Ecb,
        Some(other) => return Err(unsupported("Cipher mode", other)),
    };
    let ivgen = match opt("encrypt.ivgen-alg").as_deref() {
        None | Some("plain64") => IvGenerator::Plain64,
        Some("plain") => IvGenerator::Plain,
        Some("essiv") => IvGenerator::Essiv,
        Some(other) => return Err(unsupported("IV generator", other)),
    };
    let hash_of = |v: &str| {
        HashAlgorithm::from_name(v.as_bytes()).map_err(|_| unsupported("Hash algorithm", v))
    };
    let hash = match opt("encrypt.hash-alg") {
        None => HashAlgorithm::Sha256,
        Some(v) => hash_of(&v)?,
    };
    let ivgen_hash = match (opt("encrypt.ivgen-hash-alg"), ivgen) {
        (Some(v), _) => Some(hash_of(&v)?),
        (None, IvGenerator::Essiv) => Some(HashAlgorithm::Sha256),
        (None, _) => None,
    };
    if ivgen == IvGenerator::Essiv && ivgen_hash != Some(HashAlgorithm::Sha256) {
        return Err(err(format!(
            "{file}: ESSIV with a hash other than sha256 is not supported"
        )));
    }
    let cipher = CipherSpec {
        algorithm,
        mode,
        ivgen,
        ivgen_hash,
    };
    if !(cipher.key_bytes() * STRIPES as usize).is_multiple_of(512) {
        // QEMU stops on an assertion when it makes or opens one.
        return Err(err(format!(
            "{file}: {}-{} is not supported: its key material is not whole 512-byte sectors, which QEMU \
             cannot handle",
            algorithm.name(),
            mode.name()
        )));
    }
    let iter_time_ms = match opt("encrypt.iter-time") {
        None => 2000,
        Some(v) => v.parse::<u64>().map_err(|_| {
            err(format!(
                "{file}: Parameter 'encrypt.iter-time' expects a number"
            ))
        })?,
    };
    Ok(Some(NewEncryption::Luks {
        cipher,
        hash,
        iter_time_ms,
        passphrase,
    }))
}

/// PBKDF2 iterations of `hash` per second on this machine, for `out_len` bytes of output.
fn pbkdf2_rate(hash: HashAlgorithm, out_len: usize) -> u64 {
    let mut out = vec![0u8; out_len];
    let salt = [0u8; 32];
    let mut iterations: u32 = 1 << 10;
    loop {
        let start = Instant::now();
        pbkdf2_hmac(hash, b"calibration", &salt, iterations, &mut out);
        let ns = start.elapsed().as_nanos().max(1);
        if ns >= 100_000_000 || iterations >= 1 << 28 {
            return u64::try_from(u128::from(iterations) * 1_000_000_000 / ns).unwrap_or(u64::MAX);
        }
        iterations = iterations.saturating_mul(2);
    }
}

/// `rate * ms / 1000`, at least 1000 (QEMU's minimum) and at most what the engine unlocks.
fn iterations_for(rate: u64, ms: u64, divisor: u64) -> u32 {
    let n = rate.saturating_mul(ms) / 1000 / divisor.max(1);
    u32::try_from(n.clamp(1000, u64::from(MAX_ITERATIONS))).unwrap_or(MAX_ITERATIONS)
}

/// A random version 4 UUID as text, NUL-padded.
fn random_uuid() -> [u8; UUID_LEN] {
    let mut b = [0u8; 16];
    let _ = getrandom::fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let text = format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    );
    let mut out = [0u8; UUID_LEN];
    out[..text.len()].copy_from_slice(text.as_bytes());
    out
}

/// Encrypts the new, empty image `file` as `e` asks.
pub(crate) fn encrypt_new_image(file: &str, e: &NewEncryption) -> Result<(), CreateError> {
    let fail = |m: String| err(format!("{file}: {m}"));
    let f = crate::file::open_image_file(file, true).map_err(|e| fail(e.text(file)))?;
    let mut resolver = crate::chain::ChainResolver::for_top(file);
    resolver.writable_top = true;
    let mut image = qcow2_alloc::open_writable(FileDevice::new(f), &mut resolver)
        .map_err(|e| fail(e.to_string()))?;
    match e {
        NewEncryption::Aes { passphrase } => image
            .set_up_legacy_aes(passphrase)
            .map_err(|e| fail(e.to_string()))?,
        NewEncryption::Luks {
            cipher,
            hash,
            iter_time_ms,
            passphrase,
        } => {
            let slot_rate = pbkdf2_rate(*hash, cipher.key_bytes());
            let digest_rate = pbkdf2_rate(*hash, 20);
            let params = LuksParams {
                cipher: *cipher,
                hash: *hash,
                slot_iterations: iterations_for(slot_rate, *iter_time_ms, 1),
                master_key_iterations: iterations_for(digest_rate, *iter_time_ms, 8),
                uuid: random_uuid(),
            };
            let mut random = |buf: &mut [u8]| {
                let _ = getrandom::fill(buf);
            };
            image
                .set_up_luks(&params, passphrase, &mut random)
                .map_err(|e| fail(e.to_string()))?;
        }
    }
    image.close().map_err(|e| fail(e.to_string()))?;
    // The rest of the command (convert's copy into it) opens it with the same secret.
    let (NewEncryption::Aes { passphrase } | NewEncryption::Luks { passphrase, .. }) = e;
    crate::chain::add_passphrase(file, passphrase);
    Ok(())
}
