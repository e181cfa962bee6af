//! The boot ABI between the Kimberley VMM and its test guest.
//!
//! This file is compiled into both programs: the guest (no_std) and the VMM
//! (`vmm/src/abi.rs` includes it with `#[path]`), so the two cannot drift.
//! It must stay free of anything but `core`.

#![allow(dead_code)]

/// Version of this ABI; the guest reports it through [`PORT_READY`].
pub const ABI_VERSION: u32 = 1;

/// `BootInfo::magic`: "KIMBBOOT" read as a little-endian u64.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"KIMBBOOT");

/// Guest-physical address of the page-table root (PML4).
pub const PML4_ADDR: u64 = 0x1000;
/// Guest-physical address of the page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0x2000;
/// Guest-physical address of the first of 4 page directories (0x3000..0x7000).
pub const PD_ADDR: u64 = 0x3000;
/// Number of page directories: identity map of the first 4 GiB in 2 MiB pages.
pub const PD_COUNT: u64 = 4;
/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x7000;
/// Guest-physical address of the TSS (0x9000..0xb069). Its I/O permission
/// bitmap allows every port: on PVM hosts the I/O instructions of a CPL-3
/// guest are emulated and the emulator consults this bitmap.
pub const TSS_ADDR: u64 = 0x9000;
/// Offset of the I/O permission bitmap in the TSS.
pub const TSS_IOMAP_OFFSET: u64 = 104;
/// TSS limit: 104-byte TSS, 8 KiB bitmap, one terminating 0xff byte.
pub const TSS_LIMIT: u64 = TSS_IOMAP_OFFSET + 8192;
/// Guest-physical address of [`BootInfo`]; passed in RDI to `_start`.
pub const BOOT_INFO_ADDR: u64 = 0x8000;
/// Lowest address of the stack.
pub const STACK_BOTTOM: u64 = 0x10000;
/// Initial stack top (RSP = STACK_TOP - 8 at entry, as after a call).
pub const STACK_TOP: u64 = 0x3f_f000;
/// Address the guest ELF is linked at.
pub const IMAGE_BASE: u64 = 0x40_0000;

/// Smallest guest memory the test guest accepts.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest guest memory: RAM must end below the MMIO window.
pub const MAX_MEMORY: u64 = 3 << 30;

/// COM1 16550 UART base port.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Guest writes any byte: "I have no background work; block until serial input".
pub const PORT_IDLE: u16 = 0x500;
/// Guest writes ABI_VERSION (32-bit OUT): "booted, waiting for commands".
pub const PORT_READY: u16 = 0x501;
/// Guest writes any byte after printing a `panic: ...` line: fatal guest error.
pub const PORT_PANIC: u16 = 0x502;

/// Base of the virtio-mmio window; disk `i` is at `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Most disks a VM may have.
pub const MAX_DISKS: usize = 8;

/// End-of-script marker the VMM sends after a script (ASCII EOT).
pub const SCRIPT_END: u8 = 0x04;

/// Information the VMM writes at [`BOOT_INFO_ADDR`] before the first run.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// Number of vCPUs the VM has (only vCPU 0 runs the guest).
    pub vcpu_count: u32,
    /// Bytes of guest RAM, starting at guest-physical 0.
    pub memory_size: u64,
    /// TSC frequency in kHz (KVM_GET_TSC_KHZ).
    pub tsc_khz: u64,
    /// First byte of free memory (2 MiB aligned, after the image).
    pub heap_start: u64,
    /// One past the last byte of free memory (= memory_size).
    pub heap_end: u64,
    /// COM1 base port.
    pub serial_port: u32,
    /// Number of virtio-blk devices.
    pub disk_count: u32,
    /// Guest-physical address of each virtio-mmio block device (0 if absent).
    pub disk_mmio: [u64; MAX_DISKS],
}
