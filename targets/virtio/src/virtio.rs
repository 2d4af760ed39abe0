//! A polled virtio-blk driver over the virtio-mmio transport of QEMU's `virt` machine, and qcow2-core's
//! block-device traits on top of it.
//!
//! The machine has [`SLOTS`] virtio-mmio register windows, [`SLOT_STRIDE`] bytes apart from [`MMIO_BASE`];
//! [`probe`] looks at one and brings up the block device behind it. The modern interface (version 2, virtio
//! 1.x: `VIRTIO_F_VERSION_1`, separate ring addresses, `QueueReady`) is used when the device offers it; a
//! legacy device (version 1: `QueuePFN`, one page-aligned ring area) works too.
//!
//! One split virtqueue of [`QUEUE_SIZE`] descriptors per device, one request in flight at a time, no
//! interrupts: a request is published in the available ring, the device notified, and the used ring polled
//! until the request comes back (or [`TIMEOUT_MS`] pass). Each request is a header, at most one data buffer
//! and a status byte, which is checked. The data buffer is the caller's own memory: the MMU is off, so
//! addresses are physical. Every failure is a [`VirtioError`]; nothing here panics.
//!
//! The rings and request headers live in [`RINGS`], whose fields are atomics: the device writes them
//! behind the compiler's back, and atomics make every access a real load or store without `unsafe`.

use core::hint::spin_loop;
use core::mem::offset_of;
use core::ptr;
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU32, AtomicU64};

use qcow2_core::{BlockDevice, BlockDeviceWrite};

use crate::arch::{Deadline, dsb};

/// First virtio-mmio window of the `virt` machine.
pub const MMIO_BASE: usize = 0x0a00_0000;
/// Distance between windows.
pub const SLOT_STRIDE: usize = 0x200;
/// Number of windows.
pub const SLOTS: usize = 32;
/// Devices that can be brought up at once (one ring each).
pub const MAX_DISKS: usize = 4;
/// virtio-blk addresses 512-byte sectors whatever the medium.
pub const SECTOR: usize = 512;
/// Descriptors in the queue (a request uses at most 3).
const QUEUE_SIZE: usize = 4;
/// Largest data buffer of one request; longer transfers are split.
const MAX_TRANSFER: usize = 64 * 1024;
/// How long a request may take.
const TIMEOUT_MS: u64 = 10_000;
/// Bytes of a virtio-blk device ID (`VIRTIO_BLK_T_GET_ID`).
pub const ID_LEN: usize = 20;

// Registers (virtio 1.2, 4.2.2; the legacy ones from 4.2.4).
const MAGIC: usize = 0x000;
const VERSION: usize = 0x004;
const DEVICE_ID: usize = 0x008;
const DEVICE_FEATURES: usize = 0x010;
const DEVICE_FEATURES_SEL: usize = 0x014;
const DRIVER_FEATURES: usize = 0x020;
const DRIVER_FEATURES_SEL: usize = 0x024;
const LEGACY_GUEST_PAGE_SIZE: usize = 0x028;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM_MAX: usize = 0x034;
const QUEUE_NUM: usize = 0x038;
const LEGACY_QUEUE_ALIGN: usize = 0x03c;
const LEGACY_QUEUE_PFN: usize = 0x040;
const QUEUE_READY: usize = 0x044;
const QUEUE_NOTIFY: usize = 0x050;
const INTERRUPT_STATUS: usize = 0x060;
const INTERRUPT_ACK: usize = 0x064;
const STATUS: usize = 0x070;
const QUEUE_DESC_LOW: usize = 0x080;
const QUEUE_DESC_HIGH: usize = 0x084;
const QUEUE_DRIVER_LOW: usize = 0x090;
const QUEUE_DRIVER_HIGH: usize = 0x094;
const QUEUE_DEVICE_LOW: usize = 0x0a0;
const QUEUE_DEVICE_HIGH: usize = 0x0a4;
const CONFIG_GENERATION: usize = 0x0fc;
const CONFIG: usize = 0x100;

/// "virt", little-endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
const BLOCK_DEVICE: u32 = 2;

// Device status bits.
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const FAILED: u32 = 128;

