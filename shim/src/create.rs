//! Task.Create in two steps: the bundle is read into a [`Plan`] (nothing is
//! made on the host yet, so bad input costs nothing), then [`make`] builds
//! the sandbox for it — rootfs disk, tap, VM, container, stdio — under one
//! record in the bundle, written before each thing is made. A failure at any
//! step drops what is live and undoes the record ([`Rollback`]); a shim
//! that dies part-way leaves the record to containerd's `delete`.

use std::path::PathBuf;
use std::sync::Arc;

use capsid_sandbox::config::Config;
use capsid_sandbox::container::{ContainerSpec, LayerDisk};
use capsid_sandbox::image::RootfsCache;
use capsid_sandbox::network::{GuestDns, TapAttachment, TapRecord};
use capsid_sandbox::record::{HostRecord, RecordFile, Rollback};
use capsid_sandbox::sandbox::{backend_for, Sandbox, SandboxOptions};
use oci_spec::runtime::Spec;

use crate::cleanup;
use crate::container::{ContainerError, CreateRequest, Result};
use crate::io::ProcessIo;
use crate::network;
use crate::rootfs::{self, RootfsDisk, RootfsSource};
use crate::sizing::{self, VmSize};
use crate::spec;

/// Where the merged layers are mounted while a disk is built.
const LOWERS_MOUNT: &str = "capsid-lowers";

/// What the bundle asks for, read and checked before anything is made.
#[derive(Debug)]
pub struct Plan {
    /// The spec as the guest gets it (adapted to the VM).
    pub spec: Spec,
    /// The VM's size.
    pub size: VmSize,
    /// Whether the host's balloon policy may reclaim the guest's memory.
    pub balloon_policy: bool,
    /// Where the container's files come from.
    pub source: RootfsSource,
    /// The network namespace whose veth the VM joins.
    pub netns: Option<PathBuf>,
    /// Resolver settings the spec carries as a host file.
    pub dns: Option<GuestDns>,
}

impl Plan {
    /// Reads and checks `req`'s bundle.
    pub fn read(req: &CreateRequest, config: &Config) -> Result<Self> {
        let spec_path = req.bundle.join("config.json");
        let text = std::fs::read(&spec_path).map_err(|source| ContainerError::Bundle {
            path: spec_path.clone(),
            source,
        })?;
        let mut spec: Spec = serde_json::from_slice(&text)
            .map_err(|e| ContainerError::SpecParse(oci_spec::OciSpecError::SerDe(e)))?;
        let netns = network::netns_path(&spec);
        if let Some(path) = &netns {
            network::check_netns(path).map_err(ContainerError::BadNetns)?;
        }
        // Read before adapt() drops the bind mount that carries it.
        let dns = network::dns_from_spec(&spec);
        for change in spec::adapt(&mut spec)? {
            tracing::info!(container = %req.id, "{change}");
        }
        let size = sizing::vm_size(&spec, &config.vm)?;
        let balloon_policy = sizing::balloon_policy(&spec)?;
        req.stdio.validate()?;
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_else(|| PathBuf::from("rootfs"));
        let source = RootfsSource::from_mounts(&req.rootfs, &req.bundle.join(root))?;
        Ok(Self {
            spec,
            size,
            balloon_policy,
            source,
            netns,
            dns,
        })
    }
}

/// A created container and what it holds on the host.
#[derive(Debug)]
pub struct Made {
    /// The running sandbox.
    pub sandbox: Arc<Sandbox>,
    /// The record of what was made (kept in the bundle until Delete).
    pub record: RecordFile<HostRecord>,
    /// The rootfs disk's lease.
    pub rootfs: RootfsDisk,
    /// The init's guest pid.
    pub pid: u32,
    /// The init's stdio copying.
    pub io: ProcessIo,
}

