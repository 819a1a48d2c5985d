//! What `capsid bench startup` shows: the table on stdout (phases of
//! `capsid run`, the runners side by side, the per-run ratios), the JSON
//! file and the plot of every run's phases.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::report::{series, Report};
use super::sample::{Iteration, PHASES};
use crate::bench::plot;
use crate::bench::stats::Summary;

/// Prints the report, then writes the JSON and draws the plot asked for.
pub fn emit(
    report: &Report,
    json: Option<PathBuf>,
    plot_path: Option<PathBuf>,
) -> anyhow::Result<()> {
    print_report(report);
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_vec_pretty(report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("JSON: {}", path.display());
    }
    if let Some(path) = plot_path {
        startup_plot(report, &path)?;
        println!("plot: {}", path.display());
    }
    Ok(())
}

/// One line of a table: min, median, p90 and max of `s`, or `-`.
fn row(label: &str, s: Option<&Summary>, unit: &str) -> String {
    match s {
        Some(s) => format!(
            "  {label:<44}{:>9.2}{:>9.2}{:>9.2}{:>9.2}{unit}  (n={})",
            s.min, s.median, s.p90, s.max, s.n
        ),
        None => format!("  {label:<44}{:>9}", "-"),
    }
}

/// The summary named `key` in `r`.
fn summary<'a>(r: &'a Report, key: &str) -> Option<&'a Summary> {
    r.summary.get(key).and_then(Option::as_ref)
}

/// The whole table, on stdout.
fn print_report(r: &Report) {
    print_phases(r);
    if r.runners.len() > 1 {
        print_side_by_side(r);
    }
    print_notes(r);
}

/// The heading and the table of `capsid run`'s phases and totals.
fn print_phases(r: &Report) {
    let get = |k: &str| summary(r, k);
    println!(
        "capsid bench startup: {} runs (+{} warm-up) of `{}`, image {}, backend {}, {} MiB, {} vCPU",
        r.runs,
        r.warmup,
        r.command.join(" "),
        r.image,
        r.backend,
        r.memory_mib,
        r.vcpus
    );
    println!(
        "\ncapsid run phases (ms){:>31}{:>9}{:>9}{:>9}",
        "min", "median", "p90", "max"
    );
    for (name, what) in PHASES {
        println!(
            "{}",
            row(name, get(&format!("capsid_run.phases.{name}_ms")), "")
        );
        println!("      {what}");
    }
    println!(
        "{}",
        row("total (launch → exit)", get("capsid_run.total_ms"), "")
    );
    println!(
        "{}",
        row(
            "guest boot-to-agent (clock zero → agent)",
            get("capsid_run.guest_boot_to_agent_ms"),
            ""
        )
    );
    println!(
        "{}",
        row(
            "host overhead (total − guest boot-to-agent)",
            get("capsid_run.host_overhead_ms"),
            ""
        )
    );
    println!(
        "{}",
        row(
            "Health round trip (guest clock mapping ±½)",
            get("capsid_run.health_rtt_ms"),
            ""
        )
    );
    println!(
        "{}",
        row(
            "CPU time of the capsid run process",
            get("capsid_run.capsid_cpu_ms"),
            ""
        )
    );
}

/// The shim's phases of `ctr run`, cold and pooled, side by side
/// (medians, ms), when the report has them.
fn print_shim_phases(r: &Report) {
    let labels = [
        (
            "to_create_ms",
            "ctr launch → shim Create (with a pool: the claim)",
        ),
        ("vm_ms", "the VM: cold boot, or the pooled one fitted"),
        ("container_ms", "container made in the VM"),
        ("run_ms", "process started, ran, exit reported"),
        ("teardown_ms", "Delete: VM stopped, host side undone"),
        ("ctr_exit_ms", "ctr exits"),
    ];
    let median = |key: String| summary(r, &key).map(|s| s.median);
    let any = labels
        .iter()
        .any(|(k, _)| median(format!("ctr_capsid.phases.{k}")).is_some());
    if !any {
        return;
    }
    println!(
        "\nctr run with capsid's shim, phases (median ms){:>14}{:>10}",
        "cold", "pooled"
    );
    let cell = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    for (key, label) in labels {
        println!(
            "  {label:<52}{:>10}{:>10}",
            cell(median(format!("ctr_capsid.phases.{key}"))),
            cell(median(format!("ctr_capsid_pool.phases.{key}")))
        );
    }
}

