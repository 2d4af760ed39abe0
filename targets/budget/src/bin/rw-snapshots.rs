//! The read-write engine of `rw` (without `dirty-repair`) that also resizes the disk and creates, applies
//! and deletes internal snapshots: what a firmware that rolls back to a snapshot links.

#![no_std]
#![no_main]

#[path = "../common.rs"]
mod common;
#[path = "../rw.rs"]
mod rw;

#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    rw::run(true)
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    common::halt()
}
