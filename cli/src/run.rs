//! `capsid run`: one container in its own microVM, without containerd.
//!
//! The image becomes a cached read-only disk, the VM boots with it, the
//! agent creates the container, and this process relays stdio and signals
//! until the container exits; its exit status becomes ours.

use std::path::Path;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use capsid_sandbox::config::{Config, MAX_VCPUS, MIN_MEMORY_MIB};
use capsid_sandbox::container::{ContainerSpec, LayerDisk};
use capsid_sandbox::image::{self, RootfsCache};
use capsid_sandbox::sandbox::{self as sb, Sandbox, SandboxOptions};
use capsid_sandbox::seccomp::SeccompChoice;
use capsid_sandbox::spec::{self, ImageDefaults, RunOptions};
use capsid_sandbox::stdio::{Streams, StreamsWanted};
use capsid_sandbox::volumes::{self, Share};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};
use tracing::Instrument;

use crate::bench::timings::{Recorder, TIMINGS_ENV};
use crate::runs::RunJournal;
use crate::tty::RawMode;

/// A second interrupt within this time kills the container (like `docker stop`).
const KILL_ESCALATION: Duration = Duration::from_secs(5);

/// Arguments of `capsid run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Image: a bundled name (default `busybox`) or an OCI layout dir/archive path.
    #[arg(value_name = "IMAGE")]
    image_arg: Option<String>,
    /// Image, as an option (same as the positional IMAGE).
    #[arg(long, value_name = "NAME|PATH", conflicts_with = "image_arg")]
    image: Option<String>,
    /// Guest RAM in MiB (default from the config).
    #[arg(long, value_name = "MiB")]
    memory: Option<u32>,
    /// vCPUs (default from the config).
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// Allocate a terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// Environment variable (repeatable).
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Working directory in the container.
    #[arg(short = 'w', long, value_name = "DIR")]
    workdir: Option<String>,
    /// User: `uid[:gid]`.
    #[arg(short = 'u', long, value_name = "UID[:GID]")]
    user: Option<String>,
    /// Container hostname (default: the sandbox id).
    #[arg(long)]
    hostname: Option<String>,
    /// Mount the container's root filesystem read-only.
    #[arg(long)]
    read_only: bool,
    /// cgroup memory limit of the container, in MiB.
    #[arg(long, value_name = "MiB")]
    memory_limit: Option<u64>,
    /// Keep the host's balloon policy away from this sandbox's memory.
    #[arg(long)]
    no_balloon: bool,
    /// Boot a VM for this run even when `capsid-poold` has one ready
    /// (`[pool]` in the config; docs/pool.md).
    #[arg(long)]
    no_pool: bool,
    /// Resource limit, e.g. `nofile=1024:2048` (repeatable).
    #[arg(long = "rlimit", value_name = "NAME=SOFT[:HARD]")]
    rlimits: Vec<String>,
    /// Network: `none` (no NIC; the default without --publish) or
    /// `bridge` (the CNI network of the config).
    #[arg(long, value_name = "none|bridge")]
    network: Option<String>,
    /// Publish a container port on the host, `HOST:CONTAINER[/tcp|udp]`
    /// (repeatable; implies --network bridge).
    #[arg(short = 'p', long = "publish", value_name = "HOST:CONTAINER[/PROTO]")]
    publish: Vec<String>,
    /// Name server for the container's /etc/resolv.conf (repeatable).
    #[arg(long = "dns", value_name = "IP")]
    dns: Vec<String>,
    /// Seccomp: `default` (the built-in allowlist profile), `unconfined`
    /// (no filter) or the path of an OCI `linux.seccomp` JSON file.
    #[arg(
        long,
        value_name = "default|unconfined|FILE",
        default_value = "default"
    )]
    seccomp: String,
    /// A host file or directory in the container, shared over virtio-fs
    /// (repeatable; `:ro` makes it read-only).
    #[arg(short = 'v', long = "volume", value_name = "HOST:CONTAINER[:ro|rw]")]
    volumes: Vec<String>,
    /// Command and arguments (default: the image's).
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Phase timings for `CAPSID_LOG=info` and benchmarks.
#[derive(Debug, Default)]
struct Phases {
    rootfs: Duration,
    vm_spawned: Duration,
    agent_connected: Duration,
    created: Duration,
    started: Duration,
    exited: Duration,
    first_output: Option<Duration>,
}

