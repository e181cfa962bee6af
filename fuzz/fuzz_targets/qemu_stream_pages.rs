//! vmigrate::stream_pages: the parse of QEMU's migration stream that finds
//! the guest's pages never panics, finds only pages wholly inside what it
//! was given, and finds the same pages at the same stream offsets whether
//! the stream comes whole or in pieces (each scan resuming where the last
//! stopped, as the sender feeds it). The first two bytes pick the piece
//! size; the guest's memory is 64 pages (a stream's RAM block of that
//! size is the one whose pages are found).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmigrate::stream_pages::{PageFinder, PAGE};

const MEMORY: u64 = 64 * PAGE as u64;

fuzz_target!(|data: &[u8]| {
    let Some((head, s)) = data.split_first_chunk::<2>() else {
        return;
    };
    let piece = usize::from(u16::from_le_bytes(*head)).max(1);
    let mut f = PageFinder::new(MEMORY);
    let whole = f.scan(s, 0);
    assert!(whole.end <= s.len());
    assert!(whole.pages.iter().all(|&p| p + PAGE <= whole.end));
    assert!(whole.pages.windows(2).all(|w| w[0] + PAGE <= w[1]));
    let mut f = PageFinder::new(MEMORY);
    let (mut buf, mut base) = (Vec::new(), 0usize);
    let mut got = Vec::new();
    for c in s.chunks(piece) {
        buf.extend_from_slice(c);
        let sc = f.scan(&buf, 0);
        assert!(sc.end <= buf.len());
        got.extend(sc.pages.iter().map(|p| base + p));
        buf.drain(..sc.end);
        base += sc.end;
    }
    assert_eq!(got, whole.pages, "pieces of {piece}");
});
