//! What `capsid-poold` (the daemon that keeps [`crate::pool`] filled) and
//! `capsid check` share, and the parts of the daemon that are decisions
//! rather than processes: whether the pool fits the host, when a shape
//! gets another boot, how long a failing shape waits, what a dead warm
//! shim left behind and how it is removed (docs/pool.md).
//!
//! The daemon holds an `flock` on `<state>/.pool/poold.lock` (one per
//! state directory) and answers on `<state>/.pool/poold.sock` with one
//! JSON line per connection, a [`Status`].

use std::io::{self, BufRead};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::balloon::registry::Limit;
use crate::config::{Config, PoolShapeConfig};
use crate::pool;
use crate::process::ProcessRef;
use crate::record::{HostRecord, RecordFile};

/// The daemon's lock file in the pool directory.
pub const LOCK_FILE: &str = "poold.lock";
/// The daemon's status socket in the pool directory.
pub const STATUS_SOCKET: &str = "poold.sock";
/// First wait after a warm shim failed; each further failure doubles it.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between boots of a failing shape.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest status answer read (a few shapes are a few hundred bytes).
const MAX_STATUS_LEN: u64 = 64 * 1024;

/// The daemon's lock file.
pub fn lock_path(config: &Config) -> PathBuf {
    pool::dir(config).join(LOCK_FILE)
}

/// The daemon's status socket.
pub fn status_path(config: &Config) -> PathBuf {
    pool::dir(config).join(STATUS_SOCKET)
}

/// What the daemon answers on its status socket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// One per `[[pool.shapes]]`, in the configuration's order.
    pub shapes: Vec<ShapeStatus>,
}

/// One shape's pool as the daemon sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeStatus {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM, MiB.
    pub memory_mib: u32,
    /// How many are kept booted.
    pub size: u32,
    /// The shape key ([`pool::shape_key`]): its directory's name.
    pub key: String,
    /// Warm shims listening, waiting for a claim.
    pub ready: u32,
    /// Warm shims started that have not said `ready` yet.
    pub booting: u32,
    /// Why the last warm shim of this shape failed, until one succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
}

/// Whether a daemon serves this state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonState {
    /// No socket, or nothing listens on it.
    NotRunning,
    /// It answered.
    Running(Status),
}

/// Asks the daemon of `config`'s state directory for its [`Status`],
/// waiting at most `timeout` for the answer. The connection is
/// non-blocking, so a daemon with a full backlog is an error rather than a
/// hang.
pub fn query(config: &Config, timeout: Duration) -> io::Result<DaemonState> {
    use nix::errno::Errno;
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let path = status_path(config);
    let addr = UnixAddr::new(&path).map_err(io::Error::from)?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(Errno::ECONNREFUSED | Errno::ENOENT) => return Ok(DaemonState::NotRunning),
        Err(Errno::EAGAIN) => {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "capsid-poold is not accepting connections (its backlog is full)",
            ))
        }
        Err(e) => return Err(e.into()),
    }
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    io::BufReader::new(io::Read::take(stream, MAX_STATUS_LEN)).read_line(&mut line)?;
    serde_json::from_str(&line)
        .map(DaemonState::Running)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad status: {e}")))
}

/// The memory the whole pool assigns, MiB: size × memory over the shapes.
pub fn pool_mib(shapes: &[PoolShapeConfig]) -> u64 {
    shapes
        .iter()
        .map(|s| u64::from(s.size) * u64::from(s.memory_mib))
        .sum()
}

/// Whether the pool fits the host's over-assignment limit (`None`: the
/// host's size is unknown, nothing to compare with). The error is the line
/// the daemon refuses to start with.
pub fn check_fits(shapes: &[PoolShapeConfig], limit: Option<Limit>) -> Result<(), String> {
    let Some(limit) = limit else {
        return Ok(());
    };
    let total = pool_mib(shapes);
    let limit_mib = limit.limit_mib();
    if total > limit_mib {
        return Err(format!(
            "the pool would assign {total} MiB (size x memory_mib over [[pool.shapes]]), over the \
             limit of {limit_mib} MiB (memory.overcommit_ratio {} x {} MiB of host memory)",
            limit.ratio, limit.host_mib
        ));
    }
    Ok(())
}

/// A warm shim's name: its start time (Unix milliseconds, 12 hex digits
/// so names sort oldest first until the year 10889) and a random part.
/// Run directories and socket paths derive from it, whose length is
/// bounded (108 bytes for a socket): 21 characters.
pub fn sandbox_name(unix_millis: u64, random: u32) -> String {
    format!("{unix_millis:012x}-{random:08x}")
}

