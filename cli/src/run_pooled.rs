//! `capsid run` on a pooled sandbox (docs/pool.md): with `[pool]` enabled,
//! the run claims a warm shim of its size, as the shim's `start` does for
//! containerd, and drives that shim through the containerd Task API the
//! way `ctr run` would: a bundle (the spec `capsid run` builds, the image
//! unpacked as its rootfs), stdio over FIFOs it pumps, Create, Start,
//! Wait, signals as Kill, Delete and Shutdown. The VM and the container
//! are made by the same code as for containerd's tasks; only the client
//! differs. Whenever no pooled sandbox is taken, the run boots cold and
//! the log says why.

use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use capsid_sandbox::cni::Tap;
use capsid_sandbox::config::Config;
use capsid_sandbox::image;
use capsid_sandbox::network::GuestDns;
use capsid_sandbox::pool::{self, Claim};
use capsid_sandbox::pool_claim::{self, Taken};
use capsid_sandbox::spec::ImageDefaults;
use containerd_shim_protos::api::{
    CloseIORequest, CreateTaskRequest, DeleteRequest, KillRequest, ResizePtyRequest,
    ShutdownRequest, StartRequest, WaitRequest,
};
use containerd_shim_protos::shim_async::{Client, TaskClient};
use containerd_shim_protos::ttrpc::context;
use oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType, MountBuilder, Spec};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;

use crate::run::{relay_signals, EarlySignals};
use crate::runs::RunJournal;
use crate::tty::RawMode;

/// The containerd namespace the warm shim is told (it only names things).
const NAMESPACE: &str = "capsid-run";

/// How long one Task API call may take (Create includes fitting the VM).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the output may still flow after the exit was reported.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the shim gets to stop its VM and exit after Shutdown.
const SHIM_EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// What a pooled run needs to know.
pub struct PooledRun<'a> {
    /// The configuration (its `[pool]` is enabled).
    pub config: &'a Config,
    /// The file it was read from (`--config`), part of the shape key.
    pub config_path: Option<&'a Path>,
    /// The run's id (`run-PID`).
    pub id: &'a str,
    /// The image.
    pub reference: &'a str,
    /// The VM's vCPUs.
    pub vcpus: u32,
    /// The VM's memory.
    pub memory_mib: u32,
    /// The run's network.
    pub net_plan: &'a crate::network::Plan,
    /// Whether the run has a terminal.
    pub tty: bool,
}

