//! Opening: the qcow2 header and its extensions read and validated (`open_qcow2`), format probing, and the
//! backing chain resolved image by image through the caller's [`Resolver`].

use super::*;
use crate::format::bitmap::{DIR_ENTRY_LEN, DirectoryWalk};
#[cfg(feature = "luks")]
use crate::format::luks::LuksError;

/// Reads the qcow2 header and extensions of `dev` and validates them.
pub(crate) fn open_qcow2<D: BlockDevice>(
    dev: &mut D,
    bounce: &mut [u8],
    file_size: u64,
) -> Result<Qcow2Meta, Error<D::Error>> {
    let mut first = [0u8; HEADER_READ_LEN];
    let n = usize::try_from(file_size)
        .unwrap_or(usize::MAX)
        .min(HEADER_READ_LEN);
    read_bytes(dev, bounce, 0, first.get_mut(..n).unwrap_or(&mut []))?;
    let header = Header::parse(first.get(..n).unwrap_or(&[])).map_err(Error::from_format)?;
    let mut meta = Qcow2Meta {
        header,
        l2: header.l2_format(),
        backing_name: (header.backing_file_offset != 0).then_some(StoredName {
            offset: header.backing_file_offset,
            len: header.backing_file_size,
        }),
        backing_format: None,
        data_file_name: None,
        feature_table: None,
        bitmaps: None,
        #[cfg(feature = "luks")]
        encryption: None,
    };
    // Header extensions: the one walk of the extension area (format::ExtensionWalk), as check sees them.
    {
        let mut walk = ExtensionWalk::new(&header);
        while let Some(off) = walk.next_at() {
            let mut raw = [0u8; 8];
            read_bytes(dev, bounce, off, &mut raw)?;
            let Some(ext) = walk.advance(raw).map_err(Error::from_format)? else {
                break;
            };
            let data = ext.data_at;
            match ext.magic {
                extension::BACKING_FORMAT => {
                    let len = ext.len as usize;
                    if len > MAX_BACKING_FORMAT_LEN {
                        return Err(Error::InvalidHeader {
                            field: "backing format extension length",
                            value: ext.len.into(),
                            problem: "backing format name is longer than 15 bytes",
                        });
                    }
                    let mut name = [0u8; MAX_BACKING_FORMAT_LEN];
                    read_bytes(dev, bounce, data, name.get_mut(..len).unwrap_or(&mut []))?;
                    meta.backing_format = Some((name, len as u8));
                }
                extension::FEATURE_NAME_TABLE => {
                    meta.feature_table = Some(StoredName {
                        offset: data,
                        len: ext.len,
                    });
                }
                extension::BITMAPS => {
                    if ext.len != BitmapsExtension::LEN {
                        return Err(Error::InvalidHeader {
                            field: "bitmaps extension length",
                            value: ext.len.into(),
                            problem: "must be 24",
                        });
                    }
                    // Without the autoclear bit the extension is stale: QEMU ignores it.
                    if header
                        .autoclear_features
                        .contains(AutoclearFeatures::BITMAPS)
                    {
                        let mut b = [0u8; 24];
                        read_bytes(dev, bounce, data, &mut b)?;
                        let ext = BitmapsExtension::parse(&b, header.cluster_size(), ext.header_at)
                            .map_err(|(problem, value)| Error::InvalidHeader {
                                field: "bitmaps extension",
                                value,
                                problem,
                            })?;
                        validate_bitmap_directory(dev, bounce, &header, &ext)?;
                        meta.bitmaps = Some(ext);
                    }
                }
                #[cfg(feature = "luks")]
                extension::ENCRYPTION => {
                    if header.crypt_method != 2 {
                        return Err(Error::Encryption(LuksError::BadExtension(
                            "CRYPTO header extension only expected with LUKS encryption method",
                        )));
                    }
                    if ext.len != 16 {
                        return Err(Error::Encryption(LuksError::BadExtension(
                            "CRYPTO header extension size is not 16 bytes",
                        )));
                    }
                    let mut b = [0u8; 16];
                    read_bytes(dev, bounce, data, &mut b)?;
                    let (offset, len) = crate::format::luks::parse_encryption_extension(&b);
                    if offset & header.cluster_size().wrapping_sub(1) != 0 {
                        return Err(Error::InvalidHeader {
                            field: "encryption header offset",
                            value: offset,
                            problem: "not a multiple of the cluster size",
                        });
                    }
                    meta.encryption = Some((offset, len));
                }
                extension::DATA_FILE => {
                    if ext.len as usize > MAX_DATA_FILE_NAME_LEN {
                        return Err(Error::InvalidHeader {
                            field: "data file extension length",
                            value: ext.len.into(),
                            problem: "external data file name is longer than 1023 bytes",
                        });
                    }
                    meta.data_file_name = Some(StoredName {
                        offset: data,
                        len: ext.len,
                    });
                }
                _ => {}
            }
        }
    }
    let unknown = header.unknown_incompatible();
    if unknown != 0 {
        let bit = unknown.trailing_zeros() as u8;
        let name = feature_name(dev, bounce, meta.feature_table, 0, bit)?;
        return Err(Error::UnknownIncompatibleFeature { bit, name });
    }
    if meta.l2.external_data && meta.backing_name.is_some() && meta.data_raw() {
        return Err(Error::InvalidHeader {
            field: "autoclear_features",
            value: header.autoclear_features.bits(),
            problem: "a raw external data file cannot have a backing file",
        });
    }
    Ok(meta)
}

