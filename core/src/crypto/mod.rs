//! Encrypted images: the data key of an unlocked image ([`DiskKey`], zeroed when dropped) and the sector
//! cipher it drives (`sector`), the LUKS unlock (`unlock`: PBKDF2, the key slot's material decrypted and
//! merged a sector at a time) and the LUKS area of a new image (`create`). The engine decrypts data clusters
//! as it reads them and encrypts data as it writes it, 512 bytes at a time, with each sector's IV made from
//! its host sector number (LUKS) or guest sector number (legacy AES), as QEMU does.

mod sector;
#[cfg(feature = "luks")]
mod unlock;
#[cfg(feature = "luks")]
pub(crate) use unlock::unlock;
#[cfg(feature = "luks")]
pub mod create;

use zeroize::Zeroize;

use crate::format::luks::{CipherSpec, MAX_KEY_BYTES};
pub(crate) use sector::SECTOR;
const _: () = assert!(SECTOR == 1 << 9);
/// The offset of a byte inside its sector: `offset & SECTOR_MASK`.
pub(crate) const SECTOR_MASK: u64 = SECTOR as u64 - 1;

/// Which way data goes through the cipher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Encrypt,
    Decrypt,
}

/// The data key of an unlocked encrypted image, with how it is used. Zeroed when dropped.
pub struct DiskKey {
    key: [u8; MAX_KEY_BYTES],
    spec: CipherSpec,
    /// IVs from host sector numbers (LUKS), else from guest sector numbers (legacy AES).
    physical: bool,
}

impl core::fmt::Debug for DiskKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DiskKey")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl Drop for DiskKey {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl DiskKey {
    pub(crate) fn new(spec: CipherSpec, key: &[u8], physical: bool) -> Self {
        let mut k = [0u8; MAX_KEY_BYTES];
        let n = key.len().min(MAX_KEY_BYTES);
        if let (Some(d), Some(s)) = (k.get_mut(..n), key.get(..n)) {
            crate::format::copy_prefix(d, s);
        }
        DiskKey {
            key: k,
            spec,
            physical,
        }
    }

    /// Legacy AES (`crypt_method` 1): AES-128-CBC, plain64 IVs of guest sectors, the key the passphrase's
    /// first 16 bytes (zero-padded).
    #[cfg(feature = "aes-legacy")]
    pub(crate) fn legacy_aes(passphrase: &[u8]) -> Self {
        use crate::format::luks::{CipherAlgorithm, CipherMode, IvGenerator};
        let mut k = [0u8; 16];
        let n = passphrase.len().min(16);
        if let (Some(d), Some(s)) = (k.get_mut(..n), passphrase.get(..n)) {
            crate::format::copy_prefix(d, s);
        }
        let spec = CipherSpec {
            algorithm: CipherAlgorithm::Aes128,
            mode: CipherMode::Cbc,
            ivgen: IvGenerator::Plain64,
            ivgen_hash: None,
        };
        let key = DiskKey::new(spec, &k, false);
        k.zeroize();
        key
    }

    /// How data is encrypted.
    pub fn spec(&self) -> CipherSpec {
        self.spec
    }

    /// Whether a sector's IV is its host sector number (else its guest sector number).
    pub(crate) fn physical(&self) -> bool {
        self.physical
    }

    fn key(&self) -> &[u8] {
        self.key.get(..self.spec.key_bytes()).unwrap_or(&[])
    }

    /// Encrypts or decrypts `buf` (whole 512-byte sectors) in place, its first sector numbered `sector`.
    pub(crate) fn apply(&self, sector: u64, buf: &mut [u8], dir: Direction) {
        sector::apply(&self.spec, self.key(), sector, buf, dir);
    }

    /// [`Self::apply`] for data at byte `offset` (host offset for LUKS, guest offset for legacy AES): the
    /// sector number is `offset / 512`.
    pub(crate) fn apply_at(&self, offset: u64, buf: &mut [u8], dir: Direction) {
        self.apply(offset >> 9, buf, dir);
    }
}
