//! The KVM VM: memory slot, in-kernel irqchip, clock and dirty log.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VmFd};

use crate::error::{Error, Result};
use crate::persist::{Codec, ReadKvm, Reader, WriteKvm, Writer};
use crate::vstate::memory::{Memory, PAGE_SIZE};
use kimberley_machine::Bitmap;

/// The single memory slot.
const SLOT: u32 = 0;

/// A KVM VM with an in-kernel irqchip.
#[derive(Debug)]
pub struct KvmVm {
    /// The /dev/kvm handle.
    pub kvm: Kvm,
    /// The VM.
    pub fd: VmFd,
    mem_size: usize,
    host_addr: u64,
    logging: bool,
}

/// VM-wide KVM state.
#[derive(Default)]
pub struct VmKvmState {
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: [kvm_irqchip; 3],
}

impl std::fmt::Debug for VmKvmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmKvmState")
            .field("clock", &self.clock.clock)
            .finish()
    }
}

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl KvmVm {
    /// Opens /dev/kvm and creates a VM with an in-kernel irqchip.
    pub fn new() -> Result<KvmVm> {
        let kvm = Kvm::new().map_err(Error::KvmUnavailable)?;
        // /dev/kvm opened but is not a KVM device (or KVM refuses VMs).
        let fd = kvm.create_vm().map_err(Error::KvmUnavailable)?;
        // Only needed by some hosts for real-mode emulation; harmless elsewhere.
        let _ = fd.set_tss_address(0xfffb_d000);
        fd.create_irq_chip()
            .map_err(|e| Error::Kvm("CREATE_IRQCHIP", e))?;
        Ok(KvmVm {
            kvm,
            fd,
            mem_size: 0,
            host_addr: 0,
            logging: false,
        })
    }

    fn set_slot(&mut self, flags: u32) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot: SLOT,
            flags,
            guest_phys_addr: 0,
            memory_size: self.mem_size as u64,
            userspace_addr: self.host_addr,
        };
        // SAFETY: the region describes the guest memory mapping, which the
        // `Vm` keeps alive for as long as this VM fd exists.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| Error::Kvm("SET_USER_MEMORY_REGION", e))
    }

    /// Registers `mem` as the VM's RAM at guest-physical 0.
    pub fn set_memory(&mut self, mem: &Memory) -> Result<()> {
        self.mem_size = mem.size();
        self.host_addr = mem.host_addr() as u64;
        self.set_slot(0)
    }

    /// Turns KVM dirty-page logging on or off.
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<()> {
        self.set_slot(if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })?;
        self.logging = on;
        Ok(())
    }

    /// Whether dirty logging is on.
    pub fn dirty_logging(&self) -> bool {
        self.logging
    }

    /// Fetches and clears KVM's dirty bitmap.
    pub fn dirty_log(&self) -> Result<Bitmap> {
        if !self.logging {
            return Err(Error::DirtyLogDisabled);
        }
        let words = self
            .fd
            .get_dirty_log(SLOT, self.mem_size)
            .map_err(|e| Error::Kvm("GET_DIRTY_LOG", e))?;
        Ok(Bitmap::from_words(words, self.mem_size / PAGE_SIZE))
    }

    /// Saves clock and irqchip state (the vCPUs must be paused).
    pub fn save_state(&self) -> Result<VmKvmState> {
        let mut s = VmKvmState {
            clock: self
                .fd
                .get_clock()
                .map_err(|e| Error::Kvm("GET_CLOCK", e))?,
            ..Default::default()
        };
        for (slot, id) in s.irqchips.iter_mut().zip(CHIPS) {
            slot.chip_id = id;
            self.fd
                .get_irqchip(slot)
                .map_err(|e| Error::Kvm("GET_IRQCHIP", e))?;
        }
        Ok(s)
    }

    /// Restores clock and irqchip state.
    pub fn restore_state(&self, s: &VmKvmState) -> Result<()> {
        for (chip, id) in s.irqchips.iter().zip(CHIPS) {
            if chip.chip_id != id {
                return Err(Error::corrupt(format!(
                    "irqchip id {} where {id} was expected",
                    chip.chip_id
                )));
            }
            self.fd
                .set_irqchip(chip)
                .map_err(|e| Error::Kvm("SET_IRQCHIP", e))?;
        }
        self.set_clock(s.clock.clock)
    }

    /// Sets kvmclock, the guest's time in ns (0 at boot).
    pub fn set_clock(&self, ns: u64) -> Result<()> {
        let clock = kvm_clock_data {
            clock: ns,
            ..Default::default()
        };
        self.fd
            .set_clock(&clock)
            .map_err(|e| Error::Kvm("SET_CLOCK", e))
    }
}

impl Codec for VmKvmState {
    fn encode(&self, w: &mut Writer) {
        w.kvm_struct(&self.clock);
        for c in &self.irqchips {
            w.kvm_struct(c);
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<VmKvmState> {
        let clock = r.kvm_struct("clock")?;
        let irqchips: [kvm_irqchip; 3] = [
            r.kvm_struct("irqchip")?,
            r.kvm_struct("irqchip")?,
            r.kvm_struct("irqchip")?,
        ];
        for (chip, id) in irqchips.iter().zip(CHIPS) {
            if chip.chip_id != id {
                return Err(Error::corrupt(format!(
                    "irqchip id {} where {id} was expected",
                    chip.chip_id
                )));
            }
        }
        Ok(VmKvmState { clock, irqchips })
    }
}
