//! Guest data writes: the writable L2 table for a guest offset (allocated or copied from a shared one),
//! copy-on-write of the parts of a cluster a write does not cover, and storing the new bytes.

use super::*;

impl<D, B, C, const DEPTH: usize, const SLICES: usize> Image<D, B, C, DEPTH, SLICES, WriteState>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// The L2 table for guest offset `guest`, allocated (or copied, if shared with a snapshot) so that it can
    /// be written. Returns its host offset.
    pub(super) fn writable_l2(&mut self, guest: u64) -> Result<u64, Error<D::Error>> {
        let mut m = self.meta()?;
        let g = m.g;
        let l1_index = guest >> g.l2_coverage_bits;
        let (entry, old) = m.l2_table(guest)?;
        if let Some(old) = old
            && entry.copied()
        {
            return Ok(old);
        }
        m.make_room(3)?;
        let new = m.alloc_metadata_cluster()?;
        if let Err(e) = m.prepare_l2(old, new) {
            // The L1 entry does not point at it yet: the cluster goes back.
            let _ = m.change_refcount(new >> g.cluster_bits, false);
            return Err(e);
        }
        m.set_table_word(
            g.tables.l1_table_offset,
            l1_index.saturating_mul(8),
            new | OFLAG_COPIED,
        )?;
        if let Some(old) = old {
            m.free_later(old)?;
        }
        Ok(new)
    }

    /// Copies the guest bytes `[guest, guest + len)` as they read now into host bytes at `host` of the top
    /// image (the copy-on-write part of an allocating write).
    pub(super) fn copy_guest(
        &mut self,
        guest: u64,
        host: u64,
        len: u64,
    ) -> Result<(), Error<D::Error>> {
        let size = self.virtual_size();
        let bs = self
            .layers
            .first()
            .map(|l| l.dev.block_size())
            .ok_or(Error::ReadOnly)?;
        let Image {
            layers,
            bounce,
            cache,
            decompressor,
            ..
        } = self;
        let (b, rest) = split_bounce(bounce.as_mut(), bs);
        let mut stack = [0u8; STACK_CHUNK];
        let chunk = chunk_of(rest, &mut stack);
        let mut done = 0u64;
        while done < len {
            let n = (chunk.len() as u64).min(len.saturating_sub(done)) as usize;
            let part = chunk.get_mut(..n).unwrap_or(&mut []);
            // The last cluster of a disk whose size is not a cluster multiple reaches past the disk: that part
            // is copied as zeros.
            let at = guest.saturating_add(done);
            let inside = usize::try_from(size.saturating_sub(at))
                .unwrap_or(usize::MAX)
                .min(n);
            let (readable, past) = part.split_at_mut_checked(inside).unwrap_or_default();
            past.fill(0);
            Reader {
                layers: layers.as_mut_slice(),
                bounce: &mut *b,
                cache: &mut *cache,
                decompressor: &mut *decompressor,
            }
            .read(at, readable)?;
            let top = layers.first_mut().ok_or(Error::ReadOnly)?;
            #[cfg(any(feature = "luks", feature = "aes-legacy"))]
            if let Some(key) = crate::engine::key_of(&top.key, top.encrypted())? {
                // Re-encrypted for its new place (the IV follows the host sector).
                super::encrypted::encrypt_for(key, host.saturating_add(done), at, part);
            }
            let dev = match top.data.as_mut() {
                Some(data) => data,
                None => &mut top.dev,
            };
            write_bytes(dev, b, host.saturating_add(done), part)?;
            done = done.saturating_add(n as u64);
        }
        self.w.needs_flush = true;
        Ok(())
    }

    /// Stores `src` at host offset `host` (guest offset `guest`) of the top image (in its external data
    /// file, if it has one).
    pub(super) fn store(
        &mut self,
        host: u64,
        guest: u64,
        src: WriteSource<'_>,
        len: u64,
    ) -> Result<(), Error<D::Error>> {
        #[cfg(any(feature = "luks", feature = "aes-legacy"))]
        if self.top_key()?.is_some() {
            return self.store_encrypted(host, guest, src, len);
        }
        #[cfg(not(any(feature = "luks", feature = "aes-legacy")))]
        let _ = guest;
        let Image {
            layers, bounce, w, ..
        } = self;
        let top = layers.first_mut().ok_or(Error::ReadOnly)?;
        let dev = match top.data.as_mut() {
            Some(data) => data,
            None => &mut top.dev,
        };
        match src {
            WriteSource::Bytes(bytes) => {
                let bs = dev.block_size();
                write_bytes(dev, bounce_of(bounce.as_mut(), bs), host, bytes)?;
            }
            WriteSource::Zeros => write_zero_run(dev, bounce.as_mut(), host, len)?,
        }
        w.needs_flush = true;
        Ok(())
    }

    /// Where the clusters from guest cluster `gc` up to guest byte `end` that need new host clusters (a run
    /// in `gc`'s L2 table, the table made writable first) will go, as QEMU places a write's new clusters:
    /// right after the host cluster of the request's cluster before (`gc` is not the request's first), as
    /// many as are free there; otherwise one contiguous run past free holes too short for it. Returns how
    /// many clusters from `gc` that covers (at least 1); from a cluster written in place, the run of such
    /// clusters, which need no placing.
    #[cfg(feature = "qemu-placement")]
    #[inline(never)]
    fn place_run(&mut self, gc: u64, end: u64, first_gc: u64) -> Result<u64, Error<D::Error>> {
        let g = self.geometry()?;
        if g.tables.l2_format.external_data {
            return Ok(u64::MAX);
        }
        let l2 = self.writable_l2(gc)?;
        let mut m = self.meta()?;
        let cs = g.tables.cluster_size;
        let first = (gc >> g.cluster_bits) & g.l2_entries.wrapping_sub(1);
        let max = g
            .l2_entries
            .saturating_sub(first)
            .min(end.saturating_sub(gc).div_ceil(cs));
        // The run of clusters from `gc` alike to the first: written in place, or needing new clusters.
        let mut n = 0u64;
        let mut written_in_place = None;
        while n < max {
            let (_, entry, kind) = m.cluster_entry(l2, gc.saturating_add(n.saturating_mul(cs)))?;
            let here = in_place(kind, entry, g.tables.l2_format.extended).is_some();
            if *written_in_place.get_or_insert(here) != here {
                break;
            }
            n = n.saturating_add(1);
        }
        if written_in_place != Some(false) {
            // Nothing to place up to the next cluster that needs one.
            return Ok(n.max(1));
        }
        if gc > first_gc {
            let before = gc.saturating_sub(cs);
            if let (_, Some(l2_before)) = m.l2_table(before)? {
                let (_, _, kind) = m.cluster_entry(l2_before, before)?;
                if let ClusterKind::Data { host } = kind {
                    let next = host.saturating_add(cs) >> g.cluster_bits;
                    if next <= m.max_cluster()
                        && m.refcount_loc(next)?.is_some()
                        && m.refcount(next)? == 0
                    {
                        m.w.place_at = (next, n);
                        return Ok(n);
                    }
                }
            }
        }
        m.w.place = n;
        Ok(n)
    }

    /// Writes guest bytes `[a, b)` of the cluster at guest offset `gc` from `src`.
    pub(super) fn write_cluster(
        &mut self,
        gc: u64,
        a: u64,
        b: u64,
        src: WriteSource<'_>,
    ) -> Result<(), Error<D::Error>> {
        let l2 = self.writable_l2(gc)?;
        let mut m = self.meta()?;
        m.make_room(3)?;
        let g = m.g;
        let (index, old, kind) = m.cluster_entry(l2, gc)?;
        let piece = g.piece_size();
        let pieces = g.pieces();
        // Which pieces hold data now, and which does this write touch.
        let full = if pieces == 32 { u32::MAX } else { 1 };
        let old_alloc: u32 = match kind {
            ClusterKind::Data { .. } if g.tables.l2_format.extended => {
                (old.bitmap & 0xffff_ffff) as u32
            }
            ClusterKind::Data { .. } | ClusterKind::Compressed(_) => full,
            _ => 0,
        };
        let old_zero: u32 = if g.tables.l2_format.extended {
            (old.bitmap >> 32) as u32
        } else {
            0
        };
        let first = a.checked_div(piece).unwrap_or(0);
        let last = b.saturating_sub(1).checked_div(piece).unwrap_or(0);
        let mut touched = 0u32;
        let mut p = first;
        while p <= last && p < pieces {
            touched |= 1u32 << p;
            p = p.saturating_add(1);
        }
        let in_place = in_place(kind, old, g.tables.l2_format.extended);
        let new_alloc = old_alloc | touched;
        let target = match in_place {
            Some(host) => host,
            // An external data file maps guest clusters to the same offsets, without refcounts.
            None if g.tables.l2_format.external_data => gc,
            None => m.alloc_clusters(1)?.0,
        };
        if !g.tables.l2_format.external_data {
            m.guard(target, g.tables.cluster_size, in_place.is_some())?;
        }
        // Copy what the write does not cover in the pieces that will be allocated, from the old content, then
        // store the new bytes. If that fails, a cluster allocated for it goes back: nothing references it yet.
        let copy = match in_place {
            Some(_) => new_alloc & !old_alloc,
            None => new_alloc,
        };
        if let Err(e) = self.fill_cluster(gc, target, a, b, src, copy) {
            if in_place.is_none() && !g.tables.l2_format.external_data {
                self.give_back(target);
            }
            return Err(e);
        }
        let new = if g.tables.l2_format.extended {
            L2Entry {
                word: target | OFLAG_COPIED,
                bitmap: u64::from(new_alloc) | (u64::from(old_zero & !new_alloc) << 32),
            }
        } else {
            L2Entry {
                word: target | OFLAG_COPIED,
                bitmap: 0,
            }
        };
        let mut m = self.meta()?;
        if new != old {
            m.l2_set(l2, index, new)?;
        }
        if in_place.is_none() {
            m.free_entry(kind)?;
        }
        if matches!(kind, ClusterKind::Compressed(_)) {
            self.decompressor.invalidate();
        }
        Ok(())
    }

    /// Fills the pieces of the host cluster at `target` that `copy` names with the old content of guest cluster
    /// `gc` (around the written bytes), then stores the guest bytes `[a, b)` of the cluster from `src`.
    pub(super) fn fill_cluster(
        &mut self,
        gc: u64,
        target: u64,
        a: u64,
        b: u64,
        src: WriteSource<'_>,
        copy: u32,
    ) -> Result<(), Error<D::Error>> {
        let g = self.geometry()?;
        let piece = g.piece_size();
        let pieces = g.pieces();
        let mut run: Option<(u64, u64)> = None;
        for p in 0..pieces {
            if copy & (1u32 << p) == 0 {
                continue;
            }
            let ps = p.saturating_mul(piece);
            let pe = ps.saturating_add(piece);
            for (lo, hi) in [(ps, pe.min(a)), (ps.max(b), pe)] {
                if lo >= hi {
                    continue;
                }
                run = match run {
                    Some((rlo, rhi)) if rhi == lo => Some((rlo, hi)),
                    Some((rlo, rhi)) => {
                        self.copy_guest(
                            gc.saturating_add(rlo),
                            target.saturating_add(rlo),
                            rhi.saturating_sub(rlo),
                        )?;
                        Some((lo, hi))
                    }
                    None => Some((lo, hi)),
                };
            }
        }
        if let Some((rlo, rhi)) = run {
            self.copy_guest(
                gc.saturating_add(rlo),
                target.saturating_add(rlo),
                rhi.saturating_sub(rlo),
            )?;
        }
        self.store(
            target.saturating_add(a),
            gc.saturating_add(a),
            src,
            b.saturating_sub(a),
        )
    }

    /// Writes whole guest clusters from guest offset `gc` (cluster-aligned) with `bytes` (whole clusters)
    /// into newly allocated contiguous host clusters with one data request ([`Self::reserve_run`], then
    /// the data, then [`Self::commit_run`]: the order [`Self::write_cluster`] keeps for one). Returns how
    /// many clusters it wrote: 0 when the first one does not qualify, for the caller to write it cluster
    /// by cluster.
    pub(super) fn write_fresh_run(
        &mut self,
        gc: u64,
        bytes: &[u8],
    ) -> Result<u64, Error<D::Error>> {
        let Some(r) = self.reserve_run(gc, bytes.len() as u64)? else {
            return Ok(0);
        };
        let data = bytes.get(..r.len as usize).unwrap_or(&[]);
        if let Err(e) = self.store(r.host, gc, WriteSource::Bytes(data), r.len) {
            self.cancel_run(&r);
            return Err(e);
        }
        let clusters = r.len >> self.geometry()?.cluster_bits;
        self.commit_run(r)?;
        Ok(clusters)
    }

    /// Allocates new contiguous host clusters for the whole guest clusters from `gc` (cluster-aligned, at
    /// most `len` bytes' worth) that lie in `gc`'s L2 table and whose entries hold nothing to keep or free
    /// (unallocated, or zero without a host cluster). `None` when the first one does not qualify.
    fn reserve_run(&mut self, gc: u64, len: u64) -> Result<Option<Reservation>, Error<D::Error>> {
        self.reserve_run_placed(gc, len, false)
    }

    /// [`Self::reserve_run`], placed as QEMU places a new run of `whole_runs` (past free holes too short
    /// for it) when asked.
    fn reserve_run_placed(
        &mut self,
        gc: u64,
        len: u64,
        whole_runs: bool,
    ) -> Result<Option<Reservation>, Error<D::Error>> {
        let g = self.geometry()?;
        let cs = g.tables.cluster_size;
        let whole = len.checked_div(cs).unwrap_or(0);
        if g.tables.l2_format.external_data || whole == 0 || gc & cs.wrapping_sub(1) != 0 {
            return Ok(None);
        }
        let l2 = self.writable_l2(gc)?;
        let mut m = self.meta()?;
        m.make_room(3)?;
        let first = (gc >> g.cluster_bits) & g.l2_entries.wrapping_sub(1);
        // At most one metadata slice's worth of refcounts: the allocation then dirties at most two
        // refcount slices, which the room made above holds.
        let refcounts_per_slice =
            (g.tables.slice_size.saturating_mul(8) >> g.tables.refcount_order).max(1);
        let max = whole
            .min(g.l2_entries.saturating_sub(first))
            .min(refcounts_per_slice);
        let mut n = 0u64;
        while n < max
            && fresh(
                m.cluster_entry(l2, gc.saturating_add(n.saturating_mul(cs)))?
                    .2,
            )
        {
            n = n.saturating_add(1);
        }
        if n == 0 {
            return Ok(None);
        }
        #[cfg(feature = "qemu-placement")]
        if whole_runs {
            m.w.place = n;
        }
        #[cfg(not(feature = "qemu-placement"))]
        let _ = whole_runs;
        let (host, got) = m.alloc_clusters(n)?;
        Ok(Some(Reservation {
            guest: gc,
            host,
            len: got.saturating_mul(cs),
            l2,
        }))
    }

    /// Points the reserved guest clusters at their host clusters (whose data has been stored). An entry
    /// that changed since the reservation keeps its new value, and its reserved cluster goes back.
    fn commit_run(&mut self, r: Reservation) -> Result<(), Error<D::Error>> {
        self.commit_run_as(r, false)
    }

    /// [`Self::commit_run`]; with `preallocated`, the subclusters of extended L2 entries stay unallocated
    /// (QEMU's preallocation reserves the clusters without writing them).
    fn commit_run_as(&mut self, r: Reservation, preallocated: bool) -> Result<(), Error<D::Error>> {
        let g = self.geometry()?;
        let cs = g.tables.cluster_size;
        // Every piece of each cluster is written: all allocated, none reads as zeros.
        let bitmap = if g.tables.l2_format.extended && !preallocated {
            u64::from(u32::MAX)
        } else {
            0
        };
        let mut at = 0u64;
        while at < r.len {
            let host = r.host.saturating_add(at);
            let mut m = self.meta()?;
            m.make_room(2)?;
            let (index, _, kind) = m.cluster_entry(r.l2, r.guest.saturating_add(at))?;
            if fresh(kind) {
                let word = host | OFLAG_COPIED;
                m.l2_set(r.l2, index, L2Entry { word, bitmap })?;
            } else {
                self.give_back(host);
            }
            at = at.saturating_add(cs);
        }
        Ok(())
    }

    /// Gives back the clusters of a reservation whose data could not be stored: nothing references them.
    fn cancel_run(&mut self, r: &Reservation) {
        let cs = self.geometry().map_or(0, |g| g.tables.cluster_size);
        let mut at = 0u64;
        while at < r.len && cs > 0 {
            self.give_back(r.host.saturating_add(at));
            at = at.saturating_add(cs);
        }
    }

    /// Starts a write of whole clusters at guest `offset` whose data the caller stores itself, so that it
    /// can store it from another thread while this image serves other requests (a parallel copy): new
    /// contiguous host clusters are allocated for as many of the clusters from `offset` (cluster-aligned;
    /// `len` bytes, whole clusters) as lie in one L2 table and have nothing to keep (unallocated, or zero
    /// without a host cluster). The caller stores their data at [`Reservation::host`] of the image file,
    /// then calls [`Self::commit_reservation`]; until then the guest does not see them, and a crash only
    /// leaks them. `None`: the first cluster does not qualify (write it with [`Self::write_at`]).
    pub fn reserve_clusters(
        &mut self,
        offset: u64,
        len: u64,
    ) -> Result<Option<Reservation>, Error<D::Error>> {
        self.check_range(offset, len)?;
        if self.layers.first().is_some_and(|l| l.encrypted()) {
            // The caller would store plaintext: encrypted images take their data through write_at.
            return Ok(None);
        }
        self.begin_write_over(offset, len)?;
        let r = self.reserve_run(offset, len)?;
        self.end_write()?;
        Ok(r)
    }

    /// Stores the data of reservation `r` (`data` is [`Reservation::len`] bytes) through the image's own
    /// device, for a caller with no other way to write the image file.
    pub fn store_reserved(&mut self, r: &Reservation, data: &[u8]) -> Result<(), Error<D::Error>> {
        if data.len() as u64 != r.len {
            return Err(Error::BufferTooSmall {
                what: "data for a reservation",
                need: r.len,
                have: data.len() as u64,
            });
        }
        self.store(r.host, r.guest, WriteSource::Bytes(data), r.len)
    }

    /// Makes the guest see a reservation whose data has been stored.
    pub fn commit_reservation(&mut self, r: Reservation) -> Result<(), Error<D::Error>> {
        self.begin_write()?;
        self.commit_run(r)?;
        self.end_write()
    }

    /// QEMU's `preallocation=metadata` for the guest range `[offset, offset + len)`: every cluster there
    /// without a host cluster gets one, in contiguous runs after the L2 table that maps them (allocated
    /// first where missing), mapped as data; the file grows to cover them before the entries point at them,
    /// so they read as zeros. A cluster reused inside the file is zeroed first (QEMU leaves what it held).
    pub fn preallocate_metadata(&mut self, offset: u64, len: u64) -> Result<(), Error<D::Error>> {
        self.check_range(offset, len)?;
        self.begin_write()?;
        self.meta()?.mark_bitmaps(offset, len)?;
        let cs = self.geometry()?.tables.cluster_size;
        let end = offset.saturating_add(len).div_ceil(cs).saturating_mul(cs);
        let mut gc = offset & !cs.wrapping_sub(1);
        while gc < end {
            let Some(r) = self.reserve_run_placed(gc, end.saturating_sub(gc), true)? else {
                gc = gc.saturating_add(cs);
                continue;
            };
            let mut m = self.meta()?;
            let file_end = m.dev.size()?;
            let run_end = r.host.saturating_add(r.len);
            if r.host < file_end {
                m.write_zeros(r.host, run_end.min(file_end).saturating_sub(r.host))?;
            }
            if run_end > file_end && !m.dev.set_size(run_end)? {
                // A device that cannot grow: the clusters past its end are written as zeros.
                m.write_zeros(file_end, run_end.saturating_sub(file_end))?;
            }
            m.w.needs_flush = true;
            gc = gc.saturating_add(r.len);
            self.commit_run_as(r, true)?;
        }
        self.end_write()
    }

    /// Drops a reservation whose data could not be stored: its clusters go back.
    pub fn cancel_reservation(&mut self, r: Reservation) {
        self.cancel_run(&r);
    }

    /// Gives back a cluster allocated for a change that failed before anything referenced it (best effort:
    /// the request's own error is what the caller sees; at worst the cluster stays leaked).
    pub(super) fn give_back(&mut self, host: u64) {
        if let Ok(mut m) = self.meta() {
            let c = host >> m.g.cluster_bits;
            let _ = m.change_refcount(c, false);
        }
    }

    /// Writes `buf` at guest `offset` (any size and alignment).
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Error<D::Error>> {
        self.check_range(offset, buf.len() as u64)?;
        self.begin_write_over(offset, buf.len() as u64)?;
        // An encrypted image writes whole sectors: the partial ones first, then the rest.
        #[cfg(any(feature = "luks", feature = "aes-legacy"))]
        let (start, buf) = {
            let edges = super::encrypted::Edge::Bytes(buf);
            match self.write_sector_edges(offset, buf.len() as u64, edges)? {
                None => return self.end_write(),
                Some((start, len)) => {
                    let from = usize::try_from(start.saturating_sub(offset)).unwrap_or(0);
                    let end = from.saturating_add(usize::try_from(len).unwrap_or(0));
                    (start, buf.get(from..end).unwrap_or(&[]))
                }
            }
        };
        #[cfg(not(any(feature = "luks", feature = "aes-legacy")))]
        let start = offset;
        self.write_range(start, buf.len() as u64, WriteSource::Bytes(buf))?;
        self.end_write()
    }

    /// Refuses (marking the image corrupt) a request over guest bytes `[offset, offset + len)` when an entry
    /// there names a host cluster that holds metadata: the request would write over it or free it. Runs
    /// before the request changes anything, so that a refused request changes nothing but the corrupt bit.
    pub(super) fn guard_guest_range(
        &mut self,
        offset: u64,
        len: u64,
    ) -> Result<(), Error<D::Error>> {
        let mut m = self.meta()?;
        let g = m.g;
        if g.tables.l2_format.external_data {
            return Ok(());
        }
        let mut gc = offset & !g.tables.cluster_size.wrapping_sub(1);
        let end = offset.saturating_add(len);
        while gc < end {
            let (_, Some(l2)) = m.l2_table(gc)? else {
                // No L2 table: nothing to check up to the next one.
                let span = 1u64 << g.l2_coverage_bits;
                gc = (gc & !span.wrapping_sub(1)).saturating_add(span);
                continue;
            };
            let (_, _, kind) = m.cluster_entry(l2, gc)?;
            match kind {
                ClusterKind::Data { host } | ClusterKind::Zero { host: Some(host) } => {
                    m.guard(host, g.tables.cluster_size, true)?;
                }
                ClusterKind::Compressed(d) => m.guard(d.offset, d.len, true)?,
                ClusterKind::Unallocated | ClusterKind::Zero { host: None } => {}
            }
            gc = gc.saturating_add(g.tables.cluster_size);
        }
        Ok(())
    }

    pub(super) fn write_range(
        &mut self,
        offset: u64,
        len: u64,
        src: WriteSource<'_>,
    ) -> Result<(), Error<D::Error>> {
        let cs = self.geometry()?.tables.cluster_size;
        let mut pos = offset;
        let end = offset.saturating_add(len);
        // Clusters left of the run of new ones placed last (see `place_run`); nothing left from a request
        // that failed.
        let mut placed = 0u64;
        #[cfg(feature = "qemu-placement")]
        {
            self.w.place = 0;
            self.w.place_at = (0, 0);
        }
        while pos < end {
            let gc = pos & !cs.wrapping_sub(1);
            let a = pos.saturating_sub(gc);
            let b = end.saturating_sub(gc).min(cs);
            let from = pos.saturating_sub(offset) as usize;
            #[cfg(feature = "qemu-placement")]
            if placed == 0 {
                placed = self.place_run(gc, end, offset & !cs.wrapping_sub(1))?;
            }
            if let WriteSource::Bytes(bytes) = src
                && a == 0
                && b == cs
            {
                // Whole clusters that need new host clusters: stored with one request.
                let whole = end.saturating_sub(pos) & !cs.wrapping_sub(1);
                let run = bytes
                    .get(from..from.saturating_add(whole as usize))
                    .unwrap_or(&[]);
                let done = self.write_fresh_run(gc, run)?;
                if done > 0 {
                    pos = gc.saturating_add(done.saturating_mul(cs));
                    placed = placed.saturating_sub(done);
                    continue;
                }
            }
            let n = b.saturating_sub(a);
            self.write_cluster(gc, a, b, src.sub(from, n as usize))?;
            pos = gc.saturating_add(b);
            placed = placed.saturating_sub(1);
        }
        #[cfg(feature = "qemu-placement")]
        {
            self.w.place = 0;
            self.w.place_at = (0, 0);
        }
        Ok(())
    }
}

