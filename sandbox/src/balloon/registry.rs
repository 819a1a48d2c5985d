//! The registry of running sandboxes the policy looks after: one JSON file
//! per sandbox, `<state_dir>/<id>/balloon.json`, inside the sandbox's own
//! run directory, so whatever removes a sandbox's run directory (its stop,
//! the shim's clean-up after a crash) removes its entry too and the state
//! directory holds nothing else. It is written when the sandbox starts and
//! removed when it stops. Entries whose processes are all gone are stale
//! and skipped. An `flock` on the state directory itself serializes the
//! over-assignment check with the write of the new entry, so two sandboxes
//! starting at once cannot both squeeze under the limit.

use std::fs::File;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::host;
use super::{BalloonError, BalloonHandle, Result};
use crate::config::BackendKind;

/// Name of a sandbox's entry in its run directory.
pub const ENTRY_FILE: &str = "balloon.json";
/// Largest entry file read.
const MAX_ENTRY_LEN: u64 = 64 * 1024;

/// What the policy knows of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Sandbox id.
    pub id: String,
    /// Which backend runs it.
    pub backend: BackendKind,
    /// Memory assigned to the sandbox, MiB: what counts against the
    /// over-assignment limit. A pod's VM has `assigned_mib + reserve_mib`
    /// of RAM.
    pub assigned_mib: u32,
    /// RAM of the VM held in its balloon as a pod's room to grow, MiB: not
    /// assigned, never given to the guest by the policy, never counted as
    /// reclaimable (docs/kubernetes.md).
    #[serde(default)]
    pub reserve_mib: u32,
    /// Whether the policy may inflate its balloon (false: opted out).
    pub policy: bool,
    /// The process that started the sandbox (shim or `capsid run`).
    pub owner_pid: u32,
    /// Its start time (see [`host::start_time`]).
    pub owner_start: Option<u64>,
    /// The VMM process, once started.
    pub vmm_pid: Option<u32>,
    /// Its start time.
    pub vmm_start: Option<u64>,
    /// The balloon, once the VM runs.
    pub balloon: Option<BalloonHandle>,
}

impl Entry {
    /// A new entry for the sandbox being started by this process.
    pub fn new(id: &str, backend: BackendKind, assigned_mib: u32, policy: bool) -> Self {
        let me = std::process::id();
        Self {
            id: id.to_string(),
            backend,
            assigned_mib,
            reserve_mib: 0,
            policy,
            owner_pid: me,
            owner_start: host::start_time(me),
            vmm_pid: None,
            vmm_start: None,
            balloon: None,
        }
    }

    /// Whether any of its processes still runs (a VMM outliving its shim
    /// still holds memory).
    pub fn alive(&self) -> bool {
        host::alive(self.owner_pid, self.owner_start)
            || self
                .vmm_pid
                .is_some_and(|pid| host::alive(pid, self.vmm_start))
    }
}

/// The registry of the sandboxes of one state directory.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

