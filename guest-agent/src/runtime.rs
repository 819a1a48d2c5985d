//! `capsid-agent __runtime …`: the OCI runtime half of the agent, run as a
//! short-lived child process.
//!
//! Creating a container forks (namespaces, the container's init); forking
//! a multi-threaded async process is unsafe, so the agent re-executes
//! itself for that, single-threaded, like containerd runs runc. The
//! container work itself is youki's `libcontainer` — a complete OCI
//! runtime (namespaces, mounts, devices, masked and read-only paths,
//! capabilities, rlimits, users, cgroup v2 limits, hooks) that is used as a
//! library instead of written again (exec'd processes get the container's
//! seccomp filter through [`crate::seccomp::FilteredExecutor`]). The
//! container's stdio is this process's own stdio, which the container init
//! inherits.
//!
//! The outcome is written to a result file: `pid N` or `error MESSAGE` on
//! the first line, then the helper's own timings (logged at debug level).
//!
//! The agent usually has one helper started ahead of time, which gets its
//! job and stdio over a socket instead of its arguments and stdio at spawn
//! ([`crate::standby`]); from [`run_and_report`] on, the two are the same.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container as LcContainer;
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use oci_spec::runtime::{LinuxSeccomp, Spec};
use oci_spec::OciSpecError;

/// Where libcontainer keeps its per-container state.
pub const STATE_ROOT: &str = "/run/capsid/state";
/// The first argument that selects the runtime half.
pub const RUNTIME_ARG: &str = "__runtime";

/// Errors of the runtime helper. Their text ([`describe`]) is the result
/// file's `error` line, which the agent passes on to the host.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// libcontainer refused or failed the job.
    #[error(transparent)]
    Libcontainer(#[from] LibcontainerError),
    /// libcontainer created the container without an init process.
    #[error("container has no init process")]
    NoInit,
    /// The container's config.json could not be read back. The text quotes
    /// the error itself but not its causes, as the `error` line always has.
    #[error("{}: {error}", path.display())]
    Spec {
        /// config.json.
        path: PathBuf,
        /// Why.
        error: OciSpecError,
    },
}

/// Result of the runtime helper's jobs.
pub type Result<T> = std::result::Result<T, RuntimeError>;

/// What the runtime helper is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// Create (not start) the container of `bundle`.
    Create {
        /// Container id.
        id: String,
        /// OCI bundle (config.json + rootfs).
        bundle: PathBuf,
    },
    /// Start an extra process (OCI `process` JSON) in the running container.
    Exec {
        /// Container id.
        id: String,
        /// The process.json file.
        process: PathBuf,
    },
}

/// A parsed helper invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The job.
    pub job: Job,
    /// Where to write the outcome.
    pub result: PathBuf,
    /// Console socket that receives the pty master (terminal processes).
    pub console_socket: Option<PathBuf>,
}

impl Invocation {
    /// The arguments (after the program name) that run this invocation.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![RUNTIME_ARG.to_string()];
        match &self.job {
            Job::Create { id, bundle } => {
                args.extend(["create".into(), id.clone(), bundle.display().to_string()]);
            }
            Job::Exec { id, process } => {
                args.extend(["exec".into(), id.clone(), process.display().to_string()]);
            }
        }
        args.extend(["--result".into(), self.result.display().to_string()]);
        if let Some(sock) = &self.console_socket {
            args.extend(["--console-socket".into(), sock.display().to_string()]);
        }
        args
    }

    /// Parses what [`Self::to_args`] produced.
    pub fn parse(args: &[String]) -> Option<Self> {
        let mut it = args.iter();
        if it.next()? != RUNTIME_ARG {
            return None;
        }
        let kind = it.next()?;
        let id = it.next()?.clone();
        let path = PathBuf::from(it.next()?);
        let job = match kind.as_str() {
            "create" => Job::Create { id, bundle: path },
            "exec" => Job::Exec { id, process: path },
            _ => return None,
        };
        let (mut result, mut console_socket) = (None, None);
        while let Some(flag) = it.next() {
            let value = PathBuf::from(it.next()?);
            match flag.as_str() {
                "--result" => result = Some(value),
                "--console-socket" => console_socket = Some(value),
                _ => return None,
            }
        }
        Some(Self {
            job,
            result: result?,
            console_socket,
        })
    }
}

/// Runs the helper; the exit code only says whether a result was written.
pub fn main(args: &[String]) -> ExitCode {
    let entered = crate::monotonic_ns();
    let Some(inv) = Invocation::parse(args) else {
        eprintln!("capsid-agent: bad runtime invocation {args:?}");
        return ExitCode::from(2);
    };
    run_and_report(&inv, Entry::Fresh { entered })
}

/// How the helper came to its job, for the timings of a debug result.
#[derive(Debug, Clone, Copy)]
pub enum Entry {
    /// Spawned for this job: `entered` its `main` (CLOCK_MONOTONIC ns).
    Fresh {
        /// When `main` was entered.
        entered: u64,
    },
    /// Started ahead of time ([`crate::standby`]): `entered` its `main`
    /// then, and was handed the job at `job`.
    Standby {
        /// When `main` was entered.
        entered: u64,
        /// When the job arrived.
        job: u64,
    },
}