/// Runs the container; returns its exit status.
pub async fn run(config_path: Option<&Path>, args: RunArgs) -> anyhow::Result<i32> {
    let mut timings = Recorder::new();
    let result = run_timed(config_path, args, &mut timings)
        .instrument(tracing::info_span!("capsid_run"))
        .await;
    // Machine-readable phases for `capsid bench` (see docs/performance.md).
    if let Some(path) = std::env::var_os(TIMINGS_ENV) {
        timings.finish(&result);
        if let Err(e) = timings.write(Path::new(&path)) {
            eprintln!("capsid: {e:#}");
        }
    }
    result
}

async fn run_timed(
    config_path: Option<&Path>,
    args: RunArgs,
    timings: &mut Recorder,
) -> anyhow::Result<i32> {
    let t0 = timings.origin();
    let config = Config::load(config_path)?;
    // Refused before anything is made when another user could reach them.
    capsid_sandbox::private_dir::ensure_root(&config.paths.state_dir)?;
    capsid_sandbox::private_dir::ensure_root(&config.paths.cache_dir)?;
    crate::run_pooled::sweep(&config.paths.state_dir);
    let memory_mib = args.memory.unwrap_or(config.vm.memory_mib);
    if memory_mib < MIN_MEMORY_MIB {
        bail!("--memory {memory_mib}: a guest needs at least {MIN_MEMORY_MIB} MiB");
    }
    let vcpus = args.cpus.unwrap_or(config.vm.vcpus);
    if vcpus == 0 || vcpus > MAX_VCPUS {
        bail!("--cpus {vcpus}: must be between 1 and {MAX_VCPUS}");
    }
    let net_plan = crate::network::Plan::parse(args.network.as_deref(), &args.publish, &args.dns)?;
    net_plan.check_ports()?;
    let reference = args
        .image
        .clone()
        .or(args.image_arg.clone())
        .unwrap_or_else(|| "busybox".into());
    let id = format!("run-{}", std::process::id());
    if let Some(limit) = args.memory_limit {
        if limit >= u64::from(memory_mib) {
            bail!("--memory-limit {limit} MiB does not fit in a {memory_mib} MiB guest (raise --memory)");
        }
    }

    if config.pool.enabled && !args.no_pool && args.no_balloon {
        tracing::info!(
            id,
            reason = "--no-balloon: a pooled VM's size is its balloon's",
            "no pooled sandbox: booting cold"
        );
    } else if config.pool.enabled && !args.no_pool {
        let pooled = crate::run_pooled::PooledRun {
            config: &config,
            config_path,
            id: &id,
            reference: &reference,
            vcpus,
            memory_mib,
            net_plan: &net_plan,
            tty: args.tty,
        };
        if let Some(code) = pooled
            .attempt(|defaults| build_spec(&args, defaults, &id))
            .await?
        {
            return Ok(code);
        }
    }

    let prepared = prepare_image(&config, reference)
        .instrument(tracing::info_span!("rootfs"))
        .await?;
    let rootfs = prepared.rootfs;
    let rootfs_time = t0.elapsed();
    timings.phases().rootfs_ready_ms = Some(timings.now());

    let defaults = ImageDefaults::from_image(&prepared.config);
    let mut oci = build_spec(&args, &defaults, &id)?;
    let volumes = volumes::take_volumes(&mut oci)?;

    let backend = sb::backend_for(&config)?;
    // What dead runs left goes first (a reused pid would otherwise find
    // its own names taken); then this run's record, before anything of it
    // exists. Its VM processes die with this process.
    capsid_sandbox::process::die_with_this_process();
    let recovered = tokio::task::block_in_place(|| crate::runs::recover_dead(&config))?;
    for r in recovered.iter().filter(|r| r.error.is_some()) {
        tracing::warn!(id = %r.id, error = ?r.error, "leftovers of a dead capsid run remain");
    }
    let mut journal = RunJournal::begin(&config, &id, config.paths.state_dir.join(&id))?;
    // From here until the container runs, a signal ends the start-up
    // through the clean-up below instead of killing us mid-way.
    let mut early_signals = EarlySignals::catch();
    // No volumes, no share and no virtiofsd. The journal takes the share
    // down when it goes, after the VM (on every path), and keeps the
    // record for the next run if that fails.
    let mut share_dir = None;
    if !volumes.is_empty() {
        let dir = volumes::share_dir(&config.paths.state_dir, &id);
        journal.set_share(&dir)?;
        let share = Share::prepare(
            &dir,
            &volumes,
            &[&config.paths.state_dir, &config.paths.cache_dir],
        )?;
        share_dir = Some(share.dir().to_path_buf());
        journal.adopt_share(share);
    }
    let net = net_plan.setup(&config, &id, &mut journal).await?;
    let dns = net_plan.resolver(net.as_ref());
    let backend_kind = backend.kind();
    let layer = LayerDisk::primary(rootfs.fs_type.as_str());
    let start_called = Instant::now();
    let start = Sandbox::start(
        &config,
        backend,
        SandboxOptions {
            id: id.clone(),
            vcpus,
            memory_mib,
            disks: vec![layer.disk_spec(rootfs.path.clone())],
            net: net.as_ref().and_then(|n| n.net_spec()),
            kernel_args: vec![],
            network: net.as_ref().and_then(|n| n.guest_network()),
            balloon_opt_out: args.no_balloon,
            share_dir,
            cgroup: None,
        },
    )
    .instrument(tracing::info_span!("sandbox_start"));
    let started = tokio::select! {
        started = start => started.map_err(anyhow::Error::from),
        sig = early_signals.recv() => Err(anyhow!("interrupted by signal {sig} while starting the VM")),
    };
    let sandbox = match started {
        Ok(sandbox) => sandbox,
        Err(e) => {
            crate::network::teardown(net, &mut journal).await;
            return Err(e);
        }
    };
    if let Err(e) = journal.set_vm_processes(&sandbox.pids()) {
        // The VM's processes are also found by their run directory.
        tracing::warn!(error = %format!("{e:#}"), "recording the VM's processes");
    }
    timings.sandbox_started(backend_kind.as_str(), start_called, &sandbox.timings);
    let mut phases = Phases {
        rootfs: rootfs_time,
        vm_spawned: rootfs_time + sandbox.timings.vm_spawned,
        agent_connected: rootfs_time + sandbox.timings.agent_connected,
        ..Phases::default()
    };
    let container = ContainerSpec {
        id: sandbox.id(),
        oci: &oci,
        layers: std::slice::from_ref(&layer),
        dns: Some(&dns),
        hosts: None,
        rootfs_in_share: None,
        streams: StreamsWanted {
            stdin: true,
            stdout: true,
            stderr: true,
            terminal: args.tty,
        },
    };
    let result = run_in(&sandbox, container, early_signals, t0, &mut phases)
        .instrument(tracing::info_span!("container"))
        .await;
    record_phases(timings, &phases);
    sandbox
        .stop()
        .instrument(tracing::info_span!("vm_stop"))
        .await;
    timings.phases().vm_gone_ms = Some(timings.now());
    crate::network::teardown(net, &mut journal).await;
    drop(journal);
    drop(rootfs);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    tracing::info!(
        rootfs_ms = ms(phases.rootfs),
        vm_spawned_ms = ms(phases.vm_spawned),
        agent_connected_ms = ms(phases.agent_connected),
        created_ms = ms(phases.created),
        started_ms = ms(phases.started),
        exited_ms = ms(phases.exited),
        total_ms = ms(t0.elapsed()),
        "capsid run phases"
    );
    result
}