impl PooledRun<'_> {
    /// Runs the container on a pooled sandbox: its exit status, or `None`
    /// when no pooled sandbox was taken (the reason is logged; the caller
    /// boots cold). `build` makes the spec from the image's defaults.
    pub async fn attempt(
        &self,
        build: impl FnOnce(&ImageDefaults) -> anyhow::Result<Spec>,
    ) -> anyhow::Result<Option<i32>> {
        let (reference, images_dir) = (
            self.reference.to_string(),
            self.config.paths.images_dir.clone(),
        );
        let image = tokio::task::spawn_blocking(move || {
            image::resolve(&reference, &images_dir).and_then(|source| image::open(&source))
        })
        .await
        .context("image task")??;
        let spec = build(&ImageDefaults::from_image(&image.config))?;
        let run_dir = RunDir::create(self.config, self.id)?;
        let bundle = run_dir.path().join("bundle");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(bundle.join("rootfs"))
            .with_context(|| format!("creating {}", bundle.display()))?;
        // The spec is written once its network is known, before Create
        // (the claim reads nothing of the bundle but its path).
        let socket = run_dir.path().join("task.sock");
        let claim = Claim {
            namespace: NAMESPACE.into(),
            id: self.id.into(),
            bundle: bundle.clone(),
            address: format!("unix://{}", socket.display()),
            ttrpc_address: String::new(),
            containerd_address: String::new(),
            debug: false,
            owner_pid: Some(std::process::id()),
        };
        let (config, file) = (self.config.clone(), pool::config_file(self.config_path));
        let (vcpus, memory_mib) = (self.vcpus, self.memory_mib);
        let taken = tokio::task::spawn_blocking(move || {
            pool_claim::claim(&config, file.as_deref(), vcpus, memory_mib, &claim)
        })
        .await
        .context("pool claim task")?;
        match taken {
            Ok(Taken::Yes { sandbox }) => {
                tracing::info!(id = self.id, %sandbox, "the run takes a pooled sandbox");
            }
            Ok(Taken::No { why }) => return Ok(self.cold(&why)),
            Err(e) => return Ok(self.cold(&format!("the pool failed: {e}"))),
        }
        // From here the warm shim serves this task: it is shut down on
        // every path, and the network taken down after it.
        let mut journal = RunJournal::begin(self.config, self.id, run_dir.path().to_path_buf())?;
        let shim = Shim::connect(&socket, self.id).await?;
        let mut net = None;
        let served = async {
            net = self
                .net_plan
                .setup_with(self.config, self.id, Tap::Leave, &mut journal)
                .await?;
            let dns = self.net_plan.resolver(net.as_ref());
            // The shim reaches the namespace through this process's open
            // fd: a name under /run/netns is a mount, which another mount
            // namespace (`ip netns exec`, a container) may not see.
            let netns = net
                .as_ref()
                .map(|n| {
                    std::fs::File::open(n.netns_path())
                        .with_context(|| format!("opening {}", n.netns_path().display()))
                })
                .transpose()?;
            let netns_path = netns.as_ref().map(|f| {
                PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd()))
            });
            write_bundle_spec(spec, netns_path.as_deref(), &dns, &bundle, run_dir.path())?;
            self.serve(&shim, image, &bundle, run_dir.path()).await
        }
        .await;
        shim.finish(&socket).await;
        crate::network::teardown(net, &mut journal).await;
        drop(journal);
        served.map(Some)
    }

    fn cold(&self, why: &str) -> Option<i32> {
        tracing::info!(
            id = self.id,
            reason = why,
            "no pooled sandbox: booting cold"
        );
        None
    }

    async fn serve(
        &self,
        shim: &Shim,
        image: image::Image,
        bundle: &Path,
        dir: &Path,
    ) -> anyhow::Result<i32> {
        let rootfs = bundle.join("rootfs");
        tokio::task::spawn_blocking(move || {
            let progress = |msg: &str| eprintln!("capsid: {msg}");
            image::unpack(&image, &rootfs, &progress)
        })
        .await
        .context("unpack task")??;
        let fifos = Fifos::make(dir, self.tty)?;
        let mut signals = EarlySignals::catch();
        let create = CreateTaskRequest {
            id: self.id.into(),
            bundle: bundle.display().to_string(),
            terminal: self.tty,
            stdin: fifos.stdin.display().to_string(),
            stdout: fifos.stdout.display().to_string(),
            stderr: fifos
                .stderr
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            ..Default::default()
        };
        // The reading ends first: the shim opens its writing ends at Create.
        let (stdin, stdout, stderr) = fifos.open()?;
        tokio::select! {
            created = shim.client.create(ctx(), &create) => { created.context("Create")?; }
            sig = signals.recv() => return Err(anyhow!("interrupted by signal {sig} while creating the container")),
        }
        let raw = if self.tty {
            RawMode::enable_on_stdin()
        } else {
            None
        };
        if self.tty {
            shim.resize().await;
        }
        let start = StartRequest {
            id: self.id.into(),
            ..Default::default()
        };
        tokio::select! {
            started = shim.client.start(ctx(), &start) => { started.context("Start")?; }
            sig = signals.recv() => {
                drop(raw);
                return Err(anyhow!("interrupted by signal {sig} while starting the container"));
            }
        }
        let input = tokio::spawn(pump_stdin(stdin, shim.clone()));
        let mut outputs = vec![tokio::spawn(pump_out(stdout, tokio::io::stdout()))];
        if let Some(stderr) = stderr {
            outputs.push(tokio::spawn(pump_out(stderr, tokio::io::stderr())));
        }
        let (killer, resizer) = (shim.clone(), shim.clone());
        let forward = tokio::spawn(relay_signals(
            signals,
            self.tty,
            move |sig| {
                let shim = killer.clone();
                async move { shim.kill(sig).await }
            },
            move || {
                let shim = resizer.clone();
                async move { shim.resize().await }
            },
        ));
        let waited = shim
            .client
            .wait(
                context::with_timeout(0),
                &WaitRequest {
                    id: self.id.into(),
                    ..Default::default()
                },
            )
            .await;
        forward.abort();
        input.abort();
        // All output reaches our stdout/stderr before the exit is reported.
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, futures::future::join_all(outputs)).await;
        drop(raw);
        let code = waited.context("Wait")?.exit_status;
        i32::try_from(code).map_err(|_| anyhow!("exit status {code} out of range"))
    }
}

