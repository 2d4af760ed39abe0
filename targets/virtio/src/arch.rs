//! The few AArch64 instructions the program needs besides plain loads and stores: semihosting calls (the
//! command line and the exit), the generic timer (request time-outs) and memory barriers (the virtqueue).

use core::arch::asm;

/// `SYS_GET_CMDLINE`.
const SYS_GET_CMDLINE: u64 = 0x15;
/// `SYS_EXIT`.
const SYS_EXIT: u64 = 0x18;
/// `ADP_Stopped_ApplicationExit`: `SYS_EXIT`'s reason for a normal exit with a status.
const ADP_STOPPED_APPLICATION_EXIT: u64 = 0x2_0026;

/// One semihosting call: operation `op`, parameter block at `block`; returns what the host put in `x0`.
fn semihosting(op: u64, block: &mut [u64]) -> u64 {
    let ret: u64;
    // SAFETY: `hlt #0xf000` is the A64 semihosting trap; QEMU (run with semihosting enabled) reads and
    // writes only the parameter block, which is valid for the call, and the memory the block points to,
    // which the callers keep valid. Without semihosting it would raise an exception (src/boot.rs catches it).
    unsafe {
        asm!("hlt #0xf000", inout("x0") op => ret, in("x1") block.as_mut_ptr(), options(nostack));
    }
    ret
}

/// The semihosting command line (QEMU's `-semihosting-config arg=...` words joined by spaces), in `buf`.
/// `None` when the host has none or it does not fit.
pub fn cmdline(buf: &mut [u8]) -> Option<&[u8]> {
    let mut block = [
        buf.as_mut_ptr().expose_provenance() as u64,
        buf.len() as u64,
    ];
    if semihosting(SYS_GET_CMDLINE, &mut block) != 0 {
        return None;
    }
    let len = usize::try_from(block[1]).ok()?;
    buf.get(..len)
}

/// Ends the run: QEMU exits with `status`.
pub fn exit(status: u32) -> ! {
    let mut block = [ADP_STOPPED_APPLICATION_EXIT, u64::from(status)];
    semihosting(SYS_EXIT, &mut block);
    halt()
}

/// Stops here for good.
pub fn halt() -> ! {
    loop {
        // SAFETY: `wfe` only waits for an event.
        unsafe { asm!("wfe", options(nomem, nostack)) };
    }
}

/// The generic timer's count (`CNTPCT_EL0`).
fn ticks() -> u64 {
    let t: u64;
    // SAFETY: reads a system register that EL1 may always read.
    unsafe { asm!("isb", "mrs {}, cntpct_el0", out(reg) t, options(nomem, nostack)) };
    t
}

/// A point in time some milliseconds from now, for [`Deadline::passed`].
#[derive(Debug, Clone, Copy)]
pub struct Deadline(u64);

impl Deadline {
    /// `ms` milliseconds from now.
    pub fn after_ms(ms: u64) -> Self {
        let freq: u64;
        // SAFETY: reads a system register that EL1 may always read.
        unsafe { asm!("mrs {}, cntfrq_el0", out(reg) freq, options(nomem, nostack)) };
        Deadline(ticks().saturating_add(freq.saturating_mul(ms) / 1000))
    }

    /// Whether the deadline has passed.
    pub fn passed(self) -> bool {
        ticks() >= self.0
    }
}

/// `dsb sy`: every memory access before it completes before any after it (the device sees the descriptors
/// before the index that publishes them, and the index before the notification; we see the device's writes
/// to the buffers before we use them).
pub fn dsb() {
    // SAFETY: a barrier; it changes no state.
    unsafe { asm!("dsb sy", options(nostack, preserves_flags)) };
}
