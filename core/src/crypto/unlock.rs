//! Unlocking a LUKS area: for each enabled key slot, the passphrase through PBKDF2 gives the slot key; the
//! slot's key material is read and decrypted one sector at a time and merged stripe by stripe (the
//! anti-forensic splitter undone: each stripe XORed into a running block that is then diffused with the
//! hash), so the 256 KB of material is never in memory at once; the merged master key is right when its
//! PBKDF2 digest matches the header's (compared in constant time). Also the hash-generic pieces the LUKS
//! area of a new image needs (`create` uses them).

use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use super::{Direction, DiskKey, SECTOR};
use crate::Error;
use crate::device::BlockDevice;
use crate::format::luks::{
    DIGEST_LEN, HashAlgorithm, LUKS_SECTOR, LuksError, LuksHeader, MAX_ITERATIONS, MAX_KEY_BYTES,
};
use crate::io::read_bytes;

/// PBKDF2-HMAC with `hash` of `password` and `salt`, `iterations` rounds, into `out`.
pub fn pbkdf2(hash: HashAlgorithm, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
    match hash {
        HashAlgorithm::Sha1 => pbkdf2::pbkdf2_hmac::<sha1::Sha1>(password, salt, iterations, out),
        HashAlgorithm::Sha224 => {
            pbkdf2::pbkdf2_hmac::<sha2::Sha224>(password, salt, iterations, out)
        }
        HashAlgorithm::Sha256 => {
            pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, out)
        }
        #[cfg(feature = "luks-sha512")]
        HashAlgorithm::Sha384 => {
            pbkdf2::pbkdf2_hmac::<sha2::Sha384>(password, salt, iterations, out)
        }
        #[cfg(feature = "luks-sha512")]
        HashAlgorithm::Sha512 => {
            pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password, salt, iterations, out)
        }
        // Refused before any use (`hash_supported`).
        #[cfg(not(feature = "luks-sha512"))]
        HashAlgorithm::Sha384 | HashAlgorithm::Sha512 => out.fill(0),
    }
}

/// The splitter's diffusion of `block` in place: each digest-sized piece `i` replaced by the hash of
/// `be32(i) || piece`, truncated to the piece.
pub(crate) fn diffuse(hash: HashAlgorithm, block: &mut [u8]) {
    match hash {
        HashAlgorithm::Sha1 => diffuse_with::<sha1::Sha1>(block),
        HashAlgorithm::Sha224 => diffuse_with::<sha2::Sha224>(block),
        HashAlgorithm::Sha256 => diffuse_with::<sha2::Sha256>(block),
        #[cfg(feature = "luks-sha512")]
        HashAlgorithm::Sha384 => diffuse_with::<sha2::Sha384>(block),
        #[cfg(feature = "luks-sha512")]
        HashAlgorithm::Sha512 => diffuse_with::<sha2::Sha512>(block),
        #[cfg(not(feature = "luks-sha512"))]
        HashAlgorithm::Sha384 | HashAlgorithm::Sha512 => {}
    }
}

/// Whether this build has `hash` (SHA-384 and SHA-512 need the `luks-sha512` feature).
pub fn hash_supported(hash: HashAlgorithm) -> bool {
    cfg!(feature = "luks-sha512") || !matches!(hash, HashAlgorithm::Sha384 | HashAlgorithm::Sha512)
}

fn diffuse_with<H: sha2::Digest>(block: &mut [u8]) {
    let n = <H as sha2::Digest>::output_size();
    for (i, piece) in block.chunks_mut(n.max(1)).enumerate() {
        let mut h = H::new();
        h.update((i as u32).to_be_bytes());
        h.update(&*piece);
        let out = h.finalize();
        if let Some(d) = out.get(..piece.len()) {
            crate::format::copy_prefix(piece, d);
        }
    }
}

/// XORs `b` into `a`.
pub(crate) fn xor_into(a: &mut [u8], b: &[u8]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x ^= *y;
    }
}

