//! The read-write engine (with deflate for reading compressed clusters), without `dirty-repair`:
//! open_writable, map, read, write, write zeroes, discard, flush, close.

#![no_std]
#![no_main]

#[path = "../common.rs"]
mod common;
#[path = "../rw.rs"]
mod rw;

use core::mem::size_of;

use common::{BLOCK, INPUT, METADATA, WINDOW};

/// RAM figures for targets/budget.sh: the image value (which holds the inflate state) and the buffers a
/// compressed read needs (bounce, metadata cache, inflate window, inflate input).
#[used]
#[unsafe(link_section = ".budget")]
static RAM_RW: [u32; 5] = [
    size_of::<rw::Img<'static>>() as u32,
    BLOCK as u32,
    METADATA as u32,
    WINDOW as u32,
    INPUT as u32,
];

#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    rw::run(false)
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    common::halt()
}
