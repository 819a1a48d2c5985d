//! A warm shim ([`capsid_sandbox::pool`]): `capsid-poold` runs the shim
//! with the action `warm`; it boots a sandbox of one shape with nothing
//! of any container in it (a NIC on a tap in a network namespace of its
//! own, a live virtio-fs share, no disk), listens in its shape's pool
//! directory, and waits for one claim. The claimant (a shim's `start` for
//! a container of that shape, [`crate::bootstrap`]) hands it the task's
//! identity and containerd's addresses; from then on this process is that
//! task's shim, and its first Create puts the container in the VM
//! ([`crate::create::make_warm`]). It is never offered again.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use capsid_sandbox::config::Config;
use capsid_sandbox::pool::{self, Claim, ClaimAnswer, Shape};
use capsid_sandbox::record::{self, HostRecord, RecordFile, Rollback};
use capsid_sandbox::sandbox::{backend_for, Sandbox, SandboxOptions};
use capsid_sandbox::volumes::{self, Share};
use tokio::signal::unix::{signal, SignalKind};

use crate::container::{ContainerError, Result};
use crate::create::LateNetwork;

/// How long a claimant may take to send its claim once connected.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest claim read.
const MAX_CLAIM: u64 = 64 << 10;
/// How long a sandbox taken from the pool (its socket renamed away) may
/// wait for its claimant to connect: a claimant that died between the
/// rename and the connect must not leave a VM waiting for good.
const TAKEN_GRACE: Duration = Duration::from_secs(30);

/// A booted sandbox waiting for its container.
#[derive(Debug)]
pub struct WarmVm {
    /// The sandbox's name (its run directory's).
    pub name: String,
    /// Its shape.
    pub shape: Shape,
    sandbox: Sandbox,
    late: LateNetwork,
    share_dir: PathBuf,
    record: RecordFile<HostRecord>,
}

/// What a warm sandbox is made of, for [`crate::create::make_warm`].
#[derive(Debug)]
pub struct WarmParts {
    /// The running VM.
    pub sandbox: Sandbox,
    /// Its NIC's tap, in the sandbox's own network namespace.
    pub late: LateNetwork,
    /// Its live share.
    pub share_dir: PathBuf,
    /// Its record, in the task's bundle once claimed.
    pub record: RecordFile<HostRecord>,
}

impl WarmVm {
    /// Boots a sandbox named `name` of `shape`, recorded at `record_path`;
    /// on error nothing of it is left.
    pub async fn boot(
        config: &Config,
        name: &str,
        shape: Shape,
        record_path: PathBuf,
    ) -> Result<Self> {
        capsid_sandbox::private_dir::ensure_root(&config.paths.state_dir)?;
        let mut rollback = Rollback::begin(
            record_path,
            HostRecord::new(name, config.paths.state_dir.join(name)),
        )?;
        let late = crate::create::own_netns(config, name, &mut rollback).await?;
        let share_dir = volumes::share_dir(&config.paths.state_dir, name);
        rollback.update(|r| r.share = Some(share_dir.clone()))?;
        let share = Share::prepare_live(&share_dir, &[], &[])?;
        let opts = SandboxOptions {
            id: name.to_string(),
            vcpus: shape.vcpus,
            memory_mib: shape.max_memory_mib,
            disks: Vec::new(),
            net: Some(capsid_sandbox::backend::NetSpec {
                tap: late.tap.clone(),
                mac: late.boot_mac.clone(),
                netns: Some(late.netns.clone()),
            }),
            kernel_args: Vec::new(),
            network: None,
            balloon_opt_out: false,
            share_dir: Some(share_dir.clone()),
            cgroup: None,
        };
        // Booted with the most a taker may need; while it waits the
        // balloon holds all but the pool's size.
        let reserve_mib = shape.max_memory_mib - shape.memory_mib;
        let sandbox =
            Sandbox::start_reserved(config, backend_for(config)?, opts, reserve_mib).await?;
        rollback.update(|r| r.set_vm_processes(&sandbox.pids()))?;
        let t = sandbox.timings;
        tracing::info!(
            sandbox = name,
            vcpus = shape.vcpus,
            memory_mib = shape.memory_mib,
            vm_memory_mib = shape.max_memory_mib,
            agent_connected_ms = t.agent_connected.as_millis(),
            "warm sandbox booted"
        );
        let record = rollback
            .commit()
            .ok_or_else(|| ContainerError::Internal("the sandbox record is gone".into()))?;
        share.keep();
        Ok(Self {
            name: name.to_string(),
            shape,
            sandbox,
            late,
            share_dir,
            record,
        })
    }