/// Refuses iteration counts above [`MAX_ITERATIONS`] before any PBKDF2 runs, so that a hostile header is
/// refused at once instead of taking hours.
fn check_iterations(h: &LuksHeader) -> Result<(), LuksError> {
    if h.master_key_iterations > MAX_ITERATIONS {
        return Err(LuksError::TooManyIterations {
            slot: None,
            iterations: h.master_key_iterations,
        });
    }
    for (i, s) in h.slots.iter().enumerate() {
        if s.active && s.iterations > MAX_ITERATIONS {
            return Err(LuksError::TooManyIterations {
                slot: Some(i as u8),
                iterations: s.iterations,
            });
        }
    }
    Ok(())
}

/// Unlocks the LUKS area at host offset `area` (`area_len` bytes, as the header extension gives) of `dev`
/// with `passphrase`: the data key, or [`LuksError::WrongPassphrase`] when no enabled slot opens.
pub(crate) fn unlock<D: BlockDevice>(
    dev: &mut D,
    bounce: &mut [u8],
    area: u64,
    area_len: u64,
    h: &LuksHeader,
    passphrase: &[u8],
) -> Result<DiskKey, Error<D::Error>> {
    check_iterations(h).map_err(Error::Encryption)?;
    if !hash_supported(h.hash) {
        return Err(Error::Encryption(LuksError::Unsupported(
            "a LUKS hash of SHA-384 or SHA-512 (the engine's luks-sha512 feature)",
        )));
    }
    let kb = usize::try_from(h.key_bytes).unwrap_or(usize::MAX);
    if kb > MAX_KEY_BYTES || kb != h.cipher.key_bytes() {
        return Err(Error::Encryption(LuksError::UnknownCipher {
            name: crate::format::luks::LuksName::new(b"aes"),
            key_bytes: h.key_bytes,
        }));
    }
    for slot in h.slots.iter().filter(|s| s.active) {
        let material = (kb as u64).saturating_mul(u64::from(slot.stripes));
        let start = u64::from(slot.key_offset_sector).saturating_mul(LUKS_SECTOR);
        if start.saturating_add(material) > area_len {
            return Err(Error::Encryption(LuksError::OutsideArea));
        }
        let mut slot_key = [0u8; MAX_KEY_BYTES];
        let sk = slot_key.get_mut(..kb).unwrap_or(&mut []);
        pbkdf2(h.hash, passphrase, &slot.salt, slot.iterations, sk);
        let cipher = DiskKey::new(h.cipher, sk, true);
        slot_key.zeroize();
        let mut merged = [0u8; MAX_KEY_BYTES];
        let mut stripe = [0u8; MAX_KEY_BYTES];
        let mut sector = [0u8; SECTOR];
        let (mut filled, mut index, mut done, mut n) = (0usize, 0u32, 0u64, 0u64);
        let result = (|| {
            while done < material {
                let len = usize::try_from(material.saturating_sub(done).min(SECTOR as u64))
                    .unwrap_or(SECTOR);
                let buf = sector.get_mut(..len).unwrap_or(&mut []);
                read_bytes(
                    dev,
                    bounce,
                    area.saturating_add(start).saturating_add(done),
                    buf,
                )?;
                cipher.apply(n, buf, Direction::Decrypt);
                for &b in buf.iter() {
                    if let Some(s) = stripe.get_mut(filled) {
                        *s = b;
                    }
                    filled = filled.saturating_add(1);
                    if filled == kb {
                        filled = 0;
                        let m = merged.get_mut(..kb).unwrap_or(&mut []);
                        xor_into(m, stripe.get(..kb).unwrap_or(&[]));
                        index = index.saturating_add(1);
                        if index < slot.stripes {
                            diffuse(h.hash, m);
                        }
                    }
                }
                done = done.saturating_add(len as u64);
                n = n.saturating_add(1);
            }
            Ok::<(), Error<D::Error>>(())
        })();
        stripe.zeroize();
        sector.zeroize();
        drop(cipher);
        result?;
        let master = merged.get(..kb).unwrap_or(&[]);
        let mut digest = [0u8; DIGEST_LEN];
        pbkdf2(
            h.hash,
            master,
            &h.master_key_salt,
            h.master_key_iterations,
            &mut digest,
        );
        if bool::from(digest.ct_eq(&h.master_key_digest)) {
            let key = DiskKey::new(h.cipher, master, true);
            merged.zeroize();
            return Ok(key);
        }
        merged.zeroize();
    }
    Err(Error::Encryption(LuksError::WrongPassphrase))
}
