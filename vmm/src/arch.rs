//! x86-64 boot structures in guest memory: identity page tables, the GDT,
//! and the boot-info page.

use crate::abi::{self, BootInfo};
use crate::error::Result;
use crate::vstate::memory::Memory;

/// Number of 8-byte GDT slots (the TSS descriptor takes two).
pub const GDT_ENTRIES: usize = 7;

const PTE_P: u64 = 1;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;

/// Identity-maps the first 4 GiB with user-accessible, writable 2 MiB
/// pages (accessed/dirty bits preset, so the CPU never writes the tables).
pub fn write_page_tables(mem: &Memory) -> Result<()> {
    let flags = PTE_P | PTE_RW | PTE_US | PTE_A;
    mem.write(abi::PML4_ADDR, &(abi::PDPT_ADDR | flags).to_le_bytes())?;
    let mut pdpt = [0u8; 4096];
    for i in 0..abi::PD_COUNT {
        let e = (abi::PD_ADDR + i * 4096) | flags;
        pdpt[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&e.to_le_bytes());
    }
    mem.write(abi::PDPT_ADDR, &pdpt)?;
    let mut pd = vec![0u8; 4096 * abi::PD_COUNT as usize];
    for i in 0..512 * abi::PD_COUNT {
        let e = (i << 21) | flags | PTE_PS | PTE_D;
        pd[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&e.to_le_bytes());
    }
    mem.write(abi::PD_ADDR, &pd)
}

fn descriptor(base: u64, limit: u64, access: u64, flags: u64) -> u64 {
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (access << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (flags << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// Writes the GDT: null, kernel code/data, user data, user code (64-bit),
/// and a 16-byte TSS descriptor. The vCPU's cached segment state is set
/// from the same values (`Vcpu::setup_boot`).
pub fn write_gdt(mem: &Memory) -> Result<()> {
    let tss_lo = descriptor(abi::TSS_ADDR, abi::TSS_LIMIT, 0x8b, 0);
    let gdt: [u64; GDT_ENTRIES] = [
        0,
        descriptor(0, 0xfffff, 0x9b, 0xa),
        descriptor(0, 0xfffff, 0x93, 0xc),
        descriptor(0, 0xfffff, 0xf3, 0xc),
        descriptor(0, 0xfffff, 0xfb, 0xa),
        tss_lo,
        abi::TSS_ADDR >> 32,
    ];
    let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    mem.write(abi::GDT_ADDR, &bytes)?;
    // TSS: all zero except the I/O bitmap offset and the bitmap's
    // terminating byte; a zero bit allows the port.
    let mut tss = vec![0u8; abi::TSS_LIMIT as usize + 1];
    tss[102..104].copy_from_slice(&(abi::TSS_IOMAP_OFFSET as u16).to_le_bytes());
    tss[abi::TSS_LIMIT as usize] = 0xff;
    mem.write(abi::TSS_ADDR, &tss)
}

/// Writes `info` at [`abi::BOOT_INFO_ADDR`].
pub fn write_boot_info(mem: &Memory, info: &BootInfo) -> Result<()> {
    let mut b = Vec::with_capacity(std::mem::size_of::<BootInfo>());
    b.extend_from_slice(&info.magic.to_le_bytes());
    b.extend_from_slice(&info.abi_version.to_le_bytes());
    b.extend_from_slice(&info.vcpu_count.to_le_bytes());
    b.extend_from_slice(&info.memory_size.to_le_bytes());
    b.extend_from_slice(&info.tsc_khz.to_le_bytes());
    b.extend_from_slice(&info.heap_start.to_le_bytes());
    b.extend_from_slice(&info.heap_end.to_le_bytes());
    b.extend_from_slice(&info.serial_port.to_le_bytes());
    b.extend_from_slice(&info.disk_count.to_le_bytes());
    for a in info.disk_mmio {
        b.extend_from_slice(&a.to_le_bytes());
    }
    debug_assert_eq!(b.len(), std::mem::size_of::<BootInfo>());
    mem.write(abi::BOOT_INFO_ADDR, &b)
}
