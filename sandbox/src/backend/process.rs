//! Child processes of a VM (the VMM, device backends): started with their
//! stderr in a log file, stopped with SIGTERM then SIGKILL, always reaped.
//! A program that owns its VMs outright (`capsid run`) can also have them
//! killed by the kernel when it dies, however it dies
//! ([`die_with_this_process`]); and [`ProcessRef`] names a process so that
//! a later run can tell whether it is still the same one.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{BackendError, Result};

/// Whether VM processes get SIGKILL when this process dies.
static DIE_WITH_US: AtomicBool = AtomicBool::new(false);

/// From now on, every VM process this process starts is killed by the
/// kernel (`PR_SET_PDEATHSIG`) when this process ends, even by SIGKILL.
/// For programs whose VMs must not outlive them (`capsid run`); the shim
/// leaves it off, since its VMs are cleaned up by containerd's `delete`.
pub fn die_with_this_process() {
    DIE_WITH_US.store(true, Ordering::SeqCst);
}

/// A spawn request for the [`spawner`] thread.
type SpawnJob = (Command, mpsc::Sender<std::io::Result<Child>>);

/// The thread that forks VM processes tied to this process. The kernel
/// sends the parent-death signal when the *thread* that forked the child
/// ends, not the process; VMs are started from short-lived blocking-pool
/// threads, so they are forked by this one thread, which lives as long as
/// the process (its sender is never dropped).
fn spawner() -> std::io::Result<&'static Mutex<mpsc::Sender<SpawnJob>>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    if let Some(s) = SPAWNER.get() {
        return Ok(s);
    }
    let (tx, rx) = mpsc::channel::<SpawnJob>();
    std::thread::Builder::new()
        .name("capsid-spawner".into())
        .spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
        })?;
    // A racing caller's thread just idles: its sender is dropped and its
    // loop ends at once.
    Ok(SPAWNER.get_or_init(|| Mutex::new(tx)))
}

/// Spawns `cmd`, tied to this process when [`die_with_this_process`] was
/// called.
fn spawn_child(mut cmd: Command) -> std::io::Result<Child> {
    if !DIE_WITH_US.load(Ordering::SeqCst) {
        return cmd.spawn();
    }
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and only
    // makes two system calls (prctl, getppid), both async-signal-safe; it
    // allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Some(Signal::SIGKILL))?;
            // The parent died between fork and prctl: no signal will come.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::other("the parent process is gone"));
            }
            Ok(())
        });
    }
    let (reply, answer) = mpsc::channel();
    spawner()?
        .lock()
        .map_err(|_| std::io::Error::other("the spawner thread's lock is poisoned"))?
        .send((cmd, reply))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

/// A supervised child process.
#[derive(Debug)]
pub struct Supervised {
    what: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Supervised {
    /// Starts `cmd` with stdin and stdout on /dev/null and stderr in `log`.
    pub fn spawn(what: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let spawn_err = |source| BackendError::Spawn {
            what: what.to_string(),
            source,
        };
        let stderr = File::create(log).map_err(spawn_err)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = spawn_child(cmd).map_err(spawn_err)?;
        Ok(Self {
            what: what.to_string(),
            child,
            log: log.to_path_buf(),
            status: None,
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What this process is, for messages.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// The exit status, if it has exited (without blocking).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .map_err(|source| BackendError::Supervise {
                    what: self.what.clone(),
                    source,
                })?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(5)));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once reaped.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = kill(pid, Signal::SIGTERM);
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .map_err(|source| BackendError::Supervise {
                what: self.what.clone(),
                source,
            })?;
        self.status = Some(status);
        Ok(status)
    }

    /// The last lines the process wrote to its log (for error messages).
    pub fn last_words(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(3)..].join(" / ")
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One process, told apart from a later one reusing its pid by its start
/// time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessRef {
    /// Process id.
    pub pid: u32,
    /// Its start time in clock ticks after boot (`/proc/PID/stat` field 22).
    pub start_time: u64,
}

impl ProcessRef {
    /// The running process `pid`, if it exists.
    pub fn of(pid: u32) -> Option<Self> {
        stat_fields(pid).map(|(_, start_time)| Self { pid, start_time })
    }

    /// This process.
    pub fn this() -> Option<Self> {
        Self::of(std::process::id())
    }

    /// Whether this very process still runs (a zombie does not).
    pub fn is_alive(&self) -> bool {
        match stat_fields(self.pid) {
            Some((state, start)) => start == self.start_time && state != 'Z' && state != 'X',
            None => false,
        }
    }
}

/// SIGKILLs every process of `victims` still alive and waits up to `wait`
/// for them to be gone; returns the pids that were signalled.
pub fn kill_all(victims: &[ProcessRef], wait: Duration) -> Vec<u32> {
    let mut killed = Vec::new();
    for p in victims.iter().filter(|p| p.is_alive()) {
        let Ok(raw) = i32::try_from(p.pid) else {
            continue;
        };
        if kill(Pid::from_raw(raw), Signal::SIGKILL).is_ok() {
            killed.push(p.pid);
        }
    }
    let deadline = Instant::now() + wait;
    while victims.iter().any(ProcessRef::is_alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    killed
}

fn stat_fields(pid: u32) -> Option<(char, u64)> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// State (field 3) and start time (field 22) of a `/proc/PID/stat` line.
/// The command name (field 2) may hold spaces and parentheses: fields are
/// counted after its last `)`.
fn parse_stat(text: &str) -> Option<(char, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// Processes (other than this one) with an argument naming something
/// inside `dir`: a VM's processes all name its run directory.
pub fn processes_naming(dir: &Path) -> Vec<u32> {
    let needle = format!("{}/", dir.display());
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.split(|b| *b == 0)
                    .any(|arg| String::from_utf8_lossy(arg).contains(&needle))
            })
        })
        .collect()
}

/// A process exit status as a number: the code, or 128+N for signal N.
pub fn status_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names_parse() {
        let line = "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 987654 1000 200";
        assert_eq!(parse_stat(line), Some(('S', 987654)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn a_process_is_told_from_its_pid_reuser() {
        let me = ProcessRef::this().unwrap();
        assert!(me.is_alive());
        let other = ProcessRef {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other.is_alive());
        let mut child = Command::new("true").spawn().unwrap();
        let gone = ProcessRef::of(child.id());
        child.wait().unwrap();
        assert!(gone.is_none_or(|p| !p.is_alive()));
    }

    #[test]
    fn tied_children_are_spawned_from_the_long_lived_thread() {
        die_with_this_process();
        // Spawned from a thread that ends at once: the child must outlive
        // that thread (only the process's death may kill it).
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let handle = std::thread::spawn(move || {
            let mut c = Command::new("sleep");
            c.arg("1000");
            Supervised::spawn("sleeper", c, &log).unwrap()
        });
        let mut child = handle.join().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(child.try_wait().unwrap(), None);
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.pid())).unwrap();
        // The parent-death signal is not shown in /proc; the parent is us.
        assert!(
            status.contains(&format!("PPid:\t{}", std::process::id())),
            "{status}"
        );
        child.terminate(Duration::from_secs(1)).unwrap();
    }
}
