//! `capsid bench density`: K idle sandboxes (a container sleeping in
//! each), how much host memory each costs, and how long starting them all
//! took; then everything is torn down and checked gone.
//!
//! Host memory of a sandbox = the sum of the PSS of its processes (QEMU or
//! capsid-vmm, and the capsid-vhost device back ends): shared pages (the
//! binaries, the kernel and initramfs QEMU keeps for resets) are split
//! among the sandboxes sharing them, so the sum over all sandboxes is what
//! they cost together. Guest RAM touched is the resident part of the VM's
//! guest memory mapping; overhead is host memory less guest RAM touched.
//! The sandboxes run in this process, so no shim or `capsid run` process
//! is counted (the containerd path adds one shim per sandbox).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use capsid_sandbox::backend::Backend;
use capsid_sandbox::container::{ContainerSpec, LayerDisk};
use capsid_sandbox::sandbox::{self as sb, Sandbox, SandboxOptions};
use capsid_sandbox::spec::{self, ImageDefaults, RunOptions};
use capsid_sandbox::stdio::StreamsWanted;
use futures::StreamExt as _;
use serde::Serialize;

use super::procfs;
use super::stats::{summarize, Summary};
use super::{output_paths, plot, positive, BenchSetup, Interrupt, VmArgs};

const KIB_PER_MIB: f64 = 1024.0;

/// Arguments of `capsid bench density`.
#[derive(Debug, clap::Args)]
pub struct DensityArgs {
    /// Sandboxes to start.
    #[arg(long, default_value = "20", value_name = "K", value_parser = positive)]
    count: u32,
    #[command(flatten)]
    vm: VmArgs,
    /// Sandboxes started at the same time.
    #[arg(long, default_value = "2", value_name = "N", value_parser = positive)]
    parallel: u32,
    /// Seconds to leave the sandboxes idle before the final measurement
    /// (free page reporting returns what the guest freed after boot).
    #[arg(long, default_value = "5", value_name = "SECONDS")]
    settle: u64,
    /// Write the measurements as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Plot memory per sandbox against the number running (`.svg`/`.png`).
    #[arg(long, value_name = "FILE.svg|png")]
    plot: Option<PathBuf>,
}

/// Memory of one sandbox, in MiB.
#[derive(Debug, Clone, Default, Serialize)]
struct SandboxMemory {
    id: String,
    /// Sum of PSS of its processes.
    host_pss_mib: f64,
    /// PSS of the VMM (QEMU or capsid-vmm).
    vmm_pss_mib: f64,
    /// PSS of the device back ends (capsid-vhost).
    devices_pss_mib: f64,
    /// Resident guest RAM.
    guest_touched_mib: f64,
    /// host_pss − guest_touched.
    overhead_mib: f64,
    processes: usize,
}

/// Averages over the sandboxes running when `running` had started.
#[derive(Debug, Clone, Serialize)]
struct Step {
    running: usize,
    host_pss_mib_per_sandbox: f64,
    guest_touched_mib_per_sandbox: f64,
    overhead_mib_per_sandbox: f64,
}

#[derive(Debug, Serialize)]
struct DensityReport {
    schema: &'static str,
    backend: String,
    image: String,
    memory_mib: u32,
    vcpus: u32,
    count: u32,
    parallel: u32,
    started: usize,
    failures: Vec<String>,
    start_all_ms: f64,
    start_each_ms: Option<Summary>,
    settle_s: u64,
    sandboxes: Vec<SandboxMemory>,
    host_pss_mib: Option<Summary>,
    guest_touched_mib: Option<Summary>,
    overhead_mib: Option<Summary>,
    vmm_pss_mib: Option<Summary>,
    devices_pss_mib: Option<Summary>,
    steps: Vec<Step>,
    teardown_ms: f64,
    leftovers: Vec<String>,
}

struct Running {
    sandbox: Sandbox,
    start_ms: f64,
}

