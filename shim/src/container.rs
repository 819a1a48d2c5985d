//! One task: a container in its own sandbox VM. Create (see
//! [`crate::create`]) boots the VM with the rootfs disk and creates the
//! container through the agent; every process gets a watcher that publishes
//! TaskExit once its output is copied out (or once the VM died); Delete
//! stops the VM and undoes the sandbox's record of what it made.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsid_protocol::agent::event;
use capsid_sandbox::agent::{Agent, AgentError};
use capsid_sandbox::backend::VmExit;
use capsid_sandbox::config::Config;
use capsid_sandbox::image::RootfsCache;
use capsid_sandbox::network::{own, NetworkError};
use capsid_sandbox::record::{self, HostRecord, RecordError, RecordFile};
use capsid_sandbox::sandbox::{Sandbox, SandboxError};
use containerd_shim_protos::events::task::{TaskExit, TaskOOM};
use futures::FutureExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::create::{self, LateNetwork, Plan};
use crate::events::Events;
use crate::hooks::{self, HostHooks};
use crate::io::{IoError, LogOwner, ProcessIo, StdioPaths};
use crate::pod::Pod;
use crate::pod_role::Role;
use crate::process::{ExitInfo, Process, Status};
use crate::rootfs::{RootfsDisk, RootfsError};
use crate::sizing::{self, SizingError, VmSize};
use crate::spec::SpecError;

/// Exit status reported when the VM died under a process.
pub const VM_FAULT_STATUS: u32 = 255;
/// How long output may take to be copied out after a process exited.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the VM is checked for having died.
const VM_POLL: Duration = Duration::from_millis(100);

