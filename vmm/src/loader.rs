//! A minimal ELF64 loader for the embedded test guest.

use crate::abi;
use crate::error::{Error, Result};
use crate::vstate::memory::Memory;

/// Where the image went.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// Entry point.
    pub entry: u64,
    /// One past the highest loaded byte.
    pub end: u64,
}

fn u16_at(b: &[u8], o: usize) -> Result<u16> {
    b.get(o..o + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| bad("truncated"))
}

fn u32_at(b: &[u8], o: usize) -> Result<u32> {
    b.get(o..o + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| bad("truncated"))
}

fn u64_at(b: &[u8], o: usize) -> Result<u64> {
    let s = b.get(o..o + 8).ok_or_else(|| bad("truncated"))?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

fn bad(m: &str) -> Error {
    Error::Image(m.to_string())
}

/// Copies the PT_LOAD segments of `elf` to their physical addresses
/// (zero-filling the bss part) and returns the entry point.
pub fn load(elf: &[u8], mem: &Memory) -> Result<Loaded> {
    if elf.get(0..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(bad("not a little-endian ELF64 file"));
    }
    if u16_at(elf, 18)? != 62 {
        return Err(bad("not an x86-64 ELF file"));
    }
    let entry = u64_at(elf, 24)?;
    let phoff = u64_at(elf, 32)? as usize;
    let phentsize = u16_at(elf, 54)? as usize;
    let phnum = u16_at(elf, 56)? as usize;
    if phentsize < 56 {
        return Err(bad("bad program header size"));
    }
    let mut end = 0u64;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(elf, ph)? != 1 {
            continue;
        }
        let offset = u64_at(elf, ph + 8)? as usize;
        let paddr = u64_at(elf, ph + 24)?;
        let filesz = u64_at(elf, ph + 32)? as usize;
        let memsz = u64_at(elf, ph + 40)?;
        let data = elf
            .get(offset..offset + filesz)
            .ok_or_else(|| bad("segment beyond end of file"))?;
        let seg_end = paddr
            .checked_add(memsz)
            .ok_or_else(|| bad("segment overflows"))?;
        if paddr < abi::IMAGE_BASE || seg_end > mem.size() as u64 {
            return Err(bad("segment outside guest memory"));
        }
        mem.write(paddr, data)?;
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err(bad("no loadable segments"));
    }
    Ok(Loaded { entry, end })
}
