//! virtio-blk over virtio-mmio (version 2), one request queue, no
//! interrupts (the test guest polls the used ring), DISCARD and
//! WRITE_ZEROES as holes in the disk file. Requests are served
//! synchronously when the guest writes QueueNotify.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::persist::{Codec, Persist, Reader, Writer};
use crate::vstate::memory::{Memory, PAGE_SIZE};
use kimberley_machine::Bitmap;

const MAGIC: u32 = 0x7472_6976;
const VENDOR: u32 = 0x4b49_4d42; // "KIMB"
const DEVICE_BLOCK: u32 = 2;
const QUEUE_MAX: u16 = 256;

const F_BLK_FLUSH: u64 = 1 << 9;
const F_BLK_DISCARD: u64 = 1 << 13;
const F_BLK_WRITE_ZEROES: u64 = 1 << 14;
const F_VERSION_1: u64 = 1 << 32;
const FEATURES: u64 = F_VERSION_1 | F_BLK_FLUSH | F_BLK_DISCARD | F_BLK_WRITE_ZEROES;

const S_FEATURES_OK: u32 = 8;
const S_DRIVER_OK: u32 = 4;
const S_NEEDS_RESET: u32 = 64;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const ST_OK: u8 = 0;
const ST_IOERR: u8 = 1;
const ST_UNSUPP: u8 = 2;

const D_NEXT: u16 = 1;
const D_WRITE: u16 = 2;

/// Bytes of one `struct virtio_blk_discard_write_zeroes` segment: le64
/// sector, le32 num_sectors, le32 flags.
const SEGMENT: u64 = 16;
/// Segment flag: the range may be deallocated (WRITE_ZEROES only).
const SEG_UNMAP: u32 = 1;
/// Most sectors one DISCARD or WRITE_ZEROES segment may cover
/// (`max_discard_sectors`, `max_write_zeroes_sectors`): 1 GiB.
pub const MAX_ZERO_SECTORS: u32 = 1 << 21;
/// Most segments in one DISCARD or WRITE_ZEROES request
/// (`max_discard_seg`, `max_write_zeroes_seg`).
pub const MAX_ZERO_SEGMENTS: u32 = 64;
/// `discard_sector_alignment`: 4 KiB, the block of the written-block log.
const DISCARD_ALIGNMENT: u32 = 8;
/// Bytes of the config space (`struct virtio_blk_config` up to
/// `write_zeroes_may_unmap` and its padding).
const CONFIG_SIZE: usize = 60;

/// Bytes moved per disk read or write call.
const CHUNK: usize = 1 << 20;
/// Disk block size for the written-blocks bitmap.
pub const DISK_BLOCK: u64 = 4096;

/// Queue registers and the device's ring positions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueState {
    /// Negotiated size (0 = not set).
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// Next available-ring slot the device will read.
    pub next_avail: u16,
    /// Next used-ring slot the device will write.
    pub next_used: u16,
}

/// Saved transport and queue state of one disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockState {
    /// Disk size in bytes when saved (checked on restore).
    pub disk_size: u64,
    /// Device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub dev_features_sel: u32,
    /// DriverFeaturesSel.
    pub drv_features_sel: u32,
    /// Features the driver accepted.
    pub drv_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Queue 0.
    pub queue: QueueState,
}

/// One virtio-blk device backed by a raw disk file.
pub struct VirtioBlk {
    file: File,
    path: PathBuf,
    mem: Memory,
    s: BlockState,
    dirty_mem: Bitmap,
    dirty_blocks: Bitmap,
    /// Waits until the bytes a request touches have arrived (a launch VM
    /// started before its overlay was applied); dropped once the whole
    /// disk has.
    gate: Option<DiskGate>,
}

/// Blocks until bytes `[offset, offset + len)` of a disk that is still
/// being written may be read and written (`Ok(true)`: and so may the whole
/// disk from now on); an error fails the request (the apply failed: the VM
/// is being discarded).
pub type DiskGate = Box<dyn FnMut(u64, u64) -> std::io::Result<bool> + Send>;

impl std::fmt::Debug for VirtioBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBlk")
            .field("path", &self.path)
            .field("state", &self.s)
            .field("gated", &self.gate.is_some())
            .finish_non_exhaustive()
    }
}

struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
}

impl VirtioBlk {
    /// Opens `path` read-write as the backing disk: a regular file, not
    /// reached through a symbolic link (see
    /// `kimberley_formats::fsutil::open_regular`).
    pub fn open(path: &Path, mem: Memory) -> Result<VirtioBlk> {
        let file = kimberley_formats::fsutil::open_regular(path, true)
            .map_err(|e| Error::io(format!("open disk {}", path.display()), e))?;
        Self::from_file(file, path, mem)
    }