/// The container's OCI spec from the flags and the image's defaults, its
/// `-v` binds still in it as mounts.
fn build_spec(
    args: &RunArgs,
    defaults: &ImageDefaults,
    id: &str,
) -> anyhow::Result<oci_spec::runtime::Spec> {
    let opts = RunOptions {
        command: args.command.clone(),
        env: args.env.clone(),
        workdir: args.workdir.clone(),
        user: args.user.clone(),
        tty: args.tty,
        hostname: args.hostname.clone().unwrap_or_else(|| id.to_string()),
        read_only: args.read_only,
        memory_limit: args
            .memory_limit
            .map(|m| i64::try_from(m.saturating_mul(1 << 20)).unwrap_or(i64::MAX)),
        rlimits: args.rlimits.clone(),
        seccomp: SeccompChoice::parse(&args.seccomp).profile()?,
    };
    let mut oci = spec::build(defaults, &opts)?;
    let volumes = parse_volumes(&args.volumes)?;
    spec::add_binds(&mut oci, &volumes)?;
    Ok(oci)
}

/// `-v HOST:CONTAINER[:ro|rw]` as binds; HOST must be absolute (a name
/// would be a Docker named volume, which `capsid run` has none of).
fn parse_volumes(args: &[String]) -> anyhow::Result<Vec<spec::Bind>> {
    args.iter()
        .map(|arg| {
            let mut parts = arg.splitn(3, ':');
            let (Some(host), Some(guest)) = (parts.next(), parts.next()) else {
                bail!("-v {arg:?}: expected HOST:CONTAINER[:ro|rw]");
            };
            let readonly = match parts.next() {
                None | Some("rw") => false,
                Some("ro") => true,
                Some(other) => bail!("-v {arg:?}: unknown mode {other:?} (ro or rw)"),
            };
            if !host.starts_with('/') {
                bail!("-v {arg:?}: the host path must be absolute");
            }
            Ok(spec::Bind {
                source: host.into(),
                destination: guest.into(),
                readonly,
            })
        })
        .collect()
}

