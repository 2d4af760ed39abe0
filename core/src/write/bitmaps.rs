//! Persistent bitmaps: the engine does not keep dirty bitmaps up to date, so before its first write it
//! disowns them (the bitmaps extension is ended and, when the directory is valid, its clusters are freed).

use super::*;

/// A bitmap directory entry, as far as freeing it goes.
pub(super) struct BitmapEntry {
    pub(super) table: u64,
    pub(super) entries: u64,
    pub(super) next: u64,
}

impl BitmapEntry {
    /// The directory entry at `pos` whose first 24 bytes are `e` (the directory ends at `end`), if it is
    /// valid.
    pub(super) fn parse(
        e: &[u8; 24],
        pos: u64,
        end: u64,
        cluster_size: u64,
    ) -> Option<BitmapEntry> {
        let table = be64(e, 0);
        let entries = u64::from(be32(e, 8));
        let kind = e.get(16).copied().unwrap_or(0);
        let granularity = e.get(17).copied().unwrap_or(0);
        let name = u64::from(be32(e, 16) & 0xffff);
        let extra = u64::from(be32(e, 20));
        let len = 24u64
            .saturating_add(extra)
            .saturating_add(name)
            .checked_next_multiple_of(8)
            .unwrap_or(u64::MAX);
        let valid = table != 0
            && table & cluster_size.wrapping_sub(1) == 0
            && table & !OFFSET_MASK == 0
            && kind == 1
            && (9..=31).contains(&granularity)
            && (1..=1023).contains(&name)
            && extra <= 1024
            && entries <= 1 << 24;
        let next = pos.saturating_add(len);
        (valid && next <= end).then_some(BitmapEntry {
            table,
            entries,
            next,
        })
    }
}

impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// The engine does not keep dirty bitmaps up to date, so before its first write it disowns them (their
    /// autoclear bit is already cleared and durable): the bitmaps extension is ended where it is the last
    /// extension, and the directory, tables and bitmap clusters are freed. Anything that does not look exactly
    /// like a valid bitmap directory is left alone (leaked, never freed twice).
    pub(super) fn drop_bitmaps(&mut self, b: BitmapsExtension) -> Result<(), Error<D::Error>> {
        let cs = self.g.cluster_size;
        let next = b.extension_at.saturating_add(8 + 24);
        let mut word = [0u8; 8];
        read_bytes(self.dev, bounce_of(self.bounce, 0), next, &mut word)?;
        if word != [0u8; 8] {
            return Ok(());
        }
        self.write_header(b.extension_at, &[0u8; 8])?;
        // Validate the whole directory before freeing anything.
        let end = b.directory_offset.saturating_add(b.directory_size);
        let mut pos = b.directory_offset;
        let mut count = 0u32;
        while pos < end {
            let Some(e) = self.bitmap_entry(pos, end)? else {
                return Ok(());
            };
            pos = e.next;
            count = count.saturating_add(1);
        }
        if count != b.nb_bitmaps {
            return Ok(());
        }
        let mut pos = b.directory_offset;
        while pos < end {
            let Some(BitmapEntry {
                table,
                entries,
                next,
            }) = self.bitmap_entry(pos, end)?
            else {
                return Ok(());
            };
            for i in 0..entries {
                let mut w = [0u8; 8];
                read_bytes(
                    self.dev,
                    bounce_of(self.bounce, 0),
                    table.saturating_add(i.saturating_mul(8)),
                    &mut w,
                )?;
                let host = u64::from_be_bytes(w) & OFFSET_MASK;
                self.free_owned(host)?;
            }
            let clusters = ceil_div(entries.saturating_mul(8), cs);
            for c in 0..clusters {
                self.free_owned(table.saturating_add(c.saturating_mul(cs)))?;
            }
            pos = next;
        }
        let clusters = ceil_div(b.directory_size, cs);
        for c in 0..clusters {
            self.free_owned(b.directory_offset.saturating_add(c.saturating_mul(cs)))?;
        }
        Ok(())
    }

    /// One bitmap directory entry at `pos`: (table offset, table entries, next entry), if it is valid.
    pub(super) fn bitmap_entry(
        &mut self,
        pos: u64,
        end: u64,
    ) -> Result<Option<BitmapEntry>, Error<D::Error>> {
        let mut e = [0u8; 24];
        if pos.saturating_add(24) > end {
            return Ok(None);
        }
        read_bytes(self.dev, bounce_of(self.bounce, 0), pos, &mut e)?;
        Ok(BitmapEntry::parse(&e, pos, end, self.g.cluster_size))
    }

    /// Lowers the refcount of the cluster at `host` if it is exactly 1 (a bitmap cluster is never shared).
    pub(super) fn free_owned(&mut self, host: u64) -> Result<(), Error<D::Error>> {
        if host == 0 || host & self.g.cluster_size.wrapping_sub(1) != 0 || host > MAX_HOST_OFFSET {
            return Ok(());
        }
        let c = host >> self.g.cluster_bits;
        // A bitmap table entry that names live metadata lies: that cluster is not the bitmap's to free.
        if self.refcount(c)? == 1 && !self.is_metadata(host)? {
            self.change_refcount(c, false)?;
        }
        Ok(())
    }
}
