//! `capsid run`: one container in its own microVM, without containerd.
//!
//! The image becomes a cached read-only disk, the VM boots with it, the
//! agent creates the container, and this process relays stdio and signals
//! until the container exits; its exit status becomes ours.

use std::path::Path;

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use capsid_protocol::agent::{BlockLayer, CreateContainerRequest, Rootfs};
use capsid_sandbox::backend::DiskSpec;
use capsid_sandbox::config::{Config, MAX_VCPUS, MIN_MEMORY_MIB};
use capsid_sandbox::image::{self, RootfsCache};
use capsid_sandbox::sandbox::{self as sb, Sandbox, SandboxOptions};
use capsid_sandbox::spec::{self, ImageDefaults, RunOptions};
use capsid_sandbox::stdio::{Streams, StreamsWanted};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{signal, SignalKind};

use crate::tty::RawMode;

/// The serial of the rootfs disk the guest mounts.
const ROOTFS_SERIAL: &str = "capsid-rootfs";
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
    /// Resource limit, e.g. `nofile=1024:2048` (repeatable).
    #[arg(long = "rlimit", value_name = "NAME=SOFT[:HARD]")]
    rlimits: Vec<String>,
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
}

/// Runs the container; returns its exit status.
pub async fn run(config_path: Option<&Path>, args: RunArgs) -> anyhow::Result<i32> {
    let t0 = Instant::now();
    let config = Config::load(config_path)?;
    let memory_mib = args.memory.unwrap_or(config.vm.memory_mib);
    if memory_mib < MIN_MEMORY_MIB {
        bail!("--memory {memory_mib}: a guest needs at least {MIN_MEMORY_MIB} MiB");
    }
    let vcpus = args.cpus.unwrap_or(config.vm.vcpus);
    if vcpus == 0 || vcpus > MAX_VCPUS {
        bail!("--cpus {vcpus}: must be between 1 and {MAX_VCPUS}");
    }
    let reference = args
        .image
        .clone()
        .or(args.image_arg.clone())
        .unwrap_or_else(|| "busybox".into());

    // Image → cached rootfs disk (converted once, then a cache hit).
    let images_dir = config.paths.images_dir.clone();
    let cache = RootfsCache::new(&config.paths.cache_dir);
    let (image_config, rootfs) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let source = image::resolve(&reference, &images_dir)?;
        let image = image::open(&source)?;
        let rootfs = cache.prepare(&image, &|msg| eprintln!("capsid: {msg}"))?;
        Ok((image.config, rootfs))
    })
    .await
    .context("image task")??;
    let rootfs_time = t0.elapsed();

    let id = format!("run-{}", std::process::id());
    let defaults = image_defaults(&image_config);
    let opts = RunOptions {
        command: args.command.clone(),
        env: args.env.clone(),
        workdir: args.workdir.clone(),
        user: args.user.clone(),
        tty: args.tty,
        hostname: args.hostname.clone().unwrap_or_else(|| id.clone()),
        read_only: args.read_only,
        memory_limit: args
            .memory_limit
            .map(|m| i64::try_from(m.saturating_mul(1 << 20)).unwrap_or(i64::MAX)),
        rlimits: args.rlimits.clone(),
    };
    let oci = spec::build(&defaults, &opts)?;
    if let Some(limit) = args.memory_limit {
        if limit >= u64::from(memory_mib) {
            bail!("--memory-limit {limit} MiB does not fit in a {memory_mib} MiB guest (raise --memory)");
        }
    }

    let backend = sb::backend_for(&config)?;
    let sandbox = Sandbox::start(
        &config,
        backend,
        SandboxOptions {
            id: id.clone(),
            vcpus,
            memory_mib,
            disks: vec![DiskSpec {
                path: rootfs.path.clone(),
                readonly: true,
                serial: ROOTFS_SERIAL.into(),
            }],
            net: None,
            kernel_args: vec![],
        },
    )
    .await?;
    let mut phases = Phases {
        rootfs: rootfs_time,
        vm_spawned: rootfs_time + sandbox.timings.vm_spawned,
        agent_connected: rootfs_time + sandbox.timings.agent_connected,
        ..Phases::default()
    };
    let result = run_in(
        &sandbox,
        &id,
        &oci,
        rootfs.fs_type.as_str(),
        args.tty,
        t0,
        &mut phases,
    )
    .await;
    sandbox.stop().await;
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

