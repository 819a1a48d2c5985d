//! Containers in a sandbox: the one path from an OCI spec and a rootfs disk
//! to a process with its streams. The shim, `capsid run`, `capsid bench` and
//! the test harness all create containers and exec processes through here;
//! nothing else builds the agent's container requests.

use std::path::Path;
use std::time::Duration;

use capsid_protocol::agent::{BlockLayer, CreateContainerRequest, ExecProcessRequest, Rootfs};
use oci_spec::runtime::Spec;

use crate::agent::AgentError;
use crate::backend::{DiskSpec, VmExit};
use crate::network::GuestDns;
use crate::sandbox::Sandbox;
use crate::stdio::{PendingStreams, Streams, StreamsWanted};

/// The serial of a sandbox's first rootfs disk, as the guest finds it.
pub const ROOTFS_SERIAL: &str = "capsid-rootfs";

/// How long the agent may take to connect a process's streams once it
/// answered the call that made the process.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors creating a container or an extra process in a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The spec cannot be sent.
    #[error("cannot serialize the OCI spec")]
    Spec(#[source] serde_json::Error),
    /// The host ends of the streams cannot be bound.
    #[error("cannot bind the process's stdio sockets")]
    Bind(#[source] std::io::Error),
    /// The agent refused or failed the call.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// A rootfs in the share cannot be asked for as given.
    #[error("rootfs in the share: {0}")]
    RootfsInShare(String),
    /// The agent made the process but never connected its streams.
    #[error("the guest did not connect the process's stdio within {0:?}")]
    StreamTimeout(Duration),
    /// Accepting a stream connection failed.
    #[error("cannot accept the process's stdio connection")]
    Accept(#[source] std::io::Error),
    /// The VM ended while the process was being made.
    #[error("the VM exited while creating the process ({0:?})")]
    VmExited(VmExit),
}

/// Result of container operations.
pub type Result<T> = std::result::Result<T, ContainerError>;

impl ContainerError {
    /// The agent answered NOT_FOUND: no such container or process (e.g.
    /// [`Sandbox::remove_container`] of an id the guest does not know).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Agent(e) if e.is_not_found())
    }
}

/// A read-only disk holding one layer of a container's root filesystem
/// (usually the image's whole flattened rootfs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDisk {
    /// The disk's serial in the guest.
    pub serial: String,
    /// Its filesystem, as `mount -t` names it.
    pub fs_type: String,
}

impl LayerDisk {
    /// The sandbox's first rootfs disk ([`ROOTFS_SERIAL`]).
    pub fn primary(fs_type: impl Into<String>) -> Self {
        Self {
            serial: ROOTFS_SERIAL.into(),
            fs_type: fs_type.into(),
        }
    }

    /// The VM disk carrying it: the image file at `path`, read-only (the
    /// container's writes go to an upper layer in the guest).
    pub fn disk_spec(&self, path: impl Into<std::path::PathBuf>) -> DiskSpec {
        DiskSpec {
            path: path.into(),
            readonly: true,
            serial: self.serial.clone(),
        }
    }
}

/// What a container is made of.
#[derive(Debug, Clone, Copy)]
pub struct ContainerSpec<'a> {
    /// The container id (unique in the sandbox).
    pub id: &'a str,
    /// The spec as the guest must apply it (already adapted to the VM).
    pub oci: &'a Spec,
    /// The disks its root filesystem is built from, lowest first (a
    /// writable upper layer in guest RAM goes on top). Empty when
    /// `rootfs_in_share` is given.
    pub layers: &'a [LayerDisk],
    /// `Some`: the root filesystem is this directory of the sandbox's
    /// virtio-fs share, relative to the share's root (`c3/rootfs`: a pod's
    /// container whose rootfs the host mounted there); `layers` must then
    /// be empty and the sandbox must serve a share. The guest binds it in
    /// place, read-only if the spec's root is; it refuses a path that is
    /// absolute, has `..` or `.` components, or leaves the share through a
    /// symlink. `None`: the rootfs is made of `layers`.
    pub rootfs_in_share: Option<&'a Path>,
    /// Its /etc/resolv.conf; `None` leaves the image's.
    pub dns: Option<&'a GuestDns>,
    /// Its /etc/hosts; `None`: localhost and the hostname.
    pub hosts: Option<&'a str>,
    /// Which streams its init gets.
    pub streams: StreamsWanted,
}

