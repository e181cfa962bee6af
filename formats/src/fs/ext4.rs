//! ext4 without mounting: the superblock, the group descriptors and the
//! block bitmaps, read to list the blocks the file system leaves free.
//!
//! Conservative by design: a block is reported free only when its group's
//! bitmap is initialised and says so. Groups flagged `BLOCK_UNINIT` count
//! as wholly used (their metadata could be computed; not needing to is
//! the safe choice). File systems that need journal recovery, were not
//! cleanly unmounted, recorded errors, or use a feature this reader does
//! not know (bigalloc, meta_bg, sparse_super2, ...) are refused. Every
//! superblock and group-descriptor copy, reserved GDT block, bitmap,
//! inode table and the journal's blocks (as the superblock's copy of the
//! journal inode names them) must be marked used in the bitmaps, and each
//! bitmap's free count must match its descriptor's, or the file system is
//! refused as corrupt.

use super::{read, FsError, ReadAt};
use crate::le::Reader;

/// Where the superblock starts, from the start of the file system.
pub const SUPERBLOCK_OFFSET: u64 = 1024;
/// The superblock's magic number.
pub const MAGIC: u16 = 0xEF53;
/// Most block groups read (1 TiB in 1 KiB blocks of 8192-block groups
/// is 2^17).
pub const MAX_GROUPS: u64 = 1 << 18;
/// Most free ranges reported for one file system.
pub const MAX_RANGES: usize = 1 << 22;

/// `s_state`: cleanly unmounted.
const STATE_VALID: u16 = 0x1;
/// `s_state`: errors detected.
const STATE_ERROR: u16 = 0x2;
/// `s_state`: orphans being recovered.
const STATE_ORPHAN: u16 = 0x4;

const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;
/// Compatible features understood: dir_prealloc, imagic_inodes,
/// has_journal, ext_attr, resize_inode, dir_index, fast_commit,
/// stable_inodes, orphan_file.
const COMPAT_KNOWN: u32 = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x400 | 0x800 | 0x1000;

const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
/// Incompatible features understood: filetype, recover (refused apart),
/// extents, 64bit, mmp, flex_bg, ea_inode, csum_seed, largedir,
/// inline_data, encrypt, casefold.
const INCOMPAT_KNOWN: u32 = 0x2
    | INCOMPAT_RECOVER
    | 0x40
    | INCOMPAT_64BIT
    | 0x100
    | 0x200
    | 0x400
    | 0x2000
    | 0x4000
    | 0x8000
    | 0x10000
    | 0x20000;

const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_BIGALLOC: u32 = 0x200;
const RO_COMPAT_ORPHAN_PRESENT: u32 = 0x10000;
/// Read-only compatible features understood: sparse_super, large_file,
/// huge_file, gdt_csum, dir_nlink, extra_isize, quota, metadata_csum,
/// readonly, project, verity.
const RO_COMPAT_KNOWN: u32 = RO_COMPAT_SPARSE_SUPER
    | 0x2
    | 0x8
    | 0x10
    | 0x20
    | 0x40
    | 0x100
    | 0x400
    | 0x1000
    | 0x2000
    | 0x8000;

/// `bg_flags`: the block bitmap is not initialised.
const BG_BLOCK_UNINIT: u16 = 0x2;

/// What the superblock says, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Block size in bytes (1 KiB to 64 KiB).
    pub block_size: u64,
    /// Blocks in the file system.
    pub blocks: u64,
    /// The first block of group 0 (1 with 1 KiB blocks, else 0).
    pub first_data_block: u64,
    /// Blocks per group.
    pub blocks_per_group: u64,
    /// Inodes per group.
    pub inodes_per_group: u64,
    /// Inode size in bytes.
    pub inode_size: u64,
    /// Group descriptor size in bytes (32, or 64 and up with 64bit).
    pub desc_size: u64,
    /// Reserved GDT blocks after each group descriptor table copy.
    pub reserved_gdt_blocks: u64,
    /// Superblock copies only in groups 0, 1 and powers of 3, 5 and 7.
    pub sparse_super: bool,
    /// Block groups.
    pub groups: u64,
    /// Blocks the journal inode's copy in the superblock names (its
    /// extents, or its direct and indirect block pointers).
    pub journal: Vec<(u64, u64)>,
}

