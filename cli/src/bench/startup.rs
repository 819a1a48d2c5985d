//! `capsid bench startup`: N cold starts of a container through `capsid
//! run`, each split into phases, and with `--compare`, in the same
//! iteration: `ctr run --rm` with runc, `ctr run --rm` with capsid's shim,
//! and the bare VM boot. The runners take turns within each iteration (the
//! order rotates from one iteration to the next), so per-run ratios A_i/B_i
//! compare runs made under the same machine load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use capsid_sandbox::backend::{Backend, VmSpec};
use capsid_sandbox::sandbox as sb;
use serde::Serialize;

use super::bare::{self, BareSample};
use super::compare::{self, PrivateContainerd, CAPSID_RUNTIME, RUNC_RUNTIME};
use super::stats::{self, paired_ratios, summarize_some, Summary};
use super::timings::{monotonic_ns, GuestClock, RunTimings, TIMINGS_ENV};
use super::{output_paths, plot, positive, BenchSetup, Interrupt, VmArgs};

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

/// The points in time of one `capsid run`, in order.
pub const MILESTONES: [&str; 13] = [
    "launch",
    "run_entered",
    "rootfs_ready",
    "backend_spawned",
    "guest_clock_zero",
    "kernel_at_init",
    "agent_connected",
    "container_created",
    "process_started",
    "first_output",
    "exit_reported",
    "vm_gone",
    "process_exited",
];

/// The phases: each ends at the milestone of the same index + 1, and
/// begins at the last milestone before it that was observed.
pub const PHASES: [(&str, &str); 12] = [
    ("exec", "exec, runtime start-up, argument parsing (host)"),
    ("rootfs", "config, image lookup, cached rootfs disk (host)"),
    ("backend_spawn", "device back ends and VMM spawned (host)"),
    (
        "vmm_to_guest_clock",
        "VMM set-up, kernel load, early boot (host + guest)",
    ),
    ("kernel_boot", "guest kernel boot to /init (guest)"),
    (
        "agent_init",
        "agent set-up and vsock dial-in (guest + host relay)",
    ),
    ("create", "Health, CreateContainer, stdio (RPC; guest work)"),
    (
        "start",
        "StartProcess: the process exec'd (RPC; guest work)",
    ),
    ("first_output", "first byte of output reaches the host"),
    ("exit", "process runs and exits, exit reported"),
    ("stop", "guest power-off, VMM exit, reaping, clean-up"),
    ("teardown", "capsid run exits (host)"),
];

/// Who is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
enum Runner {
    CapsidRun,
    CtrCapsid,
    CtrRunc,
    BareBoot,
}

impl Runner {
    fn name(self) -> &'static str {
        match self {
            Self::CapsidRun => "capsid_run",
            Self::CtrCapsid => "ctr_capsid",
            Self::CtrRunc => "ctr_runc",
            Self::BareBoot => "bare_boot",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::CapsidRun => "capsid run",
            Self::CtrCapsid => "ctr run (capsid shim)",
            Self::CtrRunc => "ctr run (runc)",
            Self::BareBoot => "bare VM boot",
        }
    }
}

/// One `capsid run`, in ms since its launch.
#[derive(Debug, Clone, Serialize)]
pub struct CapsidRunSample {
    /// Launch to process exit.
    pub total_ms: f64,
    /// When each milestone was reached (`MILESTONES`).
    pub milestones_ms: BTreeMap<&'static str, Option<f64>>,
    /// How long each phase took (`PHASES`).
    pub phases_ms: BTreeMap<&'static str, Option<f64>>,
    /// Guest clock zero → agent connected: the guest booting (under TCG,
    /// emulated instruction by instruction).
    pub guest_boot_to_agent_ms: Option<f64>,
    /// total − guest boot-to-agent.
    pub host_overhead_ms: Option<f64>,
    /// CPU time of the `capsid run` process itself.
    pub capsid_cpu_ms: Option<f64>,
    /// What the guest said about its clock.
    pub guest: GuestClock,
}

