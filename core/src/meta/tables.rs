//! Typed access to one image's tables through the slice cache: L1 entries, L2 entries, refcount-table
//! entries and refcounts, each found in the cached slice that holds it.
//!
//! [`TableLayout`] says where the tables are and how big a slice is; its position methods are pure, so a
//! writer that changes an entry in place (through [`SliceCache::get_mut`]) finds it where every reader does.
//! [`TableAccess`] reads entries. What an entry means (offsets, flags, validation, refcount bit packing) is
//! [`crate::format`]'s; nothing here interprets a bit.

use crate::Error;
use crate::device::BlockDevice;
use crate::error::corrupt;
use crate::format::{
    Header, L1Entry, L2Entry, L2Format, RefcountTableEntry, be64, refcount_get, refcount_location,
    refcount_slice_position,
};

use super::SliceCache;

/// Where one image's L1 table and refcount table are, how its entries are laid out, and the slice length
/// the cache reads them in (a power of two, at most a cluster).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableLayout {
    /// Bytes per cluster.
    pub cluster_size: u64,
    /// How L2 entries are encoded (standard or extended, v2 or v3, external data).
    pub l2_format: L2Format,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Entries of the active L1 table.
    pub l1_size: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Entries of the refcount table (its clusters times entries per cluster).
    pub refcount_table_entries: u64,
    /// log2 of the refcount entries per refcount block.
    pub refcount_block_bits: u32,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Bytes of one cache slice.
    pub slice_size: u64,
}

impl TableLayout {
    /// The layout of the image with header `h`, read through a cache whose slots hold `slot` bytes.
    pub fn of(h: &Header, slot: usize) -> TableLayout {
        let cluster_size = h.cluster_size();
        TableLayout {
            cluster_size,
            l2_format: h.l2_format(),
            l1_table_offset: h.l1_table_offset,
            l1_size: u64::from(h.l1_size),
            refcount_table_offset: h.refcount_table_offset,
            refcount_table_entries: h.refcount_table_entries(),
            refcount_block_bits: h.refcount_block_bits(),
            refcount_order: h.refcount_order,
            slice_size: (slot as u64).min(cluster_size),
        }
    }

    /// Bytes of one L2 entry (8, or 16 with extended L2).
    pub fn l2_entry_size(&self) -> u64 {
        if self.l2_format.extended { 16 } else { 8 }
    }

    /// The slice holding byte `byte` of the table at host offset `table`: (host offset of the slice, offset
    /// of the byte inside it).
    pub fn slice_position(&self, table: u64, byte: u64) -> (u64, usize) {
        let start = byte & !self.slice_size.wrapping_sub(1);
        (
            table.saturating_add(start),
            byte.saturating_sub(start) as usize,
        )
    }

    /// Where L1 entry `index` lives: (slice, offset in it).
    pub fn l1_position(&self, index: u64) -> (u64, usize) {
        self.slice_position(self.l1_table_offset, index.saturating_mul(8))
    }

    /// Where entry `index` of the L2 table at `l2` lives: (slice, offset in it).
    pub fn l2_position(&self, l2: u64, index: u64) -> (u64, usize) {
        self.slice_position(l2, index.saturating_mul(self.l2_entry_size()))
    }

    /// Where refcount-table entry `index` lives: (slice, offset in it).
    pub fn refcount_table_position(&self, index: u64) -> (u64, usize) {
        self.slice_position(self.refcount_table_offset, index.saturating_mul(8))
    }

    /// Which refcount-table entry covers host cluster `cluster`, and the refcount's index in that block.
    pub fn refcount_location(&self, cluster: u64) -> (u64, u64) {
        refcount_location(cluster, self.refcount_block_bits)
    }

    /// Where refcount `index` of the refcount block at `block` lives: (slice, index of the refcount in it).
    pub fn refcount_position(&self, block: u64, index: u64) -> (u64, usize) {
        let (start, in_slice) =
            refcount_slice_position(index, self.refcount_order, self.slice_size);
        (block.saturating_add(start), in_slice)
    }
}

