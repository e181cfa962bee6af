//! The command interpreter and the background loop.

use crate::abi::{self, BootInfo};
use crate::gen;
use crate::heap::{AllocError, Heap};
use crate::io;
use crate::sprintln;
use crate::virtio::{self, Blk};

const MAX_LINE: usize = 1024;
const MAX_DIRTY_JOBS: usize = 8;
const PAGE: u64 = 4096;

#[derive(Clone, Copy)]
struct DirtyJob {
    active: bool,
    region: usize,
    rate: u64,
    start_tsc: u64,
    pages_done: u64,
    cursor: u64,
    generation: u64,
}

impl DirtyJob {
    const IDLE: DirtyJob =
        DirtyJob { active: false, region: 0, rate: 0, start_tsc: 0, pages_done: 0, cursor: 0, generation: 0 };
}

/// All guest state; it lives on the guest's stack, i.e. in guest memory, so
/// a snapshot captures it (the counter continues after a restore).
pub struct Guest {
    tsc_khz: u64,
    heap: Heap,
    disk: Option<Blk>,
    disk_error: &'static str,
    counter: u64,
    counter_on: bool,
    jobs: [DirtyJob; MAX_DIRTY_JOBS],
    line: [u8; MAX_LINE],
    line_len: usize,
    line_overflow: bool,
    line_no: u64,
    failed: bool,
    status: u32,
}

type CmdResult = Result<(), Fail>;

