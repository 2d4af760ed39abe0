//! Byte ranges over block devices, and two ready-made devices: memory, and embedded-io streams.

use crate::Error;
use crate::device::{BlockDevice, BlockDeviceWrite, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};

/// Checks a device's block size and that the caller's bounce block can hold one block.
pub fn check_block_size<E>(block_size: usize, bounce_len: usize) -> Result<(), Error<E>> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(Error::BadBlockSize(block_size));
    }
    if bounce_len < block_size {
        return Err(Error::BufferTooSmall {
            what: "bounce block",
            need: block_size as u64,
            have: bounce_len as u64,
        });
    }
    Ok(())
}

/// Reads `buf.len()` bytes at byte `offset` of `dev`. Whole aligned blocks go straight into `buf` (one device
/// call for the whole aligned middle); an unaligned head or tail goes through `bounce` (at least one block).
pub fn read_bytes<D: BlockDevice>(
    dev: &mut D,
    bounce: &mut [u8],
    offset: u64,
    buf: &mut [u8],
) -> Result<(), Error<D::Error>> {
    let bs = dev.block_size();
    check_block_size(bs, bounce.len())?;
    let shift = bs.trailing_zeros();
    let mask = bs.wrapping_sub(1);
    let mut pos = offset;
    let mut rest = buf;
    while !rest.is_empty() {
        let within = (pos as usize) & mask;
        let lba = pos >> shift;
        if within == 0 && rest.len() >= bs {
            let whole = rest.len() & !mask;
            let (head, tail) = rest.split_at_mut(whole);
            dev.read_blocks(lba, head)?;
            pos = pos.checked_add(whole as u64).ok_or(Error::OutOfRange {
                offset,
                len: 0,
                size: u64::MAX,
            })?;
            rest = tail;
        } else {
            let block = bounce.get_mut(..bs).ok_or(Error::BadBlockSize(bs))?;
            dev.read_blocks(lba, block)?;
            let n = bs.saturating_sub(within).min(rest.len());
            let (head, tail) = rest.split_at_mut(n);
            copy_exact(
                head,
                block
                    .get(within..within.saturating_add(n))
                    .ok_or(Error::BadBlockSize(bs))?,
            )
            .ok_or(Error::BadBlockSize(bs))?;
            pos = pos.checked_add(n as u64).ok_or(Error::OutOfRange {
                offset,
                len: 0,
                size: u64::MAX,
            })?;
            rest = tail;
        }
    }
    Ok(())
}

pub(crate) use crate::format::copy_exact;

/// `a / b` rounded up, and 0 when `b` is 0 (callers divide by validated, non-zero sizes): unlike
/// `u64::div_ceil`, which at opt-level "z" stays an outlined call with a division-by-zero panic in it, this
/// has no panic path.
#[inline]
pub(crate) fn ceil_div(a: u64, b: u64) -> u64 {
    match (a.checked_div(b), a.checked_rem(b)) {
        (Some(q), Some(r)) => q.saturating_add(u64::from(r != 0)),
        _ => 0,
    }
}

/// Writes `buf` at byte `offset` of `dev`, reading and rewriting the blocks that an unaligned head or tail
/// only partly covers through `bounce`.
pub fn write_bytes<D: BlockDeviceWrite>(
    dev: &mut D,
    bounce: &mut [u8],
    offset: u64,
    buf: &[u8],
) -> Result<(), Error<D::Error>> {
    let bs = dev.block_size();
    check_block_size(bs, bounce.len())?;
    let shift = bs.trailing_zeros();
    let mask = bs.wrapping_sub(1);
    let mut pos = offset;
    let mut rest = buf;
    while !rest.is_empty() {
        let within = (pos as usize) & mask;
        let lba = pos >> shift;
        if within == 0 && rest.len() >= bs {
            let whole = rest.len() & !mask;
            let (head, tail) = rest.split_at(whole);
            dev.write_blocks(lba, head)?;
            pos = pos.checked_add(whole as u64).ok_or(Error::OutOfRange {
                offset,
                len: 0,
                size: u64::MAX,
            })?;
            rest = tail;
        } else {
            let block = bounce.get_mut(..bs).ok_or(Error::BadBlockSize(bs))?;
            dev.read_blocks(lba, block)?;
            let n = bs.saturating_sub(within).min(rest.len());
            let (head, tail) = rest.split_at(n);
            copy_exact(
                block
                    .get_mut(within..within.saturating_add(n))
                    .ok_or(Error::BadBlockSize(bs))?,
                head,
            )
            .ok_or(Error::BadBlockSize(bs))?;
            dev.write_blocks(lba, block)?;
            pos = pos.checked_add(n as u64).ok_or(Error::OutOfRange {
                offset,
                len: 0,
                size: u64::MAX,
            })?;
            rest = tail;
        }
    }
    Ok(())
}

/// Error of [`MemDevice`]: an access past the end of a device that cannot grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MemDeviceFull;

impl core::fmt::Display for MemDeviceFull {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("write past the end of the memory device")
    }
}

/// A block device over a byte buffer (a RAM disk, or an image held in flash or in a test).
///
/// `len` is the content length (a file's length); the buffer beyond it is capacity that writes may use.
#[derive(Debug)]
pub struct MemDevice<B> {
    buf: B,
    len: u64,
    block_size: usize,
}

