//! One-pass check and repair: [`qcow2_core::check`] with a heap scratch buffer big enough to count every
//! host cluster at once (so the metadata is walked once, not once per range of clusters).

use alloc::vec;

use qcow2_core::check::{self, CheckReport, CheckSink, RepairMode};
use qcow2_core::{BlockDevice, BlockDeviceWrite, Error};

use crate::BOUNCE_SIZE;

/// Largest scratch buffer allocated (1 GiB, 256 Mi host clusters); bigger images are checked in passes.
pub const MAX_SCRATCH: usize = 1 << 30;

fn scratch_for<D: BlockDevice>(
    dev: &mut D,
    bounce: &mut [u8],
) -> Result<alloc::vec::Vec<u8>, Error<D::Error>> {
    let need = check::scratch_len_for_one_pass(dev, bounce)?;
    let min = check::min_scratch_len(dev, bounce)?;
    Ok(vec![0u8; need.min(MAX_SCRATCH).max(min)])
}

/// `qemu-img check`: checks the image on `dev` in one pass, sending each problem to `sink`.
pub fn check<D: BlockDevice>(
    dev: &mut D,
    sink: &mut dyn CheckSink,
) -> Result<CheckReport, Error<D::Error>> {
    let mut bounce = vec![0u8; BOUNCE_SIZE];
    let mut scratch = scratch_for(dev, &mut bounce)?;
    check::check(dev, &mut bounce, &mut scratch, sink)
}

/// `qemu-img check -r MODE`: repairs, then checks again if anything was fixed (see [`check::repair`]).
pub fn repair<D: BlockDeviceWrite>(
    dev: &mut D,
    mode: RepairMode,
    sink: &mut dyn CheckSink,
) -> Result<CheckReport, Error<D::Error>> {
    let mut bounce = vec![0u8; BOUNCE_SIZE];
    let mut scratch = scratch_for(dev, &mut bounce)?;
    check::repair(dev, &mut bounce, &mut scratch, mode, sink)
}

/// The repair run alone, without the second check (see [`check::repair_once`]).
pub fn repair_once<D: BlockDeviceWrite>(
    dev: &mut D,
    mode: RepairMode,
    sink: &mut dyn CheckSink,
) -> Result<CheckReport, Error<D::Error>> {
    let mut bounce = vec![0u8; BOUNCE_SIZE];
    let mut scratch = scratch_for(dev, &mut bounce)?;
    check::repair_once(dev, &mut bounce, &mut scratch, mode, sink)
}