fn image_defaults(config: &oci_spec::image::ImageConfiguration) -> ImageDefaults {
    let c = config.config().clone().unwrap_or_default();
    ImageDefaults {
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
        env: c.env().clone().unwrap_or_default(),
        working_dir: c.working_dir().clone().unwrap_or_default(),
        user: c.user().clone().unwrap_or_default(),
    }
}

async fn run_in(
    sandbox: &Sandbox,
    id: &str,
    oci: &oci_spec::runtime::Spec,
    fs_type: &str,
    tty: bool,
    t0: Instant,
    phases: &mut Phases,
) -> anyhow::Result<i32> {
    let agent = sandbox.agent();
    let pending = sandbox.bind_streams(StreamsWanted {
        stdin: true,
        stdout: true,
        stderr: true,
        terminal: tty,
    })?;
    let mut req = CreateContainerRequest::new();
    req.container_id = id.into();
    req.oci_spec_json = serde_json::to_vec(oci).context("serializing the OCI spec")?;
    let mut layer = BlockLayer::new();
    layer.disk_serial = ROOTFS_SERIAL.into();
    layer.fs_type = fs_type.into();
    let mut rootfs = Rootfs::new();
    rootfs.layers.push(layer);
    rootfs.readonly = oci
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    req.rootfs = protobuf::MessageField::some(rootfs);
    req.stdio = protobuf::MessageField::some(pending.stdio.clone());

    let accept = pending.accept();
    tokio::pin!(accept);
    let created = tokio::select! {
        created = agent.create_container(&req) => created,
        exit = sandbox.exited() => return Err(anyhow!("the VM exited while creating the container ({exit:?})")),
    };
    created?;
    let streams = tokio::time::timeout(Duration::from_secs(30), accept)
        .await
        .map_err(|_| anyhow!("the guest did not connect the container's stdio"))??;
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
    agent.start_process(id, "").await?;
    phases.started = t0.elapsed();

    let pumps = start_pumps(streams);
    let signals = forward_signals(agent.clone(), id.to_string(), tty);
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

fn start_pumps(streams: Streams) -> Pumps {
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
    if let Some(mut from) = streams.stdout {
        outputs.push(tokio::spawn(async move {
            let mut out = tokio::io::stdout();
            let _ = tokio::io::copy(&mut from, &mut out).await;
            let _ = out.flush().await;
        }));
    }
    if let Some(mut from) = streams.stderr {
        outputs.push(tokio::spawn(async move {
            let mut err = tokio::io::stderr();
            let _ = tokio::io::copy(&mut from, &mut err).await;
            let _ = err.flush().await;
        }));
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
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let kinds = [
            (SignalKind::interrupt(), 2),
            (SignalKind::terminate(), 15),
            (SignalKind::hangup(), 1),
            (SignalKind::quit(), 3),
        ];
        let mut streams = Vec::new();
        for (kind, num) in kinds {
            if let Ok(s) = signal(kind) {
                streams.push((s, num));
            }
        }
        let mut winch = if tty {
            signal(SignalKind::window_change()).ok()
        } else {
            None
        };
        let mut last: Option<Instant> = None;
        loop {
            let next = futures::future::select_all(streams.iter_mut().map(|(s, n)| {
                let n = *n;
                Box::pin(async move { s.recv().await.map(|()| n) })
            }));
            let winch_fut = async {
                match winch.as_mut() {
                    Some(w) => w.recv().await,
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                (got, _, _) = next => {
                    let Some(num) = got else { return };
                    let escalate = last.is_some_and(|t| t.elapsed() < KILL_ESCALATION);
                    let sig = if escalate { 9 } else { num };
                    last = Some(Instant::now());
                    let _ = agent.signal_process(&id, "", sig, false).await;
                }
                Some(()) = winch_fut => {
                    if let Some((rows, cols)) = crate::tty::size() {
                        let _ = agent.resize_pty(&id, "", rows.into(), cols.into()).await;
                    }
                }
            }
        }
    })
}
