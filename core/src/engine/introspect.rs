//! Introspection for tools: the chain's images, stored names, host block status, snapshot table entries,
//! persistent bitmap directory entries, refcounts and cache statistics.

use super::*;
use crate::format::bitmap::{BitmapDirEntry, DIR_ENTRY_LEN, DirectoryWalk};

impl<D, B, C, const DEPTH: usize, const SLICES: usize, W> Image<D, B, C, DEPTH, SLICES, W>
where
    D: BlockDevice,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// The virtual disk's size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.layers.first().map_or(0, |l| l.size)
    }

    /// The images of the chain, the opened one first.
    pub fn layers(&self) -> &[Layer<D>] {
        &self.layers
    }

    /// Metadata cache (hits, misses).
    pub fn cache_stats(&self) -> (u64, u64) {
        self.cache.stats()
    }

    /// Reads a name stored in the first cluster of the image at `depth` into `buf`.
    pub fn read_stored_name<'b>(
        &mut self,
        depth: usize,
        name: StoredName,
        buf: &'b mut [u8],
    ) -> Result<&'b [u8], Error<D::Error>> {
        let layer = layer_at(&mut self.layers, depth)?;
        let dst = buf
            .get_mut(..name.len as usize)
            .ok_or(Error::BufferTooSmall {
                what: "name buffer",
                need: name.len.into(),
                have: 0,
            })?;
        read_bytes(&mut layer.dev, self.bounce.as_mut(), name.offset, dst)?;
        Ok(dst)
    }

    /// The walk over the persistent bitmap directory of the qcow2 image at `depth`, when it has bitmaps
    /// (the bitmaps extension with its autoclear bit set; the directory was validated when it was opened).
    /// Read its entries with [`Image::read_bitmap_entry`].
    pub fn bitmap_directory(&self, depth: usize) -> Option<DirectoryWalk> {
        let meta = self.layers.get(depth)?.meta?;
        let ext = meta.bitmaps.filter(|_| {
            meta.header
                .autoclear_features
                .contains(AutoclearFeatures::BITMAPS)
        })?;
        Some(DirectoryWalk::new(
            &ext,
            meta.header.cluster_size(),
            meta.header.size,
        ))
    }

    /// The next entry of `walk` (from [`Image::bitmap_directory`]) and where its name is (read it with
    /// [`Image::read_stored_name`]); `None` after the last one.
    pub fn read_bitmap_entry(
        &mut self,
        depth: usize,
        walk: &mut DirectoryWalk,
    ) -> Result<Option<(BitmapDirEntry, StoredName)>, Error<D::Error>> {
        let Some(at) = walk.next_at() else {
            return Ok(None);
        };
        let layer = layer_at(&mut self.layers, depth)?;
        let mut raw = [0u8; DIR_ENTRY_LEN];
        read_bytes(&mut layer.dev, self.bounce.as_mut(), at, &mut raw)?;
        let found = walk
            .advance(&raw)
            .map_err(|(problem, value)| Error::InvalidHeader {
                field: "bitmap directory entry",
                value,
                problem,
            })?;
        let name = StoredName {
            offset: at
                .saturating_add(DIR_ENTRY_LEN as u64)
                .saturating_add(found.entry.extra_data_size.into()),
            len: found.entry.name_size.into(),
        };
        Ok(Some((found.entry, name)))
    }

    /// Asks the device of the image at `depth` (or its external data file) whether a host range holds data.
    pub fn host_status(
        &mut self,
        depth: usize,
        external: bool,
        host: u64,
        len: u64,
    ) -> Result<crate::device::DeviceExtent, Error<D::Error>> {
        let layer = layer_at(&mut self.layers, depth)?;
        let dev = if external {
            layer.data.as_mut().unwrap_or(&mut layer.dev)
        } else {
            &mut layer.dev
        };
        Ok(dev.block_status(host, len)?)
    }

    /// Reads the internal snapshot table entry at host offset `at` of the qcow2 image at `depth` (the first
    /// is at the header's `snapshots_offset`). Returns the entry and the offset of the next one. The id and
    /// name stay on disk: read them with [`Image::read_stored_name`].
    pub fn read_snapshot(
        &mut self,
        depth: usize,
        at: u64,
    ) -> Result<(SnapshotEntry, u64), Error<D::Error>> {
        let Image { layers, bounce, .. } = self;
        let layer = layer_at(layers, depth)?;
        let meta = layer.meta.ok_or(Error::Unsupported {
            what: "snapshots of a raw image",
            value: 0,
        })?;
        let h = meta.header;
        let mut fixed = [0u8; SNAPSHOT_FIXED_LEN];
        read_bytes(&mut layer.dev, bounce.as_mut(), at, &mut fixed)?;
        let layout = SnapshotEntryLayout::parse(&fixed);
        let (id_len, name_len, extra_len) = (layout.id_len, layout.name_len, layout.extra_len);
        let next = layout
            .next_entry(at, h.snapshots_offset)
            .map_err(|what| corrupt(what, at))?;
        let mut extra = [0u8; 24];
        let extra_read = (extra_len as usize).min(extra.len());
        let extra_at = at.saturating_add(40);
        read_bytes(
            &mut layer.dev,
            bounce.as_mut(),
            extra_at,
            extra.get_mut(..extra_read).unwrap_or(&mut []),
        )?;
        let (id_at, name_at) = (layout.id_at(at), layout.name_at(at));
        let entry = SnapshotEntry {
            l1_table_offset: layout.l1_table_offset,
            l1_size: layout.l1_size,
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64(&fixed, 24),
            vm_state_size: if extra_len >= 8 {
                be64(&extra, 0)
            } else {
                u64::from(be32(&fixed, 32))
            },
            disk_size: (extra_len >= 16).then(|| be64(&extra, 8)),
            icount: (extra_len >= 24)
                .then(|| be64(&extra, 16))
                .filter(|&i| i != u64::MAX),
            id: StoredName {
                offset: id_at,
                len: id_len,
            },
            name: StoredName {
                offset: name_at,
                len: name_len,
            },
        };
        Ok((entry, next))
    }

    /// The host offset of the table entry of the opened image's internal snapshot whose id (with `by_id`)
    /// or name (with `by_name`) is `key`: every id is looked at first, then every name, as QEMU looks a
    /// snapshot up (`qemu-img snapshot -a` by id or name, `-d` by name). `None` when none matches.
    pub fn find_snapshot(
        &mut self,
        key: &[u8],
        by_id: bool,
        by_name: bool,
    ) -> Result<Option<u64>, Error<D::Error>> {
        let Some(h) = self.layers.first().and_then(|l| l.meta).map(|m| m.header) else {
            return Ok(None);
        };
        for (ids, wanted) in [(true, by_id), (false, by_name)] {
            if !wanted {
                continue;
            }
            let mut at = h.snapshots_offset;
            for _ in 0..h.nb_snapshots {
                let (entry, next) = self.read_snapshot(0, at)?;
                if self.stored_name_is(if ids { entry.id } else { entry.name }, key)? {
                    return Ok(Some(at));
                }
                at = next;
            }
        }
        Ok(None)
    }

    /// Whether the string `name` of the opened image is `key` (compared a few bytes at a time).
    pub(crate) fn stored_name_is(
        &mut self,
        name: StoredName,
        key: &[u8],
    ) -> Result<bool, Error<D::Error>> {
        if name.len as usize != key.len() {
            return Ok(false);
        }
        let Image { layers, bounce, .. } = self;
        let layer = layer_at(layers, 0)?;
        let mut chunk = [0u8; 32];
        let mut at = name.offset;
        for part in key.chunks(chunk.len()) {
            let got = chunk.get_mut(..part.len()).unwrap_or(&mut []);
            read_bytes(&mut layer.dev, bounce.as_mut(), at, got)?;
            if got != part {
                return Ok(false);
            }
            at = at.saturating_add(part.len() as u64);
        }
        Ok(true)
    }

    /// The refcount of host cluster `cluster` of the qcow2 image at `depth` (0 where no refcount block covers
    /// it).
    pub fn refcount(&mut self, depth: usize, cluster: u64) -> Result<u64, Error<D::Error>> {
        let Image {
            layers,
            bounce,
            cache,
            ..
        } = self;
        let layer = layer_at(layers, depth)?;
        let meta = layer.meta.ok_or(Error::Unsupported {
            what: "refcounts of a raw image",
            value: 0,
        })?;
        TableAccess {
            layout: TableLayout::of(&meta.header, cache.slot_size()),
            dev: &mut layer.dev,
            cache,
            bounce: bounce.as_mut(),
            layer: depth as u8,
        }
        .refcount(cluster)
    }
}

