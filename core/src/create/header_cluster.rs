//! Cluster 0 as QEMU leaves it: where the header, its extensions (backing file format, external data file,
//! feature name table), the end marker and the backing file name go, and writing them, magic last.

use crate::Error;
use crate::device::BlockDeviceWrite;
use crate::format::{
    AutoclearFeatures, CompatibleFeatures, CompressionType, FEATURE_NAME_ENTRY_LEN, Header,
    IncompatibleFeatures, V2_HEADER_LEN, V3_HEADER_LEN, extension,
};

use super::options::CreateOptions;
use super::replay::{Builder, div, overflow};

/// The feature name table QEMU writes, in its order.
const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// Length of the data of the feature name table extension.
const FEATURE_TABLE_LEN: u64 = (FEATURE_NAMES.len() * FEATURE_NAME_ENTRY_LEN) as u64;

fn pad8(n: u64) -> u64 {
    n.div_ceil(8).saturating_mul(8)
}

impl CreateOptions<'_> {
    /// Where the pieces of cluster 0 go.
    pub(super) fn header_layout(&self, cluster_size: u64) -> HeaderLayout {
        let mut at = if self.v3() {
            V3_HEADER_LEN as u64
        } else {
            V2_HEADER_LEN as u64
        };
        let mut layout = HeaderLayout::default();
        if let (Some(_), Some(fmt)) = (self.backing_file, self.backing_fmt) {
            layout.backing_fmt = Some(at);
            at = at.saturating_add(8).saturating_add(pad8(fmt.len() as u64));
        }
        if let (true, Some(name)) = (self.v3(), self.data_file) {
            layout.data_file = Some(at);
            at = at.saturating_add(8).saturating_add(pad8(name.len() as u64));
        }
        if self.v3() && cluster_size > 4096 {
            layout.feature_table = Some(at);
            at = at.saturating_add(8).saturating_add(FEATURE_TABLE_LEN);
        }
        // End marker.
        at = at.saturating_add(8);
        if let Some(b) = self.backing_file {
            layout.backing_file = Some(at);
            at = at.saturating_add(b.len() as u64);
        }
        layout.end = at;
        layout
    }
}

/// Offsets in cluster 0.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct HeaderLayout {
    pub(super) backing_fmt: Option<u64>,
    pub(super) data_file: Option<u64>,
    pub(super) feature_table: Option<u64>,
    pub(super) backing_file: Option<u64>,
    pub(super) end: u64,
}

impl<D: BlockDeviceWrite> Builder<'_, '_, D> {
    pub(super) fn write_ext_header(
        &mut self,
        at: u64,
        magic: u32,
        len: u32,
    ) -> Result<(), Error<D::Error>> {
        let v = (u64::from(magic) << 32) | u64::from(len);
        self.write(at, &v.to_be_bytes())
    }

    /// One header extension (its padding is already zero).
    pub(super) fn write_ext(
        &mut self,
        at: u64,
        magic: u32,
        data: &[u8],
    ) -> Result<(), Error<D::Error>> {
        self.write_ext_header(at, magic, data.len() as u32)?;
        self.write(at.saturating_add(8), data)
    }

    /// Rewrites cluster 0: header, extensions, end marker, backing file name.
    pub(super) fn write_header(
        &mut self,
        opts: &CreateOptions<'_>,
        l1_offset: u64,
    ) -> Result<(), Error<D::Error>> {
        let g = self.g;
        let layout = opts.header_layout(g.cluster_size());
        let mut incompatible = IncompatibleFeatures::empty();
        if opts.data_file.is_some() {
            incompatible |= IncompatibleFeatures::EXTERNAL_DATA_FILE;
        }
        if opts.compression_type != CompressionType::Deflate {
            incompatible |= IncompatibleFeatures::COMPRESSION_TYPE;
        }
        if opts.extended_l2 {
            incompatible |= IncompatibleFeatures::EXTENDED_L2;
        }
        let mut compatible = CompatibleFeatures::empty();
        if opts.lazy_refcounts {
            compatible |= CompatibleFeatures::LAZY_REFCOUNTS;
        }
        let mut autoclear = AutoclearFeatures::empty();
        if opts.data_file_raw {
            autoclear |= AutoclearFeatures::DATA_FILE_RAW;
        }
        let header = Header {
            version: if opts.v3() { 3 } else { 2 },
            backing_file_offset: layout.backing_file.unwrap_or(0),
            backing_file_size: opts.backing_file.map_or(0, |b| b.len() as u32),
            cluster_bits: g.cluster_bits,
            size: g.size,
            crypt_method: 0,
            l1_size: g.l1_size as u32,
            l1_table_offset: if g.l1_size == 0 { 0 } else { l1_offset },
            refcount_table_offset: self.rt_offset,
            refcount_table_clusters: (div(self.rt_entries.saturating_mul(8), g.cluster_size()))
                as u32,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: incompatible,
            compatible_features: compatible,
            autoclear_features: autoclear,
            refcount_order: g.refcount_order,
            header_length: V3_HEADER_LEN as u32,
            compression_type: opts.compression_type,
        };
        let mut buf = [0u8; V3_HEADER_LEN];
        let n = header.emit(&mut buf).ok_or(overflow())?;
        // The magic goes last, after a flush: until it is durable the device is not a qcow2 image at all,
        // so a power loss during create never leaves a half-made image that looks valid.
        self.write(4, buf.get(4..n).ok_or(overflow())?)?;
        if let (Some(at), Some(fmt)) = (layout.backing_fmt, opts.backing_fmt) {
            self.write_ext(at, extension::BACKING_FORMAT, fmt.as_bytes())?;
        }
        if let (Some(at), Some(name)) = (layout.data_file, opts.data_file) {
            self.write_ext(at, extension::DATA_FILE, name.as_bytes())?;
        }
        if let Some(at) = layout.feature_table {
            self.write_ext_header(at, extension::FEATURE_NAME_TABLE, FEATURE_TABLE_LEN as u32)?;
            let mut entry_at = at.saturating_add(8);
            for (ty, bit, name) in FEATURE_NAMES {
                let mut e = [0u8; FEATURE_NAME_ENTRY_LEN];
                for (dst, src) in e.iter_mut().zip([ty, bit].iter().chain(name.as_bytes())) {
                    *dst = *src;
                }
                self.write(entry_at, &e)?;
                entry_at = entry_at.saturating_add(FEATURE_NAME_ENTRY_LEN as u64);
            }
        }
        if let (Some(at), Some(name)) = (layout.backing_file, opts.backing_file) {
            self.write(at, name.as_bytes())?;
        }
        self.dev.flush()?;
        self.write(0, buf.get(..4).ok_or(overflow())?)
    }
}