/// The image as a cached rootfs disk (converted once, then a cache hit),
/// with progress on stderr.
pub(crate) async fn prepare_image(
    config: &Config,
    reference: String,
) -> anyhow::Result<image::PreparedImage> {
    let images_dir = config.paths.images_dir.clone();
    let cache = RootfsCache::new(&config.paths.cache_dir);
    let progress = |msg: &str| eprintln!("capsid: {msg}");
    let prepared = tokio::task::spawn_blocking(move || {
        image::prepare(&reference, &images_dir, &cache, &progress)
    })
    .await
    .context("image task")??;
    Ok(prepared)
}

/// Copies the container phases (durations since the origin; zero: not
/// reached) into the timings record.
fn record_phases(timings: &mut Recorder, phases: &Phases) {
    let at = |d: Duration| (!d.is_zero()).then_some(d.as_secs_f64() * 1000.0);
    let p = timings.phases();
    p.container_created_ms = at(phases.created);
    p.process_started_ms = at(phases.started);
    p.exit_reported_ms = at(phases.exited);
    p.first_output_ms = phases.first_output.and_then(at);
}

/// Creates and runs the container in a started sandbox. `signals` has
/// caught SIGINT/SIGTERM/SIGHUP/SIGQUIT since before the sandbox started:
/// one arriving before the process runs ends the run; after that, the very
/// same streams are relayed to the container, so none falls in between.
async fn run_in(
    sandbox: &Sandbox,
    container: ContainerSpec<'_>,
    mut signals: EarlySignals,
    t0: Instant,
    phases: &mut Phases,
) -> anyhow::Result<i32> {
    // The container is named after its sandbox.
    let id = sandbox.id();
    let tty = container.streams.terminal;
    let agent = sandbox.agent();
    let created = tokio::select! {
        created = sandbox.create_container(container) => created?,
        sig = signals.recv() => return Err(anyhow!("interrupted by signal {sig} while creating the container")),
    };
    let streams = created.streams;
    phases.created = t0.elapsed();

    let raw = if tty {
        RawMode::enable_on_stdin()
    } else {
        None
    };
    if tty {
        if let Some((rows, cols)) = crate::tty::size() {
            let _ = agent.resize_pty(id, "", rows.into(), cols.into()).await;
        }
    }
    tokio::select! {
        started = sandbox.start_init(id) => { started?; }
        sig = signals.recv() => {
            drop(raw);
            return Err(anyhow!("interrupted by signal {sig} while starting the container"));
        }
    }
    phases.started = t0.elapsed();

    let first_output = Arc::new(OnceLock::new());
    let pumps = start_pumps(streams, first_output.clone());
    let signals = forward_signals(agent.clone(), id.to_string(), tty, signals);
    let exit = tokio::select! {
        waited = agent.wait_process(id, "") => waited?,
        exit = sandbox.exited() => {
            drop(raw);
            return Err(anyhow!("the VM exited unexpectedly ({exit:?})"));
        }
    };
    phases.exited = t0.elapsed();
    // All output reaches our stdout/stderr before we report the exit.
    pumps.drain().await;
    phases.first_output = first_output
        .get()
        .map(|at: &Instant| at.saturating_duration_since(t0));
    signals.abort();
    drop(raw);
    if exit.oom_killed {
        eprintln!("capsid: the container was killed for exceeding its memory limit");
    }
    Ok(exit.exit_status)
}

/// The copy tasks between our stdio and the container's streams.
struct Pumps {
    outputs: Vec<tokio::task::JoinHandle<()>>,
}

impl Pumps {
    async fn drain(self) {
        for h in self.outputs {
            let _ = h.await;
        }
    }
}