/// An encrypted layer: its LUKS header read and checked (an invalid one refuses the image, as QEMU refuses
/// it), then unlocked with the passphrase the resolver has for it, if any.
#[cfg(any(feature = "luks", feature = "aes-legacy"))]
fn open_encryption<D: BlockDevice, R: Resolver<D>>(
    layer: &mut Layer<D>,
    bounce: &mut [u8],
    depth: usize,
    resolver: &mut R,
) -> Result<(), Error<D::Error>> {
    let Some(meta) = layer.meta.as_ref() else {
        return Ok(());
    };
    let _ = (&bounce, depth);
    match meta.header.crypt_method {
        #[cfg(feature = "luks")]
        2 => {
            let (area, len) = meta
                .encryption
                .ok_or(Error::Encryption(LuksError::BadExtension(
                    "LUKS encryption without its CRYPTO header extension",
                )))?;
            let mut raw = [0u8; crate::format::luks::LUKS_HEADER_LEN];
            if len < raw.len() as u64 {
                return Err(Error::Encryption(LuksError::OutsideArea));
            }
            read_bytes(&mut layer.dev, bounce, area, &mut raw)?;
            let h = crate::format::luks::LuksHeader::parse(&raw).map_err(Error::Encryption)?;
            if let Some(p) = resolver.passphrase(depth) {
                let key = crate::crypto::unlock(&mut layer.dev, bounce, area, len, &h, p)?;
                layer.key = Some(key);
            }
            Ok(())
        }
        #[cfg(feature = "aes-legacy")]
        1 => {
            if let Some(p) = resolver.passphrase(depth) {
                layer.key = Some(crate::crypto::DiskKey::legacy_aes(p));
            }
            Ok(())
        }
        m => Err(unsupported_encryption(m)),
    }
}

/// An encryption method this build does not have (or no valid image has).
#[cfg(any(feature = "luks", feature = "aes-legacy"))]
fn unsupported_encryption<E>(method: u32) -> Error<E> {
    match method {
        1 => Error::Unsupported {
            what: "AES-CBC encryption (crypt_method)",
            value: 1,
        },
        2 => Error::Unsupported {
            what: "LUKS encryption (crypt_method)",
            value: 2,
        },
        m => Error::InvalidHeader {
            field: "crypt_method",
            value: m.into(),
            problem: "unknown encryption method",
        },
    }
}

/// Reads the bitmap directory `ext` names and validates every entry as QEMU does when it opens the image
/// (`bitmap_list_load`): at most [`crate::format::bitmap::MAX_BITMAPS`] entries of a directory of at most
/// 64 MiB, each table within QEMU's size limits. The tables themselves are not read.
pub(super) fn validate_bitmap_directory<D: BlockDevice>(
    dev: &mut D,
    bounce: &mut [u8],
    header: &Header,
    ext: &BitmapsExtension,
) -> Result<(), Error<D::Error>> {
    let invalid = |(problem, value)| Error::InvalidHeader {
        field: "bitmap directory entry",
        value,
        problem,
    };
    let mut walk = DirectoryWalk::new(ext, header.cluster_size(), header.size);
    while let Some(at) = walk.next_at() {
        let mut raw = [0u8; DIR_ENTRY_LEN];
        read_bytes(dev, bounce, at, &mut raw)?;
        walk.advance(&raw).map_err(invalid)?;
    }
    walk.finish().map_err(invalid)
}

