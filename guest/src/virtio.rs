//! A polling virtio-blk driver over virtio-mmio (version 2), one request at
//! a time on queue 0, no interrupts.

use core::ptr::{addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

const MAGIC: u32 = 0x7472_6976;
const R_MAGIC: u64 = 0x000;
const R_VERSION: u64 = 0x004;
const R_DEVICE_ID: u64 = 0x008;
const R_DEV_FEATURES: u64 = 0x010;
const R_DEV_FEATURES_SEL: u64 = 0x014;
const R_DRV_FEATURES: u64 = 0x020;
const R_DRV_FEATURES_SEL: u64 = 0x024;
const R_QUEUE_SEL: u64 = 0x030;
const R_QUEUE_NUM_MAX: u64 = 0x034;
const R_QUEUE_NUM: u64 = 0x038;
const R_QUEUE_READY: u64 = 0x044;
const R_QUEUE_NOTIFY: u64 = 0x050;
const R_STATUS: u64 = 0x070;
const R_DESC_LO: u64 = 0x080;
const R_DESC_HI: u64 = 0x084;
const R_AVAIL_LO: u64 = 0x090;
const R_AVAIL_HI: u64 = 0x094;
const R_USED_LO: u64 = 0x0a0;
const R_USED_HI: u64 = 0x0a4;
const R_CONFIG: u64 = 0x100;

const S_ACK: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;

const QSIZE: usize = 8;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

/// Feature bits (in the low word) the driver accepts when offered.
const F_DISCARD: u32 = 1 << 13;
const F_WRITE_ZEROES: u32 = 1 << 14;
/// Bytes of one discard/write-zeroes segment.
const SEGMENT: usize = 16;

/// Bytes of the bounce buffer: the most one request moves.
pub const BUF_SIZE: usize = 256 * 1024;

#[repr(C, align(4096))]
struct Dma {
    desc: [[u8; 16]; QSIZE],
    avail: [u16; 2 + QSIZE + 1],
    _pad: [u8; 1024],
    used: [u32; 1 + 2 * QSIZE + 1],
    hdr: [u8; 16],
    status: u8,
    buf: Buf,
}

#[repr(C, align(4096))]
struct Buf([u8; BUF_SIZE]);

static mut DMA: Dma = Dma {
    desc: [[0; 16]; QSIZE],
    avail: [0; 2 + QSIZE + 1],
    _pad: [0; 1024],
    used: [0; 1 + 2 * QSIZE + 1],
    hdr: [0; 16],
    status: 0,
    buf: Buf([0; BUF_SIZE]),
};

pub struct Blk {
    base: u64,
    pub capacity: u64,
    avail_idx: u16,
    /// Limits of DISCARD (if negotiated): most sectors per segment, most
    /// segments per request.
    discard: Option<(u32, u32)>,
    /// Limits of WRITE_ZEROES (if negotiated).
    write_zeroes: Option<(u32, u32)>,
}

fn rd(base: u64, off: u64) -> u32 {
    // SAFETY: base is the device's MMIO window (identity-mapped); the access exits to the VMM.
    unsafe { read_volatile((base + off) as *const u32) }
}

fn wr(base: u64, off: u64, v: u32) {
    // SAFETY: as in `rd`.
    unsafe { write_volatile((base + off) as *mut u32, v) }
}

fn dma() -> *mut Dma {
    addr_of_mut!(DMA)
}

/// The bounce buffer requests read from and write to.
pub fn buffer() -> &'static mut [u8; BUF_SIZE] {
    // SAFETY: the guest is single-threaded and callers do not keep two references.
    unsafe { &mut (*dma()).buf.0 }
}