/// Whether a shape gets another warm shim now: it is short, and none of
/// its warm shims is booting (one boot at a time per shape is the refill
/// rate: boots in parallel would compete for the CPUs containers being
/// started need), and it is not waiting after a failure.
pub fn wants_boot(size: u32, ready: usize, booting: usize, backing_off: bool) -> bool {
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    !backing_off && booting == 0 && ready.saturating_add(booting) < size
}

/// How long a shape waits after failures in a row, so that a broken kernel
/// or shim costs one boot per [`MAX_BACKOFF`] rather than a busy loop.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    failures: u32,
    until: Option<Instant>,
}

impl Backoff {
    /// The wait after `failures` failures in a row (at least one).
    pub fn delay(failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        FIRST_BACKOFF
            .saturating_mul(1 << doublings)
            .min(MAX_BACKOFF)
    }

    /// One more failure at `now`: returns how long the shape now waits.
    pub fn fail(&mut self, now: Instant) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = Self::delay(self.failures);
        self.until = Some(now + delay);
        delay
    }

    /// A warm shim of the shape came up: the next failure waits
    /// [`FIRST_BACKOFF`] again.
    pub fn succeed(&mut self) {
        self.failures = 0;
        self.until = None;
    }

    /// Whether the shape is still waiting at `now`.
    pub fn waiting(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// The warm shim called `name`: the process whose environment has
/// `CAPSID_POOL_NAME=name` ([`pool::NAME_ENV`]), and of several (the
/// shim's own children may inherit it) the one whose parent is not one of
/// them. A daemon that restarted finds the shims its predecessor started
/// this way; their records do not name the shim.
pub fn find_warm_shim(name: &str) -> Option<ProcessRef> {
    let needle = format!("{}={name}", pool::NAME_ENV);
    let me = std::process::id();
    let matches: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
        })
        .filter_map(|pid| parent_of(pid).map(|ppid| (pid, ppid)))
        .collect();
    matches
        .iter()
        .find(|(_, ppid)| !matches.iter().any(|(pid, _)| pid == ppid))
        .and_then(|(pid, _)| ProcessRef::of(*pid))
        .filter(ProcessRef::is_alive)
}

/// The parent of `pid` (`/proc/PID/stat` field 4, counted after the
/// command name's last `)`).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Removes what the warm shim `name` left in `shape_dir` after it ended
/// (or was found dead): its socket, its host record after undoing it, its
/// log. Returns what could not be done; a record whose undo failed stays,
/// so that a later start tries again. Blocks (the undo waits for killed
/// processes).
pub fn remove_leftovers(shape_dir: &Path, name: &str) -> Vec<String> {
    let mut errors = Vec::new();
    errors.extend(remove_file(&pool::socket_path(shape_dir, name)));
    let record = pool::record_path(shape_dir, name);
    let undone = match RecordFile::<HostRecord>::load(&record) {
        Ok(None) => None,
        Ok(Some(r)) => Some(crate::record::undo(&r).errors),
        Err(e) => {
            // Nothing can be undone from a record that does not parse;
            // keeping it would only have every start trip over it again.
            tracing::warn!(record = %record.display(), error = %crate::record::chain(&e), "removing an unreadable warm sandbox record");
            Some(Vec::new())
        }
    };
    if let Some(undo_errors) = undone {
        if undo_errors.is_empty() {
            errors.extend(remove_file(&record));
        } else {
            errors.extend(undo_errors);
        }
    }
    errors.extend(remove_file(&pool::log_path(shape_dir, name)));
    errors
}

/// Removes the file at `path`; absent is fine. The error, as a line.
fn remove_file(path: &Path) -> Option<String> {
    match std::fs::remove_file(path) {
        Ok(()) => None,
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => Some(format!("removing {}: {e}", path.display())),
    }
}