    /// Moves the record to `path` (the claimed task's bundle, where
    /// containerd's `delete` finds it after a crash): written there first,
    /// then removed from the pool.
    pub fn move_record(&mut self, path: PathBuf) -> Result<()> {
        let moved = RecordFile::create(path, self.record.record().clone())?;
        RecordFile::<HostRecord>::remove(self.record.path())?;
        self.record = moved;
        Ok(())
    }

    /// Resolves when the VM ends by itself.
    pub async fn exited(&self) -> capsid_sandbox::backend::VmExit {
        self.sandbox.exited().await
    }

    /// Its parts, for the container that takes it.
    pub fn into_parts(self) -> WarmParts {
        WarmParts {
            sandbox: self.sandbox,
            late: self.late,
            share_dir: self.share_dir,
            record: self.record,
        }
    }

    /// Stops the VM and undoes everything it made (a sandbox nobody took,
    /// or one whose claim failed).
    pub async fn discard(self) {
        let exit = self.sandbox.stop().await;
        tracing::info!(sandbox = %self.name, ?exit, "warm sandbox discarded");
        drop(self.sandbox);
        let file = self.record;
        let host = file.record().clone();
        let undone = tokio::task::spawn_blocking(move || record::undo(&host)).await;
        match undone {
            Ok(report) if report.errors.is_empty() => {
                if let Err(e) = RecordFile::<HostRecord>::remove(file.path()) {
                    tracing::warn!(error = %e, "cannot remove the warm sandbox's record");
                }
            }
            Ok(report) => {
                tracing::warn!(errors = ?report.errors, "the warm sandbox was not wholly undone; its record stays");
            }
            Err(e) => tracing::warn!(error = %e, "warm sandbox teardown task"),
        }
    }
}

/// The warm action: boot, wait for the claim, then serve the claimed task
/// ([`crate::bootstrap::serve_claimed`]) until the shim is shut down.
pub async fn run() -> anyhow::Result<()> {
    use anyhow::Context;
    let name = std::env::var(pool::NAME_ENV).context("no sandbox name ($CAPSID_POOL_NAME)")?;
    check_name(&name)?;
    let shape = Shape::from_env().map_err(anyhow::Error::msg)?;
    let config = crate::options::load_config(None).context("configuration")?;
    let config_file = pool::config_file(None);
    let key = pool::shape_key(&config, config_file.as_deref(), config.backend.kind, shape);
    let shape_dir = pool::shape_dir(&config, &key);
    capsid_sandbox::private_dir::ensure_root(&shape_dir)
        .with_context(|| format!("pool directory {}", shape_dir.display()))?;
    let socket = pool::socket_path(&shape_dir, &name);

    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let warm = tokio::select! {
        warm = WarmVm::boot(&config, &name, shape, pool::record_path(&shape_dir, &name)) => {
            warm.map_err(|e| anyhow::anyhow!(crate::describe(&e)))?
        }
        _ = term.recv() => anyhow::bail!("SIGTERM while booting"),
        _ = int.recv() => anyhow::bail!("SIGINT while booting"),
    };
    let listener = match listen(&socket) {
        Ok(l) => l,
        Err(e) => {
            warm.discard().await;
            return Err(e).context(format!("listen on {}", socket.display()));
        }
    };
    {
        let mut out = std::io::stdout();
        let told = writeln!(out, "{}", pool::READY_LINE).and_then(|()| out.flush());
        // Nothing more goes to the daemon's pipe.
        let told = told.and_then(|()| crate::bootstrap::stdout_to_null());
        if let Err(e) = told {
            drop(listener);
            let _ = std::fs::remove_file(&socket);
            warm.discard().await;
            return Err(e).context("tell the pool daemon it is ready");
        }
    }
    tracing::info!(sandbox = %name, socket = %socket.display(), "warm sandbox waits for its claim");
    let listener = tokio::net::UnixListener::from_std(listener).context("listener")?;
    let conn = tokio::select! {
        conn = listener.accept() => conn.map(|(c, _)| c),
        exit = warm.exited() => {
            let _ = std::fs::remove_file(&socket);
            warm.discard().await;
            anyhow::bail!("the VM ended while waiting for a claim: {exit:?}");
        }
        _ = term.recv() => {
            tracing::info!("SIGTERM: the unclaimed sandbox is discarded");
            let _ = std::fs::remove_file(&socket);
            remove_claimed(&config, &name);
            warm.discard().await;
            return Ok(());
        }
        _ = int.recv() => {
            let _ = std::fs::remove_file(&socket);
            remove_claimed(&config, &name);
            warm.discard().await;
            return Ok(());
        }
        () = taken_but_never_claimed(&socket) => {
            remove_claimed(&config, &name);
            warm.discard().await;
            anyhow::bail!("taken from the pool but never claimed within {TAKEN_GRACE:?}: discarded");
        }
    };
    // Taken once: nobody else may connect, whoever this is.
    drop(listener);
    let _ = std::fs::remove_file(&socket);
    remove_claimed(&config, &name);
    let conn = match conn {
        Ok(c) => c.into_std().context("claim connection")?,
        Err(e) => {
            warm.discard().await;
            return Err(e).context("accept the claim");
        }
    };
    let claim = match read_claim(&conn) {
        Ok(claim) => claim,
        Err(e) => {
            let _ = answer(&conn, Some(format!("bad claim: {e:#}")));
            warm.discard().await;
            return Err(e);
        }
    };
    tracing::info!(sandbox = %name, container = %claim.id, namespace = %claim.namespace, "claimed");
    crate::bootstrap::serve_claimed(claim, warm, conn).await?;
    Ok(())
}