impl CapsidRunSample {
    /// Turns a `capsid run` timings record into the sample, given when the
    /// process was spawned and when it was seen to exit (monotonic ns).
    pub fn from_record(rec: &RunTimings, spawn_ns: u64, exit_ns: u64) -> Self {
        let ms = |ns: u64| ns as f64 / 1e6;
        let offset = ms(rec.origin_monotonic_ns.saturating_sub(spawn_ns));
        let total = ms(exit_ns.saturating_sub(spawn_ns));
        let p = &rec.phases;
        let rel = |v: Option<f64>| v.map(|v| offset + v);
        let points: [Option<f64>; 13] = [
            Some(0.0),
            Some(offset),
            rel(p.rootfs_ready_ms),
            rel(p.backend_spawned_ms),
            rel(p.guest_clock_zero_ms),
            rel(p.kernel_at_init_ms),
            rel(p.agent_connected_ms),
            rel(p.container_created_ms),
            rel(p.process_started_ms),
            rel(p.first_output_ms),
            rel(p.exit_reported_ms),
            rel(p.vm_gone_ms),
            Some(total),
        ];
        let mut phases = BTreeMap::new();
        let mut last = 0.0;
        for (i, (name, _)) in PHASES.iter().enumerate() {
            let end = points[i + 1];
            phases.insert(*name, end.map(|e| e - last));
            if let Some(e) = end {
                last = e;
            }
        }
        let guest_boot = match (points[4], points[6]) {
            (Some(zero), Some(connected)) => Some(connected - zero),
            _ => None,
        };
        Self {
            total_ms: total,
            milestones_ms: MILESTONES.iter().copied().zip(points).collect(),
            phases_ms: phases,
            guest_boot_to_agent_ms: guest_boot,
            host_overhead_ms: guest_boot.map(|g| total - g),
            capsid_cpu_ms: rec.cpu_ms,
            guest: rec.guest.clone(),
        }
    }
}

/// A runner measured by wall time only.
#[derive(Debug, Clone, Serialize)]
struct WallSample {
    total_ms: f64,
}

/// One iteration: every runner once.
#[derive(Debug, Clone, Default, Serialize)]
struct Iteration {
    index: u32,
    order: Vec<&'static str>,
    capsid_run: Option<CapsidRunSample>,
    ctr_capsid: Option<WallSample>,
    ctr_runc: Option<WallSample>,
    bare_boot: Option<BareSample>,
}

#[derive(Debug, Clone, Serialize)]
struct Skipped {
    runner: &'static str,
    reason: String,
}

#[derive(Debug, Clone, Serialize)]
struct Failure {
    runner: &'static str,
    run: u32,
    error: String,
}

#[derive(Debug, Clone, Serialize)]
struct PairRatio {
    pair: String,
    summary: Option<Summary>,
}

/// The whole result, as written by `--json`.
#[derive(Debug, Serialize)]
struct Report {
    schema: &'static str,
    backend: String,
    image: String,
    memory_mib: u32,
    vcpus: u32,
    command: Vec<String>,
    runs: u32,
    warmup: u32,
    runners: Vec<&'static str>,
    skipped: Vec<Skipped>,
    failures: Vec<Failure>,
    iterations: Vec<Iteration>,
    summary: BTreeMap<String, Option<Summary>>,
    ratios: Vec<PairRatio>,
}

/// Everything the runners share.
struct Bench {
    setup: BenchSetup,
    dir: tempfile::TempDir,
    capsid: PathBuf,
    run_config: PathBuf,
    command: Vec<String>,
    image: String,
    ctrd: Option<PrivateContainerd>,
    bare: Option<(Arc<dyn Backend>, VmSpec)>,
}

