//! Writes into images whose metadata lies (`qcow2_tests::lying`): for every lie and every write-type
//! request, our tool either refuses and leaves the image as it was, or succeeds without changing any guest
//! byte outside the request and without `qemu-img check` finding more corruptions than before. The truthful
//! controls must accept every request.

use qcow2_tests::lying::{OPS, lies, run_lie};

fn run(name: &str) {
    let lie = lies().into_iter().find(|l| l.name == name).expect("lie");
    let outcomes = run_lie(&lie);
    eprintln!("{name}: {}", outcomes.join(", "));
    if name.starts_with("truthful_") {
        assert!(
            outcomes.iter().all(|o| o.ends_with("accepted")),
            "{name}: a request on a truthful image was refused: {outcomes:?}"
        );
    }
}

macro_rules! lie_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run(stringify!($name));
            }
        )*

        /// Every lie has a test above.
        #[test]
        fn every_lie_has_a_test() {
            let tested = [$(stringify!($name)),*];
            for lie in lies() {
                assert!(tested.contains(&lie.name), "lie {} has no test", lie.name);
            }
            assert_eq!(tested.len(), lies().len());
            assert!(OPS.len() >= 7);
            qcow2_tests::record_evidence(
                "lying_metadata",
                &format!(
                    "lying-metadata generator: {} images (3 truthful controls) x {} write requests each",
                    tested.len(),
                    OPS.len()
                ),
            );
        }
    };
}

lie_tests!(
    truthful_plain,
    truthful_snapshot,
    truthful_bitmap,
    refcount0_active_l2,
    refcount0_l1,
    refcount0_refcount_block,
    refcount0_refcount_table,
    refcount0_header,
    refcount0_snapshot_l1,
    refcount0_snapshot_table,
    refcount0_bitmap_directory,
    refcount0_bitmap_table,
    refcount_table_entry_zero,
    refcount_block_past_end,
    l2_copied_to_refcount_block,
    l2_to_refcount_block,
    l2_copied_to_refcount_table,
    l2_copied_to_l1,
    l2_copied_to_other_l2,
    l2_to_other_l2,
    l2_copied_to_own_l2,
    l2_copied_to_snapshot_table,
    l2_copied_to_snapshot_l1,
    l2_copied_to_bitmap_directory,
    l2_copied_to_bitmap_table,
    l1_to_refcount_block,
    l1_to_refcount_table,
    l1_to_l1,
    l1_to_other_l2,
    l1_to_snapshot_l1,
    l1_to_snapshot_table,
    l1_to_bitmap_directory,
    prealloc_zero_over_l2,
    prealloc_zero_over_refcount_block,
    compressed_over_l2,
    compressed_over_refcount_table,
    bitmap_table_entry_to_l2,
);
