//! vCPU setup (64-bit, CPL 3) and the saved vCPU state.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;

use crate::abi;
use crate::error::{Error, Result};
use crate::persist::{Codec, Persist, ReadKvm, Reader, WriteKvm, Writer};
use crate::vstate::canonical::{self, MSR_IA32_TSC};
use zerocopy::IntoBytes;

/// Caps on vCPU state lengths.
pub const MAX_CPUID_ENTRIES: usize = 256;
/// Most MSRs saved per vCPU.
pub const MAX_MSRS: usize = 1024;

/// Selectors of the GDT the VMM writes (see `arch::write_gdt`).
pub const USER_DATA_SEL: u16 = (3 << 3) | 3;
/// 64-bit user code selector.
pub const USER_CODE_SEL: u16 = (4 << 3) | 3;
/// TSS selector.
pub const TSS_SEL: u16 = 5 << 3;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;

/// A vCPU and what is needed to save it.
#[derive(Debug)]
pub struct Vcpu {
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Its index (and APIC id).
    pub index: u8,
    /// MSR indices KVM reports (KVM_GET_MSR_INDEX_LIST).
    pub msr_list: Vec<u32>,
}

fn kerr(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm(op, e)
}

/// Gives each vCPU its own APIC id in CPUID leaves 1 and 0xb.
pub fn cpuid_for(supported: &CpuId, index: u8) -> Result<CpuId> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
    for e in &mut entries {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | ((index as u32) << 24),
            0xb | 0x1f => e.edx = index as u32,
            _ => {}
        }
    }
    CpuId::from_entries(&entries).map_err(|e| Error::Config(format!("CPUID table: {e:?}")))
}

impl Vcpu {
    /// Sets the registers for the first instruction of the test guest:
    /// 64-bit long mode at CPL 3, paging on the identity map, IOPL 3.
    pub fn setup_boot(&self, entry: u64) -> Result<()> {
        let mut sregs = self.fd.get_sregs().map_err(kerr("GET_SREGS"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: USER_CODE_SEL,
            type_: 0xb,
            present: 1,
            dpl: 3,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment {
            selector: USER_DATA_SEL,
            type_: 3,
            db: 1,
            l: 0,
            ..code
        };
        let tss = kvm_segment {
            base: abi::TSS_ADDR,
            limit: abi::TSS_LIMIT as u32,
            selector: TSS_SEL,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 0,
            l: 0,
            g: 0,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let ldt = kvm_segment {
            selector: 0,
            type_: 2,
            s: 0,
            unusable: 1,
            base: 0,
            limit: 0,
            ..tss
        };
        sregs.cs = code;
        sregs.ss = data;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.tr = tss;
        sregs.ldt = ldt;
        sregs.gdt.base = abi::GDT_ADDR;
        sregs.gdt.limit = (crate::arch::GDT_ENTRIES * 8 - 1) as u16;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
        sregs.cr3 = abi::PML4_ADDR;
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
        sregs.efer = EFER_LME | EFER_LMA;
        self.fd.set_sregs(&sregs).map_err(kerr("SET_SREGS"))?;

        let regs = kvm_regs {
            rip: entry,
            rsp: abi::STACK_TOP - 8,
            rdi: abi::BOOT_INFO_ADDR,
            rflags: RFLAGS_RESERVED | RFLAGS_IOPL3,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(kerr("SET_REGS"))?;

        let fpu = kvm_bindings::kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(kerr("SET_FPU"))?;
        Ok(())
    }

    fn save_msrs(&self) -> Result<Vec<(u32, u64)>> {
        let mut out = Vec::new();
        let mut rest: &[u32] = &self.msr_list;
        while !rest.is_empty() {
            let n = rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES);
            let entries: Vec<kvm_msr_entry> = rest[..n]
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|e| Error::Config(format!("MSR list: {e:?}")))?;
            let got = self.fd.get_msrs(&mut msrs).map_err(kerr("GET_MSRS"))?;
            out.extend(
                msrs.as_slice()[..got.min(n)]
                    .iter()
                    .map(|e| (e.index, e.data)),
            );
            // KVM stops at the first MSR it cannot read: skip that one.
            rest = &rest[(got + 1).min(rest.len())..];
        }
        Ok(out)
    }

    /// Sets the time-stamp counter (at boot: [`canonical::BOOT_TSC`], so the
    /// guest's time does not depend on the host's uptime). Some hosts
    /// ignore the write (the guest then reads the host's TSC).
    pub fn set_tsc(&self, tsc: u64) -> Result<()> {
        match self.restore_msrs(&[(MSR_IA32_TSC, tsc)])? {
            1 => Ok(()),
            _ => Err(Error::Config("KVM refused to set IA32_TSC".into())),
        }
    }

    fn restore_msrs(&self, msrs: &[(u32, u64)]) -> Result<usize> {
        let mut accepted = 0;
        let mut rest = msrs;
        while !rest.is_empty() {
            let n = rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES);
            let entries: Vec<kvm_msr_entry> = rest[..n]
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let k = Msrs::from_entries(&entries)
                .map_err(|e| Error::Config(format!("MSR list: {e:?}")))?;
            let set = self.fd.set_msrs(&k).map_err(kerr("SET_MSRS"))?;
            accepted += set.min(n);
            // KVM stops at the first MSR it refuses: skip that one.
            rest = &rest[(set + 1).min(rest.len())..];
        }
        Ok(accepted)
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Default)]
pub struct VcpuState {
    /// vCPU index.
    pub index: u8,
    /// CPUID table given to the vCPU.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state (XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Multiprocessing state.
    pub mp_state: kvm_mp_state,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// MSRs KVM let us read (index, value), IA32_TSC included.
    pub msrs: Vec<(u32, u64)>,
}

impl VcpuState {
    /// Its time-stamp counter (IA32_TSC), if it was saved.
    pub fn tsc(&self) -> Option<u64> {
        self.msrs
            .iter()
            .find(|(i, _)| *i == MSR_IA32_TSC)
            .map(|&(_, v)| v)
    }

