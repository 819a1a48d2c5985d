//! Containers and their processes: what the agent's API does, independent
//! of ttrpc (server.rs only translates).
//!
//! [`Containers`] holds every container of this guest; its operations are
//! split by kind: `create.rs` (rootfs, bundle and spec; the init created),
//! `process.rs` (the runtime helper, or the standby one of
//! [`crate::standby`]; starting the init and exec'd
//! processes; their terminals), `exit.rs` (exits, waits, signals, the event
//! queue), `control.rs` (pause, resource updates, stats, process list)
//! and `remove.rs` (a container taken away while the VM runs on).

mod control;
mod create;
mod exit;
mod process;
mod remove;

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use libcontainer::error::LibcontainerError;
use oci_spec::OciSpecError;
use tokio::task::JoinError;

use crate::lock::LockExt as _;
use crate::reaper::Reaper;
use crate::rootfs::{BundleDirs, RootfsError};
use crate::standby::Standby;
use crate::stdio::StdioError;

pub use create::CreateRequest;
use exit::Events;
use process::Process;

/// The cgroup v2 parent of every container.
const CGROUP_PARENT: &str = "/capsid";

/// Errors of container operations. [`ContainerError::kind`] is what
/// server.rs turns into a ttrpc code; the text with its sources
/// ([`crate::describe`]) is the message the host gets.
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
    /// A JSON document of the request (OCI spec, process, resources) does
    /// not parse.
    #[error("invalid request: {what}")]
    Json {
        /// Which document.
        what: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The request names disks, layers or resolver settings the guest
    /// cannot use.
    #[error("invalid request")]
    BadRootfs(#[source] RootfsError),
    /// The request does not fit the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The process's program is nothing the kernel can execute.
    #[error(transparent)]
    NotExecutable(RootfsError),
    /// The host's stdio streams or the pty could not be wired.
    #[error(transparent)]
    Stdio(#[from] StdioError),
    /// The runtime helper refused the job, in its own words.
    #[error("{0}")]
    Runtime(String),
    /// libcontainer could not start the init.
    #[error("cannot start")]
    Start(#[source] LibcontainerError),
    /// libcontainer could not freeze or thaw the container.
    #[error(transparent)]
    Freeze(LibcontainerError),
    /// libcontainer could not delete the container.
    #[error("deleting the container in the runtime")]
    Delete(#[source] LibcontainerError),
    /// A blocking task of the agent ended without a result (it panicked).
    #[error("{what}")]
    Task {
        /// Which task.
        what: &'static str,
        /// Why.
        #[source]
        source: JoinError,
    },
    /// The rootfs or its /etc files could not be made.
    #[error("{what}")]
    Rootfs {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: RootfsError,
    },
    /// config.json could not be written.
    #[error("writing config.json")]
    SaveSpec(#[source] OciSpecError),
    /// An exec's process.json could not be encoded.
    #[error("process.json")]
    EncodeProcess(#[source] serde_json::Error),
    /// A file, socket, cgroup or process operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// kill(2) failed.
    #[error("kill")]
    Kill(#[source] nix::Error),
    /// The runtime helper's outcome line is neither `pid N` nor `error …`
    /// (the line is quoted rather than the parse error: it says more).
    #[error("runtime said {0:?}")]
    RuntimeOutput(String),
    /// The exit watch closed. It cannot while the process, which owns the
    /// sender, is held; the variant keeps `wait` free of a panic.
    #[error("exit watch closed")]
    ExitWatchClosed,
}

/// What kind of failure a [`ContainerError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No such container or process.
    NotFound,
    /// It exists already.
    AlreadyExists,
    /// The request is malformed.
    Invalid,
    /// The request does not fit the current state.
    FailedPrecondition,
    /// Something failed inside the guest.
    Internal,
}

impl ContainerError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Self::Invalid(_) | Self::Json { .. } | Self::BadRootfs(_) => ErrorKind::Invalid,
            Self::FailedPrecondition(_)
            | Self::NotExecutable(_)
            | Self::Stdio(_)
            | Self::Runtime(_)
            | Self::Start(_)
            | Self::Freeze(_) => ErrorKind::FailedPrecondition,
            Self::Task { .. }
            | Self::Rootfs { .. }
            | Self::SaveSpec(_)
            | Self::EncodeProcess(_)
            | Self::Delete(_)
            | Self::Io { .. }
            | Self::Kill(_)
            | Self::RuntimeOutput(_)
            | Self::ExitWatchClosed => ErrorKind::Internal,
        }
    }

    /// Maps the failure of the blocking task `what`.
    fn task(what: &'static str) -> impl FnOnce(JoinError) -> Self {
        move |source| Self::Task { what, source }
    }

    /// Maps the failure of the I/O operation `what`.
    fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Io { what, source }
    }
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

/// Where a container is in its life: operations other than waits see
/// only [`Stage::Creating`] and [`Stage::Ready`] containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// CreateContainer is still at work on it.
    Creating,
    /// Created: its processes may run.
    Ready,
    /// RemoveContainer is taking it down.
    Removing,
}

/// One container.
struct Container {
    id: String,
    dirs: BundleDirs,
    cgroup: PathBuf,
    processes: Mutex<HashMap<String, Arc<Process>>>,
    stage: Mutex<Stage>,
    /// Its init is not PID 1 of a PID namespace of its own (it joined a
    /// pod's, or the VM's): the kernel does not end the rest of the
    /// container with it, so the agent does, as runc's shim does.
    shares_pid_namespace: std::sync::atomic::AtomicBool,
}

impl Container {
    fn new(id: &str) -> Self {
        Self {
            id: id.to_string(),
            dirs: BundleDirs::new(id),
            cgroup: PathBuf::from("/sys/fs/cgroup")
                .join(CGROUP_PARENT.trim_start_matches('/'))
                .join(id),
            processes: Mutex::new(HashMap::new()),
            stage: Mutex::new(Stage::Creating),
            shares_pid_namespace: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn stage(&self) -> Stage {
        *self.stage.lock_or_recover()
    }

    fn set_stage(&self, stage: Stage) {
        *self.stage.lock_or_recover() = stage;
    }

    fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        self.processes
            .lock_or_recover()
            .get(exec_id)
            .cloned()
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

/// Every container of this guest, and what the agent's API does with them.
pub struct Containers {
    reaper: Reaper,
    /// The runtime helper started ahead of time for the next job.
    standby: Arc<Standby>,
    by_id: Mutex<HashMap<String, Arc<Container>>>,
    events: Events,
}

impl std::fmt::Debug for Containers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containers").finish_non_exhaustive()
    }
}

impl Containers {
    /// No containers yet; `reaper` reports the exits of their processes.
    pub fn new(reaper: Reaper) -> Self {
        Self {
            standby: Standby::new(reaper.clone(), crate::standby::enabled()),
            reaper,
            by_id: Mutex::new(HashMap::new()),
            events: Events::default(),
        }
    }

    /// Starts the first standby runtime helper in the background (later
    /// ones follow each job). Must be called inside the tokio runtime.
    pub fn start_standby(&self) {
        self.standby.replenish();
    }

    /// Container `id`, unless it is unknown or being removed.
    fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.by_id
            .lock_or_recover()
            .get(id)
            .filter(|c| c.stage() != Stage::Removing)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(format!("container {id:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host gets `describe(error)`: each error's text with its sources
    /// must read as the message of the same failure always did.
    #[test]
    fn messages_carry_their_sources() {
        let json = serde_json::from_slice::<oci_spec::runtime::Spec>(b"{").unwrap_err();
        let json_text = json.to_string();
        let e = ContainerError::Json {
            what: "OCI spec",
            source: json,
        };
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert_eq!(
            crate::describe(&e),
            format!("invalid request: OCI spec: {json_text}")
        );

        let e = ContainerError::BadRootfs(RootfsError::NoSuchDisk("d1".into()));
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert_eq!(
            crate::describe(&e),
            "invalid request: no disk with serial \"d1\" is attached"
        );

        let e = ContainerError::io("memory.max")(std::io::Error::from_raw_os_error(libc::EINVAL));
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert_eq!(
            crate::describe(&e),
            format!(
                "memory.max: {}",
                std::io::Error::from_raw_os_error(libc::EINVAL)
            )
        );

        let e = ContainerError::Rootfs {
            what: "writing /etc",
            source: RootfsError::Write {
                path: "/r/etc".into(),
                source: std::io::Error::from_raw_os_error(libc::EROFS),
            },
        };
        assert_eq!(
            crate::describe(&e),
            format!(
                "writing /etc: cannot write /r/etc: {}",
                std::io::Error::from_raw_os_error(libc::EROFS)
            )
        );

        let e = ContainerError::NotExecutable(RootfsError::Invalid("exec format error".into()));
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert_eq!(crate::describe(&e), "invalid rootfs: exec format error");
    }
}
