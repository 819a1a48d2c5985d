//! `capsid-poold`: keeps the pool of pre-booted sandboxes filled
//! (docs/pool.md). For every `[[pool.shapes]]` it starts warm shims
//! (`containerd-shim-capsid-v2 warm`), one boot at a time per shape, until
//! `size` of them wait for a claim; a claimed one becomes a container's
//! shim and is no longer the daemon's business. One per state directory;
//! a second one exits at once.
#![forbid(unsafe_code)]

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use capsid_sandbox::config::{Config, PoolShapeConfig, CONFIG_ENV};
use capsid_sandbox::pool::{self, Shape};
use capsid_sandbox::pool_daemon::{self, Backoff, ShapeStatus, Status};
use capsid_sandbox::process::ProcessRef;
use capsid_sandbox::{locate, private_dir};
use clap::Parser;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

#[path = "../daemon/mod.rs"]
mod daemon;

/// Keeps pre-booted sandboxes ready for containers to take.
#[derive(Debug, Parser)]
#[command(name = "capsid-poold", version, about)]
struct Args {
    /// Configuration file (default: $CAPSID_CONFIG, then /etc/capsid/config.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The shim that boots warm sandboxes (default: containerd-shim-capsid-v2
    /// beside this program, then in PATH).
    #[arg(long, value_name = "PATH")]
    shim: Option<PathBuf>,
}

/// Exit status for an unusable or disabled configuration (sysexits'
/// EX_CONFIG): a service manager must not restart on it (the unit file
/// says `RestartPreventExitStatus=78`), unlike on a failure at run time.
const EX_CONFIG: u8 = 78;
/// The shim's name, looked up when `--shim` is not given.
const SHIM: &str = "containerd-shim-capsid-v2";
/// How often the pools are looked at.
const ROUND: Duration = Duration::from_millis(100);
/// How long a warm shim gets to stop after SIGTERM before SIGKILL.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// How long a killed one gets to disappear.
const KILL_WAIT: Duration = Duration::from_secs(2);
/// Rounds a child that exited waits for its stdout to be read to the end
/// before it is judged: its `ready` line may still be in the pipe.
const EXIT_GRACE_ROUNDS: u32 = 5;
/// Lines of a failed warm shim's log quoted in the warning.
const LOG_TAIL_LINES: usize = 10;
/// How long a status answer may take to write.
const STATUS_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    // Everything this process makes (sockets, logs, records) is for root
    // alone, and so for the warm shims it starts.
    daemon::init();
    let args = Args::parse();
    // The file is part of the shape key, and the warm shims are told it: a
    // relative path would name another file (and another key) for a shim
    // started elsewhere.
    let config_file = args
        .config
        .clone()
        .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from))
        .map(|p| std::path::absolute(&p).unwrap_or(p));
    let config = match Config::load(config_file.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("capsid-poold: {:#}", anyhow::Error::from(e));
            return ExitCode::from(EX_CONFIG);
        }
    };
    if let Err(message) = usable(&config) {
        eprintln!("capsid-poold: {message}");
        return ExitCode::from(EX_CONFIG);
    }
    let shim = args.shim.as_deref().unwrap_or(Path::new(SHIM));
    let Some(shim) = locate::binary(shim) else {
        eprintln!(
            "capsid-poold: the shim {} is not an executable here (nor beside capsid-poold or in \
             PATH): nothing can boot warm sandboxes (make install, or --shim PATH)",
            shim.display()
        );
        return ExitCode::from(EX_CONFIG);
    };
    match run(config, config_file, shim) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capsid-poold: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Why `config` gives the daemon nothing to do, or more than the host may
/// hold.
fn usable(config: &Config) -> Result<(), String> {
    if !config.pool.enabled {
        return Err(
            "pool.enabled is false in the configuration: no shim would take a pooled sandbox"
                .into(),
        );
    }
    if config.pool.shapes.is_empty() {
        return Err("the configuration has no [[pool.shapes]]: nothing to keep booted".into());
    }
    let limit = capsid_sandbox::balloon::overcommit_limit(config);
    if limit.is_none() {
        tracing::warn!("the host's memory size is unknown: the pool's size is not checked against memory.overcommit_ratio");
    }
    pool_daemon::check_fits(&config.pool.shapes, limit)
}