/// Writes the bundle's final spec: pointed at the run's network namespace,
/// if it has one (the pooled VM's tap is moved there at Create), and with
/// the run's resolver as `/etc/resolv.conf`, bound as Docker binds its own.
fn write_bundle_spec(
    mut spec: Spec,
    netns: Option<&Path>,
    dns: &GuestDns,
    bundle: &Path,
    dir: &Path,
) -> anyhow::Result<()> {
    if let Some(netns) = netns {
        join_netns(&mut spec, netns)?;
    }
    if !dns.servers.is_empty() {
        let resolv = dir.join("resolv.conf");
        std::fs::write(&resolv, dns.to_resolv_conf())
            .with_context(|| format!("writing {}", resolv.display()))?;
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        mounts.retain(|m| m.destination() != Path::new("/etc/resolv.conf"));
        mounts.push(
            MountBuilder::default()
                .destination("/etc/resolv.conf")
                .typ("bind")
                .source(resolv)
                .options(vec!["rbind".into(), "ro".into()])
                .build()?,
        );
        spec.set_mounts(Some(mounts));
    }
    std::fs::write(bundle.join("config.json"), serde_json::to_vec(&spec)?)
        .with_context(|| format!("writing {}/config.json", bundle.display()))?;
    Ok(())
}

/// Sets `spec`'s network namespace to the one at `netns`.
fn join_netns(spec: &mut Spec, netns: &Path) -> anyhow::Result<()> {
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    namespaces.retain(|n| n.typ() != LinuxNamespaceType::Network);
    namespaces.push(
        LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Network)
            .path(netns)
            .build()?,
    );
    linux.set_namespaces(Some(namespaces));
    spec.set_linux(Some(linux));
    Ok(())
}

/// The warm shim serving this run's task.
#[derive(Clone)]
struct Shim {
    client: TaskClient,
    id: String,
}

impl Shim {
    async fn connect(socket: &Path, id: &str) -> anyhow::Result<Self> {
        let client = Client::connect(&format!("unix://{}", socket.display()))
            .await
            .with_context(|| format!("connecting to the pooled sandbox at {}", socket.display()))?;
        Ok(Self {
            client: TaskClient::new(client),
            id: id.into(),
        })
    }

    /// Deletes the task (whatever came of it) and shuts the shim down, then
    /// waits for it to have removed its socket: its VM is gone by then.
    async fn finish(&self, socket: &Path) {
        let delete = DeleteRequest {
            id: self.id.clone(),
            ..Default::default()
        };
        if let Err(e) = self.client.delete(ctx(), &delete).await {
            tracing::debug!(error = %e, "Delete");
        }
        let shutdown = ShutdownRequest {
            id: self.id.clone(),
            now: true,
            ..Default::default()
        };
        // The shim exits while answering: an error here is expected.
        let _ = self.client.shutdown(ctx(), &shutdown).await;
        let deadline = Instant::now() + SHIM_EXIT_TIMEOUT;
        while socket.exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if socket.exists() {
            tracing::warn!(socket = %socket.display(), "the pooled sandbox's shim did not exit");
        }
    }

