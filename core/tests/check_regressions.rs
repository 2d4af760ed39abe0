//! Check and repair on inputs the fuzz targets found.

use qcow2_core::MemDevice;
use qcow2_core::check::{self, NoSink, RepairMode};

/// An L2 entry points one cluster past the end of the file (not counted: too far out). A refcount rebuild
/// used to put its new refcount block exactly there, so the block was referenced twice; the new structure
/// now goes after the highest cluster any reference names, and what the repair reports as left is what a
/// fresh check finds.
#[test]
fn rebuild_does_not_land_on_a_dangling_reference() {
    let data = include_bytes!("data/rebuild-dangling-reference.qcow2");
    for mode in [RepairMode::Leaks, RepairMode::All] {
        let mut buf = data.to_vec();
        buf.resize(data.len() + (1 << 20), 0);
        let mut dev = MemDevice::with_len(buf, data.len() as u64, 512);
        let mut s = vec![0u8; 1 << 16];
        let Ok(r) = check::repair(&mut dev, &mut [0u8; 512], &mut s, mode, &mut NoSink) else {
            continue;
        };
        if r.check_errors != 0 {
            continue;
        }
        let after = check::check(
            &mut MemDevice::new(dev.content()),
            &mut [0u8; 512],
            &mut vec![0u8; 1 << 16],
            &mut NoSink,
        )
        .unwrap();
        assert_eq!(
            (after.corruptions, after.leaks),
            (r.corruptions, r.leaks),
            "{mode:?}"
        );
    }
}
