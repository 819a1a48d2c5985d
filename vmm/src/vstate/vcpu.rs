//! vCPUs: their initial state (CPUID, MSRs, FPU, LAPIC, entry registers),
//! the run loop that hands port and MMIO exits to the VM's bus, and the
//! gate that parks them for pause/resume.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use super::arch;
use super::cpuid::vcpu_cpuid;
use crate::boot::loader::BootEntry;
use crate::boot::tables::boot_sregs;
use crate::metrics::{record_first_kvm_run, ExitCounters};

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
    /// KVM took only some of the boot MSRs.
    #[error("vCPU {index}: KVM set {set} of {wanted} boot MSRs")]
    Msrs {
        /// The vCPU.
        index: u8,
        /// How many KVM took.
        set: usize,
        /// How many there are.
        wanted: usize,
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
    /// The host stopped the vCPU (the VM is ending).
    Stopped,
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

/// Where vCPU threads park while the VM is paused.
#[derive(Debug, Default)]
pub struct VcpuGate {
    paused: AtomicBool,
    stopping: AtomicBool,
    parked: Mutex<usize>,
    changed: Condvar,
}

impl VcpuGate {
    /// Asks every vCPU to park at its next exit.
    pub fn request_pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        let _guard = self.parked.lock();
        self.changed.notify_all();
    }

    /// Whether a pause is requested (and the VM is not ending).
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst) && !self.is_stopping()
    }

    /// Asks every vCPU to stop for good at its next exit.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _guard = self.parked.lock();
        self.changed.notify_all();
    }

    /// Whether the VM is ending.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Parks the calling vCPU thread while a pause is requested.
    pub fn park_while_paused(&self) {
        if !self.is_paused() {
            return;
        }
        let Ok(mut parked) = self.parked.lock() else {
            return;
        };
        *parked += 1;
        self.changed.notify_all();
        while self.is_paused() {
            parked = match self.changed.wait(parked) {
                Ok(p) => p,
                Err(_) => return,
            };
        }
        *parked -= 1;
        self.changed.notify_all();
    }

    /// Waits up to `timeout` until `count` vCPUs are parked.
    pub fn wait_parked(&self, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let Ok(mut parked) = self.parked.lock() else {
            return false;
        };
        while *parked < count {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            parked = match self.changed.wait_timeout(parked, deadline - now) {
                Ok((p, _)) => p,
                Err(_) => return false,
            };
        }
        true
    }
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

    /// The vCPU's fd (for tests that inspect its state).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn ioctl_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Ioctl {
            index,
            what,
            source,
        }
    }

    /// Sets what every vCPU starts with, whatever the boot: CPUID (from
    /// KVM's `supported` set, for vCPU `index` of `count`), boot MSRs, FPU,
    /// and LINT0/LINT1 of its LAPIC.
    pub fn configure(&self, supported: &CpuId, count: u8, tsc_deadline: bool) -> Result<()> {
        let cpuid = vcpu_cpuid(supported, self.index, count, tsc_deadline);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.ioctl_err("KVM_SET_CPUID2"))?;
        let entries = arch::boot_msrs();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Msrs {
            index: self.index,
            set: 0,
            wanted: entries.len(),
        })?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.ioctl_err("KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(VcpuError::Msrs {
                index: self.index,
                set,
                wanted: entries.len(),
            });
        }
        self.fd
            .set_fpu(&arch::boot_fpu())
            .map_err(self.ioctl_err("KVM_SET_FPU"))?;
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(self.ioctl_err("KVM_GET_LAPIC"))?;
        arch::set_lint(&mut lapic);
        self.fd
            .set_lapic(&lapic)
            .map_err(self.ioctl_err("KVM_SET_LAPIC"))
    }

    /// Enters the kernel at `entry` (the boot vCPU only: the others wait
    /// for the guest's INIT/SIPI, as on hardware).
    pub fn setup_boot(&self, entry: BootEntry) -> Result<()> {
        let sregs = self
            .fd
            .get_sregs()
            .map_err(self.ioctl_err("KVM_GET_SREGS"))?;
        self.fd
            .set_sregs(&boot_sregs(sregs, entry.mode))
            .map_err(self.ioctl_err("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&arch::boot_regs(entry))
            .map_err(self.ioctl_err("KVM_SET_REGS"))
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

    /// Runs the vCPU until the guest resets or crashes, parking at `gate`
    /// while the VM is paused and counting exits in `exits`.
    pub fn run(
        &mut self,
        bus: &dyn Bus,
        gate: &VcpuGate,
        exits: &ExitCounters,
    ) -> Result<VcpuStop> {
        if self.index == 0 {
            record_first_kvm_run();
        }
        loop {
            gate.park_while_paused();
            if gate.is_stopping() {
                return Ok(VcpuStop::Stopped);
            }
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                // A signal (pause, shutdown) interrupted KVM_RUN.
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    ExitCounters::count(&exits.interrupted);
                    continue;
                }
                Err(e) => return Err(self.ioctl_err("KVM_RUN")(e)),
            };
            match exit {
                VcpuExit::IoIn(port, data) => {
                    ExitCounters::count(&exits.io_in);
                    bus.pio_read(port, data);
                }
                VcpuExit::IoOut(port, data) => {
                    ExitCounters::count(&exits.io_out);
                    if bus.pio_write(port, data) {
                        return Ok(VcpuStop::Reset);
                    }
                }
                VcpuExit::MmioRead(addr, data) => {
                    ExitCounters::count(&exits.mmio_read);
                    bus.mmio_read(addr, data);
                }
                VcpuExit::MmioWrite(addr, data) => {
                    ExitCounters::count(&exits.mmio_write);
                    bus.mmio_write(addr, data);
                }
                // With the in-kernel LAPIC, HLT blocks in KVM until an
                // interrupt, so this is rare.
                VcpuExit::Hlt => ExitCounters::count(&exits.hlt),
                VcpuExit::Shutdown => {
                    ExitCounters::count(&exits.fatal);
                    return Ok(VcpuStop::Crash(format!(
                        "vCPU {}: triple fault (KVM_EXIT_SHUTDOWN)",
                        self.index
                    )));
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    ExitCounters::count(&exits.fatal);
                    return Ok(VcpuStop::Crash(format!(
                        "vCPU {}: KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x} on cpu {cpu}",
                        self.index
                    )));
                }
                VcpuExit::InternalError => {
                    ExitCounters::count(&exits.fatal);
                    return Ok(VcpuStop::Crash(format!(
                        "vCPU {}: KVM_EXIT_INTERNAL_ERROR",
                        self.index
                    )));
                }
                VcpuExit::SystemEvent(kind, _) => {
                    ExitCounters::count(&exits.fatal);
                    return Ok(VcpuStop::Crash(format!(
                        "vCPU {}: KVM_EXIT_SYSTEM_EVENT type {kind}",
                        self.index
                    )));
                }
                other => {
                    ExitCounters::count(&exits.other);
                    tracing::debug!(vcpu = self.index, exit = ?other, "unhandled vCPU exit");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn gate_parks_and_releases() {
        let gate = Arc::new(VcpuGate::default());
        gate.request_pause();
        let g = Arc::clone(&gate);
        let t = std::thread::spawn(move || g.park_while_paused());
        assert!(gate.wait_parked(1, Duration::from_secs(5)));
        gate.resume();
        t.join().unwrap();
        assert!(gate.wait_parked(0, Duration::from_secs(1)));
        assert!(!gate.wait_parked(1, Duration::from_millis(10)));
    }

    #[test]
    fn stop_releases_parked_vcpus() {
        let gate = Arc::new(VcpuGate::default());
        gate.request_pause();
        let g = Arc::clone(&gate);
        let t = std::thread::spawn(move || g.park_while_paused());
        assert!(gate.wait_parked(1, Duration::from_secs(5)));
        gate.stop();
        t.join().unwrap();
        assert!(gate.is_stopping());
        assert!(!gate.is_paused());
    }
}
