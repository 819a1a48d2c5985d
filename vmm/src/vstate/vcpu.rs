//! vCPUs: their initial state (CPUID, MSRs, FPU, LAPIC, entry registers)
//! or a snapshot's, the run loop that hands port and MMIO exits to the
//! VM's bus, and the gate that parks them for pause/resume and asks a
//! parked vCPU for its state (snapshots).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use super::arch;
use super::cpuid::vcpu_cpuid;
use crate::boot::loader::BootEntry;
use crate::boot::tables::boot_sregs;
use crate::metrics::{record_first_kvm_run, ExitCounters};
use crate::snapshot::vcpu::{self as vcpu_state, StateCaps, VcpuState, VcpuStateError};

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
    /// A snapshot's state could not be read or written.
    #[error(transparent)]
    State(#[from] VcpuStateError),
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

/// What parked vCPU threads share with the machine's thread.
#[derive(Debug, Default)]
struct Parking {
    /// vCPUs parked now.
    count: usize,
    /// Bumped for every request to save state; each parked vCPU answers
    /// each request once.
    save_request: u64,
    /// The answers to the last request.
    saved: Vec<SavedVcpu>,
}

/// A vCPU's answer to a request to save its state.
pub type SavedVcpu = std::result::Result<VcpuState, VcpuStateError>;

/// Where vCPU threads park while the VM is paused, and where a parked
/// vCPU is asked for its state: its fd lives on its own thread, and the
/// exit it last took must be completed there (by a `KVM_RUN` that enters
/// no guest code) before KVM's view of it is whole.
#[derive(Debug, Default)]
pub struct VcpuGate {
    paused: AtomicBool,
    stopping: AtomicBool,
    parked: Mutex<Parking>,
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

    /// Parks the calling vCPU thread while a pause is requested, answering
    /// every request to save state with `save` meanwhile; `answered` is
    /// the last request this vCPU answered (kept by the caller, 0 at
    /// first).
    pub fn park_while_paused(&self, answered: &mut u64, mut save: impl FnMut() -> SavedVcpu) {
        if !self.is_paused() {
            return;
        }
        let Ok(mut parking) = self.parked.lock() else {
            return;
        };
        parking.count += 1;
        self.changed.notify_all();
        while self.is_paused() {
            if parking.save_request != *answered {
                *answered = parking.save_request;
                // KVM ioctls take a while: not under the lock.
                drop(parking);
                let saved = save();
                parking = match self.parked.lock() {
                    Ok(p) => p,
                    Err(_) => return,
                };
                parking.saved.push(saved);
                self.changed.notify_all();
                continue;
            }
            parking = match self.changed.wait(parking) {
                Ok(p) => p,
                Err(_) => return,
            };
        }
        parking.count -= 1;
        self.changed.notify_all();
    }

    /// Waits up to `timeout` until `count` vCPUs are parked.
    pub fn wait_parked(&self, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let Ok(mut parking) = self.parked.lock() else {
            return false;
        };
        while parking.count < count {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            parking = match self.changed.wait_timeout(parking, deadline - now) {
                Ok((p, _)) => p,
                Err(_) => return false,
            };
        }
        true
    }

    /// Asks the parked vCPUs for their state and waits up to `timeout`
    /// for `count` answers, which it returns (in no particular order);
    /// `None` when they did not all answer in time (or a lock was
    /// poisoned). The VM must be paused with its `count` vCPUs parked.
    pub fn save_parked(&self, count: usize, timeout: Duration) -> Option<Vec<SavedVcpu>> {
        let deadline = Instant::now() + timeout;
        let mut parking = self.parked.lock().ok()?;
        parking.saved.clear();
        parking.save_request += 1;
        self.changed.notify_all();
        while parking.saved.len() < count {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            parking = self.changed.wait_timeout(parking, deadline - now).ok()?.0;
        }
        Some(std::mem::take(&mut parking.saved))
    }
}

/// One vCPU.
#[derive(Debug)]
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    /// The CPUID it was given, which a snapshot keeps.
    cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    /// What KVM lets a snapshot read of it.
    caps: Arc<StateCaps>,
}

