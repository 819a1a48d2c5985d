//! A container's processes: the runtime helper that creates the init or an
//! exec'd process on its stdio, starting them, and their terminals.

use std::fs;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio as ProcStdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsid_protocol::agent::Stdio;
use libcontainer::container::Container as LcContainer;
use tokio::sync::{oneshot, watch};

use super::{Container, ContainerError, Containers, ExitInfo, Laps, Result};
use crate::lock::LockExt as _;
use crate::reaper::Exit;
use crate::rootfs;
use crate::runtime::{Invocation, Job, STATE_ROOT};
use crate::standby::{self, Unavailable};
use crate::stdio::{self, Streams, TtyPump};
use crate::undo::Undo;

/// How long the runtime may take to hand over a pty.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);

/// An exec'd process between ExecProcess and StartProcess.
struct PendingExec {
    spec_path: PathBuf,
    stdio: Stdio,
}

/// One process of a container (the init, or an exec).
pub(super) struct Process {
    pub(super) exec_id: String,
    pid: Mutex<Option<i32>>,
    pub(super) exit: watch::Sender<Option<ExitInfo>>,
    pending: Mutex<Option<PendingExec>>,
    tty: Mutex<Option<Arc<Mutex<TtyPump>>>>,
}

impl Process {
    pub(super) fn new(exec_id: &str) -> Arc<Self> {
        Arc::new(Self {
            exec_id: exec_id.to_string(),
            pid: Mutex::new(None),
            exit: watch::channel(None).0,
            pending: Mutex::new(None),
            tty: Mutex::new(None),
        })
    }

    pub(super) fn pid(&self) -> Option<i32> {
        *self.pid.lock_or_recover()
    }

    pub(super) fn exited(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    /// The pumps of a terminal process's pty.
    pub(super) fn tty(&self) -> Option<Arc<Mutex<TtyPump>>> {
        self.tty.lock_or_recover().clone()
    }
}

impl Containers {
    /// Runs the runtime helper for `job` with the process's stdio, records
    /// the pid and starts watching for its exit.
    pub(super) async fn run_runtime(
        self: &Arc<Self>,
        container: &Arc<Container>,
        process: &Arc<Process>,
        job: Job,
        stdio_spec: &Stdio,
    ) -> Result<i32> {
        let bundle = container.dirs.bundle.clone();
        let tag = if process.exec_id.is_empty() {
            "init"
        } else {
            &process.exec_id
        };
        let result = bundle.join(format!("result-{tag}"));
        let mut laps = Laps::new("runtime", &container.id);
        // The spec the job runs was given this flag (adapt_spec for the
        // init process, the exec's process.json for the others).
        let terminal = stdio_spec.terminal;
        let stdio_spec = stdio_spec.clone();
        let streams = tokio::task::spawn_blocking(move || stdio::connect_streams(&stdio_spec))
            .await
            .map_err(ContainerError::task("stdio task"))??;
        laps.lap("stdio connected");
        let console = if terminal {
            Some(ConsoleSocket::bind(&bundle, &process.exec_id)?)
        } else {
            None
        };
        let inv = Invocation {
            job,
            result: result.clone(),
            console_socket: console.as_ref().map(|c| c.path.clone()),
        };
        // Without a terminal the streams are the process's stdio, and the
        // helper's, which the process inherits; with one they go to the pty
        // pump, and the helper's stdio is /dev/null.
        let (mut stdio_fds, tty_streams) = if terminal {
            (None, Some(streams))
        } else {
            (Some(streams), None)
        };
        let (helper, helper_exit) = match self.standby.hand_over(&inv, stdio_fds.as_ref()).await {
            Ok(handed) => {
                tracing::debug!(container = %container.id, pid = handed.0, "job handed to the standby runtime helper");
                laps.lap("job handed to the standby");
                handed
            }
            Err(why) => {
                if matches!(why, Unavailable::NotReady) {
                    tracing::debug!(container = %container.id, "no standby runtime helper ready: spawning one");
                } else {
                    tracing::warn!(container = %container.id, error = %crate::describe(&why), "standby runtime helper not usable: spawning one");
                }
                let spawned = self.spawn_helper(&inv, stdio_fds.take())?;
                laps.lap("helper spawned");
                spawned
            }
        };
        // Our copies of the stream fds go now: the process holds the only
        // ones, so the host sees EOF exactly when the process is done.
        drop(stdio_fds);
        // The next job's helper, started in the background once the
        // containers are left alone (see standby.rs).
        self.standby.replenish();
        // The pty master arrives while the helper runs.
        let master = match console {
            Some(console) => Some(console.receive_master().await?),
            None => None,
        };
        let exit = helper_exit.await.ok();
        laps.lap("helper reaped");
        let text = fs::read_to_string(&result).unwrap_or_default();
        let _ = fs::remove_file(&result);
        if text.trim().is_empty() {
            // Killed, or it could not even read its job: it says nothing.
            return Err(ContainerError::Runtime(format!(
                "the runtime helper (pid {helper}) ended without a result ({})",
                standby::how_it_ended(exit)
            )));
        }
        // The first line is the outcome; the helper's own timings follow.
        let mut lines = text.lines();
        let outcome = lines.next().unwrap_or_default();
        for line in lines {
            tracing::debug!(container = %container.id, "runtime helper: {line}");
        }
        let pid = parse_outcome(outcome)?;
        if let (Some(master), Some(streams)) = (master, tty_streams) {
            let pump = TtyPump::start(master?, streams).map_err(ContainerError::io("tty pump"))?;
            *process.tty.lock_or_recover() = Some(Arc::new(Mutex::new(pump)));
        }
        *process.pid.lock_or_recover() = Some(pid);
        self.watch_exit(container.clone(), process.clone(), pid);
        Ok(pid)
    }

