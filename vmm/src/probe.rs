//! Measuring what setting up a VM costs on this host before any VM is
//! restored (live migration's receiver predicts its share of the downtime
//! with it).

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::vstate::memory::Memory;
use crate::vstate::vm::KvmVm;

/// Creates and drops a KVM VM with `memory_size` bytes of (untouched)
/// memory and `vcpus` vCPUs, the fixed part of a restore; returns how long
/// that took.
pub fn vm_setup_cost(memory_size: u64, vcpus: u8) -> Result<Duration> {
    let t = Instant::now();
    let mut kvm = KvmVm::new()?;
    let mem = Memory::anonymous(memory_size)?;
    kvm.set_memory(&mem)?;
    let _ = kvm
        .kvm
        .get_msr_index_list()
        .map_err(|e| Error::Kvm("GET_MSR_INDEX_LIST", e))?;
    let mut fds = Vec::new();
    for i in 0..vcpus.max(1) {
        fds.push(
            kvm.fd
                .create_vcpu(u64::from(i))
                .map_err(|e| Error::Kvm("CREATE_VCPU", e))?,
        );
    }
    let spent = t.elapsed();
    drop(fds);
    drop(kvm);
    drop(mem);
    Ok(spent)
}
