//! A tiny valid qcow2 image built in memory, for examples and tests that have no files.
//!
//! 64 KiB virtual disk, 512-byte clusters, version 3, 16-bit refcounts. Guest cluster 0 holds the bytes
//! `0, 1, 2, ..., 255, 0, 1, ...`; everything else is unallocated.
#![allow(clippy::arithmetic_side_effects)]

/// Length of [`tiny_qcow2`]'s image.
pub const TINY_LEN: usize = 6 * 512;

fn put(img: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = img.get_mut(at..at.saturating_add(bytes.len())) {
        dst.copy_from_slice(bytes);
    }
}

/// Builds the image: header (cluster 0), refcount table (1), refcount block (2), L1 (3), L2 (4), data (5).
pub fn tiny_qcow2() -> [u8; TINY_LEN] {
    let mut img = [0u8; TINY_LEN];
    put(&mut img, 0, &crate::format::MAGIC.to_be_bytes());
    put(&mut img, 4, &3u32.to_be_bytes()); // version
    put(&mut img, 20, &9u32.to_be_bytes()); // cluster_bits
    put(&mut img, 24, &(64u64 * 1024).to_be_bytes()); // size
    put(&mut img, 36, &2u32.to_be_bytes()); // l1_size: 32 KiB per L2 table
    put(&mut img, 40, &(3u64 * 512).to_be_bytes()); // l1_table_offset
    put(&mut img, 48, &512u64.to_be_bytes()); // refcount_table_offset
    put(&mut img, 56, &1u32.to_be_bytes()); // refcount_table_clusters
    put(&mut img, 96, &4u32.to_be_bytes()); // refcount_order
    put(&mut img, 100, &112u32.to_be_bytes()); // header_length
    put(&mut img, 512, &1024u64.to_be_bytes()); // refcount table[0] -> block at cluster 2
    for c in 0..6usize {
        put(&mut img, 1024 + c * 2, &1u16.to_be_bytes());
    }
    put(&mut img, 3 * 512, &((4u64 * 512) | (1 << 63)).to_be_bytes()); // L1[0] -> L2, COPIED
    put(&mut img, 4 * 512, &((5u64 * 512) | (1 << 63)).to_be_bytes()); // L2[0] -> data, COPIED
    for i in 0..512usize {
        put(&mut img, 5 * 512 + i, &[i as u8]);
    }
    img
}
