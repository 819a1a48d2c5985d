//! The shim v2 process contract as containerd 1.6 speaks it:
//!
//! * `start`: spawn the serving daemon (its own process group), wait until
//!   it listens, print its address (`unix:///run/containerd/s/<hash>`) as a
//!   plain line — or, to containerd 2.3 and later, which send
//!   `BootstrapParams`, a `BootstrapResult` ([`crate::options`]) — and exit 0;
//! * serve mode (no action): the Task API on that socket, registered as
//!   `containerd.task.v2.Task` (what containerd 1.6 calls) and
//!   `containerd.task.v3.Task` (newer containerd), events to
//!   `$TTRPC_ADDRESS`, until Shutdown or SIGTERM;
//! * `delete`: [`crate::cleanup`], then a `DeleteResponse` on stdout.
//!
//! containerd-shim's own `run` is not used: it answers `start` with the
//! JSON of the newer bootstrap protocol, which containerd 1.6 would take
//! for the address, and it registers the v3 service name only.

use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use capsid_sandbox::config::CONFIG_ENV;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::Flags;
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim_async::{create_task, Task};
use containerd_shim_protos::ttrpc::r#async::transport::Listener;
use containerd_shim_protos::ttrpc::r#async::Server;
use tokio::signal::unix::{signal, SignalKind};

use crate::cleanup::{self, ADDRESS_FILE};
use crate::events::Events;
use crate::options::{self, OptionsError};
use crate::pod_role::{Role, RoleError};
use crate::shutdown::Shutdown;
use crate::task::TaskService;

/// The service name containerd 1.6 calls.
pub const TASK_SERVICE_V2: &str = "containerd.task.v2.Task";
/// The service name the protos crate generates (containerd 2.x).
pub const TASK_SERVICE_V3: &str = "containerd.task.v3.Task";
/// What the daemon tells `start` once it listens.
const READY: &str = "ready";
/// Exit status containerd records for a task whose shim died.
const KILLED_STATUS: u32 = 128 + 9;

/// Errors of the shim's actions.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// A flag is missing.
    #[error("missing -{0}")]
    MissingFlag(&'static str),
    /// The runtime options are unusable.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// A system call or file operation failed.
    #[error("cannot {what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The task's role in a pod cannot be read from its bundle.
    #[error(transparent)]
    Role(#[from] RoleError),
    /// A pod's container whose pod has no shim running.
    #[error("container {id} belongs to pod sandbox {sandbox_id}, which is not running")]
    NoPod {
        /// The container.
        id: String,
        /// The pod's sandbox id.
        sandbox_id: String,
    },
    /// The daemon did not come up.
    #[error("the shim daemon failed to start: {0}")]
    Daemon(String),
    /// containerd's event service is unreachable.
    #[error("cannot connect to containerd's event service at {address}: {message}")]
    Publisher {
        /// `$TTRPC_ADDRESS`.
        address: String,
        /// What failed.
        message: String,
    },
    /// The DeleteResponse cannot be encoded.
    #[error(
        "cannot encode the delete response for containerd: this is a shim bug, please report it"
    )]
    EncodeResponse(#[source] containerd_shim_protos::protobuf::Error),
    /// The ttrpc server failed to start (it fails only without a listener).
    #[error(
        "cannot start the Task API server on {}: this is a shim bug, please report it",
        socket.display()
    )]
    Server {
        /// The socket the server listens on.
        socket: PathBuf,
        /// What ttrpc said.
        #[source]
        source: containerd_shim_protos::ttrpc::Error,
    },
}

/// Result of the shim's actions.
pub type Result<T> = std::result::Result<T, BootstrapError>;

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BootstrapError {
    let what = what.into();
    move |source| BootstrapError::Io { what, source }
}

fn socket_path(address: &str) -> &Path {
    Path::new(address.strip_prefix("unix://").unwrap_or(address))
}