pub fn run(config_path: Option<&Path>, args: DensityArgs) -> anyhow::Result<()> {
    let (json, plot_path) = output_paths(args.json.as_deref(), args.plot.as_deref())?;
    let setup = BenchSetup::new(config_path, &args.vm)?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let interrupt = Interrupt::catch()?;
    let report = rt.block_on(measure(&setup, &args, &interrupt))?;
    if interrupt.is_set() {
        bail!("interrupted by a signal; every sandbox it started is gone, nothing was written");
    }
    print_report(&report);
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("JSON: {}", path.display());
    }
    if let Some(path) = plot_path {
        let pick = |f: fn(&Step) -> f64| -> Vec<(f64, f64)> {
            report
                .steps
                .iter()
                .map(|s| (s.running as f64, f(s)))
                .collect()
        };
        plot::lines(
            &path,
            &format!(
                "host memory per idle sandbox ({}, {} MiB guest, {} vCPU)",
                report.backend, report.memory_mib, report.vcpus
            ),
            "sandboxes running",
            "MiB per sandbox",
            &[
                (
                    "host PSS (QEMU + vhost)",
                    pick(|s| s.host_pss_mib_per_sandbox),
                ),
                (
                    "guest RAM touched",
                    pick(|s| s.guest_touched_mib_per_sandbox),
                ),
                (
                    "overhead (PSS − guest RAM)",
                    pick(|s| s.overhead_mib_per_sandbox),
                ),
            ],
        )?;
        println!("plot: {}", path.display());
    }
    if !report.leftovers.is_empty() {
        bail!("left behind: {}", report.leftovers.join("; "));
    }
    if report.started == 0 {
        bail!("no sandbox started");
    }
    Ok(())
}

