//! `qcow2-core`: a qcow2 engine for firmware and unikernels.
//!
//! `#![no_std]`, no allocator, no `unsafe`. The caller supplies the block device ([`BlockDevice`], and
//! [`BlockDeviceWrite`] for writers) and every buffer; the engine validates everything it reads from the image
//! before using it, and nothing in it panics on any input.
//!
//! # Layers
//!
//! - [`device`]: the block-device traits; [`io`]: byte ranges over blocks through one bounce block, plus a
//!   memory device and (feature `embedded-io`) an adapter for `Read + Seek` streams.
//! - [`format`]: on-disk types, parsed once with full validation.
//! - [`meta`]: a bounded cache of metadata slices, and typed access to L1, L2 and refcount-table entries and
//!   refcounts through it.
//! - [`engine`]: the image and its backing chain: open, map, read; and (for a [`BlockDeviceWrite`]) writes
//!   with allocation and copy-on-write, zeroes, discard, compressed clusters, flush and close, in QEMU's
//!   crash-safe order (see [`Image::open_writable`]).
//! - [`compress`]: streamed inflate into the caller's buffer.
//! - [`check`]: `qemu-img check` and repair, in bounded memory.
//!
//! # Reading an image
//!
//! ```
//! use qcow2_core::{Buffers, Image, MemDevice, NoDecompressor, NoFiles};
//! # fn main() -> Result<(), qcow2_core::Error<qcow2_core::io::MemDeviceFull>> {
//! # let bytes = qcow2_core::testimage::tiny_qcow2();
//! let mut bounce = [0u8; 512];
//! let mut cache = [0u8; 8 * 512];
//! let buffers = Buffers { bounce: &mut bounce[..], metadata: &mut cache[..] };
//! let mut image: Image<_, _, _> = Image::open(MemDevice::new(&bytes[..]), buffers, NoDecompressor, &mut NoFiles)?;
//! let mut sector = [0u8; 512];
//! image.read_at(0, &mut sector)?;
//! # Ok(()) }
//! ```
//!
//! # Memory
//!
//! Everything the engine uses is in the [`Image`] value and the buffers the caller passes in; its worst case
//! is, in bytes:
//!
//! ```text
//! RAM = size_of::<Image<D, B, C, DEPTH, SLICES>>()       (≈ 64 + DEPTH * (size_of::<Layer<D>>()) + SLICES * 24
//!                                                          + size_of::<C>())
//!     + bounce.len()                                      (one device block: 512 .. 64 KiB)
//!     + metadata.len()                                    (SLICES slots of a power of two ≥ 512 bytes)
//!     + for compressed images with Inflate: window.len() + input.len()
//!                                                         (window ≥ 32 KiB, or ≥ one cluster to keep one)
//!     + stack: bounded, no recursion; open() uses ≈ 2 KiB (one 1023-byte name buffer at a
//!       time), writes ≈ 1 KiB (a 512-byte copy buffer when the bounce buffer is a single block)
//! ```
//!
//! Writing uses the same buffers: dirty L2 and refcount slices stay in the metadata cache until they are
//! written back (so a writer needs at least four slices), copy-on-write goes through the part of the bounce
//! buffer beyond its first block (or a 512-byte stack buffer), and the image value holds a queue of 32
//! host offsets waiting for their refcounts to drop.
//!
//! None of these terms depends on the image's virtual size, cluster size, L1 size or chain length: a
//! 2 MiB-cluster, 1 TiB image opens and reads with the same RAM as a 64 KiB-cluster one (a test asserts it by
//! counting what the engine holds).
//!
//! # Features
//!
//! - `dirty-repair` (default): [`Image::open_writable`] rebuilds the refcounts of a dirty image (lazy
//!   refcounts that a crashed writer did not write back) with [`check::repair`], as QEMU does when it opens
//!   one. That links check's walk and repair, about 30 KiB of thumbv7em code at opt-level `z`. Without the
//!   feature, such an open fails with [`Error::NeedsRepair`] and writes nothing (run [`check::repair`] with
//!   [`check::RepairMode::All`], then open again), and the engine never makes an image dirty itself: on a
//!   lazy-refcounts image it writes refcounts back as it does on any other, so whatever it leaves behind,
//!   even after a power loss, opens for writing again. Reading is the same either way. Firmware that turns
//!   default features off gets the smaller engine.
//! - `bitmaps` (default): persistent dirty bitmaps kept up to date by writes, and edited.
//! - `luks`, `luks-sha512`, `aes-legacy`: encrypted images (module `crypto`): unlocked with the passphrase
//!   the resolver gives ([`Resolver::passphrase`]), read and written, and made. Off by default: a bootloader
//!   for plain disks links none of it.
//! - `embedded-io`: `io::EmbeddedIoDevice`, a block device over an `embedded-io` `Read + Seek` stream.
//! - `defmt` or `log` (not both): the engine's log messages, and `defmt::Format` for its public types.

#![no_std]
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]
#![warn(missing_docs)]

pub mod check;
pub mod compress;
pub mod create;
#[cfg(any(feature = "luks", feature = "aes-legacy"))]
pub mod crypto;
pub mod device;
pub mod engine;
mod error;
pub mod format;
pub mod io;
mod logging;
pub mod meta;
#[doc(hidden)]
pub mod testimage;
pub mod write;

pub use compress::{Decompressor, Inflate, NoDecompressor};
pub use device::{BlockDevice, BlockDeviceWrite, DeviceExtent};
pub use engine::{
    Buffers, FileRequest, Format, Image, Layer, Mapping, NoFiles, ReadOnly, Resolver, Source,
};
pub use error::Error;
pub use io::MemDevice;
pub use write::WriteState;