impl Blk {
    /// Negotiates the device at `base`; `Err` names what is wrong.
    pub fn init(base: u64) -> Result<Blk, &'static str> {
        if rd(base, R_MAGIC) != MAGIC || rd(base, R_VERSION) != 2 || rd(base, R_DEVICE_ID) != 2 {
            return Err("no virtio-blk device");
        }
        wr(base, R_STATUS, 0);
        wr(base, R_STATUS, S_ACK);
        wr(base, R_STATUS, S_ACK | S_DRIVER);
        wr(base, R_DEV_FEATURES_SEL, 1);
        if rd(base, R_DEV_FEATURES) & 1 == 0 {
            return Err("virtio-blk lacks VIRTIO_F_VERSION_1");
        }
        wr(base, R_DEV_FEATURES_SEL, 0);
        let accepted = rd(base, R_DEV_FEATURES) & (F_DISCARD | F_WRITE_ZEROES);
        wr(base, R_DRV_FEATURES_SEL, 0);
        wr(base, R_DRV_FEATURES, accepted);
        wr(base, R_DRV_FEATURES_SEL, 1);
        wr(base, R_DRV_FEATURES, 1);
        wr(base, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        if rd(base, R_STATUS) & S_FEATURES_OK == 0 {
            return Err("virtio-blk refused features");
        }
        wr(base, R_QUEUE_SEL, 0);
        if (rd(base, R_QUEUE_NUM_MAX) as usize) < QSIZE {
            return Err("virtio-blk queue too small");
        }
        wr(base, R_QUEUE_NUM, QSIZE as u32);
        let d = dma();
        // SAFETY: only addresses of the static are taken.
        let (desc, avail, used) = unsafe {
            (addr_of_mut!((*d).desc) as u64, addr_of_mut!((*d).avail) as u64, addr_of_mut!((*d).used) as u64)
        };
        wr(base, R_DESC_LO, desc as u32);
        wr(base, R_DESC_HI, (desc >> 32) as u32);
        wr(base, R_AVAIL_LO, avail as u32);
        wr(base, R_AVAIL_HI, (avail >> 32) as u32);
        wr(base, R_USED_LO, used as u32);
        wr(base, R_USED_HI, (used >> 32) as u32);
        wr(base, R_QUEUE_READY, 1);
        wr(base, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        let capacity = (rd(base, R_CONFIG) as u64 | ((rd(base, R_CONFIG + 4) as u64) << 32)) * 512;
        // SAFETY: single-threaded access to the static.
        let avail_idx = unsafe { read_volatile(addr_of_mut!((*d).avail[1])) };
        let limits = |feature: u32, off: u64| {
            let sectors = rd(base, R_CONFIG + off);
            let segs = rd(base, R_CONFIG + off + 4);
            (accepted & feature != 0 && sectors > 0 && segs > 0).then_some((sectors, segs))
        };
        let discard = limits(F_DISCARD, 36);
        let write_zeroes = limits(F_WRITE_ZEROES, 48);
        Ok(Blk { base, capacity, avail_idx, discard, write_zeroes })
    }

    /// Discards (`T_DISCARD`) or zeroes (`T_WRITE_ZEROES`, flags 0: kept
    /// allocated) `size` bytes at byte `offset` (multiples of 512), in as
    /// few requests as the device's limits allow.
    pub fn zero(&mut self, kind: u32, offset: u64, size: u64) -> Result<(), &'static str> {
        let limits = if kind == T_DISCARD { self.discard } else { self.write_zeroes };
        let (max_sectors, max_segs) = limits.ok_or("disk does not support this request")?;
        let max_segs = core::cmp::min(max_segs as usize, BUF_SIZE / SEGMENT);
        let mut sector = offset / 512;
        let end = (offset + size) / 512;
        while sector < end {
            let buf = buffer();
            let mut n = 0;
            while n < max_segs && sector < end {
                let num = core::cmp::min(end - sector, max_sectors as u64);
                let e = &mut buf[n * SEGMENT..(n + 1) * SEGMENT];
                e[0..8].copy_from_slice(&sector.to_le_bytes());
                e[8..12].copy_from_slice(&(num as u32).to_le_bytes());
                e[12..16].copy_from_slice(&0u32.to_le_bytes());
                sector += num;
                n += 1;
            }
            self.request(kind, 0, n * SEGMENT)?;
        }
        Ok(())
    }

    fn set_desc(i: usize, addr: u64, len: u32, flags: u16, next: u16) {
        let mut e = [0u8; 16];
        e[0..8].copy_from_slice(&addr.to_le_bytes());
        e[8..12].copy_from_slice(&len.to_le_bytes());
        e[12..14].copy_from_slice(&flags.to_le_bytes());
        e[14..16].copy_from_slice(&next.to_le_bytes());
        // SAFETY: i < QSIZE; single-threaded access to the static.
        unsafe { write_volatile(addr_of_mut!((*dma()).desc[i]), e) };
    }

    /// Runs one request on `len` bytes of the bounce buffer at byte `offset`
    /// of the disk (a multiple of 512).
    pub fn request(&mut self, kind: u32, offset: u64, len: usize) -> Result<(), &'static str> {
        let d = dma();
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&(offset / 512).to_le_bytes());
        // SAFETY: single-threaded access to the static; addresses stay inside it.
        unsafe {
            write_volatile(addr_of_mut!((*d).hdr), hdr);
            write_volatile(addr_of_mut!((*d).status), 0xff);
            let hdr_a = addr_of_mut!((*d).hdr) as u64;
            let st_a = addr_of_mut!((*d).status) as u64;
            let buf_a = addr_of_mut!((*d).buf) as u64;
            if len > 0 {
                Self::set_desc(0, hdr_a, 16, F_NEXT, 1);
                let f = if kind == T_IN { F_WRITE | F_NEXT } else { F_NEXT };
                Self::set_desc(1, buf_a, len as u32, f, 2);
                Self::set_desc(2, st_a, 1, F_WRITE, 0);
            } else {
                Self::set_desc(0, hdr_a, 16, F_NEXT, 2);
                Self::set_desc(2, st_a, 1, F_WRITE, 0);
            }
            let slot = self.avail_idx as usize % QSIZE;
            write_volatile(addr_of_mut!((*d).avail[2 + slot]), 0);
            fence(Ordering::SeqCst);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            write_volatile(addr_of_mut!((*d).avail[1]), self.avail_idx);
            fence(Ordering::SeqCst);
            wr(self.base, R_QUEUE_NOTIFY, 0);
            let mut spins = 0u64;
            loop {
                let used_idx = (read_volatile(addr_of_mut!((*d).used[0])) >> 16) as u16;
                if used_idx == self.avail_idx {
                    break;
                }
                spins += 1;
                if spins > 100_000_000 {
                    return Err("virtio-blk request timed out");
                }
                core::hint::spin_loop();
            }
            fence(Ordering::SeqCst);
            match read_volatile(addr_of_mut!((*d).status)) {
                0 => Ok(()),
                1 => Err("disk I/O error"),
                _ => Err("disk request unsupported"),
            }
        }
    }
}
