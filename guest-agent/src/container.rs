//! Containers and their processes: what the agent's API does, independent
//! of ttrpc (server.rs only translates).

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio as ProcStdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capsid_protocol::agent::{event, Event, OomKilled, ProcessExited, Rootfs, Stdio};
use libcontainer::container::Container as LcContainer;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use tokio::sync::{watch, Notify};

use crate::reaper::{Exit, Reaper};
use crate::rootfs::{self, BundleDirs};
use crate::runtime::{Invocation, Job, STATE_ROOT};
use crate::stats;
use crate::stdio::{self, Streams, TtyPump};

/// The cgroup v2 parent of every container.
const CGROUP_PARENT: &str = "/capsid";
/// Events kept for the host at most; older ones are dropped.
const MAX_EVENTS: usize = 1024;
/// How long the runtime may take to hand over a pty.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of container operations, by kind (server.rs maps them to ttrpc codes).
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// No such container or process.
    #[error("{0} not found")]
    NotFound(String),
    /// It exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The request is malformed.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The request does not fit the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Something failed inside the guest.
    #[error("{0}")]
    Internal(String),
}

/// Result of container operations.
pub type Result<T> = std::result::Result<T, ContainerError>;

/// Debug-level phase timings of one container operation, on the guest's
/// CLOCK_MONOTONIC (see `CAPSID_AGENT_LOG` in main.rs).
struct Laps {
    what: &'static str,
    id: String,
    last: u64,
}

impl Laps {
    fn new(what: &'static str, id: &str) -> Self {
        Self {
            what,
            id: id.to_string(),
            last: crate::monotonic_ns(),
        }
    }

    /// Logs the time since the previous lap as `step`.
    fn lap(&mut self, step: &str) {
        let now = crate::monotonic_ns();
        tracing::debug!(
            op = self.what,
            container = %self.id,
            step,
            ms = now.saturating_sub(self.last) as f64 / 1e6,
            at_ms = now as f64 / 1e6,
            "lap"
        );
        self.last = now;
    }
}

fn internal(context: &str, e: &dyn std::error::Error) -> ContainerError {
    ContainerError::Internal(format!("{context}: {}", crate::describe(e)))
}

/// How a process ended, as reported to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, or 128+N after signal N.
    pub status: i32,
    /// Unix time of the exit, in nanoseconds.
    pub at_unix_ns: u64,
    /// Killed by the cgroup OOM killer.
    pub oom_killed: bool,
}

struct PendingExec {
    spec_path: PathBuf,
    stdio: Stdio,
}

/// One process of a container (the init, or an exec).
struct Process {
    exec_id: String,
    pid: Mutex<Option<i32>>,
    exit: watch::Sender<Option<ExitInfo>>,
    pending: Mutex<Option<PendingExec>>,
    tty: Mutex<Option<Arc<Mutex<TtyPump>>>>,
}

impl Process {
    fn new(exec_id: &str) -> Arc<Self> {
        Arc::new(Self {
            exec_id: exec_id.to_string(),
            pid: Mutex::new(None),
            exit: watch::channel(None).0,
            pending: Mutex::new(None),
            tty: Mutex::new(None),
        })
    }

    fn pid(&self) -> Option<i32> {
        self.pid.lock().ok().and_then(|p| *p)
    }

    fn exited(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }
}

/// One container.
struct Container {
    id: String,
    dirs: BundleDirs,
    cgroup: PathBuf,
    processes: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        self.processes
            .lock()
            .ok()
            .and_then(|p| p.get(exec_id).cloned())
            .ok_or_else(|| ContainerError::NotFound(format!("process {exec_id:?} of {}", self.id)))
    }

    /// Pids in the container's cgroup.
    fn cgroup_pids(&self) -> Vec<i32> {
        fs::read_to_string(self.cgroup.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

/// The queue of events the host long-polls.
#[derive(Default)]
struct Events {
    queue: Mutex<VecDeque<Event>>,
    ready: Notify,
}

/// The agent's state: every container of this guest.
pub struct Agent {
    reaper: Reaper,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    events: Events,
    /// Boot facts for Health.
    pub boot: crate::BootInfo,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").finish_non_exhaustive()
    }
}

fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Request to create a container.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// Container id.
    pub id: String,
    /// config.json bytes.
    pub spec_json: Vec<u8>,
    /// The rootfs disks.
    pub rootfs: Rootfs,
    /// Stdio wiring.
    pub stdio: Stdio,
    /// resolv.conf servers.
    pub dns_servers: Vec<String>,
    /// resolv.conf search domains.
    pub dns_search: Vec<String>,
    /// resolv.conf options.
    pub dns_options: Vec<String>,
}

