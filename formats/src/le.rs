//! Little-endian byte codecs shared by every binary format the project
//! parses (overlay structures, the VM state blob, migration messages):
//! a growable writer and a bounds-checked reader that never panics.

/// Why a [`Reader`] refused its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeError {
    /// Fewer bytes than a field needs.
    #[error("{what} is truncated")]
    Truncated {
        /// What was being read.
        what: &'static str,
    },
    /// Bytes left after the last field.
    #[error("{n} trailing bytes in {what}")]
    Trailing {
        /// What was being read.
        what: &'static str,
        /// How many bytes were left.
        n: usize,
    },
    /// A count or length over its cap.
    #[error("{what}: {n} exceeds the cap of {cap}")]
    OverCap {
        /// The field.
        what: String,
        /// The value read.
        n: u64,
        /// The largest value accepted.
        cap: u64,
    },
}

/// Appends little-endian values to a buffer.
#[derive(Debug, Default, Clone)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Writer {
        Writer::default()
    }

    /// An empty writer with room for `n` bytes.
    pub fn with_capacity(n: usize) -> Writer {
        Writer {
            buf: Vec::with_capacity(n),
        }
    }

    /// The bytes written so far.
    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
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

    /// Appends raw bytes (no length).
    pub fn raw(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    /// Appends `n` zero bytes (reserved fields).
    pub fn zeros(&mut self, n: usize) {
        self.buf.resize(self.buf.len() + n, 0);
    }

    /// Appends a u32 length, then the bytes. Panics if `b` is 4 GiB or
    /// longer (callers cap their inputs far below that).
    pub fn bytes(&mut self, b: &[u8]) {
        let n = u32::try_from(b.len()).expect("length-prefixed field under 4 GiB");
        self.u32(n);
        self.buf.extend_from_slice(b);
    }

    /// Appends a section: `tag`, a u32 length, then what `f` writes.
    pub fn section(&mut self, tag: u32, f: impl FnOnce(&mut Writer)) {
        self.u32(tag);
        let at = self.buf.len();
        self.u32(0);
        f(self);
        let len = u32::try_from(self.buf.len() - at - 4).expect("section under 4 GiB");
        self.buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
}

/// Reads little-endian values from a byte slice; every read is bounds
/// checked and fails with [`LeError`] instead of panicking.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Reads `buf`; `what` names it in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { buf, what }
    }

    /// What this reader reads (for messages).
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// The bytes left, without consuming them.
    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }

    /// Fails unless everything was consumed.
    pub fn finish(&self) -> Result<(), LeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(LeError::Trailing {
                what: self.what,
                n: self.buf.len(),
            })
        }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], LeError> {
        if n > self.buf.len() {
            return Err(LeError::Truncated { what: self.what });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], LeError> {
        let b = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    /// Reads a byte.
    pub fn u8(&mut self) -> Result<u8, LeError> {
        Ok(self.take(1)?[0])
    }

    /// Reads a u16.
    pub fn u16(&mut self) -> Result<u16, LeError> {
        self.array().map(u16::from_le_bytes)
    }

    /// Reads a u32.
    pub fn u32(&mut self) -> Result<u32, LeError> {
        self.array().map(u32::from_le_bytes)
    }

    /// Reads a u64.
    pub fn u64(&mut self) -> Result<u64, LeError> {
        self.array().map(u64::from_le_bytes)
    }

    /// Reads a u32 count and checks it against `cap`.
    pub fn count(&mut self, cap: usize, what: &str) -> Result<usize, LeError> {
        let n = self.u32()?;
        if n as u64 > cap as u64 {
            return Err(LeError::OverCap {
                what: what.to_string(),
                n: n.into(),
                cap: cap as u64,
            });
        }
        Ok(n as usize)
    }

    /// Reads u32-length-prefixed bytes of at most `cap` bytes.
    pub fn bytes(&mut self, cap: usize, what: &str) -> Result<&'a [u8], LeError> {
        let n = self.count(cap, what)?;
        self.take(n)
    }

    /// Reads `n` bytes that must all be zero (reserved fields).
    pub fn zeros(&mut self, n: usize, what: &str) -> Result<(), LeError> {
        let b = self.take(n)?;
        if b.iter().any(|&x| x != 0) {
            return Err(LeError::OverCap {
                what: format!("{what} (reserved, must be zero)"),
                n: b.iter().map(|&x| u64::from(x)).max().unwrap_or(0),
                cap: 0,
            });
        }
        Ok(())
    }

    /// Reads a section written by [`Writer::section`]: (tag, a reader over
    /// its payload named `name(tag)`).
    pub fn section(
        &mut self,
        name: impl FnOnce(u32) -> &'static str,
    ) -> Result<(u32, Reader<'a>), LeError> {
        let tag = self.u32()?;
        let len = self.u32()? as usize;
        let body = self.take(len)?;
        Ok((tag, Reader::new(body, name(tag))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let mut w = Writer::new();
        w.u8(1);
        w.u16(0x0203);
        w.u32(0x0405_0607);
        w.u64(u64::MAX - 1);
        w.bytes(b"abc");
        w.zeros(3);
        w.section(9, |w| w.u32(7));
        let b = w.into_inner();
        let mut r = Reader::new(&b, "test");
        assert_eq!(r.u8(), Ok(1));
        assert_eq!(r.u16(), Ok(0x0203));
        assert_eq!(r.u32(), Ok(0x0405_0607));
        assert_eq!(r.u64(), Ok(u64::MAX - 1));
        assert_eq!(r.bytes(3, "s"), Ok(&b"abc"[..]));
        assert_eq!(r.zeros(3, "pad"), Ok(()));
        let (tag, mut s) = r.section(|_| "sec").unwrap();
        assert_eq!((tag, s.u32()), (9, Ok(7)));
        assert_eq!(s.finish(), Ok(()));
        assert_eq!(r.finish(), Ok(()));
        assert_eq!(r.u8(), Err(LeError::Truncated { what: "test" }));

        let mut r = Reader::new(&[5, 0, 0, 0, 1, 2], "t");
        assert!(matches!(
            r.bytes(4, "x"),
            Err(LeError::OverCap { n: 5, cap: 4, .. })
        ));
        let mut r = Reader::new(&[9, 0, 0, 0, 1], "t");
        assert_eq!(r.bytes(64, "x"), Err(LeError::Truncated { what: "t" }));
        let r = Reader::new(&[1], "t");
        assert_eq!(r.finish(), Err(LeError::Trailing { what: "t", n: 1 }));
        let mut r = Reader::new(&[0, 1], "t");
        assert!(r.zeros(2, "pad").is_err());
        // A section whose length runs past the end is refused.
        let mut r = Reader::new(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff], "t");
        assert!(r.section(|_| "s").is_err());
    }
}