    /// Spawns the runtime helper for `inv` with `stdio` as its stdin,
    /// stdout and stderr (none: /dev/null): its pid and exit.
    fn spawn_helper(
        &self,
        inv: &Invocation,
        stdio: Option<Streams>,
    ) -> Result<(i32, oneshot::Receiver<Exit>)> {
        let mut cmd = Command::new("/proc/self/exe");
        cmd.args(inv.to_args());
        match stdio {
            Some(Streams {
                stdin,
                stdout,
                stderr,
            }) => cmd
                .stdin(ProcStdio::from(stdin))
                .stdout(ProcStdio::from(stdout))
                .stderr(ProcStdio::from(stderr)),
            None => cmd
                .stdin(ProcStdio::null())
                .stdout(ProcStdio::null())
                .stderr(ProcStdio::null()),
        };
        // `cmd`, and with it our copies of the stream fds, goes on return.
        self.reaper
            .spawn(&mut cmd)
            .map_err(ContainerError::io("starting the runtime"))
    }

    /// Starts the init (exec_id empty) or a prepared exec process.
    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32> {
        let _busy = self.standby.busy();
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        if exec_id.is_empty() {
            let mut laps = Laps::new("start", id);
            let state = Path::new(STATE_ROOT).join(id);
            tokio::task::spawn_blocking(move || {
                LcContainer::load(state).and_then(|mut c| c.start())
            })
            .await
            .map_err(ContainerError::task("start task"))?
            .map_err(ContainerError::Start)?;
            laps.lap("started");
            return Ok(process
                .pid()
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(0));
        }
        let pending = process.pending.lock_or_recover().take().ok_or_else(|| {
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
        // Its StartProcess follows: no standby starts in between.
        self.standby.touch();
        let container = self.container(id)?;
        if exec_id.is_empty() || !rootfs::valid_id(exec_id) {
            return Err(ContainerError::Invalid(format!("exec id {exec_id:?}")));
        }
        let mut proc_spec: oci_spec::runtime::Process = serde_json::from_slice(process_json)
            .map_err(|source| ContainerError::Json {
                what: "OCI process",
                source,
            })?;
        proc_spec.set_terminal(Some(stdio_spec.terminal));
        let mut processes = container.processes.lock_or_recover();
        if processes.contains_key(exec_id) {
            return Err(ContainerError::AlreadyExists(format!("exec {exec_id:?}")));
        }
        let spec_path = container.dirs.bundle.join(format!("exec-{exec_id}.json"));
        let text = serde_json::to_vec(&proc_spec).map_err(ContainerError::EncodeProcess)?;
        fs::write(&spec_path, text).map_err(ContainerError::io("writing process.json"))?;
        let process = Process::new(exec_id);
        *process.pending.lock_or_recover() = Some(PendingExec {
            spec_path,
            stdio: stdio_spec.clone(),
        });
        processes.insert(exec_id.to_string(), process);
        Ok(())
    }

    /// Resizes a terminal process's pty.
    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let process = self.container(id)?.process(exec_id)?;
        let Some(tty) = process.tty() else {
            return Err(ContainerError::FailedPrecondition(format!(
                "process {exec_id:?} has no terminal"
            )));
        };
        let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        let pump = tty.lock_or_recover();
        pump.resize(clamp(rows), clamp(cols))
            .map_err(ContainerError::io("TIOCSWINSZ"))
    }
}

/// The socket a terminal process's pty master arrives on. Its file is
/// removed once the master arrived, or on any early return before.
struct ConsoleSocket {
    path: PathBuf,
    listener: UnixListener,
    remove: Undo<Box<dyn FnOnce() + Send>>,
}

impl ConsoleSocket {
    fn bind(bundle: &Path, exec_id: &str) -> Result<Self> {
        let path = stdio::console_socket_path(bundle, exec_id);
        let _ = fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(ContainerError::io("console socket"))?;
        let file = path.clone();
        Ok(Self {
            path,
            listener,
            remove: Undo::new(Box::new(move || {
                let _ = fs::remove_file(file);
            })),
        })
    }

