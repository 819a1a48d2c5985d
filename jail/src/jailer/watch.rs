//! The jailer's parent: stays outside the jail's pid namespace so its
//! caller can wait for it as for the program itself. It drops to the
//! jail's uid under a seccomp filter of its own, forwards termination
//! signals, and ends as the program ended: the same exit code, or killed
//! by the same signal.
//!
//! The program is pid 1 of its namespace, where the kernel drops signals
//! it has no handler for. A signal whose default action would end it is
//! therefore sent as SIGKILL when the program neither catches nor blocks
//! it: the end its sender asked for.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::os::fd::OwnedFd;

use capsid_jail::JailSpec;
use nix::sys::signal::{kill, raise, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use super::creds::{self, Parent};
use super::{sys, JailError};

/// The signals passed on to the program.
const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// What the parent may call once the jail is up: waiting, signalling,
/// reading the program's /proc status, writing an error, exiting.
const PARENT_SYSCALLS: &[libc::c_long] = &[
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigreturn,
    libc::SYS_wait4,
    libc::SYS_kill,
    libc::SYS_tgkill,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_openat,
    libc::SYS_read,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_write,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Watches `child` until it ends, then ends the same way.
pub fn run(
    spec: &JailSpec,
    child: Pid,
    caller: Parent,
    _alive: OwnedFd,
) -> Result<Infallible, JailError> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    for s in FORWARDED {
        set.add(s);
    }
    set.thread_block().map_err(sys("block signals"))?;
    creds::drop_all(spec, caller)?;
    filter()?;
    // A signal sent as SIGKILL: the end it stands for is reported.
    let mut stood_for = None;
    loop {
        let signal = set.wait().map_err(sys("wait for a signal"))?;
        if signal == Signal::SIGCHLD {
            match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => std::process::exit(code),
                Ok(WaitStatus::Signaled(_, Signal::SIGKILL, _)) if stood_for.is_some() => {
                    end_by(stood_for.unwrap_or(Signal::SIGKILL))
                }
                Ok(WaitStatus::Signaled(_, sig, _)) => end_by(sig),
                _ => continue,
            }
        }
        if handles(signal) {
            let _ = kill(child, signal);
        } else {
            stood_for = Some(signal);
            let _ = kill(child, Signal::SIGKILL);
        }
    }
}

/// Whether the program (pid 1 of the jail, as the jail's /proc shows it:
/// this process shares the jail's mount namespace and root) catches or
/// blocks `signal`.
fn handles(signal: Signal) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/1/status") else {
        return false;
    };
    let bit = 1u64 << (signal as u32 - 1);
    ["SigCgt:", "SigBlk:"].iter().any(|field| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .is_some_and(|mask| mask & bit != 0)
    })
}

/// Ends this process by `signal`, as the program was.
fn end_by(signal: Signal) -> ! {
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: restoring the default action installs no handler.
    let _ = unsafe { sigaction(signal, &default) };
    let mut one = SigSet::empty();
    one.add(signal);
    let _ = one.thread_unblock();
    let _ = raise(signal);
    // A signal whose default is to be ignored or to stop.
    std::process::exit(128 + signal as i32)
}

/// The parent's own seccomp filter.
fn filter() -> Result<(), JailError> {
    let arch =
        TargetArch::try_from(std::env::consts::ARCH).map_err(|e| JailError::Seccomp(e.into()))?;
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        PARENT_SYSCALLS.iter().map(|n| (*n, Vec::new())).collect();
    let program: BpfProgram = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )
    .and_then(|f| f.try_into())
    .map_err(|e| JailError::Seccomp(e.into()))?;
    seccompiler::apply_filter(&program).map_err(JailError::Seccomp)
}
