//! What the check knows about the image: the header and the file's length ([`ImageFacts`], read by
//! [`load_image`] with the same header-extension and bitmap-directory validation as the engine's open), and
//! the snapshot table's entries (parsed by [`crate::format::SnapshotEntryLayout`]).

use super::*;

/// What the check needs to know about the image besides its header: the file's length and what the header's
/// tables add up to.
#[derive(Debug, Clone, Copy)]
pub(super) struct ImageFacts {
    pub(super) header: Header,
    pub(super) file_len: u64,
    /// Host clusters of the file (the last one may be partial).
    pub(super) file_clusters: u64,
    /// Bytes of the snapshot table (the sum of its entries).
    pub(super) snapshot_table_len: u64,
    /// The bitmaps extension, when the image has bitmaps.
    pub(super) bitmaps: Option<BitmapsExtension>,
    /// The LUKS area of an encrypted image (host offset, length), from its encryption extension.
    pub(super) encryption: Option<(u64, u64)>,
}

pub(super) fn load_image<A: Access>(
    io: &mut A,
    bounce: &mut [u8],
) -> Result<ImageFacts, Error<A::E>> {
    let file_len = io.size()?;
    let mut first = [0u8; HEADER_READ_LEN];
    let n = usize::try_from(file_len)
        .unwrap_or(usize::MAX)
        .min(HEADER_READ_LEN);
    let head = first.get_mut(..n).unwrap_or(&mut []);
    io.read(bounce, 0, head)?;
    let h = Header::parse(head).map_err(Error::from_format)?;
    let unknown = h.unknown_incompatible();
    if unknown != 0 {
        return Err(Error::UnknownIncompatibleFeature {
            bit: unknown.trailing_zeros() as u8,
            name: crate::format::FeatureName::EMPTY,
        });
    }
    let mut image = ImageFacts {
        header: h,
        file_len,
        file_clusters: ceil_div(file_len, h.cluster_size()),
        snapshot_table_len: 0,
        bitmaps: None,
        encryption: None,
    };
    // Snapshot table: its size is the sum of its entries.
    let mut at = h.snapshots_offset;
    for _ in 0..h.nb_snapshots {
        let (next, _) = read_snapshot(io, bounce, &image, at)?;
        at = next;
    }
    image.snapshot_table_len = at.saturating_sub(h.snapshots_offset);
    // Header extensions: the same walk and the same validation as the engine's open, so that the check sees
    // the bitmaps that the image holds (and refuses what QEMU's open refuses).
    let mut walk = ExtensionWalk::new(&h);
    while let Some(off) = walk.next_at() {
        let mut raw = [0u8; 8];
        io.read(bounce, off, &mut raw)?;
        let Some(ext) = walk.advance(raw).map_err(Error::from_format)? else {
            break;
        };
        if ext.magic == extension::ENCRYPTION && ext.len == 16 {
            // Its clusters are referenced as metadata (QEMU's check counts them too).
            let mut b = [0u8; 16];
            io.read(bounce, ext.data_at, &mut b)?;
            image.encryption = Some(crate::format::luks::parse_encryption_extension(&b));
            continue;
        }
        if ext.magic != extension::BITMAPS {
            continue;
        }
        if ext.len != BitmapsExtension::LEN {
            return Err(Error::InvalidHeader {
                field: "bitmaps extension length",
                value: ext.len.into(),
                problem: "must be 24",
            });
        }
        if !h.autoclear_features.contains(AutoclearFeatures::BITMAPS) {
            continue;
        }
        let mut b = [0u8; 24];
        io.read(bounce, ext.data_at, &mut b)?;
        let bitmaps = BitmapsExtension::parse(&b, h.cluster_size(), ext.header_at).map_err(
            |(problem, value)| Error::InvalidHeader {
                field: "bitmaps extension",
                value,
                problem,
            },
        )?;
        let mut dir = DirectoryWalk::new(&bitmaps, h.cluster_size(), h.size);
        let invalid = |(problem, value)| Error::InvalidHeader {
            field: "bitmap directory entry",
            value,
            problem,
        };
        while let Some(at) = dir.next_at() {
            let mut raw = [0u8; DIR_ENTRY_LEN];
            io.read(bounce, at, &mut raw)?;
            dir.advance(&raw).map_err(invalid)?;
        }
        dir.finish().map_err(invalid)?;
        image.bitmaps = Some(bitmaps);
    }
    Ok(image)
}

/// A snapshot table entry and where its id and name are.
#[derive(Clone, Copy)]
pub(super) struct SnapshotTableEntry {
    pub(super) entry: SnapshotEntryLayout,
    pub(super) id_at: u64,
    pub(super) name_at: u64,
}

/// Reads the snapshot entry at `at`; returns the offset of the next one and the entry.
pub(super) fn read_snapshot<A: Access>(
    io: &mut A,
    bounce: &mut [u8],
    image: &ImageFacts,
    at: u64,
) -> Result<(u64, SnapshotTableEntry), Error<A::E>> {
    let mut fixed = [0u8; SNAPSHOT_FIXED_LEN];
    io.read(bounce, at, &mut fixed)?;
    let entry = SnapshotEntryLayout::parse(&fixed);
    let next = entry
        .next_entry(at, image.header.snapshots_offset)
        .map_err(|what| corrupt(what, at))?;
    Ok((
        next,
        SnapshotTableEntry {
            entry,
            id_at: entry.id_at(at),
            name_at: entry.name_at(at),
        },
    ))
}

pub(super) fn short_name<A: Access>(
    io: &mut A,
    bounce: &mut [u8],
    at: u64,
    len: u32,
) -> Result<ShortName, Error<A::E>> {
    let mut n = ShortName {
        bytes: [0; SNAPSHOT_NAME_LEN],
        len: 0,
    };
    let l = (len as usize).min(SNAPSHOT_NAME_LEN);
    io.read(bounce, at, n.bytes.get_mut(..l).unwrap_or(&mut []))?;
    n.len = l as u8;
    Ok(n)
}
