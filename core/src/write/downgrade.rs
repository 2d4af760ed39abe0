//! The downgrade to version 2 (`qemu-img amend -o compat=0.10`), as QEMU's `qcow2_downgrade` does it:
//! refused for what version 2 cannot hold (another refcount width, an external data file, snapshots of
//! another size or with more than 4 GiB of vm state, incompatible features other than the compression
//! type, zstd-compressed clusters); zero clusters expanded in the active table and every snapshot's (dropped
//! when nothing shows through, written as zeros when a backing file would, their host clusters kept when they
//! have them); then the first cluster rewritten with the version 2 header and no feature bits.
//!
//! Each expansion keeps the guest's view (the active disk's and every snapshot's): the zeros reach the
//! host cluster before the entry loses its zero flag, and a host cluster that another table shares is
//! never overwritten (a fresh cluster takes the zeros, where QEMU overwrites the shared one). Until the
//! header is rewritten the image is a valid version 3 image.

use super::header::Cluster0Change;
use super::*;
use crate::format::{CompressionType, SNAPSHOT_FIXED_LEN};

impl<D, B, C, const DEPTH: usize, const SLICES: usize> Image<D, B, C, DEPTH, SLICES, WriteState>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// Makes a version 3 image a version 2 one (`compat=0.10`), as QEMU's amend does (see the module's
    /// documentation). What version 2 cannot hold is refused before anything changes, with
    /// [`Error::Unsupported`] naming it. A version 2 image is left alone.
    pub fn downgrade_to_v2(&mut self) -> Result<(), Error<D::Error>> {
        let h = *self.meta()?.header;
        if h.version < 3 {
            return Ok(());
        }
        if h.refcount_order != 4 {
            return Err(Error::Unsupported {
                what: DOWNGRADE_REFCOUNT_BITS,
                value: 1u64 << (h.refcount_order & 63),
            });
        }
        if h.external_data_file() {
            return Err(Error::Unsupported {
                what: DOWNGRADE_DATA_FILE,
                value: 0,
            });
        }
        self.meta()?.refuse_snapshots_for_v2()?;
        let others = h
            .incompatible_features
            .difference(IncompatibleFeatures::DIRTY | IncompatibleFeatures::COMPRESSION_TYPE);
        if !others.is_empty() {
            return Err(Error::Unsupported {
                what: DOWNGRADE_FEATURES,
                value: others.bits(),
            });
        }
        self.begin_write()?;
        // Version 2 has no autoclear bits to tell a stale bitmap by: the bitmaps go.
        self.meta()?.disown_bitmaps()?;
        self.finish()?;
        let mut m = self.meta()?;
        m.w.lazy = false;
        let zstd = h.compression_type != CompressionType::Deflate;
        let backed = h.backing_file_offset != 0;
        let active = (m.g.tables.l1_table_offset, m.g.tables.l1_size);
        if zstd && m.any_compressed(active)? {
            return Err(Error::Unsupported {
                what: DOWNGRADE_ZSTD,
                value: 1,
            });
        }
        m.expand_zero_clusters(active, backed)?;
        let mut at = m.header.snapshots_offset;
        for _ in 0..m.header.nb_snapshots {
            let s = m.entry_at(at)?;
            crate::format::validate_snapshot_l1(
                s.l1_table_offset,
                s.l1_size,
                m.g.tables.cluster_size,
            )
            .map_err(|_| corrupt("snapshot L1 table is invalid", at))?;
            m.expand_zero_clusters((s.l1_table_offset, s.l1_size.into()), backed)?;
            at = at.saturating_add(s.entry_len());
        }
        m.commit_frees()?;
        m.writeback_all()?;
        m.flush_dev()?;
        let mut new = *m.header;
        new.version = 2;
        new.incompatible_features = IncompatibleFeatures::empty();
        new.compatible_features = CompatibleFeatures::empty();
        new.autoclear_features = AutoclearFeatures::empty();
        new.compression_type = CompressionType::Deflate;
        m.rewrite_cluster0(&mut new, &Cluster0Change::default())?;
        self.reload_meta()
    }
}

/// [`Image::downgrade_to_v2`]'s refusals (what [`Error::Unsupported`] names).
pub const DOWNGRADE_REFCOUNT_BITS: &str = "version 2 images have 16-bit refcounts";
/// An external data file.
pub const DOWNGRADE_DATA_FILE: &str = "version 2 images have no external data file";
/// Snapshots of another disk size, or with more vm state than 32 bits count.
pub const DOWNGRADE_SNAPSHOTS: &str =
    "version 2 snapshot entries hold neither another disk size nor a vm state over 4 GiB";
