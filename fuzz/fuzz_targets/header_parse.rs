//! `Header::parse` on arbitrary bytes: it must never panic, and a header it accepts must survive
//! `emit` followed by `parse` unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_core::format::{HEADER_READ_LEN, Header};

fuzz_target!(|data: &[u8]| {
    let Ok(header) = Header::parse(data) else {
        return;
    };
    // Accessors of a validated header cannot fail; touch the derived quantities too.
    let _ = header.cluster_size();
    let _ = header.unknown_incompatible();

    let mut out = [0u8; HEADER_READ_LEN];
    let n = header
        .emit(&mut out)
        .expect("emit of a parsed header must fit HEADER_READ_LEN bytes");
    let again = Header::parse(&out[..n])
        .unwrap_or_else(|e| panic!("re-parse of an emitted header failed: {e:?}\n{header:#?}"));
    assert_eq!(header, again, "emit/parse round trip changed the header");
});
