//! One task: a container in its own sandbox VM. Create sizes and boots the
//! VM with the rootfs disk and creates the container through the agent;
//! every process gets a watcher that publishes TaskExit once its output is
//! copied out (or once the VM died); Delete stops the VM and removes all
//! the container made on the host.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsid_protocol::agent::{
    event, BlockLayer, CreateContainerRequest, ExecProcessRequest, Rootfs,
};
use capsid_sandbox::agent::{Agent, AgentError};
use capsid_sandbox::backend::{DiskSpec, VmExit};
use capsid_sandbox::config::Config;
use capsid_sandbox::image::RootfsCache;
use capsid_sandbox::network::{NetworkError, TapAttachment};
use capsid_sandbox::sandbox::{backend_for, Sandbox, SandboxError, SandboxOptions};
use capsid_sandbox::stdio::PendingStreams;
use containerd_shim_protos::events::task::{TaskExit, TaskOOM};
use futures::FutureExt;
use oci_spec::runtime::Spec;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::events::Events;
use crate::io::{IoError, ProcessIo, StdioPaths};
use crate::network;
use crate::process::{ExitInfo, Process, Status};
use crate::rootfs::{self, RootfsDisk, RootfsError, RootfsSource};
use crate::sizing::{self, SizingError, VmSize};
use crate::spec::{self, SpecError};
use crate::state::{ProcessRef, ShimState, StateError};

/// Serial of the rootfs disk in the guest.
const ROOTFS_SERIAL: &str = "capsid-rootfs";
/// Exit status reported when the VM died under a process.
pub const VM_FAULT_STATUS: u32 = 255;
/// How long output may take to be copied out after a process exited.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent may take to connect a process's streams.
const STREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the VM is checked for having died.
const VM_POLL: Duration = Duration::from_millis(100);
/// Where the merged layers are mounted while a disk is built.
const LOWERS_MOUNT: &str = "capsid-lowers";

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
    /// The state file failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The network could not be attached.
    #[error(transparent)]
    Network(#[from] NetworkError),
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
    sandbox: Mutex<Option<Sandbox>>,
    vm_exit: watch::Receiver<Option<VmExit>>,
    /// An OOM kill was published as TaskOOM already (the agent's event and
    /// a process's exit status both tell of it; containerd hears it once).
    oom_reported: Arc<AtomicBool>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    paused: AtomicBool,
    rootfs: Mutex<Option<RootfsDisk>>,
    network: Mutex<Option<TapAttachment>>,
    config: Config,
    events: Events,
    background: Mutex<Vec<JoinHandle<()>>>,
}

/// The sandbox's name: readable when short, a digest otherwise (it names
/// a run directory whose sockets must fit in a Unix socket path).
pub fn sandbox_name(namespace: &str, id: &str) -> String {
    let name = format!("{namespace}-{id}");
    if name.len() <= 48 {
        return name;
    }
    let digest = format!(
        "{:x}",
        Sha256::digest(format!("{namespace}/{id}").as_bytes())
    );
    format!("c-{}", &digest[..30])
}

/// What Create made so far, undone if it fails.
#[derive(Debug, Default)]
struct Partial {
    bundle: PathBuf,
    state: ShimState,
    rootfs: Option<RootfsDisk>,
    sandbox: Option<Sandbox>,
    network: Option<TapAttachment>,
}

impl Partial {
    async fn undo(mut self) {
        if let Some(sb) = self.sandbox.take() {
            sb.stop().await;
        }
        if let Some(att) = self.network.take() {
            network::detach(att).await;
        }
        release_rootfs(self.rootfs.take());
        if let Some(mp) = &self.state.mount_point {
            rootfs::unmount(mp);
        }
        let _ = std::fs::remove_dir_all(&self.state.run_dir);
        let _ = ShimState::remove(&self.bundle);
    }
}

/// Drops the disk lease; a disk made for this container alone is removed.
fn release_rootfs(disk: Option<RootfsDisk>) {
    if let Some(disk) = disk {
        let path = disk.prepared.path.clone();
        let scratch = disk.scratch;
        drop(disk);
        if scratch {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove rootfs disk");
            }
        }
    }
}

impl Container {
    /// Boots the sandbox and creates the container in it (its init is
    /// prepared, not started). On error nothing is left behind.
    pub async fn create(req: CreateRequest, config: Config, events: Events) -> Result<Arc<Self>> {
        let mut partial = Partial {
            bundle: req.bundle.clone(),
            ..Default::default()
        };
        match Self::create_in(&req, config, events, &mut partial).await {
            Ok(c) => Ok(c),
            Err(e) => {
                partial.undo().await;
                Err(e)
            }
        }
    }

