//! Sizes of a new image as `qemu-img measure` computes them: the refcount structures that count a number of
//! clusters (themselves included), and the file a fully allocated image of a virtual size takes.

/// Refcount blocks and refcount table clusters that count `clusters` clusters and themselves, found as the
/// fixed point QEMU's `qcow2_refcount_metadata_size` finds (`generous`: room for the table to grow by half).
/// Returns `(blocks, table clusters)`.
pub fn refcount_structures(
    clusters: u64,
    cluster_size: u64,
    refcount_order: u32,
    generous: bool,
) -> (u64, u64) {
    let per_block = (cluster_size.saturating_mul(8) >> (refcount_order & 63)).max(1);
    let per_table_cluster = (cluster_size >> 3).max(1);
    let (mut blocks, mut table, mut total) = (0u64, 0u64, 0u64);
    let (mut clusters, mut generous) = (clusters, generous);
    loop {
        let last = total;
        blocks = clusters
            .saturating_add(table)
            .saturating_add(blocks)
            .div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        total = clusters.saturating_add(blocks).saturating_add(table);
        if total == last && generous {
            clusters = clusters.saturating_add(table.div_ceil(2));
            total = 0;
            generous = false;
        } else if total == last {
            return (blocks, table);
        }
    }
}

/// The file size of a qcow2 image of `virtual_size` bytes (rounded up to whole clusters) with every cluster
/// allocated: the header cluster, L2 tables, the L1 table, refcount structures and the data (QEMU's
/// `qcow2_calc_prealloc_size`).
pub fn fully_allocated_size(
    virtual_size: u64,
    cluster_size: u64,
    refcount_order: u32,
    extended_l2: bool,
) -> u64 {
    let cs = cluster_size.max(1);
    let data = virtual_size.div_ceil(cs).saturating_mul(cs);
    let entry = if extended_l2 { 16 } else { 8 };
    let per_l2 = cs.checked_div(entry).unwrap_or(0).max(1);
    let l2_entries = data
        .checked_div(cs)
        .unwrap_or(0)
        .div_ceil(per_l2)
        .saturating_mul(per_l2);
    let l2_bytes = l2_entries.saturating_mul(entry);
    let per_l1_cluster = (cs >> 3).max(1);
    let l1_entries = l2_bytes
        .checked_div(cs)
        .unwrap_or(0)
        .div_ceil(per_l1_cluster)
        .saturating_mul(per_l1_cluster);
    let meta = cs
        .saturating_add(l2_bytes)
        .saturating_add(l1_entries.saturating_mul(8));
    let (blocks, table) = refcount_structures(
        meta.saturating_add(data).checked_div(cs).unwrap_or(0),
        cs,
        refcount_order,
        false,
    );
    meta.saturating_add(blocks.saturating_add(table).saturating_mul(cs))
        .saturating_add(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_qemu_img_measure() {
        // `qemu-img measure -O qcow2 [-o ...] --size N`, fully allocated size, qemu-img 10.0.
        assert_eq!(
            fully_allocated_size(1 << 30, 65536, 4, false),
            1_074_135_040
        );
        assert_eq!(fully_allocated_size(1 << 30, 65536, 4, true), 1_074_266_112);
        assert_eq!(
            fully_allocated_size(100 << 30, 4096, 0, false),
            107_587_604_480
        );
    }
}