    /// Sets the saved time-stamp counter (where one was saved).
    pub fn set_tsc(&mut self, tsc: u64) {
        for (i, v) in &mut self.msrs {
            if *i == MSR_IA32_TSC {
                *v = tsc;
            }
        }
    }

    /// Makes the XSAVE header canonical ([`canonical::xsave_header`]).
    pub fn canonical_xsave(&mut self) {
        let xcr0 = self
            .xcrs
            .xcrs
            .iter()
            .take(self.xcrs.nr_xcrs as usize)
            .find(|x| x.xcr == 0)
            .map_or(1, |x| x.value);
        canonical::xsave_header(self.xsave.region.as_mut_bytes(), xcr0);
    }
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("index", &self.index)
            .field("rip", &self.regs.rip)
            .finish()
    }
}

impl Persist for Vcpu {
    type State = VcpuState;
    type Args = (VcpuFd, Vec<u32>);

    fn save(&self) -> Result<VcpuState> {
        let cpuid = self
            .fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kerr("GET_CPUID2"))?;
        Ok(VcpuState {
            index: self.index,
            cpuid: cpuid.as_slice().to_vec(),
            mp_state: self.fd.get_mp_state().map_err(kerr("GET_MP_STATE"))?,
            regs: self.fd.get_regs().map_err(kerr("GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(kerr("GET_SREGS"))?,
            xsave: self.fd.get_xsave().map_err(kerr("GET_XSAVE"))?,
            xcrs: self.fd.get_xcrs().map_err(kerr("GET_XCRS"))?,
            debugregs: self.fd.get_debug_regs().map_err(kerr("GET_DEBUGREGS"))?,
            lapic: self.fd.get_lapic().map_err(kerr("GET_LAPIC"))?,
            msrs: self.save_msrs()?,
            events: self.fd.get_vcpu_events().map_err(kerr("GET_VCPU_EVENTS"))?,
        })
    }

    fn restore((fd, msr_list): (VcpuFd, Vec<u32>), s: &VcpuState) -> Result<Vcpu> {
        let cpuid = CpuId::from_entries(&s.cpuid)
            .map_err(|e| Error::corrupt(format!("CPUID table: {e:?}")))?;
        fd.set_cpuid2(&cpuid).map_err(kerr("SET_CPUID2"))?;
        fd.set_mp_state(s.mp_state).map_err(kerr("SET_MP_STATE"))?;
        fd.set_regs(&s.regs).map_err(kerr("SET_REGS"))?;
        fd.set_sregs(&s.sregs).map_err(kerr("SET_SREGS"))?;
        // SAFETY: the buffer is a full kvm_xsave as returned by GET_XSAVE.
        unsafe { fd.set_xsave(&s.xsave) }.map_err(kerr("SET_XSAVE"))?;
        fd.set_xcrs(&s.xcrs).map_err(kerr("SET_XCRS"))?;
        fd.set_debug_regs(&s.debugregs)
            .map_err(kerr("SET_DEBUGREGS"))?;
        fd.set_lapic(&s.lapic).map_err(kerr("SET_LAPIC"))?;
        let v = Vcpu {
            fd,
            index: s.index,
            msr_list,
        };
        v.restore_msrs(&s.msrs)?;
        v.fd.set_vcpu_events(&s.events)
            .map_err(kerr("SET_VCPU_EVENTS"))?;
        Ok(v)
    }
}

impl Codec for VcpuState {
    fn encode(&self, w: &mut Writer) {
        w.u8(self.index);
        w.u32(self.cpuid.len() as u32);
        for e in &self.cpuid {
            w.kvm_struct(e);
        }
        w.kvm_struct(&self.regs);
        w.kvm_struct(&self.sregs);
        w.kvm_struct(&self.xsave);
        w.kvm_struct(&self.xcrs);
        w.kvm_struct(&self.debugregs);
        w.kvm_struct(&self.events);
        w.kvm_struct(&self.mp_state);
        w.kvm_struct(&self.lapic);
        w.u32(self.msrs.len() as u32);
        for &(i, v) in &self.msrs {
            w.u32(i);
            w.u64(v);
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<VcpuState> {
        let index = r.u8()?;
        let n = r.count(MAX_CPUID_ENTRIES, "CPUID entries")?;
        let mut cpuid = Vec::with_capacity(n);
        for _ in 0..n {
            cpuid.push(r.kvm_struct("CPUID entry")?);
        }
        let regs = r.kvm_struct("regs")?;
        let sregs = r.kvm_struct("sregs")?;
        let xsave = r.kvm_struct("xsave")?;
        let xcrs = r.kvm_struct("xcrs")?;
        let debugregs = r.kvm_struct("debugregs")?;
        let events = r.kvm_struct("vcpu events")?;
        let mp_state = r.kvm_struct("mp state")?;
        let lapic = r.kvm_struct("lapic")?;
        let n = r.count(MAX_MSRS, "MSRs")?;
        let mut msrs = Vec::with_capacity(n);
        for _ in 0..n {
            msrs.push((r.u32()?, r.u64()?));
        }
        Ok(VcpuState {
            index,
            cpuid,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            events,
            mp_state,
            lapic,
            msrs,
        })
    }
}
