//! The KVM VM: creation, in-kernel irqchip and PIT, guest memory slots.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Where KVM puts the three-page TSS it needs on Intel (below the 4 GiB
/// boundary, above the MMIO devices, as QEMU and Firecracker do).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_VM failed.
    #[error("cannot create the KVM VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// Guest memory has more regions than KVM has slot numbers.
    #[error("guest memory has too many regions")]
    TooManyRegions,
    /// A VM-wide KVM ioctl failed.
    #[error("{what} failed")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Result of VM operations.
pub type Result<T> = std::result::Result<T, VmError>;

/// A KVM VM with its memory registered.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Creates the VM with an in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT,
    /// and registers every region of `memory` as a memory slot.
    pub fn new(memory: &GuestMemoryMmap) -> Result<Self> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let ioctl = |what| move |source| VmError::Ioctl { what, source };
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        for (slot, region) in memory.iter().enumerate() {
            let slot = u32::try_from(slot).map_err(|_| VmError::TooManyRegions)?;
            let region_desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the host range [as_ptr, as_ptr + len) is a live mapping
            // owned by `memory`, which the caller keeps alive (the builder
            // holds it for as long as the VM runs); slots do not overlap
            // because the regions of a GuestMemoryMmap do not.
            unsafe { fd.set_user_memory_region(region_desc) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(Self { kvm, fd })
    }

    /// The VM's file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The /dev/kvm handle (for supported CPUID and MSR lists).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }
}
