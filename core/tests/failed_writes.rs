//! Writes that fail because the device has no room left (a firmware disk cannot grow): the request fails
//! with the device's error, the clusters allocated for it go back (no leak, not even past the end of the
//! file), the image closes clean, and the same write succeeds once there is room.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use qcow2_core::check::{self, CheckReport, NoSink};
use qcow2_core::create::{CreateOptions, create};
use qcow2_core::{BlockDevice, BlockDeviceWrite, Buffers, Error, Image, NoDecompressor, NoFiles};

const SIZE: u64 = 64 << 20;

#[derive(Debug, PartialEq)]
struct Full;

/// A disk in memory that refuses writes ending past `limit` bytes (when set), as a fixed-size disk does.
#[derive(Clone, Default)]
struct Disk {
    bytes: Rc<RefCell<Vec<u8>>>,
    limit: Rc<Cell<Option<usize>>>,
}

impl Disk {
    fn len(&self) -> usize {
        self.bytes.borrow().len()
    }

    /// No room past the current end of the file.
    fn freeze(&self) {
        self.limit.set(Some(self.len()));
    }

    fn thaw(&self) {
        self.limit.set(None);
    }

    /// `check` over the file grown by `extra` zero bytes, so that refcounts of clusters past its old end are
    /// compared with their references too.
    fn check_grown(&self, extra: usize) -> CheckReport {
        let grown = Disk::default();
        let mut bytes = self.bytes.borrow().clone();
        bytes.resize(bytes.len() + extra, 0);
        *grown.bytes.borrow_mut() = bytes;
        check::check(
            &mut grown.clone(),
            &mut [0u8; 512],
            &mut vec![0u8; 1 << 16],
            &mut NoSink,
        )
        .expect("check runs")
    }
}

impl BlockDevice for Disk {
    type Error = Full;

    fn block_size(&self) -> usize {
        512
    }

    fn size(&mut self) -> Result<u64, Full> {
        Ok(self.len() as u64)
    }

    fn read_blocks(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), Full> {
        let d = self.bytes.borrow();
        let start = lba as usize * 512;
        for (i, b) in buf.iter_mut().enumerate() {
            *b = d.get(start + i).copied().unwrap_or(0);
        }
        Ok(())
    }
}

impl BlockDeviceWrite for Disk {
    fn write_blocks(&mut self, lba: u64, buf: &[u8]) -> Result<(), Full> {
        let start = lba as usize * 512;
        let end = start + buf.len();
        if self.limit.get().is_some_and(|limit| end > limit) {
            return Err(Full);
        }
        let mut d = self.bytes.borrow_mut();
        if d.len() < end {
            d.resize(end, 0);
        }
        d[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Full> {
        Ok(())
    }
}

type Img = Image<Disk, Vec<u8>, NoDecompressor, 2, 4, qcow2_core::WriteState>;

fn open_writable(disk: &Disk) -> Img {
    let buffers = Buffers {
        bounce: vec![0u8; 512],
        metadata: vec![0u8; 4 * 512],
    };
    Image::open_writable(disk.clone(), buffers, NoDecompressor, &mut NoFiles).expect("open")
}

fn image(cluster_size: u64, lazy_refcounts: bool, extended_l2: bool) -> Disk {
    let mut disk = Disk::default();
    let opts = CreateOptions {
        size: SIZE,
        cluster_size,
        lazy_refcounts,
        extended_l2,
        ..Default::default()
    };
    create(&mut disk, &mut [0u8; 512], &opts).expect("create");
    // Data in the first L2 table's range (so that it exists), nothing beyond.
    let mut img = open_writable(&disk);
    img.write_at(0, &[0x11; 8192]).unwrap();
    img.close().unwrap();
    disk
}

fn assert_clean(disk: &Disk, cluster_size: u64, what: &str) {
    let report = disk.check_grown(16 * cluster_size as usize);
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "{what}: check of the file grown by 16 clusters: {report:?}"
    );
}

fn read(img: &mut Img, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    img.read_at(offset, &mut buf).unwrap();
    buf
}

#[test]
fn a_write_that_finds_no_room_gives_its_clusters_back() {
    for (cs, lazy, extended) in [
        (4096, false, false),
        (4096, true, false),
        (16384, false, true),
    ] {
        let cfg = format!("cluster_size={cs} lazy_refcounts={lazy} extended_l2={extended}");
        // (offset, length): a new data cluster under an existing L2 table, written whole and in part (the
        // rest copied around it first); and one that needs a new L2 table as well.
        for (offset, len) in [
            (16 * cs, cs as usize),
            (20 * cs + 100, 512),
            (48 << 20, 4096),
        ] {
            let what = format!("{cfg}, write of {len} bytes at {offset}");
            let disk = image(cs, lazy, extended);
            let before = disk.len();
            disk.freeze();
            let mut img = open_writable(&disk);
            let err = img.write_at(offset, &vec![0x5a; len]).unwrap_err();
            assert!(matches!(err, Error::Io(Full)), "{what}: {err:?}");
            // Nothing changed for the guest, and the image goes on working.
            assert_eq!(read(&mut img, offset, len), vec![0; len], "{what}");
            assert_eq!(read(&mut img, 0, 8192), vec![0x11; 8192], "{what}");
            img.close().unwrap();
            assert_eq!(disk.len(), before, "{what}: the file grew");
            assert_clean(&disk, cs, &what);

            // With room, the same write goes through and the image stays clean.
            disk.thaw();
            let mut img = open_writable(&disk);
            img.write_at(offset, &vec![0x5a; len]).unwrap();
            assert_eq!(read(&mut img, offset, len), vec![0x5a; len], "{what}");
            img.close().unwrap();
            assert_clean(&disk, cs, &format!("{what}, written with room"));
        }
    }
}