fn run(config: Config, config_file: Option<PathBuf>, shim: PathBuf) -> anyhow::Result<()> {
    let dir = pool::dir(&config);
    private_dir::ensure_root(&dir)?;
    let Some(lock) = lock(&pool_daemon::lock_path(&config))? else {
        tracing::info!(dir = %dir.display(), "another capsid-poold runs for this state directory; exiting");
        return Ok(());
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = rt.block_on(async move {
        let daemon = Daemon::new(config, config_file, shim);
        daemon.run().await
    });
    drop(lock);
    result
}

/// Takes the daemon's role for this state directory: an exclusive `flock`
/// on the lock file, released by the kernel however the daemon ends.
/// `None` when another daemon holds it.
fn lock(path: &Path) -> anyhow::Result<Option<Flock<std::fs::File>>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        // Never through a symlink.
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => {
            Err(std::io::Error::from(e)).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// One configured shape and its pool.
#[derive(Debug)]
struct ShapePool {
    config: PoolShapeConfig,
    key: String,
    dir: PathBuf,
    backoff: Backoff,
    last_failure: Option<String>,
}

impl ShapePool {
    fn label(&self) -> String {
        format!("{} vCPU, {} MiB", self.config.vcpus, self.config.memory_mib)
    }
}

/// A warm shim this daemon started.
#[derive(Debug)]
struct WarmChild {
    name: String,
    /// Index into [`Daemon::shapes`].
    shape: usize,
    child: tokio::process::Child,
    started: Instant,
    /// Its `ready` line arrived (set by the task reading its stdout).
    ready: Arc<AtomicBool>,
    reader: JoinHandle<()>,
    /// How it ended, once it did.
    exit: Option<String>,
    /// Rounds since it was seen to end.
    exit_rounds: u32,
    /// It listens under another shape key: stopped, failure counted.
    misplaced: bool,
}

impl WarmChild {
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// A warm shim a previous daemon started, found listening at start.
#[derive(Debug)]
struct Adopted {
    name: String,
    shape: usize,
    process: Option<ProcessRef>,
}

/// A warm shim being stopped.
#[derive(Debug)]
struct Victim {
    name: String,
    shape_dir: PathBuf,
    /// Its socket, taken into the claimed directory so no claimant gets it.
    taken: Option<PathBuf>,
    handle: Handle,
}

#[derive(Debug)]
enum Handle {
    Child(tokio::process::Child),
    Process(ProcessRef),
}

impl Victim {
    fn signal(&mut self, signal: Signal) {
        let pid = match &self.handle {
            Handle::Child(c) => c.id(),
            Handle::Process(p) => p.is_alive().then_some(p.pid),
        };
        if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
            if let Err(e) = kill(Pid::from_raw(pid), signal) {
                tracing::debug!(name = %self.name, pid, %signal, error = %e, "cannot signal a warm shim");
            }
        }
    }

    fn exited(&mut self) -> bool {
        match &mut self.handle {
            Handle::Child(c) => !matches!(c.try_wait(), Ok(None)),
            Handle::Process(p) => !p.is_alive(),
        }
    }
}

struct Daemon {
    config: Config,
    config_file: Option<PathBuf>,
    shim: PathBuf,
    shapes: Vec<ShapePool>,
    children: Vec<WarmChild>,
    adopted: Vec<Adopted>,
    ready_tx: mpsc::UnboundedSender<String>,
    ready_rx: mpsc::UnboundedReceiver<String>,
    /// Leftovers of failed warm shims being removed (an undo blocks).
    cleanups: JoinSet<()>,
    random: RandomState,
}

impl Daemon {
    fn new(config: Config, config_file: Option<PathBuf>, shim: PathBuf) -> Self {
        let shapes = config
            .pool
            .shapes
            .iter()
            .map(|s| {
                let key = pool::shape_key(
                    &config,
                    config_file.as_deref(),
                    config.backend.kind,
                    Shape::of(s),
                );
                ShapePool {
                    config: s.clone(),
                    dir: pool::shape_dir(&config, &key),
                    key,
                    backoff: Backoff::default(),
                    last_failure: None,
                }
            })
            .collect();
        let (ready_tx, ready_rx) = mpsc::unbounded_channel();
        Self {
            config,
            config_file,
            shim,
            shapes,
            children: Vec::new(),
            adopted: Vec::new(),
            ready_tx,
            ready_rx,
            cleanups: JoinSet::new(),
            random: RandomState::new(),
        }
    }

    async fn run(mut self) -> anyhow::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        // Before anything is started: a stop asked for during the start
        // is then seen by the loop.
        let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
        let status_path = pool_daemon::status_path(&self.config);
        let listener = bind_status(&status_path)?;
        self.start().await;
        for s in &self.shapes {
            tracing::info!(shape = %s.label(), size = s.config.size, key = %s.key, "keeping the pool filled");
        }
        let mut tick = tokio::time::interval(ROUND);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                Some(name) = self.ready_rx.recv() => self.on_ready(&name),
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => self.answer(stream),
                    Err(e) => tracing::warn!(error = %e, "cannot accept a status connection"),
                },
                _ = tick.tick() => self.round(),
            }
        }
        tracing::info!("stopping: unclaimed warm sandboxes are stopped, claimed ones keep running");
        drop(listener);
        self.shutdown().await;
        if let Err(e) = std::fs::remove_file(&status_path) {
            tracing::warn!(path = %status_path.display(), error = %e, "cannot remove the status socket");
        }
        Ok(())
    }

    /// Looks at what a previous daemon left: live warm shims of a
    /// configured shape are adopted (they count as ready), those of a
    /// shape no longer configured (another kernel, say) are stopped, and
    /// the leftovers of dead ones are removed.
    async fn start(&mut self) {
        let dir = pool::dir(&self.config);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        let claimed = pool::claimed_dir(&self.config);
        let mut victims = Vec::new();
        let mut stale_dirs = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(key) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if path == claimed
                || key.starts_with('.')
                || !entry.file_type().is_ok_and(|t| t.is_dir())
            {
                continue;
            }
            let scan_dir = path.clone();
            let report = match tokio::task::spawn_blocking(move || pool_daemon::scan(&scan_dir))
                .await
            {
                Ok(report) => report,
                Err(e) => {
                    tracing::warn!(dir = %path.display(), error = %e, "cannot look at a shape directory");
                    continue;
                }
            };
            for name in &report.removed {
                tracing::info!(name = %name, dir = %path.display(), "removed what a dead warm shim left");
            }
            for e in &report.errors {
                tracing::warn!(dir = %path.display(), error = %e, "cannot remove a dead warm shim's leftovers");
            }
            match self.shapes.iter().position(|s| s.key == key) {
                Some(shape) => {
                    for (name, process) in report.live {
                        tracing::info!(name = %name, shape = %self.shapes[shape].label(), "adopted a ready warm sandbox");
                        self.adopted.push(Adopted {
                            name,
                            shape,
                            process: Some(process),
                        });
                    }
                }
                None => {
                    for (name, process) in report.live {
                        match take(&path, &name, &claimed) {
                            Ok(Some(taken)) => {
                                tracing::info!(name = %name, dir = %path.display(), "stopping a warm sandbox of a shape no longer configured");
                                victims.push(Victim {
                                    name,
                                    shape_dir: path.clone(),
                                    taken: Some(taken),
                                    handle: Handle::Process(process),
                                });
                            }
                            Ok(None) => {}
                            Err(e) => {
                                tracing::warn!(name = %name, error = %e, "cannot take a warm sandbox's socket")
                            }
                        }
                    }
                    stale_dirs.push(path);
                }
            }
        }
        stop_all(victims).await;
        for dir in stale_dirs {
            // Only an empty one goes: a claimed shim may still move its
            // record out of it.
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// One look at every shape: reap, then refill.
    fn round(&mut self) {
        let now = Instant::now();
        self.reap(now);
        self.check_adopted();
        for i in 0..self.shapes.len() {
            let shape = &self.shapes[i];
            let ready = pool::ready(&self.config, &shape.key).len();
            let booting = self.booting(i);
            if pool_daemon::wants_boot(
                shape.config.size,
                ready,
                booting,
                shape.backoff.waiting(now),
            ) {
                self.spawn(i, now);
            }
        }
    }

    /// Children of `shape` that have not said `ready` (including one that
    /// ended and is not judged yet).
    fn booting(&self, shape: usize) -> usize {
        self.children
            .iter()
            .filter(|c| c.shape == shape && !c.is_ready())
            .count()
    }

    fn reap(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.children.len() {
            let c = &mut self.children[i];
            if c.exit.is_none() {
                match c.child.try_wait() {
                    Ok(None) => {
                        i += 1;
                        continue;
                    }
                    Ok(Some(status)) => c.exit = Some(status.to_string()),
                    Err(e) => c.exit = Some(format!("cannot be waited for: {e}")),
                }
            }
            if !c.is_ready() && !c.reader.is_finished() && c.exit_rounds < EXIT_GRACE_ROUNDS {
                c.exit_rounds += 1;
                i += 1;
                continue;
            }
            let c = self.children.swap_remove(i);
            self.finish(c, now);
        }
    }

    /// Judges a child that ended.
    fn finish(&mut self, c: WarmChild, now: Instant) {
        c.reader.abort();
        let status = c.exit.clone().unwrap_or_default();
        let shape = &mut self.shapes[c.shape];
        let socket = pool::socket_path(&shape.dir, &c.name);
        let listed = std::fs::symlink_metadata(&socket).is_ok();
        if c.misplaced || (c.is_ready() && !listed) {
            // Stopped for listening in the wrong place (its failure was
            // counted then, and it removed its own socket), or claimed:
            // the container it served is gone, and its record is its
            // claimant's business. Nothing is the daemon's but the log it
            // opened.
            if c.misplaced {
                tracing::info!(name = %c.name, shape = %shape.label(), %status, "a misplaced warm shim ended");
            } else {
                tracing::info!(name = %c.name, shape = %shape.label(), %status, "a claimed warm shim ended");
            }
            let _ = std::fs::remove_file(pool::log_path(&shape.dir, &c.name));
            return;
        }
        let why = if c.is_ready() {
            format!("exited ({status}) while waiting for a claim")
        } else {
            format!("exited ({status}) before it was ready")
        };
        let delay = shape.backoff.fail(now);
        let log = pool_daemon::log_tail(&shape.dir, &c.name, LOG_TAIL_LINES);
        tracing::warn!(
            name = %c.name,
            shape = %shape.label(),
            %log,
            retry_in_s = delay.as_secs(),
            failures = shape.backoff.failures(),
            "a warm shim {why}"
        );
        shape.last_failure = Some(why);
        // Its socket first, at once: no claimant may take a dead one.
        let _ = std::fs::remove_file(&socket);
        let (dir, name) = (shape.dir.clone(), c.name);
        self.cleanups.spawn_blocking(move || {
            for e in pool_daemon::remove_leftovers(&dir, &name) {
                tracing::warn!(name = %name, error = %e, "cannot remove a failed warm shim's leftovers");
            }
        });
        // Finished clean-ups are dropped here, so the set does not grow.
        while self.cleanups.try_join_next().is_some() {}
    }

    /// Adopted warm shims that died unclaimed leave a dead socket behind:
    /// it goes, with their record. Claimed ones are forgotten.
    fn check_adopted(&mut self) {
        let mut i = 0;
        while i < self.adopted.len() {
            let a = &self.adopted[i];
            let dir = &self.shapes[a.shape].dir;
            let listed = std::fs::symlink_metadata(pool::socket_path(dir, &a.name)).is_ok();
            let alive = a.process.is_none_or(|p| p.is_alive());
            if listed && alive {
                i += 1;
                continue;
            }
            let a = self.adopted.swap_remove(i);
            if !listed || a.process.is_none() {
                continue;
            }
            tracing::warn!(name = %a.name, "an adopted warm shim died while waiting for a claim");
            let dir = self.shapes[a.shape].dir.clone();
            let _ = std::fs::remove_file(pool::socket_path(&dir, &a.name));
            self.cleanups.spawn_blocking(move || {
                for e in pool_daemon::remove_leftovers(&dir, &a.name) {
                    tracing::warn!(name = %a.name, error = %e, "cannot remove a dead warm shim's leftovers");
                }
            });
        }
    }

    /// Starts one warm shim of shape `i`.
    fn spawn(&mut self, i: usize, now: Instant) {
        let name = self.new_name(i);
        let shape = &mut self.shapes[i];
        let log_path = pool::log_path(&shape.dir, &name);
        let log = private_dir::ensure_root(&shape.dir)
            .map_err(anyhow::Error::from)
            .and_then(|()| {
                private_dir::create_no_follow(&log_path)
                    .with_context(|| format!("creating {}", log_path.display()))
            });
        let spawned = log.and_then(|log| {
            let mut cmd = tokio::process::Command::new(&self.shim);
            cmd.arg(pool::WARM_ACTION)
                .env(pool::NAME_ENV, &name)
                .envs(Shape::of(&shape.config).env())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log)
                // Its own process group: a signal to the daemon's group (a
                // terminal's Ctrl-C) must not reach a shim, least of all
                // one serving a container by then.
                .process_group(0)
                // A claimed shim outlives the daemon.
                .kill_on_drop(false);
            match &self.config_file {
                Some(file) => cmd.env(CONFIG_ENV, file),
                None => cmd.env_remove(CONFIG_ENV),
            };
            cmd.spawn()
                .with_context(|| format!("starting {}", self.shim.display()))
        });
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let delay = shape.backoff.fail(now);
                tracing::warn!(shape = %shape.label(), error = %format!("{e:#}"), retry_in_s = delay.as_secs(), "cannot start a warm shim");
                shape.last_failure = Some(format!("{e:#}"));
                let _ = std::fs::remove_file(&log_path);
                return;
            }
        };
        tracing::info!(name = %name, shape = %shape.label(), pid = child.id(), "booting a warm sandbox");
        let ready = Arc::new(AtomicBool::new(false));
        let reader = match child.stdout.take() {
            Some(stdout) => {
                let (flag, tx, name) = (ready.clone(), self.ready_tx.clone(), name.clone());
                tokio::spawn(async move {
                    let mut lines = tokio::io::BufReader::new(stdout).lines();
                    // Read to the end, so the shim never blocks on a full pipe.
                    while let Ok(Some(line)) = lines.next_line().await {
                        if line.trim() == pool::READY_LINE && !flag.swap(true, Ordering::SeqCst) {
                            let _ = tx.send(name.clone());
                        }
                    }
                })
            }
            None => tokio::spawn(async {}),
        };
        self.children.push(WarmChild {
            name,
            shape: i,
            child,
            started: now,
            ready,
            reader,
            exit: None,
            exit_rounds: 0,
            misplaced: false,
        });
    }

    /// A name no file of shape `i` and no child has.
    fn new_name(&self, i: usize) -> String {
        let dir = &self.shapes[i].dir;
        let mut attempt = 0u64;
        loop {
            let millis = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let random = u32::try_from(self.random.hash_one((millis, attempt)) >> 32).unwrap_or(0);
            let name = pool_daemon::sandbox_name(millis, random);
            let taken = self.children.iter().any(|c| c.name == name)
                || [
                    pool::socket_path(dir, &name),
                    pool::record_path(dir, &name),
                    pool::log_path(dir, &name),
                ]
                .iter()
                .any(|p| std::fs::symlink_metadata(p).is_ok());
            if !taken {
                return name;
            }
            attempt += 1;
        }
    }

    /// A child said `ready`: its socket must be in its shape's directory
    /// (or already claimed). One listening elsewhere computed another
    /// shape key than the daemon; no claimant of this shape would ever
    /// find it, so it is stopped and counted as a failure.
    fn on_ready(&mut self, name: &str) {
        let claimed = pool::claimed_dir(&self.config);
        let pool_dir = pool::dir(&self.config);
        let Some(c) = self.children.iter_mut().find(|c| c.name == name) else {
            return;
        };
        let shape = &mut self.shapes[c.shape];
        let socket = pool::socket_path(&shape.dir, name);
        let here = std::fs::symlink_metadata(&socket).is_ok()
            || std::fs::symlink_metadata(pool::socket_path(&claimed, name)).is_ok();
        let elsewhere = if here {
            None
        } else {
            std::fs::read_dir(&pool_dir).ok().and_then(|dirs| {
                dirs.flatten()
                    .map(|d| pool::socket_path(&d.path(), name))
                    .find(|p| std::fs::symlink_metadata(p).is_ok())
            })
        };
        match elsewhere {
            None => {
                shape.backoff.succeed();
                shape.last_failure = None;
                tracing::info!(
                    name = %name,
                    shape = %shape.label(),
                    boot_ms = c.started.elapsed().as_millis(),
                    "a warm sandbox is ready"
                );
            }
            Some(path) => {
                let why = format!(
                    "it listens at {}, not at {}: the shim computed another shape key (another \
                     capsid version or configuration?)",
                    path.display(),
                    socket.display()
                );
                let delay = shape.backoff.fail(Instant::now());
                tracing::error!(
                    name = %name,
                    retry_in_s = delay.as_secs(),
                    "stopping a warm shim: {why}"
                );
                shape.last_failure = Some(why);
                c.misplaced = true;
                if let Some(pid) = c.child.id().and_then(|p| i32::try_from(p).ok()) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                }
            }
        }
    }

    /// What the status socket answers.
    fn status(&self) -> Status {
        Status {
            shapes: self
                .shapes
                .iter()
                .enumerate()
                .map(|(i, s)| ShapeStatus {
                    vcpus: s.config.vcpus,
                    memory_mib: s.config.memory_mib,
                    size: s.config.size,
                    key: s.key.clone(),
                    ready: count(pool::ready(&self.config, &s.key).len()),
                    booting: count(self.booting(i)),
                    last_failure: s.last_failure.clone(),
                })
                .collect(),
        }
    }

    fn answer(&self, mut stream: tokio::net::UnixStream) {
        let line = match serde_json::to_string(&self.status()) {
            Ok(line) => line + "\n",
            Err(e) => {
                tracing::warn!(error = %e, "cannot serialize the status");
                return;
            }
        };
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(STATUS_WRITE_TIMEOUT, stream.write_all(line.as_bytes())).await;
        });
    }

    /// Stops this daemon's unclaimed warm shims: each ready one's socket is
    /// taken first (renamed into the claimed directory, so no claimant
    /// gets a shim that is stopping), then all get SIGTERM. A socket
    /// already gone was claimed: that shim serves a container and keeps
    /// running. Adopted shims are left for the next daemon.
    async fn shutdown(&mut self) {
        let claimed = pool::claimed_dir(&self.config);
        if let Err(e) = private_dir::ensure_root(&claimed) {
            tracing::warn!(error = %e, "cannot prepare the claimed directory");
        }
        let now = Instant::now();
        let mut victims = Vec::new();
        for mut c in std::mem::take(&mut self.children) {
            if c.exit.is_some() || matches!(c.child.try_wait(), Ok(Some(_)) | Err(_)) {
                if c.exit.is_none() {
                    c.exit = Some("ended".into());
                }
                self.finish(c, now);
                continue;
            }
            let dir = self.shapes[c.shape].dir.clone();
            let taken = match take(&dir, &c.name, &claimed) {
                Ok(Some(taken)) => Some(taken),
                Ok(None) => {
                    // No socket: booting, or claimed. A claimed one said
                    // `ready` (or its line is still in the pipe, and its
                    // socket waits in the claimed directory).
                    // One stopped for listening elsewhere is waited for.
                    let claimed_socket = pool::socket_path(&claimed, &c.name);
                    if !c.misplaced
                        && (c.is_ready() || std::fs::symlink_metadata(claimed_socket).is_ok())
                    {
                        tracing::info!(name = %c.name, "left running: claimed");
                        continue;
                    }
                    None
                }
                Err(e) => {
                    tracing::warn!(name = %c.name, error = %e, "cannot take a warm shim's socket; stopping it all the same");
                    None
                }
            };
            c.reader.abort();
            victims.push(Victim {
                name: c.name,
                shape_dir: dir,
                taken,
                handle: Handle::Child(c.child),
            });
        }
        stop_all(victims).await;
        while self.cleanups.join_next().await.is_some() {}
    }
}

