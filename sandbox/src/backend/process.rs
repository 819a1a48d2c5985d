//! Child processes of a VM (the VMM, device backends): started with their
//! stderr in a log file (tied to this process when it asked,
//! [`crate::process::die_with_this_process`]), stopped with SIGTERM then
//! SIGKILL, always reaped.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{BackendError, Result};
use crate::process::spawn_child;

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
}
