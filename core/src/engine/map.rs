//! Mapping: a guest range split at cluster (or subcluster) boundaries, each piece's L2 entry classified, and
//! contiguous pieces with one source merged into a run ([`Mapping`]), down the backing chain.

use super::*;

/// The state of one (sub)cluster as a run source, for `pos` inside it.
pub(super) fn piece_source(kind: ClusterKind, in_cluster: u64, external: bool) -> Source {
    match kind {
        ClusterKind::Unallocated => Source::Unallocated { host: None },
        ClusterKind::Zero { host } => Source::Zero {
            host: host.map(|h| h.saturating_add(in_cluster)),
            external,
        },
        ClusterKind::Data { host } => Source::Data {
            host: host.saturating_add(in_cluster),
            external,
        },
        ClusterKind::Compressed(descriptor) => Source::Compressed {
            descriptor,
            skip: in_cluster,
        },
    }
}

/// Whether a piece with source `next` continues a run with source `run` that is `run_len` bytes long.
pub(super) fn continues(run: Source, run_len: u64, next: Source) -> bool {
    match (run, next) {
        (Source::Unallocated { host: None }, Source::Unallocated { host: None }) => true,
        (Source::Unallocated { host: Some(a) }, Source::Unallocated { host: Some(b) }) => {
            a.checked_add(run_len) == Some(b)
        }
        (
            Source::Data {
                host: a,
                external: x,
            },
            Source::Data {
                host: b,
                external: y,
            },
        ) => x == y && a.checked_add(run_len) == Some(b),
        (Source::Zero { host: None, .. }, Source::Zero { host: None, .. }) => true,
        (
            Source::Zero {
                host: Some(a),
                external: x,
            },
            Source::Zero {
                host: Some(b),
                external: y,
            },
        ) => x == y && a.checked_add(run_len) == Some(b),
        _ => false,
    }
}

/// Maps the first run of `[pos, pos + limit)` inside one qcow2 image.
pub(super) fn map_qcow2<D: BlockDevice, B: AsRef<[u8]> + AsMut<[u8]>, const N: usize>(
    meta: &Qcow2Meta,
    dev: &mut D,
    cache: &mut SliceCache<B, N>,
    bounce: &mut [u8],
    depth: usize,
    pos: u64,
    limit: u64,
) -> Result<(Source, u64), Error<D::Error>> {
    let h = &meta.header;
    let cluster_bits = h.cluster_bits;
    let cluster_size = h.cluster_size();
    let coverage_bits = h.l2_coverage_bits();
    let l2_entries = h.l2_entries();
    let sub_size = h.subcluster_size();
    let external = meta.l2.external_data;
    let mut tables = TableAccess {
        layout: TableLayout::of(h, cache.slot_size()),
        dev,
        cache,
        bounce,
        layer: depth as u8,
    };
    let slice_len = tables.layout.slice_size;

    let end = pos.saturating_add(limit);
    let mut run: Option<(Source, u64)> = None;
    let mut cur = pos;
    while cur < end {
        // L1 entry (through the slice cache).
        let l1_index = cur >> coverage_bits;
        let l1_span_end = l1_index
            .saturating_add(1)
            .checked_shl(coverage_bits)
            .unwrap_or(u64::MAX)
            .min(end);
        let l2_offset = match tables.l1_entry(l1_index)? {
            None => None,
            Some(entry) => entry.l2_offset(cluster_size).map_err(|e| {
                corrupt(
                    e.describe("L1"),
                    h.l1_table_offset.saturating_add(l1_index.saturating_mul(8)),
                )
            })?,
        };
        let Some(l2_offset) = l2_offset else {
            let piece = Source::Unallocated { host: None };
            match run {
                None => run = Some((piece, l1_span_end.saturating_sub(cur))),
                Some((src, len)) if continues(src, len, piece) => {
                    run = Some((src, len.saturating_add(l1_span_end.saturating_sub(cur))));
                }
                Some(_) => break,
            }
            cur = l1_span_end;
            continue;
        };
        // L2 entries of this table, slice by slice.
        while cur < l1_span_end {
            let cluster_index = (cur >> cluster_bits) & l2_entries.wrapping_sub(1);
            let (host, at) = tables.layout.l2_position(l2_offset, cluster_index);
            let entry_size = tables.layout.l2_entry_size();
            let slice = tables.slice(host)?;
            let mut at = at as u64;
            let mut stop = false;
            while at < slice_len && cur < l1_span_end {
                let entry = l2_entry_at(slice, at as usize, meta.l2.extended);
                let kind = entry
                    .classify(meta.l2)
                    .map_err(|e| corrupt(e.describe("L2"), host.saturating_add(at)))?;
                let cluster_start = cur & !cluster_size.wrapping_sub(1);
                let cluster_end = cluster_start.saturating_add(cluster_size).min(l1_span_end);
                // Walk the cluster piece by piece (subclusters with extended L2, else the whole cluster).
                while cur < cluster_end {
                    let in_cluster = cur.saturating_sub(cluster_start);
                    let (piece_kind, piece_end) =
                        if meta.l2.extended && !matches!(kind, ClusterKind::Compressed(_)) {
                            let sc = (in_cluster >> sub_size.trailing_zeros()) as u32;
                            let sc_end = cluster_start
                                .saturating_add(
                                    u64::from(sc).saturating_add(1).saturating_mul(sub_size),
                                )
                                .min(cluster_end);
                            (entry.subcluster(kind, sc), sc_end)
                        } else {
                            (kind, cluster_end)
                        };
                    let piece = match (piece_kind, kind) {
                        // An unallocated subcluster of an allocated host cluster keeps its host offset.
                        (ClusterKind::Unallocated, ClusterKind::Data { host }) => {
                            Source::Unallocated {
                                host: Some(host.saturating_add(in_cluster)),
                            }
                        }
                        _ => piece_source(piece_kind, in_cluster, external),
                    };
                    let piece_len = piece_end.saturating_sub(cur);
                    match run {
                        None => run = Some((piece, piece_len)),
                        Some((src, len)) if continues(src, len, piece) => {
                            run = Some((src, len.saturating_add(piece_len)))
                        }
                        Some(_) => {
                            stop = true;
                            break;
                        }
                    }
                    cur = piece_end;
                    if matches!(piece, Source::Compressed { .. }) {
                        stop = true;
                        break;
                    }
                }
                if stop {
                    break;
                }
                at = at.saturating_add(entry_size);
            }
            if stop {
                return Ok(run.unwrap_or((Source::Unallocated { host: None }, limit)));
            }
        }
    }
    Ok(run.unwrap_or((Source::Unallocated { host: None }, limit)))
}

