//! The LUKS1 header an encrypted qcow2 image (`crypt_method` 2) stores where its full-disk-encryption header
//! extension points: the 592-byte header (cipher, mode, hash, master-key digest, eight key slots) parsed and
//! checked as QEMU checks it (`qcrypto_block_luks_check_header`, then `..._parse_header`, same order, same
//! messages through [`LuksError`]'s `Display`), and written for new images. Key-material offsets are sectors
//! from the start of that area; the LUKS payload offset is not used by qcow2 (its clusters hold the data).
//! Pure: no I/O, no cryptography.

use core::fmt;

/// Length of the header (key material follows in the slots' own sectors).
pub const LUKS_HEADER_LEN: usize = 592;
/// LUKS sectors (key material offsets, and the unit of data encryption).
pub const LUKS_SECTOR: u64 = 512;
/// Key slots.
pub const KEY_SLOTS: usize = 8;
/// Anti-forensic stripes per key slot (the only count QEMU accepts).
pub const STRIPES: u32 = 4000;
/// The key slots start at this byte of the area (the header's own sectors before them).
pub const KEY_SLOT_OFFSET: u32 = 4096;
/// Longest master key: AES-256 in XTS mode (two 32-byte keys).
pub const MAX_KEY_BYTES: usize = 64;
/// Salts (master-key digest and key slots).
pub const SALT_LEN: usize = 32;
/// The master-key digest.
pub const DIGEST_LEN: usize = 20;
/// The UUID text field.
pub const UUID_LEN: usize = 40;
/// A key slot in use.
pub const SLOT_ENABLED: u32 = 0x00AC_71F3;
/// A key slot not in use.
pub const SLOT_DISABLED: u32 = 0x0000_DEAD;
const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
const NAME_LEN: usize = 32;
const SLOT_LEN: usize = 48;
const SLOTS_AT: usize = 208;
/// Sectors before the first key slot (QEMU's `header_sectors`; key material is aligned to it too).
const HEADER_SECTORS: u32 = KEY_SLOT_OFFSET / LUKS_SECTOR as u32;

/// A name from the header (cipher, mode, hash), for messages: NUL-terminated in 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct LuksName {
    bytes: [u8; NAME_LEN],
    len: u8,
}

impl LuksName {
    pub(crate) fn new(s: &[u8]) -> Self {
        let mut bytes = [0u8; NAME_LEN];
        let n = s.len().min(NAME_LEN);
        super::copy_prefix(&mut bytes, s);
        let _ = n;
        LuksName {
            bytes,
            len: n as u8,
        }
    }
    /// The name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or(&[])
    }
}

impl fmt::Debug for LuksName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for LuksName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.as_bytes() {
            if b.is_ascii_graphic() || b == b' ' {
                fmt::Write::write_char(f, char::from(b))?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for LuksName {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "{=[u8]:a}", self.as_bytes())
    }
}

