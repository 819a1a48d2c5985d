//! capsid-vhost confines every thread of every device kind with seccomp
//! (`--seccomp kill` by default), and `--seccomp off` installs nothing.
//!
//! Each test starts a device without QEMU, waits for its socket, and reads
//! `/proc/<pid>/task/*/status`; then a client connects (as QEMU would) and
//! leaves, which takes the process through its connected state and its
//! clean-up under the filters: it must exit 0, not die of SIGSYS.
//! Runs as root (net makes a tap in a private network namespace).

// Test helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(10);
/// Filters on every thread once the process is confined: the refusals of
/// read-only opens, and the process list.
const PROCESS: u32 = 2;
/// Filters on a thread that stacked its own list on top.
const STACKED: u32 = 3;

fn vhost() -> Command {
    Command::new(env!("CARGO_BIN_EXE_capsid-vhost"))
}

/// A capsid-vhost process, killed if the test ends first.
struct Device {
    child: Child,
}

impl Device {
    /// Starts `cmd` and waits for `socket` to appear.
    fn start(mut cmd: Command, socket: &Path) -> Self {
        let child = cmd
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start capsid-vhost");
        let mut dev = Self { child };
        let start = Instant::now();
        while !socket.exists() {
            if let Some(status) = dev.child.try_wait().unwrap() {
                panic!("capsid-vhost exited early: {status}: {}", dev.stderr());
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "{} never appeared",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        dev
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut text = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut text);
        }
        text
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < TIMEOUT, "capsid-vhost did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to end on its own and checks it ended well.
    fn assert_clean_exit(&mut self) {
        let status = self.wait_exit();
        assert_ne!(
            status.signal(),
            Some(libc::SIGSYS),
            "killed by seccomp: {}",
            self.stderr()
        );
        assert!(status.success(), "{status}: {}", self.stderr());
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One thread's name and seccomp state.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Task {
    name: String,
    /// 0: none, 2: filter.
    mode: u32,
    /// Filters stacked on the thread.
    filters: u32,
}

fn field(status: &str, key: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
}

/// The threads of `pid` (the process's own status first).
fn tasks(pid: u32) -> Vec<Task> {
    let mut out = Vec::new();
    let mut paths = vec![PathBuf::from(format!("/proc/{pid}/status"))];
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        paths.extend(dir.flatten().map(|e| e.path().join("status")));
    }
    for path in paths {
        // A thread may end between listing and reading.
        let Ok(status) = std::fs::read_to_string(&path) else {
            continue;
        };
        let num = |key| {
            field(&status, key)
                .and_then(|v| v.parse().ok())
                .unwrap_or(u32::MAX)
        };
        out.push(Task {
            name: field(&status, "Name:").unwrap_or_default(),
            mode: num("Seccomp:"),
            filters: num("Seccomp_filters:"),
        });
    }
    out
}

/// Waits until `pid` has at least `threads` threads and `ok` holds for
/// every one of them (and for the process's own status); returns them.
fn wait_tasks(pid: u32, threads: usize, ok: impl Fn(&Task) -> bool) -> Vec<Task> {
    let start = Instant::now();
    loop {
        let all = tasks(pid);
        // The process's status plus one entry per thread.
        if all.len() > threads && all.iter().all(&ok) {
            return all;
        }
        assert!(start.elapsed() < TIMEOUT, "threads of {pid}: {all:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn all_filtered(pid: u32, threads: usize) -> Vec<Task> {
    let start = Instant::now();
    loop {
        let all = wait_tasks(pid, threads, |t| t.mode == 2 && t.filters >= PROCESS);
        // A spawned thread names itself just after it starts: until then
        // it has the process's name, as the process's status and its main
        // thread do.
        if all.iter().filter(|t| t.name == "capsid-vhost").count() <= 2 {
            return all;
        }
        assert!(start.elapsed() < TIMEOUT, "threads of {pid}: {all:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn thread<'a>(tasks: &'a [Task], name: &str) -> Vec<&'a Task> {
    tasks.iter().filter(|t| t.name.starts_with(name)).collect()
}

/// Connects as the frontend, waits for the main thread's connected
/// filter, leaves, and checks the device ends cleanly.
fn connect_and_leave(dev: &mut Device, socket: &Path) {
    let conn = UnixStream::connect(socket).unwrap();
    let pid = dev.pid();
    // The main thread (its tid is the pid) stacks its connected filter.
    let start = Instant::now();
    loop {
        let main = tasks(pid);
        if main.first().is_some_and(|t| t.filters == STACKED) {
            break;
        }
        assert!(start.elapsed() < TIMEOUT, "{main:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(conn);
    dev.assert_clean_exit();
}

#[test]
fn blk_threads_are_filtered_and_the_session_ends_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let socket = dir.path().join("blk.sock");
    let mut cmd = vhost();
    cmd.arg("blk")
        .arg("--path")
        .arg(&image)
        .arg("--socket")
        .arg(&socket);
    let mut dev = Device::start(cmd, &socket);
    let all = all_filtered(dev.pid(), 2);
    assert!(!thread(&all, "vring_worker").is_empty(), "{all:?}");
    connect_and_leave(&mut dev, &socket);
}

#[test]
fn blk_takes_a_passed_descriptor_under_the_filter() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let socket = dir.path().join("blk.sock");
    // The jailer's part: open the disk, pass it as fd 7.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"exec "$0" blk --path /proc/self/fd/7 --socket "$1" 7<>"$2""#)
        .arg(env!("CARGO_BIN_EXE_capsid-vhost"))
        .arg(&socket)
        .arg(&image);
    let mut dev = Device::start(cmd, &socket);
    all_filtered(dev.pid(), 2);
    connect_and_leave(&mut dev, &socket);

    // Passed read-only, asked for writing: refused, naming the path.
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"exec "$0" blk --path /dev/fd/7 --socket "$1" 7<"$2""#)
        .arg(env!("CARGO_BIN_EXE_capsid-vhost"))
        .arg(dir.path().join("ro.sock"))
        .arg(&image)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("/dev/fd/7") && stderr.contains("O_RDONLY"),
        "{stderr}"
    );
}

#[test]
fn rng_threads_are_filtered_and_off_installs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("rng.sock");
    let mut cmd = vhost();
    cmd.arg("rng").arg("--socket").arg(&socket);
    let mut dev = Device::start(cmd, &socket);
    let all = all_filtered(dev.pid(), 2);
    // Before any guest event the workers carry the process filter only.
    for t in thread(&all, "vring_worker") {
        assert_eq!(t.filters, PROCESS, "{all:?}");
    }
    connect_and_leave(&mut dev, &socket);

    let socket = dir.path().join("rng-off.sock");
    let mut cmd = vhost();
    cmd.args(["--seccomp", "off", "rng", "--socket"])
        .arg(&socket);
    let mut dev = Device::start(cmd, &socket);
    // Wait for the workers, then: no filter anywhere.
    let all = wait_tasks(dev.pid(), 2, |t| t.mode == 0);
    assert!(all.iter().all(|t| t.filters == 0), "{all:?}");
    let conn = UnixStream::connect(&socket).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(tasks(dev.pid()).iter().all(|t| t.mode == 0));
    drop(conn);
    dev.assert_clean_exit();
    let stderr = dev.stderr();
    assert_eq!(stderr.matches("seccomp is off").count(), 1, "{stderr}");
}

#[test]
fn log_mode_filters_too() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("rng.sock");
    let mut cmd = vhost();
    cmd.arg("rng")
        .arg("--socket")
        .arg(&socket)
        .args(["--seccomp", "log"]);
    let mut dev = Device::start(cmd, &socket);
    all_filtered(dev.pid(), 2);
    connect_and_leave(&mut dev, &socket);
}

#[test]
fn vsock_worker_stacks_its_queue_filter_on_its_first_event() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vhost-vsock.sock");
    let uds = dir.path().join("vsock.sock");
    let mut cmd = vhost();
    cmd.args(["vsock", "--guest-cid", "3", "--uds-path"])
        .arg(&uds)
        .arg("--socket")
        .arg(&socket);
    let mut dev = Device::start(cmd, &socket);
    let all = all_filtered(dev.pid(), 2);
    assert!(thread(&all, "vring_worker")
        .iter()
        .all(|t| t.filters == PROCESS));
    // A host client wakes the worker (the device's listener is on its
    // epoll): the worker confines itself before handling it.
    let mut client = UnixStream::connect(&uds).unwrap();
    client.write_all(b"CONNECT 1234\n").unwrap();
    let all = wait_tasks(dev.pid(), 2, |t| {
        t.mode == 2 && (t.filters == STACKED || !t.name.starts_with("vring_worker"))
    });
    assert!(!thread(&all, "vring_worker").is_empty(), "{all:?}");
    drop(client);
    connect_and_leave(&mut dev, &socket);
}

#[test]
fn console_is_filtered_before_and_after_qemu_connects() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("console.sock");
    let log = dir.path().join("console.log");
    let mut cmd = vhost();
    cmd.args(["console", "--max-bytes", "4096", "--socket"])
        .arg(&socket)
        .arg("--log")
        .arg(&log);
    let mut dev = Device::start(cmd, &socket);
    let all = all_filtered(dev.pid(), 0);
    assert_eq!(all[0].filters, PROCESS, "{all:?}");
    let mut qemu = UnixStream::connect(&socket).unwrap();
    // Enough to rotate the log a few times under the copy loop's filter.
    for i in 0..1000 {
        writeln!(qemu, "guest line {i:04}").unwrap();
    }
    wait_tasks(dev.pid(), 0, |t| t.mode == 2 && t.filters == STACKED);
    drop(qemu);
    dev.assert_clean_exit();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.ends_with("guest line 0999\n"), "{text}");
    assert!(dir.path().join("console.log.1").exists());
}

#[test]
fn net_threads_are_filtered_including_the_relay() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root for a tap");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("net.sock");
    // A private network namespace holding one tap, gone with the process.
    let mut cmd = Command::new("unshare");
    cmd.args(["-n", "sh", "-c"])
        .arg(r#"ip tuntap add dev capst0 mode tap && ip link set capst0 up && exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_capsid-vhost"))
        .args(["net", "--tap", "capst0", "--socket"])
        .arg(&socket);
    let mut dev = Device::start(cmd, &socket);
    // Main, the relay (waiting for QEMU) and the worker.
    let all = all_filtered(dev.pid(), 3);
    assert!(!thread(&all, "vhost-user-rela").is_empty(), "{all:?}");
    let conn = UnixStream::connect(&socket).unwrap();
    // The relay and its replies thread stack their own filter.
    let all = wait_tasks(dev.pid(), 4, |t| {
        t.mode == 2 && (t.filters == STACKED || !t.name.starts_with("vhost-user-rela"))
    });
    assert_eq!(thread(&all, "vhost-user-rela").len(), 2, "{all:?}");
    drop(conn);
    dev.assert_clean_exit();
}
