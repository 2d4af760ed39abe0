//! Zeroes and discard: zero clusters and subclusters where the format can say so, written zeros elsewhere,
//! and freeing whole clusters.

use super::*;

impl<D, B, C, const DEPTH: usize, const SLICES: usize> Image<D, B, C, DEPTH, SLICES, WriteState>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// Makes `len` bytes at guest `offset` read as zeros: with the zero flag (or subcluster zero bits) where
    /// whole (sub)clusters are covered, with written zeros elsewhere. With `unmap`, zeroed clusters give their
    /// host clusters back.
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), Error<D::Error>> {
        self.check_range(offset, len)?;
        self.begin_write_over(offset, len)?;
        #[cfg(any(feature = "luks", feature = "aes-legacy"))]
        let Some((offset, len)) =
            self.write_sector_edges(offset, len, super::encrypted::Edge::Zeros)?
        else {
            return self.end_write();
        };
        // Version 2 gives clusters back for any zero write (it has no zero flag).
        let v3 = self.geometry()?.tables.l2_format.v3;
        self.w.discard_freed = (unmap || !v3) && self.w.pass_discards;
        let done = self
            .zero_range(offset, len, unmap)
            .and_then(|()| self.end_write());
        self.w.discard_freed = false;
        done
    }

    /// With `on`, the host clusters that a discard or a zero write with unmap gives back are discarded on the
    /// device as well (once the entries that dropped them are durable), so that the image file releases their
    /// space: QEMU's `pass-discard-request`, on in qemu-io. Off by default.
    pub fn pass_discards(&mut self, on: bool) {
        self.w.pass_discards = on;
    }

    pub(super) fn zero_range(
        &mut self,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), Error<D::Error>> {
        let g = self.geometry()?;
        if g.tables.l2_format.external_data && self.data_raw() {
            // A raw data file must read as the guest disk: zero it too.
            self.store(offset, offset, WriteSource::Zeros, len)?;
        }
        let size = self.virtual_size();
        let end = offset.saturating_add(len);
        let backing = self.layers.len() > 1;
        if !g.tables.l2_format.v3 && backing {
            // Version 2 has no zero flag, and a deallocated cluster would show the backing file: write zeros.
            return self.write_range(offset, len, WriteSource::Zeros);
        }
        // Version 2 without a backing file deallocates (unallocated clusters read as zeros there).
        let piece = g.piece_size();
        let mut pos = offset;
        while pos < end {
            let gc = pos & !g.tables.cluster_size.wrapping_sub(1);
            let ps = pos & !piece.wrapping_sub(1);
            let pe = ps.saturating_add(piece).min(size);
            let b = end.min(pe);
            let ce = gc.saturating_add(g.tables.cluster_size).min(size);
            if pos == gc && end >= ce {
                // A whole cluster (with extended L2 too: its host cluster goes with `unmap`, as in QEMU).
                if g.tables.l2_format.v3 {
                    self.zero_cluster(gc, unmap)?;
                } else {
                    self.discard_cluster(gc, false, false)?;
                }
                pos = ce;
                continue;
            }
            // A whole piece, or a partial one whose rest already reads as zeros and that holds no data in
            // this image, becomes a zero (sub)cluster as in QEMU; anything else gets written zeros.
            let whole = pos == ps && b == pe;
            let promote = whole
                || (self.holds_no_data(ps)?
                    && self.reads_as_zero(ps, pos.saturating_sub(ps))?
                    && self.reads_as_zero(b, pe.saturating_sub(b))?);
            if promote && !g.tables.l2_format.v3 {
                self.discard_cluster(gc, false, false)?;
            } else if promote && g.tables.l2_format.extended {
                let s = ps.saturating_sub(gc).checked_div(piece).unwrap_or(0);
                self.zero_subclusters(gc, s, s.saturating_add(1))?;
            } else if promote {
                self.zero_cluster(gc, unmap)?;
            } else {
                // As in QEMU, where the tail of a request takes a cluster that its whole clusters just gave
                // back: their frees are made durable (after the entries that dropped them) first.
                #[cfg(feature = "qemu-placement")]
                self.meta()?.commit_frees()?;
                self.write_cluster(
                    gc,
                    pos.saturating_sub(gc),
                    b.saturating_sub(gc),
                    WriteSource::Zeros,
                )?;
            }
            pos = b;
        }
        Ok(())
    }

    /// Whether guest bytes `[offset, offset + len)` are known to read as zeros without reading data (zero or
    /// unallocated everywhere in the chain).
    pub(super) fn reads_as_zero(&mut self, offset: u64, len: u64) -> Result<bool, Error<D::Error>> {
        let mut pos = offset;
        let end = offset.saturating_add(len);
        while pos < end {
            let m = self.reader().map_from(0, pos, end.saturating_sub(pos))?;
            match m.source {
                crate::engine::Source::Zero { .. }
                | crate::engine::Source::Unallocated { .. }
                | crate::engine::Source::PastEnd { .. } => {}
                // A raw image's holes read as zeros too (the device says which ranges are holes).
                crate::engine::Source::Data {
                    host,
                    external: false,
                } if self
                    .layers
                    .get(m.depth)
                    .is_some_and(|l| l.qcow2().is_none()) =>
                {
                    let mut at = host;
                    let stop = host.saturating_add(m.len);
                    while at < stop {
                        let e = self.host_status(m.depth, false, at, stop.saturating_sub(at))?;
                        if e.data || e.len == 0 {
                            return Ok(false);
                        }
                        at = at.saturating_add(e.len);
                    }
                }
                _ => return Ok(false),
            }
            pos = pos.saturating_add(m.len.max(1));
        }
        Ok(true)
    }

    /// Whether the (sub)cluster at guest offset `offset` is unallocated or zero in the top image.
    pub(super) fn holds_no_data(&mut self, offset: u64) -> Result<bool, Error<D::Error>> {
        let m = self.reader().map_from(0, offset, 1)?;
        Ok(m.depth > 0
            || matches!(
                m.source,
                crate::engine::Source::Zero { .. } | crate::engine::Source::Unallocated { .. }
            ))
    }

    pub(super) fn data_raw(&self) -> bool {
        self.layers.first().and_then(|l| l.meta).is_some_and(|m| {
            m.header
                .autoclear_features
                .contains(AutoclearFeatures::DATA_FILE_RAW)
        })
    }

    pub(super) fn zero_cluster(&mut self, gc: u64, unmap: bool) -> Result<(), Error<D::Error>> {
        let l2 = self.writable_l2(gc)?;
        let mut m = self.meta()?;
        m.make_room(3)?;
        let g = m.g;
        let (index, old, kind) = m.cluster_entry(l2, gc)?;
        let allocated = matches!(
            kind,
            ClusterKind::Data { .. } | ClusterKind::Zero { host: Some(_) }
        );
        // An external data file keeps its clusters (they are not refcounted).
        let drop_host = !g.tables.l2_format.external_data
            && (matches!(kind, ClusterKind::Compressed(_)) || (unmap && allocated));
        let new = if g.tables.l2_format.extended {
            L2Entry {
                word: if drop_host { 0 } else { old.word },
                bitmap: ALL_ZEROES,
            }
        } else {
            L2Entry {
                word: (if drop_host { 0 } else { old.word }) | OFLAG_ZERO,
                bitmap: 0,
            }
        };
        if new != old {
            m.l2_set(l2, index, new)?;
            if drop_host {
                m.free_entry(kind)?;
            }
        }
        Ok(())
    }

    /// Extended L2: subclusters `[sa, sb)` of the cluster at `gc` read as zeros.
    pub(super) fn zero_subclusters(
        &mut self,
        gc: u64,
        sa: u64,
        sb: u64,
    ) -> Result<(), Error<D::Error>> {
        let l2 = self.writable_l2(gc)?;
        let mut m = self.meta()?;
        m.make_room(3)?;
        let g = m.g;
        let (index, old, kind) = m.cluster_entry(l2, gc)?;
        if matches!(kind, ClusterKind::Compressed(_)) {
            return self.write_cluster(
                gc,
                sa.saturating_mul(g.subcluster_size),
                sb.saturating_mul(g.subcluster_size),
                WriteSource::Zeros,
            );
        }
        let mut mask = 0u64;
        let mut s = sa;
        while s < sb && s < 32 {
            mask |= 1u64 << s;
            s = s.saturating_add(1);
        }
        let new = L2Entry {
            word: old.word,
            bitmap: (old.bitmap & !mask & 0xffff_ffff) | (((old.bitmap >> 32) | mask) << 32),
        };
        if new != old {
            self.meta()?.l2_set(l2, index, new)?;
        }
        Ok(())
    }

    /// Discards `len` bytes at guest `offset`: whole clusters inside the range are freed (and read as zeros
    /// afterwards where the format can say so); partial clusters are left alone.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), Error<D::Error>> {
        self.check_range(offset, len)?;
        self.begin_write_over(offset, len)?;
        let g = self.geometry()?;
        let size = self.virtual_size();
        let end_req = offset.saturating_add(len);
        let start = ceil_div(offset, g.tables.cluster_size).saturating_mul(g.tables.cluster_size);
        let end = if end_req == size {
            end_req
        } else {
            end_req & !g.tables.cluster_size.wrapping_sub(1)
        };
        if g.tables.l2_format.external_data {
            // Clusters of an external data file stay mapped; the discarded range reads as zeros.
            if start < end {
                self.zero_range(start, end.saturating_sub(start), false)?;
            }
            return self.end_write();
        }
        let backing = self.layers.len() > 1;
        if backing && !g.tables.l2_format.v3 {
            // Version 2 cannot mark a cluster as zeros, and dropping it would expose the backing file's
            // data: like QEMU, leave such clusters in place.
            return self.end_write();
        }
        self.w.discard_freed = self.w.pass_discards;
        let done = self.discard_clusters(start, end, backing);
        self.w.discard_freed = false;
        done
    }

    fn discard_clusters(
        &mut self,
        start: u64,
        end: u64,
        backing: bool,
    ) -> Result<(), Error<D::Error>> {
        let g = self.geometry()?;
        let mut gc = start;
        while gc < end {
            // As QEMU places tables: each L2 table of the range made writable first (allocated where
            // there is none), whether or not an entry changes.
            #[cfg(feature = "qemu-placement")]
            if gc == start || gc & (1u64 << g.l2_coverage_bits).wrapping_sub(1) == 0 {
                self.writable_l2(gc)?;
            }
            self.discard_cluster(gc, backing, false)?;
            gc = gc.saturating_add(g.tables.cluster_size);
        }
        self.end_write()
    }

    /// Frees guest cluster `gc`'s host cluster. It reads as zeros afterwards where the format can say so and
    /// the image has a backing file, unless `full`: then its entry becomes unallocated (QEMU's full discard,
    /// for clusters past the end of a shrunk disk).
    pub(super) fn discard_cluster(
        &mut self,
        gc: u64,
        backing: bool,
        full: bool,
    ) -> Result<(), Error<D::Error>> {
        let mut m = self.meta()?;
        let g = m.g;
        let (_, l2) = m.l2_table(gc)?;
        let (index, old, kind) = match l2 {
            None => (
                (gc >> g.cluster_bits) & g.l2_entries.wrapping_sub(1),
                L2Entry { word: 0, bitmap: 0 },
                ClusterKind::Unallocated,
            ),
            Some(l2) => m.cluster_entry(l2, gc)?,
        };
        let allocated = !matches!(
            kind,
            ClusterKind::Unallocated | ClusterKind::Zero { host: None }
        );
        if !backing && !allocated && !full {
            return Ok(());
        }
        let new = if full {
            L2Entry { word: 0, bitmap: 0 }
        } else if g.tables.l2_format.extended {
            L2Entry {
                word: 0,
                bitmap: ALL_ZEROES,
            }
        } else {
            L2Entry {
                word: if g.tables.l2_format.v3 { OFLAG_ZERO } else { 0 },
                bitmap: 0,
            }
        };
        if new == old {
            return Ok(());
        }
        let l2 = self.writable_l2(gc)?;
        let mut m = self.meta()?;
        m.make_room(3)?;
        m.l2_set(l2, index, new)?;
        if allocated {
            m.free_entry(kind)?;
        }
        if matches!(kind, ClusterKind::Compressed(_)) {
            self.decompressor.invalidate();
        }
        Ok(())
    }
}
