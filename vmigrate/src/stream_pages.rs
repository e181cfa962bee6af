//! Finds the guest's memory pages in QEMU's migration stream (the page
//! records of its "ram" section for the RAM block of the guest's memory),
//! so that pages equal to a shared disk's blocks can travel as references
//! (docs/MIGRATION.md, "Shared-disk references"). It follows QEMU's
//! grammar strictly and gives up (finds nothing more) at anything else.

/// Bytes of a guest page (x86's target page).
pub const PAGE: usize = 4096;

// QEMU's stream (migration/savevm.c, migration/ram.c; big-endian).
const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SECTION_FOOTER: u8 = 0x7e;
const FLAG_ZERO: u64 = 0x02;
const FLAG_MEM_SIZE: u64 = 0x04;
const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
const FLAG_CONTINUE: u64 = 0x20;
const FLAGS: u64 = (PAGE as u64) - 1;
/// The "ram" section's START header after its type byte and id: idstr
/// length, "ram", instance id 0 … and version 4.
const RAM_ID: &[u8] = b"\x03ram";
/// The stream's first bytes in which the "ram" section must begin.
const SYNC_LIMIT: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// Looking for the "ram" section's START.
    Sync,
    /// Its setup: the total size of RAM.
    Setup,
    /// Its setup: RAM blocks (name, size) until `left` bytes are named.
    Blocks { left: u64 },
    /// A page record's header next.
    Records,
    /// A page's bytes next.
    Page,
    /// Bytes of a page to pass over (the piece was cut inside it).
    Skip(usize),
    /// The end of a section's data: its footer or the next section.
    Footer,
    /// A section's type byte next.
    Section,
    /// Past the RAM (device state), or lost: nothing more is found.
    Done,
}

/// What [`PageFinder::scan`] found in a buffer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Offsets of the pages wholly inside the buffer, ascending.
    pub pages: Vec<usize>,
    /// Where the parse stopped: before an item not wholly in the buffer.
    pub end: usize,
}

/// A parser of one stream, fed the stream's bytes in order.
#[derive(Debug)]
pub struct PageFinder {
    st: St,
    ram_id: u32,
    /// Stream bytes consumed while looking for the "ram" section.
    seen: u64,
    /// The size of the guest's memory, and the name of the first RAM block
    /// of that size (the setup names the blocks).
    memory_size: u64,
    memory_block: Option<Vec<u8>>,
    /// The page records name that block (records without a name are of
    /// the block last named).
    in_memory: bool,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

impl PageFinder {
    /// A parser for the stream of a guest of `memory_size` bytes: the pages
    /// it finds are those of the RAM block of that size.
    pub fn new(memory_size: u64) -> PageFinder {
        PageFinder {
            st: St::Sync,
            ram_id: 0,
            seen: 0,
            memory_size,
            memory_block: None,
            in_memory: false,
        }
    }

    /// True once nothing more can be found (past the RAM, or lost).
    pub fn done(&self) -> bool {
        self.st == St::Done
    }

    /// True while the next byte after the last scan is a page's first.
    pub fn at_page(&self) -> bool {
        self.st == St::Page
    }

