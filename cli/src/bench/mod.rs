//! `capsid bench`: start-up latency with a phase breakdown, side by side
//! with what users would otherwise run (runc through containerd, capsid
//! through containerd, the bare VM), and host memory per idle sandbox.
//!
//! Benchmarks, not tests: they print what they measured and judge nothing.
//! docs/performance.md says what each phase means.

mod bare;
mod compare;
mod density;
mod plot;
mod pool;
mod procfs;
mod shim_phases;
mod startup;
pub mod stats;
pub mod timings;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::bail;
use capsid_sandbox::check::HostReport;
use capsid_sandbox::config::{BackendKind, Config, MAX_VCPUS, MIN_MEMORY_MIB};

/// Arguments of `capsid bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(Debug, clap::Subcommand)]
enum BenchCommand {
    /// Cold start-up latency, phase by phase (optionally against runc,
    /// the containerd shim and the bare VM).
    Startup(startup::StartupArgs),
    /// Host memory of K idle sandboxes.
    Density(density::DensityArgs),
}

/// Runs a benchmark.
pub fn run(config_path: Option<&Path>, args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        BenchCommand::Startup(a) => startup::run(config_path, a),
        BenchCommand::Density(a) => density::run(config_path, a),
    }
}

/// What every benchmark's VMs look like.
#[derive(Debug, Clone, clap::Args)]
struct VmArgs {
    /// VM backend (default: as `capsid check` selects).
    #[arg(long, value_name = "capsid-vmm|qemu-kvm|qemu-tcg", value_parser = parse_backend)]
    backend: Option<BackendKind>,
    /// Guest RAM in MiB (default from the config).
    #[arg(long, value_name = "MiB")]
    memory: Option<u32>,
    /// vCPUs (default from the config).
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// Image: a bundled name or an OCI archive/layout path.
    #[arg(long, value_name = "NAME|PATH", default_value = "busybox")]
    image: String,
}

fn parse_backend(s: &str) -> Result<BackendKind, String> {
    s.parse()
}

/// A count that must be at least 1.
fn positive(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

/// The configuration a benchmark runs with: the backend forced to the one
/// asked for (or the one `capsid check` selects), refused with the host
/// check's reason when this host cannot run it.
#[derive(Debug, Clone)]
struct BenchSetup {
    config: Config,
    backend: BackendKind,
    memory_mib: u32,
    vcpus: u32,
}

impl BenchSetup {
    fn new(config_path: Option<&Path>, vm: &VmArgs) -> anyhow::Result<Self> {
        let mut config = Config::load(config_path)?;
        if vm.backend.is_some() {
            config.backend.kind = vm.backend;
        }
        let report = HostReport::gather(&config);
        let Some(backend) = report.selection.backend else {
            match vm.backend {
                Some(kind) => bail!(
                    "--backend {kind} cannot run on this host: {}",
                    report.selection.reason
                ),
                None => bail!("no usable VM backend: {}", report.selection.reason),
            }
        };
        config.backend.kind = Some(backend);
        let memory_mib = vm.memory.unwrap_or(config.vm.memory_mib);
        if memory_mib < MIN_MEMORY_MIB {
            bail!("--memory {memory_mib}: a guest needs at least {MIN_MEMORY_MIB} MiB");
        }
        let vcpus = vm.cpus.unwrap_or(config.vm.vcpus);
        if vcpus == 0 || vcpus > MAX_VCPUS {
            bail!("--cpus {vcpus}: must be between 1 and {MAX_VCPUS}");
        }
        Ok(Self {
            config,
            backend,
            memory_mib,
            vcpus,
        })
    }
}

/// Refuses an output path whose directory does not exist, before any run.
fn check_output(path: &Path, what: &str) -> anyhow::Result<PathBuf> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "{what} {}: directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    Ok(path.to_path_buf())
}

/// The `--json` and `--plot` paths, checked before anything runs (the
/// plot's format too).
fn output_paths(
    json: Option<&Path>,
    plot: Option<&Path>,
) -> anyhow::Result<(Option<PathBuf>, Option<PathBuf>)> {
    let json = json.map(|p| check_output(p, "--json")).transpose()?;
    let plot = plot.map(|p| check_output(p, "--plot")).transpose()?;
    if let Some(p) = &plot {
        plot::format_of(p)?;
    }
    Ok((json, plot))
}

/// Set once SIGINT or SIGTERM arrived: a benchmark then starts nothing
/// new, tears down what it started and reports the interruption.
#[derive(Debug, Clone, Default)]
struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    /// Catches SIGINT and SIGTERM from now on (they no longer end the
    /// process by themselves); a helper thread waits for them.
    fn catch() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let flag = Self::default();
        let set = flag.0.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (mut int, mut term) = rt.block_on(async {
            anyhow::Ok((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            ))
        })?;
        std::thread::spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            });
            set.store(true, Ordering::SeqCst);
        });
        Ok(flag)
    }

    /// Whether a signal arrived.
    fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
