//! The second half of the verification before the first write, in the metadata cache's buffer: the sorted
//! list of every metadata cluster, structures that share a cluster, and L2 entries that name one.

use super::*;

/// Kinds of metadata cluster in the sorted list of [`Meta::verify_references`], kept in the low bits of each
/// (cluster-aligned) host offset.
const KIND_MASK: u64 = 0xf;

fn kind_code(s: Structure) -> u64 {
    match s {
        Structure::Header => 0,
        Structure::L1 => 1,
        Structure::RefcountTable => 2,
        Structure::RefcountBlock => 3,
        Structure::L2 => 4,
        Structure::SnapshotTable => 5,
        Structure::SnapshotL1 => 6,
        Structure::SnapshotL2 => 7,
        Structure::BitmapDirectory => 8,
        Structure::BitmapTable => 9,
        Structure::Cached => 10,
    }
}

/// The host clusters of the image's metadata, in the caller's metadata cache buffer (used as scratch memory
/// while nothing is cached): 8-byte big-endian entries, host offset | kind.
struct MetadataList<'a> {
    entries: &'a mut [[u8; 8]],
    len: usize,
    cluster_size: u64,
}

impl MetadataList<'_> {
    /// Adds the clusters of `[offset, offset + len)` as `s`; `false` when the list is full.
    fn push_range(&mut self, offset: u64, len: u64, s: Structure) -> bool {
        let cs = self.cluster_size;
        let mut host = offset & !cs.wrapping_sub(1);
        let end = offset.saturating_add(len);
        while host < end {
            if !self.push(host, s) {
                return false;
            }
            host = host.saturating_add(cs);
        }
        true
    }

    fn push(&mut self, host: u64, s: Structure) -> bool {
        if host > MAX_HOST_OFFSET || host & self.cluster_size.wrapping_sub(1) != 0 {
            // Not a cluster any table could be at: an invalid entry is refused where it is used.
            return true;
        }
        match self.entries.get_mut(self.len) {
            Some(e) => {
                *e = (host | kind_code(s)).to_be_bytes();
                self.len = self.len.saturating_add(1);
                true
            }
            None => false,
        }
    }

    fn sorted(&mut self) -> &[[u8; 8]] {
        let list = self.entries.get_mut(..self.len).unwrap_or(&mut []);
        heapsort(list);
        list
    }
}

/// Sorts `list` in place (a heapsort: small, no allocation, and no panic path, unlike the standard library's
/// sorts).
fn heapsort(list: &mut [[u8; 8]]) {
    let n = list.len();
    let mut start = n / 2;
    while start > 0 {
        start = start.saturating_sub(1);
        sift_down(list, start, n);
    }
    let mut end = n;
    while end > 1 {
        end = end.saturating_sub(1);
        swap(list, 0, end);
        sift_down(list, 0, end);
    }
}

/// Restores the max-heap order below `root` in `list[..end]`.
fn sift_down(list: &mut [[u8; 8]], mut root: usize, end: usize) {
    loop {
        let left = root.saturating_mul(2).saturating_add(1);
        if left >= end {
            return;
        }
        let right = left.saturating_add(1);
        let mut child = left;
        if right < end && list.get(right) > list.get(left) {
            child = right;
        }
        if list.get(child) <= list.get(root) {
            return;
        }
        swap(list, root, child);
        root = child;
    }
}

fn swap(list: &mut [[u8; 8]], a: usize, b: usize) {
    let (Some(&x), Some(&y)) = (list.get(a), list.get(b)) else {
        return;
    };
    if let Some(v) = list.get_mut(a) {
        *v = y;
    }
    if let Some(v) = list.get_mut(b) {
        *v = x;
    }
}

