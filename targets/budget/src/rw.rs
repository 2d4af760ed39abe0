//! What the read-write binaries run (`rw` without and `rw-repair` with qcow2-core's `dirty-repair`):
//! open_writable, map, read, write, write zeroes, discard, flush, close; `rw-snapshots` also resizes and
//! creates, applies and deletes an internal snapshot.

use core::hint::black_box;

use crate::common::{self, BLOCK, DEPTH, Dev, INPUT, METADATA, SLICES, WINDOW};
use qcow2_core::{Buffers, Image, Inflate, NoFiles, WriteState};

pub type Img<'a> = Image<Dev, &'a mut [u8], Inflate<&'a mut [u8]>, DEPTH, SLICES, WriteState>;

/// With `snapshots` (a constant in each binary), also resize and snapshots.
pub fn run(snapshots: bool) -> ! {
    let mut bounce = [0u8; BLOCK];
    let mut metadata = [0u8; METADATA];
    let mut window = [0u8; WINDOW];
    let mut input = [0u8; INPUT];
    let mut out = [0u8; BLOCK];
    let buffers = Buffers {
        bounce: &mut bounce[..],
        metadata: &mut metadata[..],
    };
    if let Ok(mut image) = Img::open_writable(
        Dev::new(),
        buffers,
        Inflate::new(&mut window[..], &mut input[..]),
        &mut NoFiles,
    ) {
        let pos = black_box(0);
        black_box(image.map_guest_range(pos, black_box(1 << 20)).is_ok());
        black_box(image.read_at(pos, &mut out).is_ok());
        black_box(image.write_at(black_box(pos), &out).is_ok());
        black_box(
            image
                .write_zeroes(black_box(pos), black_box(4096), black_box(false))
                .is_ok(),
        );
        black_box(image.discard(black_box(pos), black_box(4096)).is_ok());
        if snapshots {
            black_box(image.resize(black_box(2 << 20)).is_ok());
            let snapshot = qcow2_core::write::NewSnapshot {
                name: b"a",
                date_sec: black_box(0),
                date_nsec: 0,
                vm_clock_nsec: 0,
            };
            black_box(image.create_snapshot(&snapshot).is_ok());
            let at = black_box(0x10000);
            black_box(image.apply_snapshot(at).is_ok());
            black_box(image.delete_snapshot(at).is_ok());
        }
        black_box(image.flush().is_ok());
        black_box(image.close().is_ok());
    }
    common::halt()
}
