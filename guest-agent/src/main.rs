//! capsid-agent: PID 1 of the guest.
//!
//! It mounts the guest's own filesystems, tells the host it is ready by
//! connecting out over vsock, and serves the host's requests on that
//! connection. When the host cannot be reached there is nothing to serve:
//! the agent says why on the console and ends the VM rather than leaving it
//! running unseen.

mod host;
mod mount;

use std::fs;
use std::time::Duration;

use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Printed on the console when PID 1 is set up; tests and `capsid bench`
/// look for it.
const READY_MARKER: &str = "capsid-agent: ready";

fn main() {
    if std::process::id() != 1 {
        eprintln!("capsid-agent: must run as PID 1 of a capsid guest");
        std::process::exit(2);
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .init();

    if let Err(e) = mount::pseudo_filesystems() {
        fatal(&describe(&e));
    }
    let uptime = kernel_uptime().unwrap_or_default();
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    println!(
        "{READY_MARKER} version={} kernel_boot_ms={}",
        env!("CARGO_PKG_VERSION"),
        uptime.as_millis()
    );

    let port = host::agent_port(&cmdline);
    match host::connect_to_host(port) {
        Ok(_conn) => {
            tracing::info!(port, "connected to host");
            reap_forever();
        }
        Err(e) => fatal(&describe(&e)),
    }
}

/// The guest kernel's uptime, read from /proc/uptime.
fn kernel_uptime() -> Option<Duration> {
    let text = fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_secs_f64(secs))
}

/// Reaps orphaned processes, as PID 1 must, until the VM ends.
fn reap_forever() -> ! {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::empty())) {
            Ok(WaitStatus::StillAlive) | Ok(_) => {}
            Err(nix::Error::ECHILD) => std::thread::sleep(Duration::from_secs(1)),
            Err(e) => tracing::warn!(error = %e, "waitpid"),
        }
    }
}

/// An error and its sources, as one line.
fn describe(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

/// Says why on the console, then ends the VM (guest reboot ends it on every
/// capsid backend).
fn fatal(message: &str) -> ! {
    eprintln!("capsid-agent: {message}; shutting the VM down");
    nix::unistd::sync();
    let err = reboot(RebootMode::RB_AUTOBOOT);
    eprintln!("capsid-agent: reboot failed: {err:?}");
    std::process::exit(1);
}