    /// Parses `buf[from..]`, where `from` is the `end` of the last scan of
    /// the same bytes (0 for bytes not scanned before). Items not wholly in
    /// the buffer are left for the next scan, which must start at `end`.
    pub fn scan(&mut self, buf: &[u8], from: usize) -> Scan {
        let mut at = from;
        let mut pages = Vec::new();
        loop {
            let rest = &buf[at..];
            match self.st {
                St::Done => {
                    at = buf.len();
                    break;
                }
                St::Sync => {
                    // START, id, "\x03ram", instance, version 4: 17 bytes,
                    // starting in the stream's first SYNC_LIMIT bytes.
                    let room = (SYNC_LIMIT - self.seen) as usize + 16;
                    let look = &rest[..rest.len().min(room)];
                    let found = look.windows(17).position(|w| {
                        w[0] == SECTION_START && &w[5..9] == RAM_ID && be32(&w[13..]) == 4
                    });
                    match found {
                        Some(k) => {
                            self.ram_id = be32(&rest[k + 1..]);
                            at += k + 17;
                            self.st = St::Setup;
                        }
                        None => {
                            // The last 16 bytes may begin the header.
                            let n = look.len().saturating_sub(16);
                            at += n;
                            self.seen += n as u64;
                            if self.seen >= SYNC_LIMIT {
                                self.st = St::Done;
                            }
                            break;
                        }
                    }
                }
                St::Setup => {
                    if rest.len() < 8 {
                        break;
                    }
                    let v = be64(rest);
                    at += 8;
                    self.st = if v & FLAGS == FLAG_MEM_SIZE {
                        St::Blocks { left: v & !FLAGS }
                    } else {
                        St::Done
                    };
                }
                St::Blocks { left: 0 } => self.st = St::Records,
                St::Blocks { left } => {
                    let Some(&n) = rest.first() else { break };
                    let need = 1 + n as usize + 8;
                    if rest.len() < need {
                        break;
                    }
                    let size = be64(&rest[1 + n as usize..]);
                    if size == self.memory_size && self.memory_block.is_none() {
                        self.memory_block = Some(rest[1..1 + n as usize].to_vec());
                    }
                    at += need;
                    self.st = match left.checked_sub(size) {
                        Some(l) if size > 0 && n > 0 => St::Blocks { left: l },
                        _ => St::Done,
                    };
                }
                St::Records => {
                    if rest.len() < 8 {
                        break;
                    }
                    let flags = be64(rest) & FLAGS;
                    let data = flags & !FLAG_CONTINUE;
                    if data == FLAG_EOS && flags == FLAG_EOS {
                        at += 8;
                        self.st = St::Footer;
                        continue;
                    }
                    if data != FLAG_PAGE && data != FLAG_ZERO {
                        self.st = St::Done;
                        continue;
                    }
                    let mut need = 8;
                    let mut name = None;
                    if flags & FLAG_CONTINUE == 0 {
                        let Some(&n) = rest.get(8) else { break };
                        need += 1 + n as usize;
                        name = rest.get(9..9 + n as usize);
                    }
                    if data == FLAG_ZERO {
                        need += 1;
                    }
                    if rest.len() < need {
                        break;
                    }
                    if let Some(name) = name {
                        self.in_memory = self.memory_block.as_deref() == Some(name);
                    }
                    at += need;
                    if data == FLAG_PAGE {
                        self.st = St::Page;
                    }
                }
                St::Page => {
                    if rest.len() < PAGE {
                        break;
                    }
                    if self.in_memory {
                        pages.push(at);
                    }
                    at += PAGE;
                    self.st = St::Records;
                }
                St::Skip(n) => {
                    let k = n.min(rest.len());
                    at += k;
                    if k < n {
                        self.st = St::Skip(n - k);
                        break;
                    }
                    self.st = St::Records;
                }
                St::Footer => {
                    let Some(&t) = rest.first() else { break };
                    if t != SECTION_FOOTER {
                        // A machine type without section footers.
                        self.st = St::Section;
                        continue;
                    }
                    if rest.len() < 5 {
                        break;
                    }
                    at += 5;
                    self.st = if be32(&rest[1..]) == self.ram_id {
                        St::Section
                    } else {
                        St::Done
                    };
                }
                St::Section => {
                    if rest.len() < 5 {
                        break;
                    }
                    let (t, id) = (rest[0], be32(&rest[1..]));
                    at += 5;
                    self.st = if (t == SECTION_PART || t == SECTION_END) && id == self.ram_id {
                        St::Records
                    } else {
                        // Another section (device state comes last).
                        St::Done
                    };
                }
            }
        }
        Scan { pages, end: at }
    }

    /// The first `n` bytes of a page whose start the last scan ended at
    /// were sent without being parsed: the rest of the page is passed over.
    pub fn sent_part_of_page(&mut self, n: usize) {
        debug_assert!(self.st == St::Page && n < PAGE);
        if self.st == St::Page {
            self.st = if n == 0 { St::Page } else { St::Skip(PAGE - n) };
        }
    }