pub fn run(config_path: Option<&Path>, args: StartupArgs) -> anyhow::Result<()> {
    let (json, plot_path) = output_paths(args.json.as_deref(), args.plot.as_deref())?;
    let setup = BenchSetup::new(config_path, &args.vm)?;
    let command = if args.command.is_empty() {
        vec!["echo".to_string()]
    } else {
        args.command.clone()
    };
    let dir = tempfile::Builder::new()
        .prefix("capsid-bench")
        .tempdir()
        .context("temp dir")?;
    let run_config = dir.path().join("capsid.toml");
    std::fs::write(&run_config, toml::to_string(&setup.config)?).context("writing the config")?;
    let capsid = std::env::current_exe().context("locating capsid")?;
    let mut bench = Bench {
        setup,
        dir,
        capsid,
        run_config,
        command,
        image: args.vm.image.clone(),
        ctrd: None,
        bare: None,
    };

    let mut runners = vec![Runner::CapsidRun];
    let mut skipped = Vec::new();
    if args.compare {
        bench.prepare_comparisons(&mut runners, &mut skipped);
    }
    for s in &skipped {
        eprintln!("capsid bench: skipping {}: {}", s.runner, s.reason);
    }

    let total = u64::from(args.warmup + args.runs) * runners.len() as u64;
    let progress = indicatif::ProgressBar::new(total);
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut iterations = Vec::new();
    let mut failures = Vec::new();
    let interrupt = Interrupt::catch()?;
    for i in 0..args.warmup + args.runs {
        if interrupt.is_set() {
            break;
        }
        let measured = i >= args.warmup;
        let index = i.saturating_sub(args.warmup);
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
        if measured {
            iterations.push(it);
        }
    }
    progress.finish_and_clear();
    // containerd, its shims and mounts go now, before the report.
    drop(bench.ctrd.take());
    if interrupt.is_set() {
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
        summary: summaries(&iterations),
        ratios: ratios(&iterations),
        skipped,
        failures,
        iterations,
    };
    print_report(&report);
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("JSON: {}", path.display());
    }
    if let Some(path) = plot_path {
        startup_plot(&report, &path)?;
        println!("plot: {}", path.display());
    }
    if report.iterations.iter().all(|i| i.capsid_run.is_none()) {
        bail!("every capsid run failed");
    }
    Ok(())
}

impl Bench {
    /// Sets up what `--compare` needs; what cannot run is skipped with
    /// the reason.
    fn prepare_comparisons(&mut self, runners: &mut Vec<Runner>, skipped: &mut Vec<Skipped>) {
        match self.prepare_bare() {
            Ok(b) => {
                self.bare = Some(b);
                runners.push(Runner::BareBoot);
            }
            Err(e) => skipped.push(Skipped {
                runner: Runner::BareBoot.name(),
                reason: format!("{e:#}"),
            }),
        }
        let skip_both = |skipped: &mut Vec<Skipped>, reason: String| {
            for r in [Runner::CtrRunc, Runner::CtrCapsid] {
                skipped.push(Skipped {
                    runner: r.name(),
                    reason: reason.clone(),
                });
            }
        };
        let missing: Vec<&str> = ["containerd", "ctr"]
            .into_iter()
            .filter(|p| compare::which(p).is_none())
            .collect();
        if !missing.is_empty() {
            skip_both(skipped, format!("{} not installed", missing.join(" and ")));
            return;
        }
        let archive = match self.image_archive() {
            Ok(a) => a,
            Err(e) => return skip_both(skipped, format!("{e:#}")),
        };
        let shim = compare::which("containerd-shim-capsid-v2");
        let shim_config = match self.shim_config() {
            Ok(c) => c,
            Err(e) => return skip_both(skipped, format!("{e:#}")),
        };
        match PrivateContainerd::start(shim.as_deref(), &shim_config, &archive) {
            Ok(c) => self.ctrd = Some(c),
            Err(e) => return skip_both(skipped, format!("private containerd: {e:#}")),
        }
        if compare::which("runc").is_some() && compare::which("containerd-shim-runc-v2").is_some() {
            runners.push(Runner::CtrRunc);
        } else {
            skipped.push(Skipped {
                runner: Runner::CtrRunc.name(),
                reason: "runc or containerd-shim-runc-v2 not installed".into(),
            });
        }
        if shim.is_some() {
            runners.push(Runner::CtrCapsid);
        } else {
            skipped.push(Skipped {
                runner: Runner::CtrCapsid.name(),
                reason: "containerd-shim-capsid-v2 not found beside capsid or in PATH".into(),
            });
        }
        runners.sort();
    }

    fn prepare_bare(&self) -> anyhow::Result<(Arc<dyn Backend>, VmSpec)> {
        let backend = sb::backend_for(&self.setup.config)?;
        let initramfs = self.dir.path().join("bare-initramfs.cpio");
        std::fs::write(&initramfs, bare::trivial_initramfs()).context("bare initramfs")?;
        let spec = VmSpec {
            name: String::new(),
            vcpus: self.setup.vcpus,
            memory_mib: self.setup.memory_mib,
            kernel: self.setup.config.paths.kernel.clone(),
            initramfs,
            kernel_args: vec![],
            disks: vec![],
            net: None,
            guest_cid: 3,
            run_dir: self.dir.path().join("bare"),
        };
        Ok((backend, spec))
    }

