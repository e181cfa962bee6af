//! Port I/O, the TSC and serial output.

use core::arch::asm;
use core::fmt;

use crate::abi::SERIAL_PORT;

#[inline(always)]
pub fn outb(port: u16, val: u8) {
    // SAFETY: port I/O is allowed at CPL 3 with IOPL = 3; the VMM handles the exit.
    unsafe { asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags)) }
}

#[inline(always)]
pub fn outl(port: u16, val: u32) {
    // SAFETY: as in `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") val, options(nomem, nostack, preserves_flags)) }
}

#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as in `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags)) }
    v
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: RDTSC is allowed at CPL 3 (CR4.TSD is clear).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    ((hi as u64) << 32) | lo as u64
}

/// True if the UART has a received byte (LSR.DR).
#[inline]
pub fn serial_has_byte() -> bool {
    inb(SERIAL_PORT + 5) & 1 != 0
}

#[inline]
pub fn serial_read() -> u8 {
    inb(SERIAL_PORT)
}

/// Writes bytes to the UART. The VMM's 16550 transmits immediately, so the
/// guest does not wait for LSR.THRE (one exit per byte instead of two).
pub fn serial_write(bytes: &[u8]) {
    for &b in bytes {
        outb(SERIAL_PORT, b);
    }
}

/// A line of output, built with `core::fmt` and sent with its newline.
pub struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Line {
    pub const fn new() -> Self {
        Line { buf: [0; 512], len: 0 }
    }

    pub fn push(&mut self, s: &[u8]) {
        let n = core::cmp::min(s.len(), self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    pub fn send(mut self) {
        self.push(b"\n");
        if self.buf[self.len - 1] != b'\n' {
            self.buf[self.len - 1] = b'\n';
        }
        serial_write(&self.buf[..self.len]);
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

/// `println!`-like macro writing one line to the serial port.
#[macro_export]
macro_rules! sprintln {
    ($($arg:tt)*) => {{
        let mut l = $crate::io::Line::new();
        let _ = core::fmt::Write::write_fmt(&mut l, format_args!($($arg)*));
        l.send();
    }};
}
