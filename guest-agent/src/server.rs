//! The agent's ttrpc service: translates protocol messages to
//! [`crate::container::Containers`] calls and errors to ttrpc status codes.

use std::sync::Arc;

use async_trait::async_trait;
use capsid_protocol::agent::*;
use capsid_protocol::agent_ttrpc::Agent as AgentService;
use ttrpc::r#async::TtrpcContext;
use ttrpc::{Code, Error as TtrpcError, Result as TtrpcResult, Status};

use crate::container::{ContainerError, Containers, CreateRequest, ErrorKind};
use crate::netconf::NetconfError;

/// The ttrpc service over the guest's containers.
#[derive(Debug, Clone)]
pub struct Service {
    containers: Arc<Containers>,
    boot: crate::BootInfo,
    shutdown: Arc<tokio::sync::Notify>,
}

impl Service {
    /// A service for `containers`; `boot` is reported by Health, and
    /// `shutdown` is notified when the host asks the guest to power off.
    pub fn new(
        containers: Arc<Containers>,
        boot: crate::BootInfo,
        shutdown: Arc<tokio::sync::Notify>,
    ) -> Self {
        Self {
            containers,
            boot,
            shutdown,
        }
    }
}

/// A ttrpc status: `code`, and the error with its sources as the message.
fn rpc_status(code: Code, e: &dyn std::error::Error) -> TtrpcError {
    let mut s = Status::new();
    s.set_code(code);
    s.set_message(crate::describe(e));
    TtrpcError::RpcStatus(s)
}

fn status(e: ContainerError) -> TtrpcError {
    let code = match e.kind() {
        ErrorKind::NotFound => Code::NOT_FOUND,
        ErrorKind::AlreadyExists => Code::ALREADY_EXISTS,
        ErrorKind::Invalid => Code::INVALID_ARGUMENT,
        ErrorKind::FailedPrecondition => Code::FAILED_PRECONDITION,
        ErrorKind::Internal => Code::INTERNAL,
    };
    rpc_status(code, &e)
}

fn netconf_status(e: NetconfError) -> TtrpcError {
    let code = match &e {
        NetconfError::Invalid(_) | NetconfError::Task(_) => Code::INVALID_ARGUMENT,
        NetconfError::NoSuchInterface { .. } => Code::NOT_FOUND,
        NetconfError::Netlink { .. } => Code::INTERNAL,
    };
    rpc_status(code, &e)
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
        r.agent_started_ns = self.boot.agent_started_ns;
        r.kernel_boot_ns = self.boot.kernel_boot_ns;
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
            dns_relay_port: req.dns_relay_port,
            etc_hosts: req.etc_hosts,
            share_tag: req.share_tag,
        };
        let pid = self.containers.create(create).await.map_err(status)?;
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
            .containers
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
        self.containers
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
            .containers
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
        self.containers
            .signal(&req.container_id, &req.exec_id, req.signal, req.all)
            .map_err(status)?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        self.containers
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
        for (pid, exec_id, command) in self.containers.list(&req.container_id).map_err(status)? {
            let mut p = ProcessInfo::new();
            p.pid = pid;
            p.exec_id = exec_id;
            p.command = command;
            r.processes.push(p);
        }
        Ok(r)
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        self.containers.stats(&req.container_id).map_err(status)
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> TtrpcResult<Empty> {
        self.containers
            .update(&req.container_id, &req.oci_resources_json)
            .map_err(status)?;
        Ok(Empty::new())
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: PauseContainerRequest,
    ) -> TtrpcResult<Empty> {
        self.containers
            .pause(&req.container_id, req.paused)
            .await
            .map_err(status)?;
        Ok(Empty::new())
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> TtrpcResult<Empty> {
        arrived("RemoveContainer");
        self.containers
            .remove(&req.container_id)
            .await
            .map_err(status)?;
        Ok(Empty::new())
    }

    async fn add_memory(
        &self,
        _ctx: &TtrpcContext,
        req: AddMemoryRequest,
    ) -> TtrpcResult<AddMemoryResponse> {
        arrived("AddMemory");
        let keep = req.keep_absent_mib.saturating_mul(1 << 20);
        let layout =
            tokio::task::spawn_blocking(move || crate::hotplug::Sysfs::default().add_until(keep))
                .await
                .map_err(|e| rpc_status(Code::INTERNAL, &e))?
                .map_err(|e| rpc_status(Code::INTERNAL, &e))?;
        let mut r = AddMemoryResponse::new();
        r.absent_mib = layout.absent_bytes() >> 20;
        r.block_mib = layout.block_bytes >> 20;
        Ok(r)
    }

    async fn next_event(&self, _ctx: &TtrpcContext, _req: NextEventRequest) -> TtrpcResult<Event> {
        Ok(self.containers.next_event().await)
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        arrived("Shutdown");
        self.containers.kill_everything();
        self.shutdown.notify_one();
        Ok(Empty::new())
    }

    async fn configure_network(
        &self,
        _ctx: &TtrpcContext,
        req: ConfigureNetworkRequest,
    ) -> TtrpcResult<Empty> {
        crate::netconf::configure(&req)
            .await
            .map_err(netconf_status)?;
        Ok(Empty::new())
    }
}