impl<D, B, C, const DEPTH: usize, const SLICES: usize, W> Image<D, B, C, DEPTH, SLICES, W>
where
    D: BlockDevice,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
    W: SnapshotView,
{
    /// From now on, reads the opened image as its internal snapshot `entry` (from [`Image::read_snapshot`])
    /// holds it: the snapshot's L1 table takes the active one's place, as `qemu-img convert -l` does. The
    /// virtual size stays the active one's (what lies past the snapshot's L1 table reads from the backing
    /// file, or as zeros). Only for an image that is not open for writing.
    pub fn view_snapshot(&mut self, entry: &SnapshotEntry) -> Result<(), Error<D::Error>> {
        if !self.w.read_only() {
            return Err(Error::Unsupported {
                what: "viewing a snapshot of an image open for writing",
                value: 0,
            });
        }
        let layer = layer_at(&mut self.layers, 0)?;
        let meta = layer.meta.as_mut().ok_or(Error::Unsupported {
            what: "snapshots of a raw image",
            value: 0,
        })?;
        crate::format::validate_snapshot_l1(
            entry.l1_table_offset,
            entry.l1_size,
            meta.header.cluster_size(),
        )
        .map_err(Error::from_format)?;
        meta.header.l1_table_offset = entry.l1_table_offset;
        meta.header.l1_size = entry.l1_size;
        self.cache.invalidate(Some(0));
        Ok(())
    }
}