    /// Bytes after the last scan's end were sent without being parsed
    /// (not a page's): the parse cannot go on.
    pub fn lose(&mut self) {
        self.st = St::Done;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream as QEMU 7.2 writes it for a machine with `blocks` (name,
    /// pages) and the given iterations of records (block, page, data
    /// byte: 0 for a zero page), then a device-state section.
    fn stream(blocks: &[(&str, u64)], rounds: &[Vec<(usize, u64, u8)>]) -> (Vec<u8>, Vec<usize>) {
        let mut s = b"QEVM\0\0\0\x03\x07\0\0\0\x0dpc-i440fx-7.2".to_vec();
        s.push(SECTION_START);
        s.extend(2u32.to_be_bytes());
        s.extend(RAM_ID);
        s.extend(0u32.to_be_bytes());
        s.extend(4u32.to_be_bytes());
        let total: u64 = blocks.iter().map(|b| b.1 * PAGE as u64).sum();
        s.extend((total | FLAG_MEM_SIZE).to_be_bytes());
        for (name, pages) in blocks {
            s.push(name.len() as u8);
            s.extend(name.as_bytes());
            s.extend((pages * PAGE as u64).to_be_bytes());
        }
        s.extend(FLAG_EOS.to_be_bytes());
        s.push(SECTION_FOOTER);
        s.extend(2u32.to_be_bytes());
        let mut at = Vec::new();
        for (i, round) in rounds.iter().enumerate() {
            s.push(if i + 1 == rounds.len() {
                SECTION_END
            } else {
                SECTION_PART
            });
            s.extend(2u32.to_be_bytes());
            let mut last = usize::MAX;
            for &(b, page, byte) in round {
                let mut flags = if byte == 0 { FLAG_ZERO } else { FLAG_PAGE };
                if b == last {
                    flags |= FLAG_CONTINUE;
                }
                s.extend(((page * PAGE as u64) | flags).to_be_bytes());
                if b != last {
                    s.push(blocks[b].0.len() as u8);
                    s.extend(blocks[b].0.as_bytes());
                }
                last = b;
                if byte == 0 {
                    s.push(0);
                } else {
                    // The guest's memory is block 0.
                    if b == 0 {
                        at.push(s.len());
                    }
                    s.extend([byte; PAGE]);
                }
            }
            s.extend(FLAG_EOS.to_be_bytes());
            s.push(SECTION_FOOTER);
            s.extend(2u32.to_be_bytes());
        }
        // Device state: a FULL section of another id.
        s.extend([0x04, 0, 0, 0, 3, 3, b'a', b'p', b'm', 0, 0, 0, 0]);
        s.extend([0x55; 300]);
        (s, at)
    }

    fn sample() -> (Vec<u8>, Vec<usize>) {
        // The guest's 64 pages, and video memory whose pages are not
        // found.
        let blocks = [("ram0", 64), ("vga.vram", 16)];
        let r1: Vec<_> = (0..64)
            .map(|p| (0, p, (p % 3) as u8 * 7))
            .chain((0..4).map(|p| (1, p, 9)))
            .collect();
        let r2 = vec![(0, 5, 1), (1, 2, 0), (1, 3, 2), (0, 9, 3)];
        stream(&blocks, &[r1, r2, vec![(0, 1, 4)]])
    }

    #[test]
    fn finds_every_page_of_a_whole_stream() {
        let (s, want) = sample();
        let mut f = PageFinder::new(64 * PAGE as u64);
        let got = f.scan(&s, 0);
        assert_eq!(got.pages, want);
        assert_eq!(got.end, s.len());
        assert!(f.done());
    }

    /// The pages found in `s` fed in pieces of `piece` bytes, each scan
    /// resuming where the last stopped (the unparsed tail carried over, as
    /// the sender does), at their offsets in `s`.
    fn in_pieces(s: &[u8], piece: usize) -> Vec<usize> {
        let mut f = PageFinder::new(64 * PAGE as u64);
        let (mut buf, mut base) = (Vec::new(), 0usize);
        let mut got = Vec::new();
        for c in s.chunks(piece) {
            buf.extend_from_slice(c);
            let sc = f.scan(&buf, 0);
            got.extend(sc.pages.iter().map(|p| base + p));
            buf.drain(..sc.end);
            base += sc.end;
        }
        got
    }

    #[test]
    fn finds_the_same_pages_whatever_the_pieces() {
        // Pieces of every size from 1 byte up, each scan resuming where
        // the last stopped (the unparsed tail carried over, as the sender
        // does), give the same pages at the same stream offsets.
        let (s, want) = sample();
        for piece in [1, 7, 100, 4095, 4096, 4097, 10_000] {
            assert_eq!(in_pieces(&s, piece), want, "pieces of {piece}");
        }
        // A stream whose "ram" section begins past the first MiB: nothing
        // is found, whole or in pieces.
        let mut late = vec![0x11u8; SYNC_LIMIT as usize];
        late.extend(&s);
        let mut f = PageFinder::new(64 * PAGE as u64);
        assert!(f.scan(&late, 0).pages.is_empty());
        assert!(in_pieces(&late, 4096).is_empty());
    }

    #[test]
    fn a_page_sent_in_part_is_passed_over() {
        let (s, want) = sample();
        let mut f = PageFinder::new(64 * PAGE as u64);
        // Up to 10 bytes into the third page.
        let cut = want[2] + 10;
        let sc = f.scan(&s[..cut], 0);
        assert_eq!(sc.pages, want[..2]);
        assert_eq!(sc.end, want[2]);
        assert!(f.at_page());
        f.sent_part_of_page(10);
        let rest = f.scan(&s[cut..], 0);
        let got: Vec<usize> = rest.pages.iter().map(|p| p + cut).collect();
        assert_eq!(got, want[3..]);
    }

    #[test]
    fn gives_up_on_what_it_does_not_know() {
        let (s, want) = sample();
        // An unknown record flag (XBZRLE) ends the parse: no pages after.
        let mut bad = s.clone();
        let hdr = want[1] - 8;
        bad[hdr + 7] = 0x40 | 0x20;
        let mut f = PageFinder::new(64 * PAGE as u64);
        let sc = f.scan(&bad, 0);
        assert_eq!(sc.pages, want[..1]);
        assert!(f.done());
        // A stream without a "ram" section in its first MiB.
        let mut f = PageFinder::new(64 * PAGE as u64);
        let junk = vec![0x11u8; (SYNC_LIMIT + 100) as usize];
        assert!(f.scan(&junk, 0).pages.is_empty());
        assert!(f.done());
        // Garbage never panics, whatever the cut.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            let mut g = s.clone();
            for _ in 0..8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % g.len();
                g[i] = (x >> 32) as u8;
            }
            let g = &g[..(x as usize) % g.len()];
            let mut f = PageFinder::new(64 * PAGE as u64);
            let sc = f.scan(g, 0);
            assert!(sc.pages.iter().all(|&p| p + PAGE <= g.len()));
            assert_eq!(sc.pages, in_pieces(g, 1000));
        }
    }
}