    async fn create_in(
        req: &CreateRequest,
        config: Config,
        events: Events,
        partial: &mut Partial,
    ) -> Result<Arc<Self>> {
        let spec_path = req.bundle.join("config.json");
        let text = std::fs::read(&spec_path).map_err(|source| ContainerError::Bundle {
            path: spec_path.clone(),
            source,
        })?;
        let mut spec: Spec = serde_json::from_slice(&text)
            .map_err(|e| ContainerError::SpecParse(oci_spec::OciSpecError::SerDe(e)))?;
        let netns = network::netns_path(&spec);
        if let Some(path) = &netns {
            network::check_netns(path).map_err(|e| ContainerError::Invalid(e.to_string()))?;
        }
        // Read before adapt() drops the bind mount that carries it.
        let spec_dns = network::dns_from_spec(&spec);
        for change in spec::adapt(&mut spec)? {
            tracing::info!(container = %req.id, "{change}");
        }
        let size = sizing::vm_size(&spec, &config.vm)?;
        let balloon_policy = sizing::balloon_policy(&spec)?;
        req.stdio.validate()?;
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_else(|| PathBuf::from("rootfs"));
        let source = RootfsSource::from_mounts(&req.rootfs, &req.bundle.join(root))?;

        let name = sandbox_name(&req.namespace, &req.id);
        partial.state = ShimState {
            sandbox: name.clone(),
            run_dir: config.paths.state_dir.join(&name),
            mount_point: Some(req.bundle.join(LOWERS_MOUNT)),
            ..Default::default()
        };
        partial.state.save(&req.bundle)?;

        let disk = {
            let cache = RootfsCache::new(&config.paths.cache_dir);
            let (name, mount_point) = (name.clone(), req.bundle.join(LOWERS_MOUNT));
            tokio::task::spawn_blocking(move || {
                rootfs::prepare(&cache, &source, &name, &mount_point)
            })
            .await
            .map_err(|e| ContainerError::Internal(e.to_string()))??
        };
        if disk.scratch {
            partial.state.scratch_files.push(disk.prepared.path.clone());
        }
        partial.state.mount_point = None;
        partial.state.save(&req.bundle)?;
        let disk_spec = DiskSpec {
            path: disk.prepared.path.clone(),
            readonly: true,
            serial: ROOTFS_SERIAL.into(),
        };
        let fs_type = disk.prepared.fs_type.to_string();
        partial.rootfs = Some(disk);

        if let Some(path) = &netns {
            let record = network::record_for(path, &name);
            partial.state.network = Some(record.clone());
            partial.state.save(&req.bundle)?;
            partial.network = Some(network::attach(&record).await?);
        }
        let backend = backend_for(&config)?;
        let opts = SandboxOptions {
            id: name.clone(),
            vcpus: size.vcpus,
            memory_mib: size.memory_mib,
            disks: vec![disk_spec],
            net: partial.network.as_ref().map(TapAttachment::net_spec),
            kernel_args: Vec::new(),
            network: partial.network.as_ref().map(|a| a.guest.clone()),
            balloon_opt_out: !balloon_policy,
        };
        let sandbox = Sandbox::start(&config, backend, opts).await?;
        partial.state.vm_processes = sandbox
            .pids()
            .into_iter()
            .filter_map(ProcessRef::of)
            .collect();
        let timings = sandbox.timings;
        let pending = sandbox.bind_streams(req.stdio.wanted())?;
        let agent = sandbox.agent().clone();
        partial.sandbox = Some(sandbox);
        partial.state.save(&req.bundle)?;
        tracing::info!(
            container = %req.id,
            sandbox = %name,
            vcpus = size.vcpus,
            memory_mib = size.memory_mib,
            vm_spawned_ms = timings.vm_spawned.as_millis(),
            agent_connected_ms = timings.agent_connected.as_millis(),
            guest_boot_ms = timings.guest_boot_to_agent.as_millis(),
            "sandbox started"
        );

        let mut create = CreateContainerRequest::new();
        create.container_id = req.id.clone();
        create.oci_spec_json =
            serde_json::to_vec(&spec).map_err(|e| ContainerError::Internal(e.to_string()))?;
        let mut layer = BlockLayer::new();
        layer.disk_serial = ROOTFS_SERIAL.into();
        layer.fs_type = fs_type;
        let mut rootfs = Rootfs::new();
        rootfs.layers.push(layer);
        rootfs.readonly = spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false);
        create.rootfs = protobuf::MessageField::some(rootfs);
        create.stdio = protobuf::MessageField::some(pending.stdio.clone());
        let dns = spec_dns.or_else(|| {
            partial
                .network
                .as_ref()
                .map(|a| a.guest.dns.clone())
                .filter(|d| !d.is_empty())
        });
        if let Some(dns) = dns {
            create.dns_servers = dns.servers;
            create.dns_search = dns.search;
            create.dns_options = dns.options;
        }
        let (pid, streams) = with_streams(pending, agent.create_container(&create)).await?;
        let init = Process::new("", req.stdio.clone());
        init.set_pid(pid);
        init.set_io(ProcessIo::connect(&req.stdio, streams).await?);

