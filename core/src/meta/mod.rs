//! Metadata in bounded memory: the slice cache, and typed access to the image's tables through it.
//!
//! - [`cache`] holds [`SliceCache`]: `N` power-of-two slices of metadata in one caller-supplied buffer, least
//!   recently used evicted, dirty slices kept until a writer writes them back.
//! - [`tables`] holds [`TableLayout`] (where an image's L1 table and refcount table are, and how big a slice is)
//!   and [`TableAccess`], which reads L1, L2 and refcount-table entries and refcounts through the cache. The
//!   reader's mapping, introspection, the writer and the check all find an entry this way; what an entry
//!   means is [`crate::format`]'s.
//!
//! The order in which a writer's dirty slices reach the device is the writer's (`write::writeback`).

pub mod cache;
pub mod tables;

pub use cache::{MIN_SLICE, SliceCache, SliceKind};
pub use tables::{TableAccess, TableLayout};
