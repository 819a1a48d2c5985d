//! containerd driving capsid's shim in tests: a private containerd with the
//! test images imported, a capsid config pointing at this build (state and
//! cache in a temp dir), `ctr run` with the shim given by its absolute path
//! and the config by `--runtime-config-path`, and a check that nothing a
//! sandbox made is left behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::containerd::Containerd;
use crate::{artifact, bin, run};

/// The busybox test image.
pub const BUSYBOX: &str = "docker.io/capsid/busybox:latest";
/// The three-layer image with a whiteout and an opaque directory.
pub const LAYERED: &str = "docker.io/capsid/layered:latest";

/// Writes `DIR/capsid.toml`: this build's assets and binaries, state and
/// cache under `DIR`, QEMU-TCG; returns its path.
pub fn write_capsid_config(dir: &Path) -> PathBuf {
    let c = crate::sandbox::test_config(dir);
    let text = format!(
        "[paths]\nkernel = {:?}\nbzimage = {:?}\ninitramfs = {:?}\nimages_dir = {:?}\n\
         cache_dir = {:?}\nstate_dir = {:?}\nvhost = {:?}\nvmm = {:?}\njailer = {:?}\n\
         [backend]\nkind = \"qemu-tcg\"\n",
        c.paths.kernel,
        c.paths.bzimage,
        c.paths.initramfs,
        c.paths.images_dir,
        c.paths.cache_dir,
        c.paths.state_dir,
        c.paths.vhost,
        c.paths.vmm,
        c.paths.jailer,
    );
    let config = dir.join("capsid.toml");
    std::fs::write(&config, text).expect("write capsid config");
    config
}

/// What pooled sandboxes left in the pool's directory `dir`
/// (`<state>/.pool`): the daemon's lock stays; sockets, records and logs
/// must not.
pub fn pool_leftovers(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if !entry.path().is_dir() {
            if entry.file_name() != "poold.lock" {
                found.push(format!("pool file {}", entry.path().display()));
            }
            continue;
        }
        for file in std::fs::read_dir(entry.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            found.push(format!("pool file {}", file.path().display()));
        }
    }
    found
}

/// What sandboxes left in capsid's state directory: run directories, and
/// the network namespaces pinned under `.netns` (the directory itself may
/// stay).
pub fn state_leftovers(state_dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(state_dir).into_iter().flatten().flatten() {
        if entry.file_name() == ".netns" {
            for ns in std::fs::read_dir(entry.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                found.push(format!("network namespace {}", ns.path().display()));
            }
        } else if entry.file_name() == ".jail" {
            // The uid locks stay (the kernel releases them); the jail root
            // is a mount point only inside jails: empty on the host.
            if !crate::cli::is_empty_dir(&entry.path().join("root")) {
                found.push(format!(
                    "jail root {}/root not empty",
                    entry.path().display()
                ));
            }
        } else if entry.file_name() == ".pool" {
            found.extend(pool_leftovers(&entry.path()));
        } else if entry.file_name() == ".shares" {
            for share in std::fs::read_dir(entry.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                found.push(format!("volume share {}", share.path().display()));
            }
        } else {
            found.push(format!("run dir {}", entry.path().display()));
        }
    }
    found
}

/// A private containerd set up for capsid's shim.
#[derive(Debug)]
pub struct ShimHarness {
    /// The containerd.
    pub ctrd: Containerd,
    dir: tempfile::TempDir,
    config: PathBuf,
    shim: PathBuf,
}

impl ShimHarness {
    /// Starts containerd, imports the test images and writes the config.
    pub fn start() -> Self {
        let ctrd = Containerd::start();
        for name in ["busybox", "layered"] {
            let tar = artifact(&format!("images/{name}.tar"));
            let (code, out, err) = run(ctrd.ctr().args(["images", "import"]).arg(&tar));
            assert_eq!(code, 0, "import {name}: {out}{err}");
        }
        let dir = tempfile::Builder::new()
            .prefix("capsid-shim")
            .tempdir()
            .expect("temp dir");
        let config = write_capsid_config(dir.path());
        Self {
            ctrd,
            dir,
            config,
            shim: bin("containerd-shim-capsid-v2"),
        }
    }

