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
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::{Hook, Spec};

/// How long a hook without a timeout may run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// How much of a failed hook's output is kept for the error.
const OUTPUT_LIMIT: usize = 4096;

/// Errors running hooks.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
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
/// Blocks.
pub fn run(stage: &'static str, hooks: &[Hook], state: &State<'_>) -> Result<(), HookError> {
    let input = serde_json::to_vec(state).unwrap_or_default();
    for hook in hooks {
        run_one(stage, hook, &input)?;
    }
    Ok(())
}

/// Runs every hook of `hooks`, logging failures (poststart, poststop).
pub fn run_logged(stage: &'static str, hooks: &[Hook], state: &State<'_>) {
    let input = serde_json::to_vec(state).unwrap_or_default();
    for hook in hooks {
        if let Err(e) = run_one(stage, hook, &input) {
            tracing::warn!(container = state.id, error = %crate::describe(&e), "hook failed");
        }
    }
}

fn run_one(stage: &'static str, hook: &Hook, input: &[u8]) -> Result<(), HookError> {
    let path = hook.path().clone();
    let failed = |reason: String| HookError::Failed {
        stage,
        path: path.clone(),
        reason,
    };
    let mut cmd = Command::new(&path);
    let args = hook.args().clone().unwrap_or_default();
    // args[0] is the program's argv[0], as in execve.
    if let Some((argv0, rest)) = args.split_first() {
        std::os::unix::process::CommandExt::arg0(&mut cmd, argv0);
        cmd.args(rest);
    }
    cmd.env_clear();
    for kv in hook.env().clone().unwrap_or_default() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| HookError::Spawn {
            stage,
            path: path.clone(),
            source,
        })?;
    // A hook that does not read its stdin gets EPIPE: not its failure.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    let collect = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(p) = pipe {
                let _ = p.take(OUTPUT_LIMIT as u64 * 16).read_to_end(&mut out);
            }
            out
        })
    };
    let stdout = collect(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = collect(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let timeout = hook
        .timeout()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(failed(format!("cannot wait for it: {e}"))),
        }
    };
    let output = |h: std::thread::JoinHandle<Vec<u8>>| {
        let bytes = h.join().unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes).trim().to_string();
        text.chars().take(OUTPUT_LIMIT).collect::<String>()
    };
    let (out, err) = (output(stdout), output(stderr));
    match status {
        Some(s) if s.success() => {
            tracing::info!(stage, hook = %path.display(), "hook ran");
            Ok(())
        }
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
