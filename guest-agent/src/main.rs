//! capsid-agent: PID 1 of the guest.
//!
//! It leaves the initramfs for a tmpfs root (so containers can
//! pivot_root), mounts the guest's own filesystems, brings up loopback,
//! connects out to the host over vsock and serves the agent API on that
//! connection until the host asks it to power off. When the host cannot be
//! reached there is nothing to serve: it says why on the console and ends
//! the VM rather than leaving it running unseen.
//!
//! Run as `capsid-agent __runtime …` it is instead the short-lived OCI
//! runtime helper (`runtime.rs`); as `capsid-agent __runtime-standby`, the
//! same helper started ahead of time, waiting for its job (`standby.rs`).

mod container;
mod dns_relay;
mod host;
mod hotplug;
mod lock;
mod mount;
mod netconf;
mod netif;
mod reaper;
mod rootfs;
mod runtime;
mod seccomp;
mod server;
mod share;
mod standby;
mod stats;
mod stdio;
mod sysctl;
mod undo;

use std::fs;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::reboot::{reboot, RebootMode};

/// Printed on the console when PID 1 is set up; tests and `capsid bench`
/// look for it.
const READY_MARKER: &str = "capsid-agent: ready";

/// Boot facts reported by Health.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootInfo {
    /// CLOCK_MONOTONIC (≈ time since guest boot) when the agent started.
    pub agent_started_ns: u64,
    /// The kernel's uptime when the agent started, from /proc/uptime.
    pub kernel_boot_ns: u64,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some(runtime::RUNTIME_ARG) => return runtime::main(&args),
        Some(standby::STANDBY_ARG) => return standby::main(),
        _ => {}
    }
    if std::process::id() != 1 {
        eprintln!("capsid-agent: must run as PID 1 of a capsid guest");
        return ExitCode::from(2);
    }
    let started = monotonic_ns();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_max_level(log_level())
        .init();

    if let Err(e) = mount::leave_initramfs() {
        fatal(&describe(&e));
    }
    if let Err(e) = mount::pseudo_filesystems() {
        fatal(&describe(&e));
    }
    if let Err(e) = netif::loopback_up() {
        tracing::warn!(error = %e, "cannot bring up lo");
    }
    let uptime = kernel_uptime_ns().unwrap_or_default();
    let boot = BootInfo {
        agent_started_ns: started,
        kernel_boot_ns: uptime,
    };
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    println!(
        "{READY_MARKER} version={} kernel_boot_ms={}",
        env!("CARGO_PKG_VERSION"),
        uptime / 1_000_000
    );

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fatal(&format!("cannot start the async runtime: {e}")),
    };
    let port = host::agent_port(&cmdline);
    match runtime.block_on(serve(port, boot)) {
        Ok(()) => power_off(),
        Err(e) => fatal(&e),
    }
}

/// Connects to the host and serves the API until Shutdown.
async fn serve(port: u32, boot: BootInfo) -> Result<(), String> {
    let reaper = reaper::Reaper::start().map_err(|e| format!("cannot watch SIGCHLD: {e}"))?;
    let conn = host::connect_control(port)
        .await
        .map_err(|e| describe(&e))?;
    tracing::info!(port, "connected to the host");
    let containers = Arc::new(container::Containers::new(reaper));
    let shutdown = Arc::new(tokio::sync::Notify::new());
    let service = server::Service::new(containers.clone(), boot, shutdown.clone());
    let services = capsid_protocol::agent_ttrpc::create_agent(Arc::new(service));
    // The one connection is the listener's only item; the stream then
    // stays open so the server does not wind down.
    let incoming = futures::stream::once(async move { Ok::<_, std::io::Error>(conn) })
        .chain(futures::stream::pending());
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(ttrpc::r#async::transport::Listener::new(incoming))
        .register_service(services);
    server
        .start()
        .await
        .map_err(|e| format!("cannot serve the agent API: {e}"))?;
    // Only now, with the host connected and served, and only once the
    // containers are left alone (standby.rs): the boot path does not pay
    // for it.
    containers.start_standby();
    shutdown.notified().await;
    // Let the Shutdown reply reach the host before the VM goes away.
    tokio::time::sleep(Duration::from_millis(20)).await;
    containers.kill_everything();
    Ok(())
}

use futures::StreamExt as _;

/// Names the console log level (see [`log_level`]).
const LOG_ENV: &str = "CAPSID_AGENT_LOG";

/// The console log level: `CAPSID_AGENT_LOG=debug` (a `KEY=VALUE` word on
/// the kernel command line reaches PID 1 as an environment variable, and
/// the runtime helper inherits it)
/// turns on the phase timings of container operations; default `info`.
pub(crate) fn log_level() -> tracing::Level {
    std::env::var(LOG_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(tracing::Level::INFO)
}

/// CLOCK_MONOTONIC in nanoseconds (0 if unreadable).
pub(crate) fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0)
        })
        .unwrap_or(0)
}

/// The guest kernel's uptime, read from /proc/uptime.
fn kernel_uptime_ns() -> Option<u64> {
    let text = fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some(
        Duration::from_secs_f64(secs)
            .as_nanos()
            .try_into()
            .unwrap_or(u64::MAX),
    )
}

/// An error and its sources, as one line.
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        text.push_str(": ");
        text.push_str(&s.to_string());
        cur = s.source();
    }
    text
}

/// Syncs and ends the VM (guest reboot ends it on every capsid backend).
fn power_off() -> ! {
    nix::unistd::sync();
    let err = reboot(RebootMode::RB_AUTOBOOT);
    eprintln!("capsid-agent: reboot failed: {err:?}");
    std::process::exit(1);
}

/// Says why on the console, then ends the VM.
fn fatal(message: &str) -> ! {
    eprintln!("capsid-agent: {message}; shutting the VM down");
    power_off();
}