impl Agent {
    /// A new agent state using `reaper` for child exits.
    pub fn new(reaper: Reaper, boot: crate::BootInfo) -> Self {
        Self {
            reaper,
            containers: Mutex::new(HashMap::new()),
            events: Events::default(),
            boot,
        }
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.containers
            .lock()
            .ok()
            .and_then(|c| c.get(id).cloned())
            .ok_or_else(|| ContainerError::NotFound(format!("container {id:?}")))
    }

    fn push_event(&self, ev: Event) {
        if let Ok(mut q) = self.events.queue.lock() {
            q.push_back(ev);
            while q.len() > MAX_EVENTS {
                q.pop_front();
            }
        }
        self.events.ready.notify_one();
    }

    /// The next event (waits for one).
    pub async fn next_event(&self) -> Event {
        loop {
            let notified = self.events.ready.notified();
            if let Some(ev) = self
                .events
                .queue
                .lock()
                .ok()
                .and_then(|mut q| q.pop_front())
            {
                return ev;
            }
            notified.await;
        }
    }

    /// Prepares the container: rootfs, bundle, init process created but not
    /// started. Returns the init's pid.
    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> Result<u32> {
        if !rootfs::valid_id(&req.id) {
            return Err(ContainerError::Invalid(format!(
                "container id {:?}",
                req.id
            )));
        }
        let mut spec: Spec = serde_json::from_slice(&req.spec_json)
            .map_err(|e| ContainerError::Invalid(format!("OCI spec: {e}")))?;
        {
            let mut containers = self.containers.lock().map_err(|_| poisoned())?;
            if containers.contains_key(&req.id) {
                return Err(ContainerError::AlreadyExists(format!(
                    "container {:?}",
                    req.id
                )));
            }
            // Reserve the id while the slow part runs.
            containers.insert(
                req.id.clone(),
                Arc::new(Container {
                    id: req.id.clone(),
                    dirs: BundleDirs::new(&req.id),
                    cgroup: PathBuf::from("/sys/fs/cgroup")
                        .join(CGROUP_PARENT.trim_start_matches('/'))
                        .join(&req.id),
                    processes: Mutex::new(HashMap::new()),
                }),
            );
        }
        match self.create_inner(&req, &mut spec).await {
            Ok(pid) => Ok(pid),
            Err(e) => {
                if let Ok(mut c) = self.containers.lock() {
                    c.remove(&req.id);
                }
                rootfs::teardown(&req.id);
                let _ = fs::remove_dir_all(Path::new(STATE_ROOT).join(&req.id));
                Err(e)
            }
        }
    }

    async fn create_inner(self: &Arc<Self>, req: &CreateRequest, spec: &mut Spec) -> Result<u32> {
        let container = self.container(&req.id)?;
        let mut laps = Laps::new("create", &req.id);
        let id = req.id.clone();
        let rootfs_spec = req.rootfs.clone();
        let dirs = tokio::task::spawn_blocking(move || rootfs::assemble(&id, &rootfs_spec))
            .await
            .map_err(|e| internal("rootfs task", &e))?
            .map_err(|e| match e {
                rootfs::RootfsError::NoSuchDisk(_) | rootfs::RootfsError::Invalid(_) => {
                    ContainerError::Invalid(e.to_string())
                }
                other => internal("assembling the rootfs", &other),
            })?;
        laps.lap("rootfs");
        let hostname = spec.hostname().clone().unwrap_or_default();
        rootfs::write_etc(
            &dirs.rootfs,
            &hostname,
            &req.dns_servers,
            &req.dns_search,
            &req.dns_options,
        )
        .map_err(|e| match e {
            rootfs::RootfsError::Invalid(_) => ContainerError::Invalid(e.to_string()),
            other => internal("writing /etc", &other),
        })?;

        adapt_spec(spec, &dirs.rootfs, &req.id, req.stdio.terminal)?;
        check_program(spec, &dirs.rootfs)?;
        let config = dirs.bundle.join("config.json");
        spec.save(&config)
            .map_err(|e| internal("writing config.json", &e))?;
        laps.lap("etc+spec");

        let process = Process::new("");
        container
            .processes
            .lock()
            .map_err(|_| poisoned())?
            .insert(String::new(), process.clone());
        let job = Job::Create {
            id: req.id.clone(),
            bundle: dirs.bundle.clone(),
        };
        let pid = self
            .run_runtime(&container, &process, job, &req.stdio)
            .await?;
        laps.lap("runtime");
        Ok(u32::try_from(pid).unwrap_or(0))
    }