/// What is wrong with an encrypted image's header, or with unlocking it. `Display` gives QEMU's message
/// where QEMU has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum LuksError {
    /// The area does not start with LUKS's magic.
    NotLuks,
    /// A LUKS version other than 1.
    Version(u16),
    /// A name field without its terminating NUL (`"cipher name"`, `"cipher mode"`, `"hash spec"`).
    NotTerminated(&'static str),
    /// The payload offset lies inside the header sectors.
    PayloadOverlapsHeader,
    /// The master-key digest's iteration count is 0.
    MasterIterationsZero,
    /// A key slot's stripe count is not 4000.
    Stripes {
        /// The slot.
        slot: u8,
        /// Its stripe count.
        stripes: u32,
    },
    /// A key slot's state is neither enabled nor disabled.
    SlotState(u8),
    /// An enabled key slot's iteration count is 0.
    SlotIterationsZero(u8),
    /// A key slot's material starts inside the header sectors.
    SlotOverlapsHeader(u8),
    /// A key slot's material reaches past the payload offset.
    SlotOverlapsPayload(u8),
    /// Two key slots' material overlaps.
    SlotsOverlap(u8, u8),
    /// The cipher mode field is not `mode-ivgen[:hash]`.
    ModeFormat(LuksName),
    /// A hash this header names that QEMU does not know.
    UnknownHash(LuksName),
    /// A cipher mode QEMU does not know.
    UnknownMode(LuksName),
    /// A cipher name and key size QEMU does not know.
    UnknownCipher {
        /// The cipher name.
        name: LuksName,
        /// The key size in bytes (for XTS, of one of its two keys).
        key_bytes: u32,
    },
    /// An IV generator QEMU does not know.
    UnknownIvGenerator(LuksName),
    /// ESSIV without its hash.
    MissingIvHash,
    /// ESSIV with a hash whose digest is no AES key size.
    NoEssivCipher(u8),
    /// Something QEMU supports and this engine does not (a cipher, mode or hash; named).
    Unsupported(&'static str),
    /// An iteration count above this engine's limit (a header that would take hours to unlock).
    TooManyIterations {
        /// The slot, or `None` for the master-key digest.
        slot: Option<u8>,
        /// The count found.
        iterations: u32,
    },
    /// A key slot's material lies outside the area the header extension gives.
    OutsideArea,
    /// No enabled key slot opens with the passphrase.
    WrongPassphrase,
    /// The image is encrypted and no passphrase was given to unlock it.
    Locked,
    /// The header extension giving the LUKS area is missing or malformed.
    BadExtension(&'static str),
}

/// The largest PBKDF2 iteration count the engine runs: far above what `iter-time` calibration produces
/// (millions), far below the 2^32 - 1 a hostile header can ask for.
pub const MAX_ITERATIONS: u32 = 1 << 26;

impl fmt::Display for LuksError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LuksError::NotLuks => f.write_str("Volume is not in LUKS format"),
            LuksError::Version(v) => write!(f, "LUKS version {v} is not supported"),
            LuksError::NotTerminated(what) => write!(f, "LUKS header {what} is not NUL terminated"),
            LuksError::PayloadOverlapsHeader => {
                f.write_str("LUKS payload is overlapping with the header")
            }
            LuksError::MasterIterationsZero => f.write_str("LUKS key iteration count is zero"),
            LuksError::Stripes { slot, stripes } => write!(
                f,
                "Keyslot {slot} is corrupted (stripes {} != {STRIPES})",
                *stripes as i32
            ),
            LuksError::SlotState(s) => write!(f, "Keyslot {s} state (active/disable) is corrupted"),
            LuksError::SlotIterationsZero(s) => write!(f, "Keyslot {s} iteration count is zero"),
            LuksError::SlotOverlapsHeader(s) => {
                write!(f, "Keyslot {s} is overlapping with the LUKS header")
            }
            LuksError::SlotOverlapsPayload(s) => {
                write!(f, "Keyslot {s} is overlapping with the encrypted payload")
            }
            LuksError::SlotsOverlap(a, b) => {
                write!(f, "Keyslots {a} and {b} are overlapping in the header")
            }
            LuksError::ModeFormat(m) => write!(f, "Unexpected cipher mode string format '{m}'"),
            LuksError::UnknownHash(h) => write!(f, "Hash algorithm '{h}' not supported"),
            LuksError::UnknownMode(m) => write!(f, "Cipher mode '{m}' not supported"),
            LuksError::UnknownCipher { name, key_bytes } => write!(
                f,
                "Algorithm '{name}' with key size {key_bytes} bytes not supported"
            ),
            LuksError::UnknownIvGenerator(g) => write!(f, "IV generator '{g}' not supported"),
            LuksError::MissingIvHash => f.write_str("Missing IV generator hash specification"),
            LuksError::NoEssivCipher(n) => write!(f, "No AES cipher with key size {n} available"),
            LuksError::Unsupported(what) => write!(f, "{what} is not supported by this engine"),
            LuksError::TooManyIterations {
                slot: Some(s),
                iterations,
            } => write!(
                f,
                "Keyslot {s} iteration count {iterations} is above this engine's limit of {MAX_ITERATIONS}"
            ),
            LuksError::TooManyIterations {
                slot: None,
                iterations,
            } => write!(
                f,
                "LUKS key iteration count {iterations} is above this engine's limit of {MAX_ITERATIONS}"
            ),
            LuksError::OutsideArea => f.write_str("Request for data outside of extension header"),
            LuksError::WrongPassphrase => {
                f.write_str("Invalid password, cannot unlock any keyslot")
            }
            LuksError::Locked => {
                f.write_str("the image is encrypted and no passphrase unlocked it")
            }
            LuksError::BadExtension(what) => f.write_str(what),
        }
    }
}