impl Entry {
    /// The timing line of a debug result (before `done at_ms=…`).
    fn describe(self) -> String {
        let ms = |ns: u64| ns as f64 / 1e6;
        match self {
            Self::Fresh { entered } => format!("entered at_ms={:.1}", ms(entered)),
            Self::Standby { entered, job } => format!(
                "standby entered at_ms={:.1} job received at_ms={:.1}",
                ms(entered),
                ms(job)
            ),
        }
    }
}

/// Runs `inv` and writes its result file: what `main` does once the job is
/// known, whether the helper was spawned for it or was a standby. The exit
/// code only says whether a result was written.
pub fn run_and_report(inv: &Invocation, entry: Entry) -> ExitCode {
    // The agent's cwd is `/`, except for a moment in each start: libcontainer
    // chdirs the agent into the container's state directory to reach its
    // notify socket. A helper spawned, or a standby started, in that moment
    // would inherit a directory that goes with the container (and
    // libcontainer's create reads the cwd back). Jobs run from `/`.
    if let Err(e) = std::env::set_current_dir("/") {
        tracing::warn!(error = %e, "cannot chdir to /");
    }
    // libcontainer says what exactly failed through tracing: keep that
    // next to the result so an error can quote it.
    let log_path = inv.result.with_extension("log");
    // At the agent's debug level, libcontainer's own steps are kept too,
    // stamped with the time since boot, and passed on with the result.
    let debug = crate::log_level() >= tracing::Level::DEBUG;
    if let Ok(log) = std::fs::File::create(&log_path) {
        let builder = tracing_subscriber::fmt()
            .with_writer(std::sync::Mutex::new(log))
            .with_ansi(false);
        let _ = if debug {
            builder
                .with_timer(tracing_subscriber::fmt::time::uptime())
                .with_max_level(tracing::Level::DEBUG)
                .try_init()
        } else {
            builder
                .without_time()
                .with_max_level(tracing::Level::WARN)
                .try_init()
        };
    }
    let outcome = match run(inv) {
        Ok(pid) if debug => format!(
            "pid {pid}\n{} done at_ms={:.1}\n{}",
            entry.describe(),
            crate::monotonic_ns() as f64 / 1e6,
            std::fs::read_to_string(&log_path).unwrap_or_default()
        ),
        Ok(pid) => format!("pid {pid}\n"),
        Err(e) => {
            let e = describe(&e);
            let detail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let last = detail
                .lines()
                .find(|l| l.contains("ERROR"))
                .unwrap_or("")
                .trim();
            let text = if last.is_empty() {
                e
            } else {
                format!("{e} ({last})")
            };
            error_outcome(&text)
        }
    };
    let _ = std::fs::remove_file(&log_path);
    match std::fs::write(&inv.result, outcome) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// The result file's text for a job that failed with `text`: one line.
pub fn error_outcome(text: &str) -> String {
    format!("error {}\n", text.replace('\n', " "))
}

fn builder(id: &str, console_socket: Option<&Path>) -> Result<ContainerBuilder> {
    Ok(
        ContainerBuilder::new(id.to_string(), SyscallType::default())
            .with_root_path(STATE_ROOT)?
            .with_console_socket(console_socket),
    )
}

fn run(inv: &Invocation) -> Result<i32> {
    match &inv.job {
        Job::Create { id, bundle } => {
            let container = builder(id, inv.console_socket.as_deref())?
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()?;
            container
                .pid()
                .map(|p| p.as_raw())
                .ok_or(RuntimeError::NoInit)
        }
        Job::Exec { id, process } => {
            let mut builder = builder(id, inv.console_socket.as_deref())?;
            if let Some(filter) = container_seccomp(id)? {
                builder = builder.with_executor(crate::seccomp::FilteredExecutor::new(filter));
            }
            builder
                .as_tenant()
                .with_process(Some(process))
                .with_detach(true)
                .build()
                .map(|p| p.as_raw())
                .map_err(RuntimeError::from)
        }
    }
}

/// The seccomp filter of container `id`'s spec (as the agent wrote it).
fn container_seccomp(id: &str) -> Result<Option<LinuxSeccomp>> {
    let container = LcContainer::load(Path::new(STATE_ROOT).join(id))?;
    let config = container.bundle().join("config.json");
    let spec = Spec::load(&config).map_err(|error| RuntimeError::Spec {
        path: config.clone(),
        error,
    })?;
    Ok(spec.linux().as_ref().and_then(|l| l.seccomp().clone()))
}

/// An error and those of its sources that add to its text, as one line.
fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cur = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invocations_round_trip() {
        for inv in [
            Invocation {
                job: Job::Create {
                    id: "c1".into(),
                    bundle: "/run/b".into(),
                },
                result: "/run/r".into(),
                console_socket: None,
            },
            Invocation {
                job: Job::Exec {
                    id: "c1".into(),
                    process: "/run/p.json".into(),
                },
                result: "/run/r".into(),
                console_socket: Some("/run/c.sock".into()),
            },
        ] {
            assert_eq!(Invocation::parse(&inv.to_args()), Some(inv));
        }
    }

    #[test]
    fn garbage_is_refused() {
        let args: Vec<String> = ["__runtime", "explode", "x", "y"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(Invocation::parse(&args), None);
        let args: Vec<String> = ["__runtime", "create", "x", "y"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(Invocation::parse(&args), None, "no result file");
    }
}