/// Incompatible features (the value) other than the dirty bit and the compression type.
pub const DOWNGRADE_FEATURES: &str = "version 2 images have no incompatible features";
/// zstd-compressed clusters.
pub const DOWNGRADE_ZSTD: &str = "version 2 images have no zstd-compressed clusters";

impl<D, B, const SLICES: usize> Meta<'_, D, B, SLICES>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// Refuses snapshots whose disk size is not the image's or whose vm state size passes 32 bits.
    fn refuse_snapshots_for_v2(&mut self) -> Result<(), Error<D::Error>> {
        let size = self.header.size;
        let mut at = self.header.snapshots_offset;
        for _ in 0..self.header.nb_snapshots {
            let s = self.entry_at(at)?;
            let mut fixed = [0u8; SNAPSHOT_FIXED_LEN];
            read_bytes(self.dev, bounce_of(self.bounce, 0), at, &mut fixed)?;
            let mut extra = [0u8; 16];
            let known = (s.extra_len as usize).min(16);
            read_bytes(
                self.dev,
                bounce_of(self.bounce, 0),
                at.saturating_add(SNAPSHOT_FIXED_LEN as u64),
                extra.get_mut(..known).unwrap_or(&mut []),
            )?;
            let vm_state = if known >= 8 {
                be64(&extra, 0)
            } else {
                u64::from(crate::format::be32(&fixed, 32))
            };
            let disk = if known >= 16 { be64(&extra, 8) } else { size };
            if vm_state > u64::from(u32::MAX) || disk != size {
                return Err(Error::Unsupported {
                    what: DOWNGRADE_SNAPSHOTS,
                    value: at,
                });
            }
            at = at.saturating_add(s.entry_len());
        }
        Ok(())
    }

    /// Whether the L1 table `(offset, entries)` or a snapshot's maps a compressed cluster.
    fn any_compressed(&mut self, active: (u64, u64)) -> Result<bool, Error<D::Error>> {
        if self.l1_has_compressed(active)? {
            return Ok(true);
        }
        let mut at = self.header.snapshots_offset;
        for _ in 0..self.header.nb_snapshots {
            let s = self.entry_at(at)?;
            if self.l1_has_compressed((s.l1_table_offset, s.l1_size.into()))? {
                return Ok(true);
            }
            at = at.saturating_add(s.entry_len());
        }
        Ok(false)
    }

    fn l1_has_compressed(&mut self, (l1, entries): (u64, u64)) -> Result<bool, Error<D::Error>> {
        for i in 0..entries {
            let Some(l2) = self.l1_word(l1, i)?.1 else {
                continue;
            };
            for index in 0..self.g.l2_entries {
                if matches!(
                    self.classified_entry(l2, index)?.1,
                    ClusterKind::Compressed(_)
                ) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Expands the zero clusters the L1 table `(offset, entries)` maps (see the module's documentation).
    #[inline(never)]
    fn expand_zero_clusters(
        &mut self,
        (l1, entries): (u64, u64),
        backed: bool,
    ) -> Result<(), Error<D::Error>> {
        let g = self.g;
        let (bits, cs) = (g.cluster_bits, g.tables.cluster_size);
        for i in 0..entries {
            let Some(l2) = self.l1_word(l1, i)?.1 else {
                continue;
            };
            // Every L1 table that shares this L2 table reaches its clusters through it.
            let sharers = self.refcount(l2 >> bits)?.max(1);
            for index in 0..g.l2_entries {
                let (_, kind) = self.classified_entry(l2, index)?;
                let ClusterKind::Zero { host } = kind else {
                    continue;
                };
                let owned = match host {
                    Some(h) => self.refcount(h >> bits)? == sharers,
                    None => false,
                };
                let word = match host {
                    Some(h) if owned => {
                        self.guard(h, cs, false)?;
                        self.write_zeros(h, cs)?;
                        Some(h)
                    }
                    _ if backed => {
                        // Placed as QEMU places one cluster (a new refcount block after it).
                        let h = self.alloc_table_clusters(1)?;
                        for _ in 1..sharers {
                            self.change_refcount(h >> bits, true)?;
                        }
                        self.write_zeros(h, cs)?;
                        Some(h)
                    }
                    _ => None,
                };
                let word = word.map_or(0, |h| if sharers == 1 { h | OFLAG_COPIED } else { h });
                // The zeros are durable before the entry stops being a zero cluster: L2 slices are written
                // back after a flush that follows every data write.
                self.make_room(3)?;
                self.l2_set(l2, index, L2Entry { word, bitmap: 0 })?;
                if let (Some(h), false) = (host, owned) {
                    for _ in 0..sharers {
                        self.free_later(h)?;
                    }
                }
            }
        }
        Ok(())
    }
}