    /// The shim binary (given to `ctr run --runtime` by path).
    pub fn shim(&self) -> &Path {
        &self.shim
    }

    /// The capsid config file the shim is given.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// capsid's state directory (sandbox run directories).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// capsid's cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// `ctr run --runtime <shim> --runtime-config-path <config> [flags]
    /// IMAGE ID ARGS…`, stdin from /dev/null.
    pub fn run_cmd(&self, flags: &[&str], image: &str, id: &str, args: &[&str]) -> Command {
        let mut cmd = self.ctrd.ctr();
        cmd.arg("run")
            .arg("--runtime")
            .arg(&self.shim)
            .arg("--runtime-config-path")
            .arg(&self.config)
            .args(flags)
            .arg(image)
            .arg(id)
            .args(args);
        cmd
    }

    /// Runs a container to its end (`--rm`): (exit code, stdout, stderr).
    pub fn run(&self, id: &str, image: &str, args: &[&str]) -> (i32, String, String) {
        run(&mut self.run_cmd(&["--rm"], image, id, args))
    }

    /// Runs a busybox container with extra `ctr run` flags.
    pub fn run_with(&self, flags: &[&str], id: &str, args: &[&str]) -> (i32, String, String) {
        run(&mut self.run_cmd(flags, BUSYBOX, id, args))
    }

    /// Starts a detached container (`-d`) and waits until it runs.
    pub fn run_detached(&self, id: &str, args: &[&str]) {
        let (code, out, err) = run(&mut self.run_cmd(&["-d"], BUSYBOX, id, args));
        assert_eq!(code, 0, "ctr run -d {id}: {out}{err}\n{}", self.log_tail());
        self.wait_status(id, "RUNNING", Duration::from_secs(10));
    }

    /// `ctr ARGS…`: (exit code, stdout, stderr).
    pub fn ctr(&self, args: &[&str]) -> (i32, String, String) {
        run(self.ctrd.ctr().args(args))
    }

