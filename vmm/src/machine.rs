//! A built VM and its life: one thread per vCPU, the device event loop,
//! the control socket and a signal watcher all report to the machine's
//! own thread, which owns the VM, answers control requests, and decides
//! when and how the VM ends. At the end every thread is stopped and joined
//! so that devices drop (and remove their sockets) before the process
//! exits.

use std::os::unix::net::UnixListener;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use capsid_devices::hosting::mmio::MmioTransport;
use capsid_devices::socket_claim::SocketClaim;
use capsid_devices::virtio::balloon::{mib_to_pages, Balloon};
use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::signal::{self, Killable};

use crate::config::VmConfig;
use crate::control::{
    self, BalloonCounters, BalloonStatsReply, Call, DeviceMetrics, GuestMemoryStats, MemoryRegion,
    MetricsReply, Reply, Request, VcpuMetrics, DEFAULT_SHUTDOWN_TIMEOUT_MS,
};
use crate::devices::event_loop::EventLoop;
use crate::devices::{BalloonHandle, DeviceError, MmioSlot, VmBus};
use crate::metrics::{first_kvm_run_ns, ExitCounters};
use crate::seccomp::{self, SeccompError, ThreadKind};
use crate::snapshot::{self, SnapshotError};
use crate::vstate::vcpu::{self, Bus, Vcpu, VcpuGate, VcpuStop};
use crate::vstate::vm::Vm;

/// How long vCPUs get to park on `pause`, and to stop at the end.
const VCPU_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a vCPU that has not reacted is kicked again.
const KICK_INTERVAL: Duration = Duration::from_millis(5);

/// Errors running a VM.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A vCPU failed (a KVM ioctl).
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// The devices could not be started.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// A thread could not be started, or a signal set up.
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
    /// A thread could not install its seccomp filter.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// Result of running.
pub type Result<T> = std::result::Result<T, RunError>;

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest reset itself (i8042): the normal end of a capsid guest.
    Reset,
    /// The guest crashed.
    Crash(String),
    /// The host ended it: SIGTERM/SIGINT, or a `shutdown` the guest did
    /// not answer in time.
    Stopped(String),
}

/// The control socket and the claim on its path.
#[derive(Debug)]
pub struct ControlSocket {
    /// The bound listener.
    pub listener: UnixListener,
    /// Removes the socket when dropped.
    pub claim: SocketClaim,
}

/// What the machine's thread hears about.
enum Event {
    Vcpu(u8, vcpu::Result<VcpuStop>),
    Signal(i32),
    Control(Call),
    /// A thread could not confine itself; it ended instead.
    Seccomp(SeccompError),
}

struct VcpuThread {
    index: u8,
    exits: Arc<ExitCounters>,
    thread: JoinHandle<()>,
}

/// A VM ready to run.
pub struct Machine {
    /// What it was built from (a snapshot keeps it).
    config: VmConfig,
    vcpus: Vec<Vcpu>,
    // Field order matters on drop: the VM goes before the memory it maps.
    vm: Vm,
    bus: Arc<VmBus>,
    slots: Arc<Vec<MmioSlot>>,
    event_loop: Option<EventLoop>,
    balloon: Option<BalloonHandle>,
    memory: GuestMemoryMmap,
    control: Option<ControlSocket>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("vcpus", &self.vcpus.len())
            .field("devices", &self.slots)
            .finish()
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    signal::SIGRTMIN()
}

