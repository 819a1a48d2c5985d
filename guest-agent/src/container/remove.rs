//! Removing a container while the VM runs on (a pod's container that the
//! kubelet replaces): its processes killed and reaped, the runtime's
//! record deleted, its rootfs taken down (the guest RAM of a tmpfs upper
//! layer comes back), its bundle and cgroup removed, the id forgotten.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libcontainer::container::Container as LcContainer;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{Container, ContainerError, Containers, ExitInfo, Laps, Result, Stage};
use crate::lock::LockExt as _;
use crate::rootfs;
use crate::runtime::STATE_ROOT;

/// How long the container's processes get to die once SIGKILLed (and be
/// reaped, and their terminal output drained).
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// The status reported for a process the removal ended without an exit of
/// its own to report (one prepared but never started, or one whose exit
/// was not seen within [`KILL_TIMEOUT`]): as if SIGKILLed.
const REMOVED_STATUS: i32 = 128 + 9;

/// How often the cgroup and the exits are looked at while waiting.
const POLL: Duration = Duration::from_millis(20);

impl Containers {
    /// Removes container `id`: SIGKILLs what of it still runs (its whole
    /// cgroup), waits for the exits, deletes it in libcontainer, takes its
    /// rootfs down, removes its bundle, state and cgroup, and forgets it.
    /// Waits pending on its processes return. Every step is tried even if
    /// one fails; on a failure the container stays known (a retry does the
    /// rest: each step is idempotent) and the first failure is returned.
    pub async fn remove(self: &Arc<Self>, id: &str) -> Result<()> {
        let _busy = self.standby.busy();
        let container = self
            .by_id
            .lock_or_recover()
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(format!("container {id:?}")))?;
        {
            let mut stage = container.stage.lock_or_recover();
            match *stage {
                Stage::Creating => {
                    return Err(ContainerError::FailedPrecondition(format!(
                        "container {id:?} is being created"
                    )))
                }
                Stage::Removing => {
                    return Err(ContainerError::FailedPrecondition(format!(
                        "container {id:?} is being removed"
                    )))
                }
                Stage::Ready => *stage = Stage::Removing,
            }
        }
        let mut laps = Laps::new("remove", id);
        let result = self.take_down(&container, &mut laps).await;
        match result {
            Ok(()) => {
                let mut by_id = self.by_id.lock_or_recover();
                if by_id.get(id).is_some_and(|c| Arc::ptr_eq(c, &container)) {
                    by_id.remove(id);
                }
                drop(by_id);
                tracing::info!(container = %id, "container removed");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(container = %id, error = %crate::describe(&e), "container not fully removed");
                container.set_stage(Stage::Ready);
                Err(e)
            }
        }
    }

    /// The work of [`Self::remove`].
    async fn take_down(&self, container: &Arc<Container>, laps: &mut Laps) -> Result<()> {
        let mut first: Option<ContainerError> = None;
        let mut note = |e: ContainerError| {
            if first.is_none() {
                first = Some(e);
            }
        };
        let deadline = Instant::now() + KILL_TIMEOUT;
        kill_cgroup(&container.cgroup, &container.cgroup_pids());
        while !container.cgroup_pids().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
            // A process forking while it was killed: once more.
            kill_cgroup(&container.cgroup, &container.cgroup_pids());
        }
        laps.lap("killed");
        self.settle_exits(container, deadline).await;
        laps.lap("exits recorded");

        let state = Path::new(STATE_ROOT).join(&container.id);
        if state.exists() {
            let at = state.clone();
            let deleted = tokio::task::spawn_blocking(move || {
                LcContainer::load(at).and_then(|mut c| c.delete(true))
            })
            .await
            .map_err(ContainerError::task("delete task"))
            .and_then(|r| r.map_err(ContainerError::Delete));
            if let Err(e) = deleted {
                // What libcontainer left is removed below all the same.
                tracing::warn!(container = %container.id, error = %crate::describe(&e), "libcontainer delete failed");
            }
        }
        laps.lap("runtime state deleted");

        let id = container.id.clone();
        match tokio::task::spawn_blocking(move || rootfs::teardown(&id)).await {
            Ok(Ok(())) => {}
            Ok(Err(source)) => note(ContainerError::Rootfs {
                what: "taking the rootfs down",
                source,
            }),
            Err(e) => note(ContainerError::task("teardown task")(e)),
        }
        laps.lap("rootfs down");

        if let Err(e) = remove_cgroup(&container.cgroup).await {
            note(e);
        }
        match fs::remove_dir_all(&state) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                note(ContainerError::io("removing the runtime state")(e))
            }
            _ => {}
        }
        laps.lap("cgroup and state removed");
        first.map_or(Ok(()), Err)
    }

    /// Waits (until `deadline`) for the exits of the container's started
    /// processes to be recorded; then gives every process still without
    /// one [`REMOVED_STATUS`], so no wait on it is left hanging.
    async fn settle_exits(&self, container: &Container, deadline: Instant) {
        let processes: Vec<_> = container
            .processes
            .lock_or_recover()
            .values()
            .cloned()
            .collect();
        for process in &processes {
            if process.pid().is_none() {
                continue;
            }
            let mut rx = process.exit.subscribe();
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = tokio::time::timeout(left, rx.wait_for(Option::is_some)).await;
        }
        for process in &processes {
            process.exit.send_if_modified(|exit| {
                if exit.is_some() {
                    return false;
                }
                *exit = Some(ExitInfo {
                    status: REMOVED_STATUS,
                    at_unix_ns: super::exit::now_unix_ns(),
                    oom_killed: false,
                });
                true
            });
        }
    }
}

/// SIGKILLs everything in `cgroup` (cgroup.kill, then each of `pids` in
/// case the kernel lacks it). A frozen cgroup is thawed first, though
/// cgroup v2 delivers SIGKILL to frozen tasks as well.
fn kill_cgroup(cgroup: &Path, pids: &[i32]) {
    if !cgroup.exists() {
        return;
    }
    let _ = fs::write(cgroup.join("cgroup.freeze"), "0");
    let _ = fs::write(cgroup.join("cgroup.kill"), "1");
    for &pid in pids {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Removes the container's cgroup (libcontainer's delete normally has):
/// rmdir, retried while the last processes leave it.
async fn remove_cgroup(cgroup: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(ContainerError::io("removing the container's cgroup")(e))
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}