/// Looks a feature up in the feature name table.
pub(super) fn feature_name<D: BlockDevice>(
    dev: &mut D,
    bounce: &mut [u8],
    table: Option<StoredName>,
    ty: u8,
    bit: u8,
) -> Result<FeatureName, Error<D::Error>> {
    let Some(table) = table else {
        return Ok(FeatureName::EMPTY);
    };
    let entries = table.len as usize / FEATURE_NAME_ENTRY_LEN;
    for i in 0..entries {
        let mut e = [0u8; FEATURE_NAME_ENTRY_LEN];
        let at = table
            .offset
            .saturating_add((i.saturating_mul(FEATURE_NAME_ENTRY_LEN)) as u64);
        read_bytes(dev, bounce, at, &mut e)?;
        let (t, b, name) = FeatureName::parse_entry(&e);
        if t == ty && b == bit {
            return Ok(name);
        }
    }
    Ok(FeatureName::EMPTY)
}

/// Reads the file name `stored` from `dev` and asks `resolver` for that file (the backing file when
/// `backing`, else the external data file), with `request`'s depth and format.
///
/// Always inlined: with a resolver that refuses every file ([`NoFiles`]) the compiler then drops what
/// follows a backing file (about 0.7 KiB of thumbv7em code), and on the Cortex-M target the one frame of
/// the caller needs less stack than the two frames would.
#[inline(always)]
pub(super) fn open_named<D: BlockDevice, R: Resolver<D>>(
    dev: &mut D,
    bounce: &mut [u8],
    stored: StoredName,
    backing: bool,
    request: FileRequest<'_>,
    resolver: &mut R,
) -> Result<D, Error<D::Error>> {
    const _: () = assert!(MAX_BACKING_NAME_LEN <= NAME_BUF && MAX_DATA_FILE_NAME_LEN <= NAME_BUF);
    let mut buf = [0u8; NAME_BUF];
    let name = buf.get_mut(..stored.len as usize).unwrap_or(&mut []);
    read_bytes(dev, bounce, stored.offset, name)?;
    let request = FileRequest { name, ..request };
    if backing {
        resolver.backing_file(request)
    } else {
        resolver.data_file(request)
    }
}

