//! Writes to an encrypted image: guest data is encrypted a chunk at a time in the copy buffer (never in the
//! caller's slice) with each 512-byte sector's IV from its host sector (LUKS) or guest sector (legacy AES),
//! copy-on-write data is re-encrypted for its new place, and a request that starts or ends inside a sector
//! reads, patches and writes that whole sector (QEMU's 512-byte request alignment for encrypted images).
//! Also the LUKS area of a new image (`set_up_luks`) and legacy AES's header field (`set_up_legacy_aes`).

use super::*;
use crate::crypto::{Direction, DiskKey, SECTOR, SECTOR_MASK};
use crate::engine::key_of;

/// What a write request stores.
#[derive(Clone, Copy)]
pub(super) enum Edge<'a> {
    Bytes(&'a [u8]),
    Zeros,
}

/// Encrypts `chunk` (whole sectors) for host offset `host`, guest offset `guest`.
pub(super) fn encrypt_for(key: &DiskKey, host: u64, guest: u64, chunk: &mut [u8]) {
    let at = if key.physical() { host } else { guest };
    key.apply_at(at, chunk, Direction::Encrypt);
}

impl<D, B, C, const DEPTH: usize, const SLICES: usize> Image<D, B, C, DEPTH, SLICES, WriteState>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// The top image's data key: `Ok(None)` when it is not encrypted, an error when it is locked.
    pub(super) fn top_key(&self) -> Result<Option<&DiskKey>, Error<D::Error>> {
        let top = self.layers.first().ok_or(Error::ReadOnly)?;
        key_of(&top.key, top.encrypted())
    }

    /// Stores `src` (`len` bytes) encrypted at host offset `host`, guest offset `guest`.
    pub(super) fn store_encrypted(
        &mut self,
        host: u64,
        guest: u64,
        src: WriteSource<'_>,
        len: u64,
    ) -> Result<(), Error<D::Error>> {
        let Image {
            layers, bounce, w, ..
        } = self;
        let top = layers.first_mut().ok_or(Error::ReadOnly)?;
        let encrypted = top.encrypted();
        let Layer { dev, data, key, .. } = top;
        let key = key_of::<D::Error>(key, encrypted)?.ok_or(Error::ReadOnly)?;
        let dev = match data.as_mut() {
            Some(d) => d,
            None => dev,
        };
        let bs = dev.block_size();
        let (b, rest) = split_bounce(bounce.as_mut(), bs);
        let mut stack = [0u8; STACK_CHUNK];
        let chunk = chunk_of(rest, &mut stack);
        let mut done = 0u64;
        while done < len {
            let n = (chunk.len() as u64).min(len.saturating_sub(done)) as usize;
            let part = chunk.get_mut(..n).unwrap_or(&mut []);
            match src {
                WriteSource::Bytes(bytes) => {
                    let from = done as usize;
                    crate::format::copy_prefix(part, bytes.get(from..).unwrap_or(&[]));
                }
                WriteSource::Zeros => part.fill(0),
            }
            encrypt_for(
                key,
                host.saturating_add(done),
                guest.saturating_add(done),
                part,
            );
            write_bytes(dev, b, host.saturating_add(done), part)?;
            done = done.saturating_add(n as u64);
        }
        w.needs_flush = true;
        Ok(())
    }

    /// For an encrypted top image, the request `[offset, offset + len)` with its partial first and last
    /// sectors written whole (read, patched with `edge`, written back); returns the sector-aligned middle
    /// still to write (`None`: nothing left). For other images, the request unchanged.
    pub(super) fn write_sector_edges(
        &mut self,
        offset: u64,
        len: u64,
        edge: Edge<'_>,
    ) -> Result<Option<(u64, u64)>, Error<D::Error>> {
        if self.top_key()?.is_none() || len == 0 {
            return Ok(Some((offset, len)));
        }
        let end = offset.saturating_add(len);
        let head = offset & SECTOR_MASK;
        let tail = end & SECTOR_MASK;
        let mut start = offset;
        let mut stop = end;
        if head != 0 {
            let s = offset.saturating_sub(head);
            let e = s.saturating_add(SECTOR as u64).min(end);
            self.patch_sector(s, offset, e, edge, offset)?;
            start = e;
        }
        if start < stop && tail != 0 {
            // `start` is a sector boundary here, so the last sector starts at or after it.
            let s = stop.saturating_sub(tail);
            self.patch_sector(s, s, stop, edge, offset)?;
            stop = s;
        }
        Ok((start < stop).then(|| (start, stop.saturating_sub(start))))
    }

    /// Writes the guest sector at `s` with its bytes `[a, b)` replaced from `edge` (whose first byte is
    /// guest offset `origin`).
    fn patch_sector(
        &mut self,
        s: u64,
        a: u64,
        b: u64,
        edge: Edge<'_>,
        origin: u64,
    ) -> Result<(), Error<D::Error>> {
        let mut buf = [0u8; SECTOR];
        let size = self.virtual_size();
        let readable = usize::try_from(size.saturating_sub(s))
            .unwrap_or(SECTOR)
            .min(SECTOR);
        self.reader()
            .read(s, buf.get_mut(..readable).unwrap_or(&mut []))?;
        let lo = a.saturating_sub(s) as usize;
        let hi = b.saturating_sub(s) as usize;
        let dst = buf.get_mut(lo..hi).unwrap_or(&mut []);
        match edge {
            Edge::Bytes(bytes) => {
                let from = a.saturating_sub(origin) as usize;
                crate::format::copy_prefix(dst, bytes.get(from..).unwrap_or(&[]));
            }
            Edge::Zeros => dst.fill(0),
        }
        self.write_range(s, SECTOR as u64, WriteSource::Bytes(&buf))
    }
}

