//! The read-only engine with deflate of `ro-deflate`, built with qcow2-core's `luks`: an encrypted image is
//! unlocked with a passphrase (PBKDF2, the key slot's material merged a sector at a time) and its data
//! decrypted as it is read. `cargo build --release --features luks --bin ro-luks`; printed for information
//! (a bootloader for plain disks links none of it).

#![no_std]
#![no_main]

#[path = "../common.rs"]
mod common;

use core::hint::black_box;
use core::mem::size_of;

use common::{BLOCK, DEPTH, Dev, INPUT, METADATA, SLICES, WINDOW};
use qcow2_core::{Buffers, Error, FileRequest, Image, Inflate, ReadOnly, Resolver};

type Img<'a> = Image<Dev, &'a mut [u8], Inflate<&'a mut [u8]>, DEPTH, SLICES, ReadOnly>;

/// RAM figures for targets/budget.sh: the image value (its layers hold the data keys) and the buffers a
/// compressed read needs.
#[used]
#[unsafe(link_section = ".budget")]
static RAM: [u32; 5] = [
    size_of::<Img<'static>>() as u32,
    BLOCK as u32,
    METADATA as u32,
    WINDOW as u32,
    INPUT as u32,
];

/// No backing or data files; the passphrase the optimiser cannot see.
struct Passphrase([u8; 16]);

impl Resolver<Dev> for Passphrase {
    fn backing_file(&mut self, _request: FileRequest<'_>) -> Result<Dev, Error<()>> {
        Err(Error::Unavailable { what: "none" })
    }
    fn data_file(&mut self, _request: FileRequest<'_>) -> Result<Dev, Error<()>> {
        Err(Error::Unavailable { what: "none" })
    }
    fn passphrase(&mut self, _depth: usize) -> Option<&[u8]> {
        Some(black_box(&self.0[..]))
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    let mut bounce = [0u8; BLOCK];
    let mut metadata = [0u8; METADATA];
    let mut window = [0u8; WINDOW];
    let mut input = [0u8; INPUT];
    let mut out = [0u8; BLOCK];
    let buffers = Buffers {
        bounce: &mut bounce[..],
        metadata: &mut metadata[..],
    };
    if let Ok(mut image) = Img::open(
        Dev::new(),
        buffers,
        Inflate::new(&mut window[..], &mut input[..]),
        &mut Passphrase(black_box([0x61; 16])),
    ) {
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
