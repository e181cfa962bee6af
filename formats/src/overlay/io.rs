//! Reading and writing overlay framing over byte streams. Everything about
//! byte layout is in the pure modules; this one only moves bytes.

use std::io::{self, Read, Write};

use super::frame::{Footer, FrameHeader, SegmentKind, FOOTER_LEN, FRAME_HEADER_LEN};
use super::header::{Header, HEADER_LEN};
use super::segment::MAX_BODY;
use crate::crypto::Sealer;
use crate::error::{Error, IoContext, Result};

/// A frame as read from the stream, still sealed.
#[derive(Debug)]
pub struct Frame {
    /// STREAM counter (0 for the first frame).
    pub counter: u64,
    /// Offset of the frame header from the start of the overlay.
    pub offset: u64,
    /// The decoded frame header.
    pub header: FrameHeader,
    /// The sealed segment.
    pub sealed: Vec<u8>,
}

impl Frame {
    /// Frame header + sealed bytes.
    pub fn len(&self) -> u64 {
        FRAME_HEADER_LEN as u64 + self.sealed.len() as u64
    }

    /// Always false (a frame has at least its header).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Authenticates and decompresses the segment body.
    pub fn open(self, sealer: &Sealer) -> Result<Vec<u8>> {
        let mut data = self.sealed;
        sealer.open(
            self.counter,
            self.header.last,
            &self.header.encode(),
            &mut data,
        )?;
        decompress(&data).map_err(|e| Error::Corrupt(format!("segment {}: {e}", self.counter)))
    }
}

/// Compresses a body (zstd, one frame).
pub fn compress(body: &[u8], level: i32) -> Vec<u8> {
    zstd::bulk::compress(body, level).expect("compressing into a growable buffer cannot fail")
}

/// Decompresses a body, refusing anything larger than [`MAX_BODY`].
pub fn decompress(data: &[u8]) -> io::Result<Vec<u8>> {
    let cap = match zstd::zstd_safe::get_frame_content_size(data) {
        Ok(Some(n)) if n <= MAX_BODY as u64 => n as usize,
        Ok(Some(_)) => return Err(io::Error::other("body larger than the limit")),
        _ => MAX_BODY,
    };
    zstd::bulk::decompress(data, cap)
}

/// Seals a compressed body into a complete frame (header + sealed bytes).
pub fn seal_frame(
    sealer: &Sealer,
    counter: u64,
    kind: SegmentKind,
    last: bool,
    mut data: Vec<u8>,
) -> Vec<u8> {
    let fh = FrameHeader {
        kind,
        last,
        sealed_len: (data.len() + sealer.overhead()) as u32,
    };
    let aad = fh.encode();
    sealer.seal(counter, last, &aad, &mut data);
    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + data.len());
    frame.extend_from_slice(&aad);
    frame.extend_from_slice(&data);
    frame
}

/// Reads the framing of one overlay from a stream.
pub struct FrameReader<R> {
    inp: R,
    pos: u64,
    counter: u64,
    done: bool,
    /// The header's version (placement rules depend on it).
    version: u16,
    /// Bytes read so far (for progress and stats).
    pub bytes_read: u64,
}

