//! `qemu-img bitmap`'s changes to persistent bitmaps, and the dirty runs that `--merge -b` reads from another
//! image, through the engine, with QEMU's checks in QEMU's order and its messages.

use qcow2_core::engine::BitmapRef;
use qcow2_core::format::bitmap::{MAX_NAME_SIZE, MAX_PHYS_SIZE, MAX_TABLE_SIZE};
use qcow2_core::write::{self as w, NewBitmap};

use super::*;
use crate::disk::{BitmapChange, DirtyRunSink};

/// Runs read from the engine at once.
const RUNS: usize = 64;

fn not_found(name: &str) -> DiskError {
    DiskError::new(format!("Dirty bitmap '{name}' not found"))
}

fn inconsistent(name: &str) -> DiskError {
    DiskError::new(format!(
        "Bitmap '{name}' is inconsistent and cannot be used\n\
         Try block-dirty-bitmap-remove to delete this bitmap from disk"
    ))
}

/// QEMU's default granularity for an image with clusters of `cluster_size` bytes: the cluster size, at
/// least 4 KiB and at most 64 KiB.
fn default_granularity(cluster_size: u64) -> u64 {
    cluster_size.clamp(4096, 65536)
}

impl Qcow2Disk {
    /// The top image's bitmap `name`.
    fn bitmap_ref(&mut self, name: &str) -> Result<BitmapRef, DiskError> {
        self.image
            .find_bitmap(name.as_bytes())
            .map_err(engine_error)?
            .ok_or_else(|| not_found(name))
    }

    /// [`VirtualDisk::bitmap_dirty_runs`] for qcow2.
    pub(super) fn dirty_runs(
        &mut self,
        name: &str,
        f: &mut DirtyRunSink<'_>,
    ) -> Result<(), DiskError> {
        let r = self.bitmap_ref(name)?;
        if self.image.bitmap_inconsistent(&r) {
            return Err(inconsistent(name));
        }
        let mut runs = [(0u64, 0u64); RUNS];
        let mut from = 0u64;
        loop {
            let n = self
                .image
                .bitmap_dirty_runs(&r, &mut from, &mut runs)
                .map_err(engine_error)?;
            if n == 0 {
                return Ok(());
            }
            for &(offset, len) in &runs[..n] {
                f(offset, len)?;
            }
        }
    }

    /// [`VirtualDiskWrite::bitmap_change`] for qcow2.
    pub(super) fn change_bitmap(
        &mut self,
        name: &str,
        node: &str,
        change: BitmapChange<'_>,
    ) -> Result<(), DiskError> {
        self.check_writable()?;
        let persistent = |why: &str| {
            DiskError::new(format!(
                "Can't make bitmap '{name}' persistent in '{node}': {why}"
            ))
        };
        let engine = |e: Error<io::Error>| match e {
            Error::Unsupported { what, .. } if what == w::BITMAP_INCONSISTENT => inconsistent(name),
            Error::Unsupported { what, .. } if what == w::BITMAP_NOT_FOUND => not_found(name),
            other => engine_error(other),
        };
        match change {
            BitmapChange::Add { granularity } => {
                if name.is_empty() {
                    return Err(DiskError::new("Bitmap name cannot be empty"));
                }
                let h = self
                    .top_header()
                    .ok_or_else(|| DiskError::new("not a qcow2 image"))?;
                let cs = h.cluster_size();
                // qemu-img hands the granularity on as 32 bits.
                let g = match granularity {
                    None | Some(0) => default_granularity(cs),
                    Some(g) => {
                        let g = u64::from(g as u32);
                        if g < 512 || !g.is_power_of_two() {
                            return Err(DiskError::new(
                                "Granularity must be power of 2 and at least 512",
                            ));
                        }
                        g
                    }
                };
                if self
                    .image
                    .find_bitmap(name.as_bytes())
                    .map_err(engine_error)?
                    .is_some()
                {
                    return Err(DiskError::new(format!("Bitmap already exists: {name}")));
                }
                if h.version < 3 {
                    return Err(persistent("Cannot store dirty bitmaps in qcow2 v2 files"));
                }
                let bits = h.size.div_ceil(g);
                let clusters = bits.div_ceil(8).div_ceil(cs);
                if clusters > u64::from(MAX_TABLE_SIZE) || clusters * cs > MAX_PHYS_SIZE {
                    return Err(persistent(
                        "Too much space will be occupied by the bitmap. Use larger granularity",
                    ));
                }
                if name.len() > usize::from(MAX_NAME_SIZE) {
                    return Err(persistent(&format!(
                        "Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
                    )));
                }
                let new = NewBitmap {
                    name,
                    granularity_bits: g.trailing_zeros() as u8,
                    enabled: true,
                };
                self.image.add_bitmap(&new).map_err(|e| match e {
                    Error::Unsupported { what, .. } if what == w::TOO_MANY_BITMAPS => {
                        persistent("Maximum number of persistent bitmaps is already reached")
                    }
                    Error::Unsupported { what, .. } if what == w::BITMAP_DIRECTORY_FULL => {
                        persistent("Not enough space in the bitmap directory")
                    }
                    other => engine(other),
                })
            }
            BitmapChange::Remove => {
                self.bitmap_ref(name)?;
                self.image.remove_bitmap(name).map_err(engine)
            }
            BitmapChange::Clear => {
                self.usable(name)?;
                self.image.clear_bitmap(name).map_err(engine)
            }
            BitmapChange::Enable | BitmapChange::Disable => {
                self.usable(name)?;
                let on = matches!(change, BitmapChange::Enable);
                self.image.set_bitmap_enabled(name, on).map_err(engine)
            }
            BitmapChange::Merge(source) => {
                self.usable(name)?;
                self.usable(source)?;
                self.image.merge_bitmap(name, source).map_err(engine)
            }
            BitmapChange::MergeRuns(feed) => {
                let r = self.usable(name)?;
                let image = &mut self.image;
                feed(&mut |offset, len| image.mark_bitmap(&r, offset, len).map_err(engine_error))
            }
        }
    }

    /// Refuses a resize as QEMU does when a persistent bitmap is inconsistent (the others are resized).
    pub(super) fn resizable_bitmaps(&mut self) -> Result<(), DiskError> {
        let Some(mut walk) = self.image.bitmap_directory(0) else {
            return Ok(());
        };
        while let Some((_, stored)) = self
            .image
            .read_bitmap_entry(0, &mut walk)
            .map_err(engine_error)?
        {
            let mut buf = vec![0u8; stored.len as usize];
            let name = self
                .image
                .read_stored_name(0, stored, &mut buf)
                .map_err(engine_error)?;
            let name = String::from_utf8_lossy(name).into_owned();
            self.usable(&name)?;
        }
        Ok(())
    }

    /// The bitmap `name`, refused when it is missing or inconsistent.
    fn usable(&mut self, name: &str) -> Result<BitmapRef, DiskError> {
        let r = self.bitmap_ref(name)?;
        if self.image.bitmap_inconsistent(&r) {
            return Err(inconsistent(name));
        }
        Ok(r)
    }
}