/// Probes a backing file's format: qcow2 if it starts with qcow2's magic, raw otherwise.
pub(super) fn probe<D: BlockDevice>(
    dev: &mut D,
    bounce: &mut [u8],
) -> Result<Format, Error<D::Error>> {
    check_block_size(dev.block_size(), bounce.len())?;
    let mut magic = [0u8; 4];
    if dev.size()? >= 4 {
        read_bytes(dev, bounce, 0, &mut magic)?;
    }
    Ok(if u32::from_be_bytes(magic) == MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

impl<D, B, C, const DEPTH: usize, const SLICES: usize, W> Image<D, B, C, DEPTH, SLICES, W>
where
    D: BlockDevice,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
    W: Default,
{
    /// Opens the qcow2 image on `dev` and, through `resolver`, its backing chain and external data files.
    ///
    /// Validates the header, the extensions and every table's placement; refuses unknown incompatible
    /// features (naming them), encryption, and chains longer than `DEPTH`. A backing file whose format is not
    /// declared is probed (qcow2 magic, else raw); a probed qcow2 backing file that names a backing file or an
    /// external data file of its own is refused rather than followed.
    pub fn open<R: Resolver<D>>(
        dev: D,
        buffers: Buffers<B>,
        decompressor: C,
        resolver: &mut R,
    ) -> Result<Self, Error<D::Error>> {
        Self::open_as(dev, Format::Qcow2, buffers, decompressor, resolver)
    }

    /// Like [`Image::open`], for an image of the given format (a raw image has no metadata and no chain).
    pub fn open_as<R: Resolver<D>>(
        dev: D,
        format: Format,
        buffers: Buffers<B>,
        decompressor: C,
        resolver: &mut R,
    ) -> Result<Self, Error<D::Error>> {
        let Buffers {
            mut bounce,
            metadata,
        } = buffers;
        let cache = SliceCache::new(metadata)?;
        let mut layers = Vec::new();
        Self::open_chain(&mut layers, dev, format, bounce.as_mut(), resolver)?;
        Ok(Image {
            layers,
            bounce,
            cache,
            decompressor,
            w: W::default(),
        })
    }

    /// Opens the image on `dev` and its backing chain into `layers` (empty on entry), for [`Image::open_as`]
    /// and [`Image::open_writable`], which then build the image value once, where they return it. Each layer
    /// is appended to `layers` first and completed there, so no frame holds a copy of a layer either.
    pub(crate) fn open_chain<R: Resolver<D>>(
        layers: &mut Vec<Layer<D>, DEPTH>,
        dev: D,
        format: Format,
        bounce: &mut [u8],
        resolver: &mut R,
    ) -> Result<(), Error<D::Error>> {
        let (mut dev, mut format, mut probed) = (dev, format, false);
        loop {
            // One call site: the layer's code is there once.
            Self::open_layer(layers, dev, format, probed, bounce, resolver)?;
            let count = layers.len();
            let depth = count.saturating_sub(1);
            let Some(last) = layers.last_mut() else { break };
            let Some(meta) = last.meta.as_ref() else {
                break;
            };
            let Some(stored) = meta.backing_name else {
                break;
            };
            if resolver.skip_backing() {
                break;
            }
            if last.probed {
                return Err(Error::Unavailable {
                    what: PROBED_NAMES_BACKING,
                });
            }
            if count >= DEPTH {
                return Err(Error::ChainTooDeep { limit: DEPTH });
            }
            let declared = meta.backing_format;
            let declared = declared
                .as_ref()
                .map(|(b, l)| b.get(..usize::from(*l)).unwrap_or(&[]));
            let request = FileRequest {
                depth,
                name: &[],
                format: declared,
            };
            dev = open_named(&mut last.dev, bounce, stored, true, request, resolver)?;
            (format, probed) = match declared {
                Some(f) => (
                    Format::from_name(f).ok_or(Error::Unsupported {
                        what: "backing file format",
                        value: 0,
                    })?,
                    false,
                ),
                None => (probe(&mut dev, bounce)?, true),
            };
        }
        Ok(())
    }

    /// Opens the image on `dev` (at depth `layers.len()` of the chain) and appends it to `layers`.
    pub(super) fn open_layer<R: Resolver<D>>(
        layers: &mut Vec<Layer<D>, DEPTH>,
        mut dev: D,
        format: Format,
        probed: bool,
        bounce: &mut [u8],
        resolver: &mut R,
    ) -> Result<(), Error<D::Error>> {
        let depth = layers.len();
        check_block_size(dev.block_size(), bounce.len())?;
        let file_size = dev.size()?;
        // Appended first and completed in place (on an error the caller drops the whole chain).
        layers
            .push(Layer {
                dev,
                data: None,
                format,
                meta: None,
                // Like QEMU, a raw image's size is its length rounded up to a sector; the tail reads as
                // zeros. A qcow2 image's is set from its header below.
                size: file_size.checked_next_multiple_of(512).unwrap_or(file_size),
                file_size,
                probed,
                #[cfg(any(feature = "luks", feature = "aes-legacy"))]
                key: None,
            })
            .map_err(|_| Error::ChainTooDeep { limit: DEPTH })?;
        if format == Format::Raw {
            return Ok(());
        }
        let layer = layers
            .last_mut()
            .ok_or(Error::ChainTooDeep { limit: DEPTH })?;
        let meta = layer
            .meta
            .insert(open_qcow2(&mut layer.dev, bounce, file_size)?);
        layer.size = meta.header.size;
        #[cfg(any(feature = "luks", feature = "aes-legacy"))]
        if meta.header.crypt_method != 0 {
            open_encryption(layer, bounce, depth, resolver)?;
        }
        let Some(meta) = layer.meta.as_ref() else {
            return Ok(());
        };
        match meta.data_file_name {
            // The rule for a probed backing file's own backing name holds for every name it stores.
            Some(_) if meta.l2.external_data && probed => {
                return Err(Error::Unavailable {
                    what: PROBED_NAMES_DATA_FILE,
                });
            }
            Some(stored) if meta.l2.external_data => {
                let request = FileRequest {
                    depth,
                    name: &[],
                    format: None,
                };
                let mut d = open_named(&mut layer.dev, bounce, stored, false, request, resolver)?;
                check_block_size(d.block_size(), bounce.len())?;
                let _ = d.size()?;
                layer.data = Some(d);
            }
            None if meta.l2.external_data => {
                return Err(Error::Unavailable {
                    what: "the image needs an external data file but does not name one",
                });
            }
            _ => {}
        }
        Ok(())
    }
}