impl Superblock {
    /// Blocks the group descriptor table takes.
    pub fn gdt_blocks(&self) -> u64 {
        (self.groups * self.desc_size).div_ceil(self.block_size)
    }

    /// The first block of group `g`.
    pub fn group_start(&self, g: u64) -> u64 {
        self.first_data_block + g * self.blocks_per_group
    }

    /// Blocks in group `g` (the last one may be short).
    pub fn group_blocks(&self, g: u64) -> u64 {
        (self.blocks - self.group_start(g)).min(self.blocks_per_group)
    }

    /// True if group `g` holds a copy of the superblock and descriptors.
    pub fn has_super(&self, g: u64) -> bool {
        fn power_of(mut g: u64, b: u64) -> bool {
            while g > 1 && g.is_multiple_of(b) {
                g /= b;
            }
            g == 1
        }
        g == 0 || !self.sparse_super || g == 1 || [3, 5, 7].iter().any(|&b| power_of(g, b))
    }
}

fn at(buf: &[u8], off: usize) -> Reader<'_> {
    Reader::new(buf.get(off..).unwrap_or_default(), "ext4 superblock")
}

fn u16_at(buf: &[u8], off: usize) -> u16 {
    at(buf, off).u16().unwrap_or(0)
}

fn u32_at(buf: &[u8], off: usize) -> u32 {
    at(buf, off).u32().unwrap_or(0)
}

/// True if the 1024 superblock bytes `sb` carry the ext4 magic.
pub fn has_magic(sb: &[u8]) -> bool {
    sb.len() >= 1024 && u16_at(sb, 0x38) == MAGIC
}

