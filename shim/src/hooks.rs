//! OCI hooks, run on the host. The hooks a spec carries are host programs
//! (Docker's `libnetwork-setkey`, nerdctl's `internal oci-hook`, CNI
//! wrappers): they cannot run inside the VM, and what they do — set up the
//! container's network in the namespace of the state's pid, record it,
//! tear it down — is done on the host. So the shim takes them out of the
//! spec the guest gets and runs them itself, at the points runc would:
//!
//! - `prestart` and `createRuntime`: at Create, once the VM (and with it
//!   the network namespace of the task's pid) exists, before the container
//!   is created in it; a failure fails Create;
//! - `poststart`: after the init started; a failure is logged;
//! - `poststop`: at Delete, before the sandbox is taken down; a failure is
//!   logged.
//!
//! `createContainer` and `startContainer` hooks run in the container's
//! namespaces, which are the guest's: they stay in the guest's spec, and
//! the agent runs those whose program is there (createContainer: in the
//! guest, startContainer: in the container's filesystem) and drops the
//! others with a log line.
//!
//! Each hook gets the container's state (OCI runtime spec, "State") on its
//! stdin, its own args and env, and at most its `timeout` (default
//! [`DEFAULT_TIMEOUT`]) before it is killed.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{Hook, Spec};

/// How long a hook without a timeout may run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// How much of a failed hook's output is kept for the error.
const OUTPUT_LIMIT: usize = 4096;

/// How long a failed hook's output is waited for once the hook is gone: a
/// process it started may hold its stdout or stderr open.
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

/// Errors running hooks.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The container's state could not be encoded for the hooks' stdin.
    #[error("{stage} hooks: cannot encode the container's state")]
    State {
        /// Which stage.
        stage: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The hook could not be started.
    #[error("{stage} hook {}: cannot start it", path.display())]
    Spawn {
        /// Which stage.
        stage: &'static str,
        /// The program.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The hook started, but running it failed on the shim's side (its
    /// state or output could not be handled, it could not be waited for).
    #[error("{stage} hook {}: cannot {what}", path.display())]
    Io {
        /// Which stage.
        stage: &'static str,
        /// The program.
        path: PathBuf,
        /// What could not be done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The hook failed.
    #[error("{stage} hook {} failed: {reason}", path.display())]
    Failed {
        /// Which stage.
        stage: &'static str,
        /// The program.
        path: PathBuf,
        /// Exit status or timeout, and what it printed.
        reason: String,
    },
}

/// The hooks the host runs for one container.
#[derive(Debug, Clone, Default)]
pub struct HostHooks {
    /// `prestart` then `createRuntime`, at Create.
    pub create: Vec<Hook>,
    /// After the init started.
    pub poststart: Vec<Hook>,
    /// At Delete.
    pub poststop: Vec<Hook>,
    /// The spec's OCI version, for the state.
    pub oci_version: String,
    /// The spec's annotations, for the state.
    pub annotations: std::collections::HashMap<String, String>,
}

impl HostHooks {
    /// Takes the host's hooks out of `spec` (the guest keeps
    /// createContainer and startContainer); says what the guest gets, for
    /// the log.
    pub fn take(spec: &mut Spec) -> (Self, Vec<String>) {
        let oci_version = spec.version().clone();
        let annotations = spec.annotations().clone().unwrap_or_default();
        let Some(hooks) = spec.hooks().clone() else {
            return (
                Self {
                    oci_version,
                    annotations,
                    ..Self::default()
                },
                Vec::new(),
            );
        };
        let list = |h: &Option<Vec<Hook>>| h.clone().unwrap_or_default();
        #[allow(deprecated)]
        let prestart = list(hooks.prestart());
        let mut create = prestart;
        create.extend(list(hooks.create_runtime()));
        let mut dropped = Vec::new();
        for (stage, in_guest) in [
            ("createContainer", list(hooks.create_container())),
            ("startContainer", list(hooks.start_container())),
        ] {
            for hook in in_guest {
                dropped.push(format!(
                    "{stage} hook {} runs in the VM, if its program is there",
                    hook.path().display()
                ));
            }
        }
        let mut guest = oci_spec::runtime::Hooks::default();
        guest.set_create_container(hooks.create_container().clone());
        guest.set_start_container(hooks.start_container().clone());
        let guest_has_hooks =
            guest.create_container().is_some() || guest.start_container().is_some();
        spec.set_hooks(guest_has_hooks.then_some(guest));
        (
            Self {
                create,
                poststart: list(hooks.poststart()),
                poststop: list(hooks.poststop()),
                oci_version,
                annotations,
            },
            dropped,
        )
    }

    /// The state of container `id` for a hook.
    pub fn state<'a>(
        &'a self,
        id: &'a str,
        status: &'a str,
        pid: u32,
        bundle: &'a Path,
    ) -> State<'a> {
        State {
            oci_version: &self.oci_version,
            id,
            status,
            pid,
            bundle,
            annotations: &self.annotations,
        }
    }
}