/// A created container: its init is made, not started.
#[derive(Debug)]
pub struct Created {
    /// The init's pid in the guest.
    pub pid: u32,
    /// The init's streams, connected.
    pub streams: Streams,
}

/// An extra process the agent has prepared; its streams connect when it
/// is started with [`Sandbox::start_exec`].
#[derive(Debug)]
pub struct PreparedExec {
    exec_id: String,
    pending: PendingStreams,
}

impl PreparedExec {
    /// The exec id.
    pub fn exec_id(&self) -> &str {
        &self.exec_id
    }
}

/// The agent's request for `spec`, with the streams' ports.
fn create_request(
    spec: &ContainerSpec<'_>,
    pending: &PendingStreams,
    dns_relay_port: u32,
    share: bool,
) -> Result<CreateContainerRequest> {
    let mut req = CreateContainerRequest::new();
    req.container_id = spec.id.into();
    req.oci_spec_json = serde_json::to_vec(spec.oci).map_err(ContainerError::Spec)?;
    let mut rootfs = Rootfs::new();
    if let Some(path) = spec.rootfs_in_share {
        if !spec.layers.is_empty() {
            return Err(ContainerError::RootfsInShare(
                "it cannot have image layers too".into(),
            ));
        }
        if !share {
            return Err(ContainerError::RootfsInShare(
                "the sandbox serves no share".into(),
            ));
        }
        // The agent checks the path itself (it is the one that must stay
        // in the share); here it only has to be text.
        rootfs.share_path = path
            .to_str()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| {
                ContainerError::RootfsInShare(format!(
                    "{} is not a non-empty UTF-8 path",
                    path.display()
                ))
            })?
            .to_owned();
    }
    for disk in spec.layers {
        let mut layer = BlockLayer::new();
        layer.disk_serial = disk.serial.clone();
        layer.fs_type = disk.fs_type.clone();
        rootfs.layers.push(layer);
    }
    rootfs.readonly = spec
        .oci
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    req.rootfs = protobuf::MessageField::some(rootfs);
    req.stdio = protobuf::MessageField::some(pending.stdio.clone());
    if let Some(dns) = spec.dns {
        req.dns_servers = dns.servers.clone();
        req.dns_search = dns.search.clone();
        req.dns_options = dns.options.clone();
        req.dns_relay_port = dns_relay_port;
    }
    if let Some(hosts) = spec.hosts {
        req.etc_hosts = hosts.to_owned();
    }
    if share {
        req.share_tag = crate::volumes::SHARE_TAG.into();
    }
    Ok(req)
}

impl Sandbox {
    /// Creates a container: its init is made with its streams connected,
    /// and waits for [`Sandbox::start_init`]. Fails if the VM ends first.
    pub async fn create_container(&self, spec: ContainerSpec<'_>) -> Result<Created> {
        let pending = self
            .bind_streams(spec.streams)
            .map_err(ContainerError::Bind)?;
        let req = create_request(&spec, &pending, self.dns_relay_port(), self.has_share())?;
        let (pid, streams) = self
            .until_vm_exit(with_streams(pending, self.agent().create_container(&req)))
            .await?;
        tracing::debug!(container = %spec.id, pid, "container created");
        Ok(Created { pid, streams })
    }

    /// Removes container `container_id` while the VM runs on: the agent
    /// SIGKILLs what of it still runs, takes its rootfs down (its guest
    /// RAM comes back), removes its bundle and cgroup and forgets it, so
    /// the id can be created again. Waits pending on its processes return.
    /// An id the guest does not know fails with
    /// [`ContainerError::is_not_found`]. Fails if the VM ends first.
    pub async fn remove_container(&self, container_id: &str) -> Result<()> {
        let removed = async {
            self.agent()
                .remove_container(container_id)
                .await
                .map_err(ContainerError::from)
        };
        self.until_vm_exit(removed).await?;
        tracing::debug!(container = %container_id, "container removed");
        Ok(())
    }