// Feature bits.
const F_SIZE_MAX: u64 = 1 << 1;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const F_VERSION_1: u64 = 1 << 32;

// virtio_blk_config offsets.
const CFG_CAPACITY: usize = 0;
const CFG_SIZE_MAX: usize = 8;

// Request types and status values.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

// Descriptor and ring flags.
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;
const AVAIL_NO_INTERRUPT: u16 = 1;

/// The legacy interface's page size, and so the alignment of the used ring.
const LEGACY_PAGE: usize = 4096;

/// What went wrong with a virtio-blk device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioError {
    /// Every ring is taken: more than [`MAX_DISKS`] devices.
    NoRing,
    /// The device does not offer a feature the driver needs.
    MissingFeature(&'static str),
    /// The device did not accept the features (`FEATURES_OK` did not stick).
    FeaturesRefused,
    /// The queue is already in use, or shorter than [`QUEUE_SIZE`].
    Queue,
    /// The device answered with `VIRTIO_BLK_S_IOERR`.
    DeviceIo,
    /// The device answered with `VIRTIO_BLK_S_UNSUPP`.
    Unsupported,
    /// The device answered with a status byte virtio-blk does not define.
    BadStatus(u8),
    /// The device gave back a request that was not in flight.
    BadCompletion(u32),
    /// The device reported fewer bytes written than the request's buffers hold.
    Short { want: u32, got: u32 },
    /// The request did not complete in time; the device is no longer used.
    Timeout,
    /// An earlier time-out left the queue in an unknown state.
    Broken,
    /// A write to a device that is read-only (`VIRTIO_BLK_F_RO`), or through a read-only handle.
    ReadOnly,
    /// A write past the end of the device (a disk cannot grow).
    OutOfRange,
    /// A buffer that is not a whole number of sectors.
    Unaligned,
}

#[repr(C)]
struct Desc {
    addr: AtomicU64,
    len: AtomicU32,
    flags: AtomicU16,
    next: AtomicU16,
}

#[repr(C)]
struct Avail {
    flags: AtomicU16,
    idx: AtomicU16,
    ring: [AtomicU16; QUEUE_SIZE],
    used_event: AtomicU16,
}

#[repr(C)]
struct UsedElem {
    id: AtomicU32,
    len: AtomicU32,
}

/// Page-aligned, so that the rings also have the legacy layout (used ring on the next page boundary after
/// the available ring).
#[repr(C, align(4096))]
struct Used {
    flags: AtomicU16,
    idx: AtomicU16,
    ring: [UsedElem; QUEUE_SIZE],
    avail_event: AtomicU16,
}

/// The request header (`struct virtio_blk_req`'s first 16 bytes), then the status byte and an ID buffer.
#[repr(C)]
struct Request {
    kind: AtomicU32,
    reserved: AtomicU32,
    sector: AtomicU64,
    status: AtomicU8,
    id: [AtomicU8; ID_LEN],
}

/// The memory one device shares with the driver.
#[repr(C, align(4096))]
pub struct Ring {
    desc: [Desc; QUEUE_SIZE],
    avail: Avail,
    used: Used,
    req: Request,
    claimed: AtomicBool,
}

// The legacy layout: descriptors, then the available ring, then the used ring at the next page boundary.
const _: () = assert!(offset_of!(Ring, avail) == 16 * QUEUE_SIZE);
const _: () = assert!(offset_of!(Ring, used) == LEGACY_PAGE);
// The header the device reads: 16 bytes from `kind`.
const _: () = assert!(offset_of!(Request, sector) == 8 && offset_of!(Request, status) == 16);

impl core::fmt::Debug for Ring {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Ring")
            .field("at", &format_args!("{:#x}", phys(self)))
            .finish_non_exhaustive()
    }
}

