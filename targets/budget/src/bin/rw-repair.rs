//! The read-write engine of `rw`, built with qcow2-core's `dirty-repair`: a writable open rebuilds the
//! refcounts of a dirty image, so check's walk and repair are linked.

#![no_std]
#![no_main]

#[path = "../common.rs"]
mod common;
#[path = "../rw.rs"]
mod rw;

#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    rw::run(false)
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    common::halt()
}
