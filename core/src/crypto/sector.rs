//! The sector cipher: AES-128/192/256 in XTS, CBC or ECB mode over 512-byte sectors, each with its IV
//! (plain, plain64 or ESSIV of its sector number), as QEMU's `qcrypto_block_cipher_*_helper` applies them.
//! The key schedule is expanded once per call, not per sector.

use aes::{Aes128, Aes192, Aes256};
use cbc::cipher::array::Array;
use cbc::cipher::consts::U16;
use cbc::cipher::{
    BlockCipherDecrypt, BlockCipherEncrypt, BlockModeDecrypt, BlockModeEncrypt, BlockSizeUser,
    InnerIvInit, KeyInit,
};

use super::Direction;
use crate::format::luks::{CipherAlgorithm, CipherMode, CipherSpec, IvGenerator};

/// Bytes per encryption sector.
pub(crate) const SECTOR: usize = 512;

type Block = Array<u8, U16>;

trait Aes:
    BlockCipherEncrypt + BlockCipherDecrypt + KeyInit + BlockSizeUser<BlockSize = U16> + Clone
{
}
impl<T: BlockCipherEncrypt + BlockCipherDecrypt + KeyInit + BlockSizeUser<BlockSize = U16> + Clone>
    Aes for T
{
}

/// Encrypts or decrypts `buf` with `key`, sector by sector, the first numbered `sector`; a last partial
/// sector is treated as a shorter unit of its whole 16-byte blocks (as QEMU treats the tail of a key
/// slot's material).
pub(super) fn apply(spec: &CipherSpec, key: &[u8], sector: u64, buf: &mut [u8], dir: Direction) {
    match spec.algorithm {
        CipherAlgorithm::Aes128 => run::<Aes128>(spec, key, sector, buf, dir),
        CipherAlgorithm::Aes192 => run::<Aes192>(spec, key, sector, buf, dir),
        CipherAlgorithm::Aes256 => run::<Aes256>(spec, key, sector, buf, dir),
    }
}

/// The ESSIV cipher: AES keyed with SHA-256 of the data key (the only ESSIV hash whose digest is an AES key
/// size among the hashes this engine has; the header parser refuses the others).
#[cfg(feature = "luks")]
fn essiv_cipher(key: &[u8]) -> Option<Aes256> {
    use sha2::Digest;
    let salt = sha2::Sha256::digest(key);
    Aes256::new_from_slice(&salt).ok()
}

#[cfg(not(feature = "luks"))]
fn essiv_cipher(_key: &[u8]) -> Option<Aes256> {
    None
}

/// XTS (IEEE 1619) over one sector's whole 16-byte blocks: the IV encrypted with the second key is the
/// tweak; each block is XORed with it, goes through the first key, and is XORed again; the tweak is
/// multiplied by x in GF(2^128) between blocks. (Sectors are whole blocks: no ciphertext stealing.)
#[cfg(feature = "luks")]
fn xts_sector<C: Aes>(c1: &C, c2: &C, iv: Block, sector: &mut [u8], dir: Direction) {
    let mut tweak = iv;
    c2.encrypt_block(&mut tweak);
    let (blocks, _) = Block::slice_as_chunks_mut(sector);
    for b in blocks {
        xor_block(b, &tweak);
        match dir {
            Direction::Encrypt => c1.encrypt_block(b),
            Direction::Decrypt => c1.decrypt_block(b),
        }
        xor_block(b, &tweak);
        tweak = times_x(&tweak);
    }
}

/// `t * x` in GF(2^128) with XTS's little-endian byte order and the polynomial x^128 + x^7 + x^2 + x + 1.
#[cfg(feature = "luks")]
fn times_x(t: &Block) -> Block {
    let mut out = Block::default();
    let mut carry = 0u8;
    for (o, &b) in out.iter_mut().zip(t.iter()) {
        *o = (b << 1) | carry;
        carry = b >> 7;
    }
    if carry != 0
        && let Some(first) = out.first_mut()
    {
        *first ^= 0x87;
    }
    out
}

#[cfg(feature = "luks")]
fn xor_block(b: &mut Block, t: &Block) {
    for (x, y) in b.iter_mut().zip(t.iter()) {
        *x ^= *y;
    }
}

/// Copies `bytes` to the start of `block`.
fn put(block: &mut Block, bytes: &[u8]) {
    for (d, s) in block.iter_mut().zip(bytes) {
        *d = *s;
    }
}