/// The block cipher (AES only in this engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum CipherAlgorithm {
    /// AES with a 16-byte key.
    Aes128,
    /// AES with a 24-byte key.
    Aes192,
    /// AES with a 32-byte key.
    Aes256,
}

impl CipherAlgorithm {
    /// Key length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            CipherAlgorithm::Aes128 => 16,
            CipherAlgorithm::Aes192 => 24,
            CipherAlgorithm::Aes256 => 32,
        }
    }
    /// QEMU's name (`aes-256`).
    pub fn name(self) -> &'static str {
        match self {
            CipherAlgorithm::Aes128 => "aes-128",
            CipherAlgorithm::Aes192 => "aes-192",
            CipherAlgorithm::Aes256 => "aes-256",
        }
    }
    fn from_key_len(n: u32) -> Option<Self> {
        match n {
            16 => Some(CipherAlgorithm::Aes128),
            24 => Some(CipherAlgorithm::Aes192),
            32 => Some(CipherAlgorithm::Aes256),
            _ => None,
        }
    }
}

/// The block cipher mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum CipherMode {
    /// Electronic codebook (no IV).
    Ecb,
    /// Cipher block chaining.
    Cbc,
    /// XTS (the key is two keys).
    Xts,
}

impl CipherMode {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
        }
    }
}

/// How each sector's IV is made from its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum IvGenerator {
    /// The low 32 bits, little-endian.
    Plain,
    /// The 64 bits, little-endian.
    Plain64,
    /// The 64 bits encrypted with a key that is the hash of the data key.
    Essiv,
}

impl IvGenerator {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            IvGenerator::Plain => "plain",
            IvGenerator::Plain64 => "plain64",
            IvGenerator::Essiv => "essiv",
        }
    }
}

/// The hash of PBKDF2, of the anti-forensic splitter and of ESSIV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum HashAlgorithm {
    /// SHA-1.
    Sha1,
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashAlgorithm {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            HashAlgorithm::Sha1 => "sha1",
            HashAlgorithm::Sha224 => "sha224",
            HashAlgorithm::Sha256 => "sha256",
            HashAlgorithm::Sha384 => "sha384",
            HashAlgorithm::Sha512 => "sha512",
        }
    }
    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlgorithm::Sha1 => 20,
            HashAlgorithm::Sha224 => 28,
            HashAlgorithm::Sha256 => 32,
            HashAlgorithm::Sha384 => 48,
            HashAlgorithm::Sha512 => 64,
        }
    }
    /// The hash QEMU calls `name` (`Err(true)`: one QEMU knows and this engine does not).
    pub fn from_name(name: &[u8]) -> Result<Self, bool> {
        match name {
            b"sha1" => Ok(HashAlgorithm::Sha1),
            b"sha224" => Ok(HashAlgorithm::Sha224),
            b"sha256" => Ok(HashAlgorithm::Sha256),
            b"sha384" => Ok(HashAlgorithm::Sha384),
            b"sha512" => Ok(HashAlgorithm::Sha512),
            b"md5" | b"ripemd160" | b"sm3" => Err(true),
            _ => Err(false),
        }
    }
}

/// How data is encrypted: cipher, mode, IV generator (and its hash for ESSIV).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CipherSpec {
    /// The block cipher.
    pub algorithm: CipherAlgorithm,
    /// Its mode.
    pub mode: CipherMode,
    /// The IV generator.
    pub ivgen: IvGenerator,
    /// The IV generator's hash, when the mode string names one.
    pub ivgen_hash: Option<HashAlgorithm>,
}

impl CipherSpec {
    /// Bytes of key: the cipher's, twice for XTS.
    pub fn key_bytes(&self) -> usize {
        match self.mode {
            CipherMode::Xts => self.algorithm.key_len().saturating_mul(2),
            _ => self.algorithm.key_len(),
        }
    }
}

/// One key slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct KeySlot {
    /// In use.
    pub active: bool,
    /// PBKDF2 iterations for the passphrase.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_LEN],
    /// First sector of the key material, from the start of the area.
    pub key_offset_sector: u32,
    /// Anti-forensic stripes.
    pub stripes: u32,
}

