//! One sandbox: a VM from a backend, with its agent connected. The shim and
//! `capsid run` both drive containers through this.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::agent::{self, Agent, AgentError};
use crate::backend::{self, Backend, BackendError, DiskSpec, NetSpec, Vm, VmExit, VmSpec};
use crate::config::{BackendKind, Config};
use crate::stdio::{PendingStreams, PortAllocator, StreamsWanted};

/// How long the agent may take to connect after the VM started (TCG boots
/// take about a second; a loaded CI machine much longer).
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The VM could not be started.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The state directory is not private, or the run directory exists.
    #[error(transparent)]
    Private(#[from] crate::private_dir::PrivateDirError),
    /// The memory registry refused the sandbox (over-assignment limit) or
    /// cannot be written.
    #[error(transparent)]
    Balloon(#[from] crate::balloon::BalloonError),
    /// The agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The VM ended before its agent connected.
    #[error("the VM exited before its agent was ready ({exit:?}); {words}")]
    DiedEarly {
        /// How it ended.
        exit: VmExit,
        /// What its failed processes last wrote, and the console's last
        /// lines.
        words: String,
    },
    /// A host socket or directory could not be made.
    #[error("cannot set up {what}")]
    Io {
        /// What.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No backend can run here.
    #[error("no usable VM backend: {0}")]
    NoBackend(String),
}

/// Result of sandbox operations.
pub type Result<T> = std::result::Result<T, SandboxError>;

/// What the sandbox's VM is made of.
#[derive(Debug, Clone, Default)]
pub struct SandboxOptions {
    /// Sandbox id (names the run directory).
    pub id: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Disks (rootfs images first).
    pub disks: Vec<DiskSpec>,
    /// Network interface.
    pub net: Option<NetSpec>,
    /// Extra kernel arguments.
    pub kernel_args: Vec<String>,
    /// The guest's interface configuration (addresses, routes, MTU), sent
    /// to the agent before [`Sandbox::start`] returns. DNS is not applied
    /// here: it goes into each container's CreateContainer request.
    pub network: Option<crate::network::GuestNetwork>,
    /// Keep the balloon policy away from this sandbox's memory.
    pub balloon_opt_out: bool,
    /// The volume share ([`crate::volumes::Share`]) to serve over
    /// virtio-fs; `None`: no virtiofsd at all.
    pub share_dir: Option<PathBuf>,
    /// The VM's cgroup ([`VmSpec::cgroup`]).
    pub cgroup: Option<PathBuf>,
}

/// When each start-up phase finished, from [`Sandbox::start`]'s call.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartTimings {
    /// VMM and device processes spawned.
    pub vm_spawned: Duration,
    /// The agent connected (the guest booted to PID 1 and dialed out).
    pub agent_connected: Duration,
    /// Guest kernel uptime when the agent started (from Health).
    pub guest_boot_to_agent: Duration,
    /// When [`Sandbox::start`] was called (the origin of the durations).
    pub started_at: Option<Instant>,
    /// The Health request was sent (host side).
    pub health_sent: Duration,
    /// The Health response arrived (host side).
    pub health_received: Duration,
    /// Guest CLOCK_MONOTONIC when the agent started as PID 1 (from Health).
    pub guest_agent_started: Duration,
    /// Guest CLOCK_MONOTONIC when the agent answered Health; `None` from an
    /// agent that does not report it. Guest time g maps to host time
    /// `started_at + (health_sent + health_received) / 2 - (now - g)`.
    pub guest_now_at_health: Option<Duration>,
}

/// A running VM with a connected agent.
#[derive(Debug)]
pub struct Sandbox {
    id: String,
    vm: Arc<Mutex<Box<dyn Vm>>>,
    agent: Agent,
    vsock_path: PathBuf,
    ports: PortAllocator,
    /// The sandbox's entry for the balloon policy; removed when dropped.
    balloon_registration: Mutex<Option<crate::balloon::registry::Registration>>,
    /// The VM's RAM, MiB.
    memory_mib: u32,
    /// Of it, MiB the guest may use: the rest is held in the balloon (a
    /// pod's room to grow, [`Sandbox::start_reserved`]). Locked across a
    /// resize.
    usable_mib: Mutex<u32>,
    /// The VM's RAM the guest has not added (booted with `mem=` less than
    /// it, crate::hotplug); `None`: it booted with all of it.
    absent: Mutex<Option<crate::hotplug::Absent>>,
    /// Some disk is writable: the guest must flush it before the VM ends.
    writable_disks: bool,
    /// The host end of the guest's DNS relay, once asked for.
    dns_relay: Mutex<Option<crate::dns_relay::DnsRelay>>,
    /// The VM serves a volume share (virtio-fs).
    share: bool,
    /// Start-up timing.
    pub timings: StartTimings,
}

/// Picks the backend for this host (the config may force one).
pub fn backend_for(config: &Config) -> Result<Arc<dyn Backend>> {
    let kind = match config.backend.kind {
        Some(kind) => kind,
        None => detected_backend(config)?,
    };
    let jailer = backend::jail::Jailer::from_config(&config.paths.jailer, &config.jail)?;
    match kind {
        BackendKind::QemuKvm | BackendKind::QemuTcg => Ok(Arc::new(
            backend::qemu::QemuBackend::new(kind, &config.paths.qemu, &config.paths.vhost)?
                .with_jailer(jailer),
        )),
        BackendKind::CapsidVmm => Ok(Arc::new(
            backend::capsid_vmm::CapsidVmmBackend::new(&config.paths.vmm)?.with_jailer(jailer),
        )),
    }
}

/// The backend the host checks select, probed once per process: the host's
/// KVM and QEMU do not change under a running shim or CLI, and the probe
/// (opening /dev/kvm, running QEMU) costs more than a Create should.
fn detected_backend(config: &Config) -> Result<BackendKind> {
    static DETECTED: std::sync::OnceLock<std::result::Result<BackendKind, String>> =
        std::sync::OnceLock::new();
    DETECTED
        .get_or_init(|| {
            let report = crate::check::HostReport::gather(config);
            report.selection.backend.ok_or(report.selection.reason)
        })
        .clone()
        .map_err(SandboxError::NoBackend)
}

impl Sandbox {
    /// Starts a VM and waits for its agent.
    pub async fn start(
        config: &Config,
        backend: Arc<dyn Backend>,
        opts: SandboxOptions,
    ) -> Result<Self> {
        Self::start_reserved(config, backend, opts, 0).await
    }

    /// Starts a VM of `opts.memory_mib` whose balloon holds `reserve_mib`
    /// of it as soon as the agent is up, so the guest has the rest: a
    /// pod's VM, which grows by deflating the balloon
    /// ([`Sandbox::set_usable_memory`]). Only the usable part counts as
    /// assigned for the over-assignment limit; guest RAM is allocated on
    /// the host when touched, so the reserve costs the host little.
    pub async fn start_reserved(
        config: &Config,
        backend: Arc<dyn Backend>,
        opts: SandboxOptions,
        reserve_mib: u32,
    ) -> Result<Self> {
        let start = Instant::now();
        if reserve_mib > 0 && reserve_mib >= opts.memory_mib {
            return Err(SandboxError::Balloon(
                crate::balloon::BalloonError::TargetTooLarge {
                    target_mib: u64::from(reserve_mib),
                    assigned_mib: opts.memory_mib,
                },
            ));
        }
        let usable_mib = opts.memory_mib.saturating_sub(reserve_mib);
        // A VM that may grow boots with only what it uses (whole blocks),
        // so the guest kernel keeps page descriptors only for that.
        let present_mib = (reserve_mib > 0)
            .then(|| crate::hotplug::boot_present_mib(config, opts.memory_mib, usable_mib))
            .flatten();
        let absent_mib = present_mib.map_or(0, |p| opts.memory_mib - p);
        let mut kernel_args = opts.kernel_args.clone();
        kernel_args.extend(present_mib.map(crate::hotplug::kernel_arg));
        // TCG may have been chosen without the user asking: say once per
        // process what it means for isolation.
        crate::check::warn_once_if_tcg(backend.kind(), &opts.id);
        let run_dir = config.paths.state_dir.join(&opts.id);
        // Made first, and only if new (the balloon registration below
        // writes into it); removed again on every early return below. The
        // VM, once started, is killed when dropped on those paths too.
        let run_dir_guard = RunDirGuard::create(&config.paths.state_dir, &run_dir)?;
        // Refused here when over the over-assignment limit, before the VM
        // is started; deregistered when dropped, on any error too.
        let mut balloon_registration = crate::balloon::register_sandbox(
            config,
            &opts.id,
            backend.kind(),
            usable_mib,
            reserve_mib,
            !opts.balloon_opt_out,
        )?;
        let spec = VmSpec {
            name: opts.id.clone(),
            vcpus: opts.vcpus,
            memory_mib: opts.memory_mib,
            kernel: config.paths.kernel.clone(),
            initramfs: config.paths.initramfs.clone(),
            kernel_args,
            disks: opts.disks.clone(),
            net: opts.net.clone(),
            fs: opts.share_dir.as_ref().map(|dir| crate::backend::FsSpec {
                daemon: config.paths.virtiofsd.clone(),
                shared_dir: dir.clone(),
                tag: crate::volumes::SHARE_TAG.into(),
                cache: config.volumes.cache,
            }),
            guest_cid: 3,
            run_dir: run_dir.clone(),
            cgroup: opts.cgroup.clone(),
        };
        let vsock_path = spec.vsock_path();
        let listener =
            agent::bind_agent_listener(&vsock_path).map_err(|source| SandboxError::Io {
                what: "agent socket".into(),
                source,
            })?;
        let vm = tokio::task::spawn_blocking(move || backend.start(&spec))
            .await
            .map_err(|e| SandboxError::Io {
                what: "VM start task".into(),
                source: std::io::Error::other(e),
            })??;
        let vm_spawned = start.elapsed();
        // The balloon as the host sees it: RAM the guest has not added
        // counts as held in it.
        let balloon = vm.balloon().map(|b| b.with_absent(absent_mib));
        if let Some(reg) = balloon_registration.as_mut() {
            if let Err(e) = reg.attach_vm(vm.pids().first().copied(), balloon.clone()) {
                tracing::warn!(id = %opts.id, error = %e, "cannot record the VM for the balloon policy");
            }
        }
        let vm = Arc::new(Mutex::new(vm));
        // Either the agent connects, or the VM dies first and we say why.
        let agent = tokio::select! {
            agent = Agent::accept(&listener, AGENT_TIMEOUT) => agent,
            exit = watch_exit(vm.clone()) => {
                // The run directory is gone by now: the VM kept the words.
                let words = vm.lock().map(|vm| vm.last_words()).unwrap_or_default();
                return Err(SandboxError::DiedEarly { exit, words });
            }
        };
        let agent = agent?;
        let agent_connected = start.elapsed();
        let health_sent = start.elapsed();
        let health = agent.health().await?;
        let health_received = start.elapsed();
        tracing::info!(id = %opts.id, version = %health.version, ?agent_connected, "agent connected");
        if let Some(network) = &opts.network {
            agent.configure_network(network).await?;
        }
        let absent = match present_mib {
            Some(present_mib) => Some(boot_absent(&agent, &opts.id, absent_mib, present_mib).await),
            None => None,
        };
        if reserve_mib > 0 {
            set_balloon(balloon, u64::from(reserve_mib)).await?;
            tracing::info!(id = %opts.id, memory_mib = opts.memory_mib, ?present_mib, usable_mib, "balloon set to the pod's reserve");
        }
        run_dir_guard.keep();
        Ok(Self {
            id: opts.id,
            vm,
            agent,
            vsock_path,
            ports: PortAllocator::default(),
            balloon_registration: Mutex::new(balloon_registration),
            memory_mib: opts.memory_mib,
            usable_mib: Mutex::new(usable_mib),
            absent: Mutex::new(absent),
            writable_disks: opts.disks.iter().any(|d| !d.readonly),
            dns_relay: Mutex::new(None),
            share: opts.share_dir.is_some(),
            timings: StartTimings {
                vm_spawned,
                agent_connected,
                guest_boot_to_agent: Duration::from_nanos(health.kernel_boot_ns),
                started_at: Some(start),
                health_sent,
                health_received,
                guest_agent_started: Duration::from_nanos(health.agent_started_ns),
                guest_now_at_health: (health.now_ns > 0)
                    .then(|| Duration::from_nanos(health.now_ns)),
            },
        })
    }

    /// Whether the VM serves a volume share: containers' volume binds
    /// name its entries ([`crate::volumes`]).
    pub fn has_share(&self) -> bool {
        self.share
    }

    /// The VM's main host process (QEMU or capsid-vmm): the pid containerd
    /// is told for the container, as Kata tells the hypervisor's, since
    /// guest pids mean nothing on the host.
    pub fn vm_pid(&self) -> Option<u32> {
        self.pids().first().copied()
    }

    /// Configures the guest's NIC for a network joined after the VM booted
    /// ([`crate::network::own::join_late`]): the NIC, found by `boot_mac`,
    /// takes the veth's MAC, addresses, routes and MTU.
    pub async fn configure_late_network(
        &self,
        network: &crate::network::GuestNetwork,
        boot_mac: &str,
    ) -> Result<()> {
        Ok(self.agent.configure_network_from(network, boot_mac).await?)
    }

    /// Relays the guest's DNS queries to the loopback resolvers of `dns`
    /// (Docker's embedded DNS) inside `netns`, where only they can be
    /// reached; containers created afterwards get the relay. Returns
    /// whether `dns` has such resolvers. Idempotent.
    pub fn relay_dns(
        &self,
        netns: &Path,
        dns: &crate::network::GuestDns,
    ) -> std::result::Result<bool, crate::dns_relay::DnsRelayError> {
        let resolvers: Vec<std::net::IpAddr> =
            dns.servers.iter().filter_map(|s| s.parse().ok()).collect();
        let mut relay = self.dns_relay.lock().unwrap_or_else(|p| p.into_inner());
        if relay.is_none() {
            *relay = crate::dns_relay::DnsRelay::start(&self.vsock_path, netns, &resolvers)?;
        }
        Ok(relay.is_some())
    }

    /// The vsock port of the guest's DNS relay, 0 without one.
    pub(crate) fn dns_relay_port(&self) -> u32 {
        let relay = self.dns_relay.lock().unwrap_or_else(|p| p.into_inner());
        if relay.is_some() {
            crate::dns_relay::DNS_RELAY_PORT
        } else {
            0
        }
    }

    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The agent.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// The VM's balloon.
    pub fn balloon(&self) -> Option<crate::balloon::BalloonHandle> {
        let absent = self.absent_mib();
        self.vm
            .lock()
            .ok()
            .and_then(|vm| vm.balloon())
            .map(|b| b.with_absent(absent))
    }

    /// The VM's RAM the guest has not added, MiB (crate::hotplug).
    pub fn absent_mib(&self) -> u32 {
        self.absent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(0, |a| a.mib)
    }

    /// Resizes a pod's VM as [`Sandbox::set_usable_memory`] does, first
    /// having the guest add the RAM it has not added yet and now needs
    /// (crate::hotplug). What it added is held in the balloon until the
    /// resize gives it, so a refused resize leaves the guest as it was.
    pub async fn resize(self: &Arc<Self>, config: &Config, usable_mib: u32) -> Result<()> {
        self.add_memory_for(usable_mib).await?;
        let (me, config) = (self.clone(), config.clone());
        tokio::task::spawn_blocking(move || me.set_usable_memory(&config, usable_mib))
            .await
            .map_err(|e| SandboxError::Io {
                what: "VM resize task".into(),
                source: std::io::Error::other(e),
            })?
    }

    async fn add_memory_for(self: &Arc<Self>, usable_mib: u32) -> Result<()> {
        let Some(absent) = *self.absent.lock().unwrap_or_else(|p| p.into_inner()) else {
            return Ok(());
        };
        let usable_mib = usable_mib.min(self.memory_mib);
        if usable_mib <= self.memory_mib - absent.mib {
            return Ok(());
        }
        let want = crate::hotplug::present_for(usable_mib).min(self.memory_mib);
        let reported = self
            .agent
            .add_memory(absent.keep_for(self.memory_mib, want))
            .await;
        // What the guest added stays added even when it stopped short.
        let after = match &reported {
            Ok(now) => absent.after_report(*now),
            Err(_) => absent,
        };
        *self.absent.lock().unwrap_or_else(|p| p.into_inner()) = Some(after);
        let added = absent.mib - after.mib;
        if added > 0 {
            let balloon = self.balloon();
            if let Some(reg) = self
                .balloon_registration
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                let pid = reg.entry().vmm_pid;
                if let Err(e) = reg.attach_vm(pid, balloon.clone()) {
                    tracing::warn!(id = %self.id, error = %e, "cannot record the VM's added memory for the balloon policy");
                }
            }
            // The guest keeps what it may use now: the balloon takes what
            // was added, until the resize gives it.
            let held = self.memory_mib - *self.usable_mib.lock().unwrap_or_else(|p| p.into_inner());
            set_balloon(balloon, u64::from(held)).await?;
            tracing::info!(id = %self.id, added_mib = added, absent_mib = after.mib, "guest RAM added");
        }
        reported?;
        let present = self.memory_mib - after.mib;
        if present < usable_mib {
            return Err(SandboxError::Io {
                what: "the guest's RAM".into(),
                source: std::io::Error::other(format!(
                    "the guest has added {present} MiB of the VM's {} MiB and could add no \
                     more, short of the {usable_mib} MiB asked for (a guest kernel without \
                     memory hotplug? [vm] memory_hotplug = false boots with all of it)",
                    self.memory_mib
                )),
            });
        }
        Ok(())
    }

    /// The VM's RAM and, of it, what the guest may use (the rest is held in
    /// the balloon as a pod's room to grow), MiB.
    pub fn memory(&self) -> (u32, u32) {
        let usable = *self.usable_mib.lock().unwrap_or_else(|p| p.into_inner());
        (self.memory_mib, usable)
    }

    /// Resizes a pod's VM: the guest may use `usable_mib` of the VM's RAM,
    /// the balloon holds the rest. The memory registry is updated first,
    /// refusing growth past the over-assignment limit of `config`; then the
    /// balloon is set (on failure the registry is put back). More than the
    /// VM's RAM is refused. Nothing changes on a refusal. Blocking (one
    /// short call to the VMM).
    pub fn set_usable_memory(&self, config: &Config, usable_mib: u32) -> Result<()> {
        let mut usable = self.usable_mib.lock().unwrap_or_else(|p| p.into_inner());
        if usable_mib > self.memory_mib || usable_mib == 0 {
            return Err(SandboxError::Balloon(
                crate::balloon::BalloonError::TargetTooLarge {
                    target_mib: u64::from(self.memory_mib.saturating_sub(usable_mib)),
                    assigned_mib: self.memory_mib,
                },
            ));
        }
        if usable_mib == *usable {
            return Ok(());
        }
        let before = *usable;
        let reserve = self.memory_mib - usable_mib;
        let limit = crate::balloon::overcommit_limit(config);
        self.resize_registration(usable_mib, reserve, limit)?;
        let set = match self.balloon() {
            Some(b) => b.set_target(u64::from(reserve)).map_err(SandboxError::from),
            None => Err(SandboxError::Io {
                what: "the VM's balloon".into(),
                source: std::io::Error::other("the VM has no balloon"),
            }),
        };
        if let Err(e) = set {
            let _ = self.resize_registration(before, self.memory_mib - before, None);
            return Err(e);
        }
        *usable = usable_mib;
        tracing::info!(id = %self.id, from_mib = before, to_mib = usable_mib, reserve_mib = reserve, "pod VM resized");
        Ok(())
    }

    fn resize_registration(
        &self,
        usable_mib: u32,
        reserve_mib: u32,
        limit: Option<crate::balloon::registry::Limit>,
    ) -> Result<()> {
        let mut reg = self
            .balloon_registration
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(reg) = reg.as_mut() {
            reg.resize(usable_mib, reserve_mib, limit)?;
        }
        Ok(())
    }

    /// Host processes of the VM.
    pub fn pids(&self) -> Vec<u32> {
        self.vm.lock().map(|vm| vm.pids()).unwrap_or_default()
    }

    /// Binds the host ends of a new process's streams (for
    /// [`crate::container`], which hands them to the agent).
    pub(crate) fn bind_streams(&self, wanted: StreamsWanted) -> std::io::Result<PendingStreams> {
        PendingStreams::bind(&self.vsock_path, &self.ports, wanted)
    }

    /// Resolves when the VM ends by itself.
    pub async fn exited(&self) -> VmExit {
        watch_exit(self.vm.clone()).await
    }

    /// Ends the VM, makes sure its processes are gone and its run
    /// directory removed.
    ///
    /// With a writable disk the guest powers off through the agent first,
    /// so its page cache reaches the disk. Without one there is nothing in
    /// the guest worth keeping (disks are read-only, a container's upper
    /// layer is a tmpfs, and its output has been drained by the time
    /// anyone stops the sandbox), so the VM is ended at once: a guest
    /// power-off costs a round trip and the guest's shutdown work, and
    /// under an emulated CPU that is tens of milliseconds.
    pub async fn stop(&self) -> VmExit {
        let vm = self.vm.clone();
        if !self.writable_disks {
            return tokio::task::spawn_blocking(move || {
                let Ok(mut vm) = vm.lock() else {
                    return VmExit::Stopped;
                };
                vm.stop(Duration::from_secs(2)).unwrap_or(VmExit::Stopped)
            })
            .await
            .unwrap_or(VmExit::Stopped);
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.agent.shutdown()).await;
        tokio::task::spawn_blocking(move || {
            let Ok(mut vm) = vm.lock() else {
                return VmExit::Stopped;
            };
            match vm.wait_timeout(Duration::from_secs(5)) {
                Ok(Some(exit)) => exit,
                _ => vm.stop(Duration::from_secs(2)).unwrap_or(VmExit::Stopped),
            }
        })
        .await
        .unwrap_or(VmExit::Stopped)
    }
}

