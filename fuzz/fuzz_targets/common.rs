//! Helpers shared by the fuzz targets and `seedgen`: they rebuild the
//! integrity layer of an overlay (header MAC, segment tags, compression) so
//! that mutated inputs reach the parsers behind it instead of being refused
//! at the first checksum.
//!
//! Structured input (overlay_stream mode 3), after the mode byte:
//!
//! ```text
//! header   192 bytes (bytes 160..192, the MAC, are recomputed)
//! segment* kind u8 (1 + kind % 4), flags u8, len u32 LE, body[len]
//!          flags bit 0: last segment; bit 1: rewrite the index entries'
//!          counter/offset/frame_len/body_len to the frames actually written
//!          (on a coverage map: its segment entries' frame lengths)
//!          (when the first segment is a manifest that decodes, the header's
//!          result identity is set to match it)
//! rest     after the last segment: empty = a correct footer is written;
//!          otherwise these bytes are written instead of the footer
//! ```
//!
//! Bodies are compressed and sealed (plain BLAKE3, or ChaCha20-Poly1305
//! under `derive(KEY, salt)` when the header's protection byte is 1).
#![allow(dead_code)]

use kimberley_formats::crypto::keys::{commit_id, derive};
use kimberley_formats::crypto::Sealer;
use kimberley_formats::overlay::frame::{Footer, SegmentKind, FOOTER_LEN, FRAME_HEADER_LEN};
use kimberley_formats::overlay::header::{Header, HEADER_LEN, MAC_OFFSET};
use kimberley_formats::overlay::io::{compress, seal_frame};
use kimberley_formats::overlay::segment::{Index, ManifestSegment};

/// The key file contents the encrypted fuzz modes use.
pub const KEY: [u8; 32] = [7; 32];

/// Recomputes the header MAC in place (keyed when protection byte is 1);
/// returns the sealer the segments must use, if the header then decodes.
pub fn fix_header(bytes: &mut [u8]) -> Option<Sealer> {
    if bytes.len() < HEADER_LEN {
        return None;
    }
    let unsigned: [u8; MAC_OFFSET] = bytes[..MAC_OFFSET].try_into().ok()?;
    let keyed = bytes[12] == 1;
    let salt: [u8; 32] = bytes[32..64].try_into().ok()?;
    let keys = keyed.then(|| derive(&KEY, &salt));
    let mac = Header::compute_mac(&unsigned, keys.as_ref());
    bytes[MAC_OFFSET..HEADER_LEN].copy_from_slice(&mac);
    let h = Header::decode(&bytes[..HEADER_LEN]).ok()?;
    Some(match keys {
        Some(k) => Sealer::aead(&k.payload),
        None => Sealer::Plain(h.binding()),
    })
}

/// Points the header's result identity at the launch manifest of the first
/// structured segment, when that is a manifest that decodes, so mutated
/// manifests (other geometries) still open.
fn fix_result_id(header: &mut [u8], segments: &[u8]) {
    if segments.len() < 6 || !segments[0].is_multiple_of(4) {
        return;
    }
    let len = u32::from_le_bytes(segments[2..6].try_into().unwrap()) as usize;
    let body = &segments[6..6 + len.min(segments.len() - 6)];
    let Ok(m) = ManifestSegment::decode(body) else {
        return;
    };
    let salt: [u8; 32] = header[32..64].try_into().unwrap();
    let keys = (header[12] == 1).then(|| derive(&KEY, &salt));
    let id = commit_id(keys.as_ref(), &m.launch_manifest().identity());
    header[96..128].copy_from_slice(&id);
}

/// Mode 2: keeps the byte layout of a (mutated) overlay but recomputes the
/// header MAC and every frame's tag, walking frames by their lengths.
pub fn reseal(bytes: &mut [u8]) {
    let Some(sealer) = fix_header(bytes) else {
        return;
    };
    let t = sealer.overhead();
    let mut pos = HEADER_LEN;
    let mut counter = 0u64;
    while pos + FRAME_HEADER_LEN <= bytes.len() {
        let fh: [u8; FRAME_HEADER_LEN] = bytes[pos..pos + FRAME_HEADER_LEN].try_into().unwrap();
        let sealed_len = u32::from_le_bytes(fh[4..8].try_into().unwrap()) as usize;
        let start = pos + FRAME_HEADER_LEN;
        if sealed_len < t || start + sealed_len > bytes.len() {
            return;
        }
        let last = fh[1] == 1;
        let mut data = bytes[start..start + sealed_len - t].to_vec();
        sealer.seal(counter, last, &fh, &mut data);
        bytes[start..start + sealed_len].copy_from_slice(&data);
        counter += 1;
        pos = start + sealed_len;
        if fh[1] != 0 {
            return;
        }
    }
}

