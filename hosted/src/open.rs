//! Opening an image by name: format probing and the backing chain.

use std::fs::File;
use std::io::Read;

use crate::cache::CacheMode;
use crate::disk::{DiskError, ErrorKind, FileChildInfo, ImageInfo, VirtualDisk, VirtualDiskWrite};
use crate::file::OpenImageError;
use crate::raw_disk::RawDisk;

/// The first four bytes of every qcow2 image.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// An opened image: the disk to read through (the whole backing chain behind it) and `qemu-img info`'s view
/// of every image of the chain, the image itself first.
pub struct OpenedImage {
    /// Reads and maps the guest view.
    pub disk: Box<dyn VirtualDisk + Send>,
    /// The chain, top image first; never empty.
    pub chain: Vec<ImageInfo>,
}

impl std::fmt::Debug for OpenedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedImage")
            .field("chain", &self.chain)
            .finish_non_exhaustive()
    }
}

/// An image opened for writing: the disk (its backing chain stays read-only) and `qemu-img info`'s view of
/// every image of the chain, the image itself first.
pub struct OpenedWritable {
    /// Reads, maps and writes the guest view.
    pub disk: Box<dyn VirtualDiskWrite + Send>,
    /// The chain, top image first; never empty.
    pub chain: Vec<ImageInfo>,
}

impl std::fmt::Debug for OpenedWritable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedWritable")
            .field("chain", &self.chain)
            .finish_non_exhaustive()
    }
}

/// Opens `path` (read-write if `write`) and settles its format: the one given, or qcow2 if the file starts
/// with the qcow2 magic and raw otherwise.
fn open_probed(
    path: &str,
    format: Option<&str>,
    write: bool,
) -> Result<(File, &'static str), DiskError> {
    match format {
        None | Some("raw") | Some("qcow2") => {}
        Some(other) => {
            return Err(DiskError::with_kind(
                ErrorKind::InvalidArgument,
                format!("Unknown driver '{other}'"),
            ));
        }
    }
    let mut file = crate::file::open_image_file(path, write).map_err(|e| match &e {
        OpenImageError::NotRegular => {
            DiskError::with_kind(ErrorKind::InvalidArgument, e.text(path))
        }
        OpenImageError::Io(io) => {
            DiskError::io(io, format!("Could not open '{path}': {}", e.text(path)))
        }
    })?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match file.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(DiskError::from(e)),
        }
    }
    let is_qcow2 = got == 4 && magic == QCOW2_MAGIC;
    match format {
        Some("qcow2") | None if is_qcow2 => Ok((file, "qcow2")),
        Some("qcow2") => Err(DiskError::with_kind(
            ErrorKind::InvalidImage,
            "Image is not in qcow2 format",
        )),
        _ => Ok((file, "raw")),
    }
}

fn raw_chain(path: &str) -> Result<Vec<ImageInfo>, DiskError> {
    let child = FileChildInfo::from_path(path, std::path::Path::new(path))?;
    Ok(vec![ImageInfo::raw(path, child)])
}

/// Opens `path` read-only as `format` ("raw" or "qcow2"), or probes the format when `format` is `None` (qcow2 if
/// the file starts with the qcow2 magic, raw otherwise). The error is the reason alone, e.g. "Could not open
/// 'x': No such file or directory" or "Image is not in qcow2 format": qemu-img prefixes it with
/// "Could not open 'x': ", qemu-io with "can't open device x: ".
pub fn open_disk(path: &str, format: Option<&str>) -> Result<OpenedImage, DiskError> {
    open_disk_as(path, format, false)
}

/// Like [`open_disk`], without the backing chain: what the image says about itself (`qemu-img info` opens
/// an image so). Its unallocated clusters read as zeros.
pub fn open_disk_alone(path: &str, format: Option<&str>) -> Result<OpenedImage, DiskError> {
    open_disk_as(path, format, true)
}

fn open_disk_as(path: &str, format: Option<&str>, alone: bool) -> Result<OpenedImage, DiskError> {
    let (file, format) = open_probed(path, format, false)?;
    if format == "qcow2" {
        let (disk, chain) = if alone {
            crate::qcow2_disk::Qcow2Disk::open_alone(path, file)?
        } else {
            crate::qcow2_disk::Qcow2Disk::open(path, file)?
        };
        return Ok(OpenedImage {
            disk: Box::new(disk),
            chain,
        });
    }
    let chain = raw_chain(path)?;
    Ok(OpenedImage {
        disk: Box::new(RawDisk::new(file, path)?),
        chain,
    })
}

/// Like [`open_disk`], for writing: the image file is opened read-write (its backing chain read-only).
///
/// A raw image whose format was probed (no `format` given) refuses writes that would make its first sector
/// look like another image format, as QEMU does.
pub fn open_disk_writable(path: &str, format: Option<&str>) -> Result<OpenedWritable, DiskError> {
    open_disk_writable_cache(path, format, CacheMode::WRITEBACK)
}

/// Like [`open_disk_writable`], with `cache`'s flush behaviour: with `unsafe` ([`CacheMode::no_flush`]) a
/// flush writes cached metadata back to the file but does not ask the host to make the file durable. Whether
/// writes are flushed one by one is the caller's business (it calls [`VirtualDiskWrite::flush`]).
///
/// [`VirtualDiskWrite::flush`]: crate::disk::VirtualDiskWrite::flush
pub fn open_disk_writable_cache(
    path: &str,
    format: Option<&str>,
    cache: CacheMode,
) -> Result<OpenedWritable, DiskError> {
    let probed = format.is_none();
    let (file, format) = open_probed(path, format, true)?;
    if format == "qcow2" {
        let (disk, chain) = crate::qcow2_disk::Qcow2Disk::open_writable_cache(path, file, cache)?;
        return Ok(OpenedWritable {
            disk: Box::new(disk),
            chain,
        });
    }
    let chain = raw_chain(path)?;
    let mut disk = RawDisk::new_writable(file, path)?;
    disk.set_probed(probed);
    disk.set_no_flush(cache.no_flush);
    Ok(OpenedWritable {
        disk: Box::new(disk),
        chain,
    })
}
