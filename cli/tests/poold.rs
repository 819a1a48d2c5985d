//! `capsid-poold` against a fake warm shim (a Python script): it fills
//! each shape to its size, refills what is taken, backs off from a shim
//! that fails, adopts what a previous daemon left and removes what the
//! dead left, and on SIGTERM stops every unclaimed shim it started while
//! the claimed one keeps running. The real shim's `warm` action is tested
//! with the shim.

// Test helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use capsid_sandbox::config::Config;
use capsid_sandbox::pool::{self, Shape};
use capsid_sandbox::pool_daemon::{self, DaemonState};
use capsid_sandbox::process::ProcessRef;
use capsid_sandbox::record::{HostRecord, RecordFile};

/// The fake warm shim. It finds its shape's directory from the keys the
/// test computed (`FAKE_KEYS`), writes a record, binds its socket under a
/// staging name and renames it into place, says `ready` and closes stdout;
/// on SIGTERM it removes its socket and record. `FAKE_MODE=fail` makes it
/// exit 1 before it is ready. Every start and stop is appended to
/// `FAKE_EVENTS`.
const FAKE: &str = r#"#!/usr/bin/env python3
import json, os, signal, socket, sys, time
name = os.environ["CAPSID_POOL_NAME"]
shape = os.environ["CAPSID_POOL_VCPUS"] + "x" + os.environ["CAPSID_POOL_MEMORY_MIB"]
events = os.environ["FAKE_EVENTS"]
def event(what):
    with open(events, "a") as f:
        f.write("%s %s %d\n" % (what, name, os.getpid()))
event("start")
assert sys.argv[1:] == ["warm"], sys.argv
assert os.environ.get("CAPSID_CONFIG") == os.environ["FAKE_CONFIG"]
if os.environ.get("FAKE_MODE") == "fail":
    print("fake: the guest kernel panicked", file=sys.stderr, flush=True)
    sys.exit(1)
shape_dir = os.path.join(os.environ["FAKE_POOL_DIR"], json.loads(os.environ["FAKE_KEYS"])[shape])
sock = os.path.join(shape_dir, name + ".sock")
record = os.path.join(shape_dir, name + ".record")
with open(record, "w") as f:
    json.dump({"sandbox": name, "run_dir": ""}, f)
staging = os.path.join(shape_dir, "." + name + ".sock")
s = socket.socket(socket.AF_UNIX)
s.bind(staging)
s.listen(16)
def stop(*_):
    for p in (sock, record):
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
    event("stop")
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
os.rename(staging, sock)
print("ready", flush=True)
sys.stdout.close()
print("fake: waiting for a claim", file=sys.stderr, flush=True)
while True:
    signal.pause()
"#;

/// The fake, written once before any test spawns anything (a script being
/// written while another thread forks could not be executed: ETXTBSY).
fn fake() -> &'static Path {
    static FAKE_PATH: OnceLock<PathBuf> = OnceLock::new();
    FAKE_PATH.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("poold-fake-shim.py");
        if std::fs::read_to_string(&path).ok().as_deref() != Some(FAKE) {
            let staging = path.with_extension("tmp");
            std::fs::write(&staging, FAKE).unwrap();
            std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::rename(&staging, &path).unwrap();
        }
        path
    })
}

/// One daemon's world: a state directory and a config.
struct World {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    config: Config,
    mode: &'static str,
}

impl World {
    fn new(shapes: &[(u32, u32, u32)], host_mib: u64, mode: &'static str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut text = format!(
            "[paths]\nstate_dir = \"{}\"\n[memory]\npretend_host_mib = {host_mib}\n[pool]\nenabled = true\n",
            dir.path().join("state").display()
        );
        for (vcpus, memory_mib, size) in shapes {
            text.push_str(&format!(
                "[[pool.shapes]]\nvcpus = {vcpus}\nmemory_mib = {memory_mib}\nsize = {size}\n"
            ));
        }
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, &text).unwrap();
        let config = Config::parse(&text).unwrap();
        Self {
            dir,
            config_path,
            config,
            mode,
        }
    }

    fn key(&self, vcpus: u32, memory_mib: u32) -> String {
        pool::shape_key(
            &self.config,
            Some(&self.config_path),
            self.config.backend.kind,
            Shape {
                vcpus,
                memory_mib,
                max_memory_mib: memory_mib,
            },
        )
    }

    fn shape_dir(&self, vcpus: u32, memory_mib: u32) -> PathBuf {
        pool::shape_dir(&self.config, &self.key(vcpus, memory_mib))
    }

    fn events_path(&self) -> PathBuf {
        self.dir.path().join("events")
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("poold.stderr")
    }

    fn command(&self) -> Command {
        let keys: serde_json::Map<String, serde_json::Value> = self
            .config
            .pool
            .shapes
            .iter()
            .map(|s| {
                (
                    format!("{}x{}", s.vcpus, s.memory_mib),
                    self.key(s.vcpus, s.memory_mib).into(),
                )
            })
            .collect();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_capsid-poold"));
        cmd.arg("--config")
            .arg(&self.config_path)
            .arg("--shim")
            .arg(fake())
            .env("CAPSID_LOG", "info")
            .env_remove("CAPSID_CONFIG")
            .env("FAKE_EVENTS", self.events_path())
            .env("FAKE_CONFIG", &self.config_path)
            .env("FAKE_POOL_DIR", pool::dir(&self.config))
            .env("FAKE_KEYS", serde_json::Value::Object(keys).to_string())
            .env("FAKE_MODE", self.mode)
            .stdin(Stdio::null());
        cmd
    }

    fn start(&self) -> Daemon {
        let stderr = std::fs::File::create(self.stderr_path()).unwrap();
        let child = self.command().stderr(stderr).spawn().unwrap();
        Daemon(child)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    fn ready(&self, vcpus: u32, memory_mib: u32) -> Vec<String> {
        pool::ready(&self.config, &self.key(vcpus, memory_mib))
    }

    /// `(event, name, pid)` lines the fakes wrote.
    fn events(&self) -> Vec<(String, String, u32)> {
        std::fs::read_to_string(self.events_path())
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let mut f = l.split(' ');
                let what = f.next().unwrap().to_string();
                let name = f.next().unwrap().to_string();
                (what, name, f.next().unwrap().parse().unwrap())
            })
            .collect()
    }

    fn started(&self) -> Vec<(String, u32)> {
        self.events()
            .into_iter()
            .filter(|(what, _, _)| what == "start")
            .map(|(_, name, pid)| (name, pid))
            .collect()
    }

    /// Files in `dir`, sorted.
    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().into_string().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// The daemon; killed if a test fails before stopping it.
