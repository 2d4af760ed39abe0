//! `qemu-img info`'s view of the images of a chain (format-specific data, persistent bitmaps, internal
//! snapshots), read through the engine.

use super::*;

/// The LUKS header of the image file `name`, whose area the encryption extension places (the engine
/// checked it when it opened the image).
fn luks_header(
    name: &str,
    area: Option<(u64, u64)>,
) -> Option<qcow2_core::format::luks::LuksHeader> {
    use std::os::unix::fs::FileExt;
    let (offset, _) = area?;
    let mut raw = [0u8; qcow2_core::format::luks::LUKS_HEADER_LEN];
    File::open(name)
        .ok()?
        .read_exact_at(&mut raw, offset)
        .ok()?;
    qcow2_core::format::luks::LuksHeader::parse(&raw).ok()
}

impl Qcow2Disk {
    /// `qemu-img info`'s view of every image of the chain.
    pub(super) fn chain_info(&mut self) -> Result<Vec<ImageInfo>, DiskError> {
        let mut infos = Vec::new();
        for depth in 0..self.image.layers().len() {
            let name = self.names.get(depth).cloned().unwrap_or_default();
            let child = FileChildInfo::from_path(&name, Path::new(&name))?;
            let layer = &self.image.layers()[depth];
            let Some(meta) = layer.qcow2().copied() else {
                infos.push(ImageInfo::raw(&name, child));
                continue;
            };
            let h = meta.header;
            let mut spec = Qcow2Specific::new(
                h.version,
                u64::from(h.refcount_bits()),
                h.compression_type.name(),
            );
            if h.version >= 3 {
                spec.lazy_refcounts = Some(
                    h.compatible_features
                        .contains(CompatibleFeatures::LAZY_REFCOUNTS),
                );
                spec.corrupt = Some(
                    h.incompatible_features
                        .contains(IncompatibleFeatures::CORRUPT),
                );
                spec.extended_l2 = Some(h.extended_l2());
            }
            if let Some(data_name) = self.stored_name(depth, meta.data_file_name)? {
                spec.data_file = Some(data_name);
            }
            if h.incompatible_features
                .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE)
            {
                spec.data_file_raw = Some(
                    h.autoclear_features
                        .contains(AutoclearFeatures::DATA_FILE_RAW),
                );
            }
            spec.bitmaps = self.bitmaps(depth)?;
            spec.encrypt = match h.crypt_method {
                1 => Some(EncryptInfo::Aes),
                2 => luks_header(&name, meta.encryption).map(|h| EncryptInfo::Luks(Box::new(h))),
                _ => None,
            };
            let snapshots = self.snapshots(depth, &h)?;
            let backing = self.stored_name(depth, meta.backing_name)?;
            // A protocol name (`json:`, `nbd://`) stands as it is, as in QEMU.
            let full_backing = backing.as_ref().map(|b| {
                if crate::chain::has_protocol(b) {
                    b.clone()
                } else {
                    combine(&name, b)
                }
            });
            let backing_format = meta
                .backing_format()
                .map(|f| String::from_utf8_lossy(f).into_owned());
            infos.push(ImageInfo {
                filename: name,
                format: "qcow2".to_string(),
                virtual_size: h.size,
                actual_size: child.actual_size,
                dirty_flag: h
                    .incompatible_features
                    .contains(IncompatibleFeatures::DIRTY),
                cluster_size: Some(h.cluster_size()),
                encrypted: h.crypt_method != 0,
                backing_filename: backing,
                full_backing_filename: full_backing,
                backing_filename_format: backing_format,
                snapshots,
                qcow2: Some(spec),
                file: Some(child),
            });
        }
        Ok(infos)
    }

    /// The internal snapshots of the image at `depth`, as `qemu-img info` lists them.
    /// The persistent bitmaps of the image at `depth` as `qemu-img info` lists them (`None` when it has none).
    fn bitmaps(&mut self, depth: usize) -> Result<Option<Vec<BitmapInfo>>, DiskError> {
        let Some(mut walk) = self.image.bitmap_directory(depth) else {
            return Ok(None);
        };
        let mut list = Vec::new();
        while let Some((entry, name)) = self
            .image
            .read_bitmap_entry(depth, &mut walk)
            .map_err(engine_error)?
        {
            let mut flags = Vec::new();
            if entry.flags & FLAG_IN_USE != 0 {
                flags.push("in-use".to_string());
            }
            if entry.flags & FLAG_AUTO != 0 {
                flags.push("auto".to_string());
            }
            list.push(BitmapInfo {
                name: self.stored_name(depth, Some(name))?.unwrap_or_default(),
                granularity: 1u64 << entry.granularity_bits,
                flags,
            });
        }
        Ok((!list.is_empty()).then_some(list))
    }

    fn snapshots(
        &mut self,
        depth: usize,
        h: &qcow2_core::format::Header,
    ) -> Result<Vec<SnapshotInfo>, DiskError> {
        let mut list = Vec::new();
        let mut at = h.snapshots_offset;
        for _ in 0..h.nb_snapshots {
            let (entry, next) = self.image.read_snapshot(depth, at).map_err(engine_error)?;
            let id = self.stored_name(depth, Some(entry.id))?.unwrap_or_default();
            let name = self
                .stored_name(depth, Some(entry.name))?
                .unwrap_or_default();
            list.push(SnapshotInfo {
                id,
                name,
                vm_state_size: entry.vm_state_size,
                date_sec: entry.date_sec.into(),
                date_nsec: entry.date_nsec,
                vm_clock_nsec: entry.vm_clock_nsec,
                icount: entry.icount,
            });
            at = next;
        }
        Ok(list)
    }
}
