//! The LUKS header's tests: QEMU's layout round trip, and hostile headers with QEMU's messages.

use super::*;

fn sample() -> [u8; LUKS_HEADER_LEN] {
    let key_bytes = 64;
    let mut slots: [KeySlot; KEY_SLOTS] = core::array::from_fn(|i| KeySlot::unused(key_bytes, i));
    slots[0].active = true;
    slots[0].iterations = 1000;
    let h = LuksHeader {
        cipher: CipherSpec {
            algorithm: CipherAlgorithm::Aes256,
            mode: CipherMode::Xts,
            ivgen: IvGenerator::Plain64,
            ivgen_hash: None,
        },
        hash: HashAlgorithm::Sha256,
        payload_offset_sector: (LuksHeader::area_len(key_bytes) / LUKS_SECTOR) as u32,
        key_bytes,
        master_key_digest: [1; DIGEST_LEN],
        master_key_salt: [2; SALT_LEN],
        master_key_iterations: 1000,
        uuid: [b'u'; UUID_LEN],
        slots,
    };
    let mut out = [0u8; LUKS_HEADER_LEN];
    h.emit(&mut out);
    out
}

#[test]
fn round_trip_and_qemu_layout() {
    let b = sample();
    let h = LuksHeader::parse(&b).unwrap();
    assert_eq!(h.payload_offset_sector * 512, 2068480);
    assert_eq!(h.slots[1].key_offset_sector * 512, 262144);
    assert_eq!(h.slots[7].key_offset_sector * 512, 1810432);
    let mut again = [0u8; LUKS_HEADER_LEN];
    h.emit(&mut again);
    assert_eq!(again, b);
    assert_eq!(&b[40..52], b"xts-plain64\0");
}

#[test]
fn hostile_headers_give_qemus_messages() {
    let msg = |f: &dyn Fn(&mut [u8; LUKS_HEADER_LEN])| {
        let mut b = sample();
        f(&mut b);
        let e = LuksHeader::parse(&b).unwrap_err();
        let mut s = heapless::String::<128>::new();
        core::fmt::write(&mut s, format_args!("{e}")).unwrap();
        s
    };
    assert_eq!(msg(&|b| b[0] = b'X'), "Volume is not in LUKS format");
    assert_eq!(msg(&|b| b[7] = 2), "LUKS version 2 is not supported");
    assert_eq!(
        msg(&|b| b[8..40].fill(b'a')),
        "LUKS header cipher name is not NUL terminated"
    );
    assert_eq!(
        msg(&|b| b[104..108].copy_from_slice(&1u32.to_be_bytes())),
        "LUKS payload is overlapping with the header"
    );
    assert_eq!(
        msg(&|b| b[164..168].fill(0)),
        "LUKS key iteration count is zero"
    );
    let slot = |i: usize, off: usize| 208 + 48 * i + off;
    assert_eq!(
        msg(&|b| b[slot(3, 44)..slot(3, 48)].copy_from_slice(&5u32.to_be_bytes())),
        "Keyslot 3 is corrupted (stripes 5 != 4000)"
    );
    assert_eq!(
        msg(&|b| b[slot(3, 44)..slot(3, 48)].fill(0xff)),
        "Keyslot 3 is corrupted (stripes -1 != 4000)"
    );
    assert_eq!(
        msg(&|b| b[slot(2, 0)..slot(2, 4)].copy_from_slice(&1u32.to_be_bytes())),
        "Keyslot 2 state (active/disable) is corrupted"
    );
    assert_eq!(
        msg(&|b| b[slot(0, 4)..slot(0, 8)].fill(0)),
        "Keyslot 0 iteration count is zero"
    );
    assert_eq!(
        msg(&|b| b[slot(0, 40)..slot(0, 44)].copy_from_slice(&1u32.to_be_bytes())),
        "Keyslot 0 is overlapping with the LUKS header"
    );
    assert_eq!(
        msg(&|b| b[slot(7, 40)..slot(7, 44)].copy_from_slice(&4000u32.to_be_bytes())),
        "Keyslot 7 is overlapping with the encrypted payload"
    );
    assert_eq!(
        msg(&|b| {
            let v: [u8; 4] = b[slot(4, 40)..slot(4, 44)].try_into().unwrap();
            b[slot(5, 40)..slot(5, 44)].copy_from_slice(&v)
        }),
        "Keyslots 4 and 5 are overlapping in the header"
    );
    assert_eq!(
        msg(&|b| b[8..12].copy_from_slice(b"foo\0")),
        "Algorithm 'foo' with key size 32 bytes not supported"
    );
    assert_eq!(
        msg(&|b| b[108..112].copy_from_slice(&40u32.to_be_bytes())),
        "Algorithm 'aes' with key size 20 bytes not supported"
    );
    assert_eq!(
        msg(&|b| b[40..52].copy_from_slice(b"xts-plain65\0")),
        "IV generator 'plain65' not supported"
    );
    assert_eq!(
        msg(&|b| b[40..53].copy_from_slice(b"xts-plain65:\0")),
        "Hash algorithm '' not supported"
    );
    assert_eq!(
        msg(&|b| b[72..80].copy_from_slice(b"sha2566\0")),
        "Hash algorithm 'sha2566' not supported"
    );
    assert_eq!(
        msg(&|b| b[40..52].copy_from_slice(b"xtsplain64\0\0")),
        "Unexpected cipher mode string format 'xtsplain64'"
    );
}