    /// Uses `file`, opened read-write by the caller, as the backing disk
    /// (`path` names it in messages and [`VirtioBlk::path`]). Its size is
    /// taken from the file itself.
    pub fn from_file(file: File, path: &Path, mem: Memory) -> Result<VirtioBlk> {
        kimberley_formats::fsutil::check_regular(&file)
            .map_err(|e| Error::io(format!("disk {}", path.display()), e))?;
        let size = file
            .metadata()
            .map_err(|e| Error::io(format!("stat disk {}", path.display()), e))?
            .len();
        let pages = mem.size() / PAGE_SIZE;
        Ok(VirtioBlk {
            file,
            path: path.to_path_buf(),
            mem,
            s: BlockState {
                disk_size: size,
                ..Default::default()
            },
            dirty_mem: Bitmap::new(pages),
            dirty_blocks: Bitmap::new(size.div_ceil(DISK_BLOCK) as usize),
            gate: None,
        })
    }

    /// Makes requests wait on `gate` until it lets the disk be used.
    pub fn set_gate(&mut self, gate: DiskGate) {
        self.gate = Some(gate);
    }

    /// Path of the backing file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes the backing file to stable storage.
    pub fn flush(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io(format!("sync disk {}", self.path.display()), e))
    }

    /// Guest pages this device wrote since the last call (fetch-and-clear).
    pub fn take_dirty_pages(&mut self) -> Bitmap {
        self.dirty_mem.take()
    }

    /// 4 KiB disk blocks the guest wrote since the last call (fetch-and-clear).
    pub fn take_dirty_blocks(&mut self) -> Bitmap {
        self.dirty_blocks.take()
    }

    fn capacity_sectors(&self) -> u64 {
        self.s.disk_size / 512
    }

    /// The config space (virtio 1.2 §5.2.4): capacity at 0, the discard
    /// and write-zeroes limits at 36..57; the fields between are 0 (their
    /// features are not offered).
    fn config(&self) -> [u8; CONFIG_SIZE] {
        let mut w = kimberley_formats::le::Writer::with_capacity(CONFIG_SIZE);
        w.u64(self.capacity_sectors());
        w.zeros(36 - 8); // size_max .. writeback, unused0, num_queues
        w.u32(MAX_ZERO_SECTORS); // max_discard_sectors
        w.u32(MAX_ZERO_SEGMENTS); // max_discard_seg
        w.u32(DISCARD_ALIGNMENT); // discard_sector_alignment
        w.u32(MAX_ZERO_SECTORS); // max_write_zeroes_sectors
        w.u32(MAX_ZERO_SEGMENTS); // max_write_zeroes_seg
        w.u8(1); // write_zeroes_may_unmap
        w.zeros(3);
        let mut c = [0u8; CONFIG_SIZE];
        c.copy_from_slice(&w.into_inner());
        c
    }

    /// Guest read of `data.len()` bytes at `offset` in the device window.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            let c = self.config();
            for (i, b) in data.iter_mut().enumerate() {
                let at = (offset - 0x100).saturating_add(i as u64);
                *b = usize::try_from(at)
                    .ok()
                    .and_then(|at| c.get(at).copied())
                    .unwrap_or(0);
            }
            return;
        }
        let q = &self.s.queue;
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => DEVICE_BLOCK,
            0x00c => VENDOR,
            0x010 => match self.s.dev_features_sel {
                0 => FEATURES as u32,
                1 => (FEATURES >> 32) as u32,
                _ => 0,
            },
            0x034 if self.s.queue_sel == 0 => QUEUE_MAX as u32,
            0x044 => (self.s.queue_sel == 0 && q.ready) as u32,
            0x060 => self.s.interrupt_status,
            0x070 => self.s.status,
            0x0fc => self.s.config_generation,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    /// Guest write of `data` at `offset` in the device window.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 4 || offset >= 0x100 {
            return; // registers are 32-bit; the config space is read-only
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let q0 = self.s.queue_sel == 0;
        let setup = q0 && !self.s.queue.ready;
        let lo = |a: u64| (a & !0xffff_ffff) | v as u64;
        let hi = |a: u64| (a & 0xffff_ffff) | ((v as u64) << 32);
        match offset {
            0x014 => self.s.dev_features_sel = v,
            0x020 => match self.s.drv_features_sel {
                0 => self.s.drv_features = (self.s.drv_features & !0xffff_ffff) | v as u64,
                1 => self.s.drv_features = (self.s.drv_features & 0xffff_ffff) | ((v as u64) << 32),
                _ => {}
            },
            0x024 => self.s.drv_features_sel = v,
            0x030 => self.s.queue_sel = v,
            0x038 if setup && v > 0 && v <= QUEUE_MAX as u32 && v.is_power_of_two() => {
                self.s.queue.size = v as u16;
            }
            0x044 if q0 => self.s.queue.ready = v == 1 && self.s.queue.size > 0,
            0x050 => self.process_queue(),
            0x064 => self.s.interrupt_status &= !v,
            0x070 => self.write_status(v),
            0x080 if setup => self.s.queue.desc = lo(self.s.queue.desc),
            0x084 if setup => self.s.queue.desc = hi(self.s.queue.desc),
            0x090 if setup => self.s.queue.avail = lo(self.s.queue.avail),
            0x094 if setup => self.s.queue.avail = hi(self.s.queue.avail),
            0x0a0 if setup => self.s.queue.used = lo(self.s.queue.used),
            0x0a4 if setup => self.s.queue.used = hi(self.s.queue.used),
            _ => {}
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            let disk_size = self.s.disk_size;
            let generation = self.s.config_generation;
            self.s = BlockState {
                disk_size,
                config_generation: generation,
                ..Default::default()
            };
            return;
        }
        let mut v = v;
        if v & S_FEATURES_OK != 0 && self.s.status & S_FEATURES_OK == 0 {
            let ok = self.s.drv_features & !FEATURES == 0 && self.s.drv_features & F_VERSION_1 != 0;
            if !ok {
                v &= !S_FEATURES_OK;
            }
        }
        self.s.status = v;
    }

    fn rd16(&self, addr: u64) -> Option<u16> {
        let mut b = [0u8; 2];
        self.mem.read(addr, &mut b).ok()?;
        Some(u16::from_le_bytes(b))
    }

    fn desc(&self, i: u16) -> Option<Desc> {
        let mut b = [0u8; 16];
        self.mem
            .read(self.s.queue.desc.checked_add(16 * i as u64)?, &mut b)
            .ok()?;
        Some(Desc {
            addr: u64::from_le_bytes(b[0..8].try_into().ok()?),
            len: u32::from_le_bytes(b[8..12].try_into().ok()?),
            flags: u16::from_le_bytes([b[12], b[13]]),
        })
    }

    fn process_queue(&mut self) {
        let q = self.s.queue;
        if !q.ready || self.s.status & S_DRIVER_OK == 0 || self.s.status & S_NEEDS_RESET != 0 {
            return;
        }
        let Some(avail_idx) = self.rd16(q.avail.wrapping_add(2)) else {
            return self.broken();
        };
        let mut budget = q.size;
        while self.s.queue.next_avail != avail_idx && budget > 0 {
            budget -= 1;
            let slot = self.s.queue.next_avail % q.size;
            let Some(head) = self.rd16(q.avail.wrapping_add(4 + 2 * slot as u64)) else {
                return self.broken();
            };
            let Some(written) = self.handle_chain(head) else {
                return self.broken();
            };
            let uslot = self.s.queue.next_used % q.size;
            let mut e = [0u8; 8];
            e[0..4].copy_from_slice(&(head as u32).to_le_bytes());
            e[4..8].copy_from_slice(&written.to_le_bytes());
            let next_used = self.s.queue.next_used.wrapping_add(1);
            if self
                .write_guest(q.used.wrapping_add(4 + 8 * uslot as u64), &e)
                .is_err()
                || self
                    .write_guest(q.used.wrapping_add(2), &next_used.to_le_bytes())
                    .is_err()
            {
                return self.broken();
            }
            self.s.queue.next_used = next_used;
            self.s.queue.next_avail = self.s.queue.next_avail.wrapping_add(1);
        }
        self.s.interrupt_status |= 1;
    }

    fn broken(&mut self) {
        self.s.status |= S_NEEDS_RESET;
    }

    fn write_guest(&mut self, addr: u64, b: &[u8]) -> Result<()> {
        self.mem.write(addr, b)?;
        if !b.is_empty() {
            let first = (addr / PAGE_SIZE as u64) as usize;
            let last = ((addr + b.len() as u64 - 1) / PAGE_SIZE as u64) as usize;
            self.dirty_mem.set_range(first, last + 1);
        }
        Ok(())
    }

    /// Serves one request; returns the bytes written to the guest, or None
    /// if the chain is malformed beyond reporting a status.
    fn handle_chain(&mut self, head: u16) -> Option<u32> {
        let size = self.s.queue.size;
        let mut chain = Vec::new();
        let mut i = head;
        loop {
            if i >= size || chain.len() >= size as usize {
                return None;
            }
            let d = self.desc(i)?;
            let next = {
                let mut b = [0u8; 2];
                self.mem
                    .read(self.s.queue.desc.checked_add(16 * i as u64 + 14)?, &mut b)
                    .ok()?;
                u16::from_le_bytes(b)
            };
            let more = d.flags & D_NEXT != 0;
            chain.push(d);
            if !more {
                break;
            }
            i = next;
        }
        if chain.len() < 2 {
            return None;
        }
        let status_d = chain.pop()?;
        if status_d.flags & D_WRITE == 0 || status_d.len < 1 {
            return None;
        }
        let hdr_d = chain.remove(0);
        let mut hdr = [0u8; 16];
        let mut written = 0u32;
        let status = if hdr_d.len < 16 || self.mem.read(hdr_d.addr, &mut hdr).is_err() {
            ST_IOERR
        } else {
            let kind = u32::from_le_bytes(hdr[0..4].try_into().ok()?);
            let sector = u64::from_le_bytes(hdr[8..16].try_into().ok()?);
            match self.execute(kind, sector, &chain, &mut written) {
                Ok(s) => s,
                Err(_) => ST_IOERR,
            }
        };
        self.write_guest(status_d.addr, &[status]).ok()?;
        Some(written.saturating_add(1))
    }

    fn execute(&mut self, kind: u32, sector: u64, data: &[Desc], written: &mut u32) -> Result<u8> {
        if let Some(gate) = self.gate.as_mut() {
            // The bytes a request touches: its data's for reads and
            // writes, the whole disk for the others (a flush, a discard:
            // rare, and never before the disk has arrived).
            let range = match kind {
                T_IN | T_OUT => {
                    let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
                    Some((sector.saturating_mul(512), total))
                }
                T_FLUSH | T_DISCARD | T_WRITE_ZEROES => Some((0, self.s.disk_size)),
                _ => None,
            };
            if let Some((off, len)) = range {
                match gate(off, len) {
                    Ok(true) => self.gate = None,
                    Ok(false) => {}
                    Err(_) => return Ok(ST_IOERR),
                }
            }
        }
        match kind {
            T_IN | T_OUT => {
                let mut pos = sector
                    .checked_mul(512)
                    .ok_or_else(|| Error::Memory("sector overflow".into()))?;
                let total: u64 = data.iter().map(|d| d.len as u64).sum();
                if pos
                    .checked_add(total)
                    .is_none_or(|end| end > self.s.disk_size)
                {
                    return Ok(ST_IOERR);
                }
                let want_write = if kind == T_IN { D_WRITE } else { 0 };
                if data.iter().any(|d| d.flags & D_WRITE != want_write) {
                    return Ok(ST_IOERR);
                }
                let mut buf = Vec::new();
                for d in data {
                    let mut done = 0u64;
                    while done < d.len as u64 {
                        let n = (d.len as u64 - done).min(CHUNK as u64) as usize;
                        buf.resize(n, 0);
                        let ga = d
                            .addr
                            .checked_add(done)
                            .ok_or_else(|| Error::Memory("address overflow".into()))?;
                        if kind == T_IN {
                            self.file
                                .read_exact_at(&mut buf, pos)
                                .map_err(|e| Error::io("disk read", e))?;
                            self.write_guest(ga, &buf)?;
                            *written = written.saturating_add(n as u32);
                        } else {
                            self.mem.read(ga, &mut buf)?;
                            self.file
                                .write_all_at(&buf, pos)
                                .map_err(|e| Error::io("disk write", e))?;
                            let first = (pos / DISK_BLOCK) as usize;
                            let last = ((pos + n as u64 - 1) / DISK_BLOCK) as usize;
                            self.dirty_blocks.set_range(first, last + 1);
                        }
                        pos += n as u64;
                        done += n as u64;
                    }
                }
                Ok(ST_OK)
            }
            T_FLUSH => {
                self.flush()?;
                Ok(ST_OK)
            }
            T_DISCARD | T_WRITE_ZEROES => self.zero_request(kind == T_DISCARD, data),
            T_GET_ID => {
                if let Some(d) = data.first() {
                    let mut id = [0u8; 20];
                    id[..9].copy_from_slice(b"kimberley");
                    let n = (d.len as usize).min(20);
                    self.write_guest(d.addr, &id[..n])?;
                    *written = n as u32;
                }
                Ok(ST_OK)
            }
            _ => Ok(ST_UNSUPP),
        }
    }

    /// DISCARD (`discard`) or WRITE_ZEROES: validates every segment before
    /// touching the disk, then makes each range read as zeros — a hole
    /// (DISCARD, or WRITE_ZEROES with the unmap flag), else zeroed in place
    /// — and records its blocks as written.
    fn zero_request(&mut self, discard: bool, data: &[Desc]) -> Result<u8> {
        if data.iter().any(|d| d.flags & D_WRITE != 0) {
            return Ok(ST_IOERR);
        }
        // The count is capped before anything is allocated.
        let total: u64 = data.iter().map(|d| d.len as u64).sum();
        if total == 0
            || !total.is_multiple_of(SEGMENT)
            || total / SEGMENT > MAX_ZERO_SEGMENTS as u64
        {
            return Ok(ST_IOERR);
        }
        let mut buf = Vec::with_capacity(total as usize);
        for d in data {
            let start = buf.len();
            buf.resize(start + d.len as usize, 0);
            self.mem.read(d.addr, &mut buf[start..])?;
        }
        let segments = match parse_segments(&buf) {
            Ok(s) => s,
            Err(_) => return Ok(ST_IOERR),
        };
        let mut ranges = Vec::with_capacity(segments.len());
        for seg in &segments {
            // Unknown flags, and unmap on a DISCARD, are UNSUPP (spec
            // §5.2.6.2); a range outside the disk or the limits is IOERR.
            if seg.flags & !SEG_UNMAP != 0 || (discard && seg.flags & SEG_UNMAP != 0) {
                return Ok(ST_UNSUPP);
            }
            if seg.num_sectors > MAX_ZERO_SECTORS {
                return Ok(ST_IOERR);
            }
            let range = seg
                .sector
                .checked_add(seg.num_sectors as u64)
                .filter(|&end| end <= self.capacity_sectors())
                .map(|_| (seg.sector * 512, seg.num_sectors as u64 * 512));
            match range {
                Some(r) => ranges.push((r, discard || seg.flags & SEG_UNMAP != 0)),
                None => return Ok(ST_IOERR),
            }
        }
        for ((off, len), unmap) in ranges {
            if len == 0 {
                continue;
            }
            // Recorded first: a range that fails half-way may have changed.
            let first = (off / DISK_BLOCK) as usize;
            let last = ((off + len - 1) / DISK_BLOCK) as usize;
            self.dirty_blocks.set_range(first, last + 1);
            self.zero_range(off, len, unmap)?;
        }
        Ok(ST_OK)
    }

    /// Makes `len` bytes at `off` read as zeros: punched (`unmap`) or
    /// zeroed in place, writing zeros where the file system cannot.
    fn zero_range(&mut self, off: u64, len: u64, unmap: bool) -> Result<()> {
        use kimberley_formats::sys::punch;
        let r = if unmap {
            punch::punch_hole(&self.file, off, len)
        } else {
            punch::zero_range(&self.file, off, len)
        };
        match r {
            Ok(()) => return Ok(()),
            Err(e) if punch::is_unsupported(&e) => {}
            Err(e) => return Err(Error::io("disk discard", e)),
        }
        let zeros = vec![0u8; (len.min(CHUNK as u64)) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], off + done)
                .map_err(|e| Error::io("disk write zeros", e))?;
            done += n as u64;
        }
        Ok(())
    }
}

