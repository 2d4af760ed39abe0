//! Internal snapshot table entries: the fixed part of an entry and where the entry ends.
//!
//! An entry is a 40-byte fixed part, `extra_data_size` bytes of extra data, the unique id, the name, and
//! padding to a multiple of 8 bytes. The table holds `nb_snapshots` such entries back to back from the
//! header's `snapshots_offset`.

use super::{be32, be64};

/// Bytes of an entry's fixed part.
pub const SNAPSHOT_FIXED_LEN: usize = 40;
/// QEMU's limit on a snapshot table's size.
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 * 1024 * 1024;
/// QEMU's limit on a snapshot entry's extra data.
pub const MAX_SNAPSHOT_EXTRA: u32 = 1024;

/// The fixed part of a snapshot table entry, and the lengths of the variable parts after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SnapshotEntryLayout {
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Bytes of the unique id string.
    pub id_len: u32,
    /// Bytes of the name.
    pub name_len: u32,
    /// Bytes of extra data.
    pub extra_len: u32,
}

impl SnapshotEntryLayout {
    /// Parses an entry's fixed part.
    pub fn parse(fixed: &[u8; SNAPSHOT_FIXED_LEN]) -> SnapshotEntryLayout {
        let lens = be32(fixed, 12);
        SnapshotEntryLayout {
            l1_table_offset: be64(fixed, 0),
            l1_size: be32(fixed, 8),
            id_len: lens >> 16,
            name_len: lens & 0xffff,
            extra_len: be32(fixed, 36),
        }
    }

    /// Host offset of the unique id of the entry at host offset `at`.
    pub fn id_at(&self, at: u64) -> u64 {
        at.saturating_add(SNAPSHOT_FIXED_LEN as u64)
            .saturating_add(self.extra_len.into())
    }

    /// Host offset of the name of the entry at host offset `at`.
    pub fn name_at(&self, at: u64) -> u64 {
        self.id_at(at).saturating_add(self.id_len.into())
    }

    /// QEMU's limits on the entry at host offset `at` of the table at `table_offset`: the host offset of the
    /// next entry, or what is wrong (more than [`MAX_SNAPSHOT_EXTRA`] bytes of extra data, or a table larger
    /// than [`MAX_SNAPSHOT_TABLE_BYTES`]).
    pub fn next_entry(&self, at: u64, table_offset: u64) -> Result<u64, &'static str> {
        if self.extra_len > MAX_SNAPSHOT_EXTRA {
            return Err("snapshot table entry has more than 1024 bytes of extra data");
        }
        let next = at.saturating_add(self.entry_len());
        if next.saturating_sub(table_offset) > MAX_SNAPSHOT_TABLE_BYTES {
            return Err("snapshot table is larger than 64 MiB");
        }
        Ok(next)
    }

    /// Bytes of the whole entry, padding included.
    pub fn entry_len(&self) -> u64 {
        (SNAPSHOT_FIXED_LEN as u64)
            .saturating_add(self.extra_len.into())
            .saturating_add(self.id_len.into())
            .saturating_add(self.name_len.into())
            .checked_next_multiple_of(8)
            .unwrap_or(u64::MAX)
    }
}
