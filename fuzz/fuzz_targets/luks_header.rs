//! `LuksHeader::parse` on arbitrary bytes (the LUKS1 header an encrypted image stores): it must never
//! panic, its error must format, and a header it accepts must survive `emit` followed by `parse`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_core::format::luks::{LUKS_HEADER_LEN, LuksHeader};

fuzz_target!(|data: &[u8]| {
    let header = match LuksHeader::parse(data) {
        Ok(h) => h,
        Err(e) => {
            let _ = format!("{e}");
            return;
        }
    };
    let mut out = [0u8; LUKS_HEADER_LEN];
    header.emit(&mut out);
    let again = LuksHeader::parse(&out)
        .unwrap_or_else(|e| panic!("re-parse of an emitted header failed: {e}\n{header:#?}"));
    assert_eq!(header, again, "emit/parse round trip changed the header");
});