/// The host cluster a write goes into where it is: the entry's own, when the image alone references it.
fn in_place(kind: ClusterKind, entry: L2Entry, extended: bool) -> Option<u64> {
    match kind {
        ClusterKind::Data { host } if entry.copied() => Some(host),
        ClusterKind::Zero { host: Some(host) } if entry.copied() && !extended => Some(host),
        _ => None,
    }
}

/// Whether an entry holds nothing a write of the whole cluster would keep or free.
fn fresh(kind: ClusterKind) -> bool {
    matches!(
        kind,
        ClusterKind::Unallocated | ClusterKind::Zero { host: None }
    )
}

/// Whole clusters allocated for a write whose data the caller stores itself
/// ([`Image::reserve_clusters`]); used up by [`Image::commit_reservation`] or
/// [`Image::cancel_reservation`].
#[derive(Debug, PartialEq, Eq)]
pub struct Reservation {
    guest: u64,
    host: u64,
    len: u64,
    /// The L2 table holding the clusters' entries.
    l2: u64,
}

impl Reservation {
    /// Guest offset of the first cluster.
    pub fn guest(&self) -> u64 {
        self.guest
    }
    /// Host offset in the image file where the data goes.
    pub fn host(&self) -> u64 {
        self.host
    }
    /// Bytes reserved (whole clusters; possibly fewer than asked for; never 0).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u64 {
        self.len
    }
}