/// Listens at `socket`, bound under a hidden name and renamed into place
/// once it listens: a claimant never finds a socket that refuses it.
fn listen(socket: &Path) -> std::io::Result<UnixListener> {
    let name = socket
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = socket.with_file_name(format!(".{name}"));
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging)?;
    listener.set_nonblocking(true)?;
    std::fs::rename(&staging, socket)?;
    Ok(listener)
}

/// Resolves [`TAKEN_GRACE`] after the socket left the pool's directory
/// (a claimant renamed it), if no connection came meanwhile (the caller
/// stops polling then).
async fn taken_but_never_claimed(socket: &Path) {
    while socket.exists() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(TAKEN_GRACE).await;
}

/// Removes this shim's socket from the claimed directory (the claimant
/// connected through it).
fn remove_claimed(config: &Config, name: &str) {
    let path = pool::socket_path(&pool::claimed_dir(config), name);
    if let Err(e) = std::fs::remove_file(&path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the claimed socket");
        }
    }
}

/// Reads the claim: one JSON line.
fn read_claim(conn: &UnixStream) -> anyhow::Result<Claim> {
    use anyhow::Context;
    use std::io::Read;
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(CLAIM_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(conn.take(MAX_CLAIM))
        .read_line(&mut line)
        .context("read the claim")?;
    let claim: Claim = serde_json::from_str(line.trim()).context("parse the claim")?;
    if claim.id.is_empty() || claim.namespace.is_empty() || claim.address.is_empty() {
        anyhow::bail!("the claim names no task, namespace or address");
    }
    Ok(claim)
}

/// Answers the claimant: `None` when this shim serves its task.
pub fn answer(mut conn: &UnixStream, error: Option<String>) -> std::io::Result<()> {
    let mut text = serde_json::to_string(&ClaimAnswer { error }).map_err(std::io::Error::other)?;
    text.push('\n');
    conn.write_all(text.as_bytes())
}

/// The name becomes a run directory, a network namespace and socket
/// names: short and plain.
fn check_name(name: &str) -> anyhow::Result<()> {
    let plain = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if name.is_empty() || name.len() > 32 || !plain || name.starts_with('-') {
        anyhow::bail!("{name:?} is not a usable sandbox name (1 to 32 of [A-Za-z0-9_-])");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_and_short() {
        assert!(check_name("19b2c3d4e5f-0a1b2c3d").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("../x").is_err());
        assert!(check_name("-x").is_err());
        assert!(check_name(&"a".repeat(33)).is_err());
    }

    #[test]
    fn claims_are_one_json_line() {
        let (a, b) = UnixStream::pair().unwrap();
        let claim = Claim {
            namespace: "default".into(),
            id: "c1".into(),
            bundle: "/b".into(),
            address: "unix:///run/x".into(),
            ttrpc_address: "/run/containerd/containerd.sock.ttrpc".into(),
            containerd_address: "/run/containerd/containerd.sock".into(),
            debug: false,
            owner_pid: None,
        };
        let mut text = serde_json::to_string(&claim).unwrap();
        text.push('\n');
        (&a).write_all(text.as_bytes()).unwrap();
        assert_eq!(read_claim(&b).unwrap(), claim);
        (&a).write_all(b"{\"namespace\":\"\"}\n").unwrap();
        assert!(read_claim(&b).is_err());
        drop(a);
        assert!(read_claim(&b).is_err(), "nothing sent");
    }
}