impl<D, B, C, const DEPTH: usize, const SLICES: usize, W> Image<D, B, C, DEPTH, SLICES, W>
where
    D: BlockDevice,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// Maps the guest range starting at `offset` (at most `max_len` bytes, within the virtual disk) to its
    /// first run: the image of the chain that supplies it and where. Contiguous pieces with the same source
    /// (data at consecutive host offsets, zeros, unallocated) merge into one run.
    pub fn map_guest_range(
        &mut self,
        offset: u64,
        max_len: u64,
    ) -> Result<Mapping, Error<D::Error>> {
        self.reader().map_from(0, offset, max_len)
    }
}

impl<D, B, C, const SLICES: usize> Reader<'_, D, B, C, SLICES>
where
    D: BlockDevice,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// [`Image::map_guest_range`], starting the walk at image `first` of the chain.
    pub(crate) fn map_from(
        &mut self,
        first: usize,
        offset: u64,
        max_len: u64,
    ) -> Result<Mapping, Error<D::Error>> {
        let len = max_len.min(self.virtual_size().saturating_sub(offset));
        if len == 0 {
            return Err(Error::OutOfRange {
                offset,
                len: max_len,
                size: self.virtual_size(),
            });
        }
        let mut limit = len;
        // The host offset of an unallocated subcluster in an allocated cluster of the image above, which a
        // backing image that ends before it reports as its own (as QEMU does).
        let mut above_host = None;
        let count = self.layers.len();
        for depth in first..count {
            let Reader {
                layers,
                bounce,
                cache,
                ..
            } = self;
            let Some(layer) = layers.get_mut(depth) else {
                break;
            };
            if offset >= layer.size {
                return Ok(Mapping {
                    depth,
                    len: limit,
                    source: Source::PastEnd { host: above_host },
                });
            }
            limit = limit.min(layer.size.saturating_sub(offset));
            let (source, run) = match layer.meta {
                None => (
                    Source::Data {
                        host: offset,
                        external: false,
                    },
                    limit,
                ),
                Some(ref meta) => {
                    map_qcow2(meta, &mut layer.dev, cache, bounce, depth, offset, limit)?
                }
            };
            if !matches!(source, Source::Unallocated { .. }) || depth.saturating_add(1) >= count {
                return Ok(Mapping {
                    depth,
                    len: run,
                    source,
                });
            }
            limit = run;
            above_host = match source {
                Source::Unallocated { host } => host,
                _ => None,
            };
        }
        Ok(Mapping {
            depth: count.saturating_sub(1),
            len: limit,
            source: Source::Unallocated { host: None },
        })
    }
}
