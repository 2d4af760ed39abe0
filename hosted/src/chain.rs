//! How the files of a qcow2 chain are found and opened: the resolver [`crate::qcow2_disk`] gives the engine.
//!
//! Backing and data file policy:
//! - A stored name is resolved against the directory of the image that stores it, as QEMU does; an absolute
//!   name is used as it is.
//! - Names that look like a protocol (`json:{...}`, `nbd://...`, anything with a `:` before the first `/`)
//!   are refused: the tool opens plain files only.
//! - Only regular files are opened ([`crate::file::open_image_file`]): a FIFO, directory, socket or device is
//!   refused at once, with QEMU's message.
//! - A backing file's format is the one the image declares (`backing_fmt`); without one it is probed (qcow2
//!   magic, else raw), and the engine refuses to follow the backing or data file name of a qcow2 file whose
//!   format was probed, so a guest-written header inside a raw disk can never point the tool at a host file.
//! - A file that appears twice in one chain is refused (a loop).

use std::fs::File;
use std::io;
use std::path::PathBuf;

use qcow2_core::Error;
use qcow2_core::engine::{FileRequest, Resolver};

use crate::file::{FileDevice, OpenImageError, open_image_file};

/// Where each image of a chain came from, as the resolver opened it.
#[derive(Debug, Default)]
pub(crate) struct ChainResolver {
    /// Display name of each image opened so far (the top image first), QEMU's "filename".
    pub(crate) names: Vec<String>,
    /// Canonical paths seen, for loop detection.
    pub(crate) seen: Vec<PathBuf>,
    /// Display names of external data files, by depth.
    pub(crate) data_files: Vec<(usize, String)>,
    /// The top image is opened for writing: its data file is opened read-write too.
    pub(crate) writable_top: bool,
    /// Flushes of the top image's data file do nothing (`cache=unsafe`).
    pub(crate) no_flush: bool,
    /// Open the top image alone, without its backing chain (`qemu-img info`).
    pub(crate) skip_backing: bool,
    /// The passphrase last handed to the engine (kept for the borrow the engine holds while it unlocks).
    passphrase: Option<Vec<u8>>,
}

/// Which images of a chain a passphrase is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// The file itself, wherever it is in a chain.
    File,
    /// The image at this depth of the chain under the file (`backing.encrypt.key-secret`: 1).
    Depth(usize),
    /// Every image of the chain under the file.
    Chain,
}

/// Passphrases of encrypted images: a command line's `--object secret` values given to the image files
/// that name them (`encrypt.key-secret`, `backing.encrypt.key-secret`), or a library caller's
/// ([`crate::OpenOptions::passphrase`]), reach the engine through the resolver when it opens those files.
#[allow(clippy::type_complexity)]
static KEYRING: std::sync::Mutex<Vec<(PathBuf, Scope, Vec<u8>)>> =
    std::sync::Mutex::new(Vec::new());

fn keyring_key(path: &str) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| PathBuf::from(path))
}

fn add(path: &str, scope: Scope, passphrase: &[u8]) {
    let key = keyring_key(path);
    if let Ok(mut ring) = KEYRING.lock() {
        ring.retain(|(p, s, _)| !(*p == key && *s == scope));
        ring.push((key, scope, passphrase.to_vec()));
    }
}

/// Gives the encrypted image file `path` the passphrase it is opened with from now on (in this process).
pub fn add_passphrase(path: &str, passphrase: &[u8]) {
    add(path, Scope::File, passphrase);
}

/// Gives the encrypted image at `depth` of the chain under `path` the passphrase it is opened with.
pub fn add_backing_passphrase(path: &str, depth: usize, passphrase: &[u8]) {
    add(path, Scope::Depth(depth), passphrase);
}

/// Gives every encrypted image of the chain under `path` the passphrase they are opened with.
pub fn add_chain_passphrase(path: &str, passphrase: &[u8]) {
    add(path, Scope::Chain, passphrase);
}

/// The passphrase of the image at `depth` of the chain whose images are `names` (the top first): given to
/// that depth under the top image, to the file itself, or to the whole chain, in that order.
fn passphrase_for(names: &[String], depth: usize) -> Option<Vec<u8>> {
    let ring = KEYRING.lock().ok()?;
    let top = keyring_key(names.first()?);
    let file = keyring_key(names.get(depth)?);
    let find = |p: &PathBuf, s: Scope| {
        ring.iter()
            .find(|(kp, ks, _)| kp == p && *ks == s)
            .map(|(_, _, v)| v.clone())
    };
    (if depth > 0 {
        find(&top, Scope::Depth(depth))
    } else {
        None
    })
    .or_else(|| find(&file, Scope::File))
    .or_else(|| find(&top, Scope::Chain))
}

