//! Partition tables of raw disks (MBR and GPT), parsed to find where the
//! file systems are; capped, checked, never trusted past their checksums.

use super::{read, FsError, ReadAt};
use crate::le::Reader;

/// Most GPT partition entries read.
pub const MAX_GPT_ENTRIES: u32 = 1024;
/// Largest GPT entry accepted.
pub const MAX_GPT_ENTRY_SIZE: u32 = 4096;

/// One partition: where it is on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// Its number in the table (1-based).
    pub number: u32,
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Partition {
    /// True if the two share a byte.
    pub fn overlaps(&self, o: &Partition) -> bool {
        self.start < o.start + o.len && o.start < self.start + self.len
    }
}

/// A partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// `"GPT"` or `"MBR"`.
    pub kind: &'static str,
    /// Its partitions, in table order, empty entries left out.
    pub parts: Vec<Partition>,
    /// What it skipped, one line each.
    pub notes: Vec<String>,
}

/// CRC-32 (IEEE 802.3, reflected, as GPT uses it).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn le<'a>(buf: &'a [u8], off: usize, what: &'static str) -> Reader<'a> {
    Reader::new(buf.get(off..).unwrap_or_default(), what)
}

fn u32_at(buf: &[u8], off: usize) -> u32 {
    le(buf, off, "partition table").u32().unwrap_or(0)
}

fn u64_at(buf: &[u8], off: usize) -> u64 {
    le(buf, off, "partition table").u64().unwrap_or(0)
}

/// Reads the partition table of the disk `src`: `None` if it has none
/// (no MBR signature).
pub fn read_table(src: &(impl ReadAt + ?Sized)) -> Result<Option<Table>, FsError> {
    let len = src.len();
    if len < 512 {
        return Ok(None);
    }
    let mut mbr = [0u8; 512];
    read(src, &mut mbr, 0, || "the MBR".into())?;
    let Some(entries) = parse_mbr(&mbr) else {
        return Ok(None);
    };
    if entries.iter().any(|e| e.0 == 0xEE) {
        for sector in [512u64, 4096] {
            if let Some(t) = read_gpt(src, sector)? {
                return Ok(Some(t));
            }
        }
        return Err(FsError::Corrupt(
            "a protective MBR without a valid GPT header".into(),
        ));
    }
    let mut t = Table {
        kind: "MBR",
        parts: Vec::new(),
        notes: Vec::new(),
    };
    for (i, &(ty, lba, sectors)) in entries.iter().enumerate() {
        let number = i as u32 + 1;
        match ty {
            0 => {}
            0x05 | 0x0F | 0x85 => t.notes.push(format!(
                "MBR partition {number} is extended: its logical partitions are left as they are"
            )),
            _ => {
                let (start, plen) = (u64::from(lba) * 512, u64::from(sectors) * 512);
                if lba == 0 || start + plen > len {
                    t.notes.push(format!(
                        "MBR partition {number} lies outside the disk; left as it is"
                    ));
                } else {
                    t.parts.push(Partition {
                        number,
                        start,
                        len: plen,
                    });
                }
            }
        }
    }
    Ok(Some(t))
}

/// The four primary entries of an MBR sector, as (type, first LBA,
/// sectors), or `None` without the 0x55AA signature (pure).
pub fn parse_mbr(sector: &[u8]) -> Option<[(u8, u32, u32); 4]> {
    if sector.len() < 512 || sector[510] != 0x55 || sector[511] != 0xAA {
        return None;
    }
    let mut out = [(0u8, 0u32, 0u32); 4];
    for (i, e) in out.iter_mut().enumerate() {
        let off = 446 + 16 * i;
        *e = (
            sector[off + 4],
            u32_at(sector, off + 8),
            u32_at(sector, off + 12),
        );
    }
    Some(out)
}