async fn measure(
    setup: &BenchSetup,
    args: &DensityArgs,
    interrupt: &Interrupt,
) -> anyhow::Result<DensityReport> {
    let config = setup.config.clone();
    let backend: Arc<dyn Backend> = sb::backend_for(&config)?;
    let prepared = crate::run::prepare_image(&config, args.vm.image.clone()).await?;
    let rootfs = prepared.rootfs;
    let oci = spec::build(
        &ImageDefaults::from_image(&prepared.config),
        &RunOptions {
            command: vec!["sleep".into(), "1000000".into()],
            hostname: "density".into(),
            // As `capsid run` runs them: under the default seccomp profile.
            seccomp: Some(capsid_sandbox::seccomp::default_profile()?),
            ..RunOptions::default()
        },
    )?;
    let oci = Arc::new(oci);

    let prefix = format!("bench-density-{}", std::process::id());
    let progress = indicatif::ProgressBar::new(u64::from(args.count));
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    progress.set_message("sandboxes started");
    let disk_path = rootfs.path.clone();
    let layer = LayerDisk::primary(rootfs.fs_type.as_str());
    let t0 = Instant::now();
    let starts = futures::stream::iter(0..args.count)
        .map(|i| {
            let config = config.clone();
            let backend = backend.clone();
            let disk = layer.disk_spec(disk_path.clone());
            let layer = layer.clone();
            let oci = oci.clone();
            let id = format!("{prefix}-{i}");
            let opts = SandboxOptions {
                id: id.clone(),
                vcpus: setup.vcpus,
                memory_mib: setup.memory_mib,
                disks: vec![disk],
                ..SandboxOptions::default()
            };
            async move {
                let started = Instant::now();
                let result = start_idle(&config, backend, opts, &layer, &oci).await;
                (id, result.map(|s| (s, started.elapsed())))
            }
        })
        .buffer_unordered(usize::try_from(args.parallel).unwrap_or(1));
    let mut starts = Box::pin(starts);
    let mut running: Vec<Running> = Vec::new();
    let mut failures = Vec::new();
    let mut steps = Vec::new();
    while let Some((id, result)) = starts.next().await {
        match result {
            Ok((sandbox, took)) => {
                running.push(Running {
                    sandbox,
                    start_ms: took.as_secs_f64() * 1000.0,
                });
                let mems: Vec<SandboxMemory> =
                    running.iter().map(|r| memory_of(&r.sandbox)).collect();
                steps.push(step(&mems));
            }
            Err(e) => {
                progress.println(format!("{id} failed: {e:#}"));
                failures.push(format!("{id}: {e:#}"));
            }
        }
        progress.inc(1);
        if interrupt.is_set() {
            // Starts in flight are dropped with the stream: their VMs are
            // stopped as they are dropped.
            break;
        }
    }
    drop(starts);
    let start_all_ms = t0.elapsed().as_secs_f64() * 1000.0;
    progress.finish_and_clear();

    if !running.is_empty() && !interrupt.is_set() {
        eprintln!(
            "capsid bench: {} sandboxes idle; measuring in {} s",
            running.len(),
            args.settle
        );
        let until = Instant::now() + Duration::from_secs(args.settle);
        while Instant::now() < until && !interrupt.is_set() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let sandboxes: Vec<SandboxMemory> = running.iter().map(|r| memory_of(&r.sandbox)).collect();
    if !sandboxes.is_empty() {
        steps.push(step(&sandboxes));
    }
    let start_each: Vec<f64> = running.iter().map(|r| r.start_ms).collect();
    let pids: Vec<u32> = running.iter().flat_map(|r| r.sandbox.pids()).collect();

    let t1 = Instant::now();
    futures::future::join_all(running.iter().map(|r| r.sandbox.stop())).await;
    drop(running);
    let teardown_ms = t1.elapsed().as_secs_f64() * 1000.0;
    drop(rootfs);

    let mut leftovers: Vec<String> = pids
        .iter()
        .filter(|p| procfs::alive(**p))
        .map(|p| format!("process {p}"))
        .collect();
    leftovers.extend(
        procfs::processes_mentioning(&prefix)
            .iter()
            .map(|p| format!("process {p}")),
    );
    for entry in std::fs::read_dir(&config.paths.state_dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            leftovers.push(format!("run dir {}", entry.path().display()));
        }
    }
    leftovers.sort();
    leftovers.dedup();

    let col =
        |f: fn(&SandboxMemory) -> f64| summarize(&sandboxes.iter().map(f).collect::<Vec<_>>());
    Ok(DensityReport {
        schema: "capsid-bench-density/1",
        backend: setup.backend.to_string(),
        image: args.vm.image.clone(),
        memory_mib: setup.memory_mib,
        vcpus: setup.vcpus,
        count: args.count,
        parallel: args.parallel,
        started: sandboxes.len(),
        failures,
        start_all_ms,
        start_each_ms: summarize(&start_each),
        settle_s: args.settle,
        host_pss_mib: col(|m| m.host_pss_mib),
        guest_touched_mib: col(|m| m.guest_touched_mib),
        overhead_mib: col(|m| m.overhead_mib),
        vmm_pss_mib: col(|m| m.vmm_pss_mib),
        devices_pss_mib: col(|m| m.devices_pss_mib),
        sandboxes,
        steps,
        teardown_ms,
        leftovers,
    })
}

/// Starts a sandbox whose container sleeps (stopped again if it cannot).
async fn start_idle(
    config: &capsid_sandbox::config::Config,
    backend: Arc<dyn Backend>,
    opts: SandboxOptions,
    layer: &LayerDisk,
    oci: &oci_spec::runtime::Spec,
) -> anyhow::Result<Sandbox> {
    let sandbox = Sandbox::start(config, backend, opts).await?;
    let id = sandbox.id();
    let container = ContainerSpec {
        id,
        oci,
        layers: std::slice::from_ref(layer),
        dns: None,
        hosts: None,
        rootfs_in_share: None,
        streams: NO_STREAMS,
    };
    let created = match sandbox.create_container(container).await {
        Ok(_) => sandbox.start_init(id).await.map(drop),
        Err(e) => Err(e),
    };
    if let Err(e) = created {
        sandbox.stop().await;
        return Err(e.into());
    }
    Ok(sandbox)
}

