//! The per-cluster reference counts in the caller's scratch: what a counting pass is for ([`PassKind`]), one
//! pass over a range of host clusters ([`Pass`]) and its counters ([`Tally`]), the passes over the whole
//! file, and where counting may stop.

use super::*;

/// Counters of one check run.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Tally {
    pub(super) corruptions: u64,
    pub(super) leaks: u64,
    pub(super) check_errors: u64,
    pub(super) corruptions_fixed: u64,
    pub(super) leaks_fixed: u64,
    pub(super) allocated: u64,
    pub(super) fragmented: u64,
    pub(super) compressed: u64,
}

impl Tally {
    pub(super) fn add(&mut self, o: &Tally) {
        self.corruptions = self.corruptions.saturating_add(o.corruptions);
        self.leaks = self.leaks.saturating_add(o.leaks);
        self.check_errors = self.check_errors.saturating_add(o.check_errors);
        self.corruptions_fixed = self.corruptions_fixed.saturating_add(o.corruptions_fixed);
        self.leaks_fixed = self.leaks_fixed.saturating_add(o.leaks_fixed);
        self.allocated = self.allocated.saturating_add(o.allocated);
        self.fragmented = self.fragmented.saturating_add(o.fragmented);
        self.compressed = self.compressed.saturating_add(o.compressed);
    }
}

pub(super) fn increment(x: &mut u64) {
    *x = x.saturating_add(1);
}

pub(super) fn decrement(x: &mut u64) {
    *x = x.saturating_sub(1);
}

/// What a counting pass is for, which decides what its walk counts and reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PassKind {
    /// The references compared with the refcounts on disk. The pass over the first range of clusters
    /// reports the entry-level problems and the statistics; with `repair_entries` (`-r all`) the walk also
    /// repairs the entries it can (unaligned preallocated clusters) and a refcount block outside the image
    /// asks for a rebuild.
    Count {
        /// Apply `-r all` fixes to entries while walking.
        repair_entries: bool,
    },
    /// The same references again, reporting nothing (their problems were reported by an earlier count), for
    /// the comparison that repairs leaks. An empty pass finds what the references reach without counting.
    Recount,
    /// The references without the refcount table and blocks, for a new refcount structure (reports nothing).
    ForRebuild,
    /// Every reference except the active L1 table's own range and the L2 tables that L1 entries name: what is
    /// left says whether a cluster a repair would write as a table is also used as something else (reports
    /// nothing).
    Overlap,
}

/// One counting pass over host clusters `lo..hi`: the counts, and what the walk found on the way.
pub(super) struct Pass<'s> {
    pub(super) kind: PassKind,
    pub(super) counts: &'s mut [u8],
    pub(super) lo: u64,
    pub(super) hi: u64,
    /// A reference reached host cluster `file_clusters` (QEMU then grows its count array by one).
    pub(super) touched_end: bool,
    /// One past the highest host cluster any reference names, even one too far past the end of the file to
    /// be counted (a rebuilt refcount structure must not land there).
    pub(super) max_end: u64,
    /// Something that only a new refcount structure repairs was found.
    pub(super) rebuild: bool,
    pub(super) res: Tally,
}

pub(super) fn slot(i: u64) -> Option<core::ops::Range<usize>> {
    let start = usize::try_from(i).ok()?.checked_mul(COUNT_BYTES)?;
    Some(start..start.checked_add(COUNT_BYTES)?)
}

pub(super) fn count_get(counts: &[u8], i: u64) -> u32 {
    slot(i)
        .and_then(|r| counts.get(r))
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_ne_bytes)
}

pub(super) fn count_set(counts: &mut [u8], i: u64, v: u32) {
    if let Some(b) = slot(i).and_then(|r| counts.get_mut(r)) {
        b.copy_from_slice(&v.to_ne_bytes());
    }
}

impl<'s> Pass<'s> {
    /// A pass of `kind` counting host clusters `lo..hi` into `counts` (zeroed by the caller).
    pub(super) fn new(kind: PassKind, counts: &'s mut [u8], lo: u64, hi: u64) -> Pass<'s> {
        Pass {
            kind,
            counts,
            lo,
            hi,
            touched_end: false,
            max_end: 0,
            rebuild: false,
            res: Tally::default(),
        }
    }

    /// A pass of `kind` that counts nothing: its walk finds `touched_end` and `max_end`.
    pub(super) fn probe(kind: PassKind) -> Pass<'s> {
        Pass::new(kind, &mut [], 0, 0)
    }

    pub(super) fn count(&self, cluster: u64) -> u64 {
        if cluster < self.lo || cluster >= self.hi {
            return 0;
        }
        count_get(self.counts, cluster.saturating_sub(self.lo)).into()
    }

    /// The first cluster of `from..to` (inside the pass's range) with a reference count above 0.
    pub(super) fn next_counted(&self, from: u64, to: u64) -> Option<u64> {
        let a = from.max(self.lo).saturating_sub(self.lo);
        let b = to.min(self.hi).saturating_sub(self.lo);
        let (sa, sb) = (slot(a)?.start, slot(b)?.start);
        let counts = self.counts.get(sa..sb.min(self.counts.len()))?;
        counts
            .chunks_exact(COUNT_BYTES)
            .position(|c| c.iter().any(|&x| x != 0))
            .map(|i| from.max(self.lo).saturating_add(i as u64))
    }

    /// Whether the walk reports entry-level problems and counts statistics (the first range of a count).
    pub(super) fn reports(&self) -> bool {
        matches!(self.kind, PassKind::Count { .. }) && self.lo == 0
    }

