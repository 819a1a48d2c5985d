//! Exits, waits and signals: a process's exit recorded once its terminal
//! output is drained, the event queue the host long-polls, and signals to
//! one process or to the whole container.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use capsid_protocol::agent::{event, Event, OomKilled, ProcessExited};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::Notify;

use super::process::Process;
use super::{Container, ContainerError, Containers, ExitInfo, Laps, Result};
use crate::lock::LockExt as _;
use crate::reaper::Exit;
use crate::stats;

/// Events kept for the host at most; older ones are dropped.
const MAX_EVENTS: usize = 1024;

/// The queue of events the host long-polls.
#[derive(Default)]
pub(super) struct Events {
    queue: Mutex<VecDeque<Event>>,
    ready: Notify,
}

impl Events {
    fn push(&self, ev: Event) {
        {
            let mut q = self.queue.lock_or_recover();
            q.push_back(ev);
            while q.len() > MAX_EVENTS {
                q.pop_front();
            }
        }
        self.ready.notify_one();
    }
}

/// The wall clock, Unix nanoseconds.
pub(super) fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Containers {
    /// The next event (waits for one).
    pub async fn next_event(&self) -> Event {
        loop {
            let notified = self.events.ready.notified();
            let next = self.events.queue.lock_or_recover().pop_front();
            if let Some(ev) = next {
                return ev;
            }
            notified.await;
        }
    }

    /// Records the process's exit once it happens (after its terminal
    /// output is drained) and tells the host.
    pub(super) fn watch_exit(
        self: &Arc<Self>,
        container: Arc<Container>,
        process: Arc<Process>,
        pid: i32,
    ) {
        let exit_rx = self.reaper.wait_for(pid);
        let containers = Arc::clone(self);
        tokio::spawn(async move {
            let exit = exit_rx.await.unwrap_or(Exit {
                status: 255,
                signaled: false,
            });
            let mut laps = Laps::new("exit", &container.id);
            // An init that shared its PID namespace leaves its children
            // running, holding its output open: they go with it, as with
            // runc, and the exit is not held up by them.
            if process.exec_id.is_empty()
                && container
                    .shares_pid_namespace
                    .load(std::sync::atomic::Ordering::SeqCst)
            {
                let _ = std::fs::write(container.cgroup.join("cgroup.kill"), "1");
            }
            if let Some(tty) = process.tty() {
                let _ = tokio::task::spawn_blocking(move || tty.lock_or_recover().drain()).await;
            }
            let oom =
                exit.signaled && exit.status == 128 + 9 && stats::oom_kills(&container.cgroup) > 0;
            let info = ExitInfo {
                status: exit.status,
                at_unix_ns: now_unix_ns(),
                oom_killed: oom,
            };
            // send_replace stores the value even when nobody is subscribed yet.
            process.exit.send_replace(Some(info));
            // The host drains its output and reacts (deletes it, stops the
            // VM): no standby starts meanwhile.
            containers.standby.touch();
            tracing::info!(container = %container.id, exec = %process.exec_id, pid, status = exit.status, oom, "process exited");
            if oom {
                let mut ev = Event::new();
                ev.container_id = container.id.clone();
                ev.kind = Some(event::Kind::Oom(OomKilled::new()));
                containers.events.push(ev);
            }
            let mut exited = ProcessExited::new();
            exited.exec_id = process.exec_id.clone();
            exited.pid = u32::try_from(pid).unwrap_or(0);
            exited.exit_status = info.status;
            exited.exited_at_unix_ns = info.at_unix_ns;
            let mut ev = Event::new();
            ev.container_id = container.id.clone();
            ev.kind = Some(event::Kind::Exited(exited));
            containers.events.push(ev);
            laps.lap("drained, event queued");
        });
    }

    /// Waits for a process to exit (and its output to drain).
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<ExitInfo> {
        let process = self.container(id)?.process(exec_id)?;
        let mut rx = process.exit.subscribe();
        loop {
            if let Some(info) = *rx.borrow_and_update() {
                return Ok(info);
            }
            rx.changed()
                .await
                .map_err(|_| ContainerError::ExitWatchClosed)?;
        }
    }

    /// Signals a process, or every process of the container.
    pub fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let container = self.container(id)?;
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| ContainerError::Invalid(format!("signal {signal}")))?;
        if all {
            for pid in container.cgroup_pids() {
                let _ = kill(Pid::from_raw(pid), sig);
            }
            return Ok(());
        }
        let process = container.process(exec_id)?;
        if process.exited().is_some() {
            return Err(ContainerError::NotFound(format!(
                "process {exec_id:?} has exited"
            )));
        }
        let pid = process.pid().ok_or_else(|| {
            ContainerError::FailedPrecondition(format!("process {exec_id:?} is not running"))
        })?;
        kill(Pid::from_raw(pid), sig).map_err(ContainerError::Kill)
    }

    /// Kills every container process and tears the containers down.
    pub fn kill_everything(&self) {
        let containers: Vec<Arc<Container>> =
            self.by_id.lock_or_recover().values().cloned().collect();
        for c in containers {
            let _ = std::fs::write(c.cgroup.join("cgroup.kill"), "1");
            for pid in c.cgroup_pids() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}