/// `start`: returns what to print: the address as a plain line, or a
/// `BootstrapResult` for containerd 2.3 and later.
pub fn start(flags: &Flags) -> Result<Vec<u8>> {
    let (address, bootstrap) = start_daemon(flags)?;
    if bootstrap {
        Ok(options::bootstrap_result(&address)?)
    } else {
        Ok(address.into_bytes())
    }
}

/// Starts (or finds) the serving daemon; its address, and whether
/// containerd sent `BootstrapParams`.
fn start_daemon(flags: &Flags) -> Result<(String, bool)> {
    if flags.id.is_empty() {
        return Err(BootstrapError::MissingFlag("id"));
    }
    if flags.namespace.is_empty() {
        return Err(BootstrapError::MissingFlag("namespace"));
    }
    let mut input = Vec::new();
    if !std::io::stdin().is_terminal() {
        std::io::stdin()
            .take(1 << 20)
            .read_to_end(&mut input)
            .map_err(io_err("read the runtime options"))?;
    }
    let given = options::read_start_input(&input, &flags.id, &flags.namespace)?;
    let config_path = given.config_path;
    // containerd runs `start` in the bundle.
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().map_err(io_err("find the bundle"))?
    } else {
        PathBuf::from(&flags.bundle)
    };
    let role = Role::of_bundle(&flags.id, &bundle)?;
    // Every task of a pod is served by the shim of the pod's sandbox.
    let group = role.group(&flags.id);
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, group);
    let socket = socket_path(&address);
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            // A live shim for this task or its pod: reuse it.
            std::fs::write(ADDRESS_FILE, &address).map_err(io_err("write the address file"))?;
            return Ok((address, given.bootstrap));
        }
        std::fs::remove_file(socket)
            .map_err(io_err(format!("remove stale {}", socket.display())))?;
    }
    if let Role::Member { sandbox_id } = &role {
        return Err(BootstrapError::NoPod {
            id: flags.id.clone(),
            sandbox_id: sandbox_id.clone(),
        });
    }

    // A container of its own VM takes a pooled sandbox when one of its
    // shape is ready; otherwise it boots cold, and the log says why.
    if matches!(role, Role::Single)
        && crate::pool_claim::claim(flags, &bundle, config_path.as_deref(), &address)
    {
        std::fs::write(ADDRESS_FILE, &address).map_err(io_err("write the address file"))?;
        return Ok((address, given.bootstrap));
    }

    let exe = std::env::current_exe().map_err(io_err("find the shim binary"))?;
    let mut cmd = Command::new(exe);
    cmd.args(["-namespace", &flags.namespace, "-id", group])
        .args(["-address", &flags.address, "-socket", &address]);
    if !flags.publish_binary.is_empty() {
        cmd.args(["-publish-binary", &flags.publish_binary]);
    }
    if flags.debug {
        cmd.arg("-debug");
    }
    if let Some(path) = &config_path {
        cmd.env(CONFIG_ENV, path);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().map_err(io_err("spawn the shim daemon"))?;
    let mut said = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut said);
    }
    if said.trim() != READY {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
        return Err(BootstrapError::Daemon(format!("{status}: {}", err.trim())));
    }
    std::fs::write(ADDRESS_FILE, &address).map_err(io_err("write the address file"))?;
    tracing::info!(id = %flags.id, %address, pid = child.id(), "shim started");
    Ok((address, given.bootstrap))
}

/// `delete`: cleans up and returns the serialized DeleteResponse.
pub fn delete(flags: &Flags) -> Result<Vec<u8>> {
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().map_err(io_err("find the bundle"))?
    } else {
        PathBuf::from(&flags.bundle)
    };
    tracing::info!(id = %flags.id, bundle = %bundle.display(), "delete");
    cleanup::clean_up(&bundle);
    let response = DeleteResponse {
        pid: 0,
        exit_status: KILLED_STATUS,
        exited_at: MessageField::some(crate::process::timestamp(std::time::SystemTime::now())),
        ..Default::default()
    };
    response
        .write_to_bytes()
        .map_err(BootstrapError::EncodeResponse)
}

