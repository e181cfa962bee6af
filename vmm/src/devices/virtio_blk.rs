//! virtio-blk over virtio-mmio (version 2), one request queue, no
//! interrupts (the test guest polls the used ring). Requests are served
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
const F_VERSION_1: u64 = 1 << 32;
const FEATURES: u64 = F_VERSION_1 | F_BLK_FLUSH;

const S_FEATURES_OK: u32 = 8;
const S_DRIVER_OK: u32 = 4;
const S_NEEDS_RESET: u32 = 64;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const ST_OK: u8 = 0;
const ST_IOERR: u8 = 1;
const ST_UNSUPP: u8 = 2;

const D_NEXT: u16 = 1;
const D_WRITE: u16 = 2;

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
#[derive(Debug)]
pub struct VirtioBlk {
    file: File,
    path: PathBuf,
    mem: Memory,
    s: BlockState,
    dirty_mem: Bitmap,
    dirty_blocks: Bitmap,
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
        })
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

    fn config_byte(&self, i: u64) -> u8 {
        if i < 8 {
            (self.capacity_sectors() >> (8 * i)) as u8
        } else {
            0
        }
    }

    /// Guest read of `data.len()` bytes at `offset` in the device window.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config_byte(offset - 0x100 + i as u64);
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
        let mut pos = sector
            .checked_mul(512)
            .ok_or_else(|| Error::Memory("sector overflow".into()))?;
        match kind {
            T_IN | T_OUT => {
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