/// Runs `hooks`' poststop hooks off the async runtime, logging failures.
pub async fn poststop_detached(hooks: &HostHooks, id: &str, bundle: &Path, pid: u32) {
    if hooks.poststop.is_empty() {
        return;
    }
    let (hooks, id, bundle) = (hooks.clone(), id.to_owned(), bundle.to_owned());
    let ran = tokio::task::spawn_blocking(move || {
        run_logged(
            "poststop",
            &hooks.poststop,
            &hooks.state(&id, "stopped", pid, &bundle),
        );
    })
    .await;
    if let Err(e) = ran {
        tracing::warn!(error = %e, "poststop hook task");
    }
}

/// The poststop hooks of the bundle's config.json, run after a shim that
/// died left its sandbox behind (containerd's `delete`). Blocks.
pub fn poststop_from_bundle(bundle: &Path, id: &str, pid: u32) {
    let Ok(text) = std::fs::read(bundle.join("config.json")) else {
        return;
    };
    let Ok(mut spec) = serde_json::from_slice::<Spec>(&text) else {
        return;
    };
    let (hooks, _) = HostHooks::take(&mut spec);
    if !hooks.poststop.is_empty() {
        run_logged(
            "poststop",
            &hooks.poststop,
            &hooks.state(id, "stopped", pid, bundle),
        );
    }
}

/// The container state a hook reads on stdin.
#[derive(Debug, Clone, serde::Serialize)]
pub struct State<'a> {
    /// The spec's OCI version.
    #[serde(rename = "ociVersion")]
    pub oci_version: &'a str,
    /// Container id.
    pub id: &'a str,
    /// "creating", "running" or "stopped".
    pub status: &'a str,
    /// The task's (host) pid: the VM's main process.
    pub pid: u32,
    /// The bundle directory.
    pub bundle: &'a Path,
    /// The spec's annotations.
    #[serde(skip_serializing_if = "std::collections::HashMap::is_empty")]
    pub annotations: &'a std::collections::HashMap<String, String>,
}

/// Runs `hooks` in order; the first failure stops them and is returned.
/// Blocks, at most for each hook's timeout (and [`OUTPUT_GRACE`] for a
/// failed hook's output).
pub fn run(stage: &'static str, hooks: &[Hook], state: &State<'_>) -> Result<(), HookError> {
    let input = encode(stage, state)?;
    for hook in hooks {
        run_one(stage, hook, &input)?;
    }
    Ok(())
}

/// Runs every hook of `hooks`, logging failures (poststart, poststop).
pub fn run_logged(stage: &'static str, hooks: &[Hook], state: &State<'_>) {
    let input = match encode(stage, state) {
        Ok(input) => input,
        Err(e) => {
            tracing::warn!(container = state.id, error = %crate::describe(&e), "hooks not run");
            return;
        }
    };
    for hook in hooks {
        if let Err(e) = run_one(stage, hook, &input) {
            tracing::warn!(container = state.id, error = %crate::describe(&e), "hook failed");
        }
    }
}

/// The state as the hooks read it, shared with the threads feeding them.
fn encode(stage: &'static str, state: &State<'_>) -> Result<Arc<[u8]>, HookError> {
    serde_json::to_vec(state)
        .map(Arc::from)
        .map_err(|source| HookError::State { stage, source })
}

