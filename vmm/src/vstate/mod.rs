//! Everything that talks to KVM: the VM, its memory, its vCPUs. The unsafe
//! code of capsid-vmm lives here, each block with the invariant it relies on.

pub mod memory;
pub mod vcpu;
pub mod vm;
