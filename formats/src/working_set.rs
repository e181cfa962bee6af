//! The working-set file (FORMAT.md section 12.5): launch chunks in
//! first-touch order, parsed and encoded without I/O.

use std::collections::HashSet;

use crate::chunk::chunk_count;
use crate::error::Error;
use crate::overlay::Pos;
use crate::vmdir::Component;

/// The first line of every working-set file.
pub const HEADER: &str = "kimberley-working-set 1";
/// Largest working-set file a reader accepts (checked before reading it).
pub const MAX_WORKING_SET_BYTES: u64 = 64 << 20;
/// Most distinct entries (16 GiB of 4 KiB chunks).
pub const MAX_WORKING_SET: usize = 4 << 20;

/// Why a working-set file does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkingSetError {
    /// Larger than [`MAX_WORKING_SET_BYTES`].
    #[error("working set over {MAX_WORKING_SET_BYTES} bytes")]
    TooLarge,
    /// The first line is not [`HEADER`].
    #[error("not a working-set file (its first line must be {HEADER:?})")]
    Header,
    /// A line that is neither an entry nor a comment.
    #[error("line {0}: expected COMPONENT CHUNK (decimal, one space) or a # comment")]
    Line(usize),
    /// The last line has no line end.
    #[error("line {0}: no line end")]
    NoLineEnd(usize),
    /// More than [`MAX_WORKING_SET`] distinct entries.
    #[error("more than {MAX_WORKING_SET} entries")]
    TooMany,
}

fn number(s: &[u8]) -> Option<u64> {
    if s.is_empty() || (s.len() > 1 && s[0] == b'0') || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// Parses a working-set file: the distinct entries in first-touch order
/// (a repeat keeps its first place).
pub fn parse(text: &[u8]) -> Result<Vec<Pos>, WorkingSetError> {
    if text.len() as u64 > MAX_WORKING_SET_BYTES {
        return Err(WorkingSetError::TooLarge);
    }
    let mut lines = text.split_inclusive(|&b| b == b'\n');
    match lines.next() {
        Some(l) if l.strip_suffix(b"\n") == Some(HEADER.as_bytes()) => {}
        _ => return Err(WorkingSetError::Header),
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, l) in lines.enumerate() {
        let n = i + 2;
        let l = l.strip_suffix(b"\n").ok_or(WorkingSetError::NoLineEnd(n))?;
        if let Some(c) = l.strip_prefix(b"#") {
            if c.iter().all(|b| (0x20..=0x7e).contains(b)) {
                continue;
            }
            return Err(WorkingSetError::Line(n));
        }
        let mut parts = l.splitn(2, |&b| b == b' ');
        let comp = parts
            .next()
            .and_then(number)
            .and_then(|c| u8::try_from(c).ok());
        let chunk = parts.next().and_then(number);
        let (Some(comp), Some(chunk)) = (comp, chunk) else {
            return Err(WorkingSetError::Line(n));
        };
        if seen.insert((comp, chunk)) {
            if out.len() == MAX_WORKING_SET {
                return Err(WorkingSetError::TooMany);
            }
            out.push((comp, chunk));
        }
    }
    Ok(out)
}

/// Encodes entries as a working-set file ([`parse`] gives them back).
pub fn encode(ws: &[Pos]) -> Vec<u8> {
    let mut s = format!("{HEADER}\n");
    for (c, k) in ws {
        s.push_str(&format!("{c} {k}\n"));
    }
    s.into_bytes()
}

/// The working set as it enters the derived salt (FORMAT.md section 7.7):
/// 9-byte entries `u8(component) || le64(chunk)`, in order.
pub fn canonical(ws: &[Pos]) -> Vec<u8> {
    let mut w = crate::le::Writer::with_capacity(ws.len() * 9);
    for &(c, k) in ws {
        w.u8(c);
        w.u64(k);
    }
    w.into_inner()
}

/// Refuses (usage) an entry naming a component or chunk `launch` lacks.
pub fn check_against(ws: &[Pos], launch: &[Component]) -> Result<(), Error> {
    for &(c, k) in ws {
        let ok = launch
            .get(usize::from(c))
            .is_some_and(|comp| k < chunk_count(comp.size));
        if !ok {
            return Err(Error::Usage(format!(
                "the working set names chunk {k} of component {c}, which the launch VM does not have"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_repeats() {
        let t = b"kimberley-working-set 1\n0 5\n# page cache\n1 0\n0 5\n0 18446744073709551615\n";
        let ws = parse(t).unwrap();
        assert_eq!(ws, vec![(0, 5), (1, 0), (0, u64::MAX)]);
        assert_eq!(parse(&encode(&ws)).unwrap(), ws);
        assert_eq!(parse(b"kimberley-working-set 1\n").unwrap(), vec![]);
    }

    #[test]
    fn refuses_other_shapes() {
        for (t, e) in [
            (&b""[..], WorkingSetError::Header),
            (b"kimberley-working-set 2\n", WorkingSetError::Header),
            (b"kimberley-working-set 1\n0  5\n", WorkingSetError::Line(2)),
            (b"kimberley-working-set 1\n0 05\n", WorkingSetError::Line(2)),
            (
                b"kimberley-working-set 1\n256 5\n",
                WorkingSetError::Line(2),
            ),
            (
                b"kimberley-working-set 1\n0 5\r\n",
                WorkingSetError::Line(2),
            ),
            (b"kimberley-working-set 1\n\n", WorkingSetError::Line(2)),
            (b"kimberley-working-set 1\n0 -1\n", WorkingSetError::Line(2)),
            (
                b"kimberley-working-set 1\n0 18446744073709551616\n",
                WorkingSetError::Line(2),
            ),
            (
                b"kimberley-working-set 1\n0 5",
                WorkingSetError::NoLineEnd(2),
            ),
        ] {
            assert_eq!(parse(t), Err(e), "{}", String::from_utf8_lossy(t));
        }
    }
}
