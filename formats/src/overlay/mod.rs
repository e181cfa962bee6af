//! The VM overlay format (FORMAT.md, part 2), as pure functions over bytes.
//!
//! An overlay is a [`header`], then [`frame`]s (each a small fixed header and
//! a sealed, zstd-compressed [`segment`]), then a [`frame::Footer`]. Data
//! segments carry [`record`]s; [`delta`] encodes in-place chunk patches.
//! [`io`] reads and writes the framing over byte streams.

pub mod delta;
pub mod frame;
pub mod header;
pub mod io;
pub mod record;
pub mod segment;

/// Reads little-endian integers from a byte slice with bounds checks.
#[derive(Debug)]
pub(crate) struct Cursor<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .map(|b| u16::from_le_bytes(b.try_into().expect("2 bytes")))
    }
    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).map(|b| b.try_into().expect("N bytes"))
    }
}

/// A position in the launch VM: (component index, chunk index). Records are
/// ordered by position.
pub type Pos = (u8, u64);
