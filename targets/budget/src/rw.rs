//! What the read-write binaries run (`rw` without and `rw-repair` with qcow2-core's `dirty-repair`):
//! open_writable, map, read, write, write zeroes, discard, flush, close.

use core::hint::black_box;

use crate::common::{self, BLOCK, DEPTH, Dev, INPUT, METADATA, SLICES, WINDOW};
use qcow2_core::{Buffers, Image, Inflate, NoFiles, WriteState};

pub type Img<'a> = Image<Dev, &'a mut [u8], Inflate<&'a mut [u8]>, DEPTH, SLICES, WriteState>;

pub fn run() -> ! {
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
        black_box(image.flush().is_ok());
        black_box(image.close().is_ok());
    }
    common::halt()
}
