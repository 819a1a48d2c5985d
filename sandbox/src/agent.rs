//! The host's side of the agent API: waiting for the agent to dial in over
//! hybrid vsock, and typed calls with timeouts.
//!
//! The agent connects to host port [`AGENT_HOST_PORT`] when it is ready,
//! which the VM's vsock device turns into a connection to the Unix socket
//! `<vsock path>_<port>`; that socket is bound before the VM starts, so
//! readiness costs no polling at all.

use std::path::{Path, PathBuf};
use std::time::Duration;

use capsid_protocol::agent::*;
use capsid_protocol::agent_ttrpc::AgentClient as RawClient;
pub use capsid_protocol::AGENT_HOST_PORT;
use tokio::net::UnixListener;

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent did not connect in time.
    #[error("the guest agent did not connect within {0:?}")]
    Timeout(Duration),
    /// Accepting the agent's connection failed.
    #[error("cannot accept the agent connection")]
    Accept(#[source] std::io::Error),
    /// The agent answered with an error.
    #[error("agent: {message}")]
    Rpc {
        /// ttrpc status code name.
        code: String,
        /// The agent's message.
        message: String,
    },
    /// The connection failed.
    #[error("agent connection: {0}")]
    Transport(String),
}

/// Result of agent calls.
pub type Result<T> = std::result::Result<T, AgentError>;

impl AgentError {
    /// The agent's ttrpc status code, when it answered with an error
    /// (`"NOT_FOUND"`, `"INVALID_ARGUMENT"`, ...).
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Rpc { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The agent answered NOT_FOUND: no such container or process (a
    /// removed container's id included).
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(code_name(ttrpc::Code::NOT_FOUND).as_str())
    }

    /// The agent refused the request as malformed (INVALID_ARGUMENT).
    pub fn is_invalid_argument(&self) -> bool {
        self.code() == Some(code_name(ttrpc::Code::INVALID_ARGUMENT).as_str())
    }
}

/// How [`AgentError::Rpc`] names a status code.
fn code_name(code: ttrpc::Code) -> String {
    format!("{code:?}")
}

impl From<ttrpc::Error> for AgentError {
    fn from(e: ttrpc::Error) -> Self {
        match e {
            ttrpc::Error::RpcStatus(s) => AgentError::Rpc {
                code: code_name(s.code()),
                message: s.message().to_string(),
            },
            other => AgentError::Transport(other.to_string()),
        }
    }
}

/// How long a control call may take (process waits and event polls have none).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long RemoveContainer may take.
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Binds the socket the agent will dial (`<vsock>_<AGENT_HOST_PORT>`).
pub fn bind_agent_listener(vsock_path: &Path) -> std::io::Result<UnixListener> {
    let path = PathBuf::from(format!("{}_{AGENT_HOST_PORT}", vsock_path.display()));
    let listener = UnixListener::bind(&path)?;
    // The vsock device (a jailed process) connects to it.
    crate::private_dir::give_to_dir_owner(&path)?;
    Ok(listener)
}

/// A connected agent.
#[derive(Clone)]
pub struct Agent {
    client: RawClient,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").finish_non_exhaustive()
    }
}

fn ctx(timeout: Option<Duration>) -> ttrpc::context::Context {
    match timeout {
        Some(t) => ttrpc::context::with_timeout(i64::try_from(t.as_nanos()).unwrap_or(i64::MAX)),
        None => ttrpc::context::Context::default(),
    }
}

impl Agent {
    /// Waits up to `timeout` for the agent to connect on `listener`.
    pub async fn accept(listener: &UnixListener, timeout: Duration) -> Result<Self> {
        let (stream, _) = tokio::time::timeout(timeout, listener.accept())
            .await
            .map_err(|_| AgentError::Timeout(timeout))?
            .map_err(AgentError::Accept)?;
        let socket = ttrpc::r#async::transport::Socket::new(stream);
        Ok(Self {
            client: RawClient::new(ttrpc::r#async::Client::new(socket)),
        })
    }

    /// Version and boot timing of the agent.
    pub async fn health(&self) -> Result<HealthResponse> {
        Ok(self
            .client
            .health(ctx(Some(CALL_TIMEOUT)), &HealthRequest::new())
            .await?)
    }

    /// Configures the guest's network interfaces and routes.
    pub async fn configure_network(&self, network: &crate::network::GuestNetwork) -> Result<()> {
        self.configure_network_from(network, "").await
    }

    /// [`Agent::configure_network`] for a NIC that booted with `boot_mac`
    /// (empty: the NIC has the interfaces' MACs already).
    pub(crate) async fn configure_network_from(
        &self,
        network: &crate::network::GuestNetwork,
        boot_mac: &str,
    ) -> Result<()> {
        let mut req = crate::network::configure_request(network);
        if let Some(first) = req.interfaces.first_mut() {
            first.boot_mac = boot_mac.to_owned();
        }
        self.client
            .configure_network(ctx(Some(CALL_TIMEOUT)), &req)
            .await?;
        Ok(())
    }

    /// Creates the container (its init is prepared, not started); only
    /// [`crate::container`] builds the request.
    pub(crate) async fn create_container(&self, req: &CreateContainerRequest) -> Result<u32> {
        Ok(self
            .client
            .create_container(ctx(Some(CALL_TIMEOUT)), req)
            .await?
            .pid)
    }

    /// Starts the init (empty exec id) or a prepared exec.
    pub async fn start_process(&self, container_id: &str, exec_id: &str) -> Result<u32> {
        let mut req = StartProcessRequest::new();
        req.container_id = container_id.into();
        req.exec_id = exec_id.into();
        Ok(self
            .client
            .start_process(ctx(Some(CALL_TIMEOUT)), &req)
            .await?
            .pid)
    }

    /// Prepares an extra process in the container; only
    /// [`crate::container`] builds the request.
    pub(crate) async fn exec_process(&self, req: &ExecProcessRequest) -> Result<()> {
        self.client
            .exec_process(ctx(Some(CALL_TIMEOUT)), req)
            .await?;
        Ok(())
    }

    /// Waits (without a timeout) for a process to exit with its output drained.
    pub async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<WaitProcessResponse> {
        let mut req = WaitProcessRequest::new();
        req.container_id = container_id.into();
        req.exec_id = exec_id.into();
        Ok(self.client.wait_process(ctx(None), &req).await?)
    }

    /// Sends `signal` to a process (or all of the container's processes).
    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let mut req = SignalProcessRequest::new();
        req.container_id = container_id.into();
        req.exec_id = exec_id.into();
        req.signal = signal;
        req.all = all;
        self.client
            .signal_process(ctx(Some(CALL_TIMEOUT)), &req)
            .await?;
        Ok(())
    }

