//! Reaping children as PID 1 must, and telling interested tasks how a
//! process ended.
//!
//! The agent is the guest's init: every orphan in the guest (container
//! processes whose parent runtime exited included) becomes its child. One
//! task reaps them all on SIGCHLD; a caller interested in a pid registers
//! for it, before or after the exit happened.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use crate::lock::LockExt as _;

/// Exits of pids nobody asked about yet, kept at most (oldest dropped).
const MAX_UNCLAIMED: usize = 4096;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128+N after signal N (as shells and containerd
    /// report it).
    pub status: i32,
    /// Killed by a signal.
    pub signaled: bool,
}

impl Exit {
    fn from_wait(status: WaitStatus) -> Option<(Pid, Exit)> {
        match status {
            WaitStatus::Exited(pid, code) => Some((
                pid,
                Exit {
                    status: code,
                    signaled: false,
                },
            )),
            WaitStatus::Signaled(pid, sig, _) => Some((
                pid,
                Exit {
                    status: 128 + sig as i32,
                    signaled: true,
                },
            )),
            _ => None,
        }
    }
}

#[derive(Default)]
struct State {
    waiters: HashMap<i32, Vec<oneshot::Sender<Exit>>>,
    unclaimed: HashMap<i32, Exit>,
    unclaimed_order: VecDeque<i32>,
}

/// The reaper: cloneable handle to the shared state.
#[derive(Clone, Default)]
pub struct Reaper {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper").finish_non_exhaustive()
    }
}

impl Reaper {
    /// Starts reaping on SIGCHLD. Must be called inside the tokio runtime.
    pub fn start() -> std::io::Result<Self> {
        let reaper = Self::default();
        let mut sigchld = signal(SignalKind::child())?;
        let me = reaper.clone();
        tokio::spawn(async move {
            loop {
                me.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Reaps every exited child and hands out the statuses.
    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => {
                    if let Some((pid, exit)) = Exit::from_wait(status) {
                        self.deliver(pid.as_raw(), exit);
                    }
                }
            }
        }
    }

    fn deliver(&self, pid: i32, exit: Exit) {
        let mut state = self.state.lock_or_recover();
        match state.waiters.remove(&pid) {
            Some(waiters) => {
                for w in waiters {
                    let _ = w.send(exit);
                }
            }
            None => {
                state.unclaimed.insert(pid, exit);
                state.unclaimed_order.push_back(pid);
                while state.unclaimed_order.len() > MAX_UNCLAIMED {
                    if let Some(old) = state.unclaimed_order.pop_front() {
                        state.unclaimed.remove(&old);
                    }
                }
            }
        }
    }

    /// A future resolving to how `pid` ended, whether it already did or not.
    pub fn wait_for(&self, pid: i32) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        let mut state = self.state.lock_or_recover();
        if let Some(exit) = state.unclaimed.remove(&pid) {
            let _ = tx.send(exit);
        } else {
            state.waiters.entry(pid).or_default().push(tx);
        }
        rx
    }

    /// Spawns `cmd` and returns its pid with a future for its exit; the
    /// registration happens before the reaper can see the exit.
    pub fn spawn(
        &self,
        cmd: &mut std::process::Command,
    ) -> std::io::Result<(i32, oneshot::Receiver<Exit>)> {
        let (tx, rx) = oneshot::channel();
        let mut state = self.state.lock_or_recover();
        let child = cmd.spawn()?;
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        state.waiters.entry(pid).or_default().push(tx);
        // The std Child handle must not wait for it: the reaper does.
        drop(child);
        Ok((pid, rx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_registration_still_gets_the_exit() {
        let r = Reaper::default();
        r.deliver(
            42,
            Exit {
                status: 3,
                signaled: false,
            },
        );
        let mut rx = r.wait_for(42);
        assert_eq!(
            rx.try_recv().unwrap(),
            Exit {
                status: 3,
                signaled: false
            }
        );
    }

    #[test]
    fn early_registration_gets_the_exit() {
        let r = Reaper::default();
        let mut rx = r.wait_for(7);
        assert!(rx.try_recv().is_err());
        r.deliver(
            7,
            Exit {
                status: 137,
                signaled: true,
            },
        );
        assert_eq!(
            rx.try_recv().unwrap(),
            Exit {
                status: 137,
                signaled: true
            }
        );
    }

    #[test]
    fn unclaimed_exits_are_bounded() {
        let r = Reaper::default();
        for pid in 0..i32::try_from(MAX_UNCLAIMED + 10).unwrap() {
            r.deliver(
                pid,
                Exit {
                    status: 0,
                    signaled: false,
                },
            );
        }
        let state = r.state.lock().unwrap();
        assert_eq!(state.unclaimed.len(), MAX_UNCLAIMED);
        assert!(!state.unclaimed.contains_key(&0));
    }
}
