//! qcow2 images (and their backing chains) through `qcow2-core`, as [`VirtualDisk`]s; the backing and data
//! files are found by [`crate::chain`]'s resolver.

use std::fs::File;
use std::io;
use std::path::Path;

use qcow2_alloc::HeapImage;
use qcow2_core::create::Preallocation;
use qcow2_core::engine::Format;
use qcow2_core::format::bitmap::{FLAG_AUTO, FLAG_IN_USE};
use qcow2_core::format::{
    AutoclearFeatures, CompatibleFeatures, CompressionType, IncompatibleFeatures,
};
use qcow2_core::write::NewSnapshot;
use qcow2_core::{Error, Source};

use crate::cache::CacheMode;
use crate::chain::ChainResolver;
pub use crate::chain::combine;
use crate::disk::{
    BitmapInfo, DiskError, ENOTSUP, EncryptInfo, ErrorKind, FileChildInfo, ImageInfo, MapExtent,
    ParallelWriter, Qcow2Specific, Reservation, Reserve, SnapshotInfo, ThreadCompressor,
    VirtualDisk, VirtualDiskWrite,
};
use crate::file::{FileDevice, OpenImageError, open_image_file};

mod bitmaps;
mod errors;
mod info;
mod resize;

use errors::secret_required;
pub use errors::{engine_error, engine_error_kind};

/// A qcow2 image with its chain, read through the engine.
pub struct Qcow2Disk {
    image: HeapImage<FileDevice>,
    /// Display name of each image of the chain.
    names: Vec<String>,
    /// Display name of each image's external data file.
    data_files: Vec<Option<String>>,
    /// Per image: whether it looks metadata-preallocated (computed on first use).
    prealloc: Vec<Option<bool>>,
    /// Opened for writing (else every write fails).
    writable: bool,
    /// Compresses one cluster for compressed writes.
    compressor: Box<ClusterCompressor>,
    /// `compressor` is [`qcow2_alloc::compress_cluster`], which other threads may run too.
    default_compressor: bool,
}

/// A cluster compressor: one whole cluster in, its compressed form out (`None`: write it uncompressed).
pub type ClusterCompressor = dyn FnMut(CompressionType, &[u8]) -> Option<Vec<u8>> + Send;

