//! Comparison of the counted references with the refcounts on disk (QEMU's `compare_refcounts`), and the
//! repair of leaks and refcounts that are too low.

use super::*;

impl<A: Access> Checker<'_, A> {
    /// QEMU's `compare_refcounts` over the pass's range (clusters below `nb`).
    pub(super) fn compare(
        &mut self,
        p: &mut Pass<'_>,
        fix: Option<RepairMode>,
        highest: &mut u64,
        res: &mut Tally,
    ) -> Result<(), Error<A::E>> {
        let g = self.image;
        let nb = g.file_clusters.saturating_add(u64::from(p.touched_end));
        let end = p.hi.min(nb);
        let mut rr = RefcountReader::new()?;
        let mut c = p.lo;
        while c < end {
            // Where no refcount block covers the clusters, only those with references can differ: skip to the
            // next one (a sparse file's tail costs a scan of the counts, not a lookup per cluster).
            if let Some(until) = rr.uncovered_until(&mut self.io, self.bounce, &g, c)? {
                let stop = until.min(end);
                match p.next_counted(c, stop) {
                    Some(next) => c = next,
                    None => {
                        c = stop;
                        continue;
                    }
                }
            }
            let cluster = c;
            c = c.saturating_add(1);
            let Some(r1) = rr.get(&mut self.io, self.bounce, &g, cluster)? else {
                self.signal_unreadable(&rr)?;
                self.sink.report(Problem::RefcountUnreadable { cluster });
                increment(&mut res.check_errors);
                continue;
            };
            let r2 = p.count(cluster);
            if r1 > 0 || r2 > 0 {
                *highest = cluster;
            }
            if r1 == r2 {
                continue;
            }
            #[derive(PartialEq)]
            enum Fix {
                Leak,
                Corruption,
            }
            let mut fixing = None;
            if r1 == 0 {
                p.rebuild = true;
            } else if r1 > r2 && fix.is_some() {
                fixing = Some(Fix::Leak);
            } else if r1 < r2 && fix == Some(RepairMode::All) {
                fixing = Some(Fix::Corruption);
            }
            let problem = if fixing.is_some() {
                Problem::Repairing {
                    cluster,
                    refcount: r1,
                    references: r2,
                }
            } else if r1 < r2 {
                Problem::RefcountTooLow {
                    cluster,
                    refcount: r1,
                    references: r2,
                }
            } else {
                Problem::Leaked {
                    cluster,
                    refcount: r1,
                    references: r2,
                }
            };
            self.sink.report(problem);
            if let Some(kind) = fixing
                && rr.set(&mut self.io, self.bounce, &g, cluster, r2)?
            {
                if kind == Fix::Leak {
                    if r2 == 0 {
                        self.discard(cluster)?;
                    }
                    increment(&mut res.leaks_fixed);
                } else {
                    increment(&mut res.corruptions_fixed);
                }
                continue;
            }
            if r1 < r2 {
                increment(&mut res.corruptions);
            } else {
                increment(&mut res.leaks);
            }
        }
        Ok(())
    }

    /// Zeroes a freed cluster's bytes inside the file, as QEMU's discard of a freed cluster punches a hole.
    pub(super) fn discard(&mut self, cluster: u64) -> Result<(), Error<A::E>> {
        let g = self.image;
        let start = cluster.saturating_mul(g.header.cluster_size());
        let end = start
            .saturating_add(g.header.cluster_size())
            .min(g.file_len);
        let zeros = [0u8; PIECE];
        let mut at = start;
        while at < end {
            let n = end.saturating_sub(at).min(PIECE as u64) as usize;
            self.io
                .write(self.bounce, at, zeros.get(..n).unwrap_or(&[]))?;
            at = at.saturating_add(n as u64);
        }
        Ok(())
    }
}
