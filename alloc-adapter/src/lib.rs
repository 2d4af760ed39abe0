//! `qcow2-alloc`: [`qcow2_core`] with heap-backed buffers, larger caches, and zstd decompression.