impl std::fmt::Debug for Qcow2Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Disk")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl Qcow2Disk {
    /// Opens `path` (already known to be qcow2) and its chain, read-only.
    pub fn open(path: &str, file: File) -> Result<(Qcow2Disk, Vec<ImageInfo>), DiskError> {
        Qcow2Disk::open_read_only(path, file, false)
    }

    /// Opens `path` read-only without its backing chain, for what the image says about itself (as
    /// `qemu-img info` does): its unallocated clusters read as zeros, not as the backing file's data.
    pub fn open_alone(path: &str, file: File) -> Result<(Qcow2Disk, Vec<ImageInfo>), DiskError> {
        Qcow2Disk::open_read_only(path, file, true)
    }

    fn open_read_only(
        path: &str,
        file: File,
        skip_backing: bool,
    ) -> Result<(Qcow2Disk, Vec<ImageInfo>), DiskError> {
        let mut resolver = ChainResolver::for_top(path);
        resolver.skip_backing = skip_backing;
        let image = qcow2_alloc::open(FileDevice::new(file), Format::Qcow2, &mut resolver)
            .map_err(engine_error)?;
        // QEMU opens an encrypted image without its secret only to show what it says about itself.
        if !skip_backing && image.layers().iter().any(|l| l.locked()) {
            return Err(secret_required(&image));
        }
        Qcow2Disk::finish(image, resolver, false)
    }

    /// Opens `path` (already known to be qcow2) for writing: `file` must be open read-write; the backing
    /// chain is opened read-only.
    ///
    /// When the engine refuses to write this image ([`Error::ReadOnly`]) the image is opened read-only
    /// instead, so that it can still be read; every write then fails with the engine's message.
    pub fn open_writable(path: &str, file: File) -> Result<(Qcow2Disk, Vec<ImageInfo>), DiskError> {
        Qcow2Disk::open_writable_cache(path, file, CacheMode::WRITEBACK)
    }

    /// Like [`Qcow2Disk::open_writable`], with the flush behaviour of `cache` (only its `no_flush` matters
    /// here: the engine writes through or back as its caller flushes).
    pub fn open_writable_cache(
        path: &str,
        file: File,
        cache: CacheMode,
    ) -> Result<(Qcow2Disk, Vec<ImageInfo>), DiskError> {
        let mut resolver = ChainResolver::for_top(path);
        resolver.writable_top = true;
        resolver.no_flush = cache.no_flush;
        let dev = FileDevice::new(file).with_no_flush(cache.no_flush);
        match qcow2_alloc::open_writable(dev, &mut resolver) {
            Ok(image) if image.layers().iter().any(|l| l.locked()) => Err(secret_required(&image)),
            Ok(image) => Qcow2Disk::finish(image, resolver, true),
            Err(Error::Encryption(qcow2_core::format::luks::LuksError::Locked)) => {
                Err(DiskError::with_kind(
                    ErrorKind::InvalidArgument,
                    "Parameter 'encrypt.key-secret' is required for cipher",
                ))
            }
            Err(Error::ReadOnly) => {
                let file = open_image_file(path, false).map_err(|e| match &e {
                    OpenImageError::NotRegular => {
                        DiskError::with_kind(ErrorKind::InvalidArgument, e.text(path))
                    }
                    OpenImageError::Io(os) => {
                        DiskError::io(os, format!("Could not open '{path}': {}", e.text(path)))
                    }
                })?;
                Qcow2Disk::open(path, file)
            }
            Err(e) => Err(engine_error(e)),
        }
    }

    fn finish(
        image: HeapImage<FileDevice>,
        resolver: ChainResolver,
        writable: bool,
    ) -> Result<(Qcow2Disk, Vec<ImageInfo>), DiskError> {
        let mut data_files = vec![None; image.layers().len()];
        for (depth, name) in resolver.data_files {
            if let Some(slot) = data_files.get_mut(depth) {
                *slot = Some(name);
            }
        }
        let prealloc = vec![None; image.layers().len()];
        let mut disk = Qcow2Disk {
            image,
            names: resolver.names,
            data_files,
            prealloc,
            writable,
            compressor: Box::new(qcow2_alloc::compress_cluster),
            default_compressor: true,
        };
        let infos = disk.chain_info()?;
        Ok((disk, infos))
    }

    /// Replaces the cluster compressor used by compressed writes (the default is
    /// [`qcow2_alloc::compress_cluster`], deflate and zstd). It returns `None` for a cluster that does not
    /// compress into less than a cluster, which is then written uncompressed.
    pub fn set_compressor(&mut self, compressor: Box<ClusterCompressor>) {
        self.compressor = compressor;
        self.default_compressor = false;
    }

    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    fn stored_name(
        &mut self,
        depth: usize,
        name: Option<qcow2_core::engine::StoredName>,
    ) -> Result<Option<String>, DiskError> {
        let Some(name) = name else { return Ok(None) };
        let mut buf = vec![0u8; name.len as usize];
        let bytes = self
            .image
            .read_stored_name(depth, name, &mut buf)
            .map_err(engine_error)?;
        Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
    }

    /// QEMU's metadata-preallocation heuristic: more clusters have a refcount than the file has allocated
    /// (by a ninth, or two). Such images have allocated clusters that are holes in the file, and `qemu-img
    /// map` then asks the file whether their data reads as zeros.
    fn metadata_preallocated(&mut self, depth: usize) -> Result<bool, DiskError> {
        if let Some(Some(known)) = self.prealloc.get(depth) {
            return Ok(*known);
        }
        let Some(layer) = self.image.layers().get(depth) else {
            return Ok(false);
        };
        let Some(meta) = layer.qcow2() else {
            return Ok(false);
        };
        let cs = meta.header.cluster_size();
        let file_len = layer.file_size();
        let name = self.names.get(depth).cloned().unwrap_or_default();
        let allocated = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&name)
                .map(|m| m.blocks() * 512)
                .unwrap_or(file_len)
        };
        let real_clusters = allocated / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = file_len.div_ceil(cs);
        let mut count = 0u64;
        let mut cluster = 0u64;
        while cluster < end_cluster && count < threshold {
            if self.image.refcount(depth, cluster).map_err(engine_error)? != 0 {
                count += 1;
            }
            cluster += 1;
        }
        let known = count >= threshold;
        if let Some(slot) = self.prealloc.get_mut(depth) {
            *slot = Some(known);
        }
        Ok(known)
    }

    fn file_name(&self, depth: usize, external: bool) -> Option<String> {
        if external {
            self.data_files.get(depth).cloned().flatten()
        } else {
            self.names.get(depth).cloned()
        }
    }
}