impl Machine {
    /// Assembles a machine (see `builder::build`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: VmConfig,
        vcpus: Vec<Vcpu>,
        vm: Vm,
        bus: Arc<VmBus>,
        slots: Arc<Vec<MmioSlot>>,
        event_loop: EventLoop,
        balloon: Option<BalloonHandle>,
        memory: GuestMemoryMmap,
        control: Option<ControlSocket>,
    ) -> Self {
        Self {
            config,
            vcpus,
            vm,
            bus,
            slots,
            event_loop: Some(event_loop),
            balloon,
            memory,
            control,
        }
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Guest memory (tests inspect what was loaded).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The vCPUs before they run.
    pub fn vcpus(&self) -> &[Vcpu] {
        &self.vcpus
    }

    /// Runs the VM until the guest resets or crashes, or the host ends it.
    pub fn run(mut self) -> Result<VmEnd> {
        // SIGTERM/SIGINT go to the signal watcher only: block them here,
        // before any thread is started, so every thread inherits the mask.
        for sig in [libc::SIGTERM, libc::SIGINT] {
            signal::block_signal(sig)
                .map_err(|e| RunError::Thread("signal", std::io::Error::other(e.to_string())))?;
        }
        signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| RunError::Thread("signal", std::io::Error::from(e)))?;
        let (tx, rx) = mpsc::channel();
        spawn_signal_watcher(tx.clone())?;
        let event_loop = match self.event_loop.take() {
            Some(l) => Some(l.spawn()?),
            None => None,
        };
        let gate = Arc::new(VcpuGate::default());
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for mut vcpu in std::mem::take(&mut self.vcpus) {
            let index = vcpu.index();
            let exits = Arc::new(ExitCounters::default());
            let (tx, bus, gate, counters) = (
                tx.clone(),
                Arc::clone(&self.bus),
                Arc::clone(&gate),
                Arc::clone(&exits),
            );
            // Each vCPU thread holds the guest memory mapping, so it
            // outlives any vCPU still inside KVM_RUN.
            let memory = self.memory.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    // Everything the vCPU needed beyond KVM_RUN and the
                    // bus was done by the builder.
                    if let Err(e) = seccomp::apply(ThreadKind::Vcpu) {
                        drop(vcpu);
                        drop(memory);
                        let _ = tx.send(Event::Seccomp(e));
                        return;
                    }
                    let result = vcpu.run(bus.as_ref() as &dyn Bus, &gate, &counters);
                    drop(vcpu);
                    drop(memory);
                    // The receiver is gone only when the VM is already ending.
                    let _ = tx.send(Event::Vcpu(index, result));
                })
                .map_err(|e| RunError::Thread("vCPU", e))?;
            threads.push(VcpuThread {
                index,
                exits,
                thread,
            });
        }
        if let Some(control) = self.control.as_ref() {
            let listener = control
                .listener
                .try_clone()
                .map_err(|e| RunError::Thread("control", e))?;
            let tx = Mutex::new(tx.clone());
            control::spawn(listener, move |call| {
                tx.lock()
                    .map(|tx| tx.send(Event::Control(call)).is_ok())
                    .unwrap_or(false)
            })
            .map_err(|e| RunError::Thread("control", e))?;
        }
        drop(tx);
        // Last, once every thread is started: a thread started under this
        // filter would run under it as well as its own.
        let end = match seccomp::apply(ThreadKind::Main) {
            Ok(()) => self.supervise(&rx, &gate, &threads),
            Err(e) => Err(e.into()),
        };
        self.bus.legacy().flush();
        stop_vcpus(&gate, threads);
        if let Some(l) = event_loop {
            l.stop();
        }
        end
    }

    /// Waits for the VM's end, answering control requests meanwhile.
    fn supervise(
        &self,
        rx: &Receiver<Event>,
        gate: &VcpuGate,
        threads: &[VcpuThread],
    ) -> Result<VmEnd> {
        let mut deadline: Option<Instant> = None;
        loop {
            let event = match deadline {
                Some(d) => match rx.recv_timeout(d.saturating_duration_since(Instant::now())) {
                    Ok(e) => e,
                    Err(RecvTimeoutError::Timeout) => {
                        return Ok(VmEnd::Stopped(
                            "the guest did not shut down in time after Ctrl-Alt-Del".into(),
                        ))
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        return Ok(VmEnd::Crash("every vCPU thread ended".into()))
                    }
                },
                None => match rx.recv() {
                    Ok(e) => e,
                    Err(_) => return Ok(VmEnd::Crash("every vCPU thread ended".into())),
                },
            };
            match event {
                Event::Vcpu(index, Ok(VcpuStop::Reset)) => {
                    tracing::info!(vcpu = index, "guest reset");
                    return Ok(VmEnd::Reset);
                }
                Event::Vcpu(_, Ok(VcpuStop::Crash(why))) => return Ok(VmEnd::Crash(why)),
                Event::Vcpu(_, Ok(VcpuStop::Stopped)) => {}
                Event::Vcpu(_, Err(e)) => return Err(e.into()),
                Event::Signal(sig) => {
                    return Ok(VmEnd::Stopped(format!("signal {sig}")));
                }
                Event::Seccomp(e) => return Err(e.into()),
                Event::Control(call) => {
                    let reply = match call.request {
                        Request::Shutdown { timeout_ms } => {
                            let ms = timeout_ms.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT_MS);
                            self.bus.legacy().ctrl_alt_del();
                            deadline = Some(Instant::now() + Duration::from_millis(ms));
                            tracing::info!(
                                timeout_ms = ms,
                                "shutdown requested: Ctrl-Alt-Del sent"
                            );
                            Reply::done()
                        }
                        other => self.handle(other, gate, threads),
                    };
                    let _ = call.reply.send(reply);
                }
            }
        }
    }

    fn handle(&self, request: Request, gate: &VcpuGate, threads: &[VcpuThread]) -> Reply {
        let answer = match request {
            Request::BalloonSet { target_mib } => {
                self.balloon_set(target_mib).map(|()| Reply::done())
            }
            Request::BalloonStats => self.balloon_stats().and_then(|stats| encode(&stats)),
            Request::Pause => pause(gate, threads).map(|()| Reply::done()),
            Request::Resume => {
                gate.resume();
                Ok(Reply::done())
            }
            Request::Metrics => encode(&self.metrics(threads)),
            Request::Snapshot { state, memory } => self
                .snapshot(gate, threads, &state, &memory)
                .map_err(|e| capsid_devices::describe(&e))
                .and_then(|reply| encode(&reply)),
            Request::Shutdown { .. } => Err("shutdown is handled by the machine".into()),
            Request::TestForbiddenSyscall => {
                Err("test_forbidden_syscall is handled by the control thread".into())
            }
        };
        answer.unwrap_or_else(Reply::refused)
    }

    /// Saves the paused VM to `state` and `memory` (snapshot::take); it
    /// stays paused.
    fn snapshot(
        &self,
        gate: &VcpuGate,
        threads: &[VcpuThread],
        state: &std::path::Path,
        memory: &std::path::Path,
    ) -> std::result::Result<control::SnapshotReply, SnapshotError> {
        if !gate.is_paused() {
            return Err(SnapshotError::NotPaused);
        }
        if self.config.fs.is_some() {
            return Err(SnapshotError::VirtioFs);
        }
        if let Some(t) = threads.iter().find(|t| t.thread.is_finished()) {
            return Err(SnapshotError::VcpuEnded(t.index));
        }
        let vcpus = gate
            .save_parked(threads.len(), VCPU_RESPONSE_TIMEOUT)
            .ok_or(SnapshotError::VcpuTimeout)?
            .into_iter()
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let reply = snapshot::take(
            snapshot::Source {
                config: &self.config,
                vm: &self.vm,
                memory: &self.memory,
                slots: &self.slots,
                legacy: self.bus.legacy(),
                vcpus,
            },
            state,
            memory,
        );
        if let Err(e) = &reply {
            tracing::warn!(error = %capsid_devices::describe(e), "snapshot failed");
        }
        reply
    }

    /// The balloon's transport, locked. A lock poisoned by a panic puts
    /// the device out of service, here as on the bus and in the event loop.
    fn balloon(&self) -> std::result::Result<MutexGuard<'_, MmioTransport<Balloon>>, String> {
        self.balloon
            .as_ref()
            .ok_or_else(|| "this VM has no balloon".to_string())?
            .lock()
            .map_err(|_| "balloon unavailable".to_string())
    }

    fn balloon_set(&self, target_mib: u32) -> std::result::Result<(), String> {
        if target_mib > self.config.memory_mib {
            return Err(format!(
                "balloon target {target_mib} MiB exceeds the VM's {} MiB",
                self.config.memory_mib
            ));
        }
        let mut b = self.balloon()?;
        b.device_mut().set_target_pages(mib_to_pages(target_mib));
        b.signal_config_change();
        tracing::info!(target_mib, "balloon target set");
        Ok(())
    }

    fn balloon_stats(&self) -> std::result::Result<BalloonStatsReply, String> {
        let mut b = self.balloon()?;
        let requested = b.device_request(|dev, queues, mem| dev.request_stats(queues, mem));
        let dev = b.device();
        let s = dev.stats();
        let c = dev.counters;
        let page_mib = |pages: u32| u64::from(pages) * 4096 / (1 << 20);
        Ok(BalloonStatsReply {
            target_pages: dev.target_pages(),
            actual_pages: dev.actual_pages(),
            target_mib: page_mib(dev.target_pages()),
            actual_mib: page_mib(dev.actual_pages()),
            refresh_requested: requested,
            stats: GuestMemoryStats {
                swap_in: s.swap_in,
                swap_out: s.swap_out,
                major_faults: s.major_faults,
                minor_faults: s.minor_faults,
                free_memory: s.free_memory,
                total_memory: s.total_memory,
                available_memory: s.available_memory,
                disk_caches: s.disk_caches,
                hugetlb_allocations: s.hugetlb_allocations,
                hugetlb_failures: s.hugetlb_failures,
            },
            counters: BalloonCounters {
                inflated_pages: c.inflated_pages,
                deflated_pages: c.deflated_pages,
                invalid_pfns: c.invalid_pfns,
                reported_bytes: c.reported_bytes,
                invalid_reports: c.invalid_reports,
                discard_failures: c.discard_failures,
                malformed_chains: c.malformed_chains,
                stats_updates: c.stats_updates,
            },
        })
    }

    fn metrics(&self, threads: &[VcpuThread]) -> MetricsReply {
        let vcpus = threads
            .iter()
            .map(|t| VcpuMetrics {
                index: t.index,
                exits: t.exits.snapshot(),
            })
            .collect();
        let devices = self
            .slots
            .iter()
            .map(|slot| {
                let place = slot.place();
                let (activated, stats) = slot
                    .device()
                    .lock()
                    .map(|d| (d.is_activated(), d.stats()))
                    .unwrap_or_default();
                DeviceMetrics {
                    name: slot.name().to_string(),
                    base: place.base,
                    gsi: place.gsi,
                    activated,
                    events: stats.events,
                    interrupts: stats.interrupts,
                    device_errors: stats.device_errors,
                    refused_accesses: stats.refused_accesses,
                    interrupt_failures: stats.interrupt_failures,
                }
            })
            .collect();
        let guest_memory = self
            .memory
            .iter()
            .map(|r| MemoryRegion {
                guest_addr: r.start_addr().0,
                host_addr: r.as_ptr() as u64,
                size: r.len(),
            })
            .collect();
        MetricsReply {
            vcpus,
            devices,
            guest_memory,
            first_kvm_run_monotonic_ns: first_kvm_run_ns(),
        }
    }
}

