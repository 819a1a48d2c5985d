//! `capsid bench startup`: N cold starts of a container through `capsid
//! run`, each split into phases, and with `--compare`, in the same
//! iteration: `ctr run --rm` with runc, `ctr run --rm` with capsid's shim,
//! and the bare VM boot. The runners take turns within each iteration (the
//! order rotates from one iteration to the next), so per-run ratios A_i/B_i
//! compare runs made under the same machine load.
//!
//! [`sample`] is what one run measured, [`runners`] runs each runner,
//! [`report`] summarizes the runs and [`output`] shows them.

mod output;
mod report;
mod runners;
mod sample;

use std::path::{Path, PathBuf};

use anyhow::bail;

use super::{output_paths, positive, BenchSetup, Interrupt, VmArgs};
use report::{Failure, Report};
use runners::{Bench, Runner};
use sample::Iteration;

/// Arguments of `capsid bench startup`.
#[derive(Debug, clap::Args)]
pub struct StartupArgs {
    /// Measured runs of each runner.
    #[arg(long, default_value = "10", value_name = "N", value_parser = positive)]
    runs: u32,
    /// Unmeasured runs of each runner first (caches warm, containerd's
    /// first task done).
    #[arg(long, default_value = "1", value_name = "N")]
    warmup: u32,
    #[command(flatten)]
    vm: VmArgs,
    /// Also run `ctr run` with runc and with capsid's shim (private
    /// containerd) and the bare VM boot, interleaved with `capsid run`.
    #[arg(long)]
    compare: bool,
    /// Also run `ctr run` with capsid's shim taking pre-booted sandboxes
    /// from a pool (`capsid-poold`, in the benchmark's own state
    /// directory); implies `--compare`. Reports the pool's idle memory.
    #[arg(long)]
    pool: bool,
    /// Write every run's phases and the summaries as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw the phases of every run (`.svg` or `.png`).
    #[arg(long, value_name = "FILE.svg|png")]
    plot: Option<PathBuf>,
    /// The container's command (default `echo`: as cheap as `true`, and
    /// its newline makes "first byte of output" observable).
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Sandboxes kept booted by `--pool`: one taken per pooled run while the
/// other waits, so a run never waits for a boot.
const POOL_SIZE: u32 = 2;

/// Runs `capsid bench startup`: the iterations, then the report.
pub fn run(config_path: Option<&Path>, args: StartupArgs) -> anyhow::Result<()> {
    let (json, plot_path) = output_paths(args.json.as_deref(), args.plot.as_deref())?;
    let setup = BenchSetup::new(config_path, &args.vm)?;
    let command = if args.command.is_empty() {
        vec!["echo".to_string()]
    } else {
        args.command.clone()
    };
    let mut bench = Bench::new(setup, command, args.vm.image.clone())?;

    let mut runners = vec![Runner::CapsidRun];
    let mut skipped = Vec::new();
    if args.compare || args.pool {
        bench.prepare_comparisons(&mut runners, &mut skipped);
    }
    if args.pool {
        bench.prepare_pool(POOL_SIZE, &mut runners, &mut skipped);
    }
    for s in &skipped {
        eprintln!("capsid bench: skipping {}: {}", s.runner, s.reason);
    }

    let measured = measure(&bench, &runners, args.warmup, args.runs)?;
    let pool_memory = bench.pool.as_ref().map(|p| p.idle_memory());
    drop(bench.pool.take());
    // containerd, its shims and mounts go now, before the report.
    drop(bench.ctrd.take());
    if measured.interrupt.is_set() {
        bail!("interrupted by a signal; everything it started is gone, nothing was written");
    }

    let report = Report {
        schema: "capsid-bench-startup/1",
        backend: bench.setup.backend.to_string(),
        image: bench.image.clone(),
        memory_mib: bench.setup.memory_mib,
        vcpus: bench.setup.vcpus,
        command: bench.command.clone(),
        runs: args.runs,
        warmup: args.warmup,
        runners: runners.iter().map(|r| r.name()).collect(),
        summary: report::summaries(&measured.iterations),
        ratios: report::ratios(&measured.iterations),
        skipped,
        failures: measured.failures,
        iterations: measured.iterations,
        pool_idle: match pool_memory {
            Some(Ok(idle)) => Some(idle),
            Some(Err(e)) => {
                eprintln!("capsid bench: the pool's idle memory was not measured: {e:#}");
                None
            }
            None => None,
        },
    };
    output::emit(&report, json, plot_path)?;
    if report.iterations.iter().all(|i| i.capsid_run.is_none()) {
        bail!("every capsid run failed");
    }
    Ok(())
}

/// What the iterations gave.
struct Measured {
    /// The measured iterations (not the warm-up ones).
    iterations: Vec<Iteration>,
    /// The measured runs that failed.
    failures: Vec<Failure>,
    /// Set if a signal cut the iterations short.
    interrupt: Interrupt,
}

/// Runs `warmup` then `runs` iterations of every runner, with a progress
/// bar, until a signal arrives.
fn measure(bench: &Bench, runners: &[Runner], warmup: u32, runs: u32) -> anyhow::Result<Measured> {
    let total = u64::from(warmup + runs) * runners.len() as u64;
    let progress = progress_bar(total);
    let mut iterations = Vec::new();
    let mut failures = Vec::new();
    let interrupt = Interrupt::catch()?;
    for i in 0..warmup + runs {
        if interrupt.is_set() {
            break;
        }
        let it = iteration(bench, runners, i, warmup, &progress, &mut failures);
        if i >= warmup {
            iterations.push(it);
        }
    }
    progress.finish_and_clear();
    Ok(Measured {
        iterations,
        failures,
        interrupt,
    })
}

/// Iteration `i` (the first `warmup` are not measured): every runner once,
/// the order rotated by `i`. A measured run that fails is added to
/// `failures`.
fn iteration(
    bench: &Bench,
    runners: &[Runner],
    i: u32,
    warmup: u32,
    progress: &indicatif::ProgressBar,
    failures: &mut Vec<Failure>,
) -> Iteration {
    let measured = i >= warmup;
    let index = i.saturating_sub(warmup);
    let mut it = Iteration {
        index,
        ..Iteration::default()
    };
    let n = runners.len();
    for k in 0..n {
        let runner = runners[(k + i as usize) % n];
        it.order.push(runner.name());
        let phase = if measured { "run" } else { "warm-up" };
        progress.set_message(format!("{phase} {}: {}", index + 1, runner.label()));
        if let Err(e) = bench.run_one(runner, i, &mut it) {
            let error = format!("{e:#}");
            progress.println(format!(
                "{} ({phase} {}) failed: {error}",
                runner.label(),
                index + 1
            ));
            if measured {
                failures.push(Failure {
                    runner: runner.name(),
                    run: index,
                    error,
                });
            }
        }
        progress.inc(1);
    }
    it
}

/// A progress bar of `total` runs.
fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let progress = indicatif::ProgressBar::new(total);
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    progress
}
