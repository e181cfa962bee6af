//! Little-endian writer/reader with capped lengths, and raw copies of KVM
//! structures.

use crate::error::{Error, Result};

/// Appends little-endian values to a buffer.
#[derive(Default, Debug)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Writer {
        Writer::default()
    }

    /// The bytes written so far.
    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }

    /// Appends a byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    /// Appends a u16.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Appends a u32.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Appends a u64.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Appends a u32 length and the bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.buf.extend_from_slice(b);
    }

    /// Appends a KVM structure as a length-prefixed byte copy.
    pub fn pod<T: Pod>(&mut self, v: &T) {
        self.bytes(pod_bytes(v));
    }

    /// Appends a section: tag, u32 length, then what `f` writes.
    pub fn section(&mut self, tag: u32, f: impl FnOnce(&mut Writer)) {
        self.u32(tag);
        let at = self.buf.len();
        self.u32(0);
        f(self);
        let len = (self.buf.len() - at - 4) as u32;
        self.buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
}

/// Reads little-endian values, failing (never panicking) on truncation.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Reads `buf`; `what` names it in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { buf, what }
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Fails unless everything was consumed.
    pub fn finish(&self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Error::corrupt(format!(
                "{} trailing bytes in {}",
                self.buf.len(),
                self.what
            )))
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.buf.len() {
            return Err(Error::corrupt(format!("{} is truncated", self.what)));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    /// Reads a byte.
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    /// Reads a u16.
    pub fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    /// Reads a u32.
    pub fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads a u64.
    pub fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    /// Reads a count and checks it against `cap`.
    pub fn count(&mut self, cap: usize, what: &str) -> Result<usize> {
        let n = self.u32()? as usize;
        if n > cap {
            return Err(Error::corrupt(format!(
                "{what}: count {n} exceeds the cap of {cap}"
            )));
        }
        Ok(n)
    }

    /// Reads length-prefixed bytes of at most `cap` bytes.
    pub fn bytes(&mut self, cap: usize, what: &str) -> Result<&'a [u8]> {
        let n = self.count(cap, what)?;
        self.take(n)
    }

    /// Reads a KVM structure written by [`Writer::pod`]; its length must match.
    pub fn pod<T: Pod>(&mut self, what: &str) -> Result<T> {
        let size = std::mem::size_of::<T>();
        let b = self.bytes(size, what)?;
        if b.len() != size {
            return Err(Error::corrupt(format!(
                "{what}: {} bytes, expected {size}",
                b.len()
            )));
        }
        Ok(pod_from_bytes(b))
    }

    /// Reads one section header: (tag, reader over its payload).
    pub fn section(&mut self) -> Result<(u32, Reader<'a>)> {
        let tag = self.u32()?;
        let len = self.u32()? as usize;
        let body = self.take(len)?;
        Ok((
            tag,
            Reader {
                buf: body,
                what: section_name(tag),
            },
        ))
    }
}

fn section_name(tag: u32) -> &'static str {
    match tag {
        1 => "VM section",
        2 => "vCPU section",
        3 => "serial section",
        4 => "block section",
        _ => "unknown section",
    }
}

/// Plain-old-data KVM structures: `repr(C)`, integer fields only, no
/// implicit padding, every bit pattern valid.
///
/// # Safety
/// Implement only for types with those properties.
pub unsafe trait Pod: Default {}

macro_rules! pod {
    ($($t:ty),*) => {$(
        // SAFETY: kernel UAPI structure made of integers with explicit padding
        // fields only; kvm-bindings derives zerocopy's IntoBytes/FromBytes for
        // it (serde feature), which proves there are no padding bytes and
        // that every bit pattern is valid.
        unsafe impl Pod for $t {}
    )*};
}

pod!(
    kvm_bindings::kvm_regs,
    kvm_bindings::kvm_sregs,
    kvm_bindings::kvm_xsave,
    kvm_bindings::kvm_xcrs,
    kvm_bindings::kvm_debugregs,
    kvm_bindings::kvm_vcpu_events,
    kvm_bindings::kvm_mp_state,
    kvm_bindings::kvm_lapic_state,
    kvm_bindings::kvm_clock_data,
    kvm_bindings::kvm_irqchip,
    kvm_bindings::kvm_cpuid_entry2,
    kvm_bindings::kvm_pit_state2
);

/// The bytes of a `Pod` value.
pub fn pod_bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: T is Pod (no padding, so every byte is initialised); the slice
    // covers exactly the value and lives as long as the borrow.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
}

/// A `Pod` value from exactly `size_of::<T>()` bytes (shorter input is zero-extended).
pub fn pod_from_bytes<T: Pod>(b: &[u8]) -> T {
    let mut v = T::default();
    let n = b.len().min(std::mem::size_of::<T>());
    // SAFETY: T is Pod, so any bytes form a valid value; we copy at most
    // size_of::<T>() bytes into it from a slice of at least n bytes.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), &mut v as *mut T as *mut u8, n) };
    v
}
