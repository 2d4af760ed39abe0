//! Block devices: what the caller implements, and the byte-range adapter the engine uses on top.
//!
//! The engine never touches storage except through these traits. The read side ([`BlockDevice`]) and the
//! write side ([`BlockDeviceWrite`]) are separate traits so that a read-only bootloader links no write code.
//!
//! Devices are addressed in blocks (`lba`, a block index) of [`BlockDevice::block_size`] bytes, a power of two
//! of at least 512. qcow2 itself addresses bytes; [`crate::io::read_bytes`] and [`crate::io::write_bytes`]
//! turn byte ranges into block I/O, moving whole aligned blocks straight between the device and the caller's
//! buffer and using one caller-supplied bounce block for the unaligned head and tail.

/// Smallest block size a device may report.
pub const MIN_BLOCK_SIZE: usize = 512;

/// Largest block size a device may report (a bounce block of this size is the most the engine ever needs).
pub const MAX_BLOCK_SIZE: usize = 64 * 1024;

/// What [`BlockDevice::block_status`] says about a byte range of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DeviceExtent {
    /// `true` if the range holds data; `false` if it is known to read as zeros (a hole).
    pub data: bool,
    /// Length in bytes of the run that starts at the queried offset and has this status (at least 1, at most
    /// the queried length).
    pub len: u64,
}

/// The read side of a block device, implemented by the caller.
pub trait BlockDevice {
    /// The device's own error type; the engine wraps it in [`crate::Error::Io`].
    type Error: core::fmt::Debug;

    /// Bytes per block: a power of two, at least [`MIN_BLOCK_SIZE`] and at most [`MAX_BLOCK_SIZE`]. Must not
    /// change while the device is in use.
    fn block_size(&self) -> usize;

    /// Length of the device's content in bytes. It need not be a multiple of the block size (a file's length,
    /// for example).
    fn size(&mut self) -> Result<u64, Self::Error>;

    /// Reads whole blocks starting at block `lba` into `buf`, whose length is a non-zero multiple of the block
    /// size. Bytes at or past [`BlockDevice::size`] read as zeros.
    fn read_blocks(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), Self::Error>;

    /// Tells whether the bytes starting at `offset` are data or a hole that reads as zeros, and for how long
    /// (never more than `len`, never 0 when `len > 0`). Devices that cannot tell report data, which is what the
    /// default does.
    fn block_status(&mut self, offset: u64, len: u64) -> Result<DeviceExtent, Self::Error> {
        let _ = offset;
        Ok(DeviceExtent { data: true, len })
    }
}

/// The write side of a block device, implemented by the caller when the image is opened for writing.
pub trait BlockDeviceWrite: BlockDevice {
    /// Writes whole blocks starting at block `lba` from `buf`, whose length is a non-zero multiple of the block
    /// size. Writing past the end grows the device where it can (a file); a device that cannot grow returns an
    /// error.
    fn write_blocks(&mut self, lba: u64, buf: &[u8]) -> Result<(), Self::Error>;

    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<(), Self::Error>;

    /// Sets the device's length to `len` bytes (a file is truncated, or extended with zeros). A device whose
    /// length cannot change keeps it and returns `Ok(false)`, which is what the default does.
    fn set_size(&mut self, len: u64) -> Result<bool, Self::Error> {
        let _ = len;
        Ok(false)
    }

    /// Tells the device that the `len` bytes at `offset` hold nothing any more. It may deallocate them (they
    /// then read as zeros) or do nothing, which is what the default does.
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        let _ = (offset, len);
        Ok(())
    }
}

impl<T: BlockDevice + ?Sized> BlockDevice for &mut T {
    type Error = T::Error;
    fn block_size(&self) -> usize {
        (**self).block_size()
    }
    fn size(&mut self) -> Result<u64, Self::Error> {
        (**self).size()
    }
    fn read_blocks(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        (**self).read_blocks(lba, buf)
    }
    fn block_status(&mut self, offset: u64, len: u64) -> Result<DeviceExtent, Self::Error> {
        (**self).block_status(offset, len)
    }
}

impl<T: BlockDeviceWrite + ?Sized> BlockDeviceWrite for &mut T {
    fn write_blocks(&mut self, lba: u64, buf: &[u8]) -> Result<(), Self::Error> {
        (**self).write_blocks(lba, buf)
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        (**self).flush()
    }
    fn set_size(&mut self, len: u64) -> Result<bool, Self::Error> {
        (**self).set_size(len)
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        (**self).discard(offset, len)
    }
}