/// One `struct virtio_blk_discard_write_zeroes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}

/// Decodes the segments of a DISCARD or WRITE_ZEROES request (`buf` is a
/// whole number of segments).
fn parse_segments(buf: &[u8]) -> std::result::Result<Vec<Segment>, kimberley_formats::le::LeError> {
    let mut r = kimberley_formats::le::Reader::new(buf, "discard segments");
    let mut out = Vec::with_capacity(buf.len() / SEGMENT as usize);
    while r.remaining() > 0 {
        out.push(Segment {
            sector: r.u64()?,
            num_sectors: r.u32()?,
            flags: r.u32()?,
        });
    }
    Ok(out)
}

impl Persist for VirtioBlk {
    type State = BlockState;
    /// The opened backing file, its path (for messages) and guest memory.
    type Args = (File, PathBuf, Memory);

    fn save(&self) -> Result<BlockState> {
        Ok(self.s.clone())
    }

    fn restore((file, path, mem): (File, PathBuf, Memory), s: &BlockState) -> Result<VirtioBlk> {
        let mut dev = VirtioBlk::from_file(file, &path, mem)?;
        if dev.s.disk_size != s.disk_size {
            return Err(Error::StateMismatch(
                path,
                format!(
                    "disk is {} bytes, the state says {}",
                    dev.s.disk_size, s.disk_size
                ),
            ));
        }
        if s.queue.size > QUEUE_MAX || (s.queue.size != 0 && !s.queue.size.is_power_of_two()) {
            return Err(Error::corrupt(format!(
                "virtio queue size {}",
                s.queue.size
            )));
        }
        dev.s = s.clone();
        Ok(dev)
    }
}

