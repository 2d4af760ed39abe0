//! Dirty images (lazy refcounts not written back after a crash) and writable opens, with and without the
//! `dirty-repair` feature.
//!
//! The workspace tests build `qcow2-core` with its default features (`dirty-repair` on); the tests without
//! it run with `cargo test -p qcow2-core --no-default-features --test dirty_images` (CI does).

use std::cell::RefCell;
use std::convert::Infallible;
use std::rc::Rc;

use qcow2_core::check::{self, CheckReport, NoSink};
use qcow2_core::create::{CreateOptions, create};
use qcow2_core::{BlockDevice, BlockDeviceWrite, Buffers, Error, Image, NoDecompressor, NoFiles};

/// The incompatible feature bit a lazy-refcounts writer sets before its first change.
const DIRTY: u64 = 1;
const SIZE: u64 = 4 << 20;
const CLUSTER: u64 = 4096;

/// A growable disk in memory that the test keeps a handle on while an image holds it (so that what a
/// writer that never closes leaves behind can be looked at).
#[derive(Clone, Default)]
struct Disk(Rc<RefCell<Vec<u8>>>);

impl Disk {
    #[cfg(not(feature = "dirty-repair"))]
    fn bytes(&self) -> Vec<u8> {
        self.0.borrow().clone()
    }

    fn incompatible(&self) -> u64 {
        u64::from_be_bytes(self.0.borrow()[72..80].try_into().unwrap())
    }

    fn check(&self) -> CheckReport {
        check::check(
            &mut self.clone(),
            &mut [0u8; 512],
            &mut vec![0u8; 1 << 16],
            &mut NoSink,
        )
        .expect("check runs")
    }
}

impl BlockDevice for Disk {
    type Error = Infallible;

    fn block_size(&self) -> usize {
        512
    }

    fn size(&mut self) -> Result<u64, Infallible> {
        Ok(self.0.borrow().len() as u64)
    }

    fn read_blocks(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), Infallible> {
        let d = self.0.borrow();
        let start = lba as usize * 512;
        for (i, b) in buf.iter_mut().enumerate() {
            *b = d.get(start + i).copied().unwrap_or(0);
        }
        Ok(())
    }
}