/// An ok reply carrying `body`'s fields.
fn encode<T: Serialize>(body: &T) -> std::result::Result<Reply, String> {
    // The bodies are plain structs of numbers and strings: this cannot fail
    // in practice, and a client is told if it ever does.
    Reply::with_body(body).map_err(|e| format!("cannot encode the answer: {e}"))
}

fn kick(threads: &[VcpuThread]) {
    for t in threads.iter().filter(|t| !t.thread.is_finished()) {
        // A thread that already ended cannot be kicked and need not be.
        let _ = t.thread.kick();
    }
}

trait Kick {
    fn kick(&self) -> std::io::Result<()>;
}

impl Kick for JoinHandle<()> {
    fn kick(&self) -> std::io::Result<()> {
        self.kill(kick_signal()).map_err(std::io::Error::from)
    }
}

fn pause(gate: &VcpuGate, threads: &[VcpuThread]) -> std::result::Result<(), String> {
    gate.request_pause();
    let deadline = Instant::now() + VCPU_RESPONSE_TIMEOUT;
    let running = threads.iter().filter(|t| !t.thread.is_finished()).count();
    while Instant::now() < deadline {
        kick(threads);
        if gate.wait_parked(running, KICK_INTERVAL) {
            tracing::info!("vCPUs paused");
            return Ok(());
        }
    }
    gate.resume();
    Err("the vCPUs did not pause in time".into())
}

