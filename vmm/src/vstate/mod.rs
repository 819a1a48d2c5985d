//! Everything that talks to KVM: the VM, its memory, its vCPUs and their
//! initial processor state. The unsafe code of capsid-vmm that deals with
//! KVM lives here, each block with the invariant it relies on.

pub mod arch;
pub mod cpuid;
pub mod memory;
pub mod vcpu;
pub mod vm;