/// Serve mode: the Task API until the shim is shut down.
pub async fn serve(flags: &Flags, log: Option<std::fs::File>) -> Result<()> {
    if flags.socket.is_empty() {
        return Err(BootstrapError::MissingFlag("socket"));
    }
    let socket = socket_path(&flags.socket).to_path_buf();
    let listener = bind_task_socket(&socket)?;
    let address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
    let service = TaskService::new(
        flags.namespace.clone(),
        connect_events(&address, &flags.namespace).await?,
        Shutdown::default(),
    );
    let server = start_server(listener, &socket, service).await?;
    announce_ready(log)?;
    tracing::info!(id = %flags.id, socket = %socket.display(), pid = std::process::id(), "serving");
    run_until_shutdown(server, &socket, &flags.id).await
}

/// A warm shim's claim taken ([`crate::warm`]): serves the claimed task's
/// Task API with its pooled sandbox, once the claimant is told it does.
/// On failure the claimant is told why and the sandbox is discarded.
pub async fn serve_claimed(
    claim: capsid_sandbox::pool::Claim,
    mut warm: crate::warm::WarmVm,
    conn: std::os::unix::net::UnixStream,
) -> Result<()> {
    let socket = socket_path(&claim.address).to_path_buf();
    let ready = async {
        // containerd's `delete` undoes it from the bundle after a crash.
        warm.move_record(cleanup::state_path(&claim.bundle))
            .map_err(|e| BootstrapError::Io {
                what: "move the sandbox's record into the bundle".into(),
                source: std::io::Error::other(crate::describe(&e)),
            })?;
        let listener = bind_task_socket(&socket)?;
        // `capsid run` claims without containerd: nobody to tell.
        let events = if claim.ttrpc_address.is_empty() {
            Events::discarded()
        } else {
            connect_events(&claim.ttrpc_address, &claim.namespace).await?
        };
        Ok::<_, BootstrapError>((listener, events))
    }
    .await;
    let (listener, events) = match ready {
        Ok(r) => r,
        Err(e) => {
            let _ = crate::warm::answer(&conn, Some(crate::describe(&e)));
            warm.discard().await;
            return Err(e);
        }
    };
    let service = TaskService::new(claim.namespace.clone(), events, Shutdown::default())
        .with_warm(claim.id.clone(), warm);
    let server = start_server(listener, &socket, service).await?;
    if let Err(e) = crate::warm::answer(&conn, None) {
        // The claimant gave up and boots cold: containerd will not call.
        tracing::warn!(error = %e, "the claimant is gone");
        let _ = std::fs::remove_file(&socket);
        return Err(io_err("answer the claim")(e));
    }
    drop(conn);
    if let Some(owner) = claim.owner_pid {
        watch_owner(owner, server.shutdown.clone());
    }
    // From here on the log is containerd's, as a shim's started for the
    // task would be.
    if let Some(fifo) = crate::logging::open_fifo(&claim.bundle) {
        let _ = nix::unistd::dup2_stderr(&fifo);
    }
    tracing::info!(id = %claim.id, socket = %socket.display(), pid = std::process::id(), "serving with a pooled sandbox");
    run_until_shutdown(server, &socket, &claim.id).await
}

/// Shuts this shim down (its task and VM undone) once process `owner`,
/// the client that claimed it without containerd, has ended: nobody else
/// would ever delete the task.
fn watch_owner(owner: u32, shutdown: Shutdown) {
    tokio::spawn(async move {
        match capsid_sandbox::process::ended(owner).await {
            Ok(()) => tracing::info!(owner, "the claimant ended: the task goes with it"),
            Err(e) => {
                tracing::warn!(owner, error = %e, "cannot watch the claimant: the task goes now")
            }
        }
        shutdown.signal();
    });
}

