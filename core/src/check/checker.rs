//! The checker ([`Checker`]): the device, the bounce block, the image's facts and the sink; the order of the
//! passes of one check or repair run (count and compare, refuse an overlapping repair, rebuild, recount to
//! repair leaks, COPIED flags, clear the dirty and corrupt bits); and the few writes every part shares.

use super::*;

/// The checker: the device, the bounce block, the image's facts and the sink.
pub(super) struct Checker<'a, A> {
    pub(super) io: A,
    pub(super) bounce: &'a mut [u8],
    pub(super) image: ImageFacts,
    pub(super) sink: &'a mut dyn CheckSink,
    /// QEMU's corruption event was signalled (it is printed once).
    pub(super) signalled: bool,
}

/// What [`Checker::for_each_entry`] calls for each entry of a table: the checker, the entry's index and its
/// bytes; [`ControlFlow::Break`] ends the walk. Called through `dyn`, so that each walk links one copy of the
/// streaming loop.
pub(super) type EachEntry<'e, C, T, E> =
    dyn FnMut(&mut C, u64, &[u8]) -> Result<ControlFlow<T>, Error<E>> + 'e;

impl<A: Access> Checker<'_, A> {
    pub(super) fn report(&mut self, p: &Pass<'_>, problem: Problem) {
        if !p.quiet() {
            self.sink.report(problem);
        }
    }

    /// A refcount could not be read (unaligned refcount block): QEMU's corruption event, once; a writable image
    /// gets the corrupt bit, as QEMU sets it.
    pub(super) fn signal_unreadable(&mut self, rr: &RefcountReader) -> Result<(), Error<A::E>> {
        if self.signalled {
            return Ok(());
        }
        self.signalled = true;
        let marking = self.io.writable();
        self.sink.report(Problem::RefcountBlockOffsetUnaligned {
            offset: rr.block,
            index: rr.table_index,
            marking,
        });
        if marking && self.image.header.version >= 3 {
            let mut f = [0u8; 8];
            self.io
                .read(self.bounce, field::INCOMPATIBLE_FEATURES, &mut f)?;
            let bits = u64::from_be_bytes(f) | IncompatibleFeatures::CORRUPT.bits();
            self.write_word(field::INCOMPATIBLE_FEATURES, bits)?;
        }
        Ok(())
    }

    /// The part of a table of `bytes` at `offset` that lies inside the file, in whole entries of `entry` bytes
    /// (the rest reads as zeros, which is an empty entry in every table the check reads).
    pub(super) fn in_file(&self, offset: u64, bytes: u64, entry: u64) -> u64 {
        let avail = self.image.file_len.saturating_sub(offset);
        bytes.min(avail.checked_next_multiple_of(entry).unwrap_or(u64::MAX))
    }

    /// Streams the entries of the table of `bytes` at `table` that lie inside the file ([`Self::in_file`]),
    /// [`CHUNK`] bytes a read, calling `each` with the checker, the entry's index and its `entry` bytes (8, or
    /// 16 for extended L2 entries). `each` ends the walk early with [`ControlFlow::Break`], whose value is
    /// returned.
    pub(super) fn for_each_entry<T>(
        &mut self,
        table: u64,
        bytes: u64,
        entry: u64,
        each: &mut EachEntry<'_, Self, T, A::E>,
    ) -> Result<Option<T>, Error<A::E>> {
        let bytes = self.in_file(table, bytes, entry);
        let mut buf = [0u8; CHUNK];
        let mut pos = 0u64;
        let mut index = 0u64;
        while pos < bytes {
            let n = (bytes.saturating_sub(pos)).min(CHUNK as u64) as usize;
            let chunk = buf.get_mut(..n).unwrap_or(&mut []);
            self.io
                .read(self.bounce, table.saturating_add(pos), chunk)?;
            let step = (entry as usize).max(8);
            let mut at = 0usize;
            while let Some(bytes) = chunk.get(at..at.saturating_add(step)) {
                if let ControlFlow::Break(found) = each(self, index, bytes)? {
                    return Ok(Some(found));
                }
                index = index.saturating_add(1);
                at = at.saturating_add(step);
            }
            pos = pos.saturating_add(n as u64);
        }
        Ok(None)
    }

    /// Writes one 8-byte entry word and makes it durable.
    pub(super) fn write_word(&mut self, at: u64, word: u64) -> Result<(), Error<A::E>> {
        self.io.write(self.bounce, at, &word.to_be_bytes())?;
        self.io.flush()
    }

    /// One `qcow2_check_refcounts` (+ the dirty/corrupt bit clearing of `qcow2_co_check_locked`).
    pub(super) fn run(
        &mut self,
        scratch: &mut [u8],
        fix: Option<RepairMode>,
    ) -> Result<CheckReport, Error<A::E>> {
        let g = self.image;
        if self.pass_len(scratch.len()) == 0 {
            return Err(Error::BufferTooSmall {
                what: "check scratch",
                need: COUNT_BYTES as u64,
                have: scratch.len() as u64,
            });
        }
        if g.file_clusters > MAX_CHECK_CLUSTERS {
            return Err(Error::Unsupported {
                what: FILE_TOO_LARGE,
                value: g.file_clusters,
            });
        }
        let fix_all = fix == Some(RepairMode::All);
        let (mut walk_res, mut cmp_res) = (Tally::default(), Tally::default());
        let (mut rebuild, mut highest, mut passes) = (false, 0u64, 0u32);
        if fix_all && let Some((offset, table)) = self.repair_conflict(scratch)? {
            // Report what a check finds, then refuse: nothing but the corrupt bit is written.
            self.count_and_compare(
                scratch,
                PassKind::Count {
                    repair_entries: false,
                },
                None,
                &mut walk_res,
                &mut cmp_res,
                &mut rebuild,
                &mut highest,
                &mut passes,
            )?;
            self.sink.report(Problem::RepairOverlap { offset, table });
            if g.header.version >= 3 {
                let mut f = [0u8; 8];
                self.io
                    .read(self.bounce, field::INCOMPATIBLE_FEATURES, &mut f)?;
                let bits = u64::from_be_bytes(f) | IncompatibleFeatures::CORRUPT.bits();
                self.write_word(field::INCOMPATIBLE_FEATURES, bits)?;
            }
            return Err(corrupt(
                "repair refused: a table it would write overlaps other data or metadata",
                offset,
            ));
        }
        self.count_and_compare(
            scratch,
            PassKind::Count {
                repair_entries: fix_all,
            },
            None,
            &mut walk_res,
            &mut cmp_res,
            &mut rebuild,
            &mut highest,
            &mut passes,
        )?;
        let mut res = walk_res;
        res.add(&cmp_res);
        let mut rebuilt = false;
        if rebuild && fix_all {
            self.sink.report(Problem::Rebuilding);
            let old = res;
            // Whether a reference reached the cluster past the file's end: cheap to find again.
            let (touched_end, max_end) = {
                let mut p = Pass::probe(PassKind::ForRebuild);
                self.walk(&mut p)?;
                (p.touched_end, p.max_end)
            };
            self.rebuild(scratch, touched_end, max_end)?;
            rebuilt = true;
            res.corruptions = 0;
            res.leaks = 0;
            // Refcounts that could not be read were those of the old structure, which is gone now (QEMU keeps
            // counting them, and so leaves the dirty and corrupt bits set after a successful rebuild).
            res.check_errors = res.check_errors.saturating_sub(cmp_res.check_errors);
            let (mut w2, mut c2) = (Tally::default(), Tally::default());
            let mut rebuild2 = false;
            self.count_and_compare(
                scratch,
                PassKind::Count {
                    repair_entries: false,
                },
                Some(RepairMode::Leaks),
                &mut w2,
                &mut c2,
                &mut rebuild2,
                &mut highest,
                &mut passes,
            )?;
            res.corruptions = res.corruptions.saturating_add(w2.corruptions);
            res.leaks = res.leaks.saturating_add(w2.leaks);
            res.check_errors = res.check_errors.saturating_add(w2.check_errors);
            if rebuild2 {
                self.sink.report(Problem::RebuildStillBroken);
            }
            if res.corruptions < old.corruptions {
                res.corruptions_fixed = res
                    .corruptions_fixed
                    .saturating_add(old.corruptions.saturating_sub(res.corruptions));
            }
            if res.leaks < old.leaks {
                res.leaks_fixed = res
                    .leaks_fixed
                    .saturating_add(old.leaks.saturating_sub(res.leaks));
            }
            res.leaks = res.leaks.saturating_add(c2.leaks);
        } else if let Some(mode) = fix {
            if rebuild {
                self.sink.report(Problem::NeedsRebuild);
                return Err(corrupt(
                    "the refcount structure needs to be rebuilt (repair all)",
                    0,
                ));
            }
            if res.leaks > 0 || res.corruptions > 0 {
                res = walk_res;
                let mut c2 = Tally::default();
                if self.one_pass(scratch.len()) {
                    let hi = self.pass_len(scratch.len()).min(self.count_end()?);
                    let mut p = Pass::new(PassKind::Recount, &mut *scratch, 0, hi);
                    // touched_end is a property of the references: find it without counting.
                    let mut probe = Pass::probe(PassKind::Recount);
                    self.walk(&mut probe)?;
                    p.touched_end = probe.touched_end;
                    highest = 0;
                    self.compare(&mut p, Some(mode), &mut highest, &mut c2)?;
                } else {
                    let mut w3 = Tally::default();
                    let mut rebuild3 = false;
                    self.count_and_compare(
                        scratch,
                        PassKind::Recount,
                        Some(mode),
                        &mut w3,
                        &mut c2,
                        &mut rebuild3,
                        &mut highest,
                        &mut passes,
                    )?;
                }
                res.add(&c2);
                self.io.flush()?;
            }
        }
        self.check_copied(fix, &mut res)?;
        if fix.is_some() && res.check_errors == 0 && res.corruptions == 0 && g.header.version >= 3 {
            let mut f = [0u8; 8];
            self.io
                .read(self.bounce, field::INCOMPATIBLE_FEATURES, &mut f)?;
            let old = u64::from_be_bytes(f);
            let new =
                old & !(IncompatibleFeatures::DIRTY.bits() | IncompatibleFeatures::CORRUPT.bits());
            if new != old {
                self.write_word(field::INCOMPATIBLE_FEATURES, new)?;
                self.image = load_image(&mut self.io, self.bounce)?;
            }
        }
        Ok(CheckReport {
            corruptions: res.corruptions,
            leaks: res.leaks,
            check_errors: res.check_errors,
            corruptions_fixed: res.corruptions_fixed,
            leaks_fixed: res.leaks_fixed,
            image_end_offset: highest
                .saturating_add(1)
                .saturating_mul(g.header.cluster_size()),
            total_clusters: ceil_div(g.header.size, g.header.cluster_size()),
            allocated_clusters: res.allocated,
            fragmented_clusters: res.fragmented,
            compressed_clusters: res.compressed,
            passes,
            rebuilt,
        })
    }
}
