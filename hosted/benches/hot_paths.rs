//! Micro-benchmarks of the engine's hot paths, printed as ns per operation (no framework: a warm-up, then
//! the best of several timed batches).
//!
//!   cargo bench -p qcow2-hosted --bench hot_paths
//!
//! - L2 entry decoding (`L2Entry::classify`, standard and extended entries);
//! - slice cache lookups that hit (`SliceCache::get`, 32 slots as the heap adapter has);
//! - mapping a long guest range (`Image::map_guest_range` over a 64 MiB preallocated image, per cluster);
//! - reading it (`Image::read_at` in 64 KiB and 4 KiB requests, from memory: the engine's cost, no syscalls).

use std::hint::black_box;
use std::time::Instant;

use qcow2_core::create::{CreateOptions, Preallocation, create};
use qcow2_core::format::{L2Entry, L2Format};
use qcow2_core::meta::SliceCache;
use qcow2_core::{MemDevice, NoFiles};

/// Runs `f` (which does `ops` operations) in batches and prints the best batch's ns per operation.
fn bench(name: &str, ops: u64, mut f: impl FnMut()) {
    f();
    let mut best = f64::MAX;
    for _ in 0..7 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_nanos() as f64 / ops as f64);
    }
    println!("{name:<52} {best:>10.2} ns/op");
}

const CS: u64 = 64 * 1024;
const DISK: u64 = 64 << 20;

fn main() {
    // Entry decoding: a table's worth of data, zero and unallocated entries.
    let f = L2Format {
        cluster_bits: 16,
        v3: true,
        extended: false,
        external_data: false,
    };
    let entries: Vec<L2Entry> = (0..8192u64)
        .map(|i| L2Entry {
            word: match i % 4 {
                0 | 1 => (1 << 63) | ((i + 16) << 16),
                2 => 1,
                _ => 0,
            },
            bitmap: 0,
        })
        .collect();
    bench("L2Entry::classify (standard)", entries.len() as u64, || {
        for e in &entries {
            let _ = black_box(black_box(*e).classify(f));
        }
    });
    let fx = L2Format {
        extended: true,
        ..f
    };
    let ext: Vec<L2Entry> = entries
        .iter()
        .map(|e| L2Entry {
            word: e.word & !1,
            bitmap: 0x0000_ffff,
        })
        .collect();
    bench("L2Entry::classify (extended)", ext.len() as u64, || {
        for e in &ext {
            let _ = black_box(black_box(*e).classify(fx));
        }
    });

    // Slice cache hits: 32 slots of 32 KiB over a 1 MiB device, cycling through all of them.
    let mut dev = MemDevice::new(vec![0x5au8; 1 << 20]);
    let mut bounce = vec![0u8; 64 * 1024];
    let mut cache: SliceCache<Vec<u8>, 32> =
        SliceCache::new::<()>(vec![0u8; 32 * 32 * 1024]).unwrap();
    for s in 0..32u64 {
        cache
            .get(&mut dev, &mut bounce, 0, s * 32768, 32768)
            .unwrap();
    }
    bench("SliceCache::get hit (32 slots)", 32 * 1000, || {
        for _ in 0..1000 {
            for s in 0..32u64 {
                let b = cache
                    .get(&mut dev, &mut bounce, 0, s * 32768, 32768)
                    .unwrap();
                black_box(b.first());
            }
        }
    });
    bench("SliceCache::get hit (same slice)", 32_000, || {
        for _ in 0..32_000 {
            let b = cache
                .get(&mut dev, &mut bounce, 0, 31 * 32768, 32768)
                .unwrap();
            black_box(b.first());
        }
    });

    // A 64 MiB image with every cluster allocated (metadata preallocation), in memory.
    let opts = CreateOptions {
        size: DISK,
        cluster_size: CS,
        preallocation: Preallocation::Metadata,
        ..CreateOptions::default()
    };
    let mut mem = MemDevice::with_len(vec![0u8; (DISK + (4 << 20)) as usize], 0, 512);
    let len = create(&mut mem, &mut bounce, &opts).unwrap();
    let mut content = mem.into_inner();
    content.truncate(len as usize);
    let mut img = qcow2_alloc::open(
        MemDevice::new(content),
        qcow2_core::Format::Qcow2,
        &mut NoFiles,
    )
    .unwrap();
    let clusters = DISK / CS;
    bench(
        "map_guest_range over 64 MiB (per cluster)",
        clusters,
        || {
            let mut pos = 0;
            while pos < DISK {
                let m = img.map_guest_range(pos, DISK - pos).unwrap();
                pos += m.len;
            }
            black_box(pos);
        },
    );
    let mut buf = vec![0u8; 64 * 1024];
    bench("read_at 64 KiB, sequential (per request)", clusters, || {
        for c in 0..clusters {
            img.read_at(c * CS, &mut buf).unwrap();
        }
    });
    let mut small = vec![0u8; 4096];
    let blocks = DISK / 4096;
    bench("read_at 4 KiB, strided (per request)", blocks, || {
        for i in 0..blocks {
            img.read_at((i * 300_007 % blocks) * 4096, &mut small)
                .unwrap();
        }
    });
    let mut long = vec![0u8; 16 << 20];
    bench("read_at 16 MiB (per cluster)", 16 << 4, || {
        img.read_at(0, &mut long).unwrap();
    });
}
