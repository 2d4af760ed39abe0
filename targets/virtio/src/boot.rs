//! Entry point and exception vectors.
//!
//! QEMU's `virt` machine, given an ELF with `-kernel` (no firmware), starts CPU 0 at `_start` at EL1 with the
//! MMU and caches off. Before any Rust code runs, `_start` lets EL1 use the FP/SIMD registers (the
//! `aarch64-unknown-none` target uses them), installs the vector table, sets the stack pointer to the top of
//! the stack the linker script reserves, and zeroes `.bss`. Any exception then lands in [`exception`], which
//! prints the syndrome and ends the run with a failure status instead of hanging.
//!
//! With the MMU off every data access is to Device memory, where unaligned accesses fault; the target's
//! `+strict-align` feature keeps the compiler from emitting them.

use core::arch::global_asm;
use core::sync::atomic::AtomicBool;
use core::sync::atomic::Ordering::Relaxed;

global_asm!(
    r#"
    .section .text.boot, "ax"
    .global _start
_start:
    // Only CPU 0 runs the program (the others stay parked if there are any).
    mrs     x0, mpidr_el1
    and     x0, x0, #0xff
    cbnz    x0, 3f
    // CPACR_EL1.FPEN = 0b11: FP/SIMD instructions do not trap at EL1 or EL0.
    mov     x0, #(3 << 20)
    msr     cpacr_el1, x0
    adrp    x0, vectors
    add     x0, x0, :lo12:vectors
    msr     vbar_el1, x0
    isb
    adrp    x0, __stack_top
    add     x0, x0, :lo12:__stack_top
    mov     sp, x0
    adrp    x0, __bss_start
    add     x0, x0, :lo12:__bss_start
    adrp    x1, __bss_end
    add     x1, x1, :lo12:__bss_end
1:  cmp     x0, x1
    b.hs    2f
    str     xzr, [x0], #8
    b       1b
2:  bl      rust_main
3:  wfe
    b       3b

    // 16 entries of 128 bytes: every kind of exception from every level goes to `exception`.
    .section .text.vectors, "ax"
    .balign 2048
vectors:
    .rept 16
    .balign 128
    mrs     x0, esr_el1
    mrs     x1, elr_el1
    mrs     x2, far_el1
    b       exception
    .endr
"#
);

/// Set by the first exception.
static IN_EXCEPTION: AtomicBool = AtomicBool::new(false);

/// Where every exception goes: prints the syndrome, the faulting address and the instruction's address,
/// then exits with status 3. A second exception (the exit itself traps when QEMU runs without semihosting)
/// only stops the CPU.
#[unsafe(no_mangle)]
extern "C" fn exception(esr: u64, elr: u64, far: u64) -> ! {
    if !IN_EXCEPTION.swap(true, Relaxed) {
        crate::println!("exception: esr {esr:#x} elr {elr:#x} far {far:#x}");
        crate::arch::exit(3)
    }
    crate::arch::halt()
}