/// The last `lines` lines of the warm shim `name`'s log, joined with
/// ` | ` for one log line of the daemon's.
pub fn log_tail(shape_dir: &Path, name: &str, lines: usize) -> String {
    let path = pool::log_path(shape_dir, name);
    let Ok(bytes) = crate::private_dir::read_tail_no_follow(&path, 4096) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// What [`scan`] found in one shape directory.
#[derive(Debug, Default)]
pub struct ScanReport {
    /// Live warm shims (a socket, and a process carrying the name),
    /// oldest first.
    pub live: Vec<(String, ProcessRef)>,
    /// Names whose leftovers were removed (no process).
    pub removed: Vec<String>,
    /// What could not be removed.
    pub errors: Vec<String>,
}

/// Looks at one shape directory when the daemon starts: a socket whose
/// warm shim still runs (a previous daemon's; found by the name in its
/// environment, [`find_warm_shim`]) is live. The socket is never
/// connected to: a warm shim takes the first connection as its one claim.
/// A socket, record or log whose process is gone is stale: the record is
/// undone and the files removed. Anything with a live process and no
/// socket is left alone: it is booting, or claimed and still moving its
/// record. Blocks.
pub fn scan(shape_dir: &Path) -> ScanReport {
    let mut report = ScanReport::default();
    let Ok(entries) = std::fs::read_dir(shape_dir) else {
        return report;
    };
    let mut names = Vec::new();
    let mut sockets = Vec::new();
    for name in entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
    {
        if let Some(n) = name.strip_suffix(".sock") {
            sockets.push(n.to_string());
            names.push(n.to_string());
        } else if let Some(n) = name
            .strip_suffix(".record")
            .or_else(|| name.strip_suffix(".log"))
        {
            names.push(n.to_string());
        }
    }
    names.sort();
    names.dedup();
    for name in &names {
        match find_warm_shim(name) {
            Some(process) if sockets.contains(name) => report.live.push((name.clone(), process)),
            Some(_) => {}
            None => {
                report.errors.extend(remove_leftovers(shape_dir, name));
                report.removed.push(name.clone());
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(vcpus: u32, memory_mib: u32, size: u32) -> PoolShapeConfig {
        PoolShapeConfig {
            vcpus,
            memory_mib,
            size,
            max_memory_mib: 0,
        }
    }

    #[test]
    fn the_pool_must_fit_the_over_assignment_limit() {
        let shapes = [shape(1, 256, 4), shape(2, 512, 2)];
        assert_eq!(pool_mib(&shapes), 2048);
        let limit = |host_mib| {
            Some(Limit {
                ratio: 2.0,
                host_mib,
            })
        };
        assert!(
            check_fits(&shapes, limit(1024)).is_ok(),
            "exactly the limit"
        );
        let e = check_fits(&shapes, limit(1000)).unwrap_err();
        assert!(
            e.contains("2048 MiB")
                && e.contains("2000 MiB")
                && e.contains("memory.overcommit_ratio 2 x 1000 MiB"),
            "{e}"
        );
        assert!(check_fits(&shapes, None).is_ok(), "unknown host size");
        assert_eq!(
            pool_mib(&[shape(32, u32::MAX, 64)]),
            64 * u64::from(u32::MAX)
        );
    }

    #[test]
    fn names_are_short_unique_and_sort_by_age() {
        let a = sandbox_name(1_700_000_000_000, 0xdead_beef);
        assert_eq!(a, "018bcfe56800-deadbeef");
        assert!(a.len() <= 24);
        let b = sandbox_name(1_700_000_000_001, 0);
        let c = sandbox_name(1_700_000_000_000, 1);
        assert!(a < b && c < b);
        assert_ne!(a, c);
        assert!(sandbox_name(u64::MAX >> 16, u32::MAX).len() <= 24);
    }

    #[test]
    fn one_boot_at_a_time_until_full() {
        assert!(wants_boot(2, 0, 0, false));
        assert!(wants_boot(2, 1, 0, false));
        assert!(!wants_boot(2, 2, 0, false), "full");
        assert!(!wants_boot(2, 3, 0, false), "adopted ones beyond the size");
        assert!(!wants_boot(2, 0, 1, false), "one is booting");
        assert!(!wants_boot(2, 0, 0, true), "backing off");
        assert!(!wants_boot(0, 0, 0, false));
    }

    #[test]
    fn failures_back_off_up_to_a_limit() {
        assert_eq!(Backoff::delay(1), Duration::from_secs(1));
        assert_eq!(Backoff::delay(2), Duration::from_secs(2));
        assert_eq!(Backoff::delay(5), Duration::from_secs(16));
        assert_eq!(Backoff::delay(6), MAX_BACKOFF);
        assert_eq!(Backoff::delay(u32::MAX), MAX_BACKOFF);
        let now = Instant::now();
        let mut b = Backoff::default();
        assert!(!b.waiting(now));
        assert_eq!(b.fail(now), Duration::from_secs(1));
        assert_eq!(b.fail(now), Duration::from_secs(2));
        assert!(b.waiting(now + Duration::from_millis(1999)));
        assert!(!b.waiting(now + Duration::from_secs(2)));
        assert_eq!(b.failures(), 2);
        b.succeed();
        assert!(!b.waiting(now));
        assert_eq!(b.fail(now), FIRST_BACKOFF);
    }

    #[test]
    fn status_lines_round_trip() {
        let status = Status {
            shapes: vec![ShapeStatus {
                vcpus: 1,
                memory_mib: 256,
                size: 2,
                key: "0123456789abcdef".into(),
                ready: 1,
                booting: 1,
                last_failure: None,
            }],
        };
        let line = serde_json::to_string(&status).unwrap();
        assert_eq!(
            line,
            r#"{"shapes":[{"vcpus":1,"memory_mib":256,"size":2,"key":"0123456789abcdef","ready":1,"booting":1}]}"#
        );
        assert_eq!(serde_json::from_str::<Status>(&line).unwrap(), status);
    }

    #[test]
    fn a_dead_daemon_is_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.paths.state_dir = dir.path().to_path_buf();
        let q = |c: &Config| query(c, Duration::from_millis(200)).unwrap();
        assert_eq!(q(&config), DaemonState::NotRunning, "no socket");
        std::fs::create_dir_all(pool::dir(&config)).unwrap();
        drop(std::os::unix::net::UnixListener::bind(status_path(&config)).unwrap());
        assert_eq!(q(&config), DaemonState::NotRunning, "a stale socket");
        std::fs::remove_file(status_path(&config)).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(status_path(&config)).unwrap();
        let server = std::thread::spawn(move || {
            use std::io::Write;
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"shapes\":[]}\n").unwrap();
        });
        assert_eq!(q(&config), DaemonState::Running(Status::default()));
        server.join().unwrap();
    }

    #[test]
    fn the_scan_removes_what_the_dead_left_and_keeps_the_living() {
        let dir = tempfile::tempdir().unwrap();
        let shape = dir.path();
        // A live warm shim: its socket, and a process carrying its name.
        let name = sandbox_name(2, std::process::id());
        let _live =
            std::os::unix::net::UnixListener::bind(pool::socket_path(shape, &name)).unwrap();
        let mut process = std::process::Command::new("sleep")
            .arg("60")
            .env(pool::NAME_ENV, &name)
            .spawn()
            .unwrap();
        while find_warm_shim(&name).is_none() {
            std::thread::sleep(Duration::from_millis(10));
        }
        // A dead one: no process, its record and log remain.
        drop(std::os::unix::net::UnixListener::bind(pool::socket_path(shape, "b")).unwrap());
        let scratch = shape.join("b-scratch");
        std::fs::write(&scratch, b"").unwrap();
        let mut record = HostRecord::new("b", "");
        record.scratch_files.push(scratch.clone());
        RecordFile::create(pool::record_path(shape, "b"), record).unwrap();
        std::fs::write(pool::log_path(shape, "b"), b"boot failed\n").unwrap();
        // A record without a socket or a process, and an orphan log.
        RecordFile::create(pool::record_path(shape, "c"), HostRecord::new("c", "")).unwrap();
        std::fs::write(pool::log_path(shape, "d"), b"").unwrap();
        // A staging socket is the shim's own business.
        std::fs::write(shape.join(".e.sock"), b"").unwrap();
        let report = scan(shape);
        process.kill().unwrap();
        process.wait().unwrap();
        assert_eq!(report.errors, Vec::<String>::new());
        assert_eq!(report.live.len(), 1);
        assert_eq!(report.live[0].0, name);
        assert_eq!(report.removed, ["b", "c", "d"]);
        let mut left: Vec<String> = std::fs::read_dir(shape)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, [".e.sock".to_string(), format!("{name}.sock")]);
        assert!(!scratch.exists(), "the record was undone");
    }

    #[test]
    fn a_warm_shim_is_found_by_its_name() {
        let name = sandbox_name(1, std::process::id());
        assert!(find_warm_shim(&name).is_none());
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env(pool::NAME_ENV, &name)
            .spawn()
            .unwrap();
        let found = find_warm_shim(&name).unwrap();
        assert_eq!(found.pid, child.id());
        assert!(find_warm_shim(&format!("{name}0")).is_none(), "exact match");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(find_warm_shim(&name).is_none());
    }
}
