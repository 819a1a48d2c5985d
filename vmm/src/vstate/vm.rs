//! The KVM VM: creation, in-kernel irqchip and PIT, guest memory slots,
//! and the eventfds KVM signals or listens to (ioeventfd, irqfd).

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

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
    /// More vCPUs than this KVM runs in one VM.
    #[error("{wanted} vCPUs requested; this host's KVM runs at most {max} per VM")]
    TooManyVcpus {
        /// Requested.
        wanted: u8,
        /// KVM_CAP_MAX_VCPUS.
        max: usize,
    },
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

fn ioctl(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

impl Vm {
    /// Creates the VM with an in-kernel irqchip (PIC, IOAPIC, LAPICs) and
    /// PIT, checks it can run `vcpus` vCPUs, and registers every region of
    /// `memory` as a memory slot.
    pub fn new(memory: &GuestMemoryMmap, vcpus: u8) -> Result<Self> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let max = kvm.get_max_vcpus();
        if usize::from(vcpus) > max {
            return Err(VmError::TooManyVcpus { wanted: vcpus, max });
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
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
            // owned by `memory`, which the caller keeps alive (the machine
            // and every vCPU thread hold a clone for as long as the VM
            // runs); slots do not overlap because the regions of a
            // GuestMemoryMmap do not.
            unsafe { fd.set_user_memory_region(region_desc) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(Self { kvm, fd })
    }

    /// The VM's file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The /dev/kvm handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The CPUID leaves KVM can present (KVM_GET_SUPPORTED_CPUID).
    pub fn supported_cpuid(&self) -> Result<CpuId> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))
    }

    /// What a snapshot of this VM's vCPUs reads (the MSR list is a
    /// /dev/kvm ioctl: asked here, on the thread that builds the VM).
    pub fn state_caps(&self) -> Result<crate::snapshot::vcpu::StateCaps> {
        crate::snapshot::vcpu::StateCaps::probe(&self.kvm).map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))
    }

    /// Whether the LAPIC timer has TSC-deadline mode.
    pub fn has_tsc_deadline(&self) -> bool {
        self.kvm.check_extension(Cap::TscDeadlineTimer)
    }

    /// Makes KVM signal `evt` on guest writes of `datamatch` (32 bits) to
    /// MMIO address `addr`, without an exit.
    pub fn register_ioevent(&self, evt: &EventFd, addr: u64, datamatch: u32) -> Result<()> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(ioctl("KVM_IOEVENTFD"))
    }

    /// Makes a write to `evt` raise interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()> {
        self.fd.register_irqfd(evt, gsi).map_err(ioctl("KVM_IRQFD"))
    }
}