/// The fields of a GPT header that locate the entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GptHeader {
    /// First usable LBA.
    pub first_usable: u64,
    /// Last usable LBA (inclusive).
    pub last_usable: u64,
    /// LBA of the entry array.
    pub entries_lba: u64,
    /// Number of entries.
    pub entries: u32,
    /// Bytes per entry.
    pub entry_size: u32,
    /// CRC-32 of the entry array.
    pub entries_crc: u32,
}

/// Parses a GPT header sector (pure): `None` without the signature, an
/// error if its checksum or fields are wrong.
pub fn parse_gpt_header(
    h: &[u8],
    sector: u64,
    disk_len: u64,
) -> Result<Option<GptHeader>, FsError> {
    if h.get(..8) != Some(b"EFI PART") {
        return Ok(None);
    }
    let bad = |s: &str| Err(FsError::Corrupt(format!("GPT header: {s}")));
    let size = u32_at(h, 12) as usize;
    if !(92..=h.len()).contains(&size) {
        return bad("bad header size");
    }
    let mut copy = h[..size].to_vec();
    copy[16..20].fill(0);
    if crc32(&copy) != u32_at(h, 16) {
        return bad("checksum mismatch");
    }
    let g = GptHeader {
        first_usable: u64_at(h, 40),
        last_usable: u64_at(h, 48),
        entries_lba: u64_at(h, 72),
        entries: u32_at(h, 80),
        entry_size: u32_at(h, 84),
        entries_crc: u32_at(h, 88),
    };
    let sectors = disk_len / sector;
    if g.entries > MAX_GPT_ENTRIES
        || g.entry_size < 128
        || g.entry_size > MAX_GPT_ENTRY_SIZE
        || !g.entry_size.is_multiple_of(8)
    {
        return bad("entry count or size out of range");
    }
    if g.first_usable > g.last_usable || g.last_usable >= sectors || g.entries_lba >= sectors {
        return bad("usable range or entries outside the disk");
    }
    Ok(Some(g))
}

/// Reads a GPT with `sector`-byte sectors, if its header is at LBA 1.
fn read_gpt(src: &(impl ReadAt + ?Sized), sector: u64) -> Result<Option<Table>, FsError> {
    let len = src.len();
    if len < 2 * sector {
        return Ok(None);
    }
    let mut h = vec![0u8; sector as usize];
    read(src, &mut h, sector, || "the GPT header".into())?;
    let Some(g) = parse_gpt_header(&h, sector, len)? else {
        return Ok(None);
    };
    let n = g.entries as usize * g.entry_size as usize;
    if g.entries_lba * sector + n as u64 > len {
        return Err(FsError::Corrupt("GPT entries outside the disk".into()));
    }
    let mut entries = vec![0u8; n];
    read(src, &mut entries, g.entries_lba * sector, || {
        "the GPT entries".into()
    })?;
    if crc32(&entries) != g.entries_crc {
        return Err(FsError::Corrupt("GPT entries: checksum mismatch".into()));
    }
    Ok(Some(parse_gpt_entries(&g, &entries, sector)))
}