    async fn kill(&self, signal: u32) {
        let req = KillRequest {
            id: self.id.clone(),
            signal,
            ..Default::default()
        };
        if let Err(e) = self.client.kill(ctx(), &req).await {
            tracing::debug!(error = %e, signal, "Kill");
        }
    }

    async fn resize(&self) {
        if let Some((rows, cols)) = crate::tty::size() {
            let req = ResizePtyRequest {
                id: self.id.clone(),
                width: cols.into(),
                height: rows.into(),
                ..Default::default()
            };
            let _ = self.client.resize_pty(ctx(), &req).await;
        }
    }

    async fn close_stdin(&self) {
        let req = CloseIORequest {
            id: self.id.clone(),
            stdin: true,
            ..Default::default()
        };
        let _ = self.client.close_io(ctx(), &req).await;
    }
}

fn ctx() -> context::Context {
    context::with_timeout(i64::try_from(CALL_TIMEOUT.as_nanos()).unwrap_or(i64::MAX))
}

/// The run's FIFOs (no stderr with a terminal: the pty carries both).
struct Fifos {
    stdin: PathBuf,
    stdout: PathBuf,
    stderr: Option<PathBuf>,
}

impl Fifos {
    fn make(dir: &Path, tty: bool) -> anyhow::Result<Self> {
        let fifo = |name: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            nix::unistd::mkfifo(
                &path,
                nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
            )
            .with_context(|| format!("mkfifo {}", path.display()))?;
            Ok(path)
        };
        Ok(Self {
            stdin: fifo("stdin")?,
            stdout: fifo("stdout")?,
            stderr: if tty { None } else { Some(fifo("stderr")?) },
        })
    }

    /// Our ends: stdin's writing end (opened read-write, so that it opens
    /// before the shim's reader), stdout's and stderr's reading ends.
    fn open(&self) -> anyhow::Result<(pipe::Sender, pipe::Receiver, Option<pipe::Receiver>)> {
        let reader = |p: &Path| {
            pipe::OpenOptions::new()
                .open_receiver(p)
                .with_context(|| format!("opening {}", p.display()))
        };
        let stdin = pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(&self.stdin)
            .with_context(|| format!("opening {}", self.stdin.display()))?;
        let stderr = self.stderr.as_deref().map(reader).transpose()?;
        Ok((stdin, reader(&self.stdout)?, stderr))
    }
}

/// Our stdin to the container's, then its end (the FIFO closed, and
/// CloseIO as containerd sends it).
async fn pump_stdin(mut to: pipe::Sender, shim: Shim) {
    let mut stdin = tokio::io::stdin();
    let _ = tokio::io::copy(&mut stdin, &mut to).await;
    let _ = to.shutdown().await;
    drop(to);
    shim.close_stdin().await;
}

async fn pump_out<W: tokio::io::AsyncWrite + Unpin>(mut from: pipe::Receiver, mut to: W) {
    let _ = tokio::io::copy(&mut from, &mut to).await;
    let _ = to.flush().await;
}

/// The run's private directory (bundle, FIFOs, the task socket), removed
/// with everything in it when dropped.
struct RunDir(PathBuf);

impl RunDir {
    fn create(config: &Config, id: &str) -> anyhow::Result<Self> {
        let path = config.paths.state_dir.join(format!("{id}.pooled"));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

/// Removes the directories of pooled runs that died (killed, say): their
/// warm shims saw them end and took the task and the VM down, removing
/// the task socket last; what is left is the bundle and the FIFOs.
pub fn sweep(state_dir: &Path) {
    for entry in std::fs::read_dir(state_dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("run-")
            .and_then(|n| n.strip_suffix(".pooled"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = capsid_sandbox::process::ProcessRef::of(pid).is_some_and(|p| p.is_alive());
        if alive || entry.path().join("task.sock").exists() {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => {
                tracing::info!(dir = %entry.path().display(), "removed a dead pooled run's directory")
            }
            Err(e) => {
                tracing::warn!(dir = %entry.path().display(), error = %e, "cannot remove a dead pooled run's directory")
            }
        }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove the pooled run's directory");
        }
    }
}