    /// Waits (off the async threads) for the pty master, then removes the
    /// socket; the outer error is the wait's, the inner one the runtime's.
    async fn receive_master(
        self,
    ) -> Result<std::result::Result<std::os::fd::OwnedFd, stdio::StdioError>> {
        let listener = self.listener;
        let got = tokio::task::spawn_blocking(move || {
            stdio::receive_pty_master(&listener, CONSOLE_TIMEOUT)
        })
        .await
        .map_err(ContainerError::task("console task"))?;
        drop(self.remove);
        Ok(got)
    }
}

/// The pid in the runtime helper's outcome line (`pid N`), or the error
/// it reports (`error MESSAGE`).
fn parse_outcome(outcome: &str) -> Result<i32> {
    match outcome.trim().strip_prefix("pid ") {
        Some(pid) => pid
            .parse()
            .map_err(|_| ContainerError::RuntimeOutput(outcome.to_string())),
        None => {
            let why = outcome
                .trim()
                .strip_prefix("error ")
                .unwrap_or("the runtime failed without a word");
            Err(ContainerError::Runtime(why.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_parsed() {
        assert_eq!(parse_outcome("pid 42").unwrap(), 42);
        let text = |o: &str| parse_outcome(o).unwrap_err().to_string();
        assert_eq!(text("error no such file"), "no such file");
        assert_eq!(text(""), "the runtime failed without a word");
        assert_eq!(text("pid x "), "runtime said \"pid x \"");
        assert_eq!(
            parse_outcome("error x").unwrap_err().kind(),
            super::super::ErrorKind::FailedPrecondition
        );
        assert_eq!(
            parse_outcome("pid x").unwrap_err().kind(),
            super::super::ErrorKind::Internal
        );
    }

    #[test]
    fn the_console_socket_goes_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let console = ConsoleSocket::bind(dir.path(), "e1").unwrap();
        assert!(console.path.exists());
        let path = console.path.clone();
        drop(console);
        assert!(!path.exists());
    }
}
