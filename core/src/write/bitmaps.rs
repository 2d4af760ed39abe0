//! Persistent bitmaps: the engine does not keep dirty bitmaps up to date, so before its first write it
//! disowns them (the bitmaps extension is ended and, when the directory is valid, the clusters it owns are
//! freed). The directory's format and QEMU's limits are `format::bitmap`'s.

use super::*;

impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// The engine does not keep dirty bitmaps up to date, so before its first write it disowns them (their
    /// autoclear bit is already cleared and durable): the bitmaps extension is ended where it is the last
    /// extension, and the directory, tables and bitmap clusters are freed. Anything that does not look exactly
    /// like a valid bitmap directory is left alone (leaked, never freed twice), and so is a bitmap table whose
    /// clusters are not each owned once (shared with another bitmap, or already freed).
    ///
    /// The directory was validated when the image was opened (QEMU's limits: at most 65535 entries, each table
    /// at most 512 MiB of bitmap data); tables are read a chunk at a time, and each owned table once.
    pub(super) fn drop_bitmaps(&mut self, b: BitmapsExtension) -> Result<(), Error<D::Error>> {
        let cs = self.g.tables.cluster_size;
        let next = b.extension_at.saturating_add(8 + 24);
        let mut word = [0u8; 8];
        read_bytes(self.dev, bounce_of(self.bounce, 0), next, &mut word)?;
        if word != [0u8; 8] {
            return Ok(());
        }
        self.write_header(b.extension_at, &[0u8; 8])?;
        // Validate the whole directory before freeing anything.
        let disk_size = self.header.size;
        let mut walk = DirectoryWalk::new(&b, cs, disk_size);
        while walk.next_at().is_some() {
            if self.bitmap_entry(&mut walk)?.is_none() {
                return Ok(());
            }
        }
        if walk.finish().is_err() {
            return Ok(());
        }
        let mut walk = DirectoryWalk::new(&b, cs, disk_size);
        while walk.next_at().is_some() {
            let Some(entry) = self.bitmap_entry(&mut walk)? else {
                return Ok(());
            };
            let table = entry.table_offset;
            let bytes = entry.table_bytes();
            let clusters = ceil_div(bytes, cs);
            let mut owned = true;
            for c in 0..clusters {
                let host = table.saturating_add(c.saturating_mul(cs));
                if host > MAX_HOST_OFFSET || self.refcount(host >> self.g.cluster_bits)? != 1 {
                    owned = false;
                    break;
                }
            }
            if !owned {
                continue;
            }
            let mut chunk = [0u8; STACK_CHUNK];
            let mut done = 0u64;
            while done < bytes {
                let n = (STACK_CHUNK as u64).min(bytes.saturating_sub(done)) as usize;
                let part = chunk.get_mut(..n).unwrap_or(&mut []);
                read_bytes(
                    self.dev,
                    bounce_of(self.bounce, 0),
                    table.saturating_add(done),
                    part,
                )?;
                for k in 0..n / 8 {
                    if let BitmapTableEntry::Data(host) =
                        BitmapTableEntry::decode(be64(&chunk, k.saturating_mul(8)), cs)
                    {
                        self.free_owned(host)?;
                    }
                }
                done = done.saturating_add(n as u64);
            }
            for c in 0..clusters {
                self.free_owned(table.saturating_add(c.saturating_mul(cs)))?;
            }
        }
        let clusters = ceil_div(b.directory_size, cs);
        for c in 0..clusters {
            self.free_owned(b.directory_offset.saturating_add(c.saturating_mul(cs)))?;
        }
        Ok(())
    }

    /// The next bitmap directory entry of `walk`, if it is valid (format::bitmap::DirectoryWalk's rules).
    pub(super) fn bitmap_entry(
        &mut self,
        walk: &mut DirectoryWalk,
    ) -> Result<Option<BitmapDirEntry>, Error<D::Error>> {
        let Some(at) = walk.next_at() else {
            return Ok(None);
        };
        let mut raw = [0u8; DIR_ENTRY_LEN];
        read_bytes(self.dev, bounce_of(self.bounce, 0), at, &mut raw)?;
        Ok(walk.advance(&raw).ok().map(|e| e.entry))
    }

    /// Lowers the refcount of the cluster at `host` if it is exactly 1 (a bitmap cluster is never shared).
    pub(super) fn free_owned(&mut self, host: u64) -> Result<(), Error<D::Error>> {
        if host == 0
            || host & self.g.tables.cluster_size.wrapping_sub(1) != 0
            || host > MAX_HOST_OFFSET
        {
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
