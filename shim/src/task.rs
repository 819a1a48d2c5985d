//! containerd's Task API (`containerd.task.v2.Task`) over the shim's
//! containers: translates requests and errors, publishes the task events.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use containerd_shim_protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest,
    PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest,
    WaitRequest, WaitResponse,
};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskIO, TaskPaused, TaskResumed,
    TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{MessageField, MessageFull};
use containerd_shim_protos::shim::oci::ProcessDetails;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self, Code};
use containerd_shim_protos::types::task::{ProcessInfo, Status as TaskStatus};

use crate::container::{Container, ContainerError, CreateRequest};
use crate::events::Events;
use crate::io::StdioPaths;
use crate::pod::Pod;
use crate::pod_role::Role;
use crate::process::{ExitInfo, Status};
use crate::shutdown::Shutdown;
use crate::{metrics, options};

/// The Task service of one shim.
#[derive(Debug)]
pub struct TaskService {
    namespace: String,
    events: Events,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    creating: Mutex<Vec<String>>,
    shutdown: Shutdown,
    /// A pooled sandbox this shim was claimed with, for the Create of the
    /// task it was claimed for ([`crate::warm`]); taken once.
    warm: tokio::sync::Mutex<Option<(String, crate::warm::WarmVm)>>,
}

fn status(code: Code, message: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

fn to_ttrpc(e: ContainerError) -> ttrpc::Error {
    let code = match &e {
        ContainerError::NotFound(_) => Code::NOT_FOUND,
        ContainerError::AlreadyExists(_) => Code::ALREADY_EXISTS,
        ContainerError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
        ContainerError::Invalid(_)
        | ContainerError::SpecParse(_)
        | ContainerError::Spec(_)
        | ContainerError::Volume(_)
        | ContainerError::Sizing(_)
        | ContainerError::BadNetns(_)
        | ContainerError::Io(_) => Code::INVALID_ARGUMENT,
        _ => Code::UNKNOWN,
    };
    status(code, crate::describe(&e))
}

fn not_found(id: &str) -> ttrpc::Error {
    status(Code::NOT_FOUND, format!("container {id} not found"))
}

fn exit_fields(
    exit: Option<ExitInfo>,
) -> (
    u32,
    MessageField<containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp>,
) {
    match exit {
        Some(info) => (info.status, MessageField::some(info.timestamp())),
        None => (0, MessageField::none()),
    }
}

impl TaskService {
    /// A service for `namespace` publishing to `events`; `shutdown` is
    /// signalled when the shim should exit.
    pub fn new(namespace: String, events: Events, shutdown: Shutdown) -> Self {
        Self {
            namespace,
            events,
            containers: Mutex::new(HashMap::new()),
            creating: Mutex::new(Vec::new()),
            shutdown,
            warm: tokio::sync::Mutex::new(None),
        }
    }

    /// What ends the shim's serving.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// A service claimed with a pooled sandbox for task `id`.
    pub fn with_warm(self, id: String, warm: crate::warm::WarmVm) -> Self {
        Self {
            warm: tokio::sync::Mutex::new(Some((id, warm))),
            ..self
        }
    }

    /// The pooled sandbox, if it is task `id`'s and still unused.
    async fn take_warm(&self, id: &str) -> Option<crate::warm::WarmVm> {
        let mut warm = self.warm.lock().await;
        match warm.take() {
            Some((for_id, vm)) if for_id == id => Some(vm),
            other => {
                *warm = other;
                None
            }
        }
    }

    fn container(&self, id: &str) -> ttrpc::Result<Arc<Container>> {
        self.containers
            .lock()
            .ok()
            .and_then(|c| c.get(id).cloned())
            .ok_or_else(|| not_found(id))
    }

    /// Stops every sandbox (the shim is ending).
    pub async fn destroy_all(&self) {
        // A pooled sandbox whose task was never created goes too.
        let unused = self.warm.lock().await.take();
        if let Some((_, warm)) = unused {
            warm.discard().await;
        }
        let all: Vec<Arc<Container>> = self
            .containers
            .lock()
            .map(|mut c| c.drain().map(|(_, c)| c).collect())
            .unwrap_or_default();
        for c in all {
            if let Err(e) = c.destroy(true).await {
                tracing::warn!(container = %c.id, error = %crate::describe(&e), "cleanup failed");
            }
        }
    }

    /// The pod whose sandbox task is `sandbox_id`, if this shim runs it.
    fn pod(&self, sandbox_id: &str) -> Option<Arc<Pod>> {
        self.containers
            .lock()
            .ok()
            .and_then(|c| c.get(sandbox_id).and_then(|c| c.pod()))
    }

    fn reserve(&self, id: &str) -> ttrpc::Result<()> {
        let exists = self
            .containers
            .lock()
            .map(|c| c.contains_key(id))
            .unwrap_or(false);
        let mut creating = self
            .creating
            .lock()
            .map_err(|_| status(Code::INTERNAL, "lock poisoned".into()))?;
        if exists || creating.iter().any(|c| c == id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {id} already exists"),
            ));
        }
        creating.push(id.to_string());
        Ok(())
    }

    fn unreserve(&self, id: &str) {
        if let Ok(mut creating) = self.creating.lock() {
            creating.retain(|c| c != id);
        }
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        tracing::info!(container = %req.id, bundle = %req.bundle, "create");
        if !req.checkpoint.is_empty() {
            return Err(status(
                Code::UNIMPLEMENTED,
                "capsid cannot restore checkpoints".into(),
            ));
        }
        let config = options::load_config(None)
            .map_err(|e| status(Code::FAILED_PRECONDITION, crate::describe(&e)))?;
        self.reserve(&req.id)?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let create = CreateRequest {
            id: req.id.clone(),
            namespace: self.namespace.clone(),
            bundle: PathBuf::from(&req.bundle),
            rootfs: req.rootfs.clone(),
            stdio: stdio.clone(),
        };
        // A pod's container goes in its pod's VM, run by this shim.
        let pod = match Role::of_bundle(&req.id, &create.bundle) {
            Ok(Role::Member { sandbox_id }) => self.pod(&sandbox_id),
            _ => None,
        };
        let warm = self.take_warm(&req.id).await;
        let created = Container::create(create, config, self.events.clone(), pod, warm).await;
        self.unreserve(&req.id);
        let container = created.map_err(|e| {
            tracing::error!(container = %req.id, error = %crate::describe(&e), "create failed");
            to_ttrpc(e)
        })?;
        let pid = container.init.pid();
        if let Ok(mut c) = self.containers.lock() {
            c.insert(req.id.clone(), container);
        }
        self.events.publish(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs,
            io: MessageField::some(TaskIO {
                stdin: stdio.stdin,
                stdout: stdio.stdout,
                stderr: stdio.stderr,
                terminal: stdio.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint,
            pid,
            ..Default::default()
        });
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        let c = self.container(&req.id)?;
        let pid = c.start(&req.exec_id).await.map_err(to_ttrpc)?;
        if req.exec_id.is_empty() {
            self.events.publish(TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            });
        } else {
            self.events.publish(TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            });
        }
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id).map_err(to_ttrpc)?;
        let status = match p.status() {
            Status::Created => TaskStatus::CREATED,
            Status::Running if c.paused() => TaskStatus::PAUSED,
            Status::Running => TaskStatus::RUNNING,
            Status::Stopped => TaskStatus::STOPPED,
        };
        let (exit_status, exited_at) = exit_fields(p.exited());
        Ok(StateResponse {
            id: if req.exec_id.is_empty() {
                req.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle: c.bundle.display().to_string(),
            pid: p.pid(),
            status: status.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status,
            exited_at,
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> ttrpc::Result<DeleteResponse> {
        let c = self.container(&req.id)?;
        if !req.exec_id.is_empty() {
            let p = c.delete_exec(&req.exec_id).map_err(to_ttrpc)?;
            let (exit_status, exited_at) = exit_fields(p.exited());
            return Ok(DeleteResponse {
                pid: p.pid(),
                exit_status,
                exited_at,
                ..Default::default()
            });
        }
        c.destroy(false).await.map_err(to_ttrpc)?;
        if let Ok(mut all) = self.containers.lock() {
            all.remove(&req.id);
        }
        let (exit_status, exited_at) = exit_fields(c.init.exited());
        self.events.publish(TaskDelete {
            container_id: req.id.clone(),
            pid: c.init.pid(),
            exit_status,
            exited_at: exited_at.clone(),
            id: req.id.clone(),
            ..Default::default()
        });
        tracing::info!(container = %req.id, "deleted");
        Ok(DeleteResponse {
            pid: c.init.pid(),
            exit_status,
            exited_at,
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        let c = self.container(&req.id)?;
        let mut processes = Vec::new();
        for (pid, exec_id) in c.pids().map_err(to_ttrpc)? {
            let info = if exec_id.is_empty() {
                MessageField::none()
            } else {
                let details = ProcessDetails {
                    exec_id,
                    ..Default::default()
                };
                MessageField::some(Any {
                    type_url: ProcessDetails::descriptor().full_name().to_string(),
                    value: containerd_shim_protos::protobuf::Message::write_to_bytes(&details)
                        .map_err(|e| status(Code::INTERNAL, e.to_string()))?,
                    ..Default::default()
                })
            };
            processes.push(ProcessInfo {
                pid,
                info,
                ..Default::default()
            });
        }
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        let c = self.container(&req.id)?;
        c.pause(true).await.map_err(to_ttrpc)?;
        self.events.publish(TaskPaused {
            container_id: req.id,
            ..Default::default()
        });
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        let c = self.container(&req.id)?;
        c.pause(false).await.map_err(to_ttrpc)?;
        self.events.publish(TaskResumed {
            container_id: req.id,
            ..Default::default()
        });
        Ok(Empty::new())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        let c = self.container(&req.id)?;
        tracing::info!(container = %req.id, exec = %req.exec_id, signal = req.signal, all = req.all, "kill");
        c.kill(&req.exec_id, req.signal, req.all)
            .await
            .map_err(to_ttrpc)?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        let c = self.container(&req.id)?;
        let spec =
            req.spec.as_ref().map(|a| a.value.clone()).ok_or_else(|| {
                status(Code::INVALID_ARGUMENT, "exec without a process spec".into())
            })?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        c.exec(&req.exec_id, &spec, stdio).await.map_err(to_ttrpc)?;
        self.events.publish(TaskExecAdded {
            container_id: req.id,
            exec_id: req.exec_id,
            ..Default::default()
        });
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        let c = self.container(&req.id)?;
        c.resize(&req.exec_id, req.width, req.height)
            .await
            .map_err(to_ttrpc)?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        let c = self.container(&req.id)?;
        if req.stdin {
            c.close_stdin(&req.exec_id).map_err(to_ttrpc)?;
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        let c = self.container(&req.id)?;
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        let resources = if resources.is_empty() {
            b"{}".to_vec()
        } else {
            resources
        };
        c.update(&resources, &req.annotations)
            .await
            .map_err(to_ttrpc)?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id).map_err(to_ttrpc)?;
        let info = p.wait().await;
        Ok(WaitResponse {
            exit_status: info.status,
            exited_at: MessageField::some(info.timestamp()),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        let c = self.container(&req.id)?;
        let stats = c.stats().await.map_err(to_ttrpc)?;
        let any = metrics::to_any(&metrics::from_agent(&stats))
            .map_err(|e| status(Code::INTERNAL, crate::describe(&e)))?;
        Ok(StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> ttrpc::Result<ConnectResponse> {
        let task_pid = self.container(&req.id).map(|c| c.init.pid()).unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> ttrpc::Result<Empty> {
        let empty = self.containers.lock().map(|c| c.is_empty()).unwrap_or(true)
            && self.creating.lock().map(|c| c.is_empty()).unwrap_or(true);
        if !empty && !req.now {
            return Ok(Empty::new());
        }
        tracing::info!(now = req.now, "shutdown");
        self.destroy_all().await;
        self.shutdown.signal();
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_errors_map_to_grpc_codes() {
        let code = |e: ContainerError| match to_ttrpc(e) {
            ttrpc::Error::RpcStatus(s) => s.code(),
            other => panic!("{other:?}"),
        };
        assert_eq!(code(ContainerError::NotFound("x".into())), Code::NOT_FOUND);
        assert_eq!(
            code(ContainerError::FailedPrecondition("x".into())),
            Code::FAILED_PRECONDITION
        );
        assert_eq!(
            code(ContainerError::Invalid("x".into())),
            Code::INVALID_ARGUMENT
        );
        assert_eq!(code(ContainerError::Internal("x".into())), Code::UNKNOWN);
    }

    #[tokio::test]
    async fn shutdown_with_no_containers_ends_the_shim() {
        let (events, _rx) = Events::channel();
        let shutdown = Shutdown::default();
        let svc = TaskService::new("default".into(), events, shutdown.clone());
        let ctx_free = svc.containers.lock().unwrap().is_empty();
        assert!(ctx_free);
        svc.destroy_all().await;
        shutdown.signal();
        tokio::time::timeout(std::time::Duration::from_secs(1), shutdown.wait())
            .await
            .unwrap();
        assert!(svc.container("nope").is_err());
    }
}
