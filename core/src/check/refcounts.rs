//! The refcounts on disk, read (and, when repairing, written) through a small slice cache and the same
//! typed table access as the engine ([`TableAccess`]); an unaligned refcount block is a problem the check
//! reports, not an error that stops it.

use super::*;
use crate::meta::{SliceCache, TableAccess, TableLayout};

/// Where a refcount lives: `Ok(None)` when no refcount block covers it, `Err(())` when its block offset is
/// unaligned, else the offset of its slice and its index there.
pub(super) type Located = Result<Option<(u64, usize)>, ()>;

/// Slices the reader caches: one of the refcount table, one of a refcount block.
const SLICES: usize = 2;

/// The on-disk refcounts, read through a two-slice cache (sequential lookups read each slice once).
pub(super) struct RefcountReader {
    cache: SliceCache<[u8; SLICES * PIECE], SLICES>,
    /// The refcount-table index of the last lookup.
    pub(super) table_index: u64,
    /// The refcount block it names (masked, maybe unaligned; 0 = none).
    pub(super) block: u64,
}

impl RefcountReader {
    pub(super) fn new<E>() -> Result<RefcountReader, Error<E>> {
        Ok(RefcountReader {
            cache: SliceCache::new([0; SLICES * PIECE])?,
            table_index: u64::MAX,
            block: 0,
        })
    }

    fn tables<'a, A: Access>(
        &'a mut self,
        io: &'a mut A,
        bounce: &'a mut [u8],
        image: &ImageFacts,
    ) -> TableAccess<'a, A::Device, [u8; SLICES * PIECE], SLICES> {
        TableAccess {
            layout: TableLayout::of(&image.header, self.cache.slot_size()),
            dev: io.device(),
            cache: &mut self.cache,
            bounce,
            layer: 0,
        }
    }

    /// Where the refcount of `cluster` lives: `Ok(None)` if no refcount block covers it (refcount 0),
    /// `Err(())` if its refcount block offset is unaligned; else (slice offset, index in the slice), with the
    /// slice in the cache.
    pub(super) fn locate<A: Access>(
        &mut self,
        io: &mut A,
        bounce: &mut [u8],
        image: &ImageFacts,
        cluster: u64,
    ) -> Result<Located, Error<A::E>> {
        let mut tables = self.tables(io, bounce, image);
        let layout = tables.layout;
        let (table_index, index) = layout.refcount_location(cluster);
        let Some(entry) = tables.refcount_table_entry(table_index)? else {
            return Ok(Ok(None));
        };
        let block = entry.0 & REFTABLE_OFFSET_MASK;
        let found = if block == 0 {
            Ok(None)
        } else if block & layout.cluster_size.wrapping_sub(1) != 0 {
            Err(())
        } else {
            let (slice, in_slice) = layout.refcount_position(block, index);
            tables.slice(slice)?;
            Ok(Some((slice, in_slice)))
        };
        self.table_index = table_index;
        self.block = block;
        Ok(found)
    }

    /// When no refcount block covers `cluster` (its refcount table entry is 0, or it is past the table): one
    /// past the last cluster that shares that fate with it (every refcount there reads as 0).
    pub(super) fn uncovered_until<A: Access>(
        &mut self,
        io: &mut A,
        bounce: &mut [u8],
        image: &ImageFacts,
        cluster: u64,
    ) -> Result<Option<u64>, Error<A::E>> {
        let (table_index, _) = refcount_location(cluster, image.header.refcount_block_bits());
        if table_index >= image.header.refcount_table_entries() {
            return Ok(Some(u64::MAX));
        }
        // locate() reads the table entry (and the block's slice, when there is a block).
        let _ = self.locate(io, bounce, image, cluster)?;
        Ok((self.block == 0).then(|| {
            table_index
                .saturating_add(1)
                .checked_shl(image.header.refcount_block_bits())
                .unwrap_or(u64::MAX)
        }))
    }

    /// The refcount of `cluster`, `None` if it cannot be read.
    pub(super) fn get<A: Access>(
        &mut self,
        io: &mut A,
        bounce: &mut [u8],
        image: &ImageFacts,
        cluster: u64,
    ) -> Result<Option<u64>, Error<A::E>> {
        match self.locate(io, bounce, image, cluster)? {
            Err(()) => Ok(None),
            Ok(None) => Ok(Some(0)),
            Ok(Some((slice, i))) => {
                let mut tables = self.tables(io, bounce, image);
                Ok(refcount_get(
                    tables.slice(slice)?,
                    image.header.refcount_order,
                    i,
                ))
            }
        }
    }

    /// Sets the refcount of `cluster` (which a refcount block covers), on the device and in the cache;
    /// `false` if it cannot.
    pub(super) fn set<A: Access>(
        &mut self,
        io: &mut A,
        bounce: &mut [u8],
        image: &ImageFacts,
        cluster: u64,
        value: u64,
    ) -> Result<bool, Error<A::E>> {
        let Ok(Some((slice, i))) = self.locate(io, bounce, image, cluster)? else {
            return Ok(false);
        };
        let mut piece = [0u8; PIECE];
        let len = self.cache.slot_size().min(PIECE);
        let piece = piece.get_mut(..len).unwrap_or(&mut []);
        let mut tables = self.tables(io, bounce, image);
        if crate::io::copy_exact(piece, tables.slice(slice)?).is_none()
            || refcount_set(piece, image.header.refcount_order, i, value).is_none()
        {
            return Ok(false);
        }
        io.write(bounce, slice, piece)?;
        self.cache.update(0, slice, piece);
        Ok(true)
    }
}