/// The first cluster that two structures share (host offset), if any: an L2 table may be both active and a
/// snapshot's, any other pair is refused.
fn shared_cluster(sorted: &[[u8; 8]]) -> Option<u64> {
    let l2 = kind_code(Structure::L2);
    let snapshot_l2 = kind_code(Structure::SnapshotL2);
    let mut i = 0usize;
    while let Some(first) = sorted.get(i) {
        let host = u64::from_be_bytes(*first) & !KIND_MASK;
        let mut j = i;
        let mut active = 0u32;
        let mut other = 0u32;
        while let Some(e) = sorted.get(j) {
            let v = u64::from_be_bytes(*e);
            if v & !KIND_MASK != host {
                break;
            }
            match v & KIND_MASK {
                k if k == l2 => active = active.saturating_add(1),
                k if k == snapshot_l2 => {}
                _ => other = other.saturating_add(1),
            }
            j = j.saturating_add(1);
        }
        let group = j.saturating_sub(i);
        if group > 1 && (other != 0 || active > 1) {
            return Some(host);
        }
        i = j;
    }
    None
}

/// Whether any cluster of `[offset, offset + len)` is in the sorted list.
fn holds_metadata(sorted: &[[u8; 8]], offset: u64, len: u64, cluster_size: u64) -> bool {
    let mut host = offset & !cluster_size.wrapping_sub(1);
    let end = offset.saturating_add(len.max(1));
    while host < end {
        let at = sorted.partition_point(|e| u64::from_be_bytes(*e) & !KIND_MASK < host);
        if sorted
            .get(at)
            .is_some_and(|e| u64::from_be_bytes(*e) & !KIND_MASK == host)
        {
            return true;
        }
        host = host.saturating_add(cluster_size);
    }
    false
}

impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// The second half of the verification before the first write, in the metadata cache's buffer (empty
    /// then): lists every metadata cluster, refuses when two structures share one, then reads every active L2
    /// table and refuses when an entry names a cluster that holds metadata (writing elsewhere could then change
    /// what that entry reads, and writing or freeing through it would damage the table). Returns `false`,
    /// doing nothing, when the list does not fit the buffer (8 bytes a metadata cluster); the checks of single
    /// writes still apply then.
    pub(in crate::write) fn verify_references(&mut self) -> Result<bool, Error<D::Error>> {
        let g = self.g;
        let cs = g.tables.cluster_size;
        let h = *self.header;
        let snapshot_len = self.w.snapshot_table_len;
        let bitmaps = self.bitmaps.filter(|_| self.bitmaps_live());
        let Meta {
            dev, bounce, cache, ..
        } = self;
        let scratch = cache.scratch()?;
        let (entries, _) = scratch.as_chunks_mut::<8>();
        let mut list = MetadataList {
            entries,
            len: 0,
            cluster_size: cs,
        };
        let mut fits = list.push_range(0, cs, Structure::Header)
            && list.push_range(
                g.tables.l1_table_offset,
                g.tables.l1_size.saturating_mul(8),
                Structure::L1,
            )
            && list.push_range(
                g.tables.refcount_table_offset,
                g.tables.refcount_table_entries.saturating_mul(8),
                Structure::RefcountTable,
            );
        if fits && h.nb_snapshots != 0 {
            fits = list.push_range(h.snapshots_offset, snapshot_len, Structure::SnapshotTable);
        }
        if let Some(b) = bitmaps
            && fits
        {
            fits = list.push_range(
                b.directory_offset,
                b.directory_size,
                Structure::BitmapDirectory,
            );
        }
        if fits {
            fits = for_each_word(
                dev,
                bounce,
                g.tables.refcount_table_offset,
                g.tables.refcount_table_entries,
                |_, w| {
                    let block = w & REFTABLE_OFFSET_MASK;
                    block == 0 || list.push(block, Structure::RefcountBlock)
                },
            )?;
        }
        if fits {
            fits = for_each_word(
                dev,
                bounce,
                g.tables.l1_table_offset,
                g.tables.l1_size,
                |_, w| {
                    let l2 = l2_table_of(w, cs);
                    l2 == 0 || list.push(l2, Structure::L2)
                },
            )?;
        }
        let mut at = h.snapshots_offset;
        for _ in 0..h.nb_snapshots {
            if !fits {
                break;
            }
            let mut fixed = [0u8; SNAPSHOT_FIXED_LEN];
            read_part(dev, bounce, at, &mut fixed)?;
            let s = SnapshotEntryLayout::parse(&fixed);
            let l1_bytes = u64::from(s.l1_size).saturating_mul(8);
            fits = list.push_range(s.l1_table_offset, l1_bytes, Structure::SnapshotL1)
                && for_each_word(dev, bounce, s.l1_table_offset, s.l1_size.into(), |_, w| {
                    let l2 = l2_table_of(w, cs);
                    l2 == 0 || list.push(l2, Structure::SnapshotL2)
                })?;
            at = at.saturating_add(s.entry_len());
        }
        if let Some(b) = bitmaps {
            let mut walk = DirectoryWalk::new(&b, cs, h.size);
            while fits {
                let Some(at) = walk.next_at() else {
                    break;
                };
                let mut raw = [0u8; DIR_ENTRY_LEN];
                read_part(dev, bounce, at, &mut raw)?;
                let Ok(found) = walk.advance(&raw) else {
                    break;
                };
                fits = list.push_range(
                    found.entry.table_offset,
                    found.entry.table_bytes(),
                    Structure::BitmapTable,
                );
            }
        }
        if !fits {
            cache.invalidate(None);
            return Ok(false);
        }
        let sorted = list.sorted();
        if let Some(host) = shared_cluster(sorted) {
            return Err(crate::error::corrupt(
                "two metadata structures share a cluster; repair the image (check -r all)",
                host,
            ));
        }
        // Every entry of every active L2 table.
        let entry_words = g.tables.l2_entry_size() / 8;
        let mut bad = None;
        let mut l1_index = 0u64;
        while l1_index < g.tables.l1_size && bad.is_none() {
            let mut word = [0u8; 8];
            read_part(
                dev,
                bounce,
                g.tables
                    .l1_table_offset
                    .saturating_add(l1_index.saturating_mul(8)),
                &mut word,
            )?;
            l1_index = l1_index.saturating_add(1);
            let table = l2_table_of(u64::from_be_bytes(word), cs);
            if table == 0 || g.tables.l2_format.external_data {
                continue;
            }
            let mut previous = 0u64;
            let _ = for_each_word(
                dev,
                bounce,
                table,
                g.l2_entries.saturating_mul(entry_words),
                |pos, w| {
                    // Extended L2: the word after each entry is its subcluster bitmap.
                    let index = pos.saturating_sub(table) / 8;
                    if entry_words == 2 && index % 2 == 1 {
                        let entry = L2Entry {
                            word: previous,
                            bitmap: w,
                        };
                        if let Some((host, len)) = entry_hosts(entry, g.tables.l2_format, cs)
                            && holds_metadata(sorted, host, len, cs)
                        {
                            bad = Some(pos.saturating_sub(8));
                            return false;
                        }
                        return true;
                    }
                    previous = w;
                    if entry_words == 2 {
                        return true;
                    }
                    let entry = L2Entry { word: w, bitmap: 0 };
                    if let Some((host, len)) = entry_hosts(entry, g.tables.l2_format, cs)
                        && holds_metadata(sorted, host, len, cs)
                    {
                        bad = Some(pos);
                        return false;
                    }
                    true
                },
            )?;
        }
        cache.invalidate(None);
        match bad {
            Some(pos) => Err(crate::error::corrupt(
                "an L2 entry names a cluster that holds metadata; repair the image (check -r all)",
                pos,
            )),
            None => Ok(true),
        }
    }
}

/// The host bytes an L2 entry names in the image file (none for unallocated, zero without a preallocated
/// cluster, or an invalid entry).
fn entry_hosts(entry: L2Entry, format: L2Format, cluster_size: u64) -> Option<(u64, u64)> {
    match entry.classify(format).ok()? {
        ClusterKind::Data { host } | ClusterKind::Zero { host: Some(host) } => {
            Some((host, cluster_size))
        }
        ClusterKind::Compressed(d) => Some((d.offset, d.len)),
        ClusterKind::Unallocated | ClusterKind::Zero { host: None } => None,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::heapsort;

    #[test]
    fn heapsort_sorts() {
        let mut seed = 0x1234_5678_u64;
        for n in [0usize, 1, 2, 3, 10, 257] {
            let mut v: std::vec::Vec<[u8; 8]> = (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed % 50).to_be_bytes()
                })
                .collect();
            let mut want = v.clone();
            want.sort();
            heapsort(&mut v);
            assert_eq!(v, want, "n = {n}");
        }
    }
}
