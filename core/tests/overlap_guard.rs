//! The engine's guard against entries that name metadata, without QEMU: an L2 entry (with COPIED) is made to
//! name another guest range's L2 table. With a metadata cache large enough to list every metadata cluster,
//! the verification before the first write refuses the first write and sets the corrupt bit, changing
//! nothing else; with a cache too small for that list (a firmware-sized one), the checks of single writes
//! refuse a write or discard through the lying entry, also setting only the corrupt bit, and the other L2
//! table is left as it was.

use qcow2_core::create::{CreateOptions, create};
use qcow2_core::io::MemDevice;
use qcow2_core::{Buffers, Error, Image, NoDecompressor, NoFiles};

const SIZE: u64 = 16 << 20;
const CLUSTER: u64 = 512;
/// Guest bytes one L2 table covers (512-byte clusters: 64 entries).
const L2_SPAN: u64 = 64 * CLUSTER;

type Dev = MemDevice<Vec<u8>>;

fn open<const SLICES: usize>(
    bytes: &[u8],
) -> Image<Dev, Vec<u8>, NoDecompressor, 2, SLICES, qcow2_core::WriteState> {
    let mut buf = bytes.to_vec();
    let len = buf.len() as u64;
    buf.resize(buf.len() + (4 << 20), 0);
    let buffers = Buffers {
        bounce: vec![0u8; 512],
        metadata: vec![0u8; SLICES * 512],
    };
    Image::open_writable(
        MemDevice::with_len(buf, len, 512),
        buffers,
        NoDecompressor,
        &mut NoFiles,
    )
    .expect("open")
}

fn be64(b: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}

/// An image with data every [`L2_SPAN`] bytes: one L2 table per span, some 550 metadata clusters.
fn image() -> Vec<u8> {
    let mut dev = MemDevice::with_len(vec![0u8; 8 << 20], 0, 512);
    let opts = CreateOptions {
        size: SIZE,
        cluster_size: CLUSTER,
        ..CreateOptions::default()
    };
    create(&mut dev, &mut [0u8; 512], &opts).expect("create");
    let bytes = dev.content().to_vec();
    let mut img = open::<64>(&bytes);
    let mut guest = 0;
    while guest < SIZE {
        img.write_at(guest, &[(guest / L2_SPAN) as u8 | 1; 512])
            .expect("write");
        guest += L2_SPAN;
    }
    img.close().expect("close").content().to_vec()
}

fn l2_table(bytes: &[u8], guest: u64) -> u64 {
    let l1 = be64(bytes, 40);
    be64(bytes, l1 + 8 * (guest / L2_SPAN)) & 0x00ff_ffff_ffff_fe00
}

/// The image with guest cluster 0's entry naming the L2 table of the second span, COPIED set.
fn lying() -> (Vec<u8>, u64) {
    let mut bytes = image();
    let victim = l2_table(&bytes, L2_SPAN);
    let entry = l2_table(&bytes, 0) as usize;
    bytes[entry..entry + 8].copy_from_slice(&(victim | 1 << 63).to_be_bytes());
    (bytes, victim)
}

fn without_incompatible_bits(bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v[72..80].fill(0);
    v
}

#[test]
fn the_verification_refuses_and_sets_only_the_corrupt_bit() {
    let (bytes, _) = lying();
    let mut img = open::<64>(&bytes);
    // A write far from the lying entry: the verification refuses it all the same.
    let err = img.write_at(SIZE - 512, &[0x77; 512]).unwrap_err();
    assert!(
        matches!(err, Error::Corrupt { what, .. } if what.contains("L2 entry names a cluster")),
        "{err:?}"
    );
    assert!(!img.is_writable());
    assert!(matches!(img.discard(0, 512), Err(Error::ReadOnly)));
    let after = img.close().expect("close").content().to_vec();
    assert_eq!(
        without_incompatible_bits(&after),
        without_incompatible_bits(&bytes),
        "a refused write changed the image beyond the corrupt bit"
    );
    assert_eq!(after[79] & 2, 2, "the corrupt bit is not set");
}

#[test]
fn a_small_cache_still_refuses_writes_through_the_lying_entry() {
    let (bytes, victim) = lying();
    let victim_table = bytes[victim as usize..(victim + CLUSTER) as usize].to_vec();
    for op in ["write", "partial write", "discard", "write zeroes"] {
        let mut img = open::<4>(&bytes);
        let err = match op {
            "write" => img.write_at(0, &[0x77; 512]),
            "partial write" => img.write_at(100, &[0x77; 17]),
            "discard" => img.discard(0, 512),
            _ => img.write_zeroes(0, 512, true),
        }
        .unwrap_err();
        assert!(
            matches!(err, Error::Corrupt { what, .. } if what.contains("active L2 table")),
            "{op}: {err:?}"
        );
        assert!(!img.is_writable(), "{op}: the image goes on being written");
        let after = img.close().expect("close").content().to_vec();
        assert_eq!(
            &after[victim as usize..(victim + CLUSTER) as usize],
            &victim_table[..],
            "{op}: the other range's L2 table changed"
        );
        assert_eq!(
            without_incompatible_bits(&after),
            without_incompatible_bits(&bytes),
            "{op}: the image changed beyond the corrupt bit"
        );
        assert_eq!(after[79] & 2, 2, "{op}: the corrupt bit is not set");
    }
}

#[test]
fn a_truthful_image_is_written_with_either_cache() {
    let bytes = image();
    let mut small = open::<4>(&bytes);
    small.write_at(0, &[0x77; 512]).expect("small cache");
    small
        .write_at(SIZE - 512, &[0x78; 512])
        .expect("small cache");
    let mut buf = [0u8; 512];
    small.read_at(L2_SPAN, &mut buf).unwrap();
    assert_eq!(buf, [1u8 | 1; 512]);
    let mut large = open::<64>(&bytes);
    large.write_at(0, &[0x77; 512]).expect("large cache");
}