        let sandbox = partial.sandbox.take();
        let (vm_tx, vm_exit) = watch::channel(None);
        let container = Arc::new(Self {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            init,
            size,
            agent,
            sandbox: Mutex::new(sandbox),
            vm_exit,
            oom_reported: Arc::new(AtomicBool::new(false)),
            execs: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
            rootfs: Mutex::new(partial.rootfs.take()),
            network: Mutex::new(partial.network.take()),
            config,
            events,
            background: Mutex::new(Vec::new()),
        });
        let monitor = tokio::spawn(monitor_vm(Arc::downgrade(&container), vm_tx));
        let oom = tokio::spawn(forward_oom(
            container.agent.clone(),
            container.id.clone(),
            container.events.clone(),
            container.oom_reported.clone(),
        ));
        if let Ok(mut bg) = container.background.lock() {
            bg.extend([monitor, oom]);
        }
        container.watch(container.init.clone());
        Ok(container)
    }

    /// The VM's host processes.
    pub fn vm_pids(&self) -> Vec<u32> {
        self.sandbox
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(Sandbox::pids))
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
        if exec_id.is_empty() {
            let pid = self.agent.start_process(&self.id, "").await?;
            process.set_started();
            return Ok(pid);
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
        let (pid, streams) =
            with_streams(pending, self.agent.start_process(&self.id, exec_id)).await?;
        process.set_pid(pid);
        process.set_io(ProcessIo::connect(&process.stdio, streams).await?);
        process.set_started();
        self.watch(process);
        Ok(pid)
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
            let pending = self.bind_streams(&process.stdio)?;
            let mut req = ExecProcessRequest::new();
            req.container_id = self.id.clone();
            req.exec_id = exec_id.to_string();
            req.oci_process_json = process_json.to_vec();
            req.stdio = protobuf::MessageField::some(pending.stdio.clone());
            self.agent.exec_process(&req).await?;
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

    fn bind_streams(&self, stdio: &StdioPaths) -> Result<PendingStreams> {
        let guard = self.sandbox.lock().map_err(|_| poisoned())?;
        let sandbox = guard
            .as_ref()
            .ok_or_else(|| ContainerError::FailedPrecondition("the sandbox is gone".into()))?;
        Ok(sandbox.bind_streams(stdio.wanted())?)
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

    /// Guest pids with their exec ids.
    pub async fn pids(&self) -> Result<Vec<(u32, String)>> {
        if self.vm_exit.borrow().is_some() || self.init.status() == Status::Stopped {
            return Ok(Vec::new());
        }
        Ok(self
            .agent
            .list_processes(&self.id)
            .await?
            .into_iter()
            .map(|p| (p.pid, p.exec_id))
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
        sizing::check_update(&resources, annotations, self.size)?;
        Ok(self
            .agent
            .update_container(&self.id, resources_json.to_vec())
            .await?)
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
        if let Some(sandbox) = sandbox {
            let exit = sandbox.stop().await;
            tracing::info!(container = %self.id, ?exit, "sandbox stopped");
        }
        let attachment = self.network.lock().ok().and_then(|mut n| n.take());
        if let Some(attachment) = attachment {
            network::detach(attachment).await;
        }
        release_rootfs(self.rootfs.lock().ok().and_then(|mut r| r.take()));
        self.evict_cache();
        ShimState::remove(&self.bundle)?;
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
                ExitInfo::from_agent(w.exit_status, w.exited_at_unix_ns)
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

/// Binds nothing new: accepts the agent's stream connections for `pending`
/// while `call` (CreateContainer or StartProcess, during which the agent
/// connects them) runs.
async fn with_streams<F>(
    pending: PendingStreams,
    call: F,
) -> Result<(u32, capsid_sandbox::stdio::Streams)>
where
    F: std::future::Future<Output = std::result::Result<u32, AgentError>>,
{
    let accept = tokio::spawn(pending.accept());
    let pid = match call.await {
        Ok(pid) => pid,
        Err(e) => {
            accept.abort();
            return Err(e.into());
        }
    };
    let streams = tokio::time::timeout(STREAM_TIMEOUT, accept)
        .await
        .map_err(|_| {
            ContainerError::Internal("the agent did not connect the process's stdio".into())
        })?
        .map_err(|e| ContainerError::Internal(e.to_string()))?
        .map_err(|e| ContainerError::Internal(format!("stdio: {e}")))?;
    Ok((pid, streams))
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

/// Forwards the agent's OOM events as TaskOOM.
async fn forward_oom(agent: Agent, id: String, events: Events, reported: Arc<AtomicBool>) {
    while let Ok(ev) = agent.next_event().await {
        if ev.container_id == id && matches!(ev.kind, Some(event::Kind::Oom(_))) {
            publish_oom(&events, &id, &reported);
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
    fn sandbox_names_fit_socket_paths() {
        assert_eq!(sandbox_name("default", "t1"), "default-t1");
        let long = "a".repeat(64);
        let name = sandbox_name("k8s.io", &long);
        assert_eq!(name.len(), 32);
        assert!(name.starts_with("c-"));
        assert_ne!(name, sandbox_name("other", &long));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = ContainerError::FailedPrecondition("container t is running: kill it first".into());
        assert_eq!(e.to_string(), "container t is running: kill it first");
        let e = ContainerError::NotFound("exec \"e1\" of t".into());
        assert_eq!(e.to_string(), "exec \"e1\" of t not found");
    }
}