impl Registry {
    /// The registry of sandboxes whose state lives in `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.to_path_buf(),
        }
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn err(path: &Path) -> impl FnOnce(std::io::Error) -> BalloonError + '_ {
        move |source| BalloonError::Registry {
            path: path.to_path_buf(),
            source,
        }
    }

    fn lock(&self) -> Result<Flock<File>> {
        std::fs::create_dir_all(&self.dir).map_err(Self::err(&self.dir))?;
        let dir = File::open(&self.dir).map_err(Self::err(&self.dir))?;
        Flock::lock(dir, FlockArg::LockExclusive)
            .map_err(|(_, errno)| Self::err(&self.dir)(std::io::Error::from(errno)))
    }

    /// Claims the coordinator's role for this state directory, held until
    /// the returned listener is dropped (or the process ends): `None` when
    /// another coordinator runs. An abstract Unix socket named after the
    /// directory is the token: nothing is left on disk.
    pub fn coordinator_lock(&self) -> Result<Option<UnixListener>> {
        let addr = self.coordinator_addr()?;
        match UnixListener::bind_addr(&addr) {
            Ok(l) => Ok(Some(l)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(None),
            Err(e) => Err(Self::err(&self.dir)(e)),
        }
    }

    /// Whether a coordinator holds this state directory's role: its token
    /// socket takes a connection. Connecting, unlike binding, cannot steal
    /// the role from a coordinator that is starting; the connection is
    /// non-blocking, so a coordinator with a full backlog counts as
    /// running instead of hanging the caller.
    pub fn coordinator_running(&self) -> Result<bool> {
        use nix::errno::Errno;
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        use std::os::fd::AsRawFd;
        let name = self.coordinator_name();
        let addr = UnixAddr::new_abstract(name.as_bytes())
            .map_err(|e| Self::err(&self.dir)(std::io::Error::from(e)))?;
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| Self::err(&self.dir)(std::io::Error::from(e)))?;
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) | Err(Errno::EAGAIN) => Ok(true),
            Err(Errno::ECONNREFUSED | Errno::ENOENT) => Ok(false),
            Err(e) => Err(Self::err(&self.dir)(std::io::Error::from(e))),
        }
    }

    /// The abstract socket address naming this directory's coordinator.
    fn coordinator_addr(&self) -> Result<SocketAddr> {
        SocketAddr::from_abstract_name(self.coordinator_name().as_bytes())
            .map_err(Self::err(&self.dir))
    }

    /// The abstract socket name of this directory's coordinator.
    fn coordinator_name(&self) -> String {
        let digest = Sha256::digest(self.dir.as_os_str().as_encoded_bytes());
        let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
        format!("capsid-balloond-{hex}")
    }

    /// The live entries, sorted by id (stale and unreadable ones skipped,
    /// the latter logged: they are not ours to trust).
    pub fn entries(&self) -> Result<Vec<Entry>> {
        let list = match std::fs::read_dir(&self.dir) {
            Ok(list) => list,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Self::err(&self.dir)(e)),
        };
        let mut out = Vec::new();
        for item in list.flatten() {
            let path = item.path().join(ENTRY_FILE);
            if !path.is_file() {
                continue;
            }
            match read_entry(&path) {
                Some(entry) if entry.alive() => out.push(entry),
                Some(entry) => {
                    tracing::debug!(id = %entry.id, "skipping the balloon entry of a sandbox whose processes are gone");
                }
                None => {
                    tracing::warn!(path = %path.display(), "skipping an unreadable balloon entry");
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Registers `entry` unless the memory assigned to all live sandboxes
    /// would then exceed `limit` (when given). Creates the sandbox's run
    /// directory. The returned registration removes the entry when dropped.
    pub fn register(&self, entry: Entry, limit: Option<Limit>) -> Result<Registration> {
        if entry.id.is_empty() || entry.id.contains('/') || entry.id.starts_with('.') {
            return Err(Self::err(&self.dir)(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("sandbox id {:?} cannot name a run directory", entry.id),
            )));
        }
        let _lock = self.lock()?;
        if let Some(limit) = limit {
            let others: u64 = self
                .entries()?
                .iter()
                .filter(|e| e.id != entry.id)
                .map(|e| u64::from(e.assigned_mib))
                .sum();
            let total = others + u64::from(entry.assigned_mib);
            let limit_mib = limit.limit_mib();
            if total > limit_mib {
                return Err(BalloonError::Overcommitted {
                    id: entry.id.clone(),
                    new_mib: u64::from(entry.assigned_mib),
                    total_mib: total,
                    limit_mib,
                    ratio: limit.ratio,
                    host_mib: limit.host_mib,
                });
            }
        }
        let run_dir = self.dir.join(&entry.id);
        std::fs::create_dir_all(&run_dir).map_err(Self::err(&run_dir))?;
        let reg = Registration {
            path: run_dir.join(ENTRY_FILE),
            registry: self.clone(),
            entry,
        };
        reg.write()?;
        Ok(reg)
    }
}

/// The over-assignment limit: `ratio` × `host_mib`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// memory.overcommit_ratio.
    pub ratio: f64,
    /// The host's memory (or the pretended size), MiB.
    pub host_mib: u64,
}