impl Ring {
    const fn new() -> Self {
        Ring {
            desc: [const {
                Desc {
                    addr: AtomicU64::new(0),
                    len: AtomicU32::new(0),
                    flags: AtomicU16::new(0),
                    next: AtomicU16::new(0),
                }
            }; QUEUE_SIZE],
            avail: Avail {
                flags: AtomicU16::new(0),
                idx: AtomicU16::new(0),
                ring: [const { AtomicU16::new(0) }; QUEUE_SIZE],
                used_event: AtomicU16::new(0),
            },
            used: Used {
                flags: AtomicU16::new(0),
                idx: AtomicU16::new(0),
                ring: [const {
                    UsedElem {
                        id: AtomicU32::new(0),
                        len: AtomicU32::new(0),
                    }
                }; QUEUE_SIZE],
                avail_event: AtomicU16::new(0),
            },
            req: Request {
                kind: AtomicU32::new(0),
                reserved: AtomicU32::new(0),
                sector: AtomicU64::new(0),
                status: AtomicU8::new(0),
                id: [const { AtomicU8::new(0) }; ID_LEN],
            },
            claimed: AtomicBool::new(false),
        }
    }

    /// Takes a free ring for good.
    fn claim() -> Option<&'static Ring> {
        RINGS.iter().find(|r| !r.claimed.swap(true, Relaxed))
    }

    /// Puts the rings in their initial state (before the device is told where they are).
    fn reset(&self) {
        for d in &self.desc {
            d.addr.store(0, Relaxed);
            d.len.store(0, Relaxed);
            d.flags.store(0, Relaxed);
            d.next.store(0, Relaxed);
        }
        // We poll: ask the device not to interrupt.
        self.avail.flags.store(AVAIL_NO_INTERRUPT, Relaxed);
        self.avail.idx.store(0, Relaxed);
        self.used.flags.store(0, Relaxed);
        self.used.idx.store(0, Relaxed);
    }

    fn set_desc(&self, i: usize, addr: u64, len: u32, flags: u16, next: u16) {
        let d = &self.desc[i % QUEUE_SIZE];
        d.addr.store(addr, Relaxed);
        d.len.store(len, Relaxed);
        d.flags.store(flags, Relaxed);
        d.next.store(next, Relaxed);
    }
}

/// The shared memory of every device the program can drive.
static RINGS: [Ring; MAX_DISKS] = [const { Ring::new() }; MAX_DISKS];

/// The physical address of `x` (the MMU is off: the same as its address).
fn phys<T: ?Sized>(x: &T) -> u64 {
    ptr::from_ref(x).cast::<u8>().expose_provenance() as u64
}

/// One virtio-mmio register window.
#[derive(Debug, Clone, Copy)]
struct Mmio(usize);

impl Mmio {
    /// The window of slot `slot` (below [`SLOTS`]).
    fn slot(slot: usize) -> Option<Self> {
        (slot < SLOTS).then(|| Mmio(MMIO_BASE + slot * SLOT_STRIDE))
    }

    fn read(self, offset: usize) -> u32 {
        // SAFETY: `self.0` is one of the `virt` machine's virtio-mmio windows (see `Mmio::slot`), which are
        // always mapped (an empty one reads device ID 0), and `offset` is one of the 32-bit registers above.
        unsafe { ptr::read_volatile(ptr::with_exposed_provenance::<u32>(self.0 + offset)) }
    }

    fn write(self, offset: usize, value: u32) {
        // SAFETY: as in `read`.
        unsafe {
            ptr::write_volatile(
                ptr::with_exposed_provenance_mut::<u32>(self.0 + offset),
                value,
            )
        }
    }

    fn write_addr(self, low: usize, high: usize, addr: u64) {
        self.write(low, addr as u32);
        self.write(high, (addr >> 32) as u32);
    }

    fn set_status(self, bits: u32) {
        self.write(STATUS, self.read(STATUS) | bits);
    }
}