    /// Starts a created container's init; returns its guest pid.
    pub async fn start_init(&self, container_id: &str) -> Result<u32> {
        Ok(self.agent().start_process(container_id, "").await?)
    }

    /// Prepares an extra process (`process_json`: an OCI process) in a
    /// container; it runs once started with [`Sandbox::start_exec`].
    pub async fn prepare_exec(
        &self,
        container_id: &str,
        exec_id: &str,
        process_json: &[u8],
        streams: StreamsWanted,
    ) -> Result<PreparedExec> {
        let pending = self.bind_streams(streams).map_err(ContainerError::Bind)?;
        let mut req = ExecProcessRequest::new();
        req.container_id = container_id.into();
        req.exec_id = exec_id.into();
        req.oci_process_json = process_json.to_vec();
        req.stdio = protobuf::MessageField::some(pending.stdio.clone());
        self.agent().exec_process(&req).await?;
        Ok(PreparedExec {
            exec_id: exec_id.into(),
            pending,
        })
    }

    /// Starts a prepared process; returns its guest pid and its streams.
    pub async fn start_exec(
        &self,
        container_id: &str,
        exec: PreparedExec,
    ) -> Result<(u32, Streams)> {
        let start = self.agent().start_process(container_id, &exec.exec_id);
        self.until_vm_exit(with_streams(exec.pending, start)).await
    }

    /// Runs `work` unless the VM ends first.
    async fn until_vm_exit<T>(
        &self,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::select! {
            done = work => done,
            exit = self.exited() => Err(ContainerError::VmExited(exit)),
        }
    }
}

