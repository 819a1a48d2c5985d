//! Running capsid-vmm from tests: a VM config in a temporary directory,
//! the serial console in a file, the control socket at hand; its threads
//! as /proc shows them, and virtiofsd for its fs device.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::asm::{self, LIB64};
use crate::bin;

/// A capsid-vmm process started by a test.
#[derive(Debug)]
pub struct Vmm {
    /// The process.
    pub child: Child,
    /// Its directory (config, serial log, sockets).
    pub dir: tempfile::TempDir,
    /// Whether `child` is a [`Launch::wrapper`], capsid-vmm its child.
    wrapped: bool,
}

/// How [`Vmm::start_with`] runs capsid-vmm, beyond its config.
#[derive(Debug, Default, Clone)]
pub struct Launch {
    /// A program and its arguments that capsid-vmm runs under (e.g.
    /// `strace -f -o <file>`); empty: none.
    pub wrapper: Vec<OsString>,
    /// Arguments after `--config <file>` (e.g. `--seccomp off`).
    pub args: Vec<String>,
    /// Variables removed from the environment it inherits.
    pub env_remove: Vec<String>,
    /// Variables set (after `env_remove`).
    pub env: Vec<(String, String)>,
}

/// How a capsid-vmm run ended.
#[derive(Debug)]
pub struct Ended {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// The serial console.
    pub serial: String,
    /// capsid-vmm's stderr.
    pub stderr: String,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
}

impl Vmm {
    /// Starts capsid-vmm on `config`, a JSON object without `serial` and
    /// `control_socket` (both are added, inside the temporary directory).
    pub fn start(config: Value) -> Self {
        Self::start_with_env(config, &[])
    }

    /// As [`Vmm::start`], with extra environment variables.
    pub fn start_with_env(config: Value, env: &[(&str, &str)]) -> Self {
        let env = env.iter().map(|(k, v)| ((*k).into(), (*v).into()));
        Self::start_with(
            config,
            &Launch {
                env: env.collect(),
                ..Launch::default()
            },
        )
    }

    /// As [`Vmm::start`], run as `launch` says.
    pub fn start_with(config: Value, launch: &Launch) -> Self {
        Self::spawn(tempfile::tempdir().expect("temp dir"), config, launch)
    }