    /// Runs the runtime helper for `job` with the process's stdio, records
    /// the pid and starts watching for its exit.
    async fn run_runtime(
        self: &Arc<Self>,
        container: &Arc<Container>,
        process: &Arc<Process>,
        job: Job,
        stdio_spec: &Stdio,
    ) -> Result<i32> {
        let bundle = container.dirs.bundle.clone();
        let tag = if process.exec_id.is_empty() {
            "init".to_string()
        } else {
            process.exec_id.clone()
        };
        let result = bundle.join(format!("result-{tag}"));
        let mut laps = Laps::new("runtime", &container.id);
        // The spec the job runs was given this flag (adapt_spec for the
        // init process, the exec's process.json for the others).
        let terminal = stdio_spec.terminal;
        let stdio_spec = stdio_spec.clone();
        let streams = tokio::task::spawn_blocking(move || stdio::connect_streams(&stdio_spec))
            .await
            .map_err(|e| internal("stdio task", &e))?
            .map_err(|e| ContainerError::FailedPrecondition(crate::describe(&e)))?;
        laps.lap("stdio connected");
        let console = if terminal {
            let path = stdio::console_socket_path(&bundle, &process.exec_id);
            let _ = fs::remove_file(&path);
            let listener = std::os::unix::net::UnixListener::bind(&path)
                .map_err(|e| internal("console socket", &e))?;
            Some((path, listener))
        } else {
            None
        };
        let inv = Invocation {
            job,
            result: result.clone(),
            console_socket: console.as_ref().map(|(p, _)| p.clone()),
        };
        let mut cmd = Command::new("/proc/self/exe");
        cmd.args(inv.to_args());
        let tty_streams = if terminal {
            cmd.stdin(ProcStdio::null())
                .stdout(ProcStdio::null())
                .stderr(ProcStdio::null());
            Some(streams)
        } else {
            let Streams {
                stdin,
                stdout,
                stderr,
            } = streams;
            cmd.stdin(ProcStdio::from(stdin))
                .stdout(ProcStdio::from(stdout))
                .stderr(ProcStdio::from(stderr));
            None
        };
        let (_, helper_exit) = self
            .reaper
            .spawn(&mut cmd)
            .map_err(|e| internal("starting the runtime", &e))?;
        laps.lap("helper spawned");
        // Our copies of the stream fds go now: the process holds the only
        // ones, so the host sees EOF exactly when the process is done.
        drop(cmd);
        // The pty master arrives while the helper runs.
        let master = match console {
            Some((path, listener)) => {
                let got = tokio::task::spawn_blocking(move || {
                    stdio::receive_pty_master(&listener, CONSOLE_TIMEOUT)
                })
                .await
                .map_err(|e| internal("console task", &e))?;
                let _ = fs::remove_file(path);
                Some(got)
            }
            None => None,
        };
        let _ = helper_exit.await;
        laps.lap("helper reaped");
        let text = fs::read_to_string(&result).unwrap_or_default();
        let _ = fs::remove_file(&result);
        // The first line is the outcome; the helper's own timings follow.
        let mut lines = text.lines();
        let outcome = lines.next().unwrap_or_default().to_string();
        for line in lines {
            tracing::debug!(container = %container.id, "runtime helper: {line}");
        }
        let pid: i32 = match outcome.trim().strip_prefix("pid ") {
            Some(pid) => pid
                .parse()
                .map_err(|_| ContainerError::Internal(format!("runtime said {outcome:?}")))?,
            None => {
                let why = outcome
                    .trim()
                    .strip_prefix("error ")
                    .unwrap_or("the runtime failed without a word");
                return Err(ContainerError::FailedPrecondition(why.to_string()));
            }
        };
        if let (Some(master), Some(streams)) = (master, tty_streams) {
            let master =
                master.map_err(|e| ContainerError::FailedPrecondition(crate::describe(&e)))?;
            let pump = TtyPump::start(master, streams).map_err(|e| internal("tty pump", &e))?;
            *process.tty.lock().map_err(|_| poisoned())? = Some(Arc::new(Mutex::new(pump)));
        }
        *process.pid.lock().map_err(|_| poisoned())? = Some(pid);
        self.watch_exit(container.clone(), process.clone(), pid);
        Ok(pid)
    }

