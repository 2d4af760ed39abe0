//! What every budget binary shares: an opaque block device, the buffers, the RAM figures and the panic
//! handler.
//!
//! The device's reads and writes go through `black_box`ed function pointers, so the optimiser can neither
//! see the data nor drop code paths; the binaries link with `rust-lld`'s defaults (entry `_start`, no linker
//! script): they are measured, not run.

use core::hint::black_box;

use qcow2_core::{BlockDevice, BlockDeviceWrite};

/// Images in a chain at most (the image and one backing file), as in `targets/cortex-m`.
pub const DEPTH: usize = 2;
/// Metadata cache slices (a writer needs four), as in `targets/cortex-m`.
pub const SLICES: usize = 4;
/// Device block and bounce buffer size.
pub const BLOCK: usize = 512;
/// The metadata cache the budget binaries use: `SLICES` slots of one block (the caller's choice).
pub const METADATA: usize = SLICES * BLOCK;
/// The inflate window (32 KiB: deflate's window) and input buffer.
#[allow(dead_code)]
pub const WINDOW: usize = 32 * 1024;
/// Compressed bytes are read in pieces of this size.
#[allow(dead_code)]
pub const INPUT: usize = BLOCK;

fn opaque_read(lba: u64, buf: &mut [u8]) -> bool {
    let b = black_box(lba as u8);
    buf.fill(b);
    true
}

fn opaque_write(lba: u64, buf: &[u8]) -> bool {
    black_box((lba, buf.len()));
    true
}

/// A device the optimiser cannot see through.
pub struct Dev {
    read: fn(u64, &mut [u8]) -> bool,
    write: fn(u64, &[u8]) -> bool,
}

impl Dev {
    /// The device.
    pub fn new() -> Self {
        Dev {
            read: black_box(opaque_read as fn(u64, &mut [u8]) -> bool),
            write: black_box(opaque_write as fn(u64, &[u8]) -> bool),
        }
    }
}

impl BlockDevice for Dev {
    type Error = ();
    fn block_size(&self) -> usize {
        BLOCK
    }
    fn size(&mut self) -> Result<u64, ()> {
        Ok(black_box(1 << 20))
    }
    fn read_blocks(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), ()> {
        if (self.read)(lba, buf) {
            Ok(())
        } else {
            Err(())
        }
    }
}

impl BlockDeviceWrite for Dev {
    fn write_blocks(&mut self, lba: u64, buf: &[u8]) -> Result<(), ()> {
        if (self.write)(lba, buf) {
            Ok(())
        } else {
            Err(())
        }
    }
    fn flush(&mut self) -> Result<(), ()> {
        Ok(())
    }
}

/// Stops (the binaries are never run).
pub fn halt() -> ! {
    loop {
        core::hint::spin_loop();
    }
}
