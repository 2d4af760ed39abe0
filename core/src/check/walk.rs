//! The reference walk (QEMU's `calculate_refcounts`): every reference of the image (header, L1 and L2 tables,
//! data and compressed clusters, snapshots, the refcount structure, bitmaps) counted into a pass, with the
//! entry-level problems it finds.

use super::*;

/// An L1 table with more entries pointing into the file than the file has clusters: some L2 table is
/// referenced again and again. QEMU would walk it each time; the check stops instead of spending time
/// proportional to the L1 size times the cluster size.
pub(super) fn too_many_l2<E>(l1_offset: u64) -> Error<E> {
    corrupt(
        "L1 table references more L2 tables than the image file holds",
        l1_offset,
    )
}

impl<A: Access> Ctx<'_, A> {
    /// QEMU's `calculate_refcounts`: every reference of the image, counted into the pass's range.
    pub(super) fn walk(&mut self, p: &mut Pass<'_>) -> Result<(), Error<A::E>> {
        let g = self.geo;
        let h = g.h;
        // Header.
        self.inc(p, 0, g.h.cluster_size());
        // Active L1 table.
        self.check_l1(p, h.l1_table_offset, h.l1_size, true, true)?;
        // Snapshots.
        if g.h.external_data_file() && h.nb_snapshots > 0 && p.reports() {
            self.sink.report(Problem::SnapshotsWithDataFile {
                count: h.nb_snapshots,
            });
            bump(&mut p.res.corruptions);
        }
        let mut at = h.snapshots_offset;
        for _ in 0..h.nb_snapshots {
            let (next, s) = read_snapshot(&mut self.io, self.bounce, &g, at)?;
            at = next;
            if s.entry.l1_table_offset & g.h.cluster_size().wrapping_sub(1) != 0 {
                if p.reports() {
                    let id = short_name(&mut self.io, self.bounce, s.id_at, s.entry.id_len)?;
                    let name = short_name(&mut self.io, self.bounce, s.name_at, s.entry.name_len)?;
                    self.sink.report(Problem::SnapshotL1Unaligned {
                        id,
                        name,
                        l1_offset: s.entry.l1_table_offset,
                    });
                    bump(&mut p.res.corruptions);
                }
                continue;
            }
            if u64::from(s.entry.l1_size) > MAX_L1_BYTES / 8 {
                if p.reports() {
                    let id = short_name(&mut self.io, self.bounce, s.id_at, s.entry.id_len)?;
                    let name = short_name(&mut self.io, self.bounce, s.name_at, s.entry.name_len)?;
                    self.sink.report(Problem::SnapshotL1TooLarge {
                        id,
                        name,
                        l1_size: s.entry.l1_size,
                    });
                    bump(&mut p.res.corruptions);
                }
                continue;
            }
            self.check_l1(p, s.entry.l1_table_offset, s.entry.l1_size, false, false)?;
        }
        self.inc(p, h.snapshots_offset, g.snapshots_size);
        // Refcount table.
        if !p.skip_refcount_structure {
            self.inc(
                p,
                h.refcount_table_offset,
                g.h.refcount_table_entries().saturating_mul(8),
            );
        }
        // Bitmaps.
        self.check_bitmaps(p)?;
        // Refcount blocks.
        if !p.skip_refcount_structure {
            self.check_refblocks(p)?;
        }
        Ok(())
    }

    pub(super) fn check_l1(
        &mut self,
        p: &mut Pass<'_>,
        l1_offset: u64,
        l1_size: u32,
        frag: bool,
        active: bool,
    ) -> Result<(), Error<A::E>> {
        if l1_size == 0 {
            return Ok(());
        }
        let g = self.geo;
        let bytes = u64::from(l1_size).saturating_mul(8);
        if !(p.role_probe && active) {
            self.inc(p, l1_offset, bytes);
        }
        // Past the end of the file the table reads as zeros: no entries (QEMU reads them; same result).
        let bytes = self.in_file(l1_offset, bytes, 8);
        // In-file L2 tables walked: more than the file has clusters means entries repeat (bounds the work).
        let mut walks = 0u64;
        let mut buf = [0u8; CHUNK];
        let mut pos = 0u64;
        while pos < bytes {
            let n = (bytes.saturating_sub(pos)).min(CHUNK as u64) as usize;
            let chunk = buf.get_mut(..n).unwrap_or(&mut []);
            self.io
                .read(self.bounce, l1_offset.saturating_add(pos), chunk)?;
            for k in 0..n / 8 {
                let e = be64(&buf, k.saturating_mul(8));
                if e == 0 {
                    continue;
                }
                if e & L1_RESERVED_MASK != 0 && p.reports() {
                    self.sink.report(Problem::L1ReservedBits { entry: e });
                    bump(&mut p.res.corruptions);
                }
                let l2 = e & OFFSET_MASK;
                if !p.role_probe {
                    self.inc(p, l2, g.h.cluster_size());
                }
                if l2 & g.h.cluster_size().wrapping_sub(1) != 0 && p.reports() {
                    self.sink
                        .report(Problem::L2TableUnaligned { l2_offset: l2 });
                    bump(&mut p.res.corruptions);
                }
                if l2 < g.file_len {
                    walks = walks.saturating_add(1);
                    if walks > g.nb_file {
                        return Err(too_many_l2(l1_offset));
                    }
                }
                self.check_l2(p, l2, frag, active)?;
            }
            pos = pos.saturating_add(n as u64);
        }
        Ok(())
    }

    pub(super) fn check_l2(
        &mut self,
        p: &mut Pass<'_>,
        l2_offset: u64,
        frag: bool,
        _active: bool,
    ) -> Result<(), Error<A::E>> {
        let g = self.geo;
        let l2_format = g.h.l2_format();
        let mut next_contiguous = 0u64;
        let mut buf = [0u8; CHUNK];
        // Past the end of the file entries read as zeros, unallocated (QEMU reads them; same result).
        let bytes = self.in_file(
            l2_offset,
            g.h.l2_entries().saturating_mul(g.h.l2_entry_size()),
            g.h.l2_entry_size(),
        );
        let per_chunk = (CHUNK as u64).checked_div(g.h.l2_entry_size()).unwrap_or(0);
        let mut pos = 0u64;
        let mut index = 0u64;
        while pos < bytes {
            let n = (bytes.saturating_sub(pos)).min(CHUNK as u64) as usize;
            let chunk = buf.get_mut(..n).unwrap_or(&mut []);
            self.io
                .read(self.bounce, l2_offset.saturating_add(pos), chunk)?;
            for k in 0..(n as u64)
                .checked_div(g.h.l2_entry_size())
                .unwrap_or(0)
                .min(per_chunk)
            {
                let at = k.saturating_mul(g.h.l2_entry_size()) as usize;
                let mut word = be64(&buf, at);
                let bitmap = if g.h.extended_l2() {
                    be64(&buf, at.saturating_add(8))
                } else {
                    0
                };
                let i = index;
                index = index.saturating_add(1);
                let kind = L2Entry { word, bitmap }.kind(l2_format);
                if !matches!(kind, ClusterKind::Compressed(_))
                    && word & L2_RESERVED_MASK != 0
                    && p.reports()
                {
                    self.sink.report(Problem::L2ReservedBits { entry: word });
                    bump(&mut p.res.corruptions);
                }
                match kind {
                    ClusterKind::Compressed(descriptor) => {
                        if word & OFLAG_COPIED != 0 {
                            if p.reports() {
                                self.sink.report(Problem::CompressedCopied {
                                    coffset: descriptor.offset,
                                });
                                bump(&mut p.res.corruptions);
                            }
                            word &= !OFLAG_COPIED;
                        }
                        if g.h.external_data_file() {
                            if p.reports() {
                                self.sink.report(Problem::CompressedWithDataFile {
                                    index: i,
                                    entry: word,
                                });
                                bump(&mut p.res.corruptions);
                            }
                            continue;
                        }
                        if bitmap != 0 {
                            if p.reports() {
                                self.sink.report(Problem::CompressedWithBitmap {
                                    index: i,
                                    entry: word,
                                });
                                bump(&mut p.res.corruptions);
                            }
                            continue;
                        }
                        self.inc(p, descriptor.offset, descriptor.len);
                        if frag && p.reports() {
                            bump(&mut p.res.allocated);
                            bump(&mut p.res.compressed);
                            bump(&mut p.res.fragmented);
                        }
                    }
                    ClusterKind::Data { host: offset }
                    | ClusterKind::Zero { host: Some(offset) } => {
                        if (bitmap >> 32) & bitmap != 0 && p.reports() {
                            bump(&mut p.res.corruptions);
                            self.sink.report(Problem::BadSubclusterBitmap { offset });
                        }
                        if offset & g.h.cluster_size().wrapping_sub(1) != 0 {
                            let contains_data = if g.h.extended_l2() {
                                bitmap & 0xffff_ffff != 0
                            } else {
                                word & OFLAG_ZERO == 0
                            };
                            if !contains_data {
                                let repairing = p.fix_entries && p.reports();
                                if p.reports() {
                                    bump(&mut p.res.corruptions);
                                    self.sink.report(Problem::PreallocatedUnaligned {
                                        offset,
                                        repairing,
                                    });
                                }
                                if repairing {
                                    let new = if g.h.extended_l2() { 0 } else { OFLAG_ZERO };
                                    let at = l2_offset
                                        .saturating_add(i.saturating_mul(g.h.l2_entry_size()));
                                    self.write_word(at, new)?;
                                    drop1(&mut p.res.corruptions);
                                    bump(&mut p.res.corruptions_fixed);
                                    continue;
                                }
                            } else if p.reports() {
                                bump(&mut p.res.corruptions);
                                self.sink.report(Problem::DataUnaligned { offset });
                            }
                        }
                        if frag && p.reports() {
                            bump(&mut p.res.allocated);
                            if next_contiguous != 0 && offset != next_contiguous {
                                bump(&mut p.res.fragmented);
                            }
                        }
                        next_contiguous = offset.saturating_add(g.h.cluster_size());
                        if !g.h.external_data_file() {
                            self.inc(p, offset, g.h.cluster_size());
                        }
                    }
                    ClusterKind::Zero { host: None } => {}
                    ClusterKind::Unallocated => {
                        if bitmap & 0xffff_ffff != 0 && p.reports() {
                            bump(&mut p.res.corruptions);
                            self.sink.report(Problem::UnallocatedWithBitmap);
                        }
                    }
                }
            }
            pos = pos.saturating_add(n as u64);
        }
        Ok(())
    }

    /// QEMU's `qcow2_check_bitmaps_refcounts`.
    pub(super) fn check_bitmaps(&mut self, p: &mut Pass<'_>) -> Result<(), Error<A::E>> {
        let g = self.geo;
        let Some(ext) = g.bitmaps else {
            return Ok(());
        };
        let (dir_offset, dir_size) = (ext.directory_offset, ext.directory_size);
        self.inc(p, dir_offset, dir_size);
        let dir_end = dir_offset.saturating_add(dir_size);
        let mut at = dir_offset;
        // The directory was validated when the image was loaded (format::bitmap::DirectoryWalk).
        for _ in 0..ext.nb_bitmaps {
            let mut e = [0u8; DIR_ENTRY_LEN];
            if at.saturating_add(24) > dir_end
                || dir_end.saturating_sub(g.file_len) >= g.h.cluster_size()
            {
                if p.reports() {
                    bump(&mut p.res.corruptions);
                    self.sink.report(Problem::BitmapCorrupt { offset: at });
                }
                return Ok(());
            }
            self.io.read(self.bounce, at, &mut e)?;
            let entry = BitmapDirEntry::parse(&e);
            let table_offset = entry.table_offset;
            at = at.saturating_add(entry.entry_len());
            let bytes = entry.table_bytes();
            self.inc(p, table_offset, bytes);
            if table_offset & g.h.cluster_size().wrapping_sub(1) != 0
                || table_offset
                    .saturating_add(bytes)
                    .saturating_sub(g.file_len)
                    >= g.h.cluster_size()
            {
                if p.reports() {
                    bump(&mut p.res.corruptions);
                    self.sink.report(Problem::BitmapCorrupt {
                        offset: table_offset,
                    });
                }
                return Ok(());
            }
            let mut buf = [0u8; CHUNK];
            let mut pos = 0u64;
            while pos < bytes {
                let n = (bytes.saturating_sub(pos)).min(CHUNK as u64) as usize;
                let chunk = buf.get_mut(..n).unwrap_or(&mut []);
                self.io
                    .read(self.bounce, table_offset.saturating_add(pos), chunk)?;
                for k in 0..n / 8 {
                    match BitmapTableEntry::decode(
                        be64(&buf, k.saturating_mul(8)),
                        g.h.cluster_size(),
                    ) {
                        BitmapTableEntry::Invalid => {
                            if p.reports() {
                                bump(&mut p.res.corruptions);
                            }
                        }
                        BitmapTableEntry::Data(off) => self.inc(p, off, g.h.cluster_size()),
                        BitmapTableEntry::Unallocated => {}
                    }
                }
                pos = pos.saturating_add(n as u64);
            }
        }
        Ok(())
    }

    /// QEMU's `check_refblocks`.
    pub(super) fn check_refblocks(&mut self, p: &mut Pass<'_>) -> Result<(), Error<A::E>> {
        let g = self.geo;
        let bytes = self.in_file(
            g.h.refcount_table_offset,
            g.h.refcount_table_entries().saturating_mul(8),
            8,
        );
        let mut buf = [0u8; CHUNK];
        let mut pos = 0u64;
        let mut index = 0u64;
        while pos < bytes {
            let n = (bytes.saturating_sub(pos)).min(CHUNK as u64) as usize;
            let chunk = buf.get_mut(..n).unwrap_or(&mut []);
            self.io.read(
                self.bounce,
                g.h.refcount_table_offset.saturating_add(pos),
                chunk,
            )?;
            for k in 0..n / 8 {
                let i = index;
                index = index.saturating_add(1);
                let e = be64(&buf, k.saturating_mul(8));
                let offset = e & REFTABLE_OFFSET_MASK;
                let cluster = offset >> g.h.cluster_bits;
                if e & REFTABLE_RESERVED_MASK != 0 {
                    if p.reports() {
                        self.sink
                            .report(Problem::RefcountTableReservedBits { index: i });
                        bump(&mut p.res.corruptions);
                    }
                    p.rebuild = true;
                    continue;
                }
                if offset & g.h.cluster_size().wrapping_sub(1) != 0 {
                    if p.reports() {
                        self.sink
                            .report(Problem::RefcountBlockUnaligned { index: i });
                        bump(&mut p.res.corruptions);
                    }
                    p.rebuild = true;
                    continue;
                }
                let nb = g.nb_file.saturating_add(u64::from(p.touched_end));
                if cluster >= nb {
                    if p.reports() {
                        self.sink.report(Problem::RefcountBlockOutside {
                            index: i,
                            repairing: p.fix_entries,
                        });
                        bump(&mut p.res.corruptions);
                    }
                    if p.fix_entries {
                        p.rebuild = true;
                    }
                    continue;
                }
                if offset != 0 {
                    self.inc(p, offset, g.h.cluster_size());
                    if cluster >= p.lo && cluster < p.hi {
                        let refcount = p.count(cluster);
                        if refcount != 1 {
                            self.report(p, Problem::RefcountBlockRefcount { index: i, refcount });
                            if !p.quiet {
                                bump(&mut p.res.corruptions);
                            }
                            p.rebuild = true;
                        }
                    }
                }
            }
            pos = pos.saturating_add(n as u64);
        }
        Ok(())
    }
}