impl Limit {
    /// The most MiB all sandboxes together may be assigned.
    pub fn limit_mib(&self) -> u64 {
        // Validated config: 0 < ratio <= 1000; the product fits easily.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let mib = (self.ratio * self.host_mib as f64) as u64;
        mib
    }
}

fn read_entry(path: &Path) -> Option<Entry> {
    use std::io::Read;
    let mut text = String::new();
    File::open(path)
        .ok()?
        .take(MAX_ENTRY_LEN)
        .read_to_string(&mut text)
        .ok()?;
    serde_json::from_str(&text).ok()
}

/// A sandbox's registry entry; dropping it deregisters the sandbox.
#[derive(Debug)]
pub struct Registration {
    path: PathBuf,
    registry: Registry,
    entry: Entry,
}

impl Registration {
    /// The entry as registered.
    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    /// Records the running VM: its VMM process and balloon.
    pub fn attach_vm(
        &mut self,
        vmm_pid: Option<u32>,
        balloon: Option<BalloonHandle>,
    ) -> Result<()> {
        self.entry.vmm_pid = vmm_pid;
        self.entry.vmm_start = vmm_pid.and_then(host::start_time);
        self.entry.balloon = balloon;
        self.write()
    }

    /// Resizes a pod's sandbox: `assigned_mib` assigned, `reserve_mib`
    /// held in its balloon. Growth is refused (nothing changed) when the
    /// memory assigned to all live sandboxes would then exceed `limit`;
    /// the check and the write happen under the registry's lock, as at
    /// registration.
    pub fn resize(
        &mut self,
        assigned_mib: u32,
        reserve_mib: u32,
        limit: Option<Limit>,
    ) -> Result<()> {
        let _lock = self.registry.lock()?;
        if let Some(limit) = limit.filter(|_| assigned_mib > self.entry.assigned_mib) {
            let others: u64 = self
                .registry
                .entries()?
                .iter()
                .filter(|e| e.id != self.entry.id)
                .map(|e| u64::from(e.assigned_mib))
                .sum();
            let total = others + u64::from(assigned_mib);
            let limit_mib = limit.limit_mib();
            if total > limit_mib {
                return Err(BalloonError::GrowthOvercommitted {
                    id: self.entry.id.clone(),
                    from_mib: u64::from(self.entry.assigned_mib),
                    to_mib: u64::from(assigned_mib),
                    total_mib: total,
                    limit_mib,
                    ratio: limit.ratio,
                    host_mib: limit.host_mib,
                });
            }
        }
        let before = (self.entry.assigned_mib, self.entry.reserve_mib);
        self.entry.assigned_mib = assigned_mib;
        self.entry.reserve_mib = reserve_mib;
        let written = self.write();
        if written.is_err() {
            (self.entry.assigned_mib, self.entry.reserve_mib) = before;
        }
        written
    }

    fn write(&self) -> Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec(&self.entry)
            .map_err(|e| Registry::err(&self.path)(std::io::Error::other(e)))?;
        std::fs::write(&tmp, text).map_err(Registry::err(&tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(Registry::err(&self.path))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balloon::BalloonEndpoint;

    fn limit(host_mib: u64) -> Option<Limit> {
        Some(Limit {
            ratio: 2.0,
            host_mib,
        })
    }

    #[test]
    fn register_list_and_deregister() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new(&dir.path().join("run"));
        assert!(reg.entries().unwrap().is_empty());
        let mut a = reg
            .register(Entry::new("a", BackendKind::QemuTcg, 256, true), None)
            .unwrap();
        a.attach_vm(
            Some(std::process::id()),
            Some(BalloonHandle::new(
                BalloonEndpoint::Qmp {
                    socket: "/x/qmp.sock".into(),
                },
                256,
            )),
        )
        .unwrap();
        assert!(dir.path().join("run/a/balloon.json").is_file());
        let list = reg.entries().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].assigned_mib, 256);
        assert!(list[0].balloon.is_some());
        drop(a);
        assert!(reg.entries().unwrap().is_empty());
        // Nothing but the (now empty) run directory, which its sandbox
        // removes, is left.
        let left: Vec<_> = std::fs::read_dir(dir.path().join("run/a"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn overcommit_limit_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new(dir.path());
        let _a = reg
            .register(Entry::new("a", BackendKind::QemuTcg, 600, true), limit(500))
            .unwrap();
        let e = reg
            .register(Entry::new("b", BackendKind::QemuTcg, 401, true), limit(500))
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("1001 MiB") && text.contains("1000 MiB"),
            "{text}"
        );
        assert!(!dir.path().join("b").exists(), "nothing made when refused");
        reg.register(Entry::new("b", BackendKind::QemuTcg, 400, true), limit(500))
            .unwrap();
    }