/// Accepts the agent's stream connections for `pending` while `call` (the
/// request during which the agent connects them) runs; returns the call's
/// pid with the connected streams. A failed call drops the listeners.
async fn with_streams<F>(pending: PendingStreams, call: F) -> Result<(u32, Streams)>
where
    F: std::future::Future<Output = std::result::Result<u32, AgentError>>,
{
    let accept = pending.accept();
    tokio::pin!(accept, call);
    // The agent may connect the streams before or after it answers.
    let mut accepted = None;
    let pid = loop {
        tokio::select! {
            pid = &mut call => break pid?,
            streams = &mut accept, if accepted.is_none() => accepted = Some(streams),
        }
    };
    let streams = match accepted {
        Some(streams) => streams,
        None => tokio::time::timeout(STREAM_TIMEOUT, accept)
            .await
            .map_err(|_| ContainerError::StreamTimeout(STREAM_TIMEOUT))?,
    }
    .map_err(ContainerError::Accept)?;
    Ok((pid, streams))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{build, ImageDefaults, RunOptions};

    fn pending() -> (tempfile::TempDir, PendingStreams) {
        let dir = tempfile::tempdir().unwrap();
        let ports = crate::stdio::PortAllocator::default();
        let wanted = StreamsWanted {
            stdin: true,
            stdout: true,
            stderr: false,
            terminal: false,
        };
        let pending = PendingStreams::bind(&dir.path().join("v.sock"), &ports, wanted).unwrap();
        (dir, pending)
    }

    // Binding the stream listeners needs a runtime.
    #[tokio::test]
    async fn the_request_carries_spec_disk_dns_and_ports() {
        let image = ImageDefaults {
            cmd: vec!["/bin/sh".into()],
            ..Default::default()
        };
        let oci = build(
            &image,
            &RunOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let layers = [
            LayerDisk::primary("erofs"),
            LayerDisk {
                serial: "extra".into(),
                fs_type: "ext4".into(),
            },
        ];
        let dns = GuestDns {
            servers: vec!["10.0.0.53".into()],
            search: vec!["example.org".into()],
            options: vec!["ndots:2".into()],
        };
        let (_dir, pending) = pending();
        let spec = ContainerSpec {
            id: "c1",
            oci: &oci,
            layers: &layers,
            dns: Some(&dns),
            hosts: None,
            rootfs_in_share: None,
            streams: StreamsWanted {
                stdin: true,
                stdout: true,
                stderr: false,
                terminal: false,
            },
        };
        let req = create_request(&spec, &pending, 0, false).unwrap();
        assert_eq!(req.container_id, "c1");
        let sent: Spec = serde_json::from_slice(&req.oci_spec_json).unwrap();
        assert_eq!(sent, oci);
        let rootfs = req.rootfs.as_ref().unwrap();
        assert!(rootfs.readonly, "root.readonly of the spec");
        let layers: Vec<_> = rootfs
            .layers
            .iter()
            .map(|l| (l.disk_serial.as_str(), l.fs_type.as_str()))
            .collect();
        assert_eq!(
            layers,
            [(ROOTFS_SERIAL, "erofs"), ("extra", "ext4")],
            "lowest first"
        );
        assert_eq!(req.stdio.as_ref().unwrap(), &pending.stdio);
        assert_ne!(pending.stdio.stdin_port, 0);
        assert_eq!(pending.stdio.stderr_port, 0);
        assert_eq!(req.dns_servers, ["10.0.0.53"]);
        assert_eq!(req.dns_search, ["example.org"]);
        assert_eq!(req.dns_options, ["ndots:2"]);
    }

    #[tokio::test]
    async fn without_dns_the_image_keeps_its_resolv_conf() {
        let oci = build(
            &ImageDefaults::default(),
            &RunOptions {
                command: vec!["true".into()],
                ..Default::default()
            },
        )
        .unwrap();
        let layers = [LayerDisk::primary("ext4")];
        let (_dir, pending) = pending();
        let spec = ContainerSpec {
            id: "c2",
            oci: &oci,
            layers: &layers,
            dns: None,
            hosts: None,
            rootfs_in_share: None,
            streams: StreamsWanted {
                stdin: false,
                stdout: false,
                stderr: false,
                terminal: false,
            },
        };
        let req = create_request(&spec, &pending, 0, false).unwrap();
        assert!(req.dns_servers.is_empty() && req.dns_search.is_empty());
        assert!(!req.rootfs.as_ref().unwrap().readonly);
    }

    #[tokio::test]
    async fn a_rootfs_in_the_share_is_asked_for_by_path_with_the_tag() {
        let oci = build(
            &ImageDefaults::default(),
            &RunOptions {
                command: vec!["true".into()],
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let (_dir, pending) = pending();
        let spec = ContainerSpec {
            id: "c3",
            oci: &oci,
            layers: &[],
            dns: None,
            hosts: None,
            rootfs_in_share: Some(Path::new("c3/rootfs")),
            streams: StreamsWanted {
                stdin: false,
                stdout: false,
                stderr: false,
                terminal: false,
            },
        };
        let req = create_request(&spec, &pending, 0, true).unwrap();
        let rootfs = req.rootfs.as_ref().unwrap();
        assert_eq!(rootfs.share_path, "c3/rootfs");
        assert!(rootfs.layers.is_empty() && rootfs.upper_disk_serial.is_empty());
        assert!(rootfs.readonly);
        assert_eq!(req.share_tag, crate::volumes::SHARE_TAG);

        let e = create_request(&spec, &pending, 0, false).unwrap_err();
        assert!(e.to_string().contains("no share"), "{e}");
        let layers = [LayerDisk::primary("erofs")];
        let both = ContainerSpec {
            layers: &layers,
            ..spec
        };
        let e = create_request(&both, &pending, 0, true).unwrap_err();
        assert!(matches!(e, ContainerError::RootfsInShare(_)), "{e}");
        let empty = ContainerSpec {
            rootfs_in_share: Some(Path::new("")),
            ..spec
        };
        assert!(create_request(&empty, &pending, 0, true).is_err());
        assert!(!e.is_not_found());
    }

    #[test]
    fn a_root_disk_is_attached_read_only() {
        let disk = LayerDisk::primary("erofs").disk_spec("/cache/x.erofs");
        assert!(disk.readonly);
        assert_eq!(disk.serial, ROOTFS_SERIAL);
        assert_eq!(disk.path, std::path::Path::new("/cache/x.erofs"));
    }
}