/// Makes the sandbox for `plan` and creates the container in it; on error
/// nothing is left behind.
pub async fn make(req: &CreateRequest, plan: &Plan, config: &Config) -> Result<Made> {
    let name = sandbox_name(&req.namespace, &req.id);
    let lowers_mount = req.bundle.join(LOWERS_MOUNT);
    // Declared first, dropped last: on an early return the live objects
    // below (VM, lease) go before the record is undone.
    let mut rollback = Rollback::begin(
        cleanup::state_path(&req.bundle),
        HostRecord {
            mounts: vec![lowers_mount.clone()],
            ..HostRecord::new(&name, config.paths.state_dir.join(&name))
        },
    )?;

    let disk = build_disk(config, &plan.source, &name, lowers_mount).await?;
    rollback.update(|r| {
        // prepare() unmounted the lowers on every path.
        r.mounts.clear();
        if disk.scratch {
            r.scratch_files.push(disk.prepared.path.clone());
        }
    })?;
    let layer = LayerDisk::primary(disk.prepared.fs_type.as_str());

    let attachment = match &plan.netns {
        Some(netns) => {
            let tap = TapRecord::for_sandbox(netns, &name);
            rollback.update(|r| r.tap = Some(tap.clone()))?;
            Some(network::attach(&tap).await?)
        }
        None => None,
    };

    let backend = backend_for(config)?;
    let opts = SandboxOptions {
        id: name.clone(),
        vcpus: plan.size.vcpus,
        memory_mib: plan.size.memory_mib,
        disks: vec![layer.disk_spec(disk.prepared.path.clone())],
        net: attachment.as_ref().map(TapAttachment::net_spec),
        kernel_args: Vec::new(),
        network: attachment.as_ref().map(|a| a.guest.clone()),
        balloon_opt_out: !plan.balloon_policy,
    };
    let sandbox = Sandbox::start(config, backend, opts).await?;
    rollback.update(|r| r.set_vm_processes(&sandbox.pids()))?;
    let timings = sandbox.timings;
    tracing::info!(
        container = %req.id,
        sandbox = %name,
        vcpus = plan.size.vcpus,
        memory_mib = plan.size.memory_mib,
        vm_spawned_ms = timings.vm_spawned.as_millis(),
        agent_connected_ms = timings.agent_connected.as_millis(),
        guest_boot_ms = timings.guest_boot_to_agent.as_millis(),
        "sandbox started"
    );

    let dns = plan.dns.clone().or_else(|| {
        attachment
            .as_ref()
            .map(|a| a.guest.dns.clone())
            .filter(|d| !d.is_empty())
    });
    let created = sandbox
        .create_container(ContainerSpec {
            id: &req.id,
            oci: &plan.spec,
            layers: std::slice::from_ref(&layer),
            dns: dns.as_ref(),
            streams: req.stdio.wanted(),
        })
        .await?;
    let io = ProcessIo::connect(&req.stdio, created.streams).await?;
    let record = rollback
        .commit()
        .ok_or_else(|| ContainerError::Internal("the sandbox record is gone".into()))?;
    Ok(Made {
        sandbox: Arc::new(sandbox),
        record,
        rootfs: disk,
        pid: created.pid,
        io,
    })
}

/// Makes or finds the rootfs disk (blocking work off the runtime).
async fn build_disk(
    config: &Config,
    source: &RootfsSource,
    name: &str,
    mount_point: PathBuf,
) -> Result<RootfsDisk> {
    let cache = RootfsCache::new(&config.paths.cache_dir);
    let (source, name) = (source.clone(), name.to_owned());
    Ok(
        tokio::task::spawn_blocking(move || rootfs::prepare(&cache, &source, &name, &mount_point))
            .await
            .map_err(|e| ContainerError::Internal(format!("rootfs task: {e}")))??,
    )
}

/// The sandbox's name: readable when short, a digest otherwise (it names
/// a run directory whose sockets must fit in a Unix socket path).
pub fn sandbox_name(namespace: &str, id: &str) -> String {
    use sha2::{Digest, Sha256};
    let name = format!("{namespace}-{id}");
    if name.len() <= 48 {
        return name;
    }
    let digest = format!(
        "{:x}",
        Sha256::digest(format!("{namespace}/{id}").as_bytes())
    );
    format!("c-{}", &digest[..30])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_names_fit_socket_paths() {
        assert_eq!(sandbox_name("default", "t1"), "default-t1");
        let long = "a".repeat(64);
        let name = sandbox_name("k8s.io", &long);
        assert_eq!(name.len(), 32);
        assert!(name.starts_with("c-"));
        assert_ne!(name, sandbox_name("other", &long));
    }
}