/// Every runner's wall time, and the per-run ratios.
fn print_side_by_side(r: &Report) {
    print_shim_phases(r);
    if let Some(idle) = &r.pool_idle {
        println!(
            "\npool: {} waiting sandboxes, {:.1} MiB PSS each ({:.1} MiB of it the warm shim)",
            idle.sandboxes, idle.pss_mib_per_sandbox, idle.shim_pss_mib_per_sandbox
        );
    }
    let get = |k: &str| summary(r, k);
    println!(
        "\nside by side, wall time (ms){:>25}{:>9}{:>9}{:>9}",
        "min", "median", "p90", "max"
    );
    println!("{}", row("capsid run", get("capsid_run.total_ms"), ""));
    println!(
        "{}",
        row("ctr run --rm (capsid shim)", get("ctr_capsid.total_ms"), "")
    );
    println!(
        "{}",
        row(
            "ctr run --rm (capsid, pooled)",
            get("ctr_capsid_pool.total_ms"),
            ""
        )
    );
    println!(
        "{}",
        row("ctr run --rm (runc)", get("ctr_runc.total_ms"), "")
    );
    println!(
        "{}",
        row(
            "bare VM boot: kernel at /init",
            get("bare_boot.kernel_at_init_ms"),
            ""
        )
    );
    println!(
        "{}",
        row("bare VM boot: VM gone", get("bare_boot.total_ms"), "")
    );
    println!(
        "\nper-run ratios A_i/B_i{:>31}{:>9}{:>9}{:>9}",
        "min", "median", "p90", "max"
    );
    for p in &r.ratios {
        println!("{}", row(&p.pair, p.summary.as_ref(), "×"));
    }
}

/// capsid's host overhead against runc, what was skipped, what failed.
fn print_notes(r: &Report) {
    let get = |k: &str| summary(r, k);
    if let (Some(o), Some(runc)) = (get("capsid_run.host_overhead_ms"), get("ctr_runc.total_ms")) {
        println!(
            "\ncapsid host overhead median {:.0} ms = {:.2}× runc's ctr run median ({:.0} ms)",
            o.median,
            o.median / runc.median,
            runc.median
        );
    }
    for s in &r.skipped {
        println!("skipped {}: {}", s.runner, s.reason);
    }
    if !r.failures.is_empty() {
        println!("{} failed runs:", r.failures.len());
        for f in &r.failures {
            println!("  {} run {}: {}", f.runner, f.run + 1, f.error);
        }
    }
}

/// One stacked bar of `capsid run`'s phases per run, the other runners'
/// wall times over it.
fn startup_plot(r: &Report, path: &Path) -> anyhow::Result<()> {
    let names: Vec<&str> = PHASES.iter().map(|(n, _)| *n).collect();
    let stacks: Vec<Vec<f64>> = r
        .iterations
        .iter()
        .map(|it| match &it.capsid_run {
            Some(s) => names
                .iter()
                .map(|n| s.phases_ms[n].unwrap_or(0.0).max(0.0))
                .collect(),
            None => vec![0.0; names.len()],
        })
        .collect();
    let mut overlays = Vec::new();
    let mut add = |label: &'static str, f: fn(&Iteration) -> Option<f64>| {
        let v = series(&r.iterations, f);
        if v.iter().any(Option::is_some) {
            overlays.push((label, v));
        }
    };
    add("ctr run (capsid shim)", |it| {
        it.ctr_capsid.as_ref().map(|s| s.total_ms)
    });
    add("ctr run (runc)", |it| {
        it.ctr_runc.as_ref().map(|s| s.total_ms)
    });
    add("bare VM boot", |it| {
        it.bare_boot.as_ref().map(|s| s.vm_gone_ms)
    });
    add("capsid host overhead", |it| {
        it.capsid_run.as_ref().and_then(|s| s.host_overhead_ms)
    });
    let title = format!(
        "capsid run `{}` phases per run ({}, {} MiB, {} vCPU)",
        r.command.join(" "),
        r.backend,
        r.memory_mib,
        r.vcpus
    );
    plot::stacked_runs(path, &title, &names, &stacks, &overlays)
}