/// A command failure: a static reason, optionally followed by a token.
struct Fail(&'static str, [u8; 64], usize);

fn err(why: &'static str) -> Fail {
    Fail(why, [0; 64], 0)
}

fn err_tok(why: &'static str, tok: &[u8]) -> Fail {
    let mut b = [0u8; 64];
    let n = core::cmp::min(tok.len(), 64);
    b[..n].copy_from_slice(&tok[..n]);
    Fail(why, b, n)
}

fn parse_u64(tok: &[u8]) -> Option<u64> {
    if let Some(hex) = tok.strip_prefix(b"0x") {
        if hex.is_empty() {
            return None;
        }
        let mut v: u64 = 0;
        for &c in hex {
            let d = (c as char).to_digit(16)? as u64;
            v = v.checked_mul(16)?.checked_add(d)?;
        }
        return Some(v);
    }
    if tok.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in tok {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((c - b'0') as u64)?;
    }
    Some(v)
}

/// Parses a size: decimal bytes with an optional K, M or G suffix (powers of 1024).
fn parse_size(tok: &[u8]) -> Option<u64> {
    let (num, mult) = match tok.last() {
        Some(b'K' | b'k') => (&tok[..tok.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&tok[..tok.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&tok[..tok.len() - 1], 1 << 30),
        _ => (tok, 1),
    };
    parse_u64(num)?.checked_mul(mult)
}

fn is_space(c: u8) -> bool {
    c == b' ' || c == b'\t'
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [f, rest @ ..] = s {
        if is_space(*f) {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., l] = s {
        if is_space(*l) {
            s = rest;
        } else {
            break;
        }
    }
    s
}

/// Splits `s` into up to N whitespace-separated tokens; returns the count
/// (N + 1 means "more than N").
fn split<'a, const N: usize>(s: &'a [u8], out: &mut [&'a [u8]; N]) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < s.len() {
        while i < s.len() && is_space(s[i]) {
            i += 1;
        }
        if i == s.len() {
            break;
        }
        let st = i;
        while i < s.len() && !is_space(s[i]) {
            i += 1;
        }
        if n == N {
            return N + 1;
        }
        out[n] = &s[st..i];
        n += 1;
    }
    n
}

fn print_bytes(parts: &[&[u8]]) {
    let mut l = io::Line::new();
    for p in parts {
        l.push(p);
    }
    l.send();
}

impl Guest {
    pub fn new(info: &BootInfo) -> Guest {
        let (disk, disk_error) = if info.disk_count > 0 && info.disk_mmio[0] != 0 {
            match Blk::init(info.disk_mmio[0]) {
                Ok(b) => (Some(b), ""),
                Err(e) => (None, e),
            }
        } else {
            (None, "no disk")
        };
        Guest {
            tsc_khz: if info.tsc_khz == 0 { 1_000_000 } else { info.tsc_khz },
            heap: Heap::new(info.heap_start, info.heap_end),
            disk,
            disk_error,
            counter: 0,
            counter_on: false,
            jobs: [DirtyJob::IDLE; MAX_DIRTY_JOBS],
            line: [0; MAX_LINE],
            line_len: 0,
            line_overflow: false,
            line_no: 0,
            failed: false,
            status: 0,
        }
    }

    pub fn run(&mut self) -> ! {
        io::outl(abi::PORT_READY, abi::ABI_VERSION);
        loop {
            while io::serial_has_byte() {
                let b = io::serial_read();
                self.feed(b);
            }
            if self.has_background() {
                let until = io::rdtsc().wrapping_add(self.tsc_khz); // poll input every ~1 ms
                self.background(until);
            } else {
                io::outb(abi::PORT_IDLE, 0);
            }
        }
    }

    fn has_background(&self) -> bool {
        self.counter_on || self.jobs.iter().any(|j| j.active)
    }

    /// Runs background work until the TSC reaches `until`.
    fn background(&mut self, until: u64) {
        loop {
            if self.counter_on {
                for _ in 0..256 {
                    self.counter = core::hint::black_box(self.counter.wrapping_add(1));
                }
            }
            let now = io::rdtsc();
            for j in 0..MAX_DIRTY_JOBS {
                if self.jobs[j].active {
                    self.advance_job(j, now);
                }
            }
            if now >= until {
                return;
            }
            if !self.has_background() {
                core::hint::spin_loop();
            }
        }
    }

    fn advance_job(&mut self, j: usize, now: u64) {
        let r = self.heap.regions[self.jobs[j].region];
        let pages = r.size.div_ceil(PAGE);
        let job = &mut self.jobs[j];
        if pages == 0 {
            return;
        }
        let ticks = now.saturating_sub(job.start_tsc) as u128;
        let bytes = ticks * job.rate as u128 / (self.tsc_khz as u128 * 1000);
        let due = (bytes / PAGE as u128) as u64;
        let mut todo = due.saturating_sub(job.pages_done);
        // Work missed while the vCPU was not running (paused, throttled,
        // descheduled) is dropped, not caught up: like a CPU-bound
        // workload, the job dirties at RATE only while it runs. At most
        // 2 ms of backlog is kept.
        let backlog = ((job.rate as u128 * 2 / 1000 / PAGE as u128) as u64).clamp(1, pages);
        if todo > backlog {
            todo = backlog;
            job.pages_done = due - backlog;
        }
        for _ in 0..todo {
            let addr = r.addr + job.cursor * PAGE;
            job.generation = job.generation.wrapping_add(1);
            // SAFETY: addr is a page of region r, inside the heap.
            unsafe { core::ptr::write_volatile(addr as *mut u64, job.generation) };
            job.cursor = (job.cursor + 1) % pages;
        }
        job.pages_done += todo;
    }

    fn feed(&mut self, b: u8) {
        match b {
            abi::SCRIPT_END => {
                if self.line_len > 0 || self.line_overflow {
                    self.end_line();
                }
                sprintln!("done {}", self.status);
                self.line_no = 0;
                self.failed = false;
                self.status = 0;
            }
            b'\n' => self.end_line(),
            b'\r' => {}
            _ => {
                if self.line_len < MAX_LINE {
                    self.line[self.line_len] = b;
                    self.line_len += 1;
                } else {
                    self.line_overflow = true;
                }
            }
        }
    }

    fn end_line(&mut self) {
        self.line_no += 1;
        let len = self.line_len;
        let overflow = self.line_overflow;
        self.line_len = 0;
        self.line_overflow = false;
        if self.failed {
            return;
        }
        let line = self.line;
        let res = if overflow { Err(err("line too long")) } else { self.exec(&line[..len]) };
        if let Err(Fail(why, tok, n)) = res {
            let mut l = io::Line::new();
            let _ = core::fmt::Write::write_fmt(&mut l, format_args!("error {}: {}", self.line_no, why));
            if n > 0 {
                l.push(b" '");
                l.push(&tok[..n]);
                l.push(b"'");
            }
            l.send();
            self.failed = true;
            self.status = 1;
        }
    }

    fn exec(&mut self, line: &[u8]) -> CmdResult {
        let line = trim(line);
        if line.is_empty() || line[0] == b'#' {
            return Ok(());
        }
        let mut t: [&[u8]; 5] = [&[]; 5];
        let n = split(line, &mut t);
        let cmd = t[0];
        if cmd == b"print" {
            let rest = if line.len() > 5 { &line[6..] } else { &[][..] };
            print_bytes(&[rest]);
            return Ok(());
        }
        let args = &t[1..n.min(5)];
        let want = |k: usize| if n == k + 1 { Ok(()) } else { Err(err("wrong number of arguments")) };
        match cmd {
            b"fill" => {
                want(4)?;
                self.fill(args[0], args[1], args[2], args[3])
            }
            b"checksum" => {
                want(1)?;
                let i = self.heap.find(args[0]).ok_or_else(|| err_tok("no region named", args[0]))?;
                let h = gen::xxh64(self.heap.regions[i].bytes());
                let mut l = io::Line::new();
                l.push(b"checksum ");
                l.push(args[0]);
                let _ = core::fmt::Write::write_fmt(&mut l, format_args!(" {:016x}", h));
                l.send();
                Ok(())
            }
            b"disk-write" => {
                want(3)?;
                let (off, size) = self.disk_range(args[0], args[1])?;
                let seed = parse_u64(args[2]).ok_or_else(|| err_tok("bad seed", args[2]))?;
                self.disk_write(off, size, seed)
            }
            b"disk-discard" | b"disk-zero" => {
                want(2)?;
                let (off, size) = self.disk_range(args[0], args[1])?;
                let kind = if cmd == b"disk-discard" { virtio::T_DISCARD } else { virtio::T_WRITE_ZEROES };
                let disk = self.disk.as_mut().ok_or_else(|| err("no disk"))?;
                disk.zero(kind, off, size).map_err(err)?;
                disk.request(virtio::T_FLUSH, 0, 0).map_err(err)
            }
            b"disk-checksum" => {
                want(2)?;
                let (off, size) = self.disk_range(args[0], args[1])?;
                let h = self.disk_checksum(off, size)?;
                let mut l = io::Line::new();
                l.push(b"disk-checksum ");
                l.push(args[0]);
                l.push(b" ");
                l.push(args[1]);
                let _ = core::fmt::Write::write_fmt(&mut l, format_args!(" {:016x}", h));
                l.send();
                Ok(())
            }
            b"counter" => match n {
                1 => {
                    sprintln!("counter {}", self.counter);
                    Ok(())
                }
                2 if args[0] == b"start" => {
                    self.counter_on = true;
                    Ok(())
                }
                2 if args[0] == b"stop" => {
                    self.counter_on = false;
                    Ok(())
                }
                2 => Err(err_tok("unknown counter action", args[0])),
                _ => Err(err("wrong number of arguments")),
            },
            b"dirty" => {
                want(2)?;
                self.dirty(args[0], args[1])
            }
            b"sleep" => {
                want(1)?;
                let ms = parse_u64(args[0]).ok_or_else(|| err_tok("bad milliseconds", args[0]))?;
                let ticks = ms.checked_mul(self.tsc_khz).ok_or_else(|| err("sleep too long"))?;
                let until = io::rdtsc().saturating_add(ticks);
                self.background(until);
                Ok(())
            }
            b"debug-triple-fault" => {
                // HLT at CPL 3 raises #GP; there is no IDT, so the CPU shuts down.
                // SAFETY: deliberately crashes the guest.
                unsafe { core::arch::asm!("hlt") };
                Ok(())
            }
            b"debug-hang" => loop {
                core::hint::spin_loop();
            },
            b"debug-panic" => panic!("debug-panic command"),
            _ => Err(err_tok("unknown command", cmd)),
        }
    }

    fn fill(&mut self, name: &[u8], size: &[u8], seed: &[u8], kind: &[u8]) -> CmdResult {
        let size = parse_size(size).ok_or_else(|| err_tok("bad size", size))?;
        if size == 0 {
            return Err(err("size must be greater than 0"));
        }
        let seed = parse_u64(seed).ok_or_else(|| err_tok("bad seed", seed))?;
        if !matches!(kind, b"random" | b"text" | b"zero") {
            return Err(err_tok("unknown kind", kind));
        }
        let i = match self.heap.get_or_alloc(name, size) {
            Ok(i) => i,
            Err(AllocError::NameTooLong) => return Err(err("name too long (max 32 bytes)")),
            Err(AllocError::TooManyRegions) => return Err(err("too many regions (max 64)")),
            Err(AllocError::OutOfMemory) => return Err(err("out of memory")),
        };
        let buf = self.heap.regions[i].bytes();
        match kind {
            b"random" => gen::fill_random(buf, seed),
            b"text" => gen::fill_text(buf, seed),
            _ => buf.fill(0),
        }
        Ok(())
    }

    fn dirty(&mut self, name: &[u8], rate: &[u8]) -> CmdResult {
        let rate = parse_size(rate).ok_or_else(|| err_tok("bad rate", rate))?;
        let i = self.heap.find(name).ok_or_else(|| err_tok("no region named", name))?;
        let slot = self.jobs.iter().position(|j| j.active && j.region == i);
        if rate == 0 {
            if let Some(s) = slot {
                self.jobs[s].active = false;
            }
            return Ok(());
        }
        let s = match slot {
            Some(s) => s,
            None => self.jobs.iter().position(|j| !j.active).ok_or_else(|| err("too many dirty jobs (max 8)"))?,
        };
        let generation = self.jobs[s].generation;
        self.jobs[s] = DirtyJob {
            active: true,
            region: i,
            rate,
            start_tsc: io::rdtsc(),
            pages_done: 0,
            cursor: 0,
            generation,
        };
        Ok(())
    }

    fn disk_range(&self, off: &[u8], size: &[u8]) -> Result<(u64, u64), Fail> {
        let o = parse_size(off).ok_or_else(|| err_tok("bad offset", off))?;
        let s = parse_size(size).ok_or_else(|| err_tok("bad size", size))?;
        let disk = self.disk.as_ref().ok_or_else(|| err(self.disk_error))?;
        if o % 512 != 0 || s % 512 != 0 {
            return Err(err("offset and size must be multiples of 512"));
        }
        match o.checked_add(s) {
            Some(end) if end <= disk.capacity => Ok((o, s)),
            _ => Err(err("range beyond end of disk")),
        }
    }

    fn disk_write(&mut self, off: u64, size: u64, seed: u64) -> CmdResult {
        let disk = self.disk.as_mut().ok_or_else(|| err("no disk"))?;
        let mut rng = gen::SplitMix::new(seed);
        let mut done = 0u64;
        while done < size {
            let n = core::cmp::min(size - done, virtio::BUF_SIZE as u64) as usize;
            rng.fill(&mut virtio::buffer()[..n]);
            disk.request(virtio::T_OUT, off + done, n).map_err(err)?;
            done += n as u64;
        }
        disk.request(virtio::T_FLUSH, 0, 0).map_err(err)
    }

    fn disk_checksum(&mut self, off: u64, size: u64) -> Result<u64, Fail> {
        let disk = self.disk.as_mut().ok_or_else(|| err("no disk"))?;
        let mut h = gen::Xxh64::new(0);
        let mut done = 0u64;
        while done < size {
            let n = core::cmp::min(size - done, virtio::BUF_SIZE as u64) as usize;
            disk.request(virtio::T_IN, off + done, n).map_err(err)?;
            h.update(&virtio::buffer()[..n]);
            done += n as u64;
        }
        Ok(h.digest())
    }
}