impl<B: AsRef<[u8]>> MemDevice<B> {
    /// A device whose content is all of `buf`, with 512-byte blocks.
    pub fn new(buf: B) -> Self {
        let len = buf.as_ref().len() as u64;
        MemDevice {
            buf,
            len,
            block_size: MIN_BLOCK_SIZE,
        }
    }

    /// A device with content length `len` (clamped to the buffer) and the given block size.
    pub fn with_len(buf: B, len: u64, block_size: usize) -> Self {
        let len = len.min(buf.as_ref().len() as u64);
        MemDevice {
            buf,
            len,
            block_size,
        }
    }

    /// The content (the first `len` bytes).
    pub fn content(&self) -> &[u8] {
        let b = self.buf.as_ref();
        b.get(..self.len as usize).unwrap_or(b)
    }

    /// Gives the buffer back.
    pub fn into_inner(self) -> B {
        self.buf
    }
}

impl<B: AsRef<[u8]>> BlockDevice for MemDevice<B> {
    type Error = MemDeviceFull;
    fn block_size(&self) -> usize {
        self.block_size
    }
    fn size(&mut self) -> Result<u64, Self::Error> {
        Ok(self.len)
    }
    fn read_blocks(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        let start = lba
            .checked_mul(self.block_size as u64)
            .ok_or(MemDeviceFull)?;
        let content = self.content();
        let avail = content
            .get(usize::try_from(start).unwrap_or(usize::MAX)..)
            .unwrap_or(&[]);
        let n = avail.len().min(buf.len());
        let (head, tail) = buf.split_at_mut(n);
        copy_exact(head, avail.get(..n).unwrap_or(&[])).ok_or(MemDeviceFull)?;
        tail.fill(0);
        Ok(())
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> BlockDeviceWrite for MemDevice<B> {
    fn write_blocks(&mut self, lba: u64, buf: &[u8]) -> Result<(), Self::Error> {
        let start = lba
            .checked_mul(self.block_size as u64)
            .ok_or(MemDeviceFull)?;
        let end = start.checked_add(buf.len() as u64).ok_or(MemDeviceFull)?;
        let dst = self
            .buf
            .as_mut()
            .get_mut(
                usize::try_from(start).map_err(|_| MemDeviceFull)?
                    ..usize::try_from(end).map_err(|_| MemDeviceFull)?,
            )
            .ok_or(MemDeviceFull)?;
        copy_exact(dst, buf).ok_or(MemDeviceFull)?;
        self.len = self.len.max(end);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// A block device over an [`embedded_io`] stream that can seek (a file on an SD card's filesystem, say).
#[cfg(feature = "embedded-io")]
#[derive(Debug)]
pub struct EmbeddedIoDevice<T> {
    inner: T,
    len: u64,
}

#[cfg(feature = "embedded-io")]
impl<T: embedded_io::Read + embedded_io::Seek> EmbeddedIoDevice<T> {
    /// Wraps a stream; its length is found by seeking to the end.
    pub fn new(mut inner: T) -> Result<Self, T::Error> {
        let len = inner.seek(embedded_io::SeekFrom::End(0))?;
        Ok(EmbeddedIoDevice { inner, len })
    }

    /// Gives the stream back.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

/// Error of [`EmbeddedIoDevice`].
#[cfg(feature = "embedded-io")]
#[derive(Debug)]
pub enum EmbeddedIoError<E> {
    /// The stream's error.
    Io(E),
    /// The stream ended early (a read returned 0 before the end it reported).
    UnexpectedEof,
}

#[cfg(feature = "embedded-io")]
impl<T: embedded_io::Read + embedded_io::Seek> BlockDevice for EmbeddedIoDevice<T> {
    type Error = EmbeddedIoError<T::Error>;
    fn block_size(&self) -> usize {
        MIN_BLOCK_SIZE
    }
    fn size(&mut self) -> Result<u64, Self::Error> {
        Ok(self.len)
    }
    fn read_blocks(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        let start = lba.saturating_mul(MIN_BLOCK_SIZE as u64);
        let avail = usize::try_from(self.len.saturating_sub(start))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let (head, tail) = buf.split_at_mut(avail);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        self.inner
            .seek(embedded_io::SeekFrom::Start(start))
            .map_err(EmbeddedIoError::Io)?;
        let mut done = 0;
        while let Some(rest) = head.get_mut(done..).filter(|r| !r.is_empty()) {
            let n = self.inner.read(rest).map_err(EmbeddedIoError::Io)?;
            if n == 0 {
                return Err(EmbeddedIoError::UnexpectedEof);
            }
            done = done.saturating_add(n);
        }
        Ok(())
    }
}

#[cfg(feature = "embedded-io")]
impl<T: embedded_io::Read + embedded_io::Write + embedded_io::Seek> BlockDeviceWrite
    for EmbeddedIoDevice<T>
{
    fn write_blocks(&mut self, lba: u64, buf: &[u8]) -> Result<(), Self::Error> {
        let start = lba.saturating_mul(MIN_BLOCK_SIZE as u64);
        self.inner
            .seek(embedded_io::SeekFrom::Start(start))
            .map_err(EmbeddedIoError::Io)?;
        self.inner.write_all(buf).map_err(EmbeddedIoError::Io)?;
        self.len = self.len.max(start.saturating_add(buf.len() as u64));
        Ok(())
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        self.inner.flush().map_err(EmbeddedIoError::Io)
    }
}