/// Parses and checks the 1024 superblock bytes of a file system of `len`
/// bytes (pure).
pub fn parse_superblock(sb: &[u8], len: u64) -> Result<Superblock, FsError> {
    if !has_magic(sb) {
        return Err(FsError::NotExt4);
    }
    let bad = |s: String| Err(FsError::Corrupt(format!("ext4 superblock: {s}")));
    let unsupported = |s: String| Err(FsError::Unsupported(s));
    let compat = u32_at(sb, 0x5C);
    let incompat = u32_at(sb, 0x60);
    let ro_compat = u32_at(sb, 0x64);
    let rev = u32_at(sb, 0x4C);
    if rev > 1 {
        return unsupported(format!("revision {rev}"));
    }
    if ro_compat & RO_COMPAT_BIGALLOC != 0 {
        return unsupported("bigalloc (clusters of blocks)".into());
    }
    if incompat & INCOMPAT_META_BG != 0 {
        return unsupported("meta_bg (descriptors spread over the groups)".into());
    }
    if incompat & INCOMPAT_JOURNAL_DEV != 0 {
        return unsupported("external journal device".into());
    }
    if compat & COMPAT_SPARSE_SUPER2 != 0 {
        return unsupported("sparse_super2".into());
    }
    for (what, have, known) in [
        ("compatible", compat, COMPAT_KNOWN),
        ("incompatible", incompat, INCOMPAT_KNOWN),
        ("read-only compatible", ro_compat, RO_COMPAT_KNOWN),
    ] {
        if have & !known != 0 {
            return unsupported(format!("{what} feature flags {:#x}", have & !known));
        }
    }
    if incompat & INCOMPAT_RECOVER != 0 {
        return Err(FsError::Unclean("its journal needs recovery".into()));
    }
    let state = u16_at(sb, 0x3A);
    if state & STATE_VALID == 0 {
        return Err(FsError::Unclean("not cleanly unmounted".into()));
    }
    if state & (STATE_ERROR | STATE_ORPHAN) != 0 || u32_at(sb, 0x194) != 0 {
        return Err(FsError::Unclean("errors recorded; run e2fsck".into()));
    }
    if u32_at(sb, 0xE8) != 0 || ro_compat & RO_COMPAT_ORPHAN_PRESENT != 0 {
        return Err(FsError::Unclean("orphan inodes to clean up".into()));
    }
    if compat & COMPAT_HAS_JOURNAL == 0 && u32_at(sb, 0xE0) != 0 {
        return bad("a journal inode without has_journal".into());
    }
    let log_block = u32_at(sb, 0x18);
    if log_block > 6 {
        return bad(format!("block size 1024 << {log_block}"));
    }
    if u32_at(sb, 0x1C) != log_block {
        return bad("cluster size differs from block size without bigalloc".into());
    }
    let block_size = 1024u64 << log_block;
    let bit64 = incompat & INCOMPAT_64BIT != 0;
    let blocks = u64::from(u32_at(sb, 0x4))
        | if bit64 {
            u64::from(u32_at(sb, 0x150)) << 32
        } else {
            0
        };
    let first_data_block = u64::from(u32_at(sb, 0x14));
    if first_data_block != u64::from(block_size == 1024) {
        return bad(format!(
            "first data block {first_data_block} with {block_size}-byte blocks"
        ));
    }
    if blocks <= first_data_block {
        return bad(format!("{blocks} blocks"));
    }
    match blocks.checked_mul(block_size) {
        Some(n) if n <= len => {}
        _ => {
            return bad(format!(
                "{blocks} blocks of {block_size} bytes do not fit in {len} bytes"
            ))
        }
    }
    let blocks_per_group = u64::from(u32_at(sb, 0x20));
    if blocks_per_group == 0
        || !blocks_per_group.is_multiple_of(8)
        || blocks_per_group > 8 * block_size
    {
        return bad(format!("{blocks_per_group} blocks per group"));
    }
    if u64::from(u32_at(sb, 0x24)) != blocks_per_group {
        return bad("clusters per group differ from blocks per group".into());
    }
    let groups = (blocks - first_data_block).div_ceil(blocks_per_group);
    if groups > MAX_GROUPS {
        return unsupported(format!("{groups} block groups (at most {MAX_GROUPS})"));
    }
    let inodes_per_group = u64::from(u32_at(sb, 0x28));
    if inodes_per_group == 0 || inodes_per_group > 8 * block_size {
        return bad(format!("{inodes_per_group} inodes per group"));
    }
    let inode_size = if rev == 0 {
        128
    } else {
        u64::from(u16_at(sb, 0x58))
    };
    if inode_size < 128 || !inode_size.is_power_of_two() || inode_size > block_size {
        return bad(format!("inode size {inode_size}"));
    }
    let desc_size = if bit64 {
        u64::from(u16_at(sb, 0xFE))
    } else {
        32
    };
    if desc_size < 32 || !desc_size.is_power_of_two() || desc_size > 1024.min(block_size) {
        return bad(format!("group descriptor size {desc_size}"));
    }
    if bit64 && desc_size < 64 {
        return bad(format!("group descriptor size {desc_size} with 64bit"));
    }
    let journal = if compat & COMPAT_HAS_JOURNAL != 0 && sb.get(0xFD) == Some(&1) {
        journal_blocks(sb.get(0x10C..0x10C + 60).unwrap_or_default())
    } else {
        Vec::new()
    };
    if let Some(&(a, b)) = journal
        .iter()
        .find(|&&(a, b)| a < first_data_block || b > blocks)
    {
        return bad(format!("journal blocks {a}..{b} outside the file system"));
    }
    let s = Superblock {
        block_size,
        blocks,
        first_data_block,
        blocks_per_group,
        inodes_per_group,
        inode_size,
        desc_size,
        reserved_gdt_blocks: u64::from(u16_at(sb, 0xCE)),
        sparse_super: ro_compat & RO_COMPAT_SPARSE_SUPER != 0,
        groups,
        journal,
    };
    if 1 + s.gdt_blocks() + s.reserved_gdt_blocks > blocks_per_group {
        return bad("the descriptor tables do not fit in a group".into());
    }
    Ok(s)
}