/// The entry at byte `at` of a cached slice (`bitmap` read too for extended L2).
pub fn l2_entry_at(slice: &[u8], at: usize, extended: bool) -> L2Entry {
    L2Entry {
        word: be64(slice, at),
        bitmap: if extended {
            be64(slice, at.saturating_add(8))
        } else {
            0
        },
    }
}

/// Reads one image's table entries through the slice cache (a view borrowed for one lookup or walk).
#[derive(Debug)]
pub struct TableAccess<'a, D, B, const N: usize> {
    /// The image's device.
    pub dev: &'a mut D,
    /// The shared slice cache.
    pub cache: &'a mut SliceCache<B, N>,
    /// A bounce block for the device.
    pub bounce: &'a mut [u8],
    /// The image's place in the chain (its slices are tagged with it).
    pub layer: u8,
    /// Where its tables are.
    pub layout: TableLayout,
}

impl<D, B, const N: usize> TableAccess<'_, D, B, N>
where
    D: BlockDevice,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// The cached slice at host offset `host` (a slice position), read on a miss.
    pub fn slice(&mut self, host: u64) -> Result<&[u8], Error<D::Error>> {
        self.cache.get(
            self.dev,
            self.bounce,
            self.layer,
            host,
            self.layout.slice_size as usize,
        )
    }

    fn word(&mut self, (host, at): (u64, usize)) -> Result<u64, Error<D::Error>> {
        Ok(be64(self.slice(host)?, at))
    }

    /// L1 entry `index`, `None` past the end of the L1 table.
    pub fn l1_entry(&mut self, index: u64) -> Result<Option<L1Entry>, Error<D::Error>> {
        if index >= self.layout.l1_size {
            return Ok(None);
        }
        let position = self.layout.l1_position(index);
        Ok(Some(L1Entry(self.word(position)?)))
    }

    /// Entry `index` of the L2 table at `l2`.
    pub fn l2_entry(&mut self, l2: u64, index: u64) -> Result<L2Entry, Error<D::Error>> {
        let (host, at) = self.layout.l2_position(l2, index);
        let extended = self.layout.l2_format.extended;
        Ok(l2_entry_at(self.slice(host)?, at, extended))
    }

    /// Refcount-table entry `index`, `None` past the end of the refcount table.
    pub fn refcount_table_entry(
        &mut self,
        index: u64,
    ) -> Result<Option<RefcountTableEntry>, Error<D::Error>> {
        if index >= self.layout.refcount_table_entries {
            return Ok(None);
        }
        let position = self.layout.refcount_table_position(index);
        Ok(Some(RefcountTableEntry(self.word(position)?)))
    }

    /// The refcount block that refcount-table entry `index` names (`None`: no block, every refcount it
    /// would hold is 0). An invalid entry is corruption.
    pub fn refcount_block(&mut self, index: u64) -> Result<Option<u64>, Error<D::Error>> {
        let Some(entry) = self.refcount_table_entry(index)? else {
            return Ok(None);
        };
        entry.block_offset(self.layout.cluster_size).map_err(|e| {
            corrupt(
                e.describe("refcount table"),
                self.layout
                    .refcount_table_offset
                    .saturating_add(index.saturating_mul(8)),
            )
        })
    }

    /// Where host cluster `cluster`'s refcount lives: (slice, index in it), `None` when no refcount block
    /// covers it.
    pub fn refcount_position(
        &mut self,
        cluster: u64,
    ) -> Result<Option<(u64, usize)>, Error<D::Error>> {
        let (table_index, index) = self.layout.refcount_location(cluster);
        Ok(self
            .refcount_block(table_index)?
            .map(|block| self.layout.refcount_position(block, index)))
    }

    /// The refcount of host cluster `cluster` (0 where no refcount block covers it).
    pub fn refcount(&mut self, cluster: u64) -> Result<u64, Error<D::Error>> {
        let Some((host, index)) = self.refcount_position(cluster)? else {
            return Ok(0);
        };
        let order = self.layout.refcount_order;
        refcount_get(self.slice(host)?, order, index).ok_or(corrupt("refcount index", host))
    }
}
