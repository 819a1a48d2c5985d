//! Dropping root: every capability out of the bounding set, the jail's
//! uid and gid with no supplementary groups (which clears the permitted,
//! effective and ambient sets), `no_new_privs`, and the parent-death
//! signal, set again because a credential change clears it.

use capsid_jail::JailSpec;
use nix::sys::signal::Signal;
use nix::unistd::{getppid, setgroups, setresgid, setresuid, Gid, Pid, Uid};

use super::{sys, JailError};

/// How a process tells that the one it must die with is still there.
#[derive(Debug, Clone, Copy)]
pub enum Parent {
    /// The caller of the jailer, by its pid in this (the host's) pid
    /// namespace, with the parent-death signal the caller gave the jailer
    /// (`None`: the caller did not tie the jailer to itself, and neither
    /// does the jailer).
    Caller(Pid, Option<Signal>),
    /// The jailer parent, outside this pid namespace (where getppid says
    /// 0): alive while the write end of this pipe, which only it holds,
    /// is open.
    Jailer(std::os::fd::RawFd),
}

impl Parent {
    fn alive(self) -> bool {
        match self {
            Self::Caller(pid, _) => getppid() == pid,
            Self::Jailer(fd) => {
                let mut poll = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, no waiting.
                let n = unsafe { libc::poll(&mut poll, 1, 0) };
                n == 0
            }
        }
    }
}

/// SIGKILL when `parent` ends; fails if it has ended already.
pub fn die_with(parent: Parent) -> Result<(), JailError> {
    let signal = match parent {
        Parent::Caller(_, None) => return Ok(()),
        Parent::Caller(_, Some(signal)) => signal,
        Parent::Jailer(_) => Signal::SIGKILL,
    };
    nix::sys::prctl::set_pdeathsig(signal).map_err(sys("set the parent-death signal"))?;
    if !parent.alive() {
        return Err(JailError::Sys {
            what: "outlive the process that started the jail",
            source: nix::Error::ESRCH,
        });
    }
    Ok(())
}

/// Drops every privilege; `parent` is the process this one must die with.
pub fn drop_all(spec: &JailSpec, parent: Parent) -> Result<(), JailError> {
    // The bounding set: capabilities numbered past the kernel's last one
    // answer EINVAL, which ends the loop.
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_DROP takes a capability number by value.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
            if nix::Error::last() == nix::Error::EINVAL {
                break;
            }
            return Err(JailError::Sys {
                what: "drop a capability from the bounding set",
                source: nix::Error::last(),
            });
        }
    }
    setgroups(&[]).map_err(sys("drop supplementary groups"))?;
    let gid = Gid::from_raw(spec.gid);
    setresgid(gid, gid, gid).map_err(sys("switch to the jail's gid"))?;
    let uid = Uid::from_raw(spec.uid);
    setresuid(uid, uid, uid).map_err(sys("switch to the jail's uid"))?;
    nix::sys::prctl::set_no_new_privs().map_err(sys("set no_new_privs"))?;
    die_with(parent)
}