/// Errors of container operations, by the kind containerd is told.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// No such process.
    #[error("{0} not found")]
    NotFound(String),
    /// It exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The request cannot be carried out in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request or the bundle is invalid.
    #[error("{0}")]
    Invalid(String),
    /// Reading the bundle failed.
    #[error("cannot read {}", path.display())]
    Bundle {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config.json does not parse.
    #[error("invalid config.json")]
    SpecParse(#[source] oci_spec::OciSpecError),
    /// The spec asks for what capsid cannot do.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The VM cannot be sized.
    #[error(transparent)]
    Sizing(#[from] SizingError),
    /// The rootfs cannot be made.
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    /// stdio cannot be wired.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The sandbox failed.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// Creating the container or a process in the sandbox failed.
    #[error(transparent)]
    Process(#[from] capsid_sandbox::container::ContainerError),
    /// The sandbox record cannot be written.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The network could not be attached.
    #[error(transparent)]
    Network(#[from] NetworkError),
    /// A hook failed.
    #[error(transparent)]
    Hook(#[from] crate::hooks::HookError),
    /// capsid's state or cache directory is not private.
    #[error(transparent)]
    Private(#[from] capsid_sandbox::private_dir::PrivateDirError),
    /// A volume cannot be shared with the VM.
    #[error(transparent)]
    Volume(#[from] capsid_sandbox::volumes::VolumeError),
    /// The guest's DNS relay could not be set up.
    #[error(transparent)]
    DnsRelay(#[from] capsid_sandbox::dns_relay::DnsRelayError),
    /// The spec names a network namespace capsid cannot use.
    #[error(transparent)]
    BadNetns(NetworkError),
    /// A host-side task failed.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result of container operations.
pub type Result<T> = std::result::Result<T, ContainerError>;

/// What Create is asked for.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// Container id.
    pub id: String,
    /// containerd namespace.
    pub namespace: String,
    /// The bundle directory.
    pub bundle: PathBuf,
    /// The rootfs mounts.
    pub rootfs: Vec<containerd_shim_protos::api::Mount>,
    /// The init's stdio.
    pub stdio: StdioPaths,
}

/// What differs between a container with a VM of its own and one added
/// to a pod's VM ([`Container::assemble`]).
struct Parts {
    init: Arc<Process>,
    size: VmSize,
    sandbox: Arc<Sandbox>,
    vm_exit: watch::Receiver<Option<VmExit>>,
    rootfs: Option<RootfsDisk>,
    pod: Option<Arc<Pod>>,
    member_of: Option<Arc<Pod>>,
    record: Option<RecordFile<HostRecord>>,
    late_network: Option<LateNetwork>,
}

/// A container in its sandbox.
#[derive(Debug)]
pub struct Container {
    /// Container id.
    pub id: String,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// The init process.
    pub init: Arc<Process>,
    /// The VM's size.
    pub size: VmSize,
    agent: Agent,
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    vm_exit: watch::Receiver<Option<VmExit>>,
    /// An OOM kill was published as TaskOOM already (the agent's event and
    /// a process's exit status both tell of it; containerd hears it once).
    oom_reported: Arc<AtomicBool>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    paused: AtomicBool,
    rootfs: Mutex<Option<RootfsDisk>>,
    /// The pod this task's VM is (a pod's sandbox task).
    pod: Option<Arc<Pod>>,
    /// The pod whose VM this container was added to (a pod's container).
    member_of: Option<Arc<Pod>>,
    /// What the sandbox made on the host, undone by [`Container::destroy`].
    record: Mutex<Option<RecordFile<HostRecord>>>,
    /// The sandbox's own network namespace, wired at the init's Start.
    late_network: Mutex<Option<LateNetwork>>,
    /// The spec's poststart and poststop hooks, run on the host.
    hooks: HostHooks,
    /// Whose output `binary://` loggers of execs get.
    log_owner: LogOwner,
    config: Config,
    events: Events,
    background: Mutex<Vec<JoinHandle<()>>>,
}

impl Container {
    /// Boots the sandbox and creates the container in it (its init is
    /// prepared, not started). On error nothing is left behind.
    pub async fn create(
        req: CreateRequest,
        config: Config,
        events: Events,
        pod: Option<Arc<Pod>>,
        warm: Option<crate::warm::WarmVm>,
    ) -> Result<Arc<Self>> {
        let (plan, warm) = match warm {
            Some(warm) => Self::plan_for_warm(&req, &config, warm).await?,
            None => (Plan::read(&req, &config)?, None),
        };
        if let Role::Member { sandbox_id } = &plan.role {
            let pod = pod.ok_or_else(|| {
                ContainerError::NotFound(format!(
                    "pod sandbox {sandbox_id} of container {} in this shim",
                    req.id
                ))
            })?;
            return Self::add_to_pod(req, plan, config, events, pod).await;
        }
        let made = match warm {
            Some(warm) => create::make_warm(&req, &plan, &config, warm).await,
            None => create::make(&req, &plan, &config).await,
        };
        let made = match made {
            Ok(made) => made,
            Err(e) => {
                // As runc does: a Create that failed still runs poststop
                // (a CNI hook's teardown of what its createRuntime made).
                hooks::poststop_detached(&plan.hooks, &req.id, &req.bundle, 0).await;
                return Err(e);
            }
        };
        let init = Process::new("", req.stdio.clone());
        // containerd's clients read task pids on the host (Docker joins
        // /proc/<pid>/ns/net, `docker top` runs ps): the task's pid is the
        // VM's main process, as Kata gives the hypervisor's.
        let host_pid = made.host_pid;
        tracing::info!(container = %req.id, guest_pid = made.pid, host_pid, "container created");
        init.set_pid(host_pid);
        init.set_io(made.io);
        let (pod, vm_tx, vm_exit) = match made.pod {
            Some((pod, tx)) => {
                let rx = pod.vm_exit.clone();
                (Some(pod), tx, rx)
            }
            None => {
                let (tx, rx) = watch::channel(None);
                (None, tx, rx)
            }
        };
        let container = Self::assemble(
            &req,
            plan.hooks,
            config,
            events,
            Parts {
                init,
                size: plan.size,
                sandbox: made.sandbox,
                vm_exit,
                rootfs: made.rootfs,
                pod,
                member_of: None,
                record: Some(made.record),
                late_network: made.late_network,
            },
        );
        let monitor = tokio::spawn(monitor_vm(Arc::downgrade(&container), vm_tx));
        let oom_targets = match &container.pod {
            Some(pod) => pod.oom_targets.clone(),
            None => Arc::new(Mutex::new(HashMap::new())),
        };
        if let Ok(mut t) = oom_targets.lock() {
            t.insert(container.id.clone(), container.oom_reported.clone());
        }
        // One reader of the VM's events: a pod's containers are told of
        // theirs by the pod sandbox's.
        let oom = tokio::spawn(forward_oom(
            container.agent.clone(),
            oom_targets,
            container.events.clone(),
        ));
        if let Ok(mut bg) = container.background.lock() {
            bg.extend([monitor, oom]);
        }
        container.watch(container.init.clone());
        Ok(container)
    }

    /// The plan for `req` with a pooled sandbox, and the sandbox if the
    /// container can take it: a container of its own VM whose size fits
    /// the sandbox's shape ([`capsid_sandbox::pool::Shape::fits`]) and
    /// that stays in the balloon policy (as pooled sandboxes are). Otherwise the sandbox is discarded, the log says
    /// why, and the plan is a cold boot's.
    async fn plan_for_warm(
        req: &CreateRequest,
        config: &Config,
        warm: crate::warm::WarmVm,
    ) -> Result<(Plan, Option<crate::warm::WarmVm>)> {
        let plan = Plan::read_pooled(req, config)?;
        let why_not = if !matches!(plan.role, Role::Single) {
            Some("a pod's task boots its own VM".to_string())
        } else if !warm.shape.fits(plan.size.vcpus, plan.size.memory_mib) {
            Some(format!(
                "the container needs {} vCPUs and {} MiB, the pooled sandbox has {} vCPUs and up to {} MiB",
                plan.size.vcpus, plan.size.memory_mib, warm.shape.vcpus, warm.shape.max_memory_mib
            ))
        } else if !plan.balloon_policy {
            Some(
                "the container opts out of the balloon policy, which pooled sandboxes are in"
                    .into(),
            )
        } else {
            None
        };
        let Some(why) = why_not else {
            return Ok((plan, Some(warm)));
        };
        tracing::info!(container = %req.id, sandbox = %warm.name, reason = %why, "pooled sandbox not used: booting cold");
        warm.discard().await;
        Ok((Plan::read(req, config)?, None))
    }

    /// Adds the container of `req` to `pod`'s running VM.
    async fn add_to_pod(
        req: CreateRequest,
        plan: Plan,
        config: Config,
        events: Events,
        pod: Arc<Pod>,
    ) -> Result<Arc<Self>> {
        let added = match crate::pod::add(&pod, &req, &plan, false, None).await {
            Ok(added) => added,
            Err(e) => {
                hooks::poststop_detached(&plan.hooks, &req.id, &req.bundle, 0).await;
                return Err(e);
            }
        };
        let host_pid = pod.sandbox.vm_pid().unwrap_or(0);
        tracing::info!(container = %req.id, pod = %pod.id, guest_pid = added.pid, host_pid, "container added to its pod's VM");
        let init = Process::new("", req.stdio.clone());
        init.set_pid(host_pid);
        init.set_io(added.io);
        let container = Self::assemble(
            &req,
            plan.hooks,
            config,
            events,
            Parts {
                init,
                size: pod.size,
                sandbox: pod.sandbox.clone(),
                vm_exit: pod.vm_exit.clone(),
                rootfs: None,
                pod: None,
                member_of: Some(pod.clone()),
                record: added.record,
                late_network: None,
            },
        );
        if let Ok(mut t) = pod.oom_targets.lock() {
            t.insert(container.id.clone(), container.oom_reported.clone());
        }
        container.watch(container.init.clone());
        Ok(container)
    }

    /// A container of `req` from its `parts` (what differs between a
    /// container in a VM of its own and one added to a pod's).
    fn assemble(
        req: &CreateRequest,
        hooks: HostHooks,
        config: Config,
        events: Events,
        parts: Parts,
    ) -> Arc<Self> {
        Arc::new(Self {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            init: parts.init,
            size: parts.size,
            agent: parts.sandbox.agent().clone(),
            sandbox: Mutex::new(Some(parts.sandbox)),
            vm_exit: parts.vm_exit,
            oom_reported: Arc::new(AtomicBool::new(false)),
            execs: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
            rootfs: Mutex::new(parts.rootfs),
            pod: parts.pod,
            member_of: parts.member_of,
            record: Mutex::new(parts.record),
            late_network: Mutex::new(parts.late_network),
            hooks,
            log_owner: LogOwner {
                id: req.id.clone(),
                namespace: req.namespace.clone(),
            },
            config,
            events,
            background: Mutex::new(Vec::new()),
        })
    }

    /// The pod whose VM this task is, if it is a pod's sandbox.
    pub fn pod(&self) -> Option<Arc<Pod>> {
        self.pod.clone()
    }

    /// The running sandbox.
    fn sandbox(&self) -> Result<Arc<Sandbox>> {
        self.sandbox
            .lock()
            .map_err(|_| poisoned())?
            .clone()
            .ok_or_else(|| ContainerError::FailedPrecondition("the sandbox is gone".into()))
    }

    /// The VM's host processes.
    pub fn vm_pids(&self) -> Vec<u32> {
        self.sandbox
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|s| s.pids()))
            .unwrap_or_default()
    }

    /// The init (empty `exec_id`) or an exec process.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .ok()
            .and_then(|e| e.get(exec_id).cloned())
            .ok_or_else(|| ContainerError::NotFound(format!("exec {exec_id:?} of {}", self.id)))
    }

    /// Whether the container is frozen.
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Starts the init or a prepared exec; returns its pid.
    pub async fn start(self: &Arc<Self>, exec_id: &str) -> Result<u32> {
        let process = self.process(exec_id)?;
        if process.status() != Status::Created {
            return Err(ContainerError::FailedPrecondition(format!(
                "process {exec_id:?} of {} was started already",
                self.id
            )));
        }
        let sandbox = self.sandbox()?;
        if exec_id.is_empty() {
            self.wire_late_network(&sandbox).await?;
            let guest_pid = sandbox.start_init(&self.id).await?;
            tracing::debug!(container = %self.id, guest_pid, "init started");
            process.set_started();
            self.run_hooks("poststart", "running").await;
            return Ok(process.pid());
        }
        if self.init.status() != Status::Running {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {} is not running",
                self.id
            )));
        }
        let pending = process.take_pending().ok_or_else(|| {
            ContainerError::FailedPrecondition(format!("exec {exec_id:?} is being started"))
        })?;
        let (guest_pid, streams) = sandbox.start_exec(&self.id, pending).await?;
        tracing::debug!(container = %self.id, exec_id, guest_pid, "exec started");
        let pid = self.init.pid();
        process.set_pid(pid);
        process.set_io(ProcessIo::connect(&process.stdio, streams, &self.log_owner).await?);
        process.set_started();
        self.watch(process);
        Ok(pid)
    }

    /// Runs the poststart or poststop hooks; failures are logged (as runc
    /// does, they do not undo what happened).
    async fn run_hooks(&self, stage: &'static str, status: &'static str) {
        let hooks = match stage {
            "poststart" => &self.hooks.poststart,
            _ => &self.hooks.poststop,
        };
        if hooks.is_empty() {
            return;
        }
        let (all, list) = (self.hooks.clone(), hooks.clone());
        let (id, bundle, pid) = (self.id.clone(), self.bundle.clone(), self.init.pid());
        let ran = tokio::task::spawn_blocking(move || {
            hooks::run_logged(stage, &list, &all.state(&id, status, pid, &bundle));
        })
        .await;
        if let Err(e) = ran {
            tracing::warn!(container = %self.id, stage, error = %e, "hook task");
        }
    }

    /// Joins the VM's NIC to the interface that appeared in the sandbox's
    /// own network namespace since Create (dockerd's veth), and has the
    /// guest take its MAC, addresses and routes. Nothing came: no network.
    async fn wire_late_network(&self, sandbox: &Sandbox) -> Result<()> {
        let Some(late) = self.late_network.lock().map_err(|_| poisoned())?.take() else {
            return Ok(());
        };
        let (netns, tap) = (late.netns.clone(), late.tap.clone());
        let joined = tokio::task::spawn_blocking(move || own::join_late(&netns, &tap))
            .await
            .map_err(|e| ContainerError::Internal(format!("network join task: {e}")))??;
        let Some(attachment) = joined else {
            tracing::info!(container = %self.id, netns = %late.netns.display(), "no interface came: the VM has no network");
            return Ok(());
        };
        sandbox
            .configure_late_network(&attachment.guest, &late.boot_mac)
            .await?;
        Ok(())
    }

    /// Prepares an exec process (`process_json`: an OCI process).
    pub async fn exec(&self, exec_id: &str, process_json: &[u8], stdio: StdioPaths) -> Result<()> {
        if self.init.status() == Status::Stopped {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {} has exited",
                self.id
            )));
        }
        if exec_id.is_empty() {
            return Err(ContainerError::Invalid("empty exec id".into()));
        }
        serde_json::from_slice::<oci_spec::runtime::Process>(process_json)
            .map_err(|e| ContainerError::Invalid(format!("exec process spec: {e}")))?;
        stdio.validate()?;
        let process = Process::new(exec_id, stdio);
        {
            let mut execs = self.execs.lock().map_err(|_| poisoned())?;
            if execs.contains_key(exec_id) {
                return Err(ContainerError::AlreadyExists(format!("exec {exec_id:?}")));
            }
            execs.insert(exec_id.to_string(), process.clone());
        }
        let prepared = async {
            let pending = self
                .sandbox()?
                .prepare_exec(&self.id, exec_id, process_json, process.stdio.wanted())
                .await?;
            process.set_pending(pending);
            Ok(())
        }
        .await;
        if prepared.is_err() {
            if let Ok(mut execs) = self.execs.lock() {
                execs.remove(exec_id);
            }
        }
        prepared
    }

    /// Signals a process (or, with `all`, every process of the container).
    pub async fn kill(&self, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let process = self.process(exec_id)?;
        if !all && process.status() == Status::Stopped {
            return Err(ContainerError::NotFound("process already finished".into()));
        }
        if self.vm_exit.borrow().is_some() {
            return Err(ContainerError::NotFound("the sandbox VM has exited".into()));
        }
        Ok(self
            .agent
            .signal_process(&self.id, exec_id, signal, all)
            .await?)
    }

    /// Freezes or thaws the container (cgroup freezer in the guest).
    pub async fn pause(&self, paused: bool) -> Result<()> {
        if self.init.status() != Status::Running {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {} is not running",
                self.id
            )));
        }
        self.agent.pause_container(&self.id, paused).await?;
        self.paused.store(paused, Ordering::Relaxed);
        Ok(())
    }

    /// Resizes a process's terminal.
    pub async fn resize(&self, exec_id: &str, width: u32, height: u32) -> Result<()> {
        self.process(exec_id)?;
        Ok(self
            .agent
            .resize_pty(&self.id, exec_id, height, width)
            .await?)
    }

    /// CloseIO: EOF on the process's stdin once what was written is in.
    pub fn close_stdin(&self, exec_id: &str) -> Result<()> {
        if let Some(io) = self.process(exec_id)?.io() {
            io.close_stdin();
        }
        Ok(())
    }

    /// The container's processes as the host sees them: the VM's (its main
    /// process first), since the host's tools (`docker top`, `ctr task
    /// ps`) look these pids up on the host.
    pub fn pids(&self) -> Result<Vec<(u32, String)>> {
        if self.vm_exit.borrow().is_some() || self.init.status() == Status::Stopped {
            return Ok(Vec::new());
        }
        Ok(self
            .vm_pids()
            .into_iter()
            .map(|pid| (pid, String::new()))
            .collect())
    }

    /// cgroup statistics of the container.
    pub async fn stats(&self) -> Result<capsid_protocol::agent::StatsResponse> {
        Ok(self.agent.stats(&self.id).await?)
    }

    /// New cgroup limits (OCI `linux.resources` JSON), within the VM's size.
    pub async fn update(
        &self,
        resources_json: &[u8],
        annotations: &HashMap<String, String>,
    ) -> Result<()> {
        let resources: oci_spec::runtime::LinuxResources =
            serde_json::from_slice(resources_json)
                .map_err(|e| ContainerError::Invalid(format!("resources: {e}")))?;
        let Some(pod) = &self.member_of else {
            sizing::check_update(&resources, annotations, self.size)?;
            return Ok(self
                .agent
                .update_container(&self.id, resources_json.to_vec())
                .await?);
        };
        // In a pod, a higher memory limit grows the pod's VM first.
        sizing::check_update_in_pod(&resources, annotations, self.size)?;
        let limit = sizing::memory_limit_mib(&resources);
        let before = pod.memory_limit(&self.id).await;
        if limit.is_some() {
            pod.fit_memory(&self.id, limit).await?;
        }
        let updated = self
            .agent
            .update_container(&self.id, resources_json.to_vec())
            .await;
        if updated.is_err() && limit.is_some() {
            pod.put_memory_limit(&self.id, before).await;
        }
        Ok(updated?)
    }

    /// Removes a stopped (or never started) exec process.
    pub fn delete_exec(&self, exec_id: &str) -> Result<Arc<Process>> {
        let process = self.process(exec_id)?;
        if process.status() == Status::Running {
            return Err(ContainerError::FailedPrecondition(format!(
                "exec {exec_id:?} is still running"
            )));
        }
        process.abandon();
        if let Ok(mut execs) = self.execs.lock() {
            execs.remove(exec_id);
        }
        Ok(process)
    }

    /// Stops the VM and removes everything the container made on the host.
    /// Refused while the init runs, unless `force`.
    pub async fn destroy(&self, force: bool) -> Result<()> {
        if !force && self.init.status() == Status::Running {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {} is running: kill it first",
                self.id
            )));
        }
        if let Ok(mut bg) = self.background.lock() {
            for task in bg.drain(..) {
                task.abort();
            }
        }
        let execs: Vec<Arc<Process>> = self
            .execs
            .lock()
            .map(|mut e| e.drain().map(|(_, p)| p).collect())
            .unwrap_or_default();
        for p in execs.iter().chain(std::iter::once(&self.init)) {
            p.abandon();
        }
        let sandbox = self.sandbox.lock().ok().and_then(|mut s| s.take());
        if let Some(pod) = &self.member_of {
            // The VM is the pod's: only this container leaves it.
            if let Ok(mut t) = pod.oom_targets.lock() {
                t.remove(&self.id);
            }
            pod.put_memory_limit(&self.id, None).await;
            if let Some(sandbox) = sandbox.filter(|_| self.vm_exit.borrow().is_none()) {
                if let Err(e) = sandbox.remove_container(&self.id).await {
                    tracing::warn!(container = %self.id, pod = %pod.id, error = %crate::describe(&e), "cannot remove the container from its pod's VM");
                }
            }
            self.run_hooks("poststop", "stopped").await;
        } else if let Some(sandbox) = sandbox {
            if let Some(pod) = &self.pod {
                pod.stop_taking();
            }
            let exit = sandbox.stop().await;
            tracing::info!(container = %self.id, ?exit, "sandbox stopped");
            // Before the undo: the namespace the hooks tear down is still there.
            self.run_hooks("poststop", "stopped").await;
        }
        // The disk lease goes before the record's undo removes a disk made
        // for this container alone.
        drop(self.rootfs.lock().ok().and_then(|mut r| r.take()));
        let file = self.record.lock().ok().and_then(|mut r| r.take());
        if let Some(file) = file {
            let host = file.record().clone();
            let undone = tokio::task::spawn_blocking(move || record::undo(&host))
                .await
                .map_err(|e| ContainerError::Internal(format!("teardown task: {e}")))?;
            // What could not be removed stays recorded for containerd's
            // `delete` to retry.
            if undone.errors.is_empty() {
                RecordFile::<HostRecord>::remove(file.path())?;
            }
        }
        self.evict_cache();
        Ok(())
    }

    fn evict_cache(&self) {
        let limit_mib = self.config.cache.max_size_mib;
        if limit_mib == 0 {
            return;
        }
        let cache = RootfsCache::new(&self.config.paths.cache_dir);
        match cache.evict_to(limit_mib.saturating_mul(1 << 20)) {
            Ok(report) if !report.removed.is_empty() => {
                tracing::info!(
                    removed = report.removed.len(),
                    freed = report.freed_bytes,
                    "cache evicted"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %crate::describe(&e), "cache eviction failed"),
        }
    }

    /// Starts the task that reports `process`'s exit.
    fn watch(self: &Arc<Self>, process: Arc<Process>) {
        let container = self.clone();
        let p = process.clone();
        let task = tokio::spawn(async move {
            let info = container.wait_exit(&p).await;
            if let Some(io) = p.io() {
                io.finish(OUTPUT_DRAIN_TIMEOUT).await;
            }
            p.set_exited(info);
            // A pod whose pause container ended is stopping: it takes no
            // more containers (the CRI plugin tears it down next).
            if p.exec_id.is_empty() {
                if let Some(pod) = &container.pod {
                    pod.stop_taking();
                }
            }
            tracing::info!(container = %container.id, exec = %p.exec_id, status = info.status, "process exited");
            container.events.publish(TaskExit {
                container_id: container.id.clone(),
                id: if p.exec_id.is_empty() {
                    container.id.clone()
                } else {
                    p.exec_id.clone()
                },
                pid: p.pid(),
                exit_status: info.status,
                exited_at: protobuf::MessageField::some(info.timestamp()),
                ..Default::default()
            });
        });
        process.set_watcher(task);
    }

    /// The process's exit from the agent, or a VM-level fault.
    async fn wait_exit(&self, p: &Process) -> ExitInfo {
        let mut vm_exit = self.vm_exit.clone();
        let waited = tokio::select! {
            waited = self.agent.wait_process(&self.id, &p.exec_id) => waited,
            exit = vm_exit.wait_for(Option::is_some) => {
                let exit = exit.map(|e| *e).ok().flatten();
                tracing::error!(container = %self.id, exec = %p.exec_id, ?exit, "the sandbox VM died under the process");
                return ExitInfo::from_agent(VM_FAULT_STATUS as i32, 0);
            }
        };
        match waited {
            Ok(w) => {
                // The exit can overtake the agent's OOM event: make sure
                // containerd hears of the OOM kill before the exit.
                if w.oom_killed {
                    publish_oom(&self.events, &self.id, &self.oom_reported);
                }
                // The time is the host's: the guest's wall clock is only
                // as good as its boot-time RTC read (a second, under an
                // emulated CPU), and an exit must not come before the
                // start the host stamped.
                ExitInfo::from_agent(w.exit_status, 0)
            }
            Err(e) => {
                // The connection to the agent broke: the VM is going down.
                let exit =
                    tokio::time::timeout(Duration::from_secs(5), vm_exit.wait_for(Option::is_some))
                        .await
                        .ok()
                        .and_then(|e| e.ok().and_then(|e| *e));
                tracing::error!(container = %self.id, exec = %p.exec_id, error = %e, ?exit, "lost the process's exit");
                ExitInfo::from_agent(VM_FAULT_STATUS as i32, 0)
            }
        }
    }
}