/// What a request moves besides its header and status byte.
enum Data<'b> {
    None,
    /// The device fills the buffer.
    In(&'b mut [u8]),
    /// The device reads the buffer.
    Out(&'b [u8]),
    /// The device fills the ring's ID buffer.
    Id,
}

/// A virtio-blk device, brought up and ready for requests.
#[derive(Debug)]
pub struct Disk {
    regs: Mmio,
    ring: &'static Ring,
    slot: usize,
    legacy: bool,
    /// In sectors.
    capacity: u64,
    read_only: bool,
    flush: bool,
    /// Bytes per request at most (a multiple of [`SECTOR`]).
    max_transfer: usize,
    /// Our copy of the available ring's index.
    next_avail: u16,
    /// The used ring's index we have seen.
    last_used: u16,
    broken: bool,
    id: [u8; ID_LEN],
}

/// Looks at virtio-mmio slot `slot`: `None` when no block device is there, otherwise the device brought up
/// (or why it could not be).
pub fn probe(slot: usize) -> Option<Result<Disk, VirtioError>> {
    let regs = Mmio::slot(slot)?;
    if regs.read(MAGIC) != MAGIC_VALUE || regs.read(DEVICE_ID) != BLOCK_DEVICE {
        return None;
    }
    let legacy = match regs.read(VERSION) {
        1 => true,
        2 => false,
        _ => return None,
    };
    Some(Disk::init(regs, slot, legacy))
}

impl Disk {
    /// The device initialisation of virtio 1.2, 3.1 (3.1.2 for a legacy device).
    fn init(regs: Mmio, slot: usize, legacy: bool) -> Result<Self, VirtioError> {
        let ring = Ring::claim().ok_or(VirtioError::NoRing)?;
        regs.write(STATUS, 0);
        if !legacy {
            let reset = Deadline::after_ms(TIMEOUT_MS);
            while regs.read(STATUS) != 0 {
                if reset.passed() {
                    return Err(VirtioError::Timeout);
                }
                spin_loop();
            }
        }
        regs.set_status(ACKNOWLEDGE);
        regs.set_status(DRIVER);
        let disk = Self::setup(regs, ring, slot, legacy).and_then(|mut disk| {
            regs.set_status(DRIVER_OK);
            disk.read_id()?;
            Ok(disk)
        });
        if disk.is_err() {
            // The ring stays claimed: the device may still know its address.
            regs.set_status(FAILED);
        }
        disk
    }

    /// Features, queue and configuration: everything between `DRIVER` and `DRIVER_OK`.
    fn setup(
        regs: Mmio,
        ring: &'static Ring,
        slot: usize,
        legacy: bool,
    ) -> Result<Self, VirtioError> {
        regs.write(DEVICE_FEATURES_SEL, 0);
        let mut offered = u64::from(regs.read(DEVICE_FEATURES));
        if !legacy {
            regs.write(DEVICE_FEATURES_SEL, 1);
            offered |= u64::from(regs.read(DEVICE_FEATURES)) << 32;
            if offered & F_VERSION_1 == 0 {
                return Err(VirtioError::MissingFeature("VIRTIO_F_VERSION_1"));
            }
        }
        let wanted = if legacy { 0 } else { F_VERSION_1 } | F_RO | F_FLUSH | F_SIZE_MAX;
        let accepted = offered & wanted;
        regs.write(DRIVER_FEATURES_SEL, 0);
        regs.write(DRIVER_FEATURES, accepted as u32);
        if !legacy {
            regs.write(DRIVER_FEATURES_SEL, 1);
            regs.write(DRIVER_FEATURES, (accepted >> 32) as u32);
            regs.set_status(FEATURES_OK);
            if regs.read(STATUS) & FEATURES_OK == 0 {
                return Err(VirtioError::FeaturesRefused);
            }
        }

        regs.write(QUEUE_SEL, 0);
        let in_use = if legacy {
            regs.read(LEGACY_QUEUE_PFN) != 0
        } else {
            regs.read(QUEUE_READY) != 0
        };
        if in_use || (regs.read(QUEUE_NUM_MAX) as usize) < QUEUE_SIZE {
            return Err(VirtioError::Queue);
        }
        ring.reset();
        regs.write(QUEUE_NUM, QUEUE_SIZE as u32);
        if legacy {
            regs.write(LEGACY_GUEST_PAGE_SIZE, LEGACY_PAGE as u32);
            regs.write(LEGACY_QUEUE_ALIGN, LEGACY_PAGE as u32);
            let pfn = phys(ring) / LEGACY_PAGE as u64;
            regs.write(
                LEGACY_QUEUE_PFN,
                u32::try_from(pfn).map_err(|_| VirtioError::Queue)?,
            );
        } else {
            regs.write_addr(QUEUE_DESC_LOW, QUEUE_DESC_HIGH, phys(&ring.desc));
            regs.write_addr(QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, phys(&ring.avail));
            regs.write_addr(QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, phys(&ring.used));
            regs.write(QUEUE_READY, 1);
        }

        // The configuration, read again if it changed meanwhile (a legacy device has no generation count).
        let (capacity, size_max) = loop {
            let generation = regs.read(CONFIG_GENERATION);
            let capacity = u64::from(regs.read(CONFIG + CFG_CAPACITY))
                | u64::from(regs.read(CONFIG + CFG_CAPACITY + 4)) << 32;
            let size_max = regs.read(CONFIG + CFG_SIZE_MAX) as usize;
            if legacy || regs.read(CONFIG_GENERATION) == generation {
                break (capacity, size_max);
            }
        };
        let mut max_transfer = MAX_TRANSFER;
        if accepted & F_SIZE_MAX != 0 {
            max_transfer = max_transfer.min(size_max / SECTOR * SECTOR).max(SECTOR);
        }
        Ok(Disk {
            regs,
            ring,
            slot,
            legacy,
            capacity,
            read_only: accepted & F_RO != 0,
            flush: accepted & F_FLUSH != 0,
            max_transfer,
            next_avail: 0,
            last_used: 0,
            broken: false,
            id: [0; ID_LEN],
        })
    }

    /// Asks the device for its ID (QEMU: the `serial` property); a device without one has an empty name.
    fn read_id(&mut self) -> Result<(), VirtioError> {
        match self.request(T_GET_ID, 0, Data::Id) {
            Ok(()) => {}
            Err(VirtioError::Unsupported) => return Ok(()),
            Err(e) => return Err(e),
        }
        for (dst, src) in self.id.iter_mut().zip(&self.ring.req.id) {
            *dst = src.load(Relaxed);
        }
        Ok(())
    }

    /// The device's ID up to its first NUL.
    pub fn name(&self) -> &[u8] {
        let len = self.id.iter().position(|&b| b == 0).unwrap_or(ID_LEN);
        self.id.get(..len).unwrap_or_default()
    }

    /// The virtio-mmio slot.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// Whether the device has the legacy interface.
    pub fn legacy(&self) -> bool {
        self.legacy
    }

    /// Size in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the device is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// One request: header, optional data, status byte; waits for it to come back.
    fn request(&mut self, kind: u32, sector: u64, data: Data<'_>) -> Result<(), VirtioError> {
        if self.broken {
            return Err(VirtioError::Broken);
        }
        let ring = self.ring;
        let req = &ring.req;
        req.kind.store(kind, Relaxed);
        req.reserved.store(0, Relaxed);
        req.sector.store(sector, Relaxed);
        req.status.store(0xff, Relaxed);
        // Descriptor 0: the header; then the data, if any; then the status byte.
        let (data, written) = match data {
            Data::None => (None, 0u32),
            Data::In(buf) => {
                let len = u32::try_from(buf.len()).map_err(|_| VirtioError::Unaligned)?;
                (
                    Some((buf.as_mut_ptr().expose_provenance() as u64, len, DESC_WRITE)),
                    len,
                )
            }
            Data::Out(buf) => {
                let len = u32::try_from(buf.len()).map_err(|_| VirtioError::Unaligned)?;
                (Some((buf.as_ptr().expose_provenance() as u64, len, 0)), 0)
            }
            Data::Id => {
                for b in &req.id {
                    b.store(0, Relaxed);
                }
                (
                    Some((phys(&req.id), ID_LEN as u32, DESC_WRITE)),
                    ID_LEN as u32,
                )
            }
        };
        let mut next = 1u16;
        ring.set_desc(0, phys(&req.kind), 16, DESC_NEXT, next);
        if let Some((addr, len, flags)) = data {
            ring.set_desc(1, addr, len, flags | DESC_NEXT, 2);
            next = 2;
        }
        ring.set_desc(usize::from(next), phys(&req.status), 1, DESC_WRITE, 0);
        let slot = usize::from(self.next_avail) % QUEUE_SIZE;
        ring.avail.ring[slot].store(0, Relaxed);
        self.next_avail = self.next_avail.wrapping_add(1);
        dsb();
        ring.avail.idx.store(self.next_avail, Release);
        dsb();
        self.regs.write(QUEUE_NOTIFY, 0);

        let deadline = Deadline::after_ms(TIMEOUT_MS);
        while ring.used.idx.load(Acquire) == self.last_used {
            if deadline.passed() {
                self.broken = true;
                return Err(VirtioError::Timeout);
            }
            spin_loop();
        }
        dsb();
        let elem = &ring.used.ring[usize::from(self.last_used) % QUEUE_SIZE];
        let (id, len) = (elem.id.load(Relaxed), elem.len.load(Relaxed));
        self.last_used = self.last_used.wrapping_add(1);
        // Interrupts are off, but clear what the device may have raised anyway.
        let pending = self.regs.read(INTERRUPT_STATUS);
        if pending != 0 {
            self.regs.write(INTERRUPT_ACK, pending);
        }
        if id != 0 {
            self.broken = true;
            return Err(VirtioError::BadCompletion(id));
        }
        match req.status.load(Relaxed) {
            S_OK => {}
            S_IOERR => return Err(VirtioError::DeviceIo),
            S_UNSUPP => return Err(VirtioError::Unsupported),
            s => return Err(VirtioError::BadStatus(s)),
        }
        // The length the device reports counts the status byte. Legacy devices are known to get it wrong
        // (virtio 1.2, 2.7.8.2), so only a modern one is held to it.
        let want = written.saturating_add(1);
        if !self.legacy && len < want {
            return Err(VirtioError::Short { want, got: len });
        }
        Ok(())
    }

    /// Reads whole sectors from `sector`; sectors past the end read as zeros.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), VirtioError> {
        if !buf.len().is_multiple_of(SECTOR) {
            return Err(VirtioError::Unaligned);
        }
        let inside = self.capacity.saturating_sub(sector);
        let inside = usize::try_from(inside).unwrap_or(usize::MAX);
        let split = buf.len().min(inside.saturating_mul(SECTOR));
        let (head, tail) = buf.split_at_mut(split);
        tail.fill(0);
        let mut s = sector;
        for piece in head.chunks_mut(self.max_transfer) {
            let n = (piece.len() / SECTOR) as u64;
            self.request(T_IN, s, Data::In(piece))?;
            s = s.saturating_add(n);
        }
        Ok(())
    }

    /// Writes whole sectors from `sector`, all inside the device.
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), VirtioError> {
        if self.read_only {
            return Err(VirtioError::ReadOnly);
        }
        if !buf.len().is_multiple_of(SECTOR) {
            return Err(VirtioError::Unaligned);
        }
        let end = sector.checked_add((buf.len() / SECTOR) as u64);
        if end.is_none_or(|end| end > self.capacity) {
            return Err(VirtioError::OutOfRange);
        }
        let mut s = sector;
        for piece in buf.chunks(self.max_transfer) {
            self.request(T_OUT, s, Data::Out(piece))?;
            s = s.saturating_add((piece.len() / SECTOR) as u64);
        }
        Ok(())
    }

    /// Makes completed writes durable: `VIRTIO_BLK_T_FLUSH` when the device has a write cache
    /// (`VIRTIO_BLK_F_FLUSH`); without one, completed writes already are.
    pub fn flush(&mut self) -> Result<(), VirtioError> {
        if self.flush {
            self.request(T_FLUSH, 0, Data::None)
        } else {
            Ok(())
        }
    }
}

impl BlockDevice for Disk {
    type Error = VirtioError;

    fn block_size(&self) -> usize {
        SECTOR
    }

    fn size(&mut self) -> Result<u64, VirtioError> {
        self.capacity
            .checked_mul(SECTOR as u64)
            .ok_or(VirtioError::OutOfRange)
    }

    fn read_blocks(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), VirtioError> {
        self.read(lba, buf)
    }
}

impl BlockDeviceWrite for Disk {
    fn write_blocks(&mut self, lba: u64, buf: &[u8]) -> Result<(), VirtioError> {
        self.write(lba, buf)
    }

    fn flush(&mut self) -> Result<(), VirtioError> {
        Disk::flush(self)
    }
}