struct Daemon(Child);

impl Daemon {
    /// SIGTERM, then its exit status (within 30 s).
    fn stop(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        self.wait(Duration::from_secs(30))
    }

    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "capsid-poold did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool, world: &World) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; capsid-poold said:\n{}",
            world.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn alive(pid: u32) -> bool {
    ProcessRef::of(pid).is_some_and(|p| p.is_alive())
}

fn kill(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
}

const LONG: Duration = Duration::from_secs(30);

#[test]
fn fills_refills_and_stops_all_but_the_claimed() {
    let world = World::new(&[(1, 128, 2), (2, 256, 1)], 65536, "ok");
    let mut daemon = world.start();
    wait_for(
        "the pools to fill",
        LONG,
        || world.ready(1, 128).len() == 2 && world.ready(2, 256).len() == 1,
        &world,
    );
    assert_eq!(world.started().len(), 3, "one boot per place");

    // Its status socket says so, and `capsid check` reports it.
    let status = match pool_daemon::query(&world.config, Duration::from_secs(5)).unwrap() {
        DaemonState::Running(status) => status,
        DaemonState::NotRunning => panic!("the daemon does not answer"),
    };
    let counts: Vec<_> = status
        .shapes
        .iter()
        .map(|s| (s.vcpus, s.memory_mib, s.size, s.ready, s.booting))
        .collect();
    assert_eq!(counts, [(1, 128, 2, 2, 0), (2, 256, 1, 1, 0)]);
    assert_eq!(status.shapes[0].key, world.key(1, 128));
    let check = Command::new(env!("CARGO_BIN_EXE_capsid"))
        .arg("--config")
        .arg(&world.config_path)
        .args(["check", "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(report["pool"]["enabled"], true, "{report}");
    assert_eq!(report["pool"]["daemon_running"], true, "{report}");
    assert_eq!(report["pool"]["shapes"][1]["ready"], 1, "{report}");

    // A second daemon for the same state directory leaves at once.
    let second = world.command().output().unwrap();
    assert!(second.status.success(), "{second:?}");
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another capsid-poold runs"),
        "{second:?}"
    );

    // What is taken is replaced.
    let claimed = pool::take(&world.config, &world.key(1, 128))
        .unwrap()
        .unwrap();
    let claimed_name = claimed
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .strip_suffix(".sock")
        .unwrap()
        .to_string();
    wait_for(
        "a replacement",
        LONG,
        || world.ready(1, 128).len() == 2,
        &world,
    );
    let started = world.started();
    assert_eq!(started.len(), 4);
    let mut names: Vec<_> = started.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 4, "names are unique: {names:?}");
    assert!(names.iter().all(|n| n.len() <= 24));

    // SIGTERM: every unclaimed fake stops, the claimed one runs on.
    let status = daemon.stop();
    assert!(status.success(), "{status:?}\n{}", world.stderr());
    let claimed_pid = started
        .iter()
        .find(|(n, _)| *n == claimed_name)
        .map(|(_, pid)| *pid)
        .unwrap();
    for (name, pid) in &started {
        if *pid == claimed_pid {
            assert!(alive(*pid), "the claimed shim {name} was stopped");
        } else {
            assert!(!alive(*pid), "{name} still runs");
        }
    }
    let stopped = world
        .events()
        .iter()
        .filter(|(what, _, _)| what == "stop")
        .count();
    assert_eq!(stopped, 3, "each got SIGTERM: {:?}", world.events());
    for dir in [world.shape_dir(1, 128), world.shape_dir(2, 256)] {
        let left = World::files(&dir);
        assert!(
            left.iter().all(|f| f.starts_with(&claimed_name)),
            "left in {}: {left:?}",
            dir.display()
        );
    }
    assert_eq!(
        World::files(&pool::claimed_dir(&world.config)),
        [format!("{claimed_name}.sock")]
    );
    assert!(!pool_daemon::status_path(&world.config).exists());
    assert_eq!(
        pool_daemon::query(&world.config, Duration::from_secs(1)).unwrap(),
        DaemonState::NotRunning
    );
    let check = Command::new(env!("CARGO_BIN_EXE_capsid"))
        .arg("--config")
        .arg(&world.config_path)
        .arg("check")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        text.contains("capsid-poold NOT running: containers boot cold"),
        "{text}"
    );
    kill(claimed_pid);
}

