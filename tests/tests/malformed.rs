//! Malformed images (iotests 080/060 in spirit): for every case of `qcow2_tests::malformed`, run `info`,
//! `map`, `convert -O raw` and `io -c 'read 0 64k'`: no panic, within the time limit, and either a clean
//! one-line error or output equal to QEMU's, as each case expects. Then `check`, and a write that must
//! either be refused cleanly or read back.

use qcow2_tests::malformed::{cases, run_case};

macro_rules! malformed_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run_case(stringify!($name));
            }
        )*

        /// Every case has a test above, and there are enough of them.
        #[test]
        fn every_case_has_a_test() {
            let tested = [$(stringify!($name)),*];
            let all: Vec<&str> = cases().iter().map(|c| c.name).collect();
            for name in &all {
                assert!(tested.contains(name), "malformed case {name} has no test in tests/malformed.rs");
            }
            for name in &tested {
                assert!(all.contains(name), "test {name} has no malformed case");
            }
            let mut sorted = all.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), all.len(), "duplicate case names");
            qcow2_tests::record_evidence(
                "malformed",
                &format!("hostile-image corpus: {} images (info, map, convert, io read, check, write each)", all.len()),
            );
            assert!(all.len() >= 60, "only {} malformed cases", all.len());
        }
    };
}

malformed_tests!(
    bad_magic,
    version_1,
    version_4,
    cluster_bits_8,
    cluster_bits_22,
    cluster_bits_63,
    header_length_too_small,
    header_length_too_big,
    header_length_unaligned,
    backing_file_offset_past_cluster,
    backing_name_too_long,
    backing_format_too_long,
    refcount_order_7,
    refcount_table_clusters_0,
    refcount_table_clusters_huge,
    refcount_table_unaligned,
    refcount_table_past_eof,
    l1_size_too_small,
    l1_size_huge,
    virtual_size_huge,
    l1_offset_unaligned,
    l1_past_eof,
    l1_overlaps_header,
    l1_entry_unaligned,
    l1_entry_reserved_bits,
    l2_table_past_eof,
    l2_entry_past_eof,
    l2_entry_unaligned,
    l2_entry_reserved_bits,
    l2_entry_overlaps_header,
    zero_flag_in_v2,
    compressed_size_overrun,
    compressed_data_corrupt,
    compressed_data_truncated,
    compressed_with_copied,
    extl2_alloc_and_zero,
    extl2_alloc_bits_unallocated,
    extl2_small_clusters,
    unknown_incompatible_bit,
    unknown_incompatible_bit_named,
    unknown_incompatible_bit_63,
    data_file_bit_without_name,
    compression_type_unknown,
    compression_type_without_bit,
    crypt_method_1,
    crypt_method_2,
    crypt_method_3,
    corrupt_bit,
    dirty_bit,
    v2_ignores_feature_fields,
    extension_length_past_cluster,
    extension_length_max,
    snapshot_count_huge,
    snapshot_table_unaligned,
    snapshot_table_past_eof,
    backing_missing,
    backing_loop,
    backing_self,
    backing_chain_too_deep,
    backing_json,
    backing_nbd,
    backing_format_unknown,
);