#[cfg(feature = "luks")]
impl<D, B, C, const DEPTH: usize, const SLICES: usize> Image<D, B, C, DEPTH, SLICES, WriteState>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// Makes a new, empty image LUKS-encrypted as QEMU does when it creates one: clusters for the LUKS
    /// area allocated (and zeroed), the area written ([`crate::crypto::create::build_area`] with
    /// `params`, `passphrase` and the caller's randomness), then one crash-safe rewrite of the first
    /// cluster sets `crypt_method` 2 and adds the encryption header extension. The image is then unlocked.
    pub fn set_up_luks(
        &mut self,
        params: &crate::crypto::create::LuksParams,
        passphrase: &[u8],
        random: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), Error<D::Error>> {
        use crate::format::luks::LuksHeader;
        if self.layers.first().is_some_and(|l| l.encrypted()) {
            return Err(Error::Unsupported {
                what: "encrypting an image that is already encrypted",
                value: 0,
            });
        }
        self.begin_write()?;
        let area_len = LuksHeader::area_len(params.cipher.key_bytes() as u32);
        let mut m = self.meta()?;
        let cs = m.g.tables.cluster_size;
        let clusters = area_len.div_ceil(cs);
        m.make_room(3)?;
        let area = m.alloc_contiguous(clusters)?;
        m.write_zeros(area, clusters.saturating_mul(cs))?;
        let built =
            crate::crypto::create::build_area(params, passphrase, random, &mut |at, bytes| {
                m.write_dev(area.saturating_add(at), bytes)
            });
        let (_, key) = built?;
        m.writeback_all()?;
        m.flush_dev()?;
        let mut new = *m.header;
        new.crypt_method = 2;
        let change = Cluster0Change {
            encryption: Some(Some((area, area_len))),
            ..Cluster0Change::default()
        };
        m.rewrite_cluster0(&mut new, &change)?;
        if let Some(top) = self.layers.first_mut() {
            if let Some(meta) = top.meta.as_mut() {
                meta.encryption = Some((area, area_len));
            }
            top.key = Some(key);
        }
        self.end_write()
    }
}

#[cfg(feature = "aes-legacy")]
impl<D, B, C, const DEPTH: usize, const SLICES: usize> Image<D, B, C, DEPTH, SLICES, WriteState>
where
    D: BlockDeviceWrite,
    B: AsRef<[u8]> + AsMut<[u8]>,
    C: Decompressor,
{
    /// Makes a new, empty image legacy-AES encrypted (`crypt_method` 1, as `encrypt.format=aes`), its key
    /// from `passphrase`.
    pub fn set_up_legacy_aes(&mut self, passphrase: &[u8]) -> Result<(), Error<D::Error>> {
        if self.layers.first().is_some_and(|l| l.encrypted()) {
            return Err(Error::Unsupported {
                what: "encrypting an image that is already encrypted",
                value: 0,
            });
        }
        self.begin_write()?;
        let mut m = self.meta()?;
        let mut new = *m.header;
        new.crypt_method = 1;
        m.rewrite_cluster0(&mut new, &Cluster0Change::default())?;
        if let Some(top) = self.layers.first_mut() {
            top.key = Some(DiskKey::legacy_aes(passphrase));
        }
        self.end_write()
    }
}