impl Codec for BlockState {
    fn encode(&self, w: &mut Writer) {
        w.u64(self.disk_size);
        w.u32(self.status);
        w.u32(self.dev_features_sel);
        w.u32(self.drv_features_sel);
        w.u64(self.drv_features);
        w.u32(self.queue_sel);
        w.u32(self.interrupt_status);
        w.u32(self.config_generation);
        let q = &self.queue;
        w.u16(q.size);
        w.u8(q.ready as u8);
        w.u64(q.desc);
        w.u64(q.avail);
        w.u64(q.used);
        w.u16(q.next_avail);
        w.u16(q.next_used);
    }

    fn decode(r: &mut Reader<'_>) -> Result<BlockState> {
        let s = BlockState {
            disk_size: r.u64()?,
            status: r.u32()?,
            dev_features_sel: r.u32()?,
            drv_features_sel: r.u32()?,
            drv_features: r.u64()?,
            queue_sel: r.u32()?,
            interrupt_status: r.u32()?,
            config_generation: r.u32()?,
            queue: QueueState {
                size: r.u16()?,
                ready: r.u8()? != 0,
                desc: r.u64()?,
                avail: r.u64()?,
                used: r.u64()?,
                next_avail: r.u16()?,
                next_used: r.u16()?,
            },
        };
        let size = s.queue.size;
        if size > QUEUE_MAX || (size != 0 && !size.is_power_of_two()) {
            return Err(Error::corrupt(format!("virtio queue size {size}")));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    //! The device driven through its registers and a queue in anonymous
    //! memory (no KVM): discard and write-zeroes, and malicious requests.
    use super::*;
    use kimberley_formats::sparse::data_extents;
    use std::io::Write;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const HDR: u64 = 0x4000;
    const STATUS: u64 = 0x4800;
    const DATA: u64 = 0x5000;
    const QSIZE: u32 = 8;
    const DISK: u64 = 1 << 20;
    const FILL: u8 = 0xa5;

    struct Rig {
        dev: VirtioBlk,
        mem: Memory,
        disk: File,
        idx: u16,
    }

    fn w(dev: &mut VirtioBlk, off: u64, v: u32) {
        dev.mmio_write(off, &v.to_le_bytes());
    }

    fn r(dev: &mut VirtioBlk, off: u64) -> u32 {
        let mut b = [0u8; 4];
        dev.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// A device on a disk of `size` bytes, the first MiB of it `FILL`
    /// (the rest a hole), negotiated with every offered feature.
    fn rig(size: u64) -> Rig {
        let mut disk = tempfile::tempfile().unwrap();
        disk.write_all(&vec![FILL; DISK.min(size) as usize])
            .unwrap();
        disk.set_len(size).unwrap();
        let mem = Memory::anonymous(16 << 20).unwrap();
        let mut dev = VirtioBlk::from_file(
            disk.try_clone().unwrap(),
            Path::new("test-disk"),
            mem.clone(),
        )
        .unwrap();
        w(&mut dev, 0x070, 1);
        w(&mut dev, 0x070, 3);
        w(&mut dev, 0x024, 0);
        w(&mut dev, 0x020, FEATURES as u32);
        w(&mut dev, 0x024, 1);
        w(&mut dev, 0x020, (FEATURES >> 32) as u32);
        w(&mut dev, 0x070, 3 | S_FEATURES_OK);
        assert_ne!(r(&mut dev, 0x070) & S_FEATURES_OK, 0);
        w(&mut dev, 0x030, 0);
        w(&mut dev, 0x038, QSIZE);
        w(&mut dev, 0x080, DESC as u32);
        w(&mut dev, 0x090, AVAIL as u32);
        w(&mut dev, 0x0a0, USED as u32);
        w(&mut dev, 0x044, 1);
        w(&mut dev, 0x070, 3 | S_FEATURES_OK | S_DRIVER_OK);
        Rig {
            dev,
            mem,
            disk,
            idx: 0,
        }
    }

    fn seg(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&sector.to_le_bytes());
        b[8..12].copy_from_slice(&num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b
    }

    impl Rig {
        /// Submits a request of `kind` whose data descriptors are `data`
        /// (address, length, device-writable); returns its status byte.
        fn raw(&mut self, kind: u32, data: &[(u64, u32, bool)]) -> u8 {
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&kind.to_le_bytes());
            self.mem.write(HDR, &hdr).unwrap();
            self.mem.write(STATUS, &[0xff]).unwrap();
            let mut descs = vec![(HDR, 16u32, D_NEXT)];
            for &(addr, len, writable) in data {
                descs.push((addr, len, D_NEXT | if writable { D_WRITE } else { 0 }));
            }
            descs.push((STATUS, 1, D_WRITE));
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let mut e = [0u8; 16];
                e[0..8].copy_from_slice(&addr.to_le_bytes());
                e[8..12].copy_from_slice(&len.to_le_bytes());
                e[12..14].copy_from_slice(&flags.to_le_bytes());
                e[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
                self.mem.write(DESC + 16 * i as u64, &e).unwrap();
            }
            let slot = (self.idx as u32 % QSIZE) as u64;
            self.mem
                .write(AVAIL + 4 + 2 * slot, &0u16.to_le_bytes())
                .unwrap();
            self.idx = self.idx.wrapping_add(1);
            self.mem.write(AVAIL + 2, &self.idx.to_le_bytes()).unwrap();
            w(&mut self.dev, 0x050, 0);
            assert_eq!(self.dev.s.status & S_NEEDS_RESET, 0, "queue broken");
            let mut st = [0u8; 1];
            self.mem.read(STATUS, &mut st).unwrap();
            st[0]
        }

        /// Submits `segs` as one data descriptor.
        fn zero(&mut self, kind: u32, segs: &[[u8; 16]]) -> u8 {
            let bytes = segs.concat();
            self.mem.write(DATA, &bytes).unwrap();
            self.raw(kind, &[(DATA, bytes.len() as u32, false)])
        }

        fn disk_bytes(&self) -> Vec<u8> {
            let mut b = vec![0u8; DISK as usize];
            self.disk.read_exact_at(&mut b, 0).unwrap();
            b
        }

        /// Asserts the disk still holds `FILL` everywhere and nothing was
        /// recorded as written.
        fn untouched(&mut self) {
            assert!(self.disk_bytes().iter().all(|&b| b == FILL), "disk changed");
            assert_eq!(self.dev.take_dirty_blocks().count(), 0);
        }
    }

    #[test]
    fn offers_discard_and_write_zeroes_with_limits_at_spec_offsets() {
        let mut g = rig(DISK);
        w(&mut g.dev, 0x014, 0);
        let f = r(&mut g.dev, 0x010);
        assert_ne!(f & (1 << 13), 0, "VIRTIO_BLK_F_DISCARD");
        assert_ne!(f & (1 << 14), 0, "VIRTIO_BLK_F_WRITE_ZEROES");
        let cfg = |g: &mut Rig, off: u64| r(&mut g.dev, 0x100 + off);
        assert_eq!(cfg(&mut g, 0), (DISK / 512) as u32);
        assert_eq!(cfg(&mut g, 36), MAX_ZERO_SECTORS);
        assert_eq!(cfg(&mut g, 40), MAX_ZERO_SEGMENTS);
        assert_eq!(cfg(&mut g, 44), 8);
        assert_eq!(cfg(&mut g, 48), MAX_ZERO_SECTORS);
        assert_eq!(cfg(&mut g, 52), MAX_ZERO_SEGMENTS);
        let mut b = [0u8; 1];
        g.dev.mmio_read(0x100 + 56, &mut b);
        assert_eq!(b[0], 1, "write_zeroes_may_unmap");
        g.dev.mmio_read(0x100 + 60, &mut b);
        assert_eq!(b[0], 0, "past the config space");
    }

    #[test]
    fn discard_punches_a_hole_and_records_the_blocks() {
        let mut g = rig(DISK);
        assert_eq!(g.zero(T_DISCARD, &[seg(8, 16, 0), seg(64, 8, 0)]), ST_OK);
        let d = g.disk_bytes();
        assert!(d[4096..12288].iter().all(|&b| b == 0));
        assert!(d[32768..36864].iter().all(|&b| b == 0));
        assert!(d[..4096].iter().all(|&b| b == FILL));
        assert!(d[12288..32768].iter().all(|&b| b == FILL));
        assert!(d[36864..].iter().all(|&b| b == FILL));
        let ext = data_extents(&g.disk, DISK).unwrap();
        assert_eq!(ext, vec![(0, 4096), (12288, 32768), (36864, DISK)]);
        let blocks: Vec<usize> = g.dev.take_dirty_blocks().iter_set().collect();
        assert_eq!(blocks, vec![1, 2, 8]);
    }

    #[test]
    fn write_zeroes_zeroes_with_and_without_unmap() {
        let mut g = rig(DISK);
        assert_eq!(g.zero(T_WRITE_ZEROES, &[seg(0, 8, 0)]), ST_OK);
        assert_eq!(g.zero(T_WRITE_ZEROES, &[seg(16, 9, SEG_UNMAP)]), ST_OK);
        let d = g.disk_bytes();
        assert!(d[..4096].iter().all(|&b| b == 0));
        assert!(d[4096..8192].iter().all(|&b| b == FILL));
        assert!(d[8192..8192 + 9 * 512].iter().all(|&b| b == 0));
        assert!(d[8192 + 9 * 512..].iter().all(|&b| b == FILL));
        // Without unmap the range stays allocated; with it the whole
        // 4 KiB block is a hole.
        let ext = data_extents(&g.disk, DISK).unwrap();
        assert_eq!(ext, vec![(0, 8192), (12288, DISK)]);
        let blocks: Vec<usize> = g.dev.take_dirty_blocks().iter_set().collect();
        assert_eq!(blocks, vec![0, 2, 3]);
    }

    #[test]
    fn ranges_outside_the_disk_are_ioerr_and_touch_nothing() {
        let mut g = rig(DISK);
        let cap = DISK / 512;
        for kind in [T_DISCARD, T_WRITE_ZEROES] {
            for s in [
                seg(cap, 1, 0),
                seg(cap - 1, 2, 0),
                seg(u64::MAX, 1, 0),
                seg(u64::MAX - 1, 4, 0),
                seg(u64::MAX / 512 + 1, 1, 0),
                seg(0, u32::MAX, 0),
            ] {
                assert_eq!(g.zero(kind, &[s]), ST_IOERR, "{s:?}");
                // A valid segment before a bad one is not applied either.
                assert_eq!(g.zero(kind, &[seg(0, 8, 0), s]), ST_IOERR, "{s:?}");
                g.untouched();
            }
        }
    }

    #[test]
    fn segments_beyond_max_sectors_are_ioerr() {
        // A sparse disk larger than the per-segment limit.
        let size = 2 * MAX_ZERO_SECTORS as u64 * 512 + DISK;
        let mut g = rig(size);
        assert_eq!(
            g.zero(T_DISCARD, &[seg(0, MAX_ZERO_SECTORS + 1, 0)]),
            ST_IOERR
        );
        assert_eq!(
            g.zero(T_WRITE_ZEROES, &[seg(0, MAX_ZERO_SECTORS + 1, 0)]),
            ST_IOERR
        );
        g.untouched();
        let at = MAX_ZERO_SECTORS as u64;
        assert_eq!(g.zero(T_DISCARD, &[seg(at, MAX_ZERO_SECTORS, 0)]), ST_OK);
        assert_eq!(
            g.dev.take_dirty_blocks().count(),
            MAX_ZERO_SECTORS as usize / 8
        );
    }

    #[test]
    fn too_many_or_malformed_segments_are_ioerr_and_touch_nothing() {
        let mut g = rig(DISK);
        let many = vec![seg(0, 1, 0); MAX_ZERO_SEGMENTS as usize + 1];
        assert_eq!(g.zero(T_DISCARD, &many), ST_IOERR);
        assert_eq!(g.zero(T_WRITE_ZEROES, &many), ST_IOERR);
        // A huge claimed length is refused before anything is allocated or
        // read (the address is outside guest memory).
        assert_eq!(g.raw(T_DISCARD, &[(1 << 40, !15u32, false)]), ST_IOERR);
        // Several descriptors adding up to too many segments.
        let d = (DATA, 16 * 40, false);
        assert_eq!(g.raw(T_DISCARD, &[d, d]), ST_IOERR);
        // Not a whole number of segments; no segment at all.
        assert_eq!(g.raw(T_DISCARD, &[(DATA, 24, false)]), ST_IOERR);
        assert_eq!(g.raw(T_DISCARD, &[]), ST_IOERR);
        assert_eq!(g.raw(T_DISCARD, &[(DATA, 0, false)]), ST_IOERR);
        // A device-writable segment buffer.
        g.mem.write(DATA, &seg(0, 8, 0)).unwrap();
        assert_eq!(g.raw(T_DISCARD, &[(DATA, 16, true)]), ST_IOERR);
        // Segments in unreadable guest memory.
        assert_eq!(
            g.raw(T_WRITE_ZEROES, &[(u64::MAX - 7, 16, false)]),
            ST_IOERR
        );
        g.untouched();
        // The most segments allowed, split over two descriptors, work.
        let n = MAX_ZERO_SEGMENTS as u64;
        let segs: Vec<[u8; 16]> = (0..n).map(|i| seg(i * 16, 8, 0)).collect();
        g.mem.write(DATA, &segs.concat()).unwrap();
        let half = (16 * n / 2) as u32;
        let st = g.raw(
            T_DISCARD,
            &[(DATA, half, false), (DATA + half as u64, half, false)],
        );
        assert_eq!(st, ST_OK);
        assert_eq!(g.dev.take_dirty_blocks().count(), n as usize);
    }

    #[test]
    fn unknown_flags_and_unmap_on_discard_are_unsupp() {
        let mut g = rig(DISK);
        for flags in [2, 1 << 31, u32::MAX] {
            assert_eq!(g.zero(T_WRITE_ZEROES, &[seg(0, 8, flags)]), ST_UNSUPP);
            assert_eq!(
                g.zero(T_DISCARD, &[seg(8, 8, 0), seg(0, 8, flags)]),
                ST_UNSUPP
            );
        }
        assert_eq!(g.zero(T_DISCARD, &[seg(0, 8, SEG_UNMAP)]), ST_UNSUPP);
        g.untouched();
    }
}