impl KeySlot {
    /// Slot `index` of a new header for `key_bytes`-byte keys: not in use, its material where QEMU puts
    /// it.
    pub fn unused(key_bytes: u32, index: usize) -> KeySlot {
        KeySlot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_offset_sector: LuksHeader::slot_offset_sector(key_bytes, index),
            stripes: STRIPES,
        }
    }
}

/// A checked and parsed LUKS1 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct LuksHeader {
    /// Cipher, mode and IV generator.
    pub cipher: CipherSpec,
    /// The PBKDF2 and splitter hash.
    pub hash: HashAlgorithm,
    /// Payload offset in sectors (qcow2 does not use it; QEMU shows it).
    pub payload_offset_sector: u32,
    /// Master key length in bytes.
    pub key_bytes: u32,
    /// PBKDF2 digest of the master key.
    pub master_key_digest: [u8; DIGEST_LEN],
    /// Its salt.
    pub master_key_salt: [u8; SALT_LEN],
    /// Its iterations.
    pub master_key_iterations: u32,
    /// The UUID as text (NUL-padded).
    pub uuid: [u8; UUID_LEN],
    /// The key slots.
    pub slots: [KeySlot; KEY_SLOTS],
}

fn be32_at(b: &[u8], at: usize) -> u32 {
    super::be32(b, at)
}

fn field<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    super::copy_prefix(&mut out, b.get(at..).unwrap_or(&[]));
    out
}

/// The bytes of a NUL-terminated name field (without the NUL), or `None` when it has none.
fn name_field(b: &[u8], at: usize) -> Option<&[u8]> {
    let f = b.get(at..at.saturating_add(NAME_LEN))?;
    let end = f.iter().position(|&c| c == 0)?;
    f.get(..end)
}

/// Sectors a slot's key material takes, aligned as QEMU aligns it.
pub fn split_key_sectors(key_bytes: u32, stripes: u32) -> u32 {
    let bytes = u64::from(key_bytes).saturating_mul(u64::from(stripes));
    let sectors = bytes.div_ceil(LUKS_SECTOR);
    let aligned = sectors
        .div_ceil(u64::from(HEADER_SECTORS))
        .saturating_mul(u64::from(HEADER_SECTORS));
    u32::try_from(aligned).unwrap_or(u32::MAX)
}