/// Watches the VM: publishes its end to the process watchers.
async fn monitor_vm(container: std::sync::Weak<Container>, tx: watch::Sender<Option<VmExit>>) {
    loop {
        tokio::time::sleep(VM_POLL).await;
        let Some(container) = container.upgrade() else {
            return;
        };
        let exit = {
            let Ok(guard) = container.sandbox.lock() else {
                return;
            };
            match guard.as_ref() {
                Some(sandbox) => sandbox.exited().now_or_never(),
                None => return,
            }
        };
        if let Some(exit) = exit {
            tracing::warn!(container = %container.id, ?exit, "the sandbox VM ended");
            let _ = tx.send(Some(exit));
            return;
        }
    }
}

/// Who is told of OOM kills in a VM: container id → its reported flag.
pub type OomTargets = Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>;

/// Forwards the agent's OOM events as TaskOOM, for the VM's containers.
async fn forward_oom(agent: Agent, targets: OomTargets, events: Events) {
    while let Ok(ev) = agent.next_event().await {
        if !matches!(ev.kind, Some(event::Kind::Oom(_))) {
            continue;
        }
        let reported = targets
            .lock()
            .ok()
            .and_then(|t| t.get(&ev.container_id).cloned());
        if let Some(reported) = reported {
            publish_oom(&events, &ev.container_id, &reported);
        }
    }
}

/// Publishes TaskOOM for container `id`, once.
fn publish_oom(events: &Events, id: &str, reported: &AtomicBool) {
    if reported.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    tracing::warn!(container = %id, "OOM kill in the container");
    events.publish(TaskOOM {
        container_id: id.to_string(),
        ..Default::default()
    });
}

fn poisoned() -> ContainerError {
    ContainerError::Internal("container state lock poisoned".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_is_wrong() {
        let e = ContainerError::FailedPrecondition("container t is running: kill it first".into());
        assert_eq!(e.to_string(), "container t is running: kill it first");
        let e = ContainerError::NotFound("exec \"e1\" of t".into());
        assert_eq!(e.to_string(), "exec \"e1\" of t not found");
    }
}