/// A started hook: the leader of its own process group, so that a timeout
/// kills what it started too.
#[derive(Debug)]
struct Started {
    child: Child,
    /// The group: the hook's pid.
    group: Option<Pid>,
}

impl Started {
    /// Kills the hook's whole process group and reaps the hook. Those of
    /// its processes that left the group (setsid) are out of reach, as
    /// they are for runc.
    fn kill(&mut self) {
        let killed = self.group.map(|g| killpg(g, Signal::SIGKILL));
        if !matches!(killed, Some(Ok(()))) {
            tracing::debug!(error = ?killed, "cannot kill the hook's group; killing the hook");
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Which of the hook's output pipes a chunk comes from.
#[derive(Debug, Clone, Copy)]
enum Stream {
    Out = 0,
    Err = 1,
}

/// Reads `pipe` to its end on its own thread: the first [`OUTPUT_LIMIT`]
/// bytes are sent on `tx` (the hook's error quotes them), the rest is read
/// and dropped, so the hook never dies of a full or closed pipe. `None`
/// says the pipe is closed. The thread outlives the hook when a process
/// the hook started keeps the pipe open; it ends with that process.
fn collect(
    pipe: impl Read + Send + 'static,
    stream: Stream,
    tx: mpsc::Sender<(Stream, Option<Vec<u8>>)>,
) -> std::io::Result<()> {
    let name = match stream {
        Stream::Out => "hook-stdout",
        Stream::Err => "hook-stderr",
    };
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut pipe = pipe;
            let mut buf = [0u8; 8192];
            let mut kept = 0;
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let keep = n.min(OUTPUT_LIMIT - kept);
                        if keep > 0 {
                            kept += keep;
                            // The receiver may be gone: keep draining.
                            let _ = tx.send((stream, Some(buf[..keep].to_vec())));
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = tx.send((stream, None));
        })
        .map(drop)
}

fn run_one(stage: &'static str, hook: &Hook, input: &Arc<[u8]>) -> Result<(), HookError> {
    use std::os::unix::process::CommandExt as _;

    let path = hook.path().clone();
    let failed = |reason: String| HookError::Failed {
        stage,
        path: path.clone(),
        reason,
    };
    let io = |what: &'static str, source: std::io::Error| HookError::Io {
        stage,
        path: path.clone(),
        what,
        source,
    };
    let mut cmd = Command::new(&path);
    let args = hook.args().clone().unwrap_or_default();
    // args[0] is the program's argv[0], as in execve.
    if let Some((argv0, rest)) = args.split_first() {
        cmd.arg0(argv0);
        cmd.args(rest);
    }
    // Without an env the hook inherits the shim's, as runc's (Go's exec.Cmd
    // with a nil Env) inherit runc's.
    if let Some(env) = hook.env() {
        cmd.env_clear();
        for kv in env {
            if let Some((k, v)) = kv.split_once('=') {
                cmd.env(k, v);
            }
        }
    }
    // Its own process group: on timeout, what it started dies with it.
    cmd.process_group(0);
    let child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| HookError::Spawn {
            stage,
            path: path.clone(),
            source,
        })?;
    let group = i32::try_from(child.id()).ok().map(Pid::from_raw);
    let mut hook_process = Started { child, group };

    let (tx, rx) = mpsc::channel();
    let mut open = 0;
    let mut threads = || -> std::io::Result<()> {
        // The state is written from a thread of its own: a hook that does
        // not read it must not block the timeout. A hook that does not
        // read it at all gets EPIPE: not its failure.
        if let Some(mut stdin) = hook_process.child.stdin.take() {
            let input = Arc::clone(input);
            std::thread::Builder::new()
                .name("hook-stdin".into())
                .spawn(move || {
                    let _ = stdin.write_all(&input);
                })?;
        }
        if let Some(out) = hook_process.child.stdout.take() {
            collect(out, Stream::Out, tx.clone())?;
            open += 1;
        }
        if let Some(err) = hook_process.child.stderr.take() {
            collect(err, Stream::Err, tx.clone())?;
            open += 1;
        }
        Ok(())
    };
    if let Err(e) = threads() {
        hook_process.kill();
        return Err(io("start a thread to feed it", e));
    }
    drop(tx);

