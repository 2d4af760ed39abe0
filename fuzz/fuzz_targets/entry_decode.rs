//! L1, L2 and refcount-table entry decoding, compressed descriptors and refcount packing on arbitrary words.
//!
//! Oracles: nothing panics; a decoded compressed descriptor encodes and decodes to itself; a refcount that
//! `refcount_set` accepts reads back unchanged through `refcount_get`, and its neighbours do not change.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_core::format::{
    ClusterKind, CompressedDescriptor, L1Entry, L2Entry, L2Format, refcount_get, refcount_set,
};

fn word(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, x) in b.iter_mut().enumerate() {
        *x = data.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let w = word(data, 0);
    let bitmap = word(data, 8);
    let flags = data.get(16).copied().unwrap_or(0);
    let cluster_bits = 9 + u32::from(data.get(17).copied().unwrap_or(0)) % 13;
    let cs = 1u64 << cluster_bits;
    let f = L2Format {
        cluster_bits,
        v3: flags & 1 != 0,
        extended: flags & 2 != 0 && cluster_bits >= 14,
        external_data: flags & 4 != 0,
    };
    let _ = L1Entry(w).l2_offset(cs);
    let e = L2Entry { word: w, bitmap };
    if let Ok(kind) = e.classify(f) {
        for i in 0..32 {
            let _ = e.subcluster(kind, i);
        }
        if let ClusterKind::Compressed(d) = kind {
            let again = CompressedDescriptor::decode(d.encode(cluster_bits), cluster_bits);
            assert_eq!(again, d, "compressed descriptor does not round-trip");
        }
        if let ClusterKind::Data { host } | ClusterKind::Zero { host: Some(host) } = kind {
            assert_eq!(host % cs, 0, "unaligned host offset accepted");
        }
    }
    // Refcount packing.
    let order = u32::from(data.get(18).copied().unwrap_or(0)) % 7;
    let index = usize::from(data.get(19).copied().unwrap_or(0));
    let mut block: Vec<u8> = data.get(20..).unwrap_or(&[]).to_vec();
    let before = block.clone();
    let bits = 1u32 << order;
    let value = if bits == 64 {
        w
    } else {
        w & ((1u64 << bits) - 1)
    };
    if refcount_set(&mut block, order, index, value).is_some() {
        assert_eq!(refcount_get(&block, order, index), Some(value));
        for i in 0..64usize {
            if i != index {
                assert_eq!(
                    refcount_get(&block, order, i),
                    refcount_get(&before, order, i),
                    "refcount {i} changed when {index} was set"
                );
            }
        }
    } else {
        assert_eq!(block, before, "a refused refcount_set changed the block");
    }
    if bits < 64 {
        // Too wide a value is refused.
        let mut b2 = before.clone();
        assert!(refcount_set(&mut b2, order, index, 1u64 << bits).is_none());
    }
});
