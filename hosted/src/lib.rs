//! The std side of qcow2-core, as a library: host files as block devices ([`mod@file`]), opening an image by
//! name with the backing-file policy ([`open`]; the chain's files found by [`chain`]), raw and qcow2 images
//! behind one trait ([`disk`], [`raw_disk`], [`qcow2_disk`]), cache modes ([`cache`]) and a thread-safe handle ([`shared`]).
//!
//! Programs open images with [`Qcow2File`] (a `std::io` file over the guest view; [`OpenOptions`] for
//! read-write, format and cache mode) or share one between threads with [`shared::SharedDisk`]; errors are
//! [`DiskError`]s with an [`ErrorKind`].
//!
//! The `qcow2` command-line tool, which prints what `qemu-img` and `qemu-io` (QEMU 10) print so that the two
//! can be compared text for text, lives apart in [`cli`] and uses only this public API; the binary calls
//! [`cli::run`].

pub mod aligned;
pub mod cache;
pub mod chain;
pub mod cli;
pub mod disk;
pub mod file;
pub mod open;
pub mod qcow2_disk;
pub mod qcow2_file;
pub mod raw_disk;
pub mod shared;

pub use cache::CacheMode;
pub use disk::{DiskError, ErrorKind};
pub use qcow2_file::{CreateOptions, ImageFormat, OpenOptions, Qcow2File};