impl VirtualDisk for Qcow2Disk {
    fn virtual_size(&self) -> u64 {
        self.image.virtual_size()
    }

    fn bitmap_dirty_runs(
        &mut self,
        name: &str,
        f: &mut crate::disk::DirtyRunSink<'_>,
    ) -> Result<(), DiskError> {
        self.dirty_runs(name, f)
    }

    fn load_snapshot(&mut self, id: Option<&str>, name: Option<&str>) -> Result<(), DiskError> {
        let h = self
            .image
            .layers()
            .first()
            .and_then(|l| l.qcow2())
            .map(|m| m.header)
            .ok_or_else(|| DiskError::new("no image"))?;
        let mut at = h.snapshots_offset;
        for _ in 0..h.nb_snapshots {
            let (entry, next) = self.image.read_snapshot(0, at).map_err(engine_error)?;
            let sid = self.stored_name(0, Some(entry.id))?.unwrap_or_default();
            let sname = self.stored_name(0, Some(entry.name))?.unwrap_or_default();
            if id.is_none_or(|i| i == sid) && name.is_none_or(|n| n == sname) {
                return self.image.view_snapshot(&entry).map_err(engine_error);
            }
            at = next;
        }
        Err(DiskError::with_kind(
            ErrorKind::NotFound,
            "Can't find snapshot",
        ))
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.image.read_at(offset, buf).map_err(engine_error)
    }

    fn map_extent(&mut self, offset: u64, max_len: u64) -> Result<MapExtent, DiskError> {
        let m = self
            .image
            .map_guest_range(offset, max_len)
            .map_err(engine_error)?;
        let depth = m.depth as u32;
        let mut e = MapExtent {
            start: offset,
            length: m.len,
            depth,
            present: true,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
            file: None,
        };
        match m.source {
            Source::Data { host, external } => {
                let raw = self
                    .image
                    .layers()
                    .get(m.depth)
                    .is_some_and(|l| l.format() == Format::Raw);
                e.data = true;
                e.offset = Some(host);
                e.file = self.file_name(m.depth, external);
                // QEMU does not show where encrypted data lives.
                if self
                    .image
                    .layers()
                    .get(m.depth)
                    .is_some_and(|l| l.encrypted())
                {
                    e.offset = None;
                    e.file = None;
                }
                if raw {
                    // A raw image's holes read as zeros; QEMU asks the file.
                    let st = self
                        .image
                        .host_status(m.depth, external, host, m.len)
                        .map_err(engine_error)?;
                    e.length = st.len.max(1);
                    e.data = st.data;
                    e.zero = !st.data;
                } else if self.metadata_preallocated(m.depth)? {
                    // QEMU asks the file whether preallocated data is a hole (it still reports data).
                    let st = self
                        .image
                        .host_status(m.depth, external, host, m.len)
                        .map_err(engine_error)?;
                    e.length = st.len.max(1);
                    e.zero = !st.data;
                }
            }
            Source::Zero { host, external } => {
                e.zero = true;
                e.offset = host;
                if host.is_some() {
                    e.file = self.file_name(m.depth, external);
                }
            }
            Source::Compressed { .. } => {
                e.data = true;
                e.compressed = true;
            }
            Source::PastEnd { host } => {
                // The image above reads zeros past its backing file's end; QEMU reports that at its depth,
                // with the offset of an allocated cluster whose subcluster is unallocated there.
                e.depth = depth.saturating_sub(1);
                e.present = false;
                e.zero = true;
                e.offset = host;
                if host.is_some() {
                    e.file = self.file_name(m.depth.saturating_sub(1), false);
                }
            }
            Source::Unallocated { host } => {
                e.present = false;
                e.zero = true;
                e.offset = host;
                if host.is_some() {
                    e.file = self.file_name(m.depth, false);
                }
            }
        }
        Ok(e)
    }
}

