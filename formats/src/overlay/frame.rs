//! Frame headers (8 bytes before each sealed segment) and the footer.

use crate::error::{Error, Result};

/// Encoded frame header size.
pub const FRAME_HEADER_LEN: usize = 8;
/// Largest sealed segment a reader accepts.
pub const MAX_SEALED: u32 = 16 << 20;
/// Encoded footer size.
pub const FOOTER_LEN: usize = 24;
/// Last bytes of every overlay.
pub const FOOTER_MAGIC: [u8; 8] = *b"KOVLEND\0";

/// What a segment holds. 0 is reserved as invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentKind {
    /// The launch manifest (always first).
    Manifest = 1,
    /// Chunk records.
    Data = 2,
    /// The segment index (always last).
    Index = 3,
    /// The coverage map (version 2, right after the manifest).
    Map = 4,
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Segment kind.
    pub kind: SegmentKind,
    /// Set on the final segment only.
    pub last: bool,
    /// Length of the sealed segment that follows.
    pub sealed_len: u32,
}

impl FrameHeader {
    /// Encodes (these bytes are also the segment's associated data).
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[0] = self.kind as u8;
        b[1] = u8::from(self.last);
        b[4..8].copy_from_slice(&self.sealed_len.to_le_bytes());
        b
    }

    /// Decodes and checks a frame header.
    pub fn decode(b: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader> {
        let kind = match b[0] {
            1 => SegmentKind::Manifest,
            2 => SegmentKind::Data,
            3 => SegmentKind::Index,
            4 => SegmentKind::Map,
            k => return Err(Error::Corrupt(format!("unknown segment kind {k}"))),
        };
        if b[1] > 1 || b[2] != 0 || b[3] != 0 {
            return Err(Error::Corrupt("bad frame flags".into()));
        }
        let sealed_len = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
        if sealed_len > MAX_SEALED {
            return Err(Error::Corrupt(format!(
                "segment of {sealed_len} bytes exceeds the limit"
            )));
        }
        Ok(FrameHeader {
            kind,
            last: b[1] == 1,
            sealed_len,
        })
    }
}

/// The footer: where the index frame is, for readers that seek.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    /// Byte offset of the index frame from the start of the overlay.
    pub index_offset: u64,
    /// Number of frames (the index frame's counter + 1).
    pub frames: u64,
}

impl Footer {
    /// Encodes.
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[0..8].copy_from_slice(&self.index_offset.to_le_bytes());
        b[8..16].copy_from_slice(&self.frames.to_le_bytes());
        b[16..24].copy_from_slice(&FOOTER_MAGIC);
        b
    }

    /// Decodes.
    pub fn decode(b: &[u8; FOOTER_LEN]) -> Result<Footer> {
        if b[16..24] != FOOTER_MAGIC {
            return Err(Error::Corrupt("bad footer".into()));
        }
        Ok(Footer {
            index_offset: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
            frames: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let f = FrameHeader {
            kind: SegmentKind::Index,
            last: true,
            sealed_len: 77,
        };
        assert_eq!(FrameHeader::decode(&f.encode()).unwrap(), f);
        let mut b = f.encode();
        b[0] = 0;
        assert!(FrameHeader::decode(&b).is_err());
        let ft = Footer {
            index_offset: 1234,
            frames: 9,
        };
        assert_eq!(Footer::decode(&ft.encode()).unwrap(), ft);
    }
}