    /// The OCI archive `ctr images import` takes for `--image`.
    fn image_archive(&self) -> anyhow::Result<PathBuf> {
        let as_path = Path::new(&self.image);
        if as_path.is_file() {
            return Ok(as_path.to_path_buf());
        }
        if as_path.is_dir() {
            bail!(
                "{} is an OCI layout directory; ctr imports archives only",
                self.image
            );
        }
        let bundled = self
            .setup
            .config
            .paths
            .images_dir
            .join(format!("{}.tar", self.image));
        if bundled.is_file() {
            Ok(bundled)
        } else {
            Err(anyhow!(
                "no OCI archive for image {} ({} does not exist)",
                self.image,
                bundled.display()
            ))
        }
    }

    /// The shim's config: ours, with its state and rootfs cache (keyed by
    /// the private containerd's snapshot paths) in the temp dir.
    fn shim_config(&self) -> anyhow::Result<PathBuf> {
        let mut config = self.setup.config.clone();
        config.paths.state_dir = self.dir.path().join("shim-run");
        config.paths.cache_dir = self.dir.path().join("shim-cache");
        config.vm.memory_mib = self.setup.memory_mib;
        config.vm.vcpus = self.setup.vcpus;
        let path = self.dir.path().join("shim.toml");
        std::fs::write(&path, toml::to_string(&config)?).context("writing the shim config")?;
        Ok(path)
    }

    fn run_one(&self, runner: Runner, i: u32, it: &mut Iteration) -> anyhow::Result<()> {
        let id = format!("capsid-bench-{}-{i}", std::process::id());
        match runner {
            Runner::CapsidRun => it.capsid_run = Some(self.capsid_run(i)?),
            Runner::CtrRunc | Runner::CtrCapsid => {
                let ctrd = self.ctrd.as_ref().ok_or_else(|| anyhow!("no containerd"))?;
                let (runtime, id) = match runner {
                    Runner::CtrRunc => (RUNC_RUNTIME, format!("{id}-runc")),
                    _ => (CAPSID_RUNTIME, format!("{id}-capsid")),
                };
                let total_ms = ctrd.timed_run(runtime, &id, &self.command)?;
                let sample = Some(WallSample { total_ms });
                if runner == Runner::CtrRunc {
                    it.ctr_runc = sample;
                } else {
                    it.ctr_capsid = sample;
                }
            }
            Runner::BareBoot => {
                let (backend, spec) = self.bare.as_ref().ok_or_else(|| anyhow!("no backend"))?;
                it.bare_boot = Some(bare::boot(backend, spec, &format!("bare-{i}"))?);
            }
        }
        Ok(())
    }