impl LuksHeader {
    /// Checks and parses the first [`LUKS_HEADER_LEN`] bytes of the area, in QEMU's order.
    pub fn parse(b: &[u8]) -> Result<Self, LuksError> {
        if b.get(..6) != Some(&MAGIC[..]) {
            return Err(LuksError::NotLuks);
        }
        let version = u16::from_be_bytes(field(b, 6));
        if version != 1 {
            return Err(LuksError::Version(version));
        }
        let cipher_name = name_field(b, 8).ok_or(LuksError::NotTerminated("cipher name"))?;
        let cipher_mode = name_field(b, 40).ok_or(LuksError::NotTerminated("cipher mode"))?;
        let hash_spec = name_field(b, 72).ok_or(LuksError::NotTerminated("hash spec"))?;
        let payload_offset_sector = be32_at(b, 104);
        let key_bytes = be32_at(b, 108);
        let master_key_iterations = be32_at(b, 164);
        if payload_offset_sector < HEADER_SECTORS {
            return Err(LuksError::PayloadOverlapsHeader);
        }
        if master_key_iterations == 0 {
            return Err(LuksError::MasterIterationsZero);
        }
        let mut slots = [KeySlot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_offset_sector: 0,
            stripes: 0,
        }; KEY_SLOTS];
        let mut raw_state = [0u32; KEY_SLOTS];
        for (i, (slot, state)) in slots.iter_mut().zip(raw_state.iter_mut()).enumerate() {
            let at = SLOTS_AT.saturating_add(i.saturating_mul(SLOT_LEN));
            *state = be32_at(b, at);
            *slot = KeySlot {
                active: *state == SLOT_ENABLED,
                iterations: be32_at(b, at.saturating_add(4)),
                salt: field(b, at.saturating_add(8)),
                key_offset_sector: be32_at(b, at.saturating_add(40)),
                stripes: be32_at(b, at.saturating_add(44)),
            };
        }
        for (i, (slot, state)) in slots.iter().zip(raw_state).enumerate() {
            let n = i as u8;
            let start = slot.key_offset_sector;
            let len = split_key_sectors(key_bytes, slot.stripes);
            if slot.stripes != STRIPES {
                return Err(LuksError::Stripes {
                    slot: n,
                    stripes: slot.stripes,
                });
            }
            if state != SLOT_DISABLED && state != SLOT_ENABLED {
                return Err(LuksError::SlotState(n));
            }
            if slot.active && slot.iterations == 0 {
                return Err(LuksError::SlotIterationsZero(n));
            }
            if start < HEADER_SECTORS {
                return Err(LuksError::SlotOverlapsHeader(n));
            }
            if u64::from(start).saturating_add(u64::from(len)) > u64::from(payload_offset_sector) {
                return Err(LuksError::SlotOverlapsPayload(n));
            }
            for (j, other) in slots.iter().enumerate().skip(i.saturating_add(1)) {
                let s2 = u64::from(other.key_offset_sector);
                let l2 = u64::from(split_key_sectors(key_bytes, other.stripes));
                let s1 = u64::from(start);
                let l1 = u64::from(len);
                if s1 < s2.saturating_add(l2) && s2 < s1.saturating_add(l1) {
                    return Err(LuksError::SlotsOverlap(n, j as u8));
                }
            }
        }
        let (algorithm, mode, ivgen_hash, ivgen_name) =
            parse_cipher(cipher_name, cipher_mode, key_bytes)?;
        let hash = match HashAlgorithm::from_name(hash_spec) {
            Ok(h) => h,
            Err(true) => return Err(LuksError::Unsupported("the LUKS hash")),
            Err(false) => return Err(LuksError::UnknownHash(LuksName::new(hash_spec))),
        };
        let ivgen = parse_ivgen(ivgen_name, ivgen_hash)?;
        let cipher = CipherSpec {
            algorithm,
            mode,
            ivgen,
            ivgen_hash,
        };
        Ok(LuksHeader {
            cipher,
            hash,
            payload_offset_sector,
            key_bytes,
            master_key_digest: field(b, 112),
            master_key_salt: field(b, 132),
            master_key_iterations,
            uuid: field(b, 168),
            slots,
        })
    }

    /// The header's bytes.
    pub fn emit(&self, out: &mut [u8; LUKS_HEADER_LEN]) {
        out.fill(0);
        let mut put = |at: usize, bytes: &[u8]| {
            super::copy_prefix(out.get_mut(at..).unwrap_or(&mut []), bytes);
        };
        put(0, &MAGIC);
        put(6, &1u16.to_be_bytes());
        put(8, b"aes");
        let mut mode = heapless::String::<NAME_LEN>::new();
        let _ = mode.push_str(self.cipher.mode.name());
        let _ = mode.push('-');
        let _ = mode.push_str(self.cipher.ivgen.name());
        if let Some(h) = self.cipher.ivgen_hash {
            let _ = mode.push(':');
            let _ = mode.push_str(h.name());
        }
        put(40, mode.as_bytes());
        put(72, self.hash.name().as_bytes());
        put(104, &self.payload_offset_sector.to_be_bytes());
        put(108, &self.key_bytes.to_be_bytes());
        put(112, &self.master_key_digest);
        put(132, &self.master_key_salt);
        put(164, &self.master_key_iterations.to_be_bytes());
        put(168, &self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let at = SLOTS_AT.saturating_add(i.saturating_mul(SLOT_LEN));
            let state = if s.active {
                SLOT_ENABLED
            } else {
                SLOT_DISABLED
            };
            put(at, &state.to_be_bytes());
            put(at.saturating_add(4), &s.iterations.to_be_bytes());
            put(at.saturating_add(8), &s.salt);
            put(at.saturating_add(40), &s.key_offset_sector.to_be_bytes());
            put(at.saturating_add(44), &s.stripes.to_be_bytes());
        }
    }

    /// The area's length in bytes as QEMU lays it out for `cipher`: the header sectors, then eight slots of
    /// aligned key material (the payload offset).
    pub fn area_len(key_bytes: u32) -> u64 {
        let slot = u64::from(split_key_sectors(key_bytes, STRIPES));
        u64::from(HEADER_SECTORS)
            .saturating_add(slot.saturating_mul(KEY_SLOTS as u64))
            .saturating_mul(LUKS_SECTOR)
    }

    /// The key slot layout QEMU gives a new header: slot `i`'s material at `8 + i * slot sectors`.
    pub fn slot_offset_sector(key_bytes: u32, slot: usize) -> u32 {
        let per = split_key_sectors(key_bytes, STRIPES);
        HEADER_SECTORS.saturating_add(per.saturating_mul(slot as u32))
    }
}