#[test]
fn a_failing_shim_is_logged_and_backed_off() {
    let world = World::new(&[(1, 128, 1)], 65536, "fail");
    let mut daemon = world.start();
    wait_for(
        "a failure to be logged",
        LONG,
        || world.stderr().contains("before it was ready"),
        &world,
    );
    let first = Instant::now();
    // Without backing off it would boot ten times a second; with it, at
    // 1, 2, 4 s after the first failure.
    std::thread::sleep(Duration::from_millis(4500));
    let starts = world.started().len();
    let elapsed = first.elapsed();
    assert!(
        (2..=4).contains(&starts),
        "{starts} starts in {elapsed:?}:\n{}",
        world.stderr()
    );
    let status = match pool_daemon::query(&world.config, Duration::from_secs(5)).unwrap() {
        DaemonState::Running(status) => status,
        DaemonState::NotRunning => panic!("the daemon does not answer"),
    };
    let failure = status.shapes[0].last_failure.clone().unwrap_or_default();
    assert!(failure.contains("before it was ready"), "{status:?}");
    assert!(daemon.stop().success());
    let log = world.stderr();
    assert!(log.contains("exit status: 1"), "{log}");
    assert!(
        log.contains("fake: the guest kernel panicked"),
        "the log's tail is quoted: {log}"
    );
    assert!(log.contains("retry_in_s=2"), "{log}");
    // Each failure's log was removed after it was quoted.
    assert_eq!(World::files(&world.shape_dir(1, 128)), Vec::<String>::new());
}

#[test]
fn adopts_the_living_and_removes_the_dead() {
    let world = World::new(&[(1, 128, 2)], 65536, "ok");
    let dir = world.shape_dir(1, 128);
    capsid_sandbox::private_dir::ensure_root(&dir).unwrap();
    // A warm shim a previous daemon started, still running.
    let adopted =
        std::os::unix::net::UnixListener::bind(pool::socket_path(&dir, "0-live")).unwrap();
    let mut live = std::process::Command::new("sleep")
        .arg("120")
        .env(pool::NAME_ENV, "0-live")
        .spawn()
        .unwrap();
    // One that died: no process, its record names a scratch file.
    drop(std::os::unix::net::UnixListener::bind(pool::socket_path(&dir, "0-dead")).unwrap());
    let scratch = world.dir.path().join("scratch");
    std::fs::write(&scratch, b"").unwrap();
    let mut record = HostRecord::new("0-dead", "");
    record.scratch_files.push(scratch.clone());
    RecordFile::create(pool::record_path(&dir, "0-dead"), record).unwrap();
    std::fs::write(pool::log_path(&dir, "0-dead"), b"").unwrap();
    // A shape no longer configured, with a dead shim's leftovers.
    let old = pool::shape_dir(&world.config, "00000000000000aa");
    capsid_sandbox::private_dir::ensure_root(&old).unwrap();
    drop(std::os::unix::net::UnixListener::bind(pool::socket_path(&old, "0-old")).unwrap());

    let mut daemon = world.start();
    wait_for(
        "the pool to fill",
        LONG,
        || world.ready(1, 128).len() == 2,
        &world,
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(world.started().len(), 1, "the living one counts as ready");
    assert!(!scratch.exists(), "the dead one's record was undone");
    assert!(!pool::socket_path(&dir, "0-dead").exists());
    assert!(!pool::log_path(&dir, "0-dead").exists());
    assert!(!old.exists(), "the old shape's directory went");
    assert!(daemon.stop().success());
    // Not its child: left for the next daemon.
    assert_eq!(World::files(&dir), ["0-live.sock"]);
    drop(adopted);
    live.kill().unwrap();
    live.wait().unwrap();
}

#[test]
fn a_pool_the_host_cannot_hold_is_refused() {
    let world = World::new(&[(1, 128, 5)], 256, "ok");
    let out = world.command().output().unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("640 MiB")
            && text.contains("512 MiB")
            && text.contains("memory.overcommit_ratio"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    let world = World::new(&[], 65536, "ok");
    let out = world.command().output().unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no [[pool.shapes]]"));
}
