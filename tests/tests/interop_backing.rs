//! Interop matrix: backing chains (raw base three deep, raw base shorter than its overlay, qcow2 middle
//! layer). `info --backing-chain` and `map` depths come from the whole chain.

use qcow2_tests::images::{chain_qcow2, chain_raw_base, chain_short_raw_base};
use qcow2_tests::{Scratch, check_image};

#[test]
fn chain_three_deep_raw_base() {
    let s = Scratch::new();
    let top = chain_raw_base(&s);
    check_image(&s, &top);
    // the middle layer on its own (a chain of two)
    check_image(&s, &s.path("rb-mid.qcow2"));
}

#[test]
fn chain_raw_base_shorter_than_overlay() {
    let s = Scratch::new();
    let top = chain_short_raw_base(&s);
    check_image(&s, &top);
}

#[test]
fn chain_qcow2_middle_layer() {
    let s = Scratch::new();
    let top = chain_qcow2(&s);
    check_image(&s, &top);
    check_image(&s, &s.path("q-mid.qcow2"));
}

/// External data files: guest data lives in a second file, at host offsets the L2 entries give (or, with
/// `data_file_raw=on`, at the guest offset).
#[test]
fn external_data_file() {
    let s = Scratch::new();
    for (name, raw_opt) in [("df", ""), ("dfr", ",data_file_raw=on")] {
        // qemu-img creates the data file relative to its working directory: name it by its full path.
        let data = s.path(&format!("{name}.raw"));
        let opts = format!("data_file={}{raw_opt}", data.display());
        let img = s.qcow2(&format!("{name}.qcow2"), &opts, 4 << 20);
        qcow2_tests::qemu_io_cmds(
            &img,
            "qcow2",
            &[
                "write -P 0x61 4096 100000".to_string(),
                "write -z 1M 64k".to_string(),
                "write -P 0x62 3M 70000".to_string(),
                "discard 3M 64k".to_string(),
            ],
        );
        check_image(&s, &img);
    }
}
