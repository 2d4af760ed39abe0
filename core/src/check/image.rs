//! What the check knows about the image: the header's facts and the file's length ([`Geo`], read by [`load`]
//! with the same header-extension and bitmap-directory validation as the engine's open), and the snapshot
//! table's entries.

use super::*;

/// What the check needs to know about the image, from its header.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geo {
    pub(super) h: Header,
    pub(super) cs: u64,
    pub(super) cb: u32,
    pub(super) file_len: u64,
    /// Host clusters of the file (the last one may be partial).
    pub(super) nb_file: u64,
    pub(super) l2_entries: u64,
    /// Bytes per L2 entry.
    pub(super) es: u64,
    pub(super) extended: bool,
    pub(super) external: bool,
    pub(super) refcount_max: u64,
    pub(super) order: u32,
    /// log2 of the refcounts per refcount block.
    pub(super) block_bits: u32,
    pub(super) reftable_entries: u64,
    pub(super) snapshots_size: u64,
    /// Bitmaps extension: (number of bitmaps, directory size, directory offset).
    pub(super) bitmaps: Option<BitmapsExtension>,
}

pub(super) fn corrupt<E>(what: &'static str, offset: u64) -> Error<E> {
    Error::Corrupt { what, offset }
}

/// `x` rounded up to a multiple of 8.
pub(super) fn align8(x: u64) -> u64 {
    x.checked_next_multiple_of(8).unwrap_or(u64::MAX)
}

pub(super) fn load<A: Access>(io: &mut A, bounce: &mut [u8]) -> Result<Geo, Error<A::E>> {
    let file_len = io.size()?;
    let mut first = [0u8; HEADER_READ_LEN];
    let n = usize::try_from(file_len)
        .unwrap_or(usize::MAX)
        .min(HEADER_READ_LEN);
    let head = first.get_mut(..n).unwrap_or(&mut []);
    io.read(bounce, 0, head)?;
    let h = Header::parse::<A::E>(head)?;
    let unknown = h.unknown_incompatible();
    if unknown != 0 {
        return Err(Error::UnknownIncompatibleFeature {
            bit: unknown.trailing_zeros() as u8,
            name: crate::format::FeatureName::EMPTY,
        });
    }
    let cs = h.cluster_size();
    let cb = h.cluster_bits;
    let order = h.refcount_order;
    let refcount_max = if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)).saturating_sub(1)
    };
    let mut geo = Geo {
        h,
        cs,
        cb,
        file_len,
        nb_file: ceil_div(file_len, cs),
        l2_entries: h.l2_entries(),
        es: h.l2_entry_size(),
        extended: h.extended_l2(),
        external: h
            .incompatible_features
            .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE),
        refcount_max,
        order,
        block_bits: cb.saturating_add(3).saturating_sub(order),
        reftable_entries: u64::from(h.refcount_table_clusters) << cb.saturating_sub(3),
        snapshots_size: 0,
        bitmaps: None,
    };
    // Snapshot table: its size is the sum of its entries.
    let mut at = h.snapshots_offset;
    for _ in 0..h.nb_snapshots {
        let (next, _) = read_snapshot(io, bounce, &geo, at)?;
        at = next;
    }
    geo.snapshots_size = at.saturating_sub(h.snapshots_offset);
    // Header extensions: the same walk and the same validation as the engine's open, so that the check sees
    // the bitmaps that the image holds (and refuses what QEMU's open refuses).
    let mut walk = ExtensionWalk::new(&h);
    while let Some(off) = walk.next_at() {
        let mut raw = [0u8; 8];
        io.read(bounce, off, &mut raw)?;
        let Some(ext) = walk.advance::<A::E>(raw)? else {
            break;
        };
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
        let bitmaps =
            BitmapsExtension::parse(&b, cs, ext.header_at).map_err(|(problem, value)| {
                Error::InvalidHeader {
                    field: "bitmaps extension",
                    value,
                    problem,
                }
            })?;
        let mut dir = DirectoryWalk::new(&bitmaps, cs, h.size);
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
        geo.bitmaps = Some(bitmaps);
    }
    Ok(geo)
}

/// A snapshot table entry's facts the check uses.
#[derive(Clone, Copy)]
pub(super) struct Snap {
    pub(super) l1_offset: u64,
    pub(super) l1_size: u32,
    pub(super) id_at: u64,
    pub(super) id_len: u32,
    pub(super) name_at: u64,
    pub(super) name_len: u32,
}

/// Reads the snapshot entry at `at`; returns the offset of the next one and the entry.
pub(super) fn read_snapshot<A: Access>(
    io: &mut A,
    bounce: &mut [u8],
    geo: &Geo,
    at: u64,
) -> Result<(u64, Snap), Error<A::E>> {
    let mut fixed = [0u8; 40];
    io.read(bounce, at, &mut fixed)?;
    let lens = be32(&fixed, 12);
    let id_len = lens >> 16;
    let name_len = lens & 0xffff;
    let extra = be32(&fixed, 36);
    if extra > MAX_SNAPSHOT_EXTRA {
        return Err(corrupt(
            "snapshot table entry has more than 1024 bytes of extra data",
            at,
        ));
    }
    let id_at = at.saturating_add(40).saturating_add(extra.into());
    let name_at = id_at.saturating_add(id_len.into());
    let next = align8(name_at.saturating_add(name_len.into()));
    if next.saturating_sub(geo.h.snapshots_offset) > MAX_SNAPSHOT_TABLE_BYTES {
        return Err(corrupt("snapshot table is larger than 64 MiB", at));
    }
    Ok((
        next,
        Snap {
            l1_offset: be64(&fixed, 0),
            l1_size: be32(&fixed, 8),
            id_at,
            id_len,
            name_at,
            name_len,
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