    /// Resizes a terminal.
    pub async fn resize_pty(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<()> {
        let mut req = ResizePtyRequest::new();
        req.container_id = container_id.into();
        req.exec_id = exec_id.into();
        req.rows = rows;
        req.columns = columns;
        self.client
            .resize_pty(ctx(Some(CALL_TIMEOUT)), &req)
            .await?;
        Ok(())
    }

    /// The container's processes.
    pub async fn list_processes(&self, container_id: &str) -> Result<Vec<ProcessInfo>> {
        let mut req = ListProcessesRequest::new();
        req.container_id = container_id.into();
        Ok(self
            .client
            .list_processes(ctx(Some(CALL_TIMEOUT)), &req)
            .await?
            .processes)
    }

    /// cgroup and guest memory statistics.
    pub async fn stats(&self, container_id: &str) -> Result<StatsResponse> {
        let mut req = StatsRequest::new();
        req.container_id = container_id.into();
        Ok(self.client.stats(ctx(Some(CALL_TIMEOUT)), &req).await?)
    }

    /// New cgroup limits (OCI `linux.resources` JSON).
    pub async fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<()> {
        let mut req = UpdateContainerRequest::new();
        req.container_id = container_id.into();
        req.oci_resources_json = resources_json;
        self.client
            .update_container(ctx(Some(CALL_TIMEOUT)), &req)
            .await?;
        Ok(())
    }

    /// Freezes or thaws the container.
    pub async fn pause_container(&self, container_id: &str, paused: bool) -> Result<()> {
        let mut req = PauseContainerRequest::new();
        req.container_id = container_id.into();
        req.paused = paused;
        self.client
            .pause_container(ctx(Some(CALL_TIMEOUT)), &req)
            .await?;
        Ok(())
    }

    /// Removes a container while the VM runs on: kills what of it still
    /// runs, takes its rootfs down and forgets it ([`AgentError::is_not_found`]
    /// for an unknown id); only [`crate::container`] calls it.
    pub(crate) async fn remove_container(&self, container_id: &str) -> Result<()> {
        let mut req = RemoveContainerRequest::new();
        req.container_id = container_id.into();
        // The agent waits up to 10 s for the processes to die, then takes
        // the mounts down: more than a plain control call may need.
        self.client
            .remove_container(ctx(Some(REMOVE_TIMEOUT)), &req)
            .await?;
        Ok(())
    }

    /// Has the guest add the RAM its kernel was booted without (`mem=`),
    /// lowest blocks first, until at most `keep_absent_mib` is left out;
    /// returns what is left out then, MiB (crate::hotplug). A guest may
    /// say anything: callers count by differences and bound them.
    pub async fn add_memory(&self, keep_absent_mib: u64) -> Result<u64> {
        let mut req = AddMemoryRequest::new();
        req.keep_absent_mib = keep_absent_mib;
        let r = self
            .client
            .add_memory(ctx(Some(CALL_TIMEOUT)), &req)
            .await?;
        Ok(r.absent_mib)
    }

    /// The next container event (waits for one).
    pub async fn next_event(&self) -> Result<Event> {
        Ok(self
            .client
            .next_event(ctx(None), &NextEventRequest::new())
            .await?)
    }

    /// Asks the guest to kill everything and power off.
    pub async fn shutdown(&self) -> Result<()> {
        self.client
            .shutdown(ctx(Some(Duration::from_secs(5))), &ShutdownRequest::new())
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: ttrpc::Code) -> AgentError {
        let mut s = ttrpc::Status::new();
        s.set_code(code);
        s.set_message("container \"x\" not found".into());
        AgentError::from(ttrpc::Error::RpcStatus(s))
    }

    #[test]
    fn not_found_is_told_apart() {
        let e = status(ttrpc::Code::NOT_FOUND);
        assert!(e.is_not_found());
        assert!(!e.is_invalid_argument());
        assert_eq!(e.code(), Some("NOT_FOUND"));
        assert_eq!(e.to_string(), "agent: container \"x\" not found");
        assert!(status(ttrpc::Code::INVALID_ARGUMENT).is_invalid_argument());
        assert!(!status(ttrpc::Code::INTERNAL).is_not_found());
        assert!(!AgentError::Transport("gone".into()).is_not_found());
    }
}