fn run<C: Aes>(spec: &CipherSpec, key: &[u8], sector: u64, buf: &mut [u8], dir: Direction) {
    let essiv = match spec.ivgen {
        IvGenerator::Essiv => essiv_cipher(key),
        _ => None,
    };
    let iv = |n: u64| -> Block {
        let mut b = Block::default();
        match spec.ivgen {
            IvGenerator::Plain => put(&mut b, &(n as u32).to_le_bytes()),
            IvGenerator::Plain64 => put(&mut b, &n.to_le_bytes()),
            IvGenerator::Essiv => {
                put(&mut b, &n.to_le_bytes());
                if let Some(c) = &essiv {
                    c.encrypt_block(&mut b);
                }
            }
        }
        b
    };
    match spec.mode {
        #[cfg(not(feature = "luks"))]
        CipherMode::Xts => {}
        #[cfg(feature = "luks")]
        CipherMode::Xts => {
            let half = key.len() / 2;
            let (Ok(c1), Ok(c2)) = (
                C::new_from_slice(key.get(..half).unwrap_or(&[])),
                C::new_from_slice(key.get(half..).unwrap_or(&[])),
            ) else {
                return;
            };
            for (i, s) in buf.chunks_mut(SECTOR).enumerate() {
                xts_sector(&c1, &c2, iv(sector.wrapping_add(i as u64)), s, dir);
            }
        }
        CipherMode::Cbc => {
            let Ok(c) = C::new_from_slice(key) else {
                return;
            };
            for (i, s) in buf.chunks_mut(SECTOR).enumerate() {
                let v = iv(sector.wrapping_add(i as u64));
                let (blocks, _) = Block::slice_as_chunks_mut(s);
                match dir {
                    Direction::Encrypt => {
                        cbc::Encryptor::<C>::inner_iv_init(c.clone(), &v).encrypt_blocks(blocks)
                    }
                    Direction::Decrypt => {
                        cbc::Decryptor::<C>::inner_iv_init(c.clone(), &v).decrypt_blocks(blocks)
                    }
                }
            }
        }
        CipherMode::Ecb => {
            let Ok(c) = C::new_from_slice(key) else {
                return;
            };
            let (blocks, _) = Block::slice_as_chunks_mut(buf);
            match dir {
                Direction::Encrypt => c.encrypt_blocks(blocks),
                Direction::Decrypt => c.decrypt_blocks(blocks),
            }
        }
    }
}

#[cfg(all(test, feature = "luks"))]
mod tests {
    use super::*;
    use crate::format::luks::HashAlgorithm;

    fn spec(algorithm: CipherAlgorithm, mode: CipherMode, ivgen: IvGenerator) -> CipherSpec {
        CipherSpec {
            algorithm,
            mode,
            ivgen,
            ivgen_hash: (ivgen == IvGenerator::Essiv).then_some(HashAlgorithm::Sha256),
        }
    }

    #[test]
    fn every_mode_round_trips_and_depends_on_the_sector() {
        let key: [u8; 64] = core::array::from_fn(|i| (i * 7 + 1) as u8);
        for alg in [
            CipherAlgorithm::Aes128,
            CipherAlgorithm::Aes192,
            CipherAlgorithm::Aes256,
        ] {
            for mode in [CipherMode::Xts, CipherMode::Cbc, CipherMode::Ecb] {
                for ivgen in [IvGenerator::Plain, IvGenerator::Plain64, IvGenerator::Essiv] {
                    let s = spec(alg, mode, ivgen);
                    let k = &key[..s.key_bytes()];
                    let plain: [u8; 1024] = core::array::from_fn(|i| (i % 512 % 251) as u8);
                    let mut a = plain;
                    apply(&s, k, 5, &mut a, Direction::Encrypt);
                    assert_ne!(a, plain);
                    let mut b = plain;
                    apply(&s, k, 6, &mut b, Direction::Encrypt);
                    if mode != CipherMode::Ecb {
                        assert_ne!(a[..512], b[..512], "{s:?}");
                    }
                    // Sector by sector is the same as the whole buffer.
                    assert_eq!(a[512..], b[..512]);
                    apply(&s, k, 5, &mut a, Direction::Decrypt);
                    assert_eq!(a, plain);
                }
            }
        }
    }

    #[test]
    fn xts_matches_ieee_vector() {
        // IEEE 1619 XTS-AES-128 vector 4 (sector 0, 512 bytes 0..=255 twice).
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(&[
            0x27, 0x18, 0x28, 0x18, 0x28, 0x45, 0x90, 0x45, 0x23, 0x53, 0x60, 0x28, 0x74, 0x71,
            0x35, 0x26,
        ]);
        key[16..].copy_from_slice(&[
            0x31, 0x41, 0x59, 0x26, 0x53, 0x58, 0x97, 0x93, 0x23, 0x84, 0x62, 0x64, 0x33, 0x83,
            0x27, 0x95,
        ]);
        let mut buf: [u8; 512] = core::array::from_fn(|i| i as u8);
        let s = spec(
            CipherAlgorithm::Aes128,
            CipherMode::Xts,
            IvGenerator::Plain64,
        );
        apply(&s, &key, 0, &mut buf, Direction::Encrypt);
        assert_eq!(
            buf[..16],
            [
                0x27, 0xa7, 0x47, 0x9b, 0xef, 0xa1, 0xd4, 0x76, 0x48, 0x9f, 0x30, 0x8c, 0xd4, 0xcf,
                0xa6, 0xe2
            ]
        );
    }
}