/// Mode 3: builds an overlay from a header and uncompressed segment bodies.
pub fn build_structured(payload: &[u8]) -> Vec<u8> {
    if payload.len() < HEADER_LEN {
        return payload.to_vec();
    }
    let mut out = payload[..HEADER_LEN].to_vec();
    fix_result_id(&mut out, &payload[HEADER_LEN..]);
    let Some(sealer) = fix_header(&mut out) else {
        return out;
    };
    let mut rest = &payload[HEADER_LEN..];
    let data_lens = data_frame_lens(rest, &sealer);
    let mut counter = 0u64;
    // (counter, offset, frame_len, body_len) of data frames written.
    let mut data_frames: Vec<(u64, u64, u32, u32)> = Vec::new();
    while rest.len() >= 6 {
        let kind = match rest[0] % 4 {
            0 => SegmentKind::Manifest,
            1 => SegmentKind::Data,
            2 => SegmentKind::Index,
            _ => SegmentKind::Map,
        };
        let flags = rest[1];
        let last = flags & 1 != 0;
        let len = u32::from_le_bytes(rest[2..6].try_into().unwrap()) as usize;
        let len = len.min(rest.len() - 6);
        let mut body = rest[6..6 + len].to_vec();
        rest = &rest[6 + len..];
        if kind == SegmentKind::Map && flags & 2 != 0 {
            // The coverage map lists every data segment's frame length
            // (FORMAT.md section 10.5): entry i's first u32 at 8 + 12 i.
            for (i, &len) in data_lens.iter().enumerate() {
                let at = 8 + 12 * i;
                if let Some(f) = body.get_mut(at..at + 4) {
                    f.copy_from_slice(&len.to_le_bytes());
                }
            }
        }
        if kind == SegmentKind::Index && flags & 2 != 0 {
            // Any entry order: a version-2 index lists working-set
            // segments out of position order (the reader checks it).
            if let Ok(mut ix) = Index::decode_with(&body, usize::MAX) {
                for (e, &(c, off, flen, blen)) in ix.entries.iter_mut().zip(data_frames.iter()) {
                    e.counter = c;
                    e.offset = off;
                    e.frame_len = flen;
                    e.body_len = blen;
                }
                body = ix.encode();
            }
        }
        let frame = seal_frame(&sealer, counter, kind, last, compress(&body, 1));
        if kind == SegmentKind::Data {
            data_frames.push((
                counter,
                out.len() as u64,
                frame.len() as u32,
                body.len() as u32,
            ));
        }
        let offset = out.len() as u64;
        out.extend_from_slice(&frame);
        counter += 1;
        if last {
            if rest.is_empty() {
                let f = Footer {
                    index_offset: offset,
                    frames: counter,
                };
                out.extend_from_slice(&f.encode());
            } else {
                out.extend_from_slice(rest);
            }
            return out;
        }
    }
    out
}

/// The frame lengths the data segments of a structured payload get.
fn data_frame_lens(mut rest: &[u8], sealer: &Sealer) -> Vec<u32> {
    let mut out = Vec::new();
    while rest.len() >= 6 {
        let len = u32::from_le_bytes(rest[2..6].try_into().unwrap()) as usize;
        let len = len.min(rest.len() - 6);
        if rest[0] % 4 == 1 {
            let c = compress(&rest[6..6 + len], 1);
            out.push((FRAME_HEADER_LEN + c.len() + sealer.overhead()) as u32);
        }
        let last = rest[1] & 1 != 0;
        rest = &rest[6 + len..];
        if last {
            break;
        }
    }
    out
}

/// Inverse of [`build_structured`] for a valid overlay: header, then each
/// segment's decompressed body (used by `seedgen`).
pub fn to_structured(overlay: &[u8]) -> Option<Vec<u8>> {
    use kimberley_formats::overlay::io::FrameReader;
    let mut hdr = overlay.get(..HEADER_LEN)?.to_vec();
    let sealer = fix_header(&mut hdr)?;
    let mut r = FrameReader::new(std::io::Cursor::new(overlay));
    r.header().ok()?;
    let mut out = hdr;
    while let Some(f) = r.next_frame().ok()? {
        let kind = match f.header.kind {
            SegmentKind::Manifest => 0u8,
            SegmentKind::Data => 1,
            SegmentKind::Index => 2,
            SegmentKind::Map => 3,
        };
        let last = f.header.last;
        let body = f.open(&sealer).ok()?;
        out.push(kind);
        out.push(if last || kind == 3 {
            u8::from(last) | 2
        } else {
            0
        });
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
    }
    let _ = FOOTER_LEN;
    Some(out)
}