/// Renames `name`'s socket from `shape_dir` into `claimed`: `None` when it
/// is not there (claimed by someone else).
fn take(shape_dir: &Path, name: &str, claimed: &Path) -> std::io::Result<Option<PathBuf>> {
    private_dir::ensure_root(claimed).map_err(std::io::Error::other)?;
    let to = pool::socket_path(claimed, name);
    match std::fs::rename(pool::socket_path(shape_dir, name), &to) {
        Ok(()) => Ok(Some(to)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// SIGTERM to each, [`STOP_WAIT`] for them to end, SIGKILL to the rest;
/// then what they left is removed (their record undone: a killed shim did
/// not undo it).
async fn stop_all(mut victims: Vec<Victim>) {
    if victims.is_empty() {
        return;
    }
    for v in &mut victims {
        v.signal(Signal::SIGTERM);
    }
    let deadline = Instant::now() + STOP_WAIT;
    while victims.iter_mut().any(|v| !v.exited()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut killed = false;
    for v in victims.iter_mut() {
        if !v.exited() {
            tracing::warn!(name = %v.name, "a warm shim did not stop within {} s: killing it", STOP_WAIT.as_secs());
            v.signal(Signal::SIGKILL);
            killed = true;
        }
    }
    if killed {
        let deadline = Instant::now() + KILL_WAIT;
        while victims.iter_mut().any(|v| !v.exited()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let cleanup = tokio::task::spawn_blocking(move || {
        for v in victims {
            if let Some(taken) = &v.taken {
                let _ = std::fs::remove_file(taken);
            }
            for e in pool_daemon::remove_leftovers(&v.shape_dir, &v.name) {
                tracing::warn!(name = %v.name, error = %e, "cannot remove a stopped warm shim's leftovers");
            }
        }
    });
    if let Err(e) = cleanup.await {
        tracing::warn!(error = %e, "removing stopped warm shims' leftovers failed");
    }
}

/// Binds the status socket under a staging name and renames it into
/// place, replacing a dead daemon's socket without a moment when a
/// `capsid check` would find none (the lock makes this daemon the only
/// one).
fn bind_status(path: &Path) -> anyhow::Result<UnixListener> {
    let staging = path.with_file_name(format!(
        ".{}.{}",
        pool_daemon::STATUS_SOCKET,
        std::process::id()
    ));
    let _ = std::fs::remove_file(&staging);
    let listener =
        UnixListener::bind(&staging).with_context(|| format!("binding {}", staging.display()))?;
    std::fs::rename(&staging, path)
        .with_context(|| format!("moving the status socket to {}", path.display()))?;
    Ok(listener)
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text).unwrap()
    }

    #[test]
    fn a_pool_with_nothing_to_do_or_too_large_is_refused() {
        let shape = "[[pool.shapes]]\nvcpus = 1\nmemory_mib = 256\nsize = 4\n";
        let e = usable(&config(&format!("[pool]\nenabled = false\n{shape}"))).unwrap_err();
        assert!(e.contains("pool.enabled is false"), "{e}");
        let e = usable(&config("[pool]\nenabled = true\n")).unwrap_err();
        assert!(e.contains("no [[pool.shapes]]"), "{e}");
        let small_host = "[memory]\npretend_host_mib = 256\novercommit_ratio = 2.0\n";
        let e = usable(&config(&format!(
            "{small_host}[pool]\nenabled = true\n{shape}"
        )))
        .unwrap_err();
        assert!(
            e.contains("1024 MiB")
                && e.contains("512 MiB")
                && e.contains("memory.overcommit_ratio"),
            "{e}"
        );
        let host = "[memory]\npretend_host_mib = 512\novercommit_ratio = 2.0\n";
        usable(&config(&format!("{host}[pool]\nenabled = true\n{shape}"))).unwrap();
    }

    #[test]
    fn one_daemon_per_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(pool_daemon::LOCK_FILE);
        let first = lock(&path).unwrap();
        assert!(first.is_some());
        assert!(lock(&path).unwrap().is_none());
        drop(first);
        assert!(lock(&path).unwrap().is_some());
    }
}
