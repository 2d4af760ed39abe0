//! Compressed cluster writes, packed as QEMU packs them: back to back, sharing a host cluster while its
//! refcount can count another reference, and running on into the next host cluster when the allocator
//! hands that one out.

use super::*;

impl<D, B, C, const DEPTH: usize, const SLICES: usize> Image<D, B, C, DEPTH, SLICES, WriteState>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// Stores one whole guest cluster at the cluster-aligned guest `offset` as `compressed` (the cluster's
    /// content compressed with the image's compression type, shorter than a cluster). The caller compresses;
    /// data that does not compress should go through [`Image::write_at`] instead. Like QEMU, a compressed
    /// write only goes to a cluster that holds no data yet.
    pub fn write_compressed(
        &mut self,
        offset: u64,
        compressed: &[u8],
    ) -> Result<(), Error<D::Error>> {
        let g = self.geometry()?;
        let n = compressed.len() as u64;
        if offset & g.tables.cluster_size.wrapping_sub(1) != 0 || offset >= self.virtual_size() {
            return Err(Error::OutOfRange {
                offset,
                len: g.tables.cluster_size,
                size: self.virtual_size(),
            });
        }
        if n == 0 || n >= g.tables.cluster_size {
            return Err(Error::BufferTooSmall {
                what: "compressed cluster (must be shorter than a cluster)",
                need: g.tables.cluster_size.saturating_sub(1),
                have: n,
            });
        }
        if self.layers.first().is_some_and(|l| l.encrypted()) {
            return Err(Error::Unsupported {
                what: "compressed clusters in an encrypted image",
                value: 0,
            });
        }
        if g.tables.l2_format.external_data {
            return Err(Error::Unsupported {
                what: "compressed clusters in an image with an external data file",
                value: offset,
            });
        }
        self.begin_write()?;
        self.meta()?.mark_bitmaps(offset, g.tables.cluster_size)?;
        let l2 = self.writable_l2(offset)?;
        let mut m = self.meta()?;
        m.make_room(3)?;
        let index = (offset >> g.cluster_bits) & g.l2_entries.wrapping_sub(1);
        let old = m.l2_get(l2, index)?;
        if old.word & (OFFSET_MASK | OFLAG_COMPRESSED) != 0 {
            return Err(Error::Unsupported {
                what: "compressed write over a cluster that holds data",
                value: offset,
            });
        }
        // Compressed clusters are packed back to back as QEMU packs them (its `qcow2_alloc_bytes`): the
        // next one goes where the last one ended while that host cluster's refcount can count another
        // reference (narrow refcounts), and it may run on into the following host cluster when that is the
        // one the allocator hands out. Every host cluster it touches gets a reference.
        let cs = g.tables.cluster_size;
        let at = m.w.compressed_at;
        let cl = at & !cs.wrapping_sub(1);
        let shareable = at != 0 && m.refcount(cl >> g.cluster_bits)? < g.max_refcount;
        let host = if shareable && at.saturating_add(n) <= cl.saturating_add(cs) {
            m.change_refcount(cl >> g.cluster_bits, true)?;
            at
        } else {
            let fresh = m.alloc_clusters(1)?.0;
            if shareable && fresh == cl.saturating_add(cs) {
                m.change_refcount(cl >> g.cluster_bits, true)?;
                at
            } else {
                fresh
            }
        };
        let next = host.saturating_add(n);
        m.w.compressed_at = if next & g.tables.cluster_size.wrapping_sub(1) == 0 {
            0
        } else {
            next
        };
        m.guard(host, n, false)?;
        m.write_dev(host, compressed)?;
        let d = CompressedDescriptor {
            offset: host,
            len: n,
        };
        m.l2_set(
            l2,
            index,
            L2Entry {
                word: OFLAG_COMPRESSED | d.encode(g.cluster_bits),
                bitmap: 0,
            },
        )?;
        self.decompressor.invalidate();
        self.end_write()
    }
}