/// The block ranges the 60 bytes of the journal inode's `i_block` (as the
/// superblock backs them up in `s_jnl_blocks`) name: with an extent tree,
/// its root's leaf extents or its index blocks; else the 15 block
/// pointers themselves. Zero pointers are left out (pure).
pub fn journal_blocks(i_block: &[u8]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    if i_block.len() < 60 {
        return out;
    }
    if u16_at(i_block, 0) == 0xF30A {
        let entries = usize::from(u16_at(i_block, 2)).min(4);
        let depth = u16_at(i_block, 6);
        for e in i_block[12..].chunks_exact(12).take(entries) {
            if depth == 0 {
                let len = u64::from(u16_at(e, 4));
                let len = if len > 32768 { len - 32768 } else { len };
                let start = u64::from(u32_at(e, 8)) | u64::from(u16_at(e, 6)) << 32;
                out.push((start, start + len));
            } else {
                let leaf = u64::from(u32_at(e, 4)) | u64::from(u16_at(e, 8)) << 32;
                out.push((leaf, leaf + 1));
            }
        }
    } else {
        for p in i_block.chunks_exact(4).take(15) {
            let b = u64::from(u32_at(p, 0));
            out.push((b, b + 1));
        }
    }
    out.retain(|&(a, b)| a != 0 && b > a);
    out
}

/// One group descriptor, checked against the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupDesc {
    /// Block of the block bitmap.
    pub block_bitmap: u64,
    /// Block of the inode bitmap.
    pub inode_bitmap: u64,
    /// First block of the inode table.
    pub inode_table: u64,
    /// Free blocks the group counts.
    pub free_blocks: u64,
    /// `bg_flags`.
    pub flags: u16,
}

/// Parses group descriptor `g` from its `sb.desc_size` bytes (pure).
pub fn parse_desc(sb: &Superblock, g: u64, d: &[u8]) -> Result<GroupDesc, FsError> {
    let wide = sb.desc_size >= 64;
    let lo_hi = |lo: usize, hi: usize| {
        u64::from(u32_at(d, lo))
            | if wide {
                u64::from(u32_at(d, hi)) << 32
            } else {
                0
            }
    };
    let gd = GroupDesc {
        block_bitmap: lo_hi(0x0, 0x20),
        inode_bitmap: lo_hi(0x4, 0x24),
        inode_table: lo_hi(0x8, 0x28),
        free_blocks: u64::from(u16_at(d, 0xC))
            | if wide {
                u64::from(u16_at(d, 0x2C)) << 16
            } else {
                0
            },
        flags: u16_at(d, 0x12),
    };
    let itable_end = gd.inode_table.checked_add(inode_table_blocks(sb));
    let inside = |b: u64| b >= sb.first_data_block && b < sb.blocks;
    if !inside(gd.block_bitmap)
        || !inside(gd.inode_bitmap)
        || !inside(gd.inode_table)
        || itable_end.is_none_or(|e| e > sb.blocks)
    {
        return Err(FsError::Corrupt(format!(
            "ext4 group {g}: a bitmap or the inode table lies outside the file system"
        )));
    }
    if gd.free_blocks > sb.group_blocks(g) {
        return Err(FsError::Corrupt(format!(
            "ext4 group {g}: {} free blocks in a group of {}",
            gd.free_blocks,
            sb.group_blocks(g)
        )));
    }
    Ok(gd)
}

/// Blocks one inode table takes.
fn inode_table_blocks(sb: &Superblock) -> u64 {
    (sb.inodes_per_group * sb.inode_size).div_ceil(sb.block_size)
}