/// The parts of the header's cipher description QEMU parses before its hash: the algorithm, the mode, the
/// IV generator's hash and name, from the cipher name and the `mode-ivgen[:hash]` string.
type CipherParts<'a> = (CipherAlgorithm, CipherMode, Option<HashAlgorithm>, &'a [u8]);

/// Parses the cipher name and the `mode-ivgen[:hash]` string in QEMU's order (the IV generator's name is
/// parsed after the header's hash, by [`parse_ivgen`]).
fn parse_cipher<'a>(
    name: &[u8],
    mode: &'a [u8],
    key_bytes: u32,
) -> Result<CipherParts<'a>, LuksError> {
    let dash = mode
        .iter()
        .position(|&c| c == b'-')
        .ok_or(LuksError::ModeFormat(LuksName::new(mode)))?;
    let (mode_name, rest) = mode.split_at(dash);
    let ivgen_part = rest.get(1..).unwrap_or(&[]);
    let (ivgen_name, ivgen_hash_name) = match ivgen_part.iter().position(|&c| c == b':') {
        Some(c) => (
            ivgen_part.get(..c).unwrap_or(&[]),
            Some(ivgen_part.get(c.saturating_add(1)..).unwrap_or(&[])),
        ),
        None => (ivgen_part, None),
    };
    let ivgen_hash = match ivgen_hash_name {
        None => None,
        Some(h) => match HashAlgorithm::from_name(h) {
            Ok(h) => Some(h),
            Err(true) => return Err(LuksError::Unsupported("the LUKS IV generator hash")),
            Err(false) => return Err(LuksError::UnknownHash(LuksName::new(h))),
        },
    };
    let mode = match mode_name {
        b"ecb" => CipherMode::Ecb,
        b"cbc" => CipherMode::Cbc,
        b"xts" => CipherMode::Xts,
        b"ctr" => return Err(LuksError::Unsupported("cipher mode ctr")),
        _ => return Err(LuksError::UnknownMode(LuksName::new(mode_name))),
    };
    let per_key = if mode == CipherMode::Xts {
        key_bytes / 2
    } else {
        key_bytes
    };
    let algorithm = match name {
        b"aes" => CipherAlgorithm::from_key_len(per_key),
        b"serpent" | b"twofish" if matches!(per_key, 16 | 24 | 32) => {
            return Err(LuksError::Unsupported("the LUKS cipher (only aes is)"));
        }
        b"cast5" | b"sm4" if per_key == 16 => {
            return Err(LuksError::Unsupported("the LUKS cipher (only aes is)"));
        }
        _ => None,
    }
    .ok_or(LuksError::UnknownCipher {
        name: LuksName::new(name),
        key_bytes: per_key,
    })?;
    Ok((algorithm, mode, ivgen_hash, ivgen_name))
}

/// The IV generator, and ESSIV's hash checked.
fn parse_ivgen(
    ivgen_name: &[u8],
    ivgen_hash: Option<HashAlgorithm>,
) -> Result<IvGenerator, LuksError> {
    let ivgen = match ivgen_name {
        b"plain" => IvGenerator::Plain,
        b"plain64" => IvGenerator::Plain64,
        b"essiv" => IvGenerator::Essiv,
        _ => return Err(LuksError::UnknownIvGenerator(LuksName::new(ivgen_name))),
    };
    if ivgen == IvGenerator::Essiv {
        let h = ivgen_hash.ok_or(LuksError::MissingIvHash)?;
        // ESSIV's cipher is AES keyed with the hash's digest: the digest must be an AES key size.
        if CipherAlgorithm::from_key_len(h.digest_len() as u32).is_none() {
            return Err(LuksError::NoEssivCipher(h.digest_len() as u8));
        }
    }
    Ok(ivgen)
}

/// The full-disk-encryption header extension's payload: where the LUKS area is and how long it is.
pub fn parse_encryption_extension(b: &[u8; 16]) -> (u64, u64) {
    (super::be64(b, 0), super::be64(b, 8))
}

#[cfg(test)]
mod tests;
