//! Child processes of a VM (the VMM, device backends): started with their
//! stderr in a log file (tied to this process when it asked,
//! [`crate::process::die_with_this_process`]), stopped with SIGTERM then
//! SIGKILL, always reaped. [`DeviceWatch`] holds the rule that a VM lives
//! only as long as all of its device processes do.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{BackendError, Result, VmExit};
use crate::process::spawn_child;

/// How long the VM's main process gets to be seen exiting after a device
/// process exited cleanly. A device backend exits cleanly (status 0) when
/// its frontend hangs up, and the VMM hangs up as it exits (guest
/// power-off, or a VMM crash) a moment before it can be reaped: such an
/// exit is the VM's own end, not a device failing under it.
pub const HANG_UP_GRACE: Duration = Duration::from_secs(1);

/// How much of the end of a log is read for the last lines an error
/// message quotes.
const TAIL_BYTES: u64 = 8192;

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
        // In a run directory the VM's (jailed) processes may write to:
        // never through a link they planted.
        let stderr = crate::private_dir::create_no_follow(log).map_err(spawn_err)?;
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

    /// SIGKILL at once; returns once reaped.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let supervise_err = |source| BackendError::Supervise {
            what: self.what.clone(),
            source,
        };
        // Fails only when the child has exited meanwhile: the wait reaps it.
        let _ = self.child.kill();
        let status = self.child.wait().map_err(supervise_err)?;
        self.status = Some(status);
        Ok(status)
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

    /// Stops a device process once its VMM has been reaped: it first gets
    /// until `hang_up_by` to exit by itself (a backend exits when its
    /// frontend hangs up), then SIGTERM and `grace` before SIGKILL.
    /// Why not SIGTERM at once: a daemon that forked (virtiofsd's
    /// namespace sandbox waits in a parent for its worker) would die
    /// before its worker, which is then orphaned and ends after this
    /// process believes the VM gone.
    pub fn stop_after_hang_up(
        &mut self,
        hang_up_by: Instant,
        grace: Duration,
    ) -> Result<ExitStatus> {
        let left = hang_up_by.saturating_duration_since(Instant::now());
        if let Some(status) = self.wait_timeout(left)? {
            return Ok(status);
        }
        tracing::debug!(what = %self.what, "a device process did not exit when its VMM hung up");
        self.terminate(grace)
    }

    /// The last lines the process wrote to its log (for error messages).
    pub fn last_words(&self) -> String {
        let bytes =
            crate::private_dir::read_tail_no_follow(&self.log, TAIL_BYTES).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
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

/// Watches the device processes running beside a VM's main process
/// (QEMU's capsid-vhost backends, virtiofsd). A device process that ends
/// while the VM runs leaves the guest with a device that never answers
/// again: a disk whose requests hang, a vsock whose connections are gone
/// while the guest runs on. Such a VM is failed, not left running.
#[derive(Debug, Default)]
pub struct DeviceWatch {
    /// The first device seen to have exited cleanly, and when: it fails
    /// the VM only if the VMM outlives [`HANG_UP_GRACE`].
    clean_exit: Option<(usize, Instant)>,
}

impl DeviceWatch {
    /// Looks at `devices` while the VM's main process runs (callers reap
    /// that first): the index of the device whose exit fails the VM, if
    /// one has. A device killed by a signal or exiting with an error fails
    /// it at once; a clean exit after [`HANG_UP_GRACE`].
    pub fn failed(&mut self, devices: &mut [Supervised]) -> Result<Option<usize>> {
        if let Some(index) = Self::crashed(devices)? {
            return Ok(Some(index));
        }
        if self.clean_exit.is_none() {
            // Every exit found now is a clean one.
            for (index, dev) in devices.iter_mut().enumerate() {
                if dev.try_wait()?.is_some() {
                    tracing::debug!(process = %dev.what(), pid = dev.pid(), "a device process exited cleanly: waiting for the VMM to end too");
                    self.clean_exit = Some((index, Instant::now()));
                    break;
                }
            }
        }
        Ok(self
            .clean_exit
            .filter(|(_, since)| since.elapsed() >= HANG_UP_GRACE)
            .map(|(index, _)| index))
    }

    /// The first of `devices` that died by itself: killed by a signal or
    /// exited with an error (a clean exit is a hang-up). Asked also when
    /// the VMM failed: QEMU sometimes gives up on a device whose backend
    /// died (vsock), and then the device's death, found already reaped or
    /// a zombie, is what says why the VM ended.
    pub fn crashed(devices: &mut [Supervised]) -> Result<Option<usize>> {
        for (index, dev) in devices.iter_mut().enumerate() {
            if dev.try_wait()?.is_some_and(|status| !status.success()) {
                return Ok(Some(index));
            }
        }
        Ok(None)
    }
}

/// Ends a VM whose device process `dead` exited under it: kills the VMM at
/// once if it still runs (the guest cannot go on without the device, and
/// nothing in it is worth a graceful stop), says once which process died,
/// how, and its last words, and returns the VM's exit: `Failed` with the
/// device's status.
pub fn end_for_dead_device(
    vmm: &mut Supervised,
    dead: &Supervised,
    run_dir: &Path,
) -> Result<VmExit> {
    let code = dead.status.map_or(-1, status_code);
    tracing::warn!(
        vm = %run_dir.display(),
        process = %dead.what(),
        pid = dead.pid(),
        status = code,
        last_words = %dead.last_words(),
        "a device process of the VM exited while the VM ran: ending the VM"
    );
    vmm.kill()?;
    Ok(VmExit::Failed(code))
}

/// What ended a VM, for its error message, read before the run directory
/// is removed: each of `processes` that exited with a failure and its last
/// lines, then the console log's last lines.
pub fn last_words<'a>(
    processes: impl IntoIterator<Item = &'a mut Supervised>,
    console: &Path,
) -> String {
    let mut parts = Vec::new();
    for p in processes {
        if p.try_wait().ok().flatten().is_some_and(|s| !s.success()) {
            let words = p.last_words();
            if !words.is_empty() {
                parts.push(format!("{}: {words}", p.what()));
            }
        }
    }
    // Five lines are kept: the end of the log is enough (it may be 1 MiB).
    let console = crate::private_dir::read_tail_no_follow(console, TAIL_BYTES).unwrap_or_default();
    let text = String::from_utf8_lossy(&console);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
    parts.push(format!(
        "console: {}",
        if tail.is_empty() { "(empty)" } else { &tail }
    ));
    parts.join("; ")
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
    fn tied_children_are_spawned_from_the_long_lived_thread() {
        crate::process::die_with_this_process();
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

    fn spawn(dir: &Path, name: &str, script: &str) -> Supervised {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        Supervised::spawn(name, c, &dir.join(format!("{name}.log"))).unwrap()
    }

    fn wait_exited(dev: &mut Supervised) {
        assert!(dev.wait_timeout(Duration::from_secs(5)).unwrap().is_some());
    }

    #[test]
    fn a_device_killed_under_the_vm_ends_it_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut vmm = spawn(dir.path(), "vmm", "exec sleep 1000");
        let mut devices = vec![
            spawn(dir.path(), "dev-a", "exec sleep 1000"),
            spawn(dir.path(), "dev-b", "echo bad sector >&2; exec sleep 1000"),
        ];
        let mut watch = DeviceWatch::default();
        assert_eq!(watch.failed(&mut devices).unwrap(), None);
        std::thread::sleep(Duration::from_millis(100));
        devices[1].kill().unwrap();
        assert_eq!(watch.failed(&mut devices).unwrap(), Some(1));
        assert_eq!(DeviceWatch::crashed(&mut devices).unwrap(), Some(1));
        let exit = end_for_dead_device(&mut vmm, &devices[1], dir.path()).unwrap();
        assert_eq!(exit, VmExit::Failed(128 + 9));
        assert!(
            vmm.try_wait().unwrap().is_some(),
            "the VMM was left running"
        );
        assert_eq!(devices[1].last_words(), "bad sector");
        devices[0].terminate(Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn a_clean_device_exit_fails_the_vm_only_once_the_grace_is_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut devices = vec![spawn(dir.path(), "dev", "exit 0")];
        wait_exited(&mut devices[0]);
        let mut watch = DeviceWatch::default();
        let seen = Instant::now();
        // A device hung up on by an exiting VMM: the VMM's own exit says how
        // the VM ended, if it comes within the grace.
        assert_eq!(watch.failed(&mut devices).unwrap(), None);
        while seen.elapsed() < HANG_UP_GRACE - Duration::from_millis(100) {
            assert_eq!(watch.failed(&mut devices).unwrap(), None);
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(watch.failed(&mut devices).unwrap(), Some(0));
        // A hang-up is no crash: a VMM's own failure speaks for itself.
        assert_eq!(DeviceWatch::crashed(&mut devices).unwrap(), None);
        // An error exit does not wait.
        let mut devices = vec![spawn(dir.path(), "dev2", "exit 3")];
        wait_exited(&mut devices[0]);
        assert_eq!(
            DeviceWatch::default().failed(&mut devices).unwrap(),
            Some(0)
        );
    }
}
