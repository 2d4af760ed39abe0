//! The EFI program inside the qcow2 disk: prints a known line on the console (which OVMF mirrors to the
//! serial port) and powers the machine off.

#![no_std]
#![no_main]

use uefi::prelude::*;
use uefi::runtime::ResetType;

/// What the test waits for on the serial output.
const LINE: &str = "qcow2-payload: booted from inside the qcow2 image";

#[entry]
fn main() -> Status {
    if uefi::helpers::init().is_err() {
        return Status::ABORTED;
    }
    uefi::println!("{LINE}");
    boot::stall(core::time::Duration::from_millis(100));
    uefi::runtime::reset(ResetType::SHUTDOWN, Status::SUCCESS, None)
}