/// Copies `from` to `to`, noting when the first byte arrived.
async fn copy_noting_first<R, W>(mut from: R, mut to: W, first: Arc<OnceLock<Instant>>)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 8192];
    let Ok(n) = from.read(&mut buf).await else {
        return;
    };
    if n > 0 {
        let _ = first.set(Instant::now());
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        let _ = tokio::io::copy(&mut from, &mut to).await;
    }
    let _ = to.flush().await;
}

fn start_pumps(streams: Streams, first_output: Arc<OnceLock<Instant>>) -> Pumps {
    if let Some(mut to_guest) = streams.stdin {
        // Detached: a read from our stdin may block forever (a terminal),
        // and must not hold up the exit.
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let _ = tokio::io::copy(&mut stdin, &mut to_guest).await;
            let _ = to_guest.shutdown().await;
        });
    }
    let mut outputs = Vec::new();
    if let Some(from) = streams.stdout {
        let first = first_output.clone();
        outputs.push(tokio::spawn(copy_noting_first(
            from,
            tokio::io::stdout(),
            first,
        )));
    }
    if let Some(from) = streams.stderr {
        outputs.push(tokio::spawn(copy_noting_first(
            from,
            tokio::io::stderr(),
            first_output,
        )));
    }
    Pumps { outputs }
}

/// Relays SIGINT/SIGTERM/SIGHUP/SIGQUIT to the container; a second one
/// within [`KILL_ESCALATION`] sends SIGKILL (the container's init ignores
/// signals it has no handler for). Window size changes resize its pty.
fn forward_signals(
    agent: capsid_sandbox::agent::Agent,
    id: String,
    tty: bool,
    caught: EarlySignals,
) -> tokio::task::JoinHandle<()> {
    let resize_agent = agent.clone();
    let resize_id = id.clone();
    tokio::spawn(relay_signals(
        caught,
        tty,
        move |sig| {
            let (agent, id) = (agent.clone(), id.clone());
            async move {
                let _ = agent.signal_process(&id, "", sig, false).await;
            }
        },
        move || {
            let (agent, id) = (resize_agent.clone(), resize_id.clone());
            async move {
                if let Some((rows, cols)) = crate::tty::size() {
                    let _ = agent.resize_pty(&id, "", rows.into(), cols.into()).await;
                }
            }
        },
    ))
}

/// Sends each signal `caught` catches with `send` (a second within
/// [`KILL_ESCALATION`] as SIGKILL) and, with a terminal, calls `resize`
/// on every window size change; runs until aborted. The cold and the
/// pooled `capsid run` differ only in where the two go.
pub(crate) async fn relay_signals<S, SF, R, RF>(
    mut caught: EarlySignals,
    tty: bool,
    send: S,
    resize: R,
) where
    S: Fn(u32) -> SF,
    SF: std::future::Future<Output = ()>,
    R: Fn() -> RF,
    RF: std::future::Future<Output = ()>,
{
    let mut winch = if tty {
        signal(SignalKind::window_change()).ok()
    } else {
        None
    };
    let mut last: Option<Instant> = None;
    loop {
        let winch_fut = async {
            match winch.as_mut() {
                Some(w) => w.recv().await,
                None => futures::future::pending().await,
            }
        };
        tokio::select! {
            num = caught.recv() => {
                let escalate = last.is_some_and(|t| t.elapsed() < KILL_ESCALATION);
                last = Some(Instant::now());
                send(if escalate { 9 } else { num }).await;
            }
            Some(()) = winch_fut => resize().await,
        }
    }
}

/// SIGINT, SIGTERM, SIGHUP and SIGQUIT caught while the sandbox starts.
pub(crate) struct EarlySignals(Vec<(tokio::signal::unix::Signal, u32)>);

impl EarlySignals {
    /// Catches them from now on (they no longer end the process by
    /// themselves).
    pub(crate) fn catch() -> Self {
        let kinds = [
            (SignalKind::interrupt(), 2),
            (SignalKind::terminate(), 15),
            (SignalKind::hangup(), 1),
            (SignalKind::quit(), 3),
        ];
        Self(
            kinds
                .into_iter()
                .filter_map(|(kind, num)| signal(kind).ok().map(|s| (s, num)))
                .collect(),
        )
    }

    /// The number of the first one that arrives.
    pub(crate) async fn recv(&mut self) -> u32 {
        if self.0.is_empty() {
            return futures::future::pending().await;
        }
        let next = futures::future::select_all(self.0.iter_mut().map(|(s, n)| {
            let n = *n;
            Box::pin(async move {
                match s.recv().await {
                    Some(()) => n,
                    None => futures::future::pending().await,
                }
            })
        }));
        next.await.0
    }
}