    /// Records the process's exit once it happens (after its terminal
    /// output is drained) and tells the host.
    fn watch_exit(self: &Arc<Self>, container: Arc<Container>, process: Arc<Process>, pid: i32) {
        let exit_rx = self.reaper.wait_for(pid);
        let agent = Arc::clone(self);
        tokio::spawn(async move {
            let exit = exit_rx.await.unwrap_or(Exit {
                status: 255,
                signaled: false,
            });
            let mut laps = Laps::new("exit", &container.id);
            let tty = process.tty.lock().ok().and_then(|t| t.clone());
            if let Some(tty) = tty {
                let _ = tokio::task::spawn_blocking(move || {
                    if let Ok(mut t) = tty.lock() {
                        t.drain();
                    }
                })
                .await;
            }
            let oom =
                exit.signaled && exit.status == 128 + 9 && stats::oom_kills(&container.cgroup) > 0;
            let info = ExitInfo {
                status: exit.status,
                at_unix_ns: now_unix_ns(),
                oom_killed: oom,
            };
            // send_replace stores the value even when nobody is subscribed yet.
            process.exit.send_replace(Some(info));
            tracing::info!(container = %container.id, exec = %process.exec_id, pid, status = exit.status, oom, "process exited");
            if oom {
                let mut ev = Event::new();
                ev.container_id = container.id.clone();
                ev.kind = Some(event::Kind::Oom(OomKilled::new()));
                agent.push_event(ev);
            }
            let mut exited = ProcessExited::new();
            exited.exec_id = process.exec_id.clone();
            exited.pid = u32::try_from(pid).unwrap_or(0);
            exited.exit_status = info.status;
            exited.exited_at_unix_ns = info.at_unix_ns;
            let mut ev = Event::new();
            ev.container_id = container.id.clone();
            ev.kind = Some(event::Kind::Exited(exited));
            agent.push_event(ev);
            laps.lap("drained, event queued");
        });
    }