/// Appends to `out` the free block runs of group `g` (of `n` blocks from
/// `start`) in `bitmap`, as block ranges; returns how many blocks are free.
/// Bits past `n` are ignored.
pub fn bitmap_runs(bitmap: &[u8], start: u64, n: u64, out: &mut Vec<(u64, u64)>) -> u64 {
    let n = n.min(bitmap.len() as u64 * 8);
    let mut free = 0;
    let mut run: Option<u64> = None;
    for i in 0..n {
        let used = bitmap[(i / 8) as usize] & (1 << (i % 8)) != 0;
        match (used, run) {
            (false, None) => run = Some(i),
            (true, Some(r)) => {
                out.push((start + r, start + i));
                free += i - r;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(r) = run {
        out.push((start + r, start + n));
        free += n - r;
    }
    free
}

/// The free space of one ext4 file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreeBlocks {
    /// Its superblock.
    pub superblock: Superblock,
    /// Free byte ranges of the source (offsets include the file system's
    /// start), sorted, disjoint, merged.
    pub ranges: Vec<(u64, u64)>,
    /// Groups counted as wholly used because their bitmap is not
    /// initialised.
    pub uninit_groups: u64,
}

/// Reads the ext4 file system of `len` bytes at `base` of `src` and lists
/// its free blocks.
pub fn free_blocks(
    src: &(impl ReadAt + ?Sized),
    base: u64,
    len: u64,
) -> Result<FreeBlocks, FsError> {
    let len = len.min(src.len().saturating_sub(base));
    if len < SUPERBLOCK_OFFSET + 1024 {
        return Err(FsError::NotExt4);
    }
    let mut raw = [0u8; 1024];
    read(src, &mut raw, base + SUPERBLOCK_OFFSET, || {
        "the ext4 superblock".into()
    })?;
    let sb = parse_superblock(&raw, len)?;
    let bs = sb.block_size;
    // The descriptor table follows the superblock's block.
    let gdt = (sb.first_data_block + 1) * bs;
    let mut desc = vec![0u8; sb.desc_size as usize];
    let mut bitmap = vec![0u8; bs as usize];
    let mut free = Vec::new();
    let mut used_meta: Vec<(u64, u64, u64)> = Vec::new();
    let mut uninit_groups = 0;
    let itable = inode_table_blocks(&sb);
    for g in 0..sb.groups {
        read(src, &mut desc, base + gdt + g * sb.desc_size, || {
            format!("ext4 group descriptor {g}")
        })?;
        let gd = parse_desc(&sb, g, &desc)?;
        let start = sb.group_start(g);
        if sb.has_super(g) {
            used_meta.push((
                start,
                start + 1 + sb.gdt_blocks() + sb.reserved_gdt_blocks,
                g,
            ));
        }
        used_meta.push((gd.block_bitmap, gd.block_bitmap + 1, g));
        used_meta.push((gd.inode_bitmap, gd.inode_bitmap + 1, g));
        used_meta.push((gd.inode_table, gd.inode_table + itable, g));
        if gd.flags & BG_BLOCK_UNINIT != 0 {
            uninit_groups += 1;
            continue;
        }
        read(src, &mut bitmap, base + gd.block_bitmap * bs, || {
            format!("ext4 block bitmap of group {g}")
        })?;
        let n = bitmap_runs(&bitmap, start, sb.group_blocks(g), &mut free);
        if n != gd.free_blocks {
            return Err(FsError::Corrupt(format!(
                "ext4 group {g}: its bitmap has {n} free blocks, its descriptor says {}",
                gd.free_blocks
            )));
        }
        if free.len() > MAX_RANGES {
            return Err(FsError::Unsupported(format!(
                "free space in more than {MAX_RANGES} pieces"
            )));
        }
    }
    // No metadata block may be free.
    used_meta.extend(sb.journal.iter().map(|&(a, b)| (a, b, u64::MAX)));
    used_meta.sort_unstable();
    let mut i = 0;
    for &(a, b, g) in &used_meta {
        while i < free.len() && free[i].1 <= a {
            i += 1;
        }
        if i < free.len() && free[i].0 < b {
            let whose = if g == u64::MAX {
                "the journal".to_string()
            } else {
                format!("group {g}")
            };
            return Err(FsError::Corrupt(format!(
                "ext4 {whose}: metadata block {} is marked free",
                free[i].0.max(a)
            )));
        }
    }
    // Merge runs that touch across groups, into bytes.
    let mut ranges: Vec<(u64, u64)> = Vec::with_capacity(free.len());
    for (a, b) in free {
        let (a, b) = (base + a * bs, base + b * bs);
        match ranges.last_mut() {
            Some(last) if last.1 == a => last.1 = b,
            _ => ranges.push((a, b)),
        }
    }
    Ok(FreeBlocks {
        superblock: sb,
        ranges,
        uninit_groups,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A 16-block ext4 of 1 KiB blocks, one group: boot block 0,
    /// superblock 1, descriptors 2, block bitmap 3, inode bitmap 4, inode
    /// table 5, data 6..16 of which 6 and 7 are used.
    pub(crate) fn tiny() -> Vec<u8> {
        let mut d = vec![0u8; 16 * 1024];
        let sb = &mut d[1024..2048];
        let put32 = |b: &mut [u8], o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_le_bytes());
        let put16 = |b: &mut [u8], o: usize, v: u16| b[o..o + 2].copy_from_slice(&v.to_le_bytes());
        put32(sb, 0x0, 8); // inodes
        put32(sb, 0x4, 16); // blocks
        put32(sb, 0xC, 8); // free blocks
        put32(sb, 0x14, 1); // first data block
        put32(sb, 0x20, 16); // blocks per group
        put32(sb, 0x24, 16); // clusters per group
        put32(sb, 0x28, 8); // inodes per group
        put16(sb, 0x38, MAGIC);
        put16(sb, 0x3A, STATE_VALID);
        put32(sb, 0x4C, 1); // revision
        put16(sb, 0x58, 128); // inode size
        let gd = &mut d[2048..2048 + 32];
        put32(gd, 0x0, 3);
        put32(gd, 0x4, 4);
        put32(gd, 0x8, 5);
        put16(gd, 0xC, 8); // free blocks: 8..16
                           // Bits 0..7 are blocks 1..8: 1-7 used.
        d[3 * 1024] = 0x7F;
        d
    }

    fn free(d: &[u8]) -> Result<Vec<(u64, u64)>, FsError> {
        free_blocks(d, 0, d.len() as u64).map(|f| f.ranges)
    }

    #[test]
    fn a_crafted_file_system_has_its_free_blocks_listed() {
        let d = tiny();
        let f = free_blocks(&d[..], 0, d.len() as u64).unwrap();
        assert_eq!(f.ranges, vec![(8 * 1024, 16 * 1024)]);
        assert_eq!(f.superblock.groups, 1);
        // At an offset inside a larger disk, the ranges move with it.
        let mut disk = vec![0xAAu8; 4096];
        disk.extend_from_slice(&d);
        let f = free_blocks(&disk[..], 4096, d.len() as u64).unwrap();
        assert_eq!(f.ranges, vec![(4096 + 8 * 1024, 4096 + 16 * 1024)]);
    }

    #[test]
    fn unknown_or_unsafe_features_and_unclean_states_are_refused() {
        for (off, val, want) in [
            (0x64, RO_COMPAT_BIGALLOC, "bigalloc"),
            (0x60, INCOMPAT_META_BG, "meta_bg"),
            (0x60, 0x1, "feature flags 0x1"),
            (0x64, 0x80, "feature flags 0x80"),
            (0x5C, COMPAT_SPARSE_SUPER2, "sparse_super2"),
            (0x60, INCOMPAT_RECOVER, "needs recovery"),
        ] {
            let mut d = tiny();
            d[1024 + off..1024 + off + 4].copy_from_slice(&val.to_le_bytes());
            let e = free(&d).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        for (state, want) in [
            (0u16, "not cleanly unmounted"),
            (3, "errors"),
            (5, "errors"),
        ] {
            let mut d = tiny();
            d[1024 + 0x3A..1024 + 0x3C].copy_from_slice(&state.to_le_bytes());
            let e = free(&d).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let mut d = tiny();
        d[1024 + 0xE8] = 12; // last orphan
        assert!(matches!(free(&d), Err(FsError::Unclean(_))));
        let mut d = tiny();
        d[1024 + 0x38] = 0;
        assert!(matches!(free(&d), Err(FsError::NotExt4)));
    }

    #[test]
    fn out_of_range_pointers_and_sizes_are_refused() {
        // Block bitmap past the end, inode table running off it, huge
        // block size, blocks beyond the source, zero blocks per group.
        for (off, val) in [
            (2048usize, 0xFFFF_FF00u32),
            (2048 + 8, 16),
            (1024 + 0x18, 40),
            (1024 + 0x4, 1 << 30),
            (1024 + 0x20, 0),
            (1024 + 0x28, 0),
        ] {
            let mut d = tiny();
            d[off..off + 4].copy_from_slice(&val.to_le_bytes());
            let e = free(&d).unwrap_err();
            assert!(matches!(e, FsError::Corrupt(_)), "{off:#x}: {e}");
        }
        // A truncated source: a read error or not ext4, no panic.
        let d = tiny();
        assert!(free(&d[..2000]).is_err());
        assert!(free_blocks(&d[..8000], 0, 16 * 1024).is_err());
    }

    #[test]
    fn a_bitmap_that_frees_metadata_or_miscounts_is_refused() {
        // The inode table (block 5, bit 4) marked free, count adjusted.
        let mut d = tiny();
        d[3 * 1024] = 0x6F;
        d[2048 + 0xC] = 9;
        let e = free(&d).unwrap_err().to_string();
        assert!(e.contains("metadata block 5 is marked free"), "{e}");
        // A used data block marked free without the count: refused.
        let mut d = tiny();
        d[3 * 1024] = 0x3F;
        let e = free(&d).unwrap_err().to_string();
        assert!(
            e.contains("bitmap has 9 free blocks, its descriptor says 8"),
            "{e}"
        );
    }

    #[test]
    fn journal_blocks_marked_free_are_refused() {
        // A journal of one extent: blocks 6 and 7 (used), then 6..9 where
        // 8 is free.
        let put = |d: &mut Vec<u8>, len: u16| {
            d[1024 + 0x5C] = COMPAT_HAS_JOURNAL as u8;
            d[1024 + 0xE0] = 8; // journal inode
            d[1024 + 0xFD] = 1; // s_jnl_blocks holds i_block
            let ib = 1024 + 0x10C;
            d[ib..ib + 2].copy_from_slice(&0xF30Au16.to_le_bytes());
            d[ib + 2] = 1; // entries
            d[ib + 4] = 4; // max
            d[ib + 12 + 4..ib + 12 + 6].copy_from_slice(&len.to_le_bytes());
            d[ib + 12 + 8] = 6; // start
        };
        let mut d = tiny();
        put(&mut d, 2);
        let f = free_blocks(&d[..], 0, d.len() as u64).unwrap();
        assert_eq!(f.superblock.journal, vec![(6, 8)]);
        assert_eq!(f.ranges, vec![(8 * 1024, 16 * 1024)]);
        put(&mut d, 3);
        let e = free(&d).unwrap_err().to_string();
        assert!(
            e.contains("the journal: metadata block 8 is marked free"),
            "{e}"
        );
        // Pointing past the end: refused before any bitmap is read.
        put(&mut d, 30);
        assert!(matches!(free(&d), Err(FsError::Corrupt(_))));
    }

    #[test]
    fn an_uninitialised_bitmap_counts_as_all_used() {
        let mut d = tiny();
        d[2048 + 0x12] = BG_BLOCK_UNINIT as u8;
        // Whatever the bitmap block holds.
        d[3 * 1024] = 0;
        let f = free_blocks(&d[..], 0, d.len() as u64).unwrap();
        assert_eq!(f.ranges, vec![]);
        assert_eq!(f.uninit_groups, 1);
    }

    #[test]
    fn backups_follow_sparse_super() {
        let mut sb = parse_superblock(&tiny()[1024..2048], 16 * 1024).unwrap();
        sb.sparse_super = true;
        let with: Vec<u64> = (0..60).filter(|&g| sb.has_super(g)).collect();
        assert_eq!(with, vec![0, 1, 3, 5, 7, 9, 25, 27, 49]);
        sb.sparse_super = false;
        assert!((0..60).all(|g| sb.has_super(g)));
    }

    #[test]
    fn bitmap_runs_ignore_bits_past_the_group() {
        let mut out = Vec::new();
        // 0b1010_0110: free bits 0, 3, 4, 6; with n = 6 bit 6 is outside.
        assert_eq!(bitmap_runs(&[0b1010_0110], 100, 6, &mut out), 3);
        assert_eq!(out, vec![(100, 101), (103, 105)]);
    }

    #[test]
    fn no_single_byte_change_panics() {
        let d = tiny();
        for i in (1024..1024 + 0x200).chain(2048..2048 + 32) {
            for v in [0u8, 1, 0x7F, 0x80, 0xFF] {
                let mut m = d.clone();
                m[i] = v;
                let _ = free(&m);
            }
        }
    }
}
