//! COPIED flags of the active L1 and L2 tables against the refcounts on disk (QEMU's `check_oflag_copied`),
//! and their repair.

use super::*;

impl<A: Access> Checker<'_, A> {
    /// QEMU's `check_oflag_copied`: COPIED flags of the active L1 and L2 tables against the refcounts on disk.
    pub(super) fn check_copied(
        &mut self,
        fix: Option<RepairMode>,
        res: &mut Tally,
    ) -> Result<(), Error<A::E>> {
        let g = self.image;
        let l2_format = g.header.l2_format();
        // Repairing leaks only, QEMU fixes COPIED flags when the refcounts are now known to be right.
        let fix_all = match fix {
            Some(RepairMode::All) => true,
            Some(RepairMode::Leaks) => {
                res.check_errors == 0 && res.corruptions == 0 && res.leaks == 0
            }
            None => false,
        };
        let mut rr = RefcountReader::new()?;
        let mut walks = 0u64;
        let mut wrote = false;
        let l2_bytes = g
            .header
            .l2_entries()
            .saturating_mul(g.header.l2_entry_size());
        self.for_each_entry(
            g.header.l1_table_offset,
            u64::from(g.header.l1_size).saturating_mul(8),
            8,
            &mut |this, i, entry| {
                let e = be64(entry, 0);
                let l2_offset = e & OFFSET_MASK;
                if l2_offset == 0 {
                    return Ok(Continue(()));
                }
                let Some(refcount) = rr.get(
                    &mut this.io,
                    this.bounce,
                    &g,
                    l2_offset >> g.header.cluster_bits,
                )?
                else {
                    this.signal_unreadable(&rr)?;
                    return Ok(Continue(()));
                };
                if (refcount == 1) != (e & OFLAG_COPIED != 0) {
                    increment(&mut res.corruptions);
                    this.sink.report(Problem::CopiedL1 {
                        l1_index: i,
                        l1_entry: e,
                        refcount,
                        repairing: fix_all,
                    });
                    if fix_all {
                        let new = if refcount == 1 {
                            e | OFLAG_COPIED
                        } else {
                            e & !OFLAG_COPIED
                        };
                        let at = g.header.l1_table_offset.saturating_add(i.saturating_mul(8));
                        this.write_word(at, new)?;
                        decrement(&mut res.corruptions);
                        increment(&mut res.corruptions_fixed);
                    }
                }
                if this.in_file(l2_offset, l2_bytes, g.header.l2_entry_size()) > 0 {
                    walks = walks.saturating_add(1);
                    if walks > g.file_clusters {
                        return Err(too_many_l2(g.header.l1_table_offset));
                    }
                }
                this.for_each_entry(
                    l2_offset,
                    l2_bytes,
                    g.header.l2_entry_size(),
                    &mut |this, j, entry| {
                        let word = be64(entry, 0);
                        let host = match (L2Entry { word, bitmap: 0 }).kind(l2_format) {
                            ClusterKind::Data { host } | ClusterKind::Zero { host: Some(host) } => {
                                host
                            }
                            _ => return Ok(Continue(())),
                        };
                        let refcount = if g.header.external_data_file() {
                            1
                        } else {
                            match rr.get(
                                &mut this.io,
                                this.bounce,
                                &g,
                                host >> g.header.cluster_bits,
                            )? {
                                Some(r) => r,
                                None => {
                                    this.signal_unreadable(&rr)?;
                                    return Ok(Continue(()));
                                }
                            }
                        };
                        if (refcount == 1) != (word & OFLAG_COPIED != 0) {
                            increment(&mut res.corruptions);
                            this.sink.report(Problem::CopiedL2 {
                                l2_entry: word,
                                refcount,
                                repairing: fix_all,
                            });
                            if fix_all {
                                let new = if refcount == 1 {
                                    word | OFLAG_COPIED
                                } else {
                                    word & !OFLAG_COPIED
                                };
                                let at = l2_offset
                                    .saturating_add(j.saturating_mul(g.header.l2_entry_size()));
                                this.io.write(this.bounce, at, &new.to_be_bytes())?;
                                wrote = true;
                                decrement(&mut res.corruptions);
                                increment(&mut res.corruptions_fixed);
                            }
                        }
                        Ok(Continue::<()>(()))
                    },
                )?;
                Ok(Continue::<()>(()))
            },
        )?;
        if wrote {
            self.io.flush()?;
        }
        Ok(())
    }
}