impl Vcpu {
    /// Creates vCPU `index` of `vm`; `caps` say what a snapshot of it
    /// reads.
    pub fn new(vm: &VmFd, index: u8, caps: Arc<StateCaps>) -> Result<Self> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Ioctl {
                index,
                what: "KVM_CREATE_VCPU",
                source,
            })?;
        Ok(Self {
            index,
            fd,
            cpuid: Vec::new(),
            caps,
        })
    }

    /// Creates vCPU `state.index` of `vm` in a snapshot's `state`.
    pub fn restore(vm: &VmFd, state: &VcpuState, caps: Arc<StateCaps>) -> Result<Self> {
        let mut vcpu = Self::new(vm, state.index, caps)?;
        vcpu_state::restore(&vcpu.fd, state, &vcpu.caps)?;
        vcpu.cpuid.clone_from(&state.cpuid);
        Ok(vcpu)
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
    pub fn configure(&mut self, supported: &CpuId, count: u8, tsc_deadline: bool) -> Result<()> {
        let cpuid = vcpu_cpuid(supported, self.index, count, tsc_deadline);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.ioctl_err("KVM_SET_CPUID2"))?;
        self.cpuid = cpuid.as_slice().to_vec();
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
    /// while the VM is paused (and saving its state there when asked),
    /// and counting exits in `exits`.
    pub fn run(
        &mut self,
        bus: &dyn Bus,
        gate: &VcpuGate,
        exits: &ExitCounters,
    ) -> Result<VcpuStop> {
        if self.index == 0 {
            record_first_kvm_run();
        }
        let mut answered = 0;
        loop {
            gate.park_while_paused(&mut answered, || self.save_state(bus, exits));
            if gate.is_stopping() {
                return Ok(VcpuStop::Stopped);
            }
            let index = self.index;
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                // A signal (pause, shutdown) interrupted KVM_RUN.
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    ExitCounters::count(&exits.interrupted);
                    continue;
                }
                Err(e) => return Err(self.ioctl_err("KVM_RUN")(e)),
            };
            if let Some(stop) = handle_exit(index, exit, bus, exits) {
                return Ok(stop);
            }
        }
    }

    /// The vCPU's state for a snapshot, on its own thread while parked.
    /// Its last exit is completed first: KVM finishes an `in` or an MMIO
    /// read (the value the bus gave goes into a register) only at the
    /// next `KVM_RUN`, and what it has not finished is in no state KVM
    /// reports. `immediate_exit` makes that `KVM_RUN` return before any
    /// guest instruction runs.
    fn save_state(&mut self, bus: &dyn Bus, exits: &ExitCounters) -> SavedVcpu {
        let index = self.index;
        // A pending exit that itself needs the VMM (an MMIO access split
        // across pages) exits again; a few rounds settle any.
        for _ in 0..4 {
            self.fd.set_kvm_immediate_exit(1);
            let stop = match self.fd.run() {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    return vcpu_state::save(index, &self.fd, &self.cpuid, &self.caps);
                }
                Err(source) => Err(VcpuStateError::Ioctl {
                    index,
                    what: "KVM_RUN",
                    source,
                }),
                Ok(exit) => Ok(handle_exit(index, exit, bus, exits)),
            };
            self.fd.set_kvm_immediate_exit(0);
            if let Some(stop) = stop? {
                return Err(VcpuStateError::Stopped {
                    index,
                    why: format!("{stop:?}"),
                });
            }
        }
        Err(VcpuStateError::Stopped {
            index,
            why: "it kept exiting instead of completing its last exit".into(),
        })
    }
}

/// Hands one exit of vCPU `index` to the bus; `Some` when the vCPU must
/// stop.
fn handle_exit(
    index: u8,
    exit: VcpuExit<'_>,
    bus: &dyn Bus,
    exits: &ExitCounters,
) -> Option<VcpuStop> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            ExitCounters::count(&exits.io_in);
            bus.pio_read(port, data);
        }
        VcpuExit::IoOut(port, data) => {
            ExitCounters::count(&exits.io_out);
            if bus.pio_write(port, data) {
                return Some(VcpuStop::Reset);
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
            return Some(VcpuStop::Crash(format!(
                "vCPU {index}: triple fault (KVM_EXIT_SHUTDOWN)"
            )));
        }
        VcpuExit::FailEntry(reason, cpu) => {
            ExitCounters::count(&exits.fatal);
            return Some(VcpuStop::Crash(format!(
                "vCPU {index}: KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x} on cpu {cpu}"
            )));
        }
        VcpuExit::InternalError => {
            ExitCounters::count(&exits.fatal);
            return Some(VcpuStop::Crash(format!(
                "vCPU {index}: KVM_EXIT_INTERNAL_ERROR"
            )));
        }
        VcpuExit::SystemEvent(kind, _) => {
            ExitCounters::count(&exits.fatal);
            return Some(VcpuStop::Crash(format!(
                "vCPU {index}: KVM_EXIT_SYSTEM_EVENT type {kind}"
            )));
        }
        other => {
            ExitCounters::count(&exits.other);
            tracing::debug!(vcpu = index, exit = ?other, "unhandled vCPU exit");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable_save() -> SavedVcpu {
        panic!("no state was asked for")
    }

    #[test]
    fn parked_vcpus_answer_each_save_request_once() {
        let gate = Arc::new(VcpuGate::default());
        gate.request_pause();
        let threads: Vec<_> = (0..3u8)
            .map(|index| {
                let g = Arc::clone(&gate);
                std::thread::spawn(move || {
                    let mut answered = 0;
                    let mut saves = 0;
                    g.park_while_paused(&mut answered, || {
                        saves += 1;
                        Err(VcpuStateError::Stopped {
                            index,
                            why: "test".into(),
                        })
                    });
                    saves
                })
            })
            .collect();
        assert!(gate.wait_parked(3, Duration::from_secs(5)));
        for _ in 0..2 {
            let saved = gate.save_parked(3, Duration::from_secs(5)).unwrap();
            let mut indices: Vec<String> = saved
                .iter()
                .map(|s| s.as_ref().unwrap_err().to_string())
                .collect();
            indices.sort();
            assert_eq!(indices.len(), 3);
            assert!(indices[0].starts_with("vCPU 0:"), "{indices:?}");
        }
        // Nobody answers twice: a fourth answer never comes.
        assert!(gate.save_parked(4, Duration::from_millis(50)).is_none());
        gate.resume();
        for t in threads {
            assert_eq!(t.join().unwrap(), 3);
        }
    }

    #[test]
    fn gate_parks_and_releases() {
        let gate = Arc::new(VcpuGate::default());
        gate.request_pause();
        let g = Arc::clone(&gate);
        let t = std::thread::spawn(move || g.park_while_paused(&mut 0, unreachable_save));
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
        let t = std::thread::spawn(move || g.park_while_paused(&mut 0, unreachable_save));
        assert!(gate.wait_parked(1, Duration::from_secs(5)));
        gate.stop();
        t.join().unwrap();
        assert!(gate.is_stopping());
        assert!(!gate.is_paused());
    }
}
