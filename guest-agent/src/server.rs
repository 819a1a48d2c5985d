//! The agent's ttrpc service: translates protocol messages to
//! [`crate::container::Agent`] calls and errors to ttrpc status codes.

use std::sync::Arc;

use async_trait::async_trait;
use capsid_protocol::agent::*;
use capsid_protocol::agent_ttrpc::Agent as AgentService;
use ttrpc::r#async::TtrpcContext;
use ttrpc::{Code, Error as TtrpcError, Result as TtrpcResult, Status};

use crate::container::{Agent, ContainerError, CreateRequest};

/// The ttrpc service over the shared agent state.
#[derive(Debug, Clone)]
pub struct Service {
    agent: Arc<Agent>,
    shutdown: Arc<tokio::sync::Notify>,
}

impl Service {
    /// A service for `agent`; `shutdown` is notified when the host asks
    /// the guest to power off.
    pub fn new(agent: Arc<Agent>, shutdown: Arc<tokio::sync::Notify>) -> Self {
        Self { agent, shutdown }
    }
}

fn status(e: ContainerError) -> TtrpcError {
    let code = match &e {
        ContainerError::NotFound(_) => Code::NOT_FOUND,
        ContainerError::AlreadyExists(_) => Code::ALREADY_EXISTS,
        ContainerError::Invalid(_) => Code::INVALID_ARGUMENT,
        ContainerError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
        ContainerError::Internal(_) => Code::INTERNAL,
    };
    let mut s = Status::new();
    s.set_code(code);
    s.set_message(e.to_string());
    TtrpcError::RpcStatus(s)
}

/// Debug-level note of a call's arrival, on the guest's CLOCK_MONOTONIC.
fn arrived(rpc: &'static str) {
    tracing::debug!(rpc, at_ms = crate::monotonic_ns() as f64 / 1e6, "call");
}

#[async_trait]
impl AgentService for Service {
    async fn health(
        &self,
        _ctx: &TtrpcContext,
        _req: HealthRequest,
    ) -> TtrpcResult<HealthResponse> {
        let mut r = HealthResponse::new();
        r.version = env!("CARGO_PKG_VERSION").to_string();
        r.agent_started_ns = self.agent.boot.agent_started_ns;
        r.kernel_boot_ns = self.agent.boot.kernel_boot_ns;
        r.now_ns = crate::monotonic_ns();
        Ok(r)
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> TtrpcResult<CreateContainerResponse> {
        arrived("CreateContainer");
        let create = CreateRequest {
            id: req.container_id,
            spec_json: req.oci_spec_json,
            rootfs: req.rootfs.into_option().unwrap_or_default(),
            stdio: req.stdio.into_option().unwrap_or_default(),
            dns_servers: req.dns_servers,
            dns_search: req.dns_search,
            dns_options: req.dns_options,
        };
        let pid = self.agent.create(create).await.map_err(status)?;
        let mut r = CreateContainerResponse::new();
        r.pid = pid;
        Ok(r)
    }

    async fn start_process(
        &self,
        _ctx: &TtrpcContext,
        req: StartProcessRequest,
    ) -> TtrpcResult<StartProcessResponse> {
        arrived("StartProcess");
        let pid = self
            .agent
            .start(&req.container_id, &req.exec_id)
            .await
            .map_err(status)?;
        let mut r = StartProcessResponse::new();
        r.pid = pid;
        Ok(r)
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> TtrpcResult<ExecProcessResponse> {
        let stdio = req.stdio.into_option().unwrap_or_default();
        self.agent
            .exec(
                &req.container_id,
                &req.exec_id,
                &req.oci_process_json,
                &stdio,
            )
            .map_err(status)?;
        Ok(ExecProcessResponse::new())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> TtrpcResult<WaitProcessResponse> {
        arrived("WaitProcess");
        let exit = self
            .agent
            .wait(&req.container_id, &req.exec_id)
            .await
            .map_err(status)?;
        let mut r = WaitProcessResponse::new();
        r.exit_status = exit.status;
        r.exited_at_unix_ns = exit.at_unix_ns;
        r.oom_killed = exit.oom_killed;
        Ok(r)
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> TtrpcResult<Empty> {
        self.agent
            .signal(&req.container_id, &req.exec_id, req.signal, req.all)
            .map_err(status)?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        self.agent
            .resize(&req.container_id, &req.exec_id, req.rows, req.columns)
            .map_err(status)?;
        Ok(Empty::new())
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        _req: CloseStdinRequest,
    ) -> TtrpcResult<Empty> {
        // stdin is a vsock stream straight into the process: the host
        // half-closing it is the EOF. Nothing to do here.
        Ok(Empty::new())
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: ListProcessesRequest,
    ) -> TtrpcResult<ListProcessesResponse> {
        let mut r = ListProcessesResponse::new();
        for (pid, exec_id, command) in self.agent.list(&req.container_id).map_err(status)? {
            let mut p = ProcessInfo::new();
            p.pid = pid;
            p.exec_id = exec_id;
            p.command = command;
            r.processes.push(p);
        }
        Ok(r)
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        self.agent.stats(&req.container_id).map_err(status)
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> TtrpcResult<Empty> {
        self.agent
            .update(&req.container_id, &req.oci_resources_json)
            .map_err(status)?;
        Ok(Empty::new())
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: PauseContainerRequest,
    ) -> TtrpcResult<Empty> {
        self.agent
            .pause(&req.container_id, req.paused)
            .await
            .map_err(status)?;
        Ok(Empty::new())
    }

    async fn next_event(&self, _ctx: &TtrpcContext, _req: NextEventRequest) -> TtrpcResult<Event> {
        Ok(self.agent.next_event().await)
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        arrived("Shutdown");
        self.agent.kill_everything();
        self.shutdown.notify_one();
        Ok(Empty::new())
    }

    async fn configure_network(
        &self,
        _ctx: &TtrpcContext,
        req: ConfigureNetworkRequest,
    ) -> TtrpcResult<Empty> {
        let plan = crate::netconf::plan(&req).map_err(netconf_status)?;
        tokio::task::spawn_blocking(move || crate::netconf::apply(&plan))
            .await
            .map_err(|e| {
                netconf_status(crate::netconf::NetconfError::Invalid(format!(
                    "network task: {e}"
                )))
            })?
            .map_err(netconf_status)?;
        Ok(Empty::new())
    }
}

fn netconf_status(e: crate::netconf::NetconfError) -> TtrpcError {
    let code = match &e {
        crate::netconf::NetconfError::Invalid(_) => Code::INVALID_ARGUMENT,
        crate::netconf::NetconfError::NoSuchInterface { .. } => Code::NOT_FOUND,
        crate::netconf::NetconfError::Netlink { .. } => Code::INTERNAL,
    };
    let mut s = Status::new();
    s.set_code(code);
    s.set_message(e.to_string());
    TtrpcError::RpcStatus(s)
}