    #[test]
    fn growth_counts_the_size_not_the_maximum_and_rechecks_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new(dir.path());
        // A pod of 300 MiB in a VM of 2048: 300 count, not 2048.
        let mut pod = Entry::new("pod", BackendKind::QemuTcg, 300, true);
        pod.reserve_mib = 1748;
        let mut pod = reg.register(pod, limit(500)).unwrap();
        let _other = reg
            .register(Entry::new("b", BackendKind::QemuTcg, 600, true), limit(500))
            .unwrap();
        pod.resize(400, 1648, limit(500)).unwrap();
        let seen = reg.entries().unwrap();
        assert_eq!((seen[1].assigned_mib, seen[1].reserve_mib), (400, 1648));
        let e = pod.resize(401, 1647, limit(500)).unwrap_err().to_string();
        assert_eq!(
            e,
            "growing pod from 400 to 401 MiB would assign 1001 MiB in all, over the limit of \
             1000 MiB (memory.overcommit_ratio 2 x 500 MiB of host memory)"
        );
        // Refused: nothing changed.
        let seen = reg.entries().unwrap();
        assert_eq!((seen[1].assigned_mib, seen[1].reserve_mib), (400, 1648));
        assert_eq!(pod.entry().assigned_mib, 400);
        // Shrinking is never refused.
        pod.resize(350, 1698, limit(1)).unwrap();
    }

    #[test]
    fn stale_and_garbage_entries_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new(dir.path());
        let mut dead = Entry::new("dead", BackendKind::QemuTcg, 256, true);
        dead.owner_pid = u32::MAX;
        dead.vmm_pid = Some(u32::MAX - 1);
        std::fs::create_dir_all(dir.path().join("dead")).unwrap();
        std::fs::write(
            dir.path().join("dead").join(ENTRY_FILE),
            serde_json::to_vec(&dead).unwrap(),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("junk")).unwrap();
        std::fs::write(dir.path().join("junk").join(ENTRY_FILE), b"{not json").unwrap();
        // A dead entry does not count against the limit either.
        let _live = reg
            .register(
                Entry::new("live", BackendKind::QemuTcg, 500, true),
                limit(250),
            )
            .unwrap();
        let ids: Vec<String> = reg.entries().unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["live"]);
    }

    #[test]
    fn one_coordinator_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new(dir.path());
        assert!(!reg.coordinator_running().unwrap());
        let first = reg.coordinator_lock().unwrap();
        assert!(first.is_some());
        assert!(reg.coordinator_running().unwrap());
        assert!(reg.coordinator_lock().unwrap().is_none());
        // Another state directory has its own coordinator.
        let other = tempfile::tempdir().unwrap();
        assert!(Registry::new(other.path())
            .coordinator_lock()
            .unwrap()
            .is_some());
        drop(first);
        assert!(!reg.coordinator_running().unwrap());
        assert!(reg.coordinator_lock().unwrap().is_some());
    }

    #[test]
    fn ids_that_escape_the_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new(dir.path());
        for id in ["", "../x", ".hidden"] {
            assert!(reg
                .register(Entry::new(id, BackendKind::QemuTcg, 64, true), None)
                .is_err());
        }
    }
}
