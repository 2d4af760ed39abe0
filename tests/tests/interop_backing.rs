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