    /// Whether problems found in any range go unreported and uncounted (every pass but a count).
    pub(super) fn quiet(&self) -> bool {
        !matches!(self.kind, PassKind::Count { .. })
    }

    /// Whether the walk applies `-r all` fixes.
    pub(super) fn repairs_entries(&self) -> bool {
        self.kind
            == PassKind::Count {
                repair_entries: true,
            }
    }

    /// Whether the refcount table and blocks are counted.
    pub(super) fn counts_refcount_structure(&self) -> bool {
        self.kind != PassKind::ForRebuild
    }

    /// Whether the active L1 table and the L2 tables L1 entries name are counted.
    pub(super) fn counts_repaired_tables(&self) -> bool {
        self.kind != PassKind::Overlap
    }
}

impl<A: Access> Checker<'_, A> {
    /// QEMU's `qcow2_inc_refcounts_imrt`: one more reference to every cluster of `offset..offset + size`.
    pub(super) fn add_reference(&mut self, p: &mut Pass<'_>, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        let g = self.image;
        let end = offset.saturating_add(size);
        p.max_end = p.max_end.max(
            end.saturating_sub(1)
                .checked_shr(g.header.cluster_bits)
                .unwrap_or(0)
                .saturating_add(1),
        );
        if end.saturating_sub(g.file_len) >= g.header.cluster_size() {
            if p.reports() {
                self.sink.report(Problem::PastEndOfFile { offset, size });
                increment(&mut p.res.corruptions);
            }
            return;
        }
        let first = offset >> g.header.cluster_bits;
        let last = end.saturating_sub(1) >> g.header.cluster_bits;
        if last >= g.file_clusters {
            p.touched_end = true;
        }
        let a = first.max(p.lo);
        let b = last.min(p.hi.saturating_sub(1));
        if p.hi == 0 || a > b {
            return;
        }
        for c in a..=b {
            let i = c.saturating_sub(p.lo);
            let v = count_get(p.counts, i);
            if u64::from(v) >= g.header.max_refcount() {
                if !p.quiet() {
                    self.sink.report(Problem::RefcountOverflow {
                        offset: c << g.header.cluster_bits,
                    });
                    increment(&mut p.res.corruptions);
                }
                continue;
            }
            count_set(p.counts, i, v.saturating_add(1));
        }
    }

    /// Clusters a counting pass covers.
    pub(super) fn pass_len(&self, scratch_len: usize) -> u64 {
        (scratch_len / COUNT_BYTES) as u64
    }

    /// Counts (walk) and compares, pass by pass over host clusters `0..file_clusters + 1`. Walk results go to
    /// `walk_res`, comparison results to `cmp_res`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn count_and_compare(
        &mut self,
        scratch: &mut [u8],
        kind: PassKind,
        fix: Option<RepairMode>,
        walk_res: &mut Tally,
        cmp_res: &mut Tally,
        rebuild: &mut bool,
        highest: &mut u64,
        passes: &mut u32,
    ) -> Result<(), Error<A::E>> {
        let len = self.pass_len(scratch.len());
        let total = self.count_end()?;
        *highest = 0;
        let mut lo = 0u64;
        while lo < total {
            let hi = lo.saturating_add(len).min(total);
            let used = (hi.min(total).saturating_sub(lo) as usize).saturating_mul(COUNT_BYTES);
            scratch.get_mut(..used).unwrap_or(&mut []).fill(0);
            let mut p = Pass::new(kind, &mut *scratch, lo, hi);
            self.walk(&mut p)?;
            walk_res.add(&p.res);
            self.compare(&mut p, fix, highest, cmp_res)?;
            *rebuild |= p.rebuild;
            *passes = passes.saturating_add(1);
            lo = hi;
        }
        Ok(())
    }

    /// One past the last host cluster the counting passes cover. QEMU counts `file_clusters + 1` clusters (the whole
    /// file, and one past its end); past both the highest cluster any reference names and the last cluster any
    /// refcount table entry covers, the refcount on disk and the reference count are both 0, so nothing there
    /// can be reported. Cutting the range there makes the work follow what the image holds, not a sparse
    /// file's apparent length. Small files are not cut (finding the cut costs a walk of the metadata).
    pub(super) fn count_end(&mut self) -> Result<u64, Error<A::E>> {
        let all = self.image.file_clusters.saturating_add(1);
        if all <= UNCUT_COUNT_CLUSTERS {
            return Ok(all);
        }
        let mut probe = Pass::probe(PassKind::Recount);
        self.walk(&mut probe)?;
        let covered = self.refcount_cover_end()?;
        Ok(all.min(probe.max_end.max(covered)).max(1))
    }

    /// One past the last host cluster that a non-zero refcount table entry covers (valid or not: an invalid
    /// entry makes its clusters' refcounts unreadable, which is reported for each of them).
    pub(super) fn refcount_cover_end(&mut self) -> Result<u64, Error<A::E>> {
        let g = self.image;
        let mut end = 0u64;
        self.for_each_entry(
            g.header.refcount_table_offset,
            g.header.refcount_table_entries().saturating_mul(8),
            8,
            &mut |_, index, entry| {
                if be64(entry, 0) != 0 {
                    end = index
                        .saturating_add(1)
                        .checked_shl(g.header.refcount_block_bits())
                        .unwrap_or(u64::MAX);
                }
                Ok(Continue::<()>(()))
            },
        )?;
        Ok(end)
    }

    /// The reference count range of one pass when everything fits: the counts of the last
    /// [`Checker::count_and_compare`] are still in `scratch` and can be compared again.
    pub(super) fn one_pass(&self, scratch_len: usize) -> bool {
        self.pass_len(scratch_len) > self.image.file_clusters
    }
}
