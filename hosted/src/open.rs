//! Opening an image by name: format probing and the backing chain.

use std::fs::File;
use std::io::Read;

use crate::disk::{DiskError, FileChildInfo, ImageInfo, VirtualDisk};
use crate::raw_disk::RawDisk;

/// The first four bytes of every qcow2 image.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// An opened image: the disk to read through (the whole backing chain behind it) and `qemu-img info`'s view
/// of every image of the chain, the image itself first.
pub struct OpenedImage {
    /// Reads and maps the guest view.
    pub disk: Box<dyn VirtualDisk>,
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

/// Opens `path` read-only as `format` ("raw" or "qcow2"), or probes the format when `format` is `None` (qcow2 if
/// the file starts with the qcow2 magic, raw otherwise). The error is the reason alone, e.g. "Could not open
/// 'x': No such file or directory" or "Image is not in qcow2 format": qemu-img prefixes it with
/// "Could not open 'x': ", qemu-io with "can't open device x: ".
///
/// ENGINE HOOK: the qcow2 branch below is where `qcow2_disk` plugs in; it must return the disk for the whole
/// chain and one `ImageInfo` per image of the chain.
pub fn open_disk(path: &str, format: Option<&str>) -> Result<OpenedImage, DiskError> {
    let fail = DiskError::new;
    match format {
        None | Some("raw") | Some("qcow2") => {}
        Some(other) => return Err(fail(format!("Unknown driver '{other}'"))),
    }
    let md = std::fs::metadata(path).map_err(|e| {
        fail(format!(
            "Could not open '{path}': {}",
            DiskError::os_text(&e)
        ))
    })?;
    if !md.is_file() {
        return Err(fail(format!(
            "'file' driver requires '{path}' to be a regular file"
        )));
    }
    let mut file = File::open(path).map_err(|e| {
        fail(format!(
            "Could not open '{path}': {}",
            DiskError::os_text(&e)
        ))
    })?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match file.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(fail(DiskError::os_text(&e))),
        }
    }
    let is_qcow2 = got == 4 && magic == QCOW2_MAGIC;
    let format = format.unwrap_or(if is_qcow2 { "qcow2" } else { "raw" });
    match format {
        "qcow2" => {
            if !is_qcow2 {
                return Err(fail("Image is not in qcow2 format".to_string()));
            }
            let (disk, chain) = crate::qcow2_disk::Qcow2Disk::open(path, file)?;
            Ok(OpenedImage {
                disk: Box::new(disk),
                chain,
            })
        }
        _ => {
            let child = FileChildInfo::from_path(path, std::path::Path::new(path))
                .map_err(|e| fail(e.0))?;
            let disk = RawDisk::new(file, path)?;
            Ok(OpenedImage {
                disk: Box::new(disk),
                chain: vec![ImageInfo::raw(path, child)],
            })
        }
    }
}