fn bind_task_socket(socket: &Path) -> Result<Listener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
    }
    let listener =
        UnixListener::bind(socket).map_err(io_err(format!("listen on {}", socket.display())))?;
    Listener::try_from(listener).map_err(io_err(format!("listen on {}", socket.display())))
}

async fn connect_events(address: &str, namespace: &str) -> Result<Events> {
    let publisher = RemotePublisher::new(address)
        .await
        .map_err(|e| BootstrapError::Publisher {
            address: address.to_string(),
            message: e.to_string(),
        })?;
    Ok(Events::forward_to(publisher, namespace.to_string()))
}

/// A started ttrpc server for `service`, and the service.
struct Serving {
    server: Server,
    service: Arc<TaskService>,
    shutdown: Shutdown,
}

async fn start_server(listener: Listener, socket: &Path, service: TaskService) -> Result<Serving> {
    let shutdown = service.shutdown_handle();
    let service = Arc::new(service);
    let task: Arc<dyn Task + Send + Sync> = service.clone();
    let mut services = create_task(task.clone());
    if let Some(v3) = create_task(task).remove(TASK_SERVICE_V3) {
        services.insert(TASK_SERVICE_V2.to_string(), v3);
    }
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(services);
    server
        .start()
        .await
        .map_err(|source| BootstrapError::Server {
            socket: socket.to_path_buf(),
            source,
        })?;
    Ok(Serving {
        server,
        service,
        shutdown,
    })
}

async fn run_until_shutdown(serving: Serving, socket: &Path, id: &str) -> Result<()> {
    let Serving {
        mut server,
        service,
        shutdown,
    } = serving;
    let mut term = signal(SignalKind::terminate()).map_err(io_err("handle SIGTERM"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io_err("handle SIGINT"))?;
    tokio::select! {
        _ = shutdown.wait() => {}
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    service.destroy_all().await;
    let _ = server.shutdown().await;
    let _ = std::fs::remove_file(socket);
    tracing::info!(%id, "shim exiting");
    Ok(())
}

/// Points stdout at /dev/null (nothing more is written to the pipe of
/// whoever started this process).
pub fn stdout_to_null() -> std::io::Result<()> {
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    nix::unistd::dup2_stdout(&null)?;
    Ok(())
}

/// Tells `start` the daemon listens (it reads stdout to its end), and
/// points stderr at the log so that nothing is written to a closed pipe.
fn announce_ready(log: Option<std::fs::File>) -> Result<()> {
    let mut out = std::io::stdout();
    writeln!(out, "{READY}")
        .and_then(|_| out.flush())
        .map_err(io_err("tell start the shim is ready"))?;
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .map_err(io_err("open /dev/null"))?;
    nix::unistd::dup2_stdout(&null).map_err(|e| io_err("close stdout")(e.into()))?;
    let err_sink = log.unwrap_or(null);
    nix::unistd::dup2_stderr(&err_sink).map_err(|e| io_err("redirect stderr")(e.into()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unix_paths() {
        assert_eq!(
            socket_path("unix:///run/containerd/s/abc"),
            Path::new("/run/containerd/s/abc")
        );
        assert_eq!(socket_path("/x/y"), Path::new("/x/y"));
    }

    #[test]
    fn start_needs_an_id() {
        let flags = Flags::default();
        assert!(matches!(
            start(&flags),
            Err(BootstrapError::MissingFlag("id"))
        ));
    }

    #[test]
    fn delete_answers_with_a_killed_status() {
        let dir = tempfile::tempdir().unwrap();
        let flags = Flags {
            bundle: dir.path().display().to_string(),
            id: "t1".into(),
            ..Default::default()
        };
        let bytes = delete(&flags).unwrap();
        let resp = DeleteResponse::parse_from_bytes(&bytes).unwrap();
        assert_eq!(resp.exit_status, 137);
        assert!(resp.exited_at.is_some());
    }
}
