//! The jailer's steps: [`host`] as root in the caller's namespaces, then a
//! fork into new namespaces; the child builds its [`root`], drops its
//! [`creds`] and execs; the parent [`watch`]es it.

mod creds;
mod host;
mod root;
mod watch;

use std::convert::Infallible;
use std::path::PathBuf;

use capsid_jail::JailSpec;
use nix::sched::CloneFlags;
use std::os::fd::AsRawFd;

use nix::fcntl::OFlag;
use nix::unistd::{fork, getppid, ForkResult};

/// Why a jail could not be made.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A system call on a path failed.
    #[error("cannot {what} {}", path.display())]
    Path {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("cannot {what}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// The parent's seccomp filter cannot be built or installed.
    #[error("cannot install the jailer's seccomp filter")]
    Seccomp(#[source] seccompiler::Error),
    /// The program could not be executed.
    #[error("cannot execute {}", path.display())]
    Exec {
        /// The program.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The error and its sources, on one line.
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> JailError {
    move |source| JailError::Sys { what, source }
}

/// Makes the jail and runs the program in it. Returns only on failure.
pub fn run(spec: &JailSpec) -> Result<Infallible, JailError> {
    host::enter(spec)?;
    nix::sched::unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS,
    )
    .map_err(sys("unshare mount, pid, ipc and uts namespaces"))?;
    let caller = getppid();
    // The tie to the caller it was started with, if any: a credential
    // change clears it, so the parent sets it again after dropping root.
    let tie = nix::sys::prctl::get_pdeathsig().map_err(sys("read the parent-death signal"))?;
    // The child's way to tell that the parent lives: only the parent keeps
    // the write end (close-on-exec: the program never has either end).
    let (alive_r, alive_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys("make the jail's liveness pipe"))?;
    // SAFETY: the jailer is single-threaded, so the child may do anything
    // the parent could.
    match unsafe { fork() }.map_err(sys("fork into the new pid namespace"))? {
        ForkResult::Child => {
            // pid 1 of the jail's pid namespace.
            drop(alive_w);
            let parent = creds::Parent::Jailer(alive_r.as_raw_fd());
            creds::die_with(parent)?;
            root::build(spec)?;
            creds::drop_all(spec, parent)?;
            Err(exec(spec))
        }
        ForkResult::Parent { child } => {
            drop(alive_r);
            host::close_passed(spec);
            watch::run(spec, child, creds::Parent::Caller(caller, tie), alive_w)
        }
    }
}

fn exec(spec: &JailSpec) -> JailError {
    use std::os::unix::process::CommandExt;
    let source = std::process::Command::new(&spec.program)
        .args(&spec.args)
        .exec();
    JailError::Exec {
        path: spec.program.clone(),
        source,
    }
}
