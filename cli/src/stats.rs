//! `capsid stats`: every running sandbox's memory: assigned, touched (the
//! VMM's resident memory, guest RAM included), held by the balloon, and the
//! guest's own free / available / cache figures.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use capsid_sandbox::balloon::host;
use capsid_sandbox::balloon::registry::{Entry, Registry};
use capsid_sandbox::balloon::BalloonStatus;
use capsid_sandbox::config::Config;
use serde_json::{json, Value};

/// How long to wait for a guest's first statistics report.
const FIRST_REPORT_WAIT: std::time::Duration = std::time::Duration::from_millis(1500);

/// Arguments of `capsid stats`.
#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One sandbox's figures.
struct Row {
    entry: Entry,
    touched_mib: Option<u64>,
    balloon: Option<BalloonStatus>,
}

/// Prints the memory of every registered sandbox.
pub fn run(config_path: Option<&Path>, args: &StatsArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let mut rows: Vec<Row> = Registry::new(&config.paths.state_dir)
        .entries()?
        .into_iter()
        .map(|entry| Row {
            touched_mib: entry.vmm_pid.and_then(host::vm_footprint_mib),
            balloon: entry.balloon.as_ref().and_then(|b| b.status().ok()),
            entry,
        })
        .collect();
    // Asking for statistics is what starts QEMU polling the guest: a
    // sandbox nobody asked before has its first report a second later.
    if rows
        .iter()
        .any(|r| r.balloon.is_some_and(|b| !b.stats.valid))
    {
        std::thread::sleep(FIRST_REPORT_WAIT);
        for r in &mut rows {
            if r.balloon.is_some_and(|b| !b.stats.valid) {
                if let Some(b) = r.entry.balloon.as_ref().and_then(|b| b.status().ok()) {
                    r.balloon = Some(b);
                }
            }
        }
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let list: Vec<Value> = rows.iter().map(row_json).collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
    } else {
        write!(out, "{}", table(&rows))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn row_json(r: &Row) -> Value {
    let s = r.balloon.map(|b| b.stats);
    let valid = s.filter(|s| s.valid);
    json!({
        "id": r.entry.id,
        "backend": r.entry.backend,
        "policy": r.entry.policy,
        "vmm_pid": r.entry.vmm_pid,
        "assigned_mib": r.entry.assigned_mib,
        "touched_mib": r.touched_mib,
        "balloon_mib": r.balloon.map(|b| b.actual_mib),
        "balloon_target_mib": r.balloon.map(|b| b.target_mib),
        "guest": valid.map(|s| json!({
            "total_mib": s.total_mib,
            "free_mib": s.free_mib,
            "available_mib": s.available_mib,
            "cache_mib": s.caches_mib,
            "major_faults": s.major_faults,
            "minor_faults": s.minor_faults,
            "swap_in": s.swap_in,
            "swap_out": s.swap_out,
        })),
    })
}

fn table(rows: &[Row]) -> String {
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    let mut text = format!(
        "{:<24} {:<10} {:>9} {:>9} {:>9} {:>6} {:>7} {:>7} {:>7}\n",
        "ID", "BACKEND", "ASSIGNED", "TOUCHED", "BALLOON", "POLICY", "FREE", "AVAIL", "CACHE"
    );
    for r in rows {
        let s = r.balloon.map(|b| b.stats).filter(|s| s.valid);
        text.push_str(&format!(
            "{:<24} {:<10} {:>9} {:>9} {:>9} {:>6} {:>7} {:>7} {:>7}\n",
            r.entry.id,
            r.entry.backend.as_str(),
            r.entry.assigned_mib,
            opt(r.touched_mib),
            opt(r.balloon.map(|b| u64::from(b.actual_mib))),
            if r.entry.policy { "on" } else { "off" },
            opt(s.map(|s| s.free_mib)),
            opt(s.map(|s| s.available_mib)),
            opt(s.map(|s| s.caches_mib)),
        ));
    }
    text.push_str(
        "(MiB; TOUCHED: host memory the VMM holds, guest RAM included; FREE/AVAIL/CACHE: the guest's last report)\n",
    );
    text
}