impl BlockDeviceWrite for Disk {
    fn write_blocks(&mut self, lba: u64, buf: &[u8]) -> Result<(), Infallible> {
        let mut d = self.0.borrow_mut();
        let start = lba as usize * 512;
        if d.len() < start + buf.len() {
            d.resize(start + buf.len(), 0);
        }
        d[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Infallible> {
        Ok(())
    }
}

/// Four 512-byte metadata slices, the least a writer takes: dirty slices are written back all the time.
type Img = Image<Disk, Vec<u8>, NoDecompressor, 2, 4, qcow2_core::WriteState>;

fn buffers() -> Buffers<Vec<u8>> {
    Buffers {
        bounce: vec![0u8; 512],
        metadata: vec![0u8; 4 * 512],
    }
}

fn open_writable(disk: &Disk) -> Result<Img, Error<Infallible>> {
    Image::open_writable(disk.clone(), buffers(), NoDecompressor, &mut NoFiles)
}

/// A new 4 MiB image with 4 KiB clusters and lazy refcounts.
fn lazy_image() -> Disk {
    let mut disk = Disk::default();
    let opts = CreateOptions {
        size: SIZE,
        cluster_size: CLUSTER,
        lazy_refcounts: true,
        ..Default::default()
    };
    create(&mut disk, &mut [0u8; 512], &opts).expect("create");
    assert_eq!(disk.incompatible() & DIRTY, 0);
    disk
}

/// Writes that allocate L2 tables and data clusters all over the disk (and a refcount block's worth of
/// refcounts), with zeroes and a discard in between. Returns what the guest must read afterwards.
fn write_some(image: &mut Img) -> Vec<u8> {
    let mut model = vec![0u8; SIZE as usize];
    for i in 0..40u64 {
        let off = (i * 104_729 + 1000) % (SIZE - 10_000);
        let len = 1 + (i * 7919) % 9000;
        let byte = 1 + i as u8;
        image.write_at(off, &vec![byte; len as usize]).unwrap();
        model[off as usize..(off + len) as usize].fill(byte);
        if i % 9 == 4 {
            image.write_zeroes(off, CLUSTER, false).unwrap();
            model[off as usize..(off + CLUSTER) as usize].fill(0);
        }
        if i % 13 == 6 {
            let at = off & !(CLUSTER - 1);
            image.discard(at, CLUSTER).unwrap();
            model[at as usize..(at + CLUSTER) as usize].fill(0);
        }
    }
    model
}

fn assert_reads(image: &mut Img, model: &[u8]) {
    let mut buf = vec![0u8; 64 * 1024];
    for (i, want) in model.chunks(buf.len()).enumerate() {
        image.read_at((i * buf.len()) as u64, &mut buf).unwrap();
        assert!(
            buf == want,
            "guest data differs in the 64 KiB at {}",
            i * buf.len()
        );
    }
}

/// What a crash of a lazy-refcounts writer leaves, made by hand: the dirty bit set and a refcount block
/// that lags behind the L2 tables (here: all zero, so clusters in use have refcount 0).
fn make_dirty(disk: &Disk) {
    let mut d = disk.0.borrow_mut();
    let incompatible = u64::from_be_bytes(d[72..80].try_into().unwrap()) | DIRTY;
    d[72..80].copy_from_slice(&incompatible.to_be_bytes());
    let table = u64::from_be_bytes(d[48..56].try_into().unwrap()) as usize;
    let block = u64::from_be_bytes(d[table..table + 8].try_into().unwrap()) as usize;
    d[block..block + CLUSTER as usize].fill(0);
}

/// A lazy-refcounts image with data, closed cleanly, then made dirty by hand. Returns it and its guest
/// content.
fn dirty_image_with_data() -> (Disk, Vec<u8>) {
    let disk = lazy_image();
    let mut image = open_writable(&disk).unwrap();
    let model = write_some(&mut image);
    image.close().unwrap();
    make_dirty(&disk);
    (disk, model)
}

#[cfg(not(feature = "dirty-repair"))]
mod without_dirty_repair {
    use qcow2_core::check::RepairMode;

    use super::*;

    /// A dirty image is refused for writing with `NeedsRepair`, nothing is written to it, it still reads;
    /// after `check::repair` it opens for writing.
    #[test]
    fn dirty_image_is_refused_until_repaired() {
        let (disk, model) = dirty_image_with_data();
        let before = disk.bytes();
        match open_writable(&disk) {
            Err(Error::NeedsRepair { what }) => {
                assert!(what.contains("dirty"), "{what}");
                assert!(what.contains("check -r all"), "{what}");
            }
            Err(e) => panic!("dirty image: expected NeedsRepair, got {e:?}"),
            Ok(_) => panic!("dirty image opened for writing without the dirty-repair feature"),
        }
        assert!(
            disk.bytes() == before,
            "the refused open wrote to the image"
        );
        let err = open_writable(&disk).err().unwrap();
        assert_eq!(
            err.to_string(),
            "the image is dirty (lazy refcounts were not written back); repair it (check -r all) before \
             writing"
        );

        // Reading is not affected.
        let mut reader: Img = Image::open(disk.clone(), buffers(), NoDecompressor, &mut NoFiles)
            .expect("a dirty image opens for reading");
        assert_reads(&mut reader, &model);
        drop(reader);
        assert!(disk.bytes() == before);

        // The refcounts lag behind (what the repair is for).
        assert!(disk.check().corruptions > 0);
        // The caller repairs it, then it opens for writing.
        let report = check::repair(
            &mut disk.clone(),
            &mut [0u8; 512],
            &mut vec![0u8; 1 << 16],
            RepairMode::All,
            &mut NoSink,
        )
        .unwrap();
        assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
        assert_eq!(disk.incompatible() & DIRTY, 0);
        let mut image = open_writable(&disk).expect("the repaired image opens for writing");
        assert_reads(&mut image, &model);
        image.write_at(12345, &[0x77; 3000]).unwrap();
        image.close().unwrap();
        let report = disk.check();
        assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
    }

    /// Without the feature the engine keeps a lazy-refcounts image's refcounts up to date: it never sets
    /// the dirty bit, not even while writing, and a writer that stops without closing (flushed or not)
    /// leaves an image that checks without corruptions and opens for writing again.
    #[test]
    fn lazy_refcounts_image_is_never_made_dirty() {
        // Closed cleanly: no leaks either.
        let disk = lazy_image();
        let mut image = open_writable(&disk).unwrap();
        let model = write_some(&mut image);
        assert_eq!(
            image.layers()[0]
                .qcow2()
                .unwrap()
                .header
                .incompatible_features
                .bits()
                & DIRTY,
            0
        );
        assert_eq!(disk.incompatible() & DIRTY, 0);
        image.close().unwrap();
        assert_eq!(disk.incompatible() & DIRTY, 0);
        let report = disk.check();
        assert_eq!(
            (report.corruptions, report.leaks, report.check_errors),
            (0, 0, 0),
            "{report:?}"
        );
        let mut image = open_writable(&disk).unwrap();
        assert_reads(&mut image, &model);
        image.close().unwrap();

        // Stopped without closing, after a flush and without one: never dirty, never corrupt.
        for flush in [true, false] {
            let disk = lazy_image();
            let mut image = open_writable(&disk).unwrap();
            let model = write_some(&mut image);
            if flush {
                image.flush().unwrap();
            }
            assert_eq!(disk.incompatible() & DIRTY, 0);
            drop(image);
            assert_eq!(disk.incompatible() & DIRTY, 0, "flush={flush}");
            let report = disk.check();
            assert_eq!(
                (report.corruptions, report.check_errors),
                (0, 0),
                "flush={flush}: {report:?}"
            );
            let mut image = open_writable(&disk).expect("opens for writing again");
            if flush {
                assert_reads(&mut image, &model);
            }
            image.close().unwrap();
        }
    }
}

#[cfg(feature = "dirty-repair")]
mod with_dirty_repair {
    use super::*;

    /// With the feature (the default) a lazy-refcounts writer sets the dirty bit, and a writable open of a
    /// dirty image rebuilds its refcounts: after a crash (a writer that stops after a flush, and one made by
    /// hand) the image opens for writing, every flushed write reads back and the check is clean.
    #[test]
    fn dirty_image_is_repaired_on_writable_open() {
        let disk = lazy_image();
        let mut image = open_writable(&disk).unwrap();
        let model = write_some(&mut image);
        image.flush().unwrap();
        assert_ne!(
            disk.incompatible() & DIRTY,
            0,
            "lazy writer without the dirty bit"
        );
        drop(image);
        let (made, made_model) = dirty_image_with_data();
        for (disk, model) in [(disk, model), (made, made_model)] {
            assert_ne!(disk.incompatible() & DIRTY, 0);
            let mut image = open_writable(&disk).expect("a dirty image is repaired on open");
            assert_reads(&mut image, &model);
            image.close().unwrap();
            assert_eq!(disk.incompatible() & DIRTY, 0);
            let report = disk.check();
            assert_eq!(
                (report.corruptions, report.leaks, report.check_errors),
                (0, 0, 0),
                "{report:?}"
            );
        }
    }
}