fn stop_vcpus(gate: &VcpuGate, threads: Vec<VcpuThread>) {
    gate.stop();
    let deadline = Instant::now() + VCPU_RESPONSE_TIMEOUT;
    while threads.iter().any(|t| !t.thread.is_finished()) && Instant::now() < deadline {
        kick(&threads);
        std::thread::sleep(Duration::from_millis(1));
    }
    for t in threads {
        if t.thread.is_finished() {
            let _ = t.thread.join();
        } else {
            tracing::warn!(
                vcpu = t.index,
                "vCPU thread did not stop; leaving it to the exit"
            );
        }
    }
}

fn spawn_signal_watcher(tx: Sender<Event>) -> Result<()> {
    let set = signal::create_sigset(&[libc::SIGTERM, libc::SIGINT])
        .map_err(|e| RunError::Thread("signal", std::io::Error::from(e)))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Err(e) = seccomp::apply(ThreadKind::Signals) {
                let _ = tx.send(Event::Seccomp(e));
                return;
            }
            signal_loop(&set, &tx);
        })
        .map(|_| ())
        .map_err(|e| RunError::Thread("signal", e))
}

/// Waits for SIGTERM or SIGINT and tells the machine.
fn signal_loop(set: &libc::sigset_t, tx: &Sender<Event>) {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is an initialized signal set and `sig` a valid
        // place for the result, both owned by this thread; the signals
        // in `set` are blocked in every thread (the mask is set before
        // any thread starts), as sigwait requires.
        let rc = unsafe { libc::sigwait(set, &mut sig) };
        if rc == 0 {
            let _ = tx.send(Event::Signal(sig));
            return;
        }
    }
}
