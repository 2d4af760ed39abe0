//! The reference walk (QEMU's `calculate_refcounts`): every reference of the image (header, L1 and L2 tables,
//! data and compressed clusters, snapshots, the refcount structure, bitmaps) counted into a pass, with the
//! entry-level problems it finds.

use super::*;
use crate::format::{EntryError, RefcountTableEntry};

/// An L1 table with more entries pointing into the file than the file has clusters: some L2 table is
/// referenced again and again. QEMU would walk it each time; the check stops instead of spending time
/// proportional to the L1 size times the cluster size.
pub(super) fn too_many_l2<E>(l1_offset: u64) -> Error<E> {
    corrupt(
        "L1 table references more L2 tables than the image file holds",
        l1_offset,
    )
}

impl<A: Access> Checker<'_, A> {
    /// QEMU's `calculate_refcounts`: every reference of the image, counted into the pass's range.
    pub(super) fn walk(&mut self, p: &mut Pass<'_>) -> Result<(), Error<A::E>> {
        let g = self.image;
        let h = g.header;
        // Header.
        self.add_reference(p, 0, g.header.cluster_size());
        // Active L1 table.
        self.check_l1(p, h.l1_table_offset, h.l1_size, true, true)?;
        // Snapshots.
        if g.header.external_data_file() && h.nb_snapshots > 0 && p.reports() {
            self.sink.report(Problem::SnapshotsWithDataFile {
                count: h.nb_snapshots,
            });
            increment(&mut p.res.corruptions);
        }
        let mut at = h.snapshots_offset;
        for _ in 0..h.nb_snapshots {
            let (next, s) = read_snapshot(&mut self.io, self.bounce, &g, at)?;
            at = next;
            if s.entry.l1_table_offset & g.header.cluster_size().wrapping_sub(1) != 0 {
                if p.reports() {
                    let id = short_name(&mut self.io, self.bounce, s.id_at, s.entry.id_len)?;
                    let name = short_name(&mut self.io, self.bounce, s.name_at, s.entry.name_len)?;
                    self.sink.report(Problem::SnapshotL1Unaligned {
                        id,
                        name,
                        l1_offset: s.entry.l1_table_offset,
                    });
                    increment(&mut p.res.corruptions);
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
                    increment(&mut p.res.corruptions);
                }
                continue;
            }
            self.check_l1(p, s.entry.l1_table_offset, s.entry.l1_size, false, false)?;
        }
        self.add_reference(p, h.snapshots_offset, g.snapshot_table_len);
        // The LUKS area of an encrypted image.
        if let Some((offset, len)) = g.encryption {
            self.add_reference(p, offset, len);
        }
        // Refcount table.
        if p.counts_refcount_structure() {
            self.add_reference(
                p,
                h.refcount_table_offset,
                g.header.refcount_table_entries().saturating_mul(8),
            );
        }
        // Bitmaps.
        self.check_bitmaps(p)?;
        // Refcount blocks.
        if p.counts_refcount_structure() {
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
        let g = self.image;
        let bytes = u64::from(l1_size).saturating_mul(8);
        if p.counts_repaired_tables() || !active {
            self.add_reference(p, l1_offset, bytes);
        }
        // Past the end of the file the table reads as zeros: no entries (QEMU reads them; same result).
        // In-file L2 tables walked: more than the file has clusters means entries repeat (bounds the work).
        let mut walks = 0u64;
        self.for_each_entry(l1_offset, bytes, 8, &mut |this, _, entry| {
            let e = be64(entry, 0);
            if e == 0 {
                return Ok(Continue(()));
            }
            if e & L1_RESERVED_MASK != 0 && p.reports() {
                this.sink.report(Problem::L1ReservedBits { entry: e });
                increment(&mut p.res.corruptions);
            }
            let l2 = e & OFFSET_MASK;
            if p.counts_repaired_tables() {
                this.add_reference(p, l2, g.header.cluster_size());
            }
            if l2 & g.header.cluster_size().wrapping_sub(1) != 0 && p.reports() {
                this.sink
                    .report(Problem::L2TableUnaligned { l2_offset: l2 });
                increment(&mut p.res.corruptions);
            }
            if l2 < g.file_len {
                walks = walks.saturating_add(1);
                if walks > g.file_clusters {
                    return Err(too_many_l2(l1_offset));
                }
            }
            this.check_l2(p, l2, frag, active)?;
            Ok(Continue::<()>(()))
        })?;
        Ok(())
    }

    pub(super) fn check_l2(
        &mut self,
        p: &mut Pass<'_>,
        l2_offset: u64,
        frag: bool,
        _active: bool,
    ) -> Result<(), Error<A::E>> {
        let g = self.image;
        let l2_format = g.header.l2_format();
        let mut next_contiguous = 0u64;
        // Past the end of the file entries read as zeros, unallocated (QEMU reads them; same result).
        let bytes = g
            .header
            .l2_entries()
            .saturating_mul(g.header.l2_entry_size());
        self.for_each_entry(
            l2_offset,
            bytes,
            g.header.l2_entry_size(),
            &mut |this, i, entry| {
                let mut word = be64(entry, 0);
                let bitmap = if g.header.extended_l2() {
                    be64(entry, 8)
                } else {
                    0
                };
                let kind = L2Entry { word, bitmap }.kind(l2_format);
                if !matches!(kind, ClusterKind::Compressed(_))
                    && word & L2_RESERVED_MASK != 0
                    && p.reports()
                {
                    this.sink.report(Problem::L2ReservedBits { entry: word });
                    increment(&mut p.res.corruptions);
                }
                match kind {
                    ClusterKind::Compressed(descriptor) => {
                        if word & OFLAG_COPIED != 0 {
                            if p.reports() {
                                this.sink.report(Problem::CompressedCopied {
                                    coffset: descriptor.offset,
                                });
                                increment(&mut p.res.corruptions);
                            }
                            word &= !OFLAG_COPIED;
                        }
                        if g.header.external_data_file() {
                            if p.reports() {
                                this.sink.report(Problem::CompressedWithDataFile {
                                    index: i,
                                    entry: word,
                                });
                                increment(&mut p.res.corruptions);
                            }
                            return Ok(Continue(()));
                        }
                        if bitmap != 0 {
                            if p.reports() {
                                this.sink.report(Problem::CompressedWithBitmap {
                                    index: i,
                                    entry: word,
                                });
                                increment(&mut p.res.corruptions);
                            }
                            return Ok(Continue(()));
                        }
                        this.add_reference(p, descriptor.offset, descriptor.len);
                        if frag && p.reports() {
                            increment(&mut p.res.allocated);
                            increment(&mut p.res.compressed);
                            increment(&mut p.res.fragmented);
                        }
                    }
                    ClusterKind::Data { host: offset }
                    | ClusterKind::Zero { host: Some(offset) } => {
                        if (bitmap >> 32) & bitmap != 0 && p.reports() {
                            increment(&mut p.res.corruptions);
                            this.sink.report(Problem::BadSubclusterBitmap { offset });
                        }
                        if offset & g.header.cluster_size().wrapping_sub(1) != 0 {
                            let contains_data = if g.header.extended_l2() {
                                bitmap & 0xffff_ffff != 0
                            } else {
                                word & OFLAG_ZERO == 0
                            };
                            if !contains_data {
                                let repairing = p.repairs_entries() && p.reports();
                                if p.reports() {
                                    increment(&mut p.res.corruptions);
                                    this.sink.report(Problem::PreallocatedUnaligned {
                                        offset,
                                        repairing,
                                    });
                                }
                                if repairing {
                                    let new = if g.header.extended_l2() {
                                        0
                                    } else {
                                        OFLAG_ZERO
                                    };
                                    let at = l2_offset
                                        .saturating_add(i.saturating_mul(g.header.l2_entry_size()));
                                    this.write_word(at, new)?;
                                    decrement(&mut p.res.corruptions);
                                    increment(&mut p.res.corruptions_fixed);
                                    return Ok(Continue(()));
                                }
                            } else if p.reports() {
                                increment(&mut p.res.corruptions);
                                this.sink.report(Problem::DataUnaligned { offset });
                            }
                        }
                        if frag && p.reports() {
                            increment(&mut p.res.allocated);
                            if next_contiguous != 0 && offset != next_contiguous {
                                increment(&mut p.res.fragmented);
                            }
                        }
                        next_contiguous = offset.saturating_add(g.header.cluster_size());
                        if !g.header.external_data_file() {
                            this.add_reference(p, offset, g.header.cluster_size());
                        }
                    }
                    ClusterKind::Zero { host: None } => {}
                    ClusterKind::Unallocated => {
                        if bitmap & 0xffff_ffff != 0 && p.reports() {
                            increment(&mut p.res.corruptions);
                            this.sink.report(Problem::UnallocatedWithBitmap);
                        }
                    }
                }
                Ok(Continue::<()>(()))
            },
        )?;
        Ok(())
    }

    /// QEMU's `qcow2_check_bitmaps_refcounts`.
    pub(super) fn check_bitmaps(&mut self, p: &mut Pass<'_>) -> Result<(), Error<A::E>> {
        let g = self.image;
        let Some(ext) = g.bitmaps else {
            return Ok(());
        };
        let (dir_offset, dir_size) = (ext.directory_offset, ext.directory_size);
        self.add_reference(p, dir_offset, dir_size);
        let dir_end = dir_offset.saturating_add(dir_size);
        let mut at = dir_offset;
        // The directory was validated when the image was loaded (format::bitmap::DirectoryWalk).
        for _ in 0..ext.nb_bitmaps {
            let mut e = [0u8; DIR_ENTRY_LEN];
            if at.saturating_add(24) > dir_end
                || dir_end.saturating_sub(g.file_len) >= g.header.cluster_size()
            {
                if p.reports() {
                    increment(&mut p.res.corruptions);
                    self.sink.report(Problem::BitmapCorrupt { offset: at });
                }
                return Ok(());
            }
            self.io.read(self.bounce, at, &mut e)?;
            let entry = BitmapDirEntry::parse(&e);
            let table_offset = entry.table_offset;
            at = at.saturating_add(entry.entry_len());
            let bytes = entry.table_bytes();
            self.add_reference(p, table_offset, bytes);
            if table_offset & g.header.cluster_size().wrapping_sub(1) != 0
                || table_offset
                    .saturating_add(bytes)
                    .saturating_sub(g.file_len)
                    >= g.header.cluster_size()
            {
                if p.reports() {
                    increment(&mut p.res.corruptions);
                    self.sink.report(Problem::BitmapCorrupt {
                        offset: table_offset,
                    });
                }
                return Ok(());
            }
            // Entries past the end of the file read as zeros: unallocated.
            self.for_each_entry(table_offset, bytes, 8, &mut |this, _, entry| {
                match BitmapTableEntry::decode(be64(entry, 0), g.header.cluster_size()) {
                    BitmapTableEntry::Invalid => {
                        if p.reports() {
                            increment(&mut p.res.corruptions);
                        }
                    }
                    BitmapTableEntry::Data(off) => {
                        this.add_reference(p, off, g.header.cluster_size())
                    }
                    BitmapTableEntry::Unallocated => {}
                }
                Ok(Continue::<()>(()))
            })?;
        }
        Ok(())
    }

    /// QEMU's `check_refblocks`.
    pub(super) fn check_refblocks(&mut self, p: &mut Pass<'_>) -> Result<(), Error<A::E>> {
        let g = self.image;
        self.for_each_entry(
            g.header.refcount_table_offset,
            g.header.refcount_table_entries().saturating_mul(8),
            8,
            &mut |this, i, entry| {
                let e = be64(entry, 0);
                let offset = e & REFTABLE_OFFSET_MASK;
                let cluster = offset >> g.header.cluster_bits;
                if let Err(problem) = RefcountTableEntry(e).block_offset(g.header.cluster_size()) {
                    if p.reports() {
                        this.sink.report(match problem {
                            EntryError::ReservedBits => {
                                Problem::RefcountTableReservedBits { index: i }
                            }
                            _ => Problem::RefcountBlockUnaligned { index: i },
                        });
                        increment(&mut p.res.corruptions);
                    }
                    p.rebuild = true;
                    return Ok(Continue(()));
                }
                let nb = g.file_clusters.saturating_add(u64::from(p.touched_end));
                if cluster >= nb {
                    if p.reports() {
                        this.sink.report(Problem::RefcountBlockOutside {
                            index: i,
                            repairing: p.repairs_entries(),
                        });
                        increment(&mut p.res.corruptions);
                    }
                    if p.repairs_entries() {
                        p.rebuild = true;
                    }
                    return Ok(Continue(()));
                }
                if offset != 0 {
                    this.add_reference(p, offset, g.header.cluster_size());
                    if cluster >= p.lo && cluster < p.hi {
                        let refcount = p.count(cluster);
                        if refcount != 1 {
                            this.report(p, Problem::RefcountBlockRefcount { index: i, refcount });
                            if !p.quiet() {
                                increment(&mut p.res.corruptions);
                            }
                            p.rebuild = true;
                        }
                    }
                }
                Ok(Continue::<()>(()))
            },
        )?;
        Ok(())
    }
}
