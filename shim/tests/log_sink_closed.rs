//! The shim's log sink and stderr are the task's log FIFO; containerd closes
//! its end after Delete. Logging must then go on quietly: before, the
//! subscriber reported the failed write with `eprintln!`, which panicked
//! on the closed stderr too (a shim exiting 101 after its task's Delete).
//! Its own process and no test harness: the subscriber is global, and
//! the harness would capture `eprintln!` instead of writing to fd 2.

// A test without the harness: clippy cannot tell it is one.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};

fn main() {
    // SAFETY: SIGPIPE is ignored, as the Rust runtime does for a binary,
    // so that a write to the closed pipe fails with EPIPE.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigIgn,
        )
        .unwrap();
    }
    let (reader, writer): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
    drop(reader);
    nix::unistd::dup2_stderr(writer.as_fd()).unwrap();
    capsid_shim::logging::init(Some(File::from(writer)), false);
    for i in 0..3 {
        tracing::info!(i, "a line nobody reads");
        tracing::warn!(i, "another");
    }
    // Reached only if nothing panicked (a panic exits 101).
}