/// The partitions of a GPT entry array (pure); entries outside the usable
/// range are left out with a note.
pub fn parse_gpt_entries(g: &GptHeader, entries: &[u8], sector: u64) -> Table {
    let mut t = Table {
        kind: "GPT",
        parts: Vec::new(),
        notes: Vec::new(),
    };
    for (i, e) in entries
        .chunks_exact(g.entry_size as usize)
        .take(g.entries as usize)
        .enumerate()
    {
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let number = i as u32 + 1;
        let (first, last) = (u64_at(e, 32), u64_at(e, 40));
        if first < g.first_usable || last > g.last_usable || first > last {
            t.notes.push(format!(
                "GPT partition {number} lies outside the usable range; left as it is"
            ));
            continue;
        }
        t.parts.push(Partition {
            number,
            start: first * sector,
            len: (last - first + 1) * sector,
        });
    }
    t
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A disk of `sectors` 512-byte sectors with a GPT naming `parts`
    /// (first LBA, last LBA inclusive), entries at LBA 2.
    pub(crate) fn gpt(sectors: u64, parts: &[(u64, u64)]) -> Vec<u8> {
        let mut d = vec![0u8; sectors as usize * 512];
        // Protective MBR.
        d[446 + 4] = 0xEE;
        d[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
        d[510] = 0x55;
        d[511] = 0xAA;
        let mut entries = vec![0u8; 128 * 128];
        for (i, &(first, last)) in parts.iter().enumerate() {
            let e = &mut entries[i * 128..(i + 1) * 128];
            e[..16].copy_from_slice(&[0x11; 16]);
            e[16..32].copy_from_slice(&[i as u8 + 1; 16]);
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
        }
        d[1024..1024 + entries.len()].copy_from_slice(&entries);
        let h = &mut d[512..1024];
        h[..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&1u64.to_le_bytes());
        h[32..40].copy_from_slice(&(sectors - 1).to_le_bytes());
        h[40..48].copy_from_slice(&34u64.to_le_bytes());
        h[48..56].copy_from_slice(&(sectors - 34).to_le_bytes());
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&crc32(&entries).to_le_bytes());
        let c = crc32(&h[..92]);
        h[16..20].copy_from_slice(&c.to_le_bytes());
        d
    }

    #[test]
    fn crc32_matches_the_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn a_gpt_lists_its_partitions() {
        let d = gpt(200, &[(40, 71), (100, 163)]);
        let t = read_table(&d[..]).unwrap().unwrap();
        assert_eq!(t.kind, "GPT");
        assert_eq!(
            t.parts,
            vec![
                Partition {
                    number: 1,
                    start: 40 * 512,
                    len: 32 * 512
                },
                Partition {
                    number: 2,
                    start: 100 * 512,
                    len: 64 * 512
                },
            ]
        );
    }

    #[test]
    fn a_gpt_with_a_bad_checksum_or_range_is_refused() {
        let mut d = gpt(200, &[(40, 71)]);
        d[1024 + 33] ^= 1; // an entry: the entries' checksum breaks
        assert!(matches!(read_table(&d[..]), Err(FsError::Corrupt(_))));
        let mut d = gpt(200, &[(40, 71)]);
        d[512 + 80] = 0xFF; // entry count, header checksum breaks
        assert!(matches!(read_table(&d[..]), Err(FsError::Corrupt(_))));
        // A partition past the usable range is left out with a note.
        let d = gpt(200, &[(40, 190)]);
        let t = read_table(&d[..]).unwrap().unwrap();
        assert!(t.parts.is_empty());
        assert!(t.notes[0].contains("outside"), "{:?}", t.notes);
    }

    #[test]
    fn an_mbr_lists_primaries_and_notes_extended_ones() {
        let mut d = vec![0u8; 100 * 512];
        d[510] = 0x55;
        d[511] = 0xAA;
        for (i, (ty, lba, n)) in [(0x83u8, 10u32, 20u32), (0x05, 40, 10), (0x83, 90, 50)]
            .into_iter()
            .enumerate()
        {
            let e = 446 + 16 * i;
            d[e + 4] = ty;
            d[e + 8..e + 12].copy_from_slice(&lba.to_le_bytes());
            d[e + 12..e + 16].copy_from_slice(&n.to_le_bytes());
        }
        let t = read_table(&d[..]).unwrap().unwrap();
        assert_eq!(t.kind, "MBR");
        assert_eq!(
            t.parts,
            vec![Partition {
                number: 1,
                start: 10 * 512,
                len: 20 * 512
            }]
        );
        assert_eq!(t.notes.len(), 2, "{:?}", t.notes);
        // No signature: no table.
        d[510] = 0;
        assert_eq!(read_table(&d[..]).unwrap(), None);
    }
}