    /// As [`Vmm::start_with`], booting a tiny guest: `source` assembled
    /// with [`LIB64`] (by [`asm::elf`]) into the VMM's directory, its
    /// `boot` added to `config`.
    pub fn start_tiny(source: &str, mut config: Value, launch: &Launch) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let kernel = asm::elf(&format!("{source}{LIB64}"), dir.path(), "guest");
        config["boot"] = json!({"linux": {"kernel": kernel}});
        Self::spawn(dir, config, launch)
    }

    fn spawn(dir: tempfile::TempDir, config: Value, launch: &Launch) -> Self {
        let path = write_config(dir.path(), config);
        let mut cmd = match launch.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(bin("capsid-vmm"));
                cmd
            }
            None => Command::new(bin("capsid-vmm")),
        };
        cmd.arg("--config").arg(&path);
        let child = launch_child(cmd, dir.path(), launch, "start capsid-vmm");
        Self {
            child,
            dir,
            wrapped: !launch.wrapper.is_empty(),
        }
    }

    /// Starts capsid-vmm restoring the snapshot `state` (with its memory
    /// file `memory`), as `launch` says. With `config` (a JSON object
    /// without `serial` and `control_socket`: both are added, inside a new
    /// temporary directory, as [`Vmm::start`] does) the restored VM gets
    /// those host-side paths; without it, the snapshot's own.
    pub fn restore(state: &Path, memory: &Path, config: Option<Value>, launch: &Launch) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cmd = Command::new(bin("capsid-vmm"));
        cmd.arg("--restore").arg(state).arg("--memory").arg(memory);
        if let Some(config) = config {
            cmd.arg("--config").arg(write_config(dir.path(), config));
        }
        let child = launch_child(cmd, dir.path(), launch, "start capsid-vmm --restore");
        Self {
            child,
            dir,
            wrapped: false,
        }
    }

    /// capsid-vmm's pid: the child's, or its wrapper's only child.
    pub fn pid(&self) -> u32 {
        let id = self.child.id();
        if !self.wrapped {
            return id;
        }
        let children = std::fs::read_to_string(format!("/proc/{id}/task/{id}/children"))
            .expect("the wrapper's children");
        children
            .split_whitespace()
            .next()
            .and_then(|pid| pid.parse().ok())
            .expect("capsid-vmm under its wrapper")
    }

    /// The serial console so far.
    pub fn serial(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serial.log")).unwrap_or_default()
    }

    /// capsid-vmm's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// The control socket path.
    pub fn control_path(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    /// Waits until the serial console contains `text`; panics after
    /// `timeout` or if the VMM exits first.
    pub fn wait_serial(&mut self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let serial = self.serial();
            if serial.contains(text) {
                return serial;
            }
            if let Some(status) = self.child.try_wait().expect("wait") {
                panic!(
                    "capsid-vmm exited ({status}) before printing {text:?}\nserial:\n{serial}\nstderr:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} on the serial console within {timeout:?}\nserial:\n{serial}\nstderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends one control request and returns the answer.
    pub fn control(&self, request: Value) -> Value {
        control(&self.control_path(), request)
    }

    /// A connection to the control socket, for several requests (the VMM
    /// serves it on a thread of its own while it stays open).
    pub fn connect(&self) -> UnixStream {
        UnixStream::connect(self.control_path()).expect("connect to the control socket")
    }

    /// One request on a new connection; `None` when it closed without an
    /// answer (the VMM died).
    pub fn ask(&self, request: &Value) -> Option<Value> {
        ask(&self.connect(), request)
    }

    /// The VMM's resident set size in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }

    /// Waits for the VMM to exit; kills it and panics after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Ended {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "capsid-vmm did not exit within {timeout:?}\nserial:\n{}\nstderr:\n{}",
                    self.serial(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Ended {
            code: status.code().unwrap_or(-1),
            serial: self.serial(),
            stderr: self.stderr(),
            signal: status.signal(),
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends one line-delimited JSON request to a capsid-vmm control socket,
/// waiting up to 5 s for the socket to appear.
pub fn control(path: &Path, request: Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    let stream = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("cannot connect to {}: {e}", path.display()),
        }
    };
    ask(&stream, &request).unwrap_or_else(|| panic!("no answer to {request} on {}", path.display()))
}

/// Sends one request on an open control connection; `None` when the
/// connection closed (or failed) without an answer.
pub fn ask(stream: &UnixStream, request: &Value) -> Option<Value> {
    let mut line = request.to_string();
    line.push('\n');
    (&*stream).write_all(line.as_bytes()).ok()?;
    let mut answer = String::new();
    match BufReader::new(stream).read_line(&mut answer) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(
            serde_json::from_str(&answer).unwrap_or_else(|e| panic!("bad answer {answer:?}: {e}")),
        ),
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds: what capsid-vmm's
/// `first_kvm_run_monotonic_ns` is measured in.
pub fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    u64::try_from(now.tv_sec()).expect("seconds") * 1_000_000_000
        + u64::try_from(now.tv_nsec()).expect("nanoseconds")
}

/// VmRSS of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_field(Path::new(&format!("/proc/{pid}/status")), "VmRSS")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// The value of `field` (e.g. `Seccomp`) in a /proc `status` file, trimmed;
/// `None` when the file or the field is not there (a thread that ended).
pub fn status_field(status: &Path, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(status).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// Every thread of process `pid`, sorted: its name (`comm`) and the
/// value of `field` in its status.
pub fn thread_fields(pid: u32, field: &str) -> Vec<(String, Option<String>)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/<pid>/task");
    let mut out: Vec<_> = tasks
        .map(|task| {
            let task = task.expect("task entry").path();
            let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
            let value = status_field(&task.join("status"), field);
            (name.trim().to_string(), value)
        })
        .collect();
    out.sort();
    out
}

/// virtiofsd (`make deps` installs it) serving a directory to capsid-vmm's
/// fs device; killed when dropped.
#[derive(Debug)]
pub struct Virtiofsd(pub Child);

impl Virtiofsd {
    /// Where `make deps` installs it.
    pub const PATH: &'static str = "/usr/local/bin/virtiofsd";

    /// Starts it serving `shared` on `socket` and waits for the socket;
    /// panics (with how to install it) when it is not installed.
    pub fn start(shared: &Path, socket: &Path) -> Self {
        assert!(
            Path::new(Self::PATH).exists(),
            "{} is not installed: run `make deps`",
            Self::PATH
        );
        let mut daemon = Self(
            Command::new(Self::PATH)
                .arg("--shared-dir")
                .arg(shared)
                .arg("--socket-path")
                .arg(socket)
                .args(["--sandbox", "namespace", "--log-level", "warn"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .expect("start virtiofsd"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                daemon.0.try_wait().expect("wait").is_none(),
                "virtiofsd died"
            );
            assert!(Instant::now() < deadline, "no virtiofsd socket");
            std::thread::sleep(Duration::from_millis(5));
        }
        daemon
    }

    /// Starts it serving a new directory `share` in `dir`, on
    /// `dir/virtiofsd.sock`; returns it and the socket.
    pub fn share_new_dir(dir: &Path) -> (Self, PathBuf) {
        let shared = dir.join("share");
        std::fs::create_dir(&shared).expect("create the shared directory");
        let socket = dir.join("virtiofsd.sock");
        (Self::start(&shared, &socket), socket)
    }

    /// Whether it ends within `timeout` (as it does with its only client).
    pub fn ends_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.0.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes `config` (a JSON object) as `dir/vm.json`, with its serial log
/// and control socket in `dir`: the file's path.
fn write_config(dir: &Path, mut config: Value) -> PathBuf {
    let obj = config.as_object_mut().expect("config is an object");
    obj.insert(
        "serial".into(),
        dir.join("serial.log").display().to_string().into(),
    );
    obj.insert(
        "control_socket".into(),
        dir.join("api.sock").display().to_string().into(),
    );
    let path = dir.join("vm.json");
    std::fs::write(&path, config.to_string()).expect("write config");
    path
}

/// Spawns `cmd` with `launch`'s arguments and environment, stdin and
/// stdout on /dev/null and stderr in `dir/stderr.log`.
fn launch_child(mut cmd: Command, dir: &Path, launch: &Launch, what: &str) -> Child {
    cmd.args(&launch.args);
    for name in &launch.env_remove {
        cmd.env_remove(name);
    }
    let stderr = std::fs::File::create(dir.join("stderr.log")).expect("stderr log");
    cmd.envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect(what)
}
