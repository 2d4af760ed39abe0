//! Allocation: the free-cluster search, allocating clusters (checked against known metadata first), new
//! refcount blocks that cover themselves, new L2 tables, contiguous clusters for a table (placed as QEMU
//! places them), and refcount-table growth.

use super::*;

/// Counts one more refcount structure made during an allocation; more than 64 means it does not settle.
fn converging<E>(made: u32) -> Result<u32, Error<E>> {
    if made >= 64 {
        return Err(Error::NoSpace {
            what: "cluster allocation did not converge",
        });
    }
    Ok(made.saturating_add(1))
}

/// Sets refcount entry `entry` (of a block whose chunk starting at byte `chunk_start` is `chunk`) to 1.
pub(super) fn set_in_chunk(
    chunk: &mut [u8],
    chunk_start: u64,
    entry: u64,
    order: u32,
) -> Option<()> {
    let bit = entry << order;
    let byte = bit >> 3;
    if byte < chunk_start || byte >= chunk_start.saturating_add(chunk.len() as u64) {
        return Some(());
    }
    let first_entry = chunk_start.saturating_mul(8) >> order;
    refcount_set(
        chunk,
        order,
        usize::try_from(entry.saturating_sub(first_entry)).ok()?,
        1,
    )
}

impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    pub(super) fn max_cluster(&self) -> u64 {
        MAX_HOST_OFFSET >> self.g.cluster_bits
    }

    /// The first cluster at or after `from` whose refcount is 0.
    pub(super) fn find_free(&mut self, from: u64) -> Result<u64, Error<D::Error>> {
        let mut c = from.max(1);
        let order = self.g.tables.refcount_order;
        let per_slice = (self.g.tables.slice_size.saturating_mul(8)) >> order;
        loop {
            if c > self.max_cluster() {
                return Err(Error::NoSpace {
                    what: "no free host cluster below 2^56",
                });
            }
            let Some((host, idx)) = self.refcount_loc(c)? else {
                return Ok(c);
            };
            let slice = self.g.tables.slice_size as usize;
            let s = self
                .cache
                .get(self.dev, bounce_of(self.bounce, 0), 0, host, slice)?;
            let mut i = idx;
            while (i as u64) < per_slice {
                if refcount_get(s, order, i) == Some(0) {
                    return Ok(c.saturating_add((i.saturating_sub(idx)) as u64));
                }
                i = i.saturating_add(1);
            }
            c = c.saturating_add(per_slice.saturating_sub(idx as u64));
        }
    }

    /// Allocates up to `max` contiguous clusters (at least one) with refcount 1. Returns the host offset
    /// and the count. When a run of `place` clusters was announced ([`WriteState::place`]), it starts past
    /// free holes too short for that run, as QEMU's search for a new run passes over them (and does not
    /// come back to them until a cluster below is freed): at `place` free clusters, or at a run that ends
    /// where the refcount blocks do.
    pub(super) fn alloc_clusters(&mut self, max: u64) -> Result<(u64, u64), Error<D::Error>> {
        #[cfg(feature = "qemu-placement")]
        if let (at, left @ 1..) = core::mem::take(&mut self.w.place_at) {
            // Right after the request's previous host cluster, as many as are free there; the search start
            // stays where it was. Where none is free, the rest of the run is placed anew.
            if self.refcount_loc(at)?.is_none() || self.refcount(at)? != 0 {
                self.w.place = left;
                return self.alloc_clusters(max);
            }
            let mut count = 1u64;
            while count < max.min(left)
                && self.refcount_loc(at.saturating_add(count))?.is_some()
                && self.refcount(at.saturating_add(count))? == 0
            {
                count = count.saturating_add(1);
            }
            let host = self.take_clusters(at, count)?;
            self.w.place_at = (at.saturating_add(count), left.saturating_sub(count));
            return Ok((host, count));
        }
        #[cfg(feature = "qemu-placement")]
        let want = core::mem::take(&mut self.w.place);
        #[cfg(not(feature = "qemu-placement"))]
        let want = 0u64;
        let mut from = self.w.free_hint;
        let need = max.max(want);
        let bits = self.g.tables.refcount_block_bits;
        // Refcount table growths and new refcount blocks made on the way (each changes what is free).
        let mut made = 0u32;
        loop {
            let c = self.find_free(from)?;
            let r = c >> bits;
            if r >= self.g.tables.refcount_table_entries {
                made = converging(made)?;
                #[cfg(feature = "qemu-placement")]
                if self.grow_reftable_after(c, need)? {
                    continue;
                }
                self.grow_reftable(c)?;
                continue;
            }
            // The run from `c`, as QEMU sees it: clusters no refcount block covers count as free (up to the
            // refcount table's reach). The first region it reaches without a block gets one.
            let mut missing = (self.reftable_entry(r)? == 0).then_some(r);
            let mut count = 1u64;
            let mut blocked = false;
            while count < need {
                let next = c.saturating_add(count);
                if next > self.max_cluster() || next >> bits >= self.g.tables.refcount_table_entries
                {
                    break;
                }
                if self.refcount_loc(next)?.is_none() {
                    missing = missing.or(Some(next >> bits));
                } else if self.refcount(next)? != 0 {
                    blocked = true;
                    break;
                }
                count = count.saturating_add(1);
            }
            if blocked && count < want {
                // A hole too short for the run: the search goes on past it.
                from = c.saturating_add(count).saturating_add(1);
                continue;
            }
            if let Some(m) = missing {
                made = converging(made)?;
                // As QEMU places it: at the first free cluster after the run; then the search starts again.
                // (Where that cluster lies past the region, the block goes at the region's first cluster of
                // the run instead.)
                let b = self.find_free(c.saturating_add(count))?;
                let at = if b >> bits == m { b } else { c.max(m << bits) };
                self.alloc_refblock(m, at)?;
                continue;
            }
            let count = count.min(max);
            let host = self.take_clusters(c, count)?;
            self.w.free_hint = c.saturating_add(count);
            return Ok((host, count));
        }
    }

    /// Gives the `count` free clusters from cluster `c` refcount 1; returns the host offset of the first.
    fn take_clusters(&mut self, c: u64, count: u64) -> Result<u64, Error<D::Error>> {
        let host = c << self.g.cluster_bits;
        let len = count.saturating_mul(self.g.tables.cluster_size);
        // A free cluster is never one the engine knows to hold metadata (a refcount that lies).
        self.guard(host, len, false)?;
        for i in 0..count {
            self.change_refcount(c.saturating_add(i), true)?;
        }
        self.cache.forget_range(0, host, len);
        Ok(host)
    }

    /// Allocates `n` contiguous clusters whatever `n` (a LUKS area), and returns the run's host offset.
    /// [`Self::alloc_clusters`] stops where a refcount block's reach ends and makes each new block cover
    /// itself, inside the run's way; here the blocks for the regions the run will cover are made first, in
    /// clusters before the run (QEMU puts them after it), so that one run can span them.
    #[cfg(feature = "luks")]
    pub(super) fn alloc_contiguous(&mut self, n: u64) -> Result<u64, Error<D::Error>> {
        let bits = self.g.tables.refcount_block_bits;
        for _ in 0..256 {
            let c = self.find_free(self.w.free_hint)?;
            let last = c.saturating_add(n).saturating_sub(1);
            if last >> bits >= self.g.tables.refcount_table_entries {
                self.grow_reftable(last)?;
                continue;
            }
            let mut missing = None;
            for r in (c >> bits)..=(last >> bits) {
                if self.reftable_entry(r)? == 0 {
                    missing = Some(r);
                    break;
                }
            }
            if let Some(r) = missing {
                // A zeroed block for region `r`, its own refcount in a block that exists, durable before
                // the refcount table points at it.
                let (b, _) = self.alloc_clusters(1)?;
                self.guard(b, self.g.tables.cluster_size, false)?;
                self.note_table(b);
                self.cache.forget_range(0, b, self.g.tables.cluster_size);
                self.write_zeros(b, self.g.tables.cluster_size)?;
                self.writeback(SliceKind::Refcount)?;
                self.flush_dev()?;
                self.set_table_word(self.g.tables.refcount_table_offset, r.saturating_mul(8), b)?;
                continue;
            }
            let (host, got) = self.alloc_clusters(n)?;
            if got == n && host == c << self.g.cluster_bits {
                return Ok(host);
            }
            // Something in the way: give the clusters back and look past it.
            let first = host >> self.g.cluster_bits;
            for i in 0..got {
                self.change_refcount(first.saturating_add(i), false)?;
            }
            self.w.free_hint = first.saturating_add(got).saturating_add(1);
        }
        Err(Error::NoSpace {
            what: "allocation of a contiguous run did not converge",
        })
    }

    /// Allocates one cluster for metadata (never cluster 0).
    pub(super) fn alloc_metadata_cluster(&mut self) -> Result<u64, Error<D::Error>> {
        let (host, _) = self.alloc_clusters(1)?;
        if host == 0 {
            return Err(corrupt("allocation of metadata at offset 0", 0));
        }
        self.note_table(host);
        Ok(host)
    }

    /// Writes the refcount block for refcount table index `r` at cluster `c` (inside the range it covers, so
    /// that it covers itself), then points the refcount table at it.
    pub(super) fn alloc_refblock(&mut self, r: u64, c: u64) -> Result<(), Error<D::Error>> {
        let host = self.write_refblock(c)?;
        self.set_table_word(
            self.g.tables.refcount_table_offset,
            r.saturating_mul(8),
            host,
        )?;
        Ok(())
    }

    /// Writes a refcount block at cluster `c` that counts only itself (durable); returns its host offset.
    fn write_refblock(&mut self, c: u64) -> Result<u64, Error<D::Error>> {
        let host = c << self.g.cluster_bits;
        self.guard(host, self.g.tables.cluster_size, false)?;
        self.note_table(host);
        self.cache.forget_range(0, host, self.g.tables.cluster_size);
        let self_index = c & (1u64 << self.g.tables.refcount_block_bits).wrapping_sub(1);
        let order = self.g.tables.refcount_order;
        self.write_block_with(host, |_, chunk_start, chunk| {
            set_in_chunk(chunk, chunk_start, self_index, order)
        })?;
        self.flush_dev()?;
        Ok(host)
    }

    /// Writes a new L2 table at `new` (a copy of the shared table at `old`, or zeros) and makes it durable
    /// with the refcounts that cover it, before an L1 entry may point at it.
    pub(super) fn prepare_l2(&mut self, old: Option<u64>, new: u64) -> Result<(), Error<D::Error>> {
        match old {
            // Copy the shared table; its entries keep their (shared) COPIED-less state.
            Some(old) => self.copy_cluster(old, new)?,
            None => self.write_zeros(new, self.g.tables.cluster_size)?,
        }
        if !self.w.lazy {
            self.writeback(SliceKind::Refcount)?;
        }
        self.flush_dev()
    }

    /// Copies the cluster at host offset `from` to `to`.
    pub(super) fn copy_cluster(&mut self, from: u64, to: u64) -> Result<(), Error<D::Error>> {
        self.copy_bytes(from, to, self.g.tables.cluster_size)
    }

    /// Copies `len` bytes from host offset `from` to `to`, chunk by chunk.
    ///
    /// Out of line: inlined, its stack copy buffer would sit in the frame of the write request, below which
    /// every allocation of that request runs.
    #[inline(never)]
    pub(super) fn copy_bytes(
        &mut self,
        from: u64,
        to: u64,
        len: u64,
    ) -> Result<(), Error<D::Error>> {
        let bs = self.dev.block_size();
        let (bounce, rest) = split_bounce(self.bounce, bs);
        let mut stack = [0u8; STACK_CHUNK];
        let chunk = chunk_of(rest, &mut stack);
        let mut done = 0u64;
        while done < len {
            let n = (chunk.len() as u64).min(len.saturating_sub(done)) as usize;
            let part = chunk.get_mut(..n).unwrap_or(&mut []);
            read_bytes(self.dev, bounce, from.saturating_add(done), part)?;
            write_bytes(self.dev, bounce, to.saturating_add(done), part)?;
            done = done.saturating_add(n as u64);
        }
        self.w.needs_flush = true;
        Ok(())
    }

    /// Writes one cluster at `host` chunk by chunk; `fill(first, chunk_offset, chunk)` fills each zeroed chunk.
    pub(super) fn write_block_with<F>(
        &mut self,
        host: u64,
        mut fill: F,
    ) -> Result<(), Error<D::Error>>
    where
        F: FnMut(bool, u64, &mut [u8]) -> Option<()>,
    {
        let bs = self.dev.block_size();
        let cs = self.g.tables.cluster_size;
        let (bounce, rest) = split_bounce(self.bounce, bs);
        let mut stack = [0u8; STACK_CHUNK];
        let chunk = chunk_of(rest, &mut stack);
        let mut done = 0u64;
        while done < cs {
            let n = (chunk.len() as u64).min(cs.saturating_sub(done)) as usize;
            let part = chunk.get_mut(..n).unwrap_or(&mut []);
            part.fill(0);
            fill(done == 0, done, part).ok_or(corrupt("refcount block layout", host))?;
            write_bytes(self.dev, bounce, host.saturating_add(done), part)?;
            done = done.saturating_add(n as u64);
        }
        self.w.needs_flush = true;
        Ok(())
    }

    /// Grows the refcount table so that it covers cluster `c` (which, like everything after it, has no
    /// refcount block yet). The new table and the refcount blocks that cover it are placed at `c`.
    pub(super) fn grow_reftable(&mut self, c: u64) -> Result<(), Error<D::Error>> {
        let g = self.g;
        let per_cluster = g.tables.cluster_size >> 3;
        let r0 = c >> g.tables.refcount_block_bits;
        let old_entries = g.tables.refcount_table_entries;
        let want = old_entries
            .saturating_add(old_entries / 2)
            .max(r0.saturating_add(2));
        let mut k = 1u64;
        let mut t;
        loop {
            let need = want.max(r0.saturating_add(k).saturating_add(1));
            t = ceil_div(need, per_cluster);
            let last = c.saturating_add(k).saturating_add(t).saturating_sub(1);
            let regions = (last >> g.tables.refcount_block_bits)
                .saturating_sub(r0)
                .saturating_add(1);
            if regions <= k {
                break;
            }
            k = regions;
            if k > 1024 {
                return Err(Error::NoSpace {
                    what: "refcount table growth did not converge",
                });
            }
        }
        self.install_refcount_area(c, r0, r0.saturating_add(k), t, None)?;
        Ok(())
    }

    /// QEMU's growth of a full refcount table when a run of up to `need` clusters from cluster `c` (clusters
    /// no block covers counting as free) reaches past it: the run's refcount block at the first free cluster
    /// after the run (counting itself), then, from the first region boundary after both, new refcount
    /// blocks and a refcount table with room to grow by half (the old table freed). `false` where that
    /// block would not lie in the run's region (the caller grows the table its own way).
    #[cfg(feature = "qemu-placement")]
    fn grow_reftable_after(&mut self, c: u64, need: u64) -> Result<bool, Error<D::Error>> {
        let g = self.g;
        let bits = g.tables.refcount_block_bits;
        let mut count = 1u64;
        while count < need && c.saturating_add(count) <= self.max_cluster() {
            let next = c.saturating_add(count);
            if self.refcount_loc(next)?.is_some() && self.refcount(next)? != 0 {
                break;
            }
            count = count.saturating_add(1);
        }
        let b = self.find_free(c.saturating_add(count))?;
        if b >> bits != c >> bits {
            return Ok(false);
        }
        let host = self.write_refblock(b)?;
        let meta = ceil_div(c.max(b).saturating_add(1), 1u64 << bits) << bits;
        let (blocks, _) = crate::create::measure::refcount_structures(
            meta,
            g.tables.cluster_size,
            g.tables.refcount_order,
            true,
        );
        let entries = blocks.saturating_add(blocks.div_ceil(2));
        let t = ceil_div(entries, g.tables.cluster_size >> 3);
        self.install_refcount_area(meta, meta >> bits, blocks, t, Some((c >> bits, host)))?;
        Ok(true)
    }

    /// QEMU's `qcow2_refcount_area` with an exact size: from cluster `start` (past every cluster in use),
    /// new refcount blocks and a new refcount table that count themselves and the `additional` clusters
    /// that follow them, the table sized for exactly that. Returns the first cluster after them.
    pub(super) fn refcount_area(
        &mut self,
        start: u64,
        additional: u64,
    ) -> Result<u64, Error<D::Error>> {
        let g = self.g;
        let (blocks, _) = crate::create::measure::refcount_structures(
            start.saturating_add(additional),
            g.tables.cluster_size,
            g.tables.refcount_order,
            false,
        );
        let t = ceil_div(blocks, g.tables.cluster_size >> 3);
        self.install_refcount_area(
            start,
            start >> g.tables.refcount_block_bits,
            blocks,
            t,
            None,
        )
    }

    /// Installs new refcount structures from cluster `start` (it and every cluster after it free): a
    /// refcount block for each region from `first` to `end` (refcount table indices) that has none, in
    /// consecutive clusters from `start`, then a refcount table of `t` clusters there (the old table's
    /// entries, as many as fit, and the new blocks), each of these clusters counted. The blocks and the
    /// table are durable before the header names the table; the old table is freed after. `given`: a
    /// refcount block already written, `(index, host offset)`, that the new table takes. Returns the first
    /// cluster after the table.
    fn install_refcount_area(
        &mut self,
        start: u64,
        first: u64,
        end: u64,
        t: u64,
        given: Option<(u64, u64)>,
    ) -> Result<u64, Error<D::Error>> {
        let g = self.g;
        let per_cluster = g.tables.cluster_size >> 3;
        let new_entries = t.saturating_mul(per_cluster);
        if t.saturating_mul(g.tables.cluster_size) > MAX_REFTABLE_BYTES || t > u64::from(u32::MAX) {
            return Err(Error::NoSpace {
                what: "the refcount table would exceed 8 MiB",
            });
        }
        let mut k = 0u64;
        for r in first..end {
            if r >= g.tables.refcount_table_entries || self.reftable_entry(r)? == 0 {
                k = k.saturating_add(1);
            }
        }
        let area_end = start.saturating_add(k).saturating_add(t);
        if area_end > self.max_cluster() {
            return Err(Error::NoSpace {
                what: "no free host cluster below 2^56",
            });
        }
        self.guard(
            start << g.cluster_bits,
            area_end
                .saturating_sub(start)
                .saturating_mul(g.tables.cluster_size),
            false,
        )?;
        // Each region's block counts the new area's clusters in its reach: a new block is written so, an
        // existing one has them counted through the cache (written back before the table).
        let bits = g.tables.refcount_block_bits;
        let mut next = start;
        for r in first..end {
            let region = r << bits;
            let lo = start.max(region).saturating_sub(region);
            let hi = area_end
                .min(region.saturating_add(1u64 << bits))
                .saturating_sub(region);
            if r < g.tables.refcount_table_entries && self.reftable_entry(r)? != 0 {
                for e in lo..hi {
                    self.change_refcount(region.saturating_add(e), true)?;
                }
                continue;
            }
            self.note_table(next << g.cluster_bits);
            let host = next << g.cluster_bits;
            next = next.saturating_add(1);
            self.cache.forget_range(0, host, g.tables.cluster_size);
            self.write_block_with(host, |_, chunk_start, chunk| {
                let entries = (chunk.len() as u64).saturating_mul(8) >> g.tables.refcount_order;
                let first_entry = chunk_start.saturating_mul(8) >> g.tables.refcount_order;
                let from = lo.max(first_entry);
                let to = hi.min(first_entry.saturating_add(entries));
                let mut e = from;
                while e < to {
                    set_in_chunk(chunk, chunk_start, e, g.tables.refcount_order)?;
                    e = e.saturating_add(1);
                }
                Some(())
            })?;
        }
        self.writeback(SliceKind::Refcount)?;
        // The new table: the old entries that fit, then the new blocks.
        let table = start.saturating_add(k) << g.cluster_bits;
        self.cache
            .forget_range(0, table, t.saturating_mul(g.tables.cluster_size));
        let old_bytes = g
            .tables
            .refcount_table_entries
            .min(new_entries)
            .saturating_mul(8);
        let bs = self.dev.block_size();
        let mut blocks_seen = 0u64;
        {
            let (bounce, rest) = split_bounce(self.bounce, bs);
            let mut stack = [0u8; STACK_CHUNK];
            let chunk = chunk_of(rest, &mut stack);
            let total = t.saturating_mul(g.tables.cluster_size);
            let mut done = 0u64;
            while done < total {
                let n = (chunk.len() as u64).min(total.saturating_sub(done)) as usize;
                let part = chunk.get_mut(..n).unwrap_or(&mut []);
                part.fill(0);
                if done < old_bytes {
                    let m = (old_bytes.saturating_sub(done) as usize).min(n);
                    read_bytes(
                        self.dev,
                        bounce,
                        g.tables.refcount_table_offset.saturating_add(done),
                        part.get_mut(..m).unwrap_or(&mut []),
                    )?;
                }
                if let Some((r, host)) = given {
                    let byte = r.saturating_mul(8);
                    if byte >= done && byte < done.saturating_add(n as u64) {
                        let at = byte.saturating_sub(done) as usize;
                        if let Some(dst) = part.get_mut(at..at.saturating_add(8)) {
                            let _ = copy_exact(dst, &host.to_be_bytes());
                        }
                    }
                }
                // The regions this chunk holds entries for that get a new block (their entry is 0).
                let lo_r = first.max(done >> 3);
                let hi_r = end.min(done.saturating_add(n as u64) >> 3);
                for r in lo_r..hi_r {
                    let at = (r.saturating_mul(8).saturating_sub(done)) as usize;
                    if let Some(dst) = part.get_mut(at..at.saturating_add(8))
                        && dst.iter().all(|&b| b == 0)
                    {
                        let host = start.saturating_add(blocks_seen) << g.cluster_bits;
                        blocks_seen = blocks_seen.saturating_add(1);
                        let _ = copy_exact(dst, &host.to_be_bytes());
                    }
                }
                write_bytes(self.dev, bounce, table.saturating_add(done), part)?;
                done = done.saturating_add(n as u64);
            }
        }
        self.flush_dev()?;
        // Point the header at it.
        let mut field = [0u8; 12];
        let (offset, clusters) = field.split_at_mut_checked(8).unwrap_or_default();
        let _ = copy_exact(offset, &table.to_be_bytes());
        let _ = copy_exact(clusters, &(t as u32).to_be_bytes());
        self.write_header(field::REFCOUNT_TABLE_OFFSET, &field)?;
        let old_off = g.tables.refcount_table_offset;
        let old_clusters = g
            .tables
            .refcount_table_entries
            .checked_div(per_cluster)
            .unwrap_or(0);
        self.header.refcount_table_offset = table;
        self.header.refcount_table_clusters = t as u32;
        self.g.tables.refcount_table_offset = table;
        self.g.tables.refcount_table_entries = new_entries;
        self.cache.forget_range(
            0,
            old_off,
            old_clusters.saturating_mul(g.tables.cluster_size),
        );
        // The old table is no longer referenced by the (durable) header.
        for i in 0..old_clusters {
            self.change_refcount((old_off >> g.cluster_bits).saturating_add(i), false)?;
        }
        Ok(area_end)
    }

    /// Allocates `n` contiguous clusters (refcount 1 each) for a table; returns the host offset. As QEMU
    /// places them: the first run of free clusters (clusters no refcount block covers yet count as free),
    /// then a refcount block for each region of the run that has none, at the first free cluster after it.
    pub(super) fn alloc_table_clusters(&mut self, n: u64) -> Result<u64, Error<D::Error>> {
        let bits = self.g.tables.refcount_block_bits;
        let first_free = self.find_free(self.w.free_hint)?;
        let mut from = first_free;
        loop {
            let c = self.find_free(from)?;
            if c >> bits >= self.g.tables.refcount_table_entries {
                self.grow_reftable(c)?;
                continue;
            }
            let mut run = 1u64;
            while run < n {
                let next = c.saturating_add(run);
                if next > self.max_cluster()
                    || next >> bits >= self.g.tables.refcount_table_entries
                    || (self.refcount_loc(next)?.is_some() && self.refcount(next)? != 0)
                {
                    break;
                }
                run = run.saturating_add(1);
            }
            if run < n {
                let next = c.saturating_add(run);
                if next >> bits >= self.g.tables.refcount_table_entries {
                    self.grow_reftable(next)?;
                    continue;
                }
                from = next;
                continue;
            }
            let end = c.saturating_add(n);
            let mut covered = true;
            for r in (c >> bits)..=(end.saturating_sub(1) >> bits) {
                if self.reftable_entry(r)? == 0 {
                    self.cover_region(r, end)?;
                    covered = false;
                    break;
                }
            }
            if !covered {
                // The new refcount block may sit where the search would go: search again (as QEMU does).
                from = first_free;
                continue;
            }
            let host = c << self.g.cluster_bits;
            let len = n.saturating_mul(self.g.tables.cluster_size);
            self.guard(host, len, false)?;
            for i in 0..n {
                self.change_refcount(c.saturating_add(i), true)?;
            }
            if c == first_free {
                self.w.free_hint = end;
            }
            self.cache.forget_range(0, host, len);
            return Ok(host);
        }
    }

    /// Gives refcount-table region `r` a refcount block at the first free cluster from `from`: one that
    /// counts itself when it lies in `r`, else one that another block counts (that block first made where
    /// needed, after it).
    fn cover_region(&mut self, r: u64, from: u64) -> Result<(), Error<D::Error>> {
        let bits = self.g.tables.refcount_block_bits;
        let b = self.find_free(from)?;
        if b >> bits == r {
            return self.alloc_refblock(r, b);
        }
        if self.refcount_loc(b)?.is_none() {
            // Free because no block counts it: as QEMU does, the block for its own region goes right after
            // it (counting itself), and then counts this one.
            let r2 = b >> bits;
            if r2 >= self.g.tables.refcount_table_entries {
                return self.grow_reftable(b);
            }
            let b2 = self.find_free(b.saturating_add(1))?;
            if b2 >> bits != r2 {
                return Err(Error::NoSpace {
                    what: "no free cluster for a refcount block",
                });
            }
            self.alloc_refblock(r2, b2)?;
        }
        let host = b << self.g.cluster_bits;
        self.guard(host, self.g.tables.cluster_size, false)?;
        self.change_refcount(b, true)?;
        self.writeback(SliceKind::Refcount)?;
        self.note_table(host);
        self.cache.forget_range(0, host, self.g.tables.cluster_size);
        self.write_zeros(host, self.g.tables.cluster_size)?;
        self.flush_dev()?;
        self.set_table_word(
            self.g.tables.refcount_table_offset,
            r.saturating_mul(8),
            host,
        )
    }
}