/// QEMU's `path_has_protocol`: a `:` before any `/`.
pub(crate) fn has_protocol(name: &str) -> bool {
    match name.find(':') {
        Some(colon) => !name[..colon].contains('/'),
        None => false,
    }
}

/// QEMU's `path_combine`: `name` relative to the directory of `base`.
pub fn combine(base: &str, name: &str) -> String {
    if name.starts_with('/') {
        return name.to_string();
    }
    match base.rfind('/') {
        Some(slash) => format!("{}{}", &base[..=slash], name),
        None => name.to_string(),
    }
}

/// A device error of `kind` with `msg` (the kind reaches the caller through [`engine_error`]).
fn io_err(kind: io::ErrorKind, msg: String) -> Error<io::Error> {
    Error::Io(io::Error::new(kind, msg))
}

impl ChainResolver {
    /// A resolver for the chain under the image `path`.
    pub(crate) fn for_top(path: &str) -> ChainResolver {
        let mut resolver = ChainResolver {
            names: vec![path.to_string()],
            ..ChainResolver::default()
        };
        if let Ok(c) = std::fs::canonicalize(path) {
            resolver.seen.push(c);
        }
        resolver
    }

    fn open_named(
        &mut self,
        depth: usize,
        raw_name: &[u8],
        what: &str,
        write: bool,
    ) -> Result<(File, String), Error<io::Error>> {
        let name = String::from_utf8_lossy(raw_name).into_owned();
        if name.is_empty() {
            return Err(io_err(
                io::ErrorKind::InvalidData,
                format!("Could not open {what}: the image stores an empty file name"),
            ));
        }
        if has_protocol(&name) {
            return Err(io_err(
                io::ErrorKind::Unsupported,
                format!(
                    "Could not open {what} '{name}': protocol names are not supported (only plain files are opened)"
                ),
            ));
        }
        let base = self.names.get(depth).cloned().unwrap_or_default();
        let full = combine(&base, &name);
        // QEMU's words: "Could not open backing file: 'file' driver requires 'x' to be a regular file",
        // "Could not open backing file: Could not open 'x': No such file or directory"; for a data file the
        // same without the "Could not open backing file: ".
        let prefix = if what == "backing file" {
            "Could not open backing file: "
        } else {
            ""
        };
        let file = open_image_file(&full, write).map_err(|e| match &e {
            OpenImageError::NotRegular => io_err(
                io::ErrorKind::InvalidInput,
                format!("{prefix}{}", e.text(&full)),
            ),
            OpenImageError::Io(os) => io_err(
                os.kind(),
                format!("{prefix}Could not open '{full}': {}", e.text(&full)),
            ),
        })?;
        let canon = std::fs::canonicalize(&full).unwrap_or_else(|_| PathBuf::from(&full));
        if self.seen.contains(&canon) {
            return Err(io_err(
                io::ErrorKind::InvalidData,
                format!("Could not open {what} '{full}': the backing chain loops"),
            ));
        }
        self.seen.push(canon);
        Ok((file, full))
    }
}

impl Resolver<FileDevice> for ChainResolver {
    fn backing_file(&mut self, request: FileRequest<'_>) -> Result<FileDevice, Error<io::Error>> {
        if let Some(fmt) = request.format
            && fmt != b"qcow2"
            && fmt != b"raw"
        {
            return Err(io_err(
                io::ErrorKind::Unsupported,
                format!(
                    "Could not open backing file: Unknown driver '{}'",
                    String::from_utf8_lossy(fmt)
                ),
            ));
        }
        let (file, full) = self.open_named(request.depth, request.name, "backing file", false)?;
        self.names.push(full);
        Ok(FileDevice::new(file))
    }

    fn skip_backing(&self) -> bool {
        self.skip_backing
    }

    fn passphrase(&mut self, depth: usize) -> Option<&[u8]> {
        self.passphrase = passphrase_for(&self.names, depth);
        self.passphrase.as_deref()
    }

    fn data_file(&mut self, request: FileRequest<'_>) -> Result<FileDevice, Error<io::Error>> {
        let write = self.writable_top && request.depth == 0;
        let (file, full) = self.open_named(request.depth, request.name, "data file", write)?;
        // The data file is not part of the chain: forget it for loop detection's sake only when distinct.
        self.data_files.push((request.depth, full));
        Ok(FileDevice::new(file).with_no_flush(write && self.no_flush))
    }
}