    let timeout = hook
        .timeout()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match hook_process.child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                hook_process.kill();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                hook_process.kill();
                return Err(io("wait for it", e));
            }
        }
    };
    if status.is_some_and(|s| s.success()) {
        // Its output is not needed: a process it left behind may keep
        // writing it, to the reader threads.
        tracing::info!(stage, hook = %path.display(), "hook ran");
        return Ok(());
    }

    // What it printed, for the error; not waited for beyond the grace, as
    // a process it started (and that left its group) may hold the pipes.
    let mut output = [Vec::new(), Vec::new()];
    let grace = Instant::now() + OUTPUT_GRACE;
    while open > 0 {
        let left = grace.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((stream, Some(bytes))) => output[stream as usize].extend_from_slice(&bytes),
            Ok((_, None)) => open -= 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::debug!(stage, hook = %path.display(), "hook's output still open; not waiting for it");
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let text = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes).trim().to_string();
        text.chars().take(OUTPUT_LIMIT).collect::<String>()
    };
    let [out, err] = output;
    let (out, err) = (text(&out), text(&err));
    match status {
        Some(s) => Err(failed(format!("{s}: {}", words(&out, &err)))),
        None => Err(failed(format!(
            "did not finish within {} s: {}",
            timeout.as_secs(),
            words(&out, &err)
        ))),
    }
}

