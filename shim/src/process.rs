//! One process of a task — the container's init or an exec — as the Task
//! API sees it: created, running or stopped, its guest pid, its exit and
//! its stdio on the host.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capsid_sandbox::container::PreparedExec;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::io::{ProcessIo, StdioPaths};

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Prepared, not started.
    Created,
    /// Started and not yet exited.
    Running,
    /// Exited.
    Stopped,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, or 128+N after signal N.
    pub status: u32,
    /// When.
    pub at: SystemTime,
}

impl ExitInfo {
    /// An exit at `unix_ns` (0: now) with `status` as the agent reports it.
    pub fn from_agent(status: i32, unix_ns: u64) -> Self {
        let at = if unix_ns == 0 {
            SystemTime::now()
        } else {
            UNIX_EPOCH + Duration::from_nanos(unix_ns)
        };
        Self {
            status: u32::try_from(status).unwrap_or(255),
            at,
        }
    }

    /// The exit time as a protobuf timestamp.
    pub fn timestamp(&self) -> Timestamp {
        timestamp(self.at)
    }
}

/// `at` as a protobuf timestamp.
pub fn timestamp(at: SystemTime) -> Timestamp {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

/// A process of a task.
#[derive(Debug)]
pub struct Process {
    /// Exec id; empty for the init.
    pub exec_id: String,
    /// Its stdio, as containerd named it.
    pub stdio: StdioPaths,
    pid: AtomicU32,
    started: AtomicBool,
    exit: watch::Sender<Option<ExitInfo>>,
    io: Mutex<Option<Arc<ProcessIo>>>,
    pending: Mutex<Option<PreparedExec>>,
    watcher: Mutex<Option<JoinHandle<()>>>,
}

impl Process {
    /// A new, created process.
    pub fn new(exec_id: &str, stdio: StdioPaths) -> Arc<Self> {
        Arc::new(Self {
            exec_id: exec_id.to_string(),
            stdio,
            pid: AtomicU32::new(0),
            started: AtomicBool::new(false),
            exit: watch::channel(None).0,
            io: Mutex::new(None),
            pending: Mutex::new(None),
            watcher: Mutex::new(None),
        })
    }

    /// Guest pid (0 until known).
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::Relaxed)
    }

    /// Records the guest pid.
    pub fn set_pid(&self, pid: u32) {
        self.pid.store(pid, Ordering::Relaxed);
    }

    /// Marks the process started.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    /// Its status.
    pub fn status(&self) -> Status {
        if self.exited().is_some() {
            Status::Stopped
        } else if self.started.load(Ordering::Relaxed) {
            Status::Running
        } else {
            Status::Created
        }
    }

    /// Its exit, once it has exited.
    pub fn exited(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    /// Records the exit (the first one counts) and wakes every waiter.
    pub fn set_exited(&self, info: ExitInfo) {
        self.exit.send_if_modified(|e| {
            if e.is_none() {
                *e = Some(info);
                true
            } else {
                false
            }
        });
    }

    /// Waits for the exit.
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit.subscribe();
        loop {
            if let Some(info) = *rx.borrow_and_update() {
                return info;
            }
            // The sender lives in `self`: it cannot close while we wait.
            if rx.changed().await.is_err() {
                return ExitInfo::from_agent(255, 0);
            }
        }
    }

    /// The copying of its stdio, once wired.
    pub fn io(&self) -> Option<Arc<ProcessIo>> {
        self.io.lock().ok().and_then(|io| io.clone())
    }

    /// Records its stdio copying.
    pub fn set_io(&self, io: ProcessIo) {
        if let Ok(mut slot) = self.io.lock() {
            *slot = Some(Arc::new(io));
        }
    }

    /// The process the agent prepared at Exec, started at Start.
    pub fn set_pending(&self, pending: PreparedExec) {
        if let Ok(mut slot) = self.pending.lock() {
            *slot = Some(pending);
        }
    }

    /// Takes the process prepared at Exec (once).
    pub fn take_pending(&self) -> Option<PreparedExec> {
        self.pending.lock().ok().and_then(|mut p| p.take())
    }

    /// Records the task that reports its exit.
    pub fn set_watcher(&self, task: JoinHandle<()>) {
        if let Ok(mut slot) = self.watcher.lock() {
            *slot = Some(task);
        }
    }

    /// Stops reporting its exit (it is being deleted) and its stdio.
    pub fn abandon(&self) {
        if let Some(task) = self.watcher.lock().ok().and_then(|mut w| w.take()) {
            task.abort();
        }
        if let Ok(mut io) = self.io.lock() {
            io.take();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn life_of_a_process() {
        let p = Process::new("e1", StdioPaths::default());
        assert_eq!(p.status(), Status::Created);
        p.set_pid(42);
        p.set_started();
        assert_eq!(p.status(), Status::Running);
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.wait().await })
        };
        let exit = ExitInfo::from_agent(137, 1_700_000_000_123_456_789);
        p.set_exited(exit);
        p.set_exited(ExitInfo::from_agent(0, 0));
        assert_eq!(waiter.await.unwrap(), exit);
        assert_eq!(p.status(), Status::Stopped);
        assert_eq!(p.exited().unwrap().status, 137);
        let ts = exit.timestamp();
        assert_eq!((ts.seconds, ts.nanos), (1_700_000_000, 123_456_789));
        assert_eq!(p.pid(), 42);
    }

    #[test]
    fn negative_statuses_become_255() {
        assert_eq!(ExitInfo::from_agent(-1, 0).status, 255);
    }
}
