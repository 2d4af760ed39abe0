//! Property tests of the format layer: header round trips, entry decoding, refcount packing.

use proptest::prelude::*;
use qcow2_core::format::{
    AutoclearFeatures, ClusterKind, CompatibleFeatures, CompressedDescriptor, CompressionType,
    Header, IncompatibleFeatures, L2Entry, L2Format, refcount_get, refcount_set,
};

fn valid_header() -> impl Strategy<Value = Header> {
    (
        9u32..=21,
        any::<bool>(),
        0u64..(1 << 44),
        0u32..4,
        1u64..1000,
        1u64..1000,
        1u32..4,
        0u32..=6,
    )
        .prop_flat_map(|(bits, v3, size, extra_l1, l1c, rtc, rt_clusters, order)| {
            (
                Just((bits, v3, size, extra_l1, l1c, rtc, rt_clusters, order)),
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
            )
        })
        .prop_filter_map(
            "L1 fits",
            |((bits, v3, size, extra_l1, l1c, rtc, rt_clusters, order), ext, zstd, lazy)| {
                let cs = 1u64 << bits;
                let extended = v3 && ext && bits >= 14;
                let entry_bits = if extended { 4 } else { 3 };
                let coverage = 1u64 << (2 * bits - entry_bits);
                let needed = size.div_ceil(coverage);
                let l1_size = needed + u64::from(extra_l1);
                if l1_size * 8 > 32 << 20 || u64::from(rt_clusters) * cs > 8 << 20 {
                    return None;
                }
                let mut incompat = IncompatibleFeatures::empty();
                if extended {
                    incompat |= IncompatibleFeatures::EXTENDED_L2;
                }
                let compression_type = if v3 && zstd {
                    incompat |= IncompatibleFeatures::COMPRESSION_TYPE;
                    CompressionType::Zstd
                } else {
                    CompressionType::Deflate
                };
                Some(Header {
                    version: if v3 { 3 } else { 2 },
                    backing_file_offset: 0,
                    backing_file_size: 0,
                    cluster_bits: bits,
                    size,
                    crypt_method: 0,
                    l1_size: l1_size as u32,
                    l1_table_offset: l1c * cs,
                    refcount_table_offset: rtc * cs,
                    refcount_table_clusters: rt_clusters,
                    nb_snapshots: 0,
                    snapshots_offset: 0,
                    incompatible_features: incompat,
                    compatible_features: if v3 && lazy {
                        CompatibleFeatures::LAZY_REFCOUNTS
                    } else {
                        CompatibleFeatures::empty()
                    },
                    autoclear_features: AutoclearFeatures::empty(),
                    refcount_order: if v3 { order } else { 4 },
                    header_length: if v3 { 112 } else { 72 },
                    compression_type,
                })
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn header_round_trips(h in valid_header()) {
        let mut buf = [0u8; 112];
        let n = h.emit(&mut buf).unwrap();
        let parsed = Header::parse(&buf[..n]).unwrap();
        prop_assert_eq!(parsed, h);
    }

    #[test]
    fn header_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..160), magic in any::<bool>()) {
        let mut bytes = bytes;
        if magic && bytes.len() >= 8 {
            bytes[..4].copy_from_slice(&0x514649fbu32.to_be_bytes());
            let v = 2 + (bytes[7] as u32 & 1);
            bytes[4..8].copy_from_slice(&v.to_be_bytes());
        }
        if let Ok(h) = Header::parse(&bytes) {
            // Whatever parses has a sane geometry.
            prop_assert!((9..=21).contains(&h.cluster_bits));
            prop_assert!(u64::from(h.l1_size) >= h.l1_entries_needed().unwrap());
        }
    }

    #[test]
    fn l2_decoding_is_total(word in any::<u64>(), bitmap in any::<u64>(), bits in 9u32..=21, v3: bool, ext: bool, data: bool) {
        let f = L2Format { cluster_bits: bits, v3, extended: ext && bits >= 14, external_data: data };
        let e = L2Entry { word, bitmap: if f.extended { bitmap } else { 0 } };
        if let Ok(kind) = e.classify(f) {
            let cs = 1u64 << bits;
            match kind {
                ClusterKind::Data { host } | ClusterKind::Zero { host: Some(host) } => prop_assert_eq!(host % cs, 0),
                ClusterKind::Compressed(d) => {
                    prop_assert!(!data);
                    prop_assert!(d.len <= 2 * cs);
                }
                _ => {}
            }
            if f.extended {
                for i in 0..32 {
                    let _ = e.subcluster(kind, i);
                }
            }
        }
    }

    #[test]
    fn standard_entries_decode_to_what_was_encoded(bits in 9u32..=21, cluster in 1u64..(1 << 30), copied: bool, zero: bool) {
        let cs = 1u64 << bits;
        let host = (cluster * cs) & 0x00ff_ffff_ffff_fe00;
        prop_assume!(host != 0);
        let word = host | if copied { 1 << 63 } else { 0 } | u64::from(zero);
        let f = L2Format { cluster_bits: bits, v3: true, extended: false, external_data: false };
        let kind = L2Entry { word, bitmap: 0 }.classify(f).unwrap();
        if zero {
            prop_assert_eq!(kind, ClusterKind::Zero { host: Some(host) });
        } else {
            prop_assert_eq!(kind, ClusterKind::Data { host });
        }
    }

    #[test]
    fn compressed_descriptor_round_trips(bits in 9u32..=21, offset in 0u64..(1 << 40), len in 1u64..(1 << 21)) {
        let cs = 1u64 << bits;
        let x = 70 - bits;
        prop_assume!(offset < (1 << x));
        // The descriptor stores whole sectors: the decoded length reaches the end of the last sector.
        let len = len.min(2 * cs - (offset & 511));
        let d = CompressedDescriptor { offset, len };
        let back = CompressedDescriptor::decode(d.encode(bits) | (1 << 62), bits);
        prop_assert_eq!(back.offset, offset);
        prop_assert!(back.len >= len && back.len < len + 512);
        prop_assert_eq!((back.offset + back.len) % 512, 0);
    }

    #[test]
    fn refcounts_round_trip(order in 0u32..=6, index in 0usize..512, value in any::<u64>()) {
        let bits = 1u32 << order;
        let value = if bits == 64 { value } else { value & ((1u64 << bits) - 1) };
        let mut block = vec![0xA5u8; 64 * 8];
        let entries = block.len() * 8 / bits as usize;
        let index = index % entries;
        let before: Vec<u64> = (0..entries).map(|i| refcount_get(&block, order, i).unwrap()).collect();
        refcount_set(&mut block, order, index, value).unwrap();
        for (i, old) in before.iter().enumerate() {
            let now = refcount_get(&block, order, i).unwrap();
            prop_assert_eq!(now, if i == index { value } else { *old });
        }
        if bits < 64 {
            prop_assert!(refcount_set(&mut block, order, index, 1u64 << bits).is_none());
        }
        prop_assert!(refcount_get(&block, order, entries).is_none());
    }
}
