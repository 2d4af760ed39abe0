//! The LUKS area of a new encrypted image, laid out as QEMU lays it out (`qcrypto_block_luks_create`): the
//! header sectors, then eight key slots of aligned key material; slot 0 holds the master key split into
//! 4000 stripes (random stripes XORed and diffused, the last one the master key XOR the running block) and
//! encrypted with the passphrase's slot key, sector by sector. The caller supplies the randomness and the
//! iteration counts (calibrated on its machine), and stores the bytes: the area is produced a sector at a
//! time, so it never needs to be in memory.

use zeroize::Zeroize;

use crate::format::copy_prefix;

use super::unlock::{diffuse, pbkdf2, xor_into};
use super::{Direction, DiskKey, SECTOR};
use crate::format::luks::{
    CipherSpec, DIGEST_LEN, HashAlgorithm, KEY_SLOTS, KeySlot, LUKS_HEADER_LEN, LUKS_SECTOR,
    LuksHeader, MAX_KEY_BYTES, SALT_LEN, STRIPES, UUID_LEN,
};

pub use super::unlock::{hash_supported, pbkdf2 as pbkdf2_hmac};

/// What a new LUKS area uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuksParams {
    /// Cipher, mode and IV generator of the data (and of the key material).
    pub cipher: CipherSpec,
    /// PBKDF2 and splitter hash.
    pub hash: HashAlgorithm,
    /// PBKDF2 iterations of the passphrase (key slot 0).
    pub slot_iterations: u32,
    /// PBKDF2 iterations of the master-key digest.
    pub master_key_iterations: u32,
    /// The UUID as text (QEMU's 36 characters, NUL-padded).
    pub uuid: [u8; UUID_LEN],
}

/// Where [`build_area`] stores the area's bytes: `(offset in the area, bytes)`.
pub type AreaStore<'a, E> = dyn FnMut(u64, &[u8]) -> Result<(), E> + 'a;

/// Builds the LUKS area for `passphrase`: `random` fills buffers with random bytes, `store(offset, bytes)`
/// writes bytes at `offset` from the start of the area (whole sectors, in increasing order, the header
/// last). Returns the header and the data key. The area's length is [`LuksHeader::area_len`]. The hash must
/// be one this build has ([`hash_supported`]).
pub fn build_area<E>(
    params: &LuksParams,
    passphrase: &[u8],
    random: &mut dyn FnMut(&mut [u8]),
    store: &mut AreaStore<'_, E>,
) -> Result<(LuksHeader, DiskKey), E> {
    let kb = params.cipher.key_bytes().min(MAX_KEY_BYTES);
    let mut master = [0u8; MAX_KEY_BYTES];
    let mk = master.get_mut(..kb).unwrap_or(&mut []);
    random(mk);
    let mut master_key_salt = [0u8; SALT_LEN];
    random(&mut master_key_salt);
    let mut master_key_digest = [0u8; DIGEST_LEN];
    pbkdf2(
        params.hash,
        mk,
        &master_key_salt,
        params.master_key_iterations,
        &mut master_key_digest,
    );
    let kb32 = kb as u32;
    let mut slots: [KeySlot; KEY_SLOTS] = core::array::from_fn(|i| KeySlot::unused(kb32, i));
    let mut salt = [0u8; SALT_LEN];
    random(&mut salt);
    let mut slot_key = [0u8; MAX_KEY_BYTES];
    let sk = slot_key.get_mut(..kb).unwrap_or(&mut []);
    pbkdf2(params.hash, passphrase, &salt, params.slot_iterations, sk);
    let cipher = DiskKey::new(params.cipher, sk, true);
    slot_key.zeroize();

    // The split key, a sector at a time.
    let base = u64::from(LuksHeader::slot_offset_sector(kb32, 0)).saturating_mul(LUKS_SECTOR);
    let mut running = [0u8; MAX_KEY_BYTES];
    let mut stripe = [0u8; MAX_KEY_BYTES];
    let mut sector = [0u8; SECTOR];
    let mut filled = 0usize;
    let mut n = 0u64;
    let mut result = Ok(());
    for index in 0..STRIPES {
        let st = stripe.get_mut(..kb).unwrap_or(&mut []);
        let run = running.get_mut(..kb).unwrap_or(&mut []);
        if index.saturating_add(1) < STRIPES {
            random(st);
            xor_into(run, st);
            diffuse(params.hash, run);
        } else {
            copy_prefix(st, master.get(..kb).unwrap_or(&[]));
            xor_into(st, run);
        }
        for &b in stripe.get(..kb).unwrap_or(&[]) {
            if let Some(s) = sector.get_mut(filled) {
                *s = b;
            }
            filled = filled.saturating_add(1);
            if filled == SECTOR {
                cipher.apply(n, &mut sector, Direction::Encrypt);
                result = store(base.saturating_add(n.saturating_mul(LUKS_SECTOR)), &sector);
                n = n.saturating_add(1);
                filled = 0;
                if result.is_err() {
                    break;
                }
            }
        }
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() && filled > 0 {
        // A last partial sector (key sizes whose material is not whole sectors): encrypted as the shorter
        // unit it is, stored zero-padded.
        let part = sector.get_mut(..filled).unwrap_or(&mut []);
        cipher.apply(n, part, Direction::Encrypt);
        sector.get_mut(filled..).unwrap_or(&mut []).fill(0);
        result = store(base.saturating_add(n.saturating_mul(LUKS_SECTOR)), &sector);
    }
    running.zeroize();
    stripe.zeroize();
    sector.zeroize();
    drop(cipher);
    if let Err(e) = result {
        master.zeroize();
        return Err(e);
    }
    if let Some(s0) = slots.get_mut(0) {
        s0.active = true;
        s0.iterations = params.slot_iterations;
        s0.salt = salt;
    }
    let header = LuksHeader {
        cipher: params.cipher,
        hash: params.hash,
        payload_offset_sector: u32::try_from(LuksHeader::area_len(kb32) / LUKS_SECTOR)
            .unwrap_or(u32::MAX),
        key_bytes: kb32,
        master_key_digest,
        master_key_salt,
        master_key_iterations: params.master_key_iterations,
        uuid: params.uuid,
        slots,
    };
    // The header takes the first two sectors (592 bytes, zero-padded).
    let mut first = [0u8; 2 * SECTOR];
    let mut raw = [0u8; LUKS_HEADER_LEN];
    header.emit(&mut raw);
    if let Some(d) = first.get_mut(..LUKS_HEADER_LEN) {
        copy_prefix(d, &raw);
    }
    store(0, &first)?;
    let key = DiskKey::new(params.cipher, master.get(..kb).unwrap_or(&[]), true);
    master.zeroize();
    Ok((header, key))
}