    /// The task's status as `ctr task ls` shows it ("" if it has none).
    pub fn status(&self, id: &str) -> String {
        let (_, out, _) = self.ctr(&["task", "ls"]);
        out.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&id)).then(|| f.last().unwrap_or(&"").to_string())
            })
            .next()
            .unwrap_or_default()
    }

    /// Waits until the task's status is `want`.
    pub fn wait_status(&self, id: &str, want: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            let now = self.status(id);
            if now == want {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "task {id} is {now:?}, not {want:?}, after {timeout:?}\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until containerd, told the shim of task `id` died, has run
    /// `delete` in its bundle (its cleanup report is in the log) and
    /// forgotten the task.
    pub fn wait_dead_shim_cleaned_up(&self, id: &str) {
        let start = Instant::now();
        while !self.status(id).is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "task {id} still listed"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let start = Instant::now();
        while !self.log().contains("killed sandbox process") {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "no cleanup report\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// containerd's log (the shims log into it).
    pub fn log(&self) -> String {
        self.ctrd.log()
    }

    /// The last lines of the log, for assertion messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Host pids of a running task's VM (QEMU and its device processes).
    pub fn vm_pids(&self, id: &str) -> Vec<u32> {
        // The run directory is `default-{id}-{digest}`.
        processes_with(&format!("{}/default-{id}-", self.state_dir().display()))
    }

    /// The pid of the shim serving task `id`.
    pub fn shim_pid(&self, id: &str) -> Option<u32> {
        let socket = self.ctrd.socket().display().to_string();
        processes_with(&socket).into_iter().find(|pid| {
            let args = cmdline(*pid);
            args.iter()
                .any(|a| a.ends_with("containerd-shim-capsid-v2"))
                && args.windows(2).any(|w| w[0] == "-id" && w[1] == id)
                && !args.iter().any(|a| a == "start" || a == "delete")
        })
    }

    /// Everything capsid may have left behind: processes (VMs, device
    /// backends, shims), mounts, sandbox run directories, shim sockets,
    /// bundle state files and cache files other than finished disks.
    pub fn leftovers(&self, ids: &[&str]) -> Vec<String> {
        let mut found = Vec::new();
        let dir = self.dir.path().display().to_string();
        for pid in processes_with(&dir) {
            found.push(format!("process {pid}: {}", cmdline(pid).join(" ")));
        }
        let socket = self.ctrd.socket().display().to_string();
        for pid in processes_with(&socket) {
            let args = cmdline(pid);
            if args.iter().any(|a| a.contains("containerd-shim-capsid-v2")) {
                found.push(format!("shim {pid}: {}", args.join(" ")));
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for m in mounts.lines() {
            if m.contains(&dir) || m.contains("capsid-lowers") {
                found.push(format!("mount {m}"));
            }
        }
        found.extend(state_leftovers(&self.state_dir()));
        for entry in std::fs::read_dir(self.cache_dir().join("images"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !(name.ends_with(".erofs") || name.ends_with(".ext4")) || name.contains(".tmp-") {
                found.push(format!("cache file {name}"));
            }
        }
        for id in ids {
            let socket = shim_socket(&self.ctrd.socket(), "default", id);
            if socket.exists() {
                found.push(format!("shim socket {}", socket.display()));
            }
            let bundle = self
                .ctrd
                .state()
                .join("io.containerd.runtime.v2.task/default")
                .join(id);
            if bundle.exists() {
                found.push(format!("bundle {}", bundle.display()));
            }
        }
        found
    }

    /// Asserts that nothing is left behind, waiting a little for
    /// containerd's asynchronous cleanup.
    pub fn assert_clean(&self, ids: &[&str]) {
        let start = Instant::now();
        loop {
            let left = self.leftovers(ids);
            if left.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "left behind:\n{}\n\nlog:\n{}",
                left.join("\n"),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ShimHarness {
    /// A failed test may leave tasks running: their shims and VMs go with
    /// the harness (containerd itself would leave them running).
    fn drop(&mut self) {
        let socket = self.ctrd.socket().display().to_string();
        for pid in processes_with(&socket) {
            let args = cmdline(pid);
            if !args.iter().any(|a| a.contains("containerd-shim-capsid-v2")) {
                continue;
            }
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            if let Some(w) = args.windows(2).find(|w| w[0] == "-socket") {
                let _ = std::fs::remove_file(w[1].trim_start_matches("unix://"));
            }
        }
        for pid in processes_with(&self.dir.path().display().to_string()) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// The shim socket containerd derives for a task.
pub fn shim_socket(containerd_socket: &Path, namespace: &str, id: &str) -> PathBuf {
    let text = format!("{}/{namespace}/{id}", containerd_socket.display());
    PathBuf::from(format!(
        "/run/containerd/s/{:x}",
        Sha256::digest(text.as_bytes())
    ))
}

/// A process's arguments.
pub fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Live (not zombie) processes, other than this test, with an argument
/// containing `needle`.
pub fn processes_with(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| *pid != me)
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next())
                .unwrap_or("Z");
            state != "Z" && cmdline(*pid).iter().any(|a| a.contains(needle))
        })
        .collect()
}

/// A `ctr run` in the background with its stdout read line by line.
#[derive(Debug)]
pub struct Background {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Background {
    /// Spawns `cmd` with stdout piped.
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ctr");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the next output line.
    pub fn line(&self, timeout: Duration) -> String {
        self.lines
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("no output line within {timeout:?}: {e}"))
    }

    /// Collects output lines until `done` holds for what was collected, or
    /// `timeout` passes.
    pub fn lines_until(&self, done: impl Fn(&[String]) -> bool, timeout: Duration) -> Vec<String> {
        let start = Instant::now();
        let mut lines = Vec::new();
        while !done(&lines) {
            let left = timeout.saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(_) => break,
            }
        }
        lines
    }

    /// Waits for ctr to end: (exit code, rest of stdout, stderr).
    pub fn wait(mut self, timeout: Duration) -> (i32, String, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait ctr") {
                break status;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                panic!("ctr did not end within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut rest = String::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            rest.push_str(&line);
            rest.push('\n');
        }
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        (status.code().unwrap_or(-1), rest, err)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
