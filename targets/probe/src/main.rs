//! Link probe: the qcow2-core read engine in a `#![no_std]`, `#![no_main]` binary with no allocator.
//!
//! Opens a small qcow2 image held in flash (`probe.qcow2`: 64 KiB virtual disk, 512-byte clusters, deflate
//! compressed clusters, one plain allocated run, zero runs) over a [`MemDevice`], with [`Inflate`] for the
//! compressed clusters, maps the disk run by run, reads all of it in 4 KiB pieces and folds an FNV-1a checksum
//! of the guest bytes into [`black_box`], so the linker keeps the whole read path. Every buffer is a local:
//! there is no heap.

#![no_std]
#![no_main]

use core::hint::black_box;

use qcow2_core::{Buffers, Image, Inflate, MemDevice, NoFiles, ReadOnly, Source};

/// The image, in flash.
static IMAGE: &[u8] = include_bytes!("../probe.qcow2");

/// FNV-1a of the image's 64 KiB of guest data (`qemu-img convert -O raw probe.qcow2 -` piped through FNV-1a).
const EXPECTED: u64 = 0x2873_c7f2_27ca_4f09;

/// What [`run`] found, or why it stopped.
#[derive(Clone, Copy)]
enum Outcome {
    /// The checksum of the guest data and the number of runs mapped.
    Read { checksum: u64, runs: u32 },
    /// The image did not open or read.
    Failed,
}

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[inline(never)]
fn run() -> Outcome {
    // Every byte the engine uses, on the stack.
    let mut bounce = [0u8; 512];
    let mut metadata = [0u8; 4 * 512];
    let mut window = [0u8; 32 * 1024];
    let mut input = [0u8; 512];
    let mut chunk = [0u8; 4096];

    // Hide the image from the optimiser so nothing is folded at build time.
    let device = MemDevice::new(black_box(IMAGE));
    let buffers = Buffers {
        bounce: &mut bounce[..],
        metadata: &mut metadata[..],
    };
    let inflate = Inflate::new(&mut window[..], &mut input[..]);
    let opened: Result<Image<_, _, _, 1, 4, ReadOnly>, _> =
        Image::open(device, buffers, inflate, &mut NoFiles);
    let Ok(mut image) = opened else {
        return Outcome::Failed;
    };
    let size = image.virtual_size();

    // Walk the mapping: proves map_guest_range is linked and the runs are what they should be.
    let mut runs = 0u32;
    let mut pos = 0u64;
    while pos < size {
        let Ok(m) = image.map_guest_range(pos, size - pos) else {
            return Outcome::Failed;
        };
        runs = runs.wrapping_add(match m.source {
            Source::Compressed { .. } => 0x1_0000,
            Source::Data { .. } => 0x100,
            _ => 1,
        });
        pos = pos.saturating_add(m.len);
    }

    // Read the whole disk.
    let mut checksum = 0xcbf2_9ce4_8422_2325u64;
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(chunk.len() as u64) as usize;
        let Some(buf) = chunk.get_mut(..n) else {
            return Outcome::Failed;
        };
        if image.read_at(pos, buf).is_err() {
            return Outcome::Failed;
        }
        checksum = fnv1a(checksum, buf);
        pos += n as u64;
    }
    Outcome::Read { checksum, runs }
}

/// 0 when the disk read back as expected.
fn probe() -> usize {
    match black_box(run()) {
        Outcome::Read { checksum, runs } => {
            black_box(runs);
            usize::from(black_box(checksum) != EXPECTED)
        }
        Outcome::Failed => 2,
    }
}

/// Entry point of the bare-metal ELF targets (Cortex-M, RISC-V, AArch64).
#[cfg(not(target_os = "uefi"))]
#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    black_box(probe());
    loop {
        core::hint::spin_loop();
    }
}

/// Entry point of the UEFI application (the x86_64-unknown-uefi linker's `/entry:efi_main`). Returns
/// EFI_SUCCESS when the disk read back as expected.
#[cfg(target_os = "uefi")]
#[unsafe(no_mangle)]
pub extern "efiapi" fn efi_main(
    _image_handle: *mut core::ffi::c_void,
    _system_table: *mut core::ffi::c_void,
) -> usize {
    match probe() {
        0 => 0,
        // EFI_LOAD_ERROR / EFI_CRC_ERROR, with the error bit set.
        1 => (1 << (usize::BITS - 1)) | 27,
        _ => (1 << (usize::BITS - 1)) | 1,
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {
        core::hint::spin_loop();
    }
}
