//! The refcounts on disk, read (and, when repairing, written) through a one-piece cache.

use super::*;

/// Where a refcount lives: `Ok(None)` when no refcount block covers it, `Err(())` when its block offset is
/// unaligned, else the offset of its piece and its index there.
pub(super) type Located = Result<Option<(u64, usize)>, ()>;

/// The on-disk refcounts, read through a one-piece cache (sequential lookups read each piece once).
pub(super) struct RefcountReader {
    pub(super) table_index: u64,
    pub(super) block: u64,
    pub(super) piece_at: u64,
    pub(super) piece: [u8; PIECE],
}

impl RefcountReader {
    pub(super) fn new() -> RefcountReader {
        RefcountReader {
            table_index: u64::MAX,
            block: 0,
            piece_at: u64::MAX,
            piece: [0; PIECE],
        }
    }

    /// Where the refcount of `cluster` lives: `Ok(None)` if no refcount block covers it (refcount 0),
    /// `Err(())` if its refcount block offset is unaligned; else (piece offset, index in the piece).
    pub(super) fn locate<A: Access>(
        &mut self,
        io: &mut A,
        bounce: &mut [u8],
        image: &ImageFacts,
        cluster: u64,
    ) -> Result<Located, Error<A::E>> {
        let (ti, idx) = refcount_location(cluster, image.header.refcount_block_bits());
        if ti >= image.header.refcount_table_entries() {
            return Ok(Ok(None));
        }
        if ti != self.table_index {
            let mut e = [0u8; 8];
            io.read(
                bounce,
                image
                    .header
                    .refcount_table_offset
                    .saturating_add(ti.saturating_mul(8)),
                &mut e,
            )?;
            self.block = u64::from_be_bytes(e) & REFTABLE_OFFSET_MASK;
            self.table_index = ti;
        }
        if self.block == 0 {
            return Ok(Ok(None));
        }
        if self.block & image.header.cluster_size().wrapping_sub(1) != 0 {
            return Ok(Err(()));
        }
        let (piece_start, in_piece) =
            refcount_slice_position(idx, image.header.refcount_order, PIECE as u64);
        let piece_at = self.block.saturating_add(piece_start);
        if piece_at != self.piece_at {
            io.read(bounce, piece_at, &mut self.piece)?;
            self.piece_at = piece_at;
        }
        Ok(Ok(Some((piece_at, in_piece))))
    }

    /// When no refcount block covers `cluster` (its refcount table entry is 0, or it is past the table): one
    /// past the last cluster that shares that fate with it (every refcount there reads as 0).
    pub(super) fn uncovered_until<A: Access>(
        &mut self,
        io: &mut A,
        bounce: &mut [u8],
        image: &ImageFacts,
        cluster: u64,
    ) -> Result<Option<u64>, Error<A::E>> {
        let (ti, _) = refcount_location(cluster, image.header.refcount_block_bits());
        if ti >= image.header.refcount_table_entries() {
            return Ok(Some(u64::MAX));
        }
        // locate() reads the table entry (and the block's piece, when there is a block).
        let _ = self.locate(io, bounce, image, cluster)?;
        Ok((self.block == 0).then(|| {
            ti.saturating_add(1)
                .checked_shl(image.header.refcount_block_bits())
                .unwrap_or(u64::MAX)
        }))
    }

    /// The refcount of `cluster`, `None` if it cannot be read.
    pub(super) fn get<A: Access>(
        &mut self,
        io: &mut A,
        bounce: &mut [u8],
        image: &ImageFacts,
        cluster: u64,
    ) -> Result<Option<u64>, Error<A::E>> {
        match self.locate(io, bounce, image, cluster)? {
            Err(()) => Ok(None),
            Ok(None) => Ok(Some(0)),
            Ok(Some((_, i))) => Ok(refcount_get(&self.piece, image.header.refcount_order, i)),
        }
    }

    /// Sets the refcount of `cluster` (which a refcount block covers); `false` if it cannot.
    pub(super) fn set<A: Access>(
        &mut self,
        io: &mut A,
        bounce: &mut [u8],
        image: &ImageFacts,
        cluster: u64,
        value: u64,
    ) -> Result<bool, Error<A::E>> {
        match self.locate(io, bounce, image, cluster)? {
            Ok(Some((at, i))) => {
                if refcount_set(&mut self.piece, image.header.refcount_order, i, value).is_none() {
                    return Ok(false);
                }
                io.write(bounce, at, &self.piece)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}
