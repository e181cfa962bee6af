//! KVM file descriptors and their state: the VM, its vCPUs, guest memory.

pub mod canonical;
pub mod lazy;
pub mod memory;
pub mod origin;
pub mod vcpu;
pub mod vm;
