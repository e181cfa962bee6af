//! Kimberley's test guest: a CPL-3, 64-bit, `no_std` program driven by
//! commands on its serial port (see docs/VMM.md).

#![no_std]
#![no_main]

mod abi;
mod gen;
mod heap;
mod io;
mod mem;
mod script;
mod virtio;

use core::panic::PanicInfo;

/// Entry point: the VMM jumps here at CPL 3 with RDI = &BootInfo.
#[no_mangle]
pub extern "C" fn _start(info: *const abi::BootInfo) -> ! {
    // SAFETY: the VMM writes a BootInfo at this address before the first run.
    let info = unsafe { core::ptr::read_volatile(info) };
    if info.magic != abi::BOOT_MAGIC || info.abi_version != abi::ABI_VERSION {
        panic!("bad boot info");
    }
    let mut g = script::Guest::new(&info);
    g.run()
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    sprintln!("panic: {}", info.message());
    loop {
        io::outb(abi::PORT_PANIC, 1);
    }
}

/// Never called (panic=abort), but the precompiled `core` references it.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