/// An idle container's streams: none.
const NO_STREAMS: StreamsWanted = StreamsWanted {
    stdin: false,
    stdout: false,
    stderr: false,
    terminal: false,
};

fn memory_of(sandbox: &Sandbox) -> SandboxMemory {
    let pids = sandbox.pids();
    let mib = |kib: u64| kib as f64 / KIB_PER_MIB;
    let pss: Vec<u64> = pids
        .iter()
        .map(|p| procfs::pss_kib(*p).unwrap_or(0))
        .collect();
    let vmm = pss.first().copied().unwrap_or(0);
    let devices: u64 = pss.iter().skip(1).sum();
    // Guest RAM is QEMU's memfd memory backend; capsid-vmm's guest RAM is
    // anonymous memory that this does not single out (it counts as VMM).
    let guest = pids
        .first()
        .and_then(|p| procfs::mapping_rss_kib(*p, "memfd:memory-backend"))
        .unwrap_or(0);
    let host = vmm + devices;
    SandboxMemory {
        id: sandbox.id().to_string(),
        host_pss_mib: mib(host),
        vmm_pss_mib: mib(vmm),
        devices_pss_mib: mib(devices),
        guest_touched_mib: mib(guest),
        overhead_mib: mib(host.saturating_sub(guest)),
        processes: pids.len(),
    }
}

fn step(mems: &[SandboxMemory]) -> Step {
    let n = mems.len().max(1) as f64;
    let avg = |f: fn(&SandboxMemory) -> f64| mems.iter().map(f).sum::<f64>() / n;
    Step {
        running: mems.len(),
        host_pss_mib_per_sandbox: avg(|m| m.host_pss_mib),
        guest_touched_mib_per_sandbox: avg(|m| m.guest_touched_mib),
        overhead_mib_per_sandbox: avg(|m| m.overhead_mib),
    }
}

fn print_report(r: &DensityReport) {
    println!(
        "capsid bench density: {} of {} idle sandboxes started ({} at a time), image {}, backend {}, {} MiB, {} vCPU",
        r.started, r.count, r.parallel, r.image, r.backend, r.memory_mib, r.vcpus
    );
    println!("time to start all: {:.0} ms", r.start_all_ms);
    if let Some(s) = &r.start_each_ms {
        println!(
            "time to start one (while others start): min {:.0}, median {:.0}, p90 {:.0}, max {:.0} ms",
            s.min, s.median, s.p90, s.max
        );
    }
    println!(
        "\nper sandbox after {} s idle (MiB){:>12}{:>9}{:>9}{:>9}{:>9}",
        r.settle_s, "min", "median", "p90", "max", "mean"
    );
    let rows = [
        ("host memory (PSS, QEMU + vhost)", &r.host_pss_mib),
        ("  VMM (QEMU) PSS", &r.vmm_pss_mib),
        ("  device back ends (capsid-vhost) PSS", &r.devices_pss_mib),
        ("guest RAM touched", &r.guest_touched_mib),
        ("overhead (host memory − guest RAM)", &r.overhead_mib),
    ];
    for (label, s) in rows {
        match s {
            Some(s) => println!(
                "  {label:<40}{:>9.1}{:>9.1}{:>9.1}{:>9.1}{:>9.1}",
                s.min, s.median, s.p90, s.max, s.mean
            ),
            None => println!("  {label:<40}{:>9}", "-"),
        }
    }
    if let Some(s) = &r.host_pss_mib {
        println!(
            "total for {} sandboxes: {:.0} MiB host memory",
            r.started,
            s.mean * r.started as f64
        );
    }
    println!("teardown: {:.0} ms", r.teardown_ms);
    if r.failures.is_empty() {
        println!("failures: none");
    } else {
        println!("failures: {}", r.failures.len());
        for f in &r.failures {
            println!("  {f}");
        }
    }
    if r.leftovers.is_empty() {
        println!("leftovers: none");
    } else {
        println!("leftovers: {}", r.leftovers.join("; "));
    }
}
