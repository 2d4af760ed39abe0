//! Cluster 0 as QEMU leaves it: where the header's fixed part, the extensions (backing file format, external
//! data file, feature name table), the end marker and the backing file name go, and writing them at the end
//! of [`create`](super::create), the magic last.

use crate::Error;
use crate::device::BlockDeviceWrite;
use crate::format::{
    ExtensionHeader, FEATURE_NAME_ENTRY_LEN, FEATURE_NAMES, FeatureName, V2_HEADER_LEN,
    V3_HEADER_LEN, extension,
};

use super::builder::{Builder, overflow};

/// Length of the data of the feature name table extension.
const FEATURE_TABLE_LEN: u64 = (FEATURE_NAMES.len() * FEATURE_NAME_ENTRY_LEN) as u64;

/// Offset after an extension at `at` with `len` bytes of data (padded to 8 bytes).
fn after_extension(at: u64, len: u64) -> u64 {
    at.saturating_add(8)
        .saturating_add(len.div_ceil(8).saturating_mul(8))
}

/// What cluster 0 holds besides the header's fixed part, and where each piece starts.
#[derive(Debug, Clone, Copy)]
pub(super) struct HeaderCluster<'a> {
    /// The backing file format extension and the format name.
    pub(super) backing_format: Option<(u64, &'a str)>,
    /// The external data file extension and the file name.
    pub(super) data_file: Option<(u64, &'a str)>,
    /// The feature name table extension.
    pub(super) feature_table: Option<u64>,
    /// The backing file name (after the end marker).
    pub(super) backing_file: Option<(u64, &'a str)>,
    /// Where the last piece ends.
    pub(super) end: u64,
}

impl<'a> HeaderCluster<'a> {
    /// QEMU's order: the fixed header, the backing format (with a backing file), the external data file
    /// (version 3), the feature name table (version 3 with clusters larger than 4 KiB), the end marker, the
    /// backing file name.
    pub(super) fn new(
        v3: bool,
        cluster_size: u64,
        backing_file: Option<&'a str>,
        backing_format: Option<&'a str>,
        data_file: Option<&'a str>,
    ) -> Self {
        let mut at = if v3 { V3_HEADER_LEN } else { V2_HEADER_LEN } as u64;
        let mut cluster = HeaderCluster {
            backing_format: None,
            data_file: None,
            feature_table: None,
            backing_file: None,
            end: 0,
        };
        if let (Some(_), Some(format)) = (backing_file, backing_format) {
            cluster.backing_format = Some((at, format));
            at = after_extension(at, format.len() as u64);
        }
        if let (true, Some(name)) = (v3, data_file) {
            cluster.data_file = Some((at, name));
            at = after_extension(at, name.len() as u64);
        }
        if v3 && cluster_size > 4096 {
            cluster.feature_table = Some(at);
            at = after_extension(at, FEATURE_TABLE_LEN);
        }
        // End marker.
        at = at.saturating_add(8);
        if let Some(name) = backing_file {
            cluster.backing_file = Some((at, name));
            at = at.saturating_add(name.len() as u64);
        }
        cluster.end = at;
        cluster
    }
}

impl<D: BlockDeviceWrite> Builder<'_, '_, D> {
    /// One header extension's type and length at `at`.
    fn write_extension_header(
        &mut self,
        at: u64,
        magic: u32,
        len: u64,
    ) -> Result<(), Error<D::Error>> {
        let len = u32::try_from(len).map_err(|_| overflow())?;
        self.write(at, &ExtensionHeader { magic, len }.emit())
    }

    /// One header extension with its data (its padding is already zero).
    fn write_extension(&mut self, at: u64, magic: u32, data: &[u8]) -> Result<(), Error<D::Error>> {
        self.write_extension_header(at, magic, data.len() as u64)?;
        self.write(at.saturating_add(8), data)
    }

    /// Rewrites cluster 0: the header as built, the extensions, end marker and backing file name of
    /// `cluster`. The magic goes last, after a flush: until it is durable the device is not a qcow2 image at
    /// all, so a power loss during create never leaves a half-made image that looks valid.
    pub(super) fn write_header_cluster(
        &mut self,
        cluster: &HeaderCluster<'_>,
    ) -> Result<(), Error<D::Error>> {
        let mut buf = [0u8; V3_HEADER_LEN];
        let n = self.header.emit(&mut buf).ok_or(overflow())?;
        self.write(4, buf.get(4..n).ok_or(overflow())?)?;
        if let Some((at, format)) = cluster.backing_format {
            self.write_extension(at, extension::BACKING_FORMAT, format.as_bytes())?;
        }
        if let Some((at, name)) = cluster.data_file {
            self.write_extension(at, extension::DATA_FILE, name.as_bytes())?;
        }
        if let Some(at) = cluster.feature_table {
            self.write_extension_header(at, extension::FEATURE_NAME_TABLE, FEATURE_TABLE_LEN)?;
            let mut entry_at = at.saturating_add(8);
            for (kind, bit, name) in FEATURE_NAMES {
                self.write(entry_at, &FeatureName::emit_entry(kind, bit, name))?;
                entry_at = entry_at.saturating_add(FEATURE_NAME_ENTRY_LEN as u64);
            }
        }
        if let Some((at, name)) = cluster.backing_file {
            self.write(at, name.as_bytes())?;
        }
        self.device.flush()?;
        self.write(0, buf.get(..4).ok_or(overflow())?)
    }
}
