//! The VM overlay format (FORMAT.md, part 2), as pure functions over bytes.
//!
//! An overlay is a [`header`], then [`frame`]s (each a small fixed header and
//! a sealed, zstd-compressed [`segment`]), then a [`frame::Footer`]. Data
//! segments carry [`record`]s; [`delta`] encodes in-place chunk patches.
//! [`io`] reads and writes the framing over byte streams; [`map`] is the
//! coverage map of version 2.

pub mod delta;
pub mod frame;
pub mod header;
pub mod io;
pub mod map;
pub mod record;
pub mod segment;

/// A position in the launch VM: (component index, chunk index). Records are
/// ordered by position.
pub type Pos = (u8, u64);