impl Qcow2Disk {
    fn check_writable(&self) -> Result<(), DiskError> {
        if self.writable {
            Ok(())
        } else {
            Err(engine_error(Error::ReadOnly))
        }
    }

    /// Cluster size and compression type of the top image.
    /// The top image's header.
    fn top_header(&self) -> Option<qcow2_core::format::Header> {
        Some(self.image.layers().first()?.qcow2()?.header)
    }

    fn top_format(&self) -> Option<(u64, CompressionType, bool)> {
        let h = &self.top_header()?;
        let data_file = h
            .incompatible_features
            .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE);
        Some((h.cluster_size(), h.compression_type, data_file))
    }
}

impl VirtualDiskWrite for Qcow2Disk {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        self.check_writable()?;
        self.image.write_at(offset, buf).map_err(engine_error)
    }

    fn parallel_writer(&self) -> Option<ParallelWriter> {
        if !self.writable {
            return None;
        }
        let file = self
            .image
            .layers()
            .first()?
            .device()
            .file()
            .try_clone()
            .ok()?;
        Some(ParallelWriter::new(file, u64::MAX))
    }

    fn reserve(&mut self, offset: u64, len: u64) -> Result<Reserve, DiskError> {
        self.check_writable()?;
        let cluster = self.top_format().map_or(512, |(c, _, _)| c);
        let to_boundary = (cluster - offset % cluster).min(len);
        if !offset.is_multiple_of(cluster) || len < cluster {
            return Ok(Reserve::WriteFirst(to_boundary));
        }
        let whole = len - len % cluster;
        Ok(
            match self
                .image
                .reserve_clusters(offset, whole)
                .map_err(engine_error)?
            {
                Some(r) => Reserve::Reserved(Reservation::Qcow2(r)),
                None => Reserve::WriteFirst(to_boundary),
            },
        )
    }

    fn commit(&mut self, r: Reservation) -> Result<(), DiskError> {
        match r {
            Reservation::Qcow2(r) => self.image.commit_reservation(r).map_err(engine_error),
            Reservation::Raw { .. } => Err(DiskError::with_kind(
                ErrorKind::InvalidArgument,
                "not a reservation of this image",
            )),
        }
    }

    fn cancel(&mut self, r: Reservation) {
        if let Reservation::Qcow2(r) = r {
            self.image.cancel_reservation(r);
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        self.check_writable()?;
        self.image
            .write_zeroes(offset, len, unmap)
            .map_err(engine_error)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check_writable()?;
        self.image.discard(offset, len).map_err(engine_error)
    }

    fn pass_discards(&mut self, on: bool) {
        self.image.pass_discards(on);
    }

    fn compressed_cluster_size(&self) -> Result<u64, DiskError> {
        match self.top_format() {
            // Compressed clusters cannot live in an external data file.
            Some((_, _, true)) | None => Err(DiskError::with_kind(ErrorKind::Unsupported, ENOTSUP)),
            Some((cluster, _, false)) => Ok(cluster),
        }
    }

    fn write_compressed(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.check_writable()?;
        let Some((cluster, ty, false)) = self.top_format() else {
            return Err(DiskError::with_kind(ErrorKind::Unsupported, ENOTSUP));
        };
        let cluster = usize::try_from(cluster)
            .map_err(|_| DiskError::with_kind(ErrorKind::Unsupported, ENOTSUP))?;
        if data.len() > cluster {
            return Err(DiskError::with_kind(
                ErrorKind::InvalidArgument,
                crate::disk::EINVAL,
            ));
        }
        let compressed = if data.len() == cluster {
            (self.compressor)(ty, data)
        } else {
            // The last cluster of the disk: the rest of it is zeros.
            let mut whole = vec![0u8; cluster];
            whole[..data.len()].copy_from_slice(data);
            (self.compressor)(ty, &whole)
        };
        let compressed = compressed.filter(|c| c.len() < cluster);
        self.write_precompressed(offset, data, compressed.as_deref())
    }

    fn thread_compressor(&self) -> Option<ThreadCompressor> {
        let (cluster, ty, false) = self.top_format()? else {
            return None;
        };
        Some(ThreadCompressor {
            compress: qcow2_alloc::compress_cluster,
            ty,
            cluster: usize::try_from(cluster).ok()?,
        })
        .filter(|_| self.default_compressor)
    }

    fn write_precompressed(
        &mut self,
        offset: u64,
        data: &[u8],
        compressed: Option<&[u8]>,
    ) -> Result<(), DiskError> {
        self.check_writable()?;
        match compressed {
            Some(c) => self.image.write_compressed(offset, c),
            None => self.image.write_at(offset, data),
        }
        .map_err(engine_error)
    }

    fn resize(&mut self, size: u64, prealloc: Preallocation) -> Result<(), DiskError> {
        self.resize_checked(size, prealloc)
    }

    fn create_snapshot(&mut self, name: &str, date: (u32, u32)) -> Result<(), DiskError> {
        self.check_writable()?;
        self.image
            .create_snapshot(&NewSnapshot {
                name: name.as_bytes(),
                date_sec: date.0,
                date_nsec: date.1,
                vm_clock_nsec: 0,
            })
            .map_err(|e| match e {
                // QEMU's word for a refcount past refcount_bits (its image then keeps the leaked counts;
                // this one is left as it was).
                Error::Unsupported { what, .. } if what.contains("refcount") => {
                    DiskError::with_kind(ErrorKind::Unsupported, "Invalid argument")
                }
                other => engine_error(other),
            })
    }

    fn apply_snapshot(&mut self, name: &str) -> Result<(), DiskError> {
        self.check_writable()?;
        let not_found = || {
            DiskError::with_kind(
                ErrorKind::NotFound,
                "Failed to load snapshot: No such file or directory",
            )
        };
        let entry = self
            .image
            .find_snapshot(name.as_bytes(), true, true)
            .map_err(engine_error)?
            .ok_or_else(not_found)?;
        self.image.apply_snapshot(entry).map_err(|e| match e {
            Error::Unsupported { what, .. } if what.contains("refcount") => DiskError::with_kind(
                ErrorKind::Unsupported,
                "Failed to load snapshot: Invalid argument",
            ),
            other => engine_error(other),
        })
    }

    fn set_lazy_refcounts(&mut self, on: bool) -> Result<(), DiskError> {
        self.check_writable()?;
        let v2 = self.top_header().is_some_and(|h| h.version < 3);
        if on && v2 {
            return Err(DiskError::with_kind(
                ErrorKind::Unsupported,
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 \
                 or greater)",
            ));
        }
        if v2 {
            return Ok(());
        }
        self.image.set_lazy_refcounts(on).map_err(engine_error)
    }

    fn set_compat(&mut self, version: u32) -> Result<(), DiskError> {
        self.check_writable()?;
        let current = self.top_header().map_or(3, |h| h.version);
        match (current, version) {
            (a, b) if a == b => Ok(()),
            (2, 3) => self.image.upgrade_to_v3().map_err(|e| match e {
                Error::NoSpace { .. } => DiskError::with_kind(
                    ErrorKind::NoSpace,
                    "Failed to update the image header: No space left on device",
                ),
                other => engine_error(other),
            }),
            (3, 2) => self.image.downgrade_to_v2().map_err(|e| {
                use qcow2_core::write::*;
                let refused = |m: String| DiskError::with_kind(ErrorKind::Unsupported, m);
                match e {
                    Error::Unsupported { what, value } => match what {
                        DOWNGRADE_REFCOUNT_BITS => {
                            refused("compat=0.10 requires refcount_bits=16".into())
                        }
                        DOWNGRADE_DATA_FILE => {
                            refused("Cannot downgrade an image with a data file".into())
                        }
                        DOWNGRADE_SNAPSHOTS => {
                            refused("Internal snapshots prevent downgrade of image".into())
                        }
                        DOWNGRADE_FEATURES => refused(format!(
                            "Cannot downgrade an image with incompatible features {value:#x} set"
                        )),
                        DOWNGRADE_ZSTD => refused(
                            "Cannot downgrade an image with zstd compression type and existing \
                             compressed clusters"
                                .into(),
                        ),
                        _ => engine_error(Error::Unsupported { what, value }),
                    },
                    Error::NoSpace { .. } => DiskError::with_kind(
                        ErrorKind::NoSpace,
                        "Failed to update the image header: No space left on device",
                    ),
                    other => engine_error(other),
                }
            }),
            _ => Err(DiskError::with_kind(ErrorKind::Unsupported, ENOTSUP)),
        }
    }

    fn make_empty(&mut self) -> Result<(), DiskError> {
        self.check_writable()?;
        self.image.make_empty().map_err(engine_error)
    }

    fn set_refcount_bits(&mut self, bits: u64) -> Result<(), DiskError> {
        self.check_writable()?;
        // QEMU's largest refcount table (8 MiB) is the most the new one can need.
        let mut table = vec![0u8; qcow2_core::format::MAX_REFTABLE_BYTES as usize];
        let order = bits.trailing_zeros();
        match self.image.change_refcount_order(order, &mut table) {
            Err(Error::Unsupported { what, value })
                if what == qcow2_core::write::REFCOUNT_TOO_WIDE =>
            {
                let cluster_bits = self.top_header().map_or(16, |h| h.cluster_bits);
                let refcount = self.image.refcount(0, value >> cluster_bits).unwrap_or(0);
                Err(DiskError::new(format!(
                    "Cannot decrease refcount entry width to {bits} bits: Cluster at offset {value:#x} \
                     has a refcount of {refcount}"
                )))
            }
            other => other.map_err(engine_error),
        }
    }

    fn bitmap_support(&self) -> (&'static str, bool) {
        ("qcow2", self.top_header().is_some_and(|h| h.version >= 3))
    }

    fn bitmap_change(
        &mut self,
        name: &str,
        node: &str,
        change: crate::disk::BitmapChange<'_>,
    ) -> Result<(), DiskError> {
        self.change_bitmap(name, node, change)
    }

    fn set_backing_file(&mut self, backing: Option<(&str, Option<&str>)>) -> Result<(), DiskError> {
        self.check_writable()?;
        let backing = backing.map(|(name, format)| qcow2_core::write::BackingFile { name, format });
        self.image.set_backing_file(backing).map_err(engine_error)
    }

    fn set_data_file(&mut self, name: Option<Option<&str>>, raw: bool) -> Result<(), DiskError> {
        self.check_writable()?;
        let current = self
            .image
            .layers()
            .first()
            .and_then(|l| l.qcow2())
            .map(|m| {
                (
                    m.header.external_data_file(),
                    m.header
                        .autoclear_features
                        .contains(qcow2_core::format::AutoclearFeatures::DATA_FILE_RAW),
                )
            });
        let (has_data_file, is_raw) = current.unwrap_or((false, false));
        if name.is_some_and(|n| n.is_some()) && !has_data_file {
            return Err(DiskError::with_kind(
                ErrorKind::InvalidArgument,
                "data-file can only be set for images that use an external data file",
            ));
        }
        if raw && !is_raw {
            return Err(DiskError::with_kind(
                ErrorKind::InvalidArgument,
                "data-file-raw cannot be set on existing images",
            ));
        }
        if !has_data_file || (name.is_none() && raw == is_raw) {
            return Ok(());
        }
        self.image.set_data_file(name, raw).map_err(engine_error)
    }

    fn delete_snapshot(&mut self, name: &str) -> Result<(), DiskError> {
        self.check_writable()?;
        match self
            .image
            .find_snapshot(name.as_bytes(), false, true)
            .map_err(engine_error)?
        {
            Some(entry) => self.image.delete_snapshot(entry).map_err(engine_error),
            None => Err(DiskError::with_kind(
                ErrorKind::NotFound,
                "snapshot not found",
            )),
        }
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        if !self.writable {
            return Ok(());
        }
        self.image.flush().map_err(engine_error)
    }

    fn close(self: Box<Self>) -> Result<(), DiskError> {
        if !self.writable {
            return Ok(());
        }
        self.image.close().map(drop).map_err(engine_error)
    }
}