    /// Starts the init (exec_id empty) or a prepared exec process.
    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        if exec_id.is_empty() {
            let mut laps = Laps::new("start", id);
            let state = Path::new(STATE_ROOT).join(id);
            tokio::task::spawn_blocking(move || {
                LcContainer::load(state).and_then(|mut c| c.start())
            })
            .await
            .map_err(|e| internal("start task", &e))?
            .map_err(|e| {
                ContainerError::FailedPrecondition(format!("cannot start: {}", crate::describe(&e)))
            })?;
            laps.lap("started");
            return Ok(process
                .pid()
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(0));
        }
        let pending = process
            .pending
            .lock()
            .map_err(|_| poisoned())?
            .take()
            .ok_or_else(|| {
                ContainerError::FailedPrecondition(format!("exec {exec_id:?} was started already"))
            })?;
        let job = Job::Exec {
            id: id.to_string(),
            process: pending.spec_path.clone(),
        };
        let pid = self
            .run_runtime(&container, &process, job, &pending.stdio)
            .await?;
        let _ = fs::remove_file(&pending.spec_path);
        Ok(u32::try_from(pid).unwrap_or(0))
    }

    /// Prepares an extra process; it runs on [`Self::start`].
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio_spec: &Stdio,
    ) -> Result<()> {
        let container = self.container(id)?;
        if exec_id.is_empty() || !rootfs::valid_id(exec_id) {
            return Err(ContainerError::Invalid(format!("exec id {exec_id:?}")));
        }
        let mut proc_spec: oci_spec::runtime::Process = serde_json::from_slice(process_json)
            .map_err(|e| ContainerError::Invalid(format!("OCI process: {e}")))?;
        proc_spec.set_terminal(Some(stdio_spec.terminal));
        let mut processes = container.processes.lock().map_err(|_| poisoned())?;
        if processes.contains_key(exec_id) {
            return Err(ContainerError::AlreadyExists(format!("exec {exec_id:?}")));
        }
        let spec_path = container.dirs.bundle.join(format!("exec-{exec_id}.json"));
        let text = serde_json::to_vec(&proc_spec).map_err(|e| internal("process.json", &e))?;
        fs::write(&spec_path, text).map_err(|e| internal("writing process.json", &e))?;
        let process = Process::new(exec_id);
        *process.pending.lock().map_err(|_| poisoned())? = Some(PendingExec {
            spec_path,
            stdio: stdio_spec.clone(),
        });
        processes.insert(exec_id.to_string(), process);
        Ok(())
    }

    /// Waits for a process to exit (and its output to drain).
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<ExitInfo> {
        let process = self.container(id)?.process(exec_id)?;
        let mut rx = process.exit.subscribe();
        loop {
            if let Some(info) = *rx.borrow_and_update() {
                return Ok(info);
            }
            rx.changed()
                .await
                .map_err(|_| ContainerError::Internal("exit watch closed".into()))?;
        }
    }

    /// Signals a process, or every process of the container.
    pub fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let container = self.container(id)?;
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| ContainerError::Invalid(format!("signal {signal}")))?;
        if all {
            for pid in container.cgroup_pids() {
                let _ = kill(Pid::from_raw(pid), sig);
            }
            return Ok(());
        }
        let process = container.process(exec_id)?;
        if process.exited().is_some() {
            return Err(ContainerError::NotFound(format!(
                "process {exec_id:?} has exited"
            )));
        }
        let pid = process.pid().ok_or_else(|| {
            ContainerError::FailedPrecondition(format!("process {exec_id:?} is not running"))
        })?;
        kill(Pid::from_raw(pid), sig).map_err(|e| internal("kill", &e))
    }

    /// Resizes a terminal process's pty.
    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let process = self.container(id)?.process(exec_id)?;
        let tty = process.tty.lock().map_err(|_| poisoned())?.clone();
        let Some(tty) = tty else {
            return Err(ContainerError::FailedPrecondition(format!(
                "process {exec_id:?} has no terminal"
            )));
        };
        let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        let pump = tty.lock().map_err(|_| poisoned())?;
        pump.resize(clamp(rows), clamp(cols))
            .map_err(|e| internal("TIOCSWINSZ", &e))
    }

    /// The container's processes (pid, exec id, command line).
    pub fn list(&self, id: &str) -> Result<Vec<(u32, String, String)>> {
        let container = self.container(id)?;
        let by_pid: HashMap<i32, String> = container
            .processes
            .lock()
            .map_err(|_| poisoned())?
            .values()
            .filter_map(|p| p.pid().map(|pid| (pid, p.exec_id.clone())))
            .collect();
        Ok(container
            .cgroup_pids()
            .into_iter()
            .map(|pid| {
                let cmd = fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|b| {
                        String::from_utf8_lossy(&b)
                            .replace('\0', " ")
                            .trim()
                            .to_string()
                    })
                    .unwrap_or_default();
                (
                    u32::try_from(pid).unwrap_or(0),
                    by_pid.get(&pid).cloned().unwrap_or_default(),
                    cmd,
                )
            })
            .collect())
    }

    /// cgroup and guest memory statistics.
    pub fn stats(&self, id: &str) -> Result<capsid_protocol::agent::StatsResponse> {
        Ok(stats::collect(&self.container(id)?.cgroup))
    }

    /// Freezes or thaws the container.
    pub async fn pause(&self, id: &str, paused: bool) -> Result<()> {
        self.container(id)?;
        let state = Path::new(STATE_ROOT).join(id);
        tokio::task::spawn_blocking(move || {
            LcContainer::load(state).and_then(|mut c| if paused { c.pause() } else { c.resume() })
        })
        .await
        .map_err(|e| internal("pause task", &e))?
        .map_err(|e| ContainerError::FailedPrecondition(crate::describe(&e)))
    }

    /// Applies new cgroup limits (memory, pids, cpu) from OCI `linux.resources`.
    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let container = self.container(id)?;
        let res: oci_spec::runtime::LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| ContainerError::Invalid(format!("OCI resources: {e}")))?;
        let write = |file: &str, value: String| {
            fs::write(container.cgroup.join(file), value).map_err(|e| internal(file, &e))
        };
        if let Some(mem) = res.memory() {
            if let Some(limit) = mem.limit() {
                write(
                    "memory.max",
                    if limit < 0 {
                        "max".into()
                    } else {
                        limit.to_string()
                    },
                )?;
            }
        }
        if let Some(pids) = res.pids() {
            let limit = pids.limit();
            write(
                "pids.max",
                if limit <= 0 {
                    "max".into()
                } else {
                    limit.to_string()
                },
            )?;
        }
        if let Some(cpu) = res.cpu() {
            if let Some(quota) = cpu.quota() {
                let period = cpu.period().unwrap_or(100_000);
                let q = if quota <= 0 {
                    "max".to_string()
                } else {
                    quota.to_string()
                };
                write("cpu.max", format!("{q} {period}"))?;
            }
            if let Some(shares) = cpu.shares() {
                // The cgroup v1 → v2 conversion runc and crun use.
                let weight = 1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142;
                write("cpu.weight", weight.to_string())?;
            }
        }
        Ok(())
    }

    /// Kills every container process and tears the containers down.
    pub fn kill_everything(&self) {
        let containers: Vec<Arc<Container>> = self
            .containers
            .lock()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default();
        for c in containers {
            let _ = fs::write(c.cgroup.join("cgroup.kill"), "1");
            for pid in c.cgroup_pids() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

fn poisoned() -> ContainerError {
    ContainerError::Internal("agent state lock poisoned".into())
}

/// Refuses a main program the kernel could not execute, with the reason.
fn check_program(spec: &Spec, rootfs: &Path) -> Result<()> {
    let Some(process) = spec.process() else {
        return Ok(());
    };
    let Some(program) = process.args().as_ref().and_then(|a| a.first()) else {
        return Err(ContainerError::Invalid("the process has no args".into()));
    };
    let path = process
        .env()
        .as_ref()
        .and_then(|env| env.iter().find_map(|kv| kv.strip_prefix("PATH=")))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    rootfs::check_executable(rootfs, program, path)
        .map_err(|e| ContainerError::FailedPrecondition(e.to_string()))
}

/// Makes the host's OCI spec fit the guest: the rootfs is the assembled
/// overlay, the cgroup is under /capsid, the terminal flag follows the
/// stdio request, the container shares the VM's network namespace —
/// the VM is the network boundary, and the agent configures its NIC — and
/// seccomp argument rules are put in libcontainer's order.
fn adapt_spec(spec: &mut Spec, rootfs: &Path, id: &str, terminal: bool) -> Result<()> {
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(rootfs.to_path_buf());
    spec.set_root(Some(root));
    let mut process = spec
        .process()
        .clone()
        .ok_or_else(|| ContainerError::Invalid("OCI spec has no process".into()))?;
    process.set_terminal(Some(terminal));
    spec.set_process(Some(process));
    let mut linux = spec.linux().clone().unwrap_or_default();
    linux.set_cgroups_path(Some(PathBuf::from(CGROUP_PARENT).join(id)));
    if let Some(ns) = linux.namespaces().clone() {
        let kept = ns
            .into_iter()
            .filter(|n| n.typ() != LinuxNamespaceType::Network)
            .collect();
        linux.set_namespaces(Some(kept));
    }
    if let Some(mut seccomp) = linux.seccomp().clone() {
        crate::seccomp::adapt(&mut seccomp);
        linux.set_seccomp(Some(seccomp));
    }
    spec.set_linux(Some(linux));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_is_adapted_to_the_guest() {
        let mut spec = Spec::default();
        let mut linux = spec.linux().clone().unwrap();
        let ns = linux.namespaces().clone().unwrap();
        assert!(ns.iter().any(|n| n.typ() == LinuxNamespaceType::Network));
        linux.set_namespaces(Some(ns));
        spec.set_linux(Some(linux));
        adapt_spec(
            &mut spec,
            Path::new("/run/capsid/bundles/c1/rootfs"),
            "c1",
            true,
        )
        .unwrap();
        assert_eq!(
            spec.root().as_ref().unwrap().path(),
            Path::new("/run/capsid/bundles/c1/rootfs")
        );
        assert_eq!(spec.process().as_ref().unwrap().terminal(), Some(true));
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/capsid/c1"))
        );
        assert!(linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .all(|n| n.typ() != LinuxNamespaceType::Network));
        assert!(linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .any(|n| n.typ() == LinuxNamespaceType::Pid));
    }

    #[test]
    fn spec_without_process_is_refused() {
        let mut spec = Spec::default();
        spec.set_process(None);
        let e = adapt_spec(&mut spec, Path::new("/r"), "c1", false).unwrap_err();
        assert!(e.to_string().contains("no process"));
    }
}
