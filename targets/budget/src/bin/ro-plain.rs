//! Read-only engine without a decompressor: open, map and read.

#![no_std]
#![no_main]

#[path = "../common.rs"]
mod common;

use core::hint::black_box;
use core::mem::size_of;

use common::{BLOCK, DEPTH, Dev, METADATA, SLICES};
use qcow2_core::{Buffers, Image, NoDecompressor, NoFiles, ReadOnly};

type Img<'a> = Image<Dev, &'a mut [u8], NoDecompressor, DEPTH, SLICES, ReadOnly>;

/// RAM figures for targets/budget.sh: the image value and the buffers an uncompressed read needs
/// (bounce, metadata cache).
#[used]
#[unsafe(link_section = ".budget")]
static RAM: [u32; 3] = [
    size_of::<Img<'static>>() as u32,
    BLOCK as u32,
    METADATA as u32,
];

#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    let mut bounce = [0u8; BLOCK];
    let mut metadata = [0u8; METADATA];
    let mut out = [0u8; BLOCK];
    let buffers = Buffers {
        bounce: &mut bounce[..],
        metadata: &mut metadata[..],
    };
    if let Ok(mut image) = Img::open(Dev::new(), buffers, NoDecompressor, &mut NoFiles) {
        let pos = black_box(0);
        black_box(image.map_guest_range(pos, black_box(1 << 20)).is_ok());
        black_box(image.read_at(pos, &mut out).is_ok());
    }
    common::halt()
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    common::halt()
}