fn words(out: &str, err: &str) -> String {
    match (out.is_empty(), err.is_empty()) {
        (_, false) => err.to_owned(),
        (false, true) => out.to_owned(),
        (true, true) => "no output".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(path: &str, args: &[&str], timeout: Option<i64>) -> Hook {
        let mut h = Hook::default();
        h.set_path(PathBuf::from(path));
        h.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
        h.set_env(Some(vec!["HOOK_ENV=yes".into()]));
        h.set_timeout(timeout);
        h
    }

    fn state(bundle: &Path) -> State<'_> {
        static NONE: std::sync::OnceLock<std::collections::HashMap<String, String>> =
            std::sync::OnceLock::new();
        State {
            oci_version: "1.0.2",
            id: "c1",
            status: "creating",
            pid: 4242,
            bundle,
            annotations: NONE.get_or_init(Default::default),
        }
    }

    #[test]
    fn a_hook_reads_the_state_and_gets_its_args_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let (stdin, argv) = (dir.path().join("stdin"), dir.path().join("argv"));
        let script = format!(
            "cat > {}; echo \"$(tr '\\0' ' ' < /proc/$$/cmdline)$HOOK_ENV\" > {}",
            stdin.display(),
            argv.display()
        );
        let h = hook("/bin/sh", &["hook-name", "-c", &script], None);
        run("prestart", &[h], &state(dir.path())).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&stdin).unwrap()).unwrap();
        assert_eq!(json["pid"], 4242);
        assert_eq!(json["status"], "creating");
        assert_eq!(json["id"], "c1");
        assert_eq!(json["ociVersion"], "1.0.2");
        let argv = std::fs::read_to_string(&argv).unwrap();
        assert!(argv.starts_with("hook-name -c cat > "), "{argv}");
        assert!(argv.ends_with(" yes\n"), "{argv}");
    }

    #[test]
    fn failures_and_timeouts_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let h = hook(
            "/bin/sh",
            &["sh", "-c", "echo no network >&2; exit 3"],
            None,
        );
        let e = run("prestart", &[h], &state(dir.path())).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("prestart hook /bin/sh failed"), "{text}");
        assert!(
            text.contains("exit status: 3") && text.contains("no network"),
            "{text}"
        );

        let h = hook("/bin/sleep", &["sleep", "30"], Some(1));
        let started = Instant::now();
        let e = run("createRuntime", &[h], &state(dir.path())).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(e.to_string().contains("did not finish within 1 s"), "{e}");

        let h = hook("/nonexistent/hook", &[], None);
        let e = run("prestart", &[h], &state(dir.path())).unwrap_err();
        assert!(matches!(e, HookError::Spawn { .. }), "{e}");
    }

    /// Whether `pid` is still a live process (a zombie is not).
    fn alive(pid: i32) -> bool {
        if nix::sys::signal::kill(Pid::from_raw(pid), None).is_err() {
            return false;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // "pid (comm) S ...": the state follows the last ')'.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        !matches!(state, None | Some("Z" | "X"))
    }

    fn read_pid(path: &Path) -> i32 {
        std::fs::read_to_string(path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn a_hook_that_ignores_a_large_state_completes() {
        let dir = tempfile::tempdir().unwrap();
        let annotations: std::collections::HashMap<String, String> = (0..200)
            .map(|i| (format!("a{i}"), "x".repeat(1024)))
            .collect();
        let mut state = state(dir.path());
        state.annotations = &annotations;
        assert!(serde_json::to_vec(&state).unwrap().len() > 200 * 1024);
        let h = hook("/bin/sh", &["sh", "-c", "sleep 0.2; exit 0"], Some(10));
        let started = Instant::now();
        run("prestart", &[h], &state).unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        // One that never reads it is still bound by its timeout.
        let h = hook("/bin/sleep", &["sleep", "30"], Some(1));
        let started = Instant::now();
        let e = run("prestart", &[h], &state).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        assert!(e.to_string().contains("did not finish within 1 s"), "{e}");
        // One that fails without reading it still says why.
        let h = hook("/bin/sh", &["sh", "-c", "echo bad >&2; exit 1"], Some(10));
        let e = run("prestart", &[h], &state).unwrap_err();
        assert!(e.to_string().contains("bad"), "{e}");
    }

    #[test]
    fn a_hook_leaving_a_process_on_its_output_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let pid = dir.path().join("pid");
        let script = format!("sleep 30 & echo $! > {}; exit 0", pid.display());
        let h = hook("/bin/sh", &["sh", "-c", &script], Some(10));
        let started = Instant::now();
        let ran = run("prestart", &[h], &state(dir.path()));
        let took = started.elapsed();
        let sleeper = read_pid(&pid);
        // It succeeded: what it left behind is its business.
        assert!(alive(sleeper));
        let _ = nix::sys::signal::kill(Pid::from_raw(sleeper), Signal::SIGKILL);
        ran.unwrap();
        assert!(took < Duration::from_secs(3), "{took:?}");

        // A failing one: its output is waited for only a short while.
        let script = format!(
            "echo broken >&2; sleep 30 & echo $! > {}; exit 2",
            pid.display()
        );
        let h = hook("/bin/sh", &["sh", "-c", &script], Some(10));
        let started = Instant::now();
        let e = run("prestart", &[h], &state(dir.path())).unwrap_err();
        let took = started.elapsed();
        let _ = nix::sys::signal::kill(Pid::from_raw(read_pid(&pid)), Signal::SIGKILL);
        let text = e.to_string();
        assert!(
            text.contains("exit status: 2") && text.contains("broken"),
            "{text}"
        );
        assert!(took < Duration::from_secs(4), "{took:?}");
    }

    #[test]
    fn a_timeout_kills_the_hooks_group() {
        let dir = tempfile::tempdir().unwrap();
        let (pids, ready) = (dir.path().join("pids"), dir.path().join("ready"));
        let script = format!(
            "sleep 30 & echo $$ $! > {}; mv {} {}; wait",
            ready.display(),
            ready.display(),
            pids.display()
        );
        let h = hook("/bin/sh", &["sh", "-c", &script], Some(1));
        let started = Instant::now();
        let e = run("createRuntime", &[h], &state(dir.path())).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(e, HookError::Failed { .. }), "{e}");
        assert!(e.to_string().contains("did not finish within 1 s"), "{e}");
        let pids: Vec<i32> = std::fs::read_to_string(&pids)
            .unwrap()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(pids.len(), 2);
        // The orphaned sleep is reaped by init: give it a moment.
        let until = Instant::now() + Duration::from_secs(3);
        while pids.iter().any(|p| alive(*p)) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        for pid in pids {
            assert!(!alive(pid), "{pid} survived the timeout");
        }
        // Nothing is left in the group either (the hook was its leader).
        let group = read_pid_group(&dir);
        assert!(group.is_none(), "{group:?}");
    }

    /// Any process still in the group whose leader's pid is in `dir/pids`.
    fn read_pid_group(dir: &tempfile::TempDir) -> Option<i32> {
        let text = std::fs::read_to_string(dir.path().join("pids")).unwrap();
        let leader: i32 = text.split_whitespace().next().unwrap().parse().unwrap();
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .find(|pid| {
                alive(*pid)
                    && nix::unistd::getpgid(Some(Pid::from_raw(*pid)))
                        .is_ok_and(|g| g.as_raw() == leader)
            })
    }

    #[test]
    fn a_hook_printing_a_lot_is_not_killed() {
        let dir = tempfile::tempdir().unwrap();
        let h = hook(
            "/bin/sh",
            &["sh", "-c", "head -c 1048576 /dev/zero"],
            Some(10),
        );
        run("prestart", &[h], &state(dir.path())).unwrap();
        // A failing one's error quotes only the start of it.
        let h = hook(
            "/bin/sh",
            &["sh", "-c", "head -c 1048576 /dev/zero | tr '\\0' x; exit 1"],
            Some(10),
        );
        let e = run("prestart", &[h], &state(dir.path())).unwrap_err();
        let HookError::Failed { reason, .. } = &e else {
            panic!("{e}");
        };
        let printed = reason.strip_prefix("exit status: 1: ").unwrap_or_default();
        assert_eq!(printed, "x".repeat(OUTPUT_LIMIT), "{reason:.100}");
    }

    #[test]
    fn the_env_is_inherited_without_one_and_replaced_with_one() {
        let dir = tempfile::tempdir().unwrap();
        let (name, value) = ["CARGO_MANIFEST_DIR", "HOME", "PATH"]
            .into_iter()
            .find_map(|k| Some((k, std::env::var(k).ok()?)))
            .expect("the test runs with CARGO_MANIFEST_DIR, HOME or PATH set");
        let file = dir.path().join("env");
        let script = format!(
            "echo \"${{{name}-unset}}|${{HOOK_ENV-unset}}\" > {}",
            file.display()
        );

        let mut h = hook("/bin/sh", &["sh", "-c", &script], None);
        h.set_env(None);
        run("prestart", &[h], &state(dir.path())).unwrap();
        let got = std::fs::read_to_string(&file).unwrap();
        assert_eq!(got, format!("{value}|unset\n"));

        let h = hook("/bin/sh", &["sh", "-c", &script], None);
        run("prestart", &[h], &state(dir.path())).unwrap();
        let got = std::fs::read_to_string(&file).unwrap();
        // The shell may give PATH a default of its own, not the shim's.
        assert!(got.ends_with("|yes\n"), "{got}");
        assert!(!got.starts_with(&format!("{value}|")), "{got}");
    }

    #[test]
    fn hooks_leave_the_guests_spec() {
        let mut spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "hooks": {
                "prestart": [{"path": "/usr/bin/a"}],
                "createRuntime": [{"path": "/usr/bin/b"}],
                "createContainer": [{"path": "/usr/bin/c"}],
                "poststart": [{"path": "/usr/bin/d"}],
                "poststop": [{"path": "/usr/bin/e"}]
            }
        }))
        .unwrap();
        let (hooks, dropped) = HostHooks::take(&mut spec);
        let guest = spec.hooks().as_ref().unwrap();
        assert_eq!(guest.create_container().as_ref().unwrap().len(), 1);
        assert!(guest.prestart().is_none() && guest.poststop().is_none());
        let paths = |h: &[Hook]| {
            h.iter()
                .map(|h| h.path().display().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(paths(&hooks.create), ["/usr/bin/a", "/usr/bin/b"]);
        assert_eq!(paths(&hooks.poststart), ["/usr/bin/d"]);
        assert_eq!(paths(&hooks.poststop), ["/usr/bin/e"]);
        assert_eq!(dropped.len(), 1);
        assert!(dropped[0].contains("/usr/bin/c"));
    }
}
