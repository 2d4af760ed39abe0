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
        let bytes = self.in_file(
            g.header.l1_table_offset,
            u64::from(g.header.l1_size).saturating_mul(8),
            8,
        );
        let mut l1 = [0u8; CHUNK];
        let mut l2 = [0u8; CHUNK];
        let mut pos = 0u64;
        let mut l1_index = 0u64;
        let mut walks = 0u64;
        let mut wrote = false;
        while pos < bytes {
            let n = (bytes.saturating_sub(pos)).min(CHUNK as u64) as usize;
            let chunk = l1.get_mut(..n).unwrap_or(&mut []);
            self.io.read(
                self.bounce,
                g.header.l1_table_offset.saturating_add(pos),
                chunk,
            )?;
            for k in 0..n / 8 {
                let i = l1_index;
                l1_index = l1_index.saturating_add(1);
                let e = be64(&l1, k.saturating_mul(8));
                let l2_offset = e & OFFSET_MASK;
                if l2_offset == 0 {
                    continue;
                }
                let Some(refcount) = rr.get(
                    &mut self.io,
                    self.bounce,
                    &g,
                    l2_offset >> g.header.cluster_bits,
                )?
                else {
                    self.signal_unreadable(&rr)?;
                    continue;
                };
                if (refcount == 1) != (e & OFLAG_COPIED != 0) {
                    increment(&mut res.corruptions);
                    self.sink.report(Problem::CopiedL1 {
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
                        self.write_word(at, new)?;
                        decrement(&mut res.corruptions);
                        increment(&mut res.corruptions_fixed);
                    }
                }
                let l2_bytes = self.in_file(
                    l2_offset,
                    g.header
                        .l2_entries()
                        .saturating_mul(g.header.l2_entry_size()),
                    g.header.l2_entry_size(),
                );
                if l2_bytes > 0 {
                    walks = walks.saturating_add(1);
                    if walks > g.file_clusters {
                        return Err(too_many_l2(g.header.l1_table_offset));
                    }
                }
                let mut lpos = 0u64;
                let mut j = 0u64;
                while lpos < l2_bytes {
                    let m = (l2_bytes.saturating_sub(lpos)).min(CHUNK as u64) as usize;
                    let chunk = l2.get_mut(..m).unwrap_or(&mut []);
                    self.io
                        .read(self.bounce, l2_offset.saturating_add(lpos), chunk)?;
                    for q in 0..(m as u64)
                        .checked_div(g.header.l2_entry_size())
                        .unwrap_or(0)
                    {
                        let at = q.saturating_mul(g.header.l2_entry_size()) as usize;
                        let word = be64(&l2, at);
                        let jj = j;
                        j = j.saturating_add(1);
                        let host = match (L2Entry { word, bitmap: 0 }).kind(l2_format) {
                            ClusterKind::Data { host } | ClusterKind::Zero { host: Some(host) } => {
                                host
                            }
                            _ => continue,
                        };
                        let refcount = if g.header.external_data_file() {
                            1
                        } else {
                            match rr.get(
                                &mut self.io,
                                self.bounce,
                                &g,
                                host >> g.header.cluster_bits,
                            )? {
                                Some(r) => r,
                                None => {
                                    self.signal_unreadable(&rr)?;
                                    continue;
                                }
                            }
                        };
                        if (refcount == 1) != (word & OFLAG_COPIED != 0) {
                            increment(&mut res.corruptions);
                            self.sink.report(Problem::CopiedL2 {
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
                                    .saturating_add(jj.saturating_mul(g.header.l2_entry_size()));
                                self.io.write(self.bounce, at, &new.to_be_bytes())?;
                                wrote = true;
                                decrement(&mut res.corruptions);
                                increment(&mut res.corruptions_fixed);
                            }
                        }
                    }
                    lpos = lpos.saturating_add(m as u64);
                }
            }
            pos = pos.saturating_add(n as u64);
        }
        if wrote {
            self.io.flush()?;
        }
        Ok(())
    }
}
