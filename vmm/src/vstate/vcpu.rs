//! vCPUs: register set-up for the entry mode, and the run loop that hands
//! port and MMIO exits to the VM's bus.

use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

/// Errors of a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A vCPU ioctl failed.
    #[error("vCPU {index}: {what} failed")]
    Ioctl {
        /// The vCPU.
        index: u8,
        /// Which ioctl.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Result of vCPU operations.
pub type Result<T> = std::result::Result<T, VcpuError>;

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest asked for a reset (i8042 pulse): it is done.
    Reset,
    /// The guest crashed: triple fault, failed entry or KVM internal error.
    Crash(String),
}

/// What a vCPU's run loop asks of the VM's devices.
pub trait Bus: Send + Sync {
    /// A guest `in` from `port`; fill `data`.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// A guest `out` to `port`; returns true when the write reset the VM.
    fn pio_write(&self, port: u16, data: &[u8]) -> bool;
    /// A guest load from an MMIO address no memory backs; fill `data`.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// A guest store to an MMIO address.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// One vCPU.
#[derive(Debug)]
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `index` of `vm`.
    pub fn new(vm: &VmFd, index: u8) -> Result<Self> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Ioctl {
                index,
                what: "KVM_CREATE_VCPU",
                source,
            })?;
        Ok(Self { index, fd })
    }

    /// The vCPU's index (its APIC id).
    pub fn index(&self) -> u8 {
        self.index
    }

    fn ioctl_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Ioctl {
            index,
            what,
            source,
        }
    }

    /// Enters 16-bit real mode at `0:entry`, as firmware hands over.
    pub fn setup_real_mode(&self, entry: u16) -> Result<()> {
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(self.ioctl_err("KVM_GET_SREGS"))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        self.fd
            .set_sregs(&sregs)
            .map_err(self.ioctl_err("KVM_SET_SREGS"))?;
        let regs = kvm_bindings::kvm_regs {
            rip: u64::from(entry),
            rflags: 0x2,
            rsp: u64::from(entry),
            ..Default::default()
        };
        self.fd
            .set_regs(&regs)
            .map_err(self.ioctl_err("KVM_SET_REGS"))
    }

    /// Runs the vCPU until the guest resets or crashes.
    pub fn run(&mut self, bus: &dyn Bus) -> Result<VcpuStop> {
        loop {
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                // A signal interrupted KVM_RUN: go round again.
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) => return Err(self.ioctl_err("KVM_RUN")(e)),
            };
            match exit {
                VcpuExit::IoIn(port, data) => bus.pio_read(port, data),
                VcpuExit::IoOut(port, data) => {
                    if bus.pio_write(port, data) {
                        return Ok(VcpuStop::Reset);
                    }
                }
                VcpuExit::MmioRead(addr, data) => bus.mmio_read(addr, data),
                VcpuExit::MmioWrite(addr, data) => bus.mmio_write(addr, data),
                // Without an in-kernel LAPIC, HLT exits to us; with one it
                // blocks in KVM until an interrupt, so this is rare.
                VcpuExit::Hlt => {}
                VcpuExit::Shutdown => {
                    return Ok(VcpuStop::Crash("triple fault (KVM_EXIT_SHUTDOWN)".into()))
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    return Ok(VcpuStop::Crash(format!(
                        "KVM_EXIT_FAIL_ENTRY: hardware reason {reason:#x} on cpu {cpu}"
                    )))
                }
                VcpuExit::InternalError => {
                    return Ok(VcpuStop::Crash("KVM_EXIT_INTERNAL_ERROR".into()))
                }
                VcpuExit::SystemEvent(kind, _) => {
                    return Ok(VcpuStop::Crash(format!(
                        "KVM_EXIT_SYSTEM_EVENT type {kind}"
                    )))
                }
                other => {
                    tracing::debug!(vcpu = self.index, exit = ?other, "unhandled vCPU exit");
                }
            }
        }
    }
}