/// Reads as much of `buf` as the stream has; returns the count.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl<R: Read> FrameReader<R> {
    /// Wraps a stream positioned at the start of an overlay.
    pub fn new(inp: R) -> Self {
        FrameReader {
            inp,
            pos: 0,
            counter: 0,
            done: false,
            version: super::header::VERSION_1,
            bytes_read: 0,
        }
    }

    /// The counter the next frame will have.
    pub fn next_counter(&self) -> u64 {
        self.counter
    }

    /// Reads and decodes the header (the MAC is checked by the caller, who
    /// has the keys). Returns it with its raw bytes.
    pub fn header(&mut self) -> Result<(Header, [u8; HEADER_LEN])> {
        let mut b = [0u8; HEADER_LEN];
        let n = read_full(&mut self.inp, &mut b).ctx(|| "reading the overlay".into())?;
        self.pos += n as u64;
        self.bytes_read += n as u64;
        let h = Header::decode(&b[..n])?;
        self.version = h.version;
        Ok((h, b))
    }

    /// Reads the next frame; `None` after the last frame, once the footer
    /// has been checked and the end of the stream seen.
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        if self.done {
            return Ok(None);
        }
        let mut fh = [0u8; FRAME_HEADER_LEN];
        let n = read_full(&mut self.inp, &mut fh).ctx(|| "reading the overlay".into())?;
        if n < FRAME_HEADER_LEN {
            return Err(Error::Truncated(format!(
                "stream ends before segment {}",
                self.counter
            )));
        }
        let header = FrameHeader::decode(&fh)?;
        // FORMAT.md section 8.1: where each kind may stand.
        let first_data = if self.version >= super::header::VERSION_MAP {
            2
        } else {
            1
        };
        let expect_ok = match header.kind {
            SegmentKind::Manifest => self.counter == 0 && !header.last,
            SegmentKind::Map => first_data == 2 && self.counter == 1 && !header.last,
            SegmentKind::Data => self.counter >= first_data && !header.last,
            SegmentKind::Index => self.counter >= first_data && header.last,
        };
        if !expect_ok {
            return Err(Error::Corrupt(format!(
                "segment {} is out of place ({:?})",
                self.counter, header.kind
            )));
        }
        // Grows as bytes arrive: a lying length costs no memory up front.
        let want = header.sealed_len as usize;
        let mut sealed = Vec::with_capacity(want.min(1 << 20));
        (&mut self.inp)
            .take(want as u64)
            .read_to_end(&mut sealed)
            .ctx(|| "reading the overlay".into())?;
        if sealed.len() < want {
            return Err(Error::Truncated(format!(
                "stream ends inside segment {}",
                self.counter
            )));
        }
        let frame = Frame {
            counter: self.counter,
            offset: self.pos,
            header,
            sealed,
        };
        self.pos += frame.len();
        self.bytes_read += frame.len();
        if header.last {
            // A bad footer is reported in the index frame's place.
            self.footer(frame.offset)?;
        }
        self.counter += 1;
        Ok(Some(frame))
    }

    fn footer(&mut self, index_offset: u64) -> Result<()> {
        let mut b = [0u8; FOOTER_LEN];
        let n = read_full(&mut self.inp, &mut b).ctx(|| "reading the overlay".into())?;
        self.bytes_read += n as u64;
        if n < FOOTER_LEN {
            return Err(Error::Truncated("stream ends inside the footer".into()));
        }
        let f = Footer::decode(&b)?;
        if f.index_offset != index_offset || f.frames != self.counter + 1 {
            return Err(Error::Corrupt("footer does not match the segments".into()));
        }
        let mut extra = [0u8; 1];
        if read_full(&mut self.inp, &mut extra).ctx(|| "reading the overlay".into())? != 0 {
            return Err(Error::Corrupt("data after the end of the overlay".into()));
        }
        self.done = true;
        Ok(())
    }
}

/// Writes frames in order and tracks offsets. `finish` writes the footer;
/// an overlay whose writer was dropped without it is rejected by readers
/// (no last segment).
pub struct FrameWriter<W: Write> {
    out: W,
    pos: u64,
    counter: u64,
}

impl<W: Write> FrameWriter<W> {
    /// Writes the header.
    pub fn new(mut out: W, header: &[u8; HEADER_LEN]) -> Result<Self> {
        out.write_all(header).ctx(|| "writing the overlay".into())?;
        Ok(FrameWriter {
            out,
            pos: HEADER_LEN as u64,
            counter: 0,
        })
    }

    /// The counter the next frame must have been sealed with.
    pub fn next_counter(&self) -> u64 {
        self.counter
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Writes a sealed frame (from [`seal_frame`]); returns its offset.
    pub fn write_frame(&mut self, frame: &[u8]) -> Result<u64> {
        let at = self.pos;
        self.out
            .write_all(frame)
            .ctx(|| "writing the overlay".into())?;
        self.pos += frame.len() as u64;
        self.counter += 1;
        Ok(at)
    }

    /// Writes the footer after the index frame (written last) and flushes.
    pub fn finish(mut self, index_offset: u64) -> Result<(W, u64)> {
        let f = Footer {
            index_offset,
            frames: self.counter,
        };
        self.out
            .write_all(&f.encode())
            .ctx(|| "writing the overlay".into())?;
        self.out.flush().ctx(|| "writing the overlay".into())?;
        self.pos += FOOTER_LEN as u64;
        Ok((self.out, self.pos))
    }
}
