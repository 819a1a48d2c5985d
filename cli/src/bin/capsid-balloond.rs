//! `capsid-balloond`: the host's balloon coordinator. Watches host memory
//! pressure and every registered sandbox's balloon, inflates idle guests'
//! balloons when the host is short and deflates them when it is not
//! (docs/memory.md). One per state directory; a second one exits at once.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use capsid_sandbox::balloon::coordinator::{Coordinator, HostSource};
use capsid_sandbox::balloon::registry::Registry;
use capsid_sandbox::config::Config;
use clap::Parser;

#[path = "../daemon/mod.rs"]
mod daemon;

/// Reclaims idle guests' memory when the host runs short.
#[derive(Debug, Parser)]
#[command(name = "capsid-balloond", version, about)]
struct Args {
    /// Configuration file (default: $CAPSID_CONFIG, then /etc/capsid/config.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Exit once no sandbox has been registered for three rounds.
    #[arg(long)]
    exit_when_idle: bool,
    /// Run one round, print what it saw and did as JSON, and exit.
    #[arg(long)]
    once: bool,
}

fn main() -> ExitCode {
    // Everything this process makes (run directories, sockets, logs,
    // disks) is for root alone unless it says otherwise.
    daemon::init();
    let args = Args::parse();
    let config = match Config::load(args.config.as_deref()) {
        Ok(config) if config.memory.enabled => config,
        Ok(_) => {
            eprintln!(
                "capsid-balloond: memory.enabled is false in the configuration: nothing to coordinate"
            );
            return ExitCode::from(EX_CONFIG);
        }
        Err(e) => {
            eprintln!("capsid-balloond: {:#}", anyhow::Error::from(e));
            return ExitCode::from(EX_CONFIG);
        }
    };
    match run(args, &config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capsid-balloond: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Exit status for an unusable or disabled configuration (sysexits'
/// EX_CONFIG): a service manager must not restart on it (the unit file
/// says `RestartPreventExitStatus=78`), unlike on a failure at run time.
const EX_CONFIG: u8 = 78;

fn run(args: Args, config: &Config) -> anyhow::Result<()> {
    let registry = Registry::new(&config.paths.state_dir);
    let Some(lock) = registry.coordinator_lock()? else {
        tracing::info!(dir = %registry.dir().display(), "another coordinator runs; exiting");
        return Ok(());
    };
    let host = HostSource::from_config(&config.memory);
    let mut coordinator = Coordinator::new(config.memory.clone(), registry, host);
    if args.once {
        let round = coordinator.round()?;
        println!("{}", round_json(&round));
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal runtime")?;
    let flag = stop.clone();
    let worker = std::thread::spawn(move || coordinator.run(&flag, args.exit_when_idle));
    tracing::info!(
        interval_ms = config.memory.interval_ms,
        pretend_host_mib = ?config.memory.pretend_host_mib,
        "balloon coordinator running"
    );
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            _ = wait_thread(&worker, &lock) => {}
        }
        anyhow::Ok(())
    })?;
    stop.store(true, Ordering::Relaxed);
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("the coordinator thread panicked"))?;
    Ok(())
}

/// Waits for the coordinator thread to end, meanwhile answering `capsid
/// check`'s "is a coordinator running?" probes on the role's token socket
/// (accepted and closed at once, so they never fill its backlog).
async fn wait_thread(
    worker: &std::thread::JoinHandle<()>,
    lock: &std::os::unix::net::UnixListener,
) {
    // Without non-blocking mode, accept would block the wait: probes then
    // queue up unanswered (they still see a coordinator).
    let answer = match lock.set_nonblocking(true) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot make the coordinator socket non-blocking");
            false
        }
    };
    while !worker.is_finished() {
        if answer {
            while let Ok((probe, _)) = lock.accept() {
                drop(probe);
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn round_json(r: &capsid_sandbox::balloon::coordinator::Round) -> serde_json::Value {
    serde_json::json!({
        "host": r.host.map(|h| serde_json::json!({
            "total_mib": h.total_mib,
            "available_mib": h.available_mib,
            "psi_some_avg10": h.psi_some_avg10,
        })),
        "sandboxes": r.sandboxes.iter().map(|s| serde_json::json!({
            "id": s.entry.id,
            "rss_mib": s.rss_mib,
            "guest_resident_mib": s.guest_resident_mib,
            "balloon": s.balloon,
        })).collect::<Vec<_>>(),
        "decisions": r.decisions.iter().map(|d| serde_json::json!({
            "id": d.id, "from_mib": d.from_mib, "to_mib": d.to_mib, "reason": d.reason,
        })).collect::<Vec<_>>(),
    })
}
