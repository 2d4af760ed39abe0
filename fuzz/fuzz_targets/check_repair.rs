//! Arbitrary bytes as a qcow2 image in memory: check it with a small scratch buffer (several passes) and a
//! large one, then repair it (both modes) on a copy that may grow by 1 MiB. Errors are fine; panics and hangs
//! are bugs.
//!
//! Oracles: the two checks give the same report (but for the pass count); after a repair that reports no
//! check errors, a fresh check finds exactly the corruptions and leaks the repair said were left.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_core::MemDevice;
use qcow2_core::check::{self, CheckReport, NoSink, RepairMode};

fn run_check(data: &[u8], scratch: usize) -> Option<CheckReport> {
    let mut dev = MemDevice::new(data);
    let mut bounce = [0u8; 512];
    let mut s = vec![0u8; scratch];
    check::check(&mut dev, &mut bounce, &mut s, &mut NoSink)
        .ok()
        .map(|r| CheckReport { passes: 0, ..r })
}

fuzz_target!(|data: &[u8]| {
    // Keep the file small so a pass walks quickly.
    if data.len() > 64 * 1024 {
        return;
    }
    let small = run_check(data, 64);
    let large = run_check(data, 1 << 16);
    if let (Some(a), Some(b)) = (small, large) {
        assert_eq!(a, b);
    }
    for mode in [RepairMode::Leaks, RepairMode::All] {
        let mut buf = data.to_vec();
        buf.resize(data.len() + (1 << 20), 0);
        let mut dev = MemDevice::with_len(buf, data.len() as u64, 512);
        let mut bounce = [0u8; 512];
        let mut s = vec![0u8; 1 << 16];
        if let Ok(r) = check::repair(&mut dev, &mut bounce, &mut s, mode, &mut NoSink)
            && r.check_errors == 0
        {
            let after = run_check(dev.content(), 1 << 16);
            if let Some(after) = after {
                assert_eq!((after.corruptions, after.leaks), (r.corruptions, r.leaks));
            }
        }
    }
});
