//! Output on the `virt` machine's PL011 UART (at 0x0900_0000; QEMU's `-nographic` puts it on stdout).

use core::fmt;
use core::ptr;

const BASE: usize = 0x0900_0000;
/// Data register.
const DR: usize = 0x00;
/// Flag register; bit 5: transmit FIFO full.
const FR: usize = 0x18;
const FR_TXFF: u32 = 1 << 5;
/// Control register: UART, transmit and receive enable.
const CR: usize = 0x30;
const CR_ENABLE: u32 = (1 << 0) | (1 << 8) | (1 << 9);

fn reg(offset: usize) -> *mut u32 {
    ptr::with_exposed_provenance_mut(BASE + offset)
}

/// The UART, as a [`fmt::Write`].
#[derive(Debug)]
pub struct Uart;

impl Uart {
    /// Enables the UART (QEMU needs no baud rate).
    pub fn init() {
        // SAFETY: the PL011 control register of the `virt` machine, a 32-bit MMIO register.
        unsafe { ptr::write_volatile(reg(CR), CR_ENABLE) };
    }

    fn put(b: u8) {
        // SAFETY: the PL011's flag and data registers of the `virt` machine, 32-bit MMIO registers.
        unsafe {
            while ptr::read_volatile(reg(FR)) & FR_TXFF != 0 {}
            ptr::write_volatile(reg(DR), u32::from(b));
        }
    }
}

impl fmt::Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(Self::put);
        Ok(())
    }
}

/// Prints a line on the UART.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::uart::Uart, $($arg)*);
    }};
}
