//! The first half of the verification before the first write: every metadata cluster has a refcount of at
//! least 1 and, as far as the scan budget goes, holds one structure; fills the filter.

use super::*;

impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// How the tables of the image name host cluster `host`: a full scan of the refcount table, the L1 table,
    /// the snapshot table and each snapshot's L1 table, and the bitmap directory.
    pub(super) fn names_of(&mut self, host: u64) -> Result<Names, Error<D::Error>> {
        let g = self.g;
        let cs = g.tables.cluster_size;
        let mut names = Names {
            refcount_blocks: self.count_in_table(
                g.tables.refcount_table_offset,
                g.tables.refcount_table_entries,
                REFTABLE_OFFSET_MASK,
                host,
            )?,
            l2_tables: self.count_in_table(
                g.tables.l1_table_offset,
                g.tables.l1_size,
                OFFSET_MASK,
                host,
            )?,
            ..Names::default()
        };
        let nb = self.header.nb_snapshots;
        let mut at = self.header.snapshots_offset;
        for _ in 0..nb {
            let Some(s) = self.snapshot_at(at)? else {
                break;
            };
            let l1_bytes = u64::from(s.l1_size).saturating_mul(8);
            if cluster_in(host, cs, s.l1_table_offset, l1_bytes) {
                names.snapshot_l1_tables = names.snapshot_l1_tables.saturating_add(1);
            }
            let n = self.count_in_table(s.l1_table_offset, s.l1_size.into(), OFFSET_MASK, host)?;
            names.snapshot_l2_tables = names.snapshot_l2_tables.saturating_add(n);
            at = at.saturating_add(s.entry_len());
        }
        if let Some(b) = self.bitmaps
            && self.bitmaps_live()
        {
            let mut walk = DirectoryWalk::new(&b, cs, self.header.size);
            while let Some(e) = self.bitmap_entry(&mut walk)? {
                if cluster_in(host, cs, e.table_offset, e.table_bytes()) {
                    names.bitmap_tables = names.bitmap_tables.saturating_add(1);
                }
            }
        }
        Ok(names)
    }

    /// The snapshot table entry at `at`, if it is one the engine can walk past.
    pub(in crate::write) fn snapshot_at(
        &mut self,
        at: u64,
    ) -> Result<Option<SnapshotEntryLayout>, Error<D::Error>> {
        let mut fixed = [0u8; SNAPSHOT_FIXED_LEN];
        let bs = self.dev.block_size();
        let (bounce, _) = split_bounce(self.bounce, bs);
        read_bytes(self.dev, bounce, at, &mut fixed)?;
        let s = SnapshotEntryLayout::parse(&fixed);
        let table_end = self
            .header
            .snapshots_offset
            .saturating_add(MAX_SNAPSHOT_TABLE_BYTES);
        let fits = at.saturating_add(s.entry_len()) <= table_end;
        Ok((s.extra_len <= MAX_SNAPSHOT_EXTRA && fits).then_some(s))
    }

    /// The snapshot table's length in bytes (refused when an entry cannot be walked past, as QEMU refuses
    /// to open such an image).
    pub(super) fn snapshot_table_len(&mut self) -> Result<u64, Error<D::Error>> {
        let start = self.header.snapshots_offset;
        let mut at = start;
        for _ in 0..self.header.nb_snapshots {
            let Some(s) = self.snapshot_at(at)? else {
                return Err(crate::error::corrupt(
                    "snapshot table entry is invalid or the table is larger than 64 MiB",
                    at,
                ));
            };
            at = at.saturating_add(s.entry_len());
        }
        Ok(at.saturating_sub(start))
    }

    /// Checks one cluster of a fixed structure: its refcount is not 0.
    pub(super) fn verify_fixed(
        &mut self,
        offset: u64,
        len: u64,
        s: Structure,
    ) -> Result<(), Error<D::Error>> {
        let cs = self.g.tables.cluster_size;
        let mut host = offset & !cs.wrapping_sub(1);
        let end = offset.saturating_add(len);
        while host < end && host <= MAX_HOST_OFFSET {
            if self.refcount(host >> self.g.cluster_bits)? == 0 {
                return Err(crate::error::corrupt(s.zero_refcount_message(), host));
            }
            host = host.saturating_add(cs);
        }
        Ok(())
    }

    /// Checks one cluster of a table named by another table: not in a fixed structure, not a second
    /// structure (as far as the scan budget goes), refcount not 0. Adds it to the filter.
    pub(super) fn verify_named(
        &mut self,
        host: u64,
        s: Structure,
        scans: &mut u32,
    ) -> Result<(), Error<D::Error>> {
        let cs = self.g.tables.cluster_size;
        if host == 0 || host & cs.wrapping_sub(1) != 0 || host > MAX_HOST_OFFSET {
            // Not a table the engine would use: an invalid entry is refused where it is met.
            return Ok(());
        }
        if self.fixed_structure_at(host).is_some() {
            return Err(crate::error::corrupt(s.shared_message(), host));
        }
        let seen = self.w.filter.insert(host >> self.g.cluster_bits);
        if seen && *scans < VERIFY_EXACT_SCANS {
            *scans = scans.saturating_add(1);
            // A snapshot's L1 table spans clusters: its own entry names each of them once.
            if self.names_of(host)?.owners() > 1 {
                return Err(crate::error::corrupt(s.shared_message(), host));
            }
        }
        if self.refcount(host >> self.g.cluster_bits)? == 0 {
            return Err(crate::error::corrupt(s.zero_refcount_message(), host));
        }
        Ok(())
    }

    /// Checks every table of the 8-byte table at `table` (`entries` entries under `mask`) as structure `s`.
    pub(super) fn verify_table_entries(
        &mut self,
        table: u64,
        entries: u64,
        s: Structure,
        scans: &mut u32,
    ) -> Result<(), Error<D::Error>> {
        let mut chunk = [0u8; SCAN_CHUNK];
        let mut i = 0u64;
        while i < entries {
            let n = self.read_table_chunk(table, i, entries, &mut chunk)?;
            if n == 0 {
                break;
            }
            for k in 0..n {
                let word = be64(&chunk, k.saturating_mul(8));
                let host = if s == Structure::RefcountBlock {
                    word & REFTABLE_OFFSET_MASK
                } else {
                    // Entries with reserved bits are refused where they are used.
                    match L1Entry(word).l2_offset(self.g.tables.cluster_size) {
                        Ok(Some(h)) => h,
                        _ => 0,
                    }
                };
                self.verify_named(host, s, scans)?;
            }
            i = i.saturating_add(n as u64);
        }
        Ok(())
    }

    /// Walks the image's metadata once before the first write (see the module comment): every metadata
    /// cluster must have a refcount of at least 1 and hold one structure. Fills the filter.
    pub(in crate::write) fn verify_metadata(&mut self) -> Result<(), Error<D::Error>> {
        let g = self.g;
        let cs = g.tables.cluster_size;
        let mut scans = 0u32;
        self.w.snapshot_table_len = self.snapshot_table_len()?;
        self.verify_fixed(0, cs, Structure::Header)?;
        self.verify_fixed(
            g.tables.l1_table_offset,
            g.tables.l1_size.saturating_mul(8),
            Structure::L1,
        )?;
        self.verify_fixed(
            g.tables.refcount_table_offset,
            g.tables.refcount_table_entries.saturating_mul(8),
            Structure::RefcountTable,
        )?;
        let (nb, snapshots) = (self.header.nb_snapshots, self.header.snapshots_offset);
        if nb != 0 {
            let len = self.w.snapshot_table_len;
            self.verify_fixed(snapshots, len, Structure::SnapshotTable)?;
        }
        if let Some(b) = self.bitmaps
            && self.bitmaps_live()
        {
            self.verify_fixed(
                b.directory_offset,
                b.directory_size,
                Structure::BitmapDirectory,
            )?;
        }
        self.verify_table_entries(
            g.tables.refcount_table_offset,
            g.tables.refcount_table_entries,
            Structure::RefcountBlock,
            &mut scans,
        )?;
        self.verify_table_entries(
            g.tables.l1_table_offset,
            g.tables.l1_size,
            Structure::L2,
            &mut scans,
        )?;
        let mut at = snapshots;
        for _ in 0..nb {
            let Some(s) = self.snapshot_at(at)? else {
                break;
            };
            let l1_bytes = u64::from(s.l1_size).saturating_mul(8);
            let clusters = ceil_div(l1_bytes, cs);
            let first = s.l1_table_offset & !cs.wrapping_sub(1);
            for k in 0..clusters {
                self.verify_named(
                    first.saturating_add(k.saturating_mul(cs)),
                    Structure::SnapshotL1,
                    &mut scans,
                )?;
            }
            self.verify_table_entries(
                s.l1_table_offset,
                s.l1_size.into(),
                Structure::SnapshotL2,
                &mut scans,
            )?;
            at = at.saturating_add(s.entry_len());
        }
        if let Some(b) = self.bitmaps
            && self.bitmaps_live()
        {
            let mut walk = DirectoryWalk::new(&b, cs, self.header.size);
            while let Some(e) = self.bitmap_entry(&mut walk)? {
                let clusters = ceil_div(e.table_bytes(), cs);
                for k in 0..clusters {
                    self.verify_named(
                        e.table_offset.saturating_add(k.saturating_mul(cs)),
                        Structure::BitmapTable,
                        &mut scans,
                    )?;
                }
            }
        }
        Ok(())
    }
}
