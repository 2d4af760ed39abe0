//! A small qcow2 writer for tests that must not depend on qemu-img: builds valid images in memory.
#![allow(dead_code)]

pub struct Spec {
    pub cluster_bits: u32,
    pub size: u64,
    pub extended_l2: bool,
    pub version: u32,
}

/// What a guest cluster holds.
#[derive(Clone, Copy)]
pub enum Cluster {
    /// Allocated, filled with this byte.
    Fill(u8),
    /// Zero flag (standard L2) / all subclusters zero (extended L2).
    Zero,
    /// Extended L2 only: allocated, with (alloc bitmap, zero bitmap); allocated subclusters are filled.
    Sub(u32, u32, u8),
}

pub struct Built {
    pub bytes: Vec<u8>,
    /// The guest content, computed independently.
    pub expected: std::collections::BTreeMap<u64, Vec<u8>>,
}

fn put(img: &mut Vec<u8>, at: u64, bytes: &[u8]) {
    let at = at as usize;
    if img.len() < at + bytes.len() {
        img.resize(at + bytes.len(), 0);
    }
    img[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Builds an image: header, refcount table, one refcount block, L1, the needed L2 tables, data clusters.
/// `clusters` maps guest cluster index to content. Refcounts are not maintained (readers do not need them).
pub fn build(spec: &Spec, clusters: &[(u64, Cluster)]) -> Built {
    let cs = 1u64 << spec.cluster_bits;
    let entry = if spec.extended_l2 { 16 } else { 8 };
    let l2_entries = cs / entry;
    let coverage = cs * l2_entries;
    let l1_size = spec.size.div_ceil(coverage).max(1);
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let mut img = Vec::new();
    // cluster 0 header, 1 reftable, 2 refblock, 3.. L1
    put(&mut img, 0, &0x514649fbu32.to_be_bytes());
    put(&mut img, 4, &spec.version.to_be_bytes());
    put(&mut img, 20, &spec.cluster_bits.to_be_bytes());
    put(&mut img, 24, &spec.size.to_be_bytes());
    put(&mut img, 36, &(l1_size as u32).to_be_bytes());
    put(&mut img, 40, &(3 * cs).to_be_bytes());
    put(&mut img, 48, &cs.to_be_bytes());
    put(&mut img, 56, &1u32.to_be_bytes());
    if spec.version == 3 {
        let incompat: u64 = if spec.extended_l2 { 1 << 4 } else { 0 };
        put(&mut img, 72, &incompat.to_be_bytes());
        put(&mut img, 96, &4u32.to_be_bytes());
        put(&mut img, 100, &112u32.to_be_bytes());
    }
    put(&mut img, cs, &(2 * cs).to_be_bytes());
    let mut next = 3 + l1_clusters;
    img.resize((next * cs) as usize, 0);
    let mut l2_tables = std::collections::BTreeMap::new();
    let mut expected = std::collections::BTreeMap::new();
    for &(gc, content) in clusters {
        let l1i = gc / l2_entries;
        let l2 = *l2_tables.entry(l1i).or_insert_with(|| {
            let off = next * cs;
            next += 1;
            put(&mut img, 3 * cs + l1i * 8, &(off | (1 << 63)).to_be_bytes());
            img.resize((next * cs) as usize, 0);
            off
        });
        let slot = l2 + (gc % l2_entries) * entry;
        let mut data = vec![0u8; cs as usize];
        match content {
            Cluster::Fill(b) => {
                let off = next * cs;
                next += 1;
                data.fill(b);
                put(&mut img, off, &data);
                put(&mut img, slot, &(off | (1 << 63)).to_be_bytes());
                if spec.extended_l2 {
                    put(&mut img, slot + 8, &0xffff_ffffu64.to_be_bytes());
                }
            }
            Cluster::Zero => {
                if spec.extended_l2 {
                    put(&mut img, slot + 8, &(0xffff_ffffu64 << 32).to_be_bytes());
                } else {
                    put(&mut img, slot, &1u64.to_be_bytes());
                }
            }
            Cluster::Sub(alloc, zero, b) => {
                let off = next * cs;
                next += 1;
                let sub = cs / 32;
                let mut host = vec![0xEEu8; cs as usize]; // garbage where not allocated
                for i in 0..32u64 {
                    let r = (i * sub) as usize..((i + 1) * sub) as usize;
                    if alloc & (1 << i) != 0 {
                        host[r.clone()].fill(b);
                        data[r].fill(b);
                    }
                }
                put(&mut img, off, &host);
                put(&mut img, slot, &(off | (1 << 63)).to_be_bytes());
                put(
                    &mut img,
                    slot + 8,
                    &(((zero as u64) << 32) | alloc as u64).to_be_bytes(),
                );
            }
        }
        expected.insert(gc * cs, data);
    }
    Built {
        bytes: img,
        expected,
    }
}

/// The expected guest bytes of `[offset, offset + len)`.
pub fn expected_range(b: &Built, cs: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (i, byte) in out.iter_mut().enumerate() {
        let pos = offset + i as u64;
        let base = pos - pos % cs;
        if let Some(d) = b.expected.get(&base) {
            *byte = d[(pos - base) as usize];
        }
    }
    out
}