/// What the guest of a VM booted with `present_mib` reports it has not
/// added (the host counts `absent_mib`). An agent that cannot say (an
/// older one, a kernel without hotplug) is logged: the VM runs, and cannot
/// grow past what it booted with.
async fn boot_absent(
    agent: &Agent,
    id: &str,
    absent_mib: u32,
    present_mib: u32,
) -> crate::hotplug::Absent {
    let reported_mib = match agent.add_memory(u64::MAX).await {
        Ok(mib) => mib,
        Err(e) => {
            tracing::warn!(id, error = %e, "the agent cannot add memory: the VM cannot grow past the {present_mib} MiB it booted with");
            0
        }
    };
    if reported_mib == 0 {
        tracing::warn!(id, present_mib, absent_mib, "the guest kernel has no RAM to add (no memory hotplug?): the VM cannot grow past what it booted with");
    }
    crate::hotplug::Absent {
        mib: absent_mib,
        reported_mib,
    }
}

/// Sets a balloon's size (a blocking call, on a thread of its own).
async fn set_balloon(balloon: Option<crate::balloon::BalloonHandle>, mib: u64) -> Result<()> {
    let balloon = balloon.ok_or_else(|| SandboxError::Io {
        what: "the VM's balloon".into(),
        source: std::io::Error::other("the VM has no balloon"),
    })?;
    tokio::task::spawn_blocking(move || balloon.set_target(mib))
        .await
        .map_err(|e| SandboxError::Io {
            what: "balloon task".into(),
            source: std::io::Error::other(e),
        })??;
    Ok(())
}

/// A run directory made for a sandbox that is still starting: removed on
/// drop unless the sandbox started.
struct RunDirGuard<'a> {
    path: &'a Path,
    keep: bool,
}

impl<'a> RunDirGuard<'a> {
    /// Makes the run directory, private, under the private state
    /// directory; one that exists already (a sandbox of the same name, a
    /// planted directory or symlink) is refused, never reused.
    fn create(state_dir: &Path, path: &'a Path) -> Result<Self> {
        crate::private_dir::ensure_root(state_dir)?;
        crate::private_dir::create_exclusive(path)?;
        Ok(Self { path, keep: false })
    }

    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for RunDirGuard<'_> {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = std::fs::remove_dir_all(self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the run directory");
            }
        }
    }
}

async fn watch_exit(vm: Arc<Mutex<Box<dyn Vm>>>) -> VmExit {
    loop {
        let done = vm
            .lock()
            .ok()
            .and_then(|mut vm| vm.try_wait().ok().flatten());
        if let Some(exit) = done {
            return exit;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