    fn capsid_run(&self, i: u32) -> anyhow::Result<CapsidRunSample> {
        let record_path = self.dir.path().join(format!("run-{i}.json"));
        let mut cmd = Command::new(&self.capsid);
        cmd.arg("--config")
            .arg(&self.run_config)
            .args(["run", "--image", &self.image])
            .args(["--memory", &self.setup.memory_mib.to_string()])
            .args(["--cpus", &self.setup.vcpus.to_string(), "--"])
            .args(&self.command)
            .env(TIMINGS_ENV, &record_path)
            .env_remove("CAPSID_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawn_ns = monotonic_ns();
        let out = cmd.output().context("running capsid run")?;
        let exit_ns = monotonic_ns();
        if !out.status.success() {
            bail!(
                "capsid run: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = std::fs::read(&record_path)
            .with_context(|| format!("capsid run wrote no timings to {}", record_path.display()))?;
        let record: RunTimings = serde_json::from_slice(&text).context("reading the timings")?;
        let _ = std::fs::remove_file(&record_path);
        Ok(CapsidRunSample::from_record(&record, spawn_ns, exit_ns))
    }
}

fn series<F: Fn(&Iteration) -> Option<f64>>(its: &[Iteration], f: F) -> Vec<Option<f64>> {
    its.iter().map(f).collect()
}

fn capsid_total(it: &Iteration) -> Option<f64> {
    it.capsid_run.as_ref().map(|s| s.total_ms)
}

fn summaries(its: &[Iteration]) -> BTreeMap<String, Option<Summary>> {
    let mut out = BTreeMap::new();
    for (name, _) in PHASES {
        let v = series(its, |it| {
            it.capsid_run.as_ref().and_then(|s| s.phases_ms[name])
        });
        out.insert(format!("capsid_run.phases.{name}_ms"), summarize_some(&v));
    }
    for m in MILESTONES {
        let v = series(its, |it| {
            it.capsid_run.as_ref().and_then(|s| s.milestones_ms[m])
        });
        out.insert(format!("capsid_run.milestones.{m}_ms"), summarize_some(&v));
    }
    let cap = |f: fn(&CapsidRunSample) -> Option<f64>| {
        summarize_some(&series(its, |it| it.capsid_run.as_ref().and_then(f)))
    };
    out.insert("capsid_run.total_ms".into(), cap(|s| Some(s.total_ms)));
    out.insert(
        "capsid_run.guest_boot_to_agent_ms".into(),
        cap(|s| s.guest_boot_to_agent_ms),
    );
    out.insert(
        "capsid_run.host_overhead_ms".into(),
        cap(|s| s.host_overhead_ms),
    );
    out.insert(
        "capsid_run.health_rtt_ms".into(),
        cap(|s| s.guest.health_rtt_ms),
    );
    out.insert("capsid_run.capsid_cpu_ms".into(), cap(|s| s.capsid_cpu_ms));
    out.insert(
        "ctr_runc.total_ms".into(),
        summarize_some(&series(its, |it| it.ctr_runc.as_ref().map(|s| s.total_ms))),
    );
    out.insert(
        "ctr_capsid.total_ms".into(),
        summarize_some(&series(its, |it| {
            it.ctr_capsid.as_ref().map(|s| s.total_ms)
        })),
    );
    out.insert(
        "bare_boot.kernel_at_init_ms".into(),
        summarize_some(&series(its, |it| {
            it.bare_boot.as_ref().and_then(|b| b.kernel_at_init_ms)
        })),
    );
    out.insert(
        "bare_boot.total_ms".into(),
        summarize_some(&series(its, |it| {
            it.bare_boot.as_ref().map(|b| b.vm_gone_ms)
        })),
    );
    out
}

/// Reads one runner's value of an iteration.
type Pick = fn(&Iteration) -> Option<f64>;

/// The pairs compared run by run.
fn ratio_pairs() -> Vec<(&'static str, Pick, Pick)> {
    let runc = |it: &Iteration| it.ctr_runc.as_ref().map(|s| s.total_ms);
    let shim = |it: &Iteration| it.ctr_capsid.as_ref().map(|s| s.total_ms);
    let bare = |it: &Iteration| it.bare_boot.as_ref().map(|s| s.vm_gone_ms);
    let overhead = |it: &Iteration| it.capsid_run.as_ref().and_then(|s| s.host_overhead_ms);
    vec![
        ("capsid run / ctr run (runc)", capsid_total, runc),
        ("ctr run (capsid shim) / ctr run (runc)", shim, runc),
        ("ctr run (capsid shim) / capsid run", shim, capsid_total),
        ("capsid run / bare VM boot", capsid_total, bare),
        ("capsid host overhead / ctr run (runc)", overhead, runc),
    ]
}

fn ratios(its: &[Iteration]) -> Vec<PairRatio> {
    ratio_pairs()
        .into_iter()
        .map(|(pair, a, b)| PairRatio {
            pair: pair.into(),
            summary: stats::summarize(&paired_ratios(&series(its, a), &series(its, b))),
        })
        .collect()
}

fn row(label: &str, s: Option<&Summary>, unit: &str) -> String {
    match s {
        Some(s) => format!(
            "  {label:<44}{:>9.2}{:>9.2}{:>9.2}{:>9.2}{unit}  (n={})",
            s.min, s.median, s.p90, s.max, s.n
        ),
        None => format!("  {label:<44}{:>9}", "-"),
    }
}

fn print_report(r: &Report) {
    let get = |k: &str| r.summary.get(k).and_then(Option::as_ref);
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

    if r.runners.len() > 1 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::timings::{RunPhases, RUN_SCHEMA};

    fn record() -> RunTimings {
        RunTimings {
            schema: RUN_SCHEMA.into(),
            origin_monotonic_ns: 1_010_000_000,
            backend: "qemu-tcg".into(),
            phases: RunPhases {
                rootfs_ready_ms: Some(2.0),
                backend_spawned_ms: Some(7.0),
                guest_clock_zero_ms: Some(100.0),
                kernel_at_init_ms: Some(900.0),
                agent_connected_ms: Some(1000.0),
                container_created_ms: Some(1400.0),
                process_started_ms: Some(1500.0),
                first_output_ms: Some(1550.0),
                exit_reported_ms: Some(1600.0),
                vm_gone_ms: Some(1700.0),
            },
            guest: GuestClock::default(),
            cpu_ms: Some(20.0),
            exit_status: Some(0),
            error: None,
        }
    }

    #[test]
    fn sample_phases_add_up_to_the_total() {
        // Spawned 10 ms before the origin; exited 1720 ms after spawn.
        let s = CapsidRunSample::from_record(&record(), 1_000_000_000, 2_720_000_000);
        assert!((s.total_ms - 1720.0).abs() < 1e-6);
        let sum: f64 = s.phases_ms.values().map(|v| v.unwrap()).sum();
        assert!((sum - s.total_ms).abs() < 1e-6);
        assert!((s.phases_ms["exec"].unwrap() - 10.0).abs() < 1e-6);
        assert!((s.phases_ms["kernel_boot"].unwrap() - 800.0).abs() < 1e-6);
        assert!((s.phases_ms["teardown"].unwrap() - 10.0).abs() < 1e-6);
        assert!((s.guest_boot_to_agent_ms.unwrap() - 900.0).abs() < 1e-6);
        assert!((s.host_overhead_ms.unwrap() - 820.0).abs() < 1e-6);
        assert_eq!(s.milestones_ms.len(), MILESTONES.len());
        assert_eq!(s.phases_ms.len(), PHASES.len());
    }

    #[test]
    fn a_missing_milestone_folds_into_the_next_phase() {
        let mut rec = record();
        rec.phases.first_output_ms = None;
        let s = CapsidRunSample::from_record(&rec, 1_000_000_000, 2_720_000_000);
        assert!(s.phases_ms["first_output"].is_none());
        // exit now runs from process_started (1510) to exit_reported (1610).
        assert!((s.phases_ms["exit"].unwrap() - 100.0).abs() < 1e-6);
    }

    #[test]
    fn report_json_has_every_phase_of_every_run() {
        let s = CapsidRunSample::from_record(&record(), 1_000_000_000, 2_720_000_000);
        let it = Iteration {
            index: 0,
            order: vec!["capsid_run", "ctr_runc"],
            capsid_run: Some(s),
            ctr_runc: Some(WallSample { total_ms: 110.0 }),
            ..Iteration::default()
        };
        let its = vec![it];
        let v = serde_json::to_value(Report {
            schema: "capsid-bench-startup/1",
            backend: "qemu-tcg".into(),
            image: "busybox".into(),
            memory_mib: 256,
            vcpus: 1,
            command: vec!["echo".into()],
            runs: 1,
            warmup: 0,
            runners: vec!["capsid_run", "ctr_runc"],
            skipped: vec![],
            failures: vec![],
            summary: summaries(&its),
            ratios: ratios(&its),
            iterations: its,
        })
        .unwrap();
        let run = &v["iterations"][0]["capsid_run"];
        for (name, _) in PHASES {
            assert!(run["phases_ms"][name].is_f64(), "{name}");
        }
        for m in MILESTONES {
            assert!(run["milestones_ms"][m].is_f64(), "{m}");
        }
        assert_eq!(v["iterations"][0]["ctr_runc"]["total_ms"], 110.0);
        assert!(v["iterations"][0]["bare_boot"].is_null());
        assert_eq!(v["summary"]["ctr_runc.total_ms"]["median"], 110.0);
        let r = &v["ratios"][0];
        assert_eq!(r["pair"], "capsid run / ctr run (runc)");
        assert!((r["summary"]["median"].as_f64().unwrap() - 1720.0 / 110.0).abs() < 1e-9);
    }
}
