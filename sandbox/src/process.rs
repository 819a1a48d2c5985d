//! Host processes: a program that owns its VMs outright (`capsid run`) can
//! have every process it starts killed by the kernel when it dies, however
//! it dies ([`die_with_this_process`], honoured by [`spawn_child`]);
//! [`ProcessRef`] names a process so that a later run can tell whether it
//! is still the same one; [`kill_all`] and [`processes_naming`] find and
//! end what a dead run left behind.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

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
pub(crate) fn spawn_child(mut cmd: Command) -> std::io::Result<Child> {
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

/// Resolves once process `pid` has ended (at once if it has already).
pub async fn ended(pid: u32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1;
    // no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ESRCH) => Ok(()),
            _ => Err(e),
        };
    }
    let fd = std::os::fd::RawFd::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the syscall just returned this fd, owned by nothing else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // A pidfd is readable once its process has ended.
    // SAFETY: the OwnedFd's fd is open and stays the same for its whole
    // life, which the AsyncFd owns; nothing swaps it.
    let watched = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }
    .map_err(std::io::Error::from)?;
    let _ = watched.readable().await?;
    Ok(())
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
    fn tied_children_outlive_the_thread_that_asked() {
        die_with_this_process();
        let handle = std::thread::spawn(|| {
            let mut c = Command::new("sleep");
            c.arg("1000");
            spawn_child(c).unwrap()
        });
        let mut child = handle.join().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(child.try_wait().unwrap().is_none());
        let me = ProcessRef::of(child.id()).unwrap();
        let killed = kill_all(&[me], Duration::from_secs(1));
        assert_eq!(killed, [child.id()]);
        child.wait().unwrap();
    }
}
