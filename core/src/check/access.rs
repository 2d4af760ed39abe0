//! The device as the check sees it: read-only for [`super::check`], writable for [`super::repair`].

use super::*;

/// The device access the check needs: reads always, writes only when repairing.
pub(super) trait Access {
    type E: fmt::Debug;
    /// The device underneath, as the metadata cache reads it.
    type Device: BlockDevice<Error = Self::E>;
    fn device(&mut self) -> &mut Self::Device;
    fn size(&mut self) -> Result<u64, Error<Self::E>>;
    fn read(&mut self, bounce: &mut [u8], at: u64, buf: &mut [u8]) -> Result<(), Error<Self::E>>;
    fn write(&mut self, bounce: &mut [u8], at: u64, buf: &[u8]) -> Result<(), Error<Self::E>>;
    fn flush(&mut self) -> Result<(), Error<Self::E>>;
    fn writable(&self) -> bool;
}

pub(super) struct ReadOnly<'a, D>(pub(super) &'a mut D);

impl<D: BlockDevice> Access for ReadOnly<'_, D> {
    type E = D::Error;
    type Device = D;
    fn device(&mut self) -> &mut D {
        self.0
    }
    fn size(&mut self) -> Result<u64, Error<D::Error>> {
        Ok(self.0.size()?)
    }
    fn read(&mut self, bounce: &mut [u8], at: u64, buf: &mut [u8]) -> Result<(), Error<D::Error>> {
        read_bytes(self.0, bounce, at, buf)
    }
    fn write(&mut self, _: &mut [u8], _: u64, _: &[u8]) -> Result<(), Error<D::Error>> {
        Err(Error::ReadOnly)
    }
    fn flush(&mut self) -> Result<(), Error<D::Error>> {
        Err(Error::ReadOnly)
    }
    fn writable(&self) -> bool {
        false
    }
}

pub(super) struct Writable<'a, D>(pub(super) &'a mut D);

impl<D: BlockDeviceWrite> Access for Writable<'_, D> {
    type E = D::Error;
    type Device = D;
    fn device(&mut self) -> &mut D {
        self.0
    }
    fn size(&mut self) -> Result<u64, Error<D::Error>> {
        Ok(self.0.size()?)
    }
    fn read(&mut self, bounce: &mut [u8], at: u64, buf: &mut [u8]) -> Result<(), Error<D::Error>> {
        read_bytes(self.0, bounce, at, buf)
    }
    fn write(&mut self, bounce: &mut [u8], at: u64, buf: &[u8]) -> Result<(), Error<D::Error>> {
        write_bytes(self.0, bounce, at, buf)
    }
    fn flush(&mut self) -> Result<(), Error<D::Error>> {
        Ok(self.0.flush()?)
    }
    fn writable(&self) -> bool {
        true
    }
}
