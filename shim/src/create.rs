//! Task.Create in two steps: the bundle is read into a [`Plan`] (nothing is
//! made on the host yet, so bad input costs nothing), then [`make`] builds
//! the sandbox for it — rootfs disk, tap, VM, container, stdio — under one
//! record in the bundle, written before each thing is made. A failure at any
//! step drops what is live and undoes the record ([`Rollback`]); a shim
//! that dies part-way leaves the record to containerd's `delete`.

use std::path::PathBuf;
use std::sync::Arc;

use capsid_sandbox::backend::NetSpec;
use capsid_sandbox::backend::VmExit;
use capsid_sandbox::config::Config;
use capsid_sandbox::container::{ContainerSpec, LayerDisk};
use capsid_sandbox::image::RootfsCache;
use capsid_sandbox::netns::NamedNetns;
use capsid_sandbox::network::{own, tap_name_for, NetworkError, TapRecord};
use capsid_sandbox::record::{HostRecord, RecordFile, Rollback};
use capsid_sandbox::sandbox::{backend_for, Sandbox, SandboxOptions};
use capsid_sandbox::volumes::{self, Share, Volume};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use tokio::sync::watch;

use crate::cleanup;
use crate::container::{ContainerError, CreateRequest, Result};
use crate::hooks::{self, HostHooks};
use crate::io::{LogOwner, ProcessIo};
use crate::network::{self, NetMode};
use crate::pod::Pod;
use crate::pod_role::Role;
use crate::rootfs::{self, RootfsDisk, RootfsSource};
use crate::sizing::{self, VmSize};
use crate::spec;

/// Why a spec without a network namespace is refused.
const HOST_NETWORK: &str = "the container asks for the host's network namespace \
     (docker --network host, ctr --net-host): a capsid container has a network of \
     its own in its VM; use a bridge or CNI network";

/// Where, under capsid's state directory, the sandboxes' own network
/// namespaces are pinned.
const OWN_NETNS_DIR: &str = ".netns";

/// Where the merged layers are mounted while a disk is built.
const LOWERS_MOUNT: &str = "capsid-lowers";

/// What the bundle asks for, read and checked before anything is made.
#[derive(Debug)]
pub struct Plan {
    /// The spec as the guest gets it (adapted to the VM).
    pub spec: Spec,
    /// The VM's size.
    pub size: VmSize,
    /// A pod sandbox's VM: the most RAM it may grow to, MiB (it boots with
    /// it, all but `size` held in its balloon).
    pub pod_max_mib: Option<u32>,
    /// Whether the host's balloon policy may reclaim the guest's memory.
    pub balloon_policy: bool,
    /// Where the container's files come from.
    pub source: RootfsSource,
    /// Where the VM's NIC goes.
    pub network: NetMode,
    /// Resolver settings the spec carries as a host file.
    /// The host file the spec binds on /etc/resolv.conf, read once the
    /// create hooks ran (Docker writes it when its hook sets up the network).
    pub resolv_conf: Option<PathBuf>,
    /// The host file the spec binds on /etc/hosts, read after the hooks
    /// too (Docker adds the container's address when it sets up the
    /// network).
    pub hosts_file: Option<PathBuf>,
    /// The spec's hooks, run on the host.
    pub hooks: HostHooks,
    /// Host paths shared with the guest (the spec binds share entries).
    /// A pod's containers take theirs into their own share entry
    /// ([`crate::pod`]): empty for them here.
    pub volumes: Vec<Volume>,
    /// The task's part in a pod.
    pub role: Role,
    /// The IPC, UTS and PID namespaces the spec joins by path (a pod
    /// container's: the pause container's in the VM).
    pub joined_namespaces: Vec<LinuxNamespaceType>,
    /// The spec's root directory in the bundle (where a caller-mounted
    /// rootfs is).
    pub root_dir: PathBuf,
    /// capsid's state and cache directories: no volume may expose them.
    pub protected: Vec<PathBuf>,
}

impl Plan {
    /// Reads and checks `req`'s bundle.
    pub fn read(req: &CreateRequest, config: &Config) -> Result<Self> {
        Self::read_as(req, config, false)
    }

    /// [`Plan::read`] for a container going into a pooled sandbox: its
    /// rootfs and volumes go into an entry of the VM's share, as a pod's
    /// containers' do, so the spec keeps its volume binds.
    pub fn read_pooled(req: &CreateRequest, config: &Config) -> Result<Self> {
        Self::read_as(req, config, true)
    }

    fn read_as(req: &CreateRequest, config: &Config, pooled: bool) -> Result<Self> {
        let spec_path = req.bundle.join("config.json");
        let text = std::fs::read(&spec_path).map_err(|source| ContainerError::Bundle {
            path: spec_path.clone(),
            source,
        })?;
        let mut spec: Spec = serde_json::from_slice(&text)
            .map_err(|e| ContainerError::SpecParse(oci_spec::OciSpecError::SerDe(e)))?;
        let role = Role::from_annotations(&req.id, &spec.annotations().clone().unwrap_or_default())
            .map_err(|e| ContainerError::Invalid(e.to_string()))?;
        let joined_namespaces = crate::pod::joined_namespaces(&spec);
        // A pod container's network is its pod VM's: its spec names the
        // namespace of the pod's first task (the VM's host process).
        let network = match role {
            Role::Member { .. } => NetMode::None,
            _ => network::mode(&spec),
        };
        match &network {
            NetMode::Join(path) => {
                network::check_netns(path).map_err(ContainerError::BadNetns)?;
            }
            NetMode::Host => return Err(ContainerError::Invalid(HOST_NETWORK.into())),
            NetMode::None | NetMode::Own => {}
        }
        // Read before adapt() drops the bind mount that carries it.
        let resolv_conf = network::bind_source(&spec, "/etc/resolv.conf");
        let hosts_file = network::bind_source(&spec, "/etc/hosts");
        let (hooks, dropped) = HostHooks::take(&mut spec);
        for change in dropped.into_iter().chain(spec::adapt(&mut spec)?) {
            tracing::info!(container = %req.id, "{change}");
        }
        let volumes = match role {
            Role::Single if !pooled => volumes::take_volumes(&mut spec)?,
            _ => Vec::new(),
        };
        let size = sizing::vm_size(&spec, &config.vm)?;
        let pod_max_mib = match role {
            Role::Sandbox { .. } => Some(sizing::pod_max_memory(size, &spec, &config.pod)?),
            _ => None,
        };
        let balloon_policy = sizing::balloon_policy(&spec)?;
        req.stdio.validate()?;
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_else(|| PathBuf::from("rootfs"));
        let root_dir = req.bundle.join(root);
        let source = RootfsSource::from_mounts(&req.rootfs, &root_dir)?;
        Ok(Self {
            role,
            joined_namespaces,
            root_dir,
            protected: vec![
                config.paths.state_dir.clone(),
                config.paths.cache_dir.clone(),
            ],
            spec,
            size,
            pod_max_mib,
            balloon_policy,
            source,
            network,
            resolv_conf,
            hosts_file,
            hooks,
            volumes,
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
    /// The rootfs disk's lease (none for a pod's VM).
    pub rootfs: Option<RootfsDisk>,
    /// The pod a pod sandbox made, and where its VM's end is told.
    pub pod: Option<(Arc<Pod>, watch::Sender<Option<VmExit>>)>,
    /// The init's guest pid.
    pub pid: u32,
    /// The VM's main host process: the task's pid for containerd.
    pub host_pid: u32,
    /// The sandbox's own network namespace, to wire at Start.
    pub late_network: Option<LateNetwork>,
    /// The init's stdio copying.
    pub io: ProcessIo,
}

/// A NIC whose network comes after Create: its tap in the sandbox's own
/// namespace, and the MAC it booted with.
#[derive(Debug, Clone)]
pub struct LateNetwork {
    /// The namespace (the VM's processes live in it).
    pub netns: PathBuf,
    /// The tap of the VM's NIC.
    pub tap: String,
    /// The NIC's MAC until it takes the veth's.
    pub boot_mac: String,
}

/// The cgroup the VM's host processes go in: the spec's
/// `linux.cgroupsPath` in its cgroupfs form (`/default/<id>`,
/// `/kubepods/…/pod<uid>/<id>`), as runc puts a container's processes
/// there, so the node's accounting sees the VM. The systemd form
/// (`slice:prefix:name`) needs systemd to make the unit: then the VM's
/// processes get a cgroup under the shim's own.
fn vm_cgroup(spec: &Spec) -> Option<PathBuf> {
    let path = spec.linux().as_ref()?.cgroups_path().clone()?;
    if path.is_absolute() {
        return Some(path);
    }
    tracing::info!(cgroups_path = %path.display(), "a systemd-form cgroupsPath: the VM's processes get a cgroup under the shim's own");
    None
}

/// Makes the sandbox for `plan` and creates the container in it; on error
/// nothing is left behind.
pub async fn make(req: &CreateRequest, plan: &Plan, config: &Config) -> Result<Made> {
    let name = sandbox_name(&req.namespace, &req.id);
    // Refused before anything is made when another user could reach them.
    capsid_sandbox::private_dir::ensure_root(&config.paths.state_dir)?;
    capsid_sandbox::private_dir::ensure_root(&config.paths.cache_dir)?;
    let lowers_mount = req.bundle.join(LOWERS_MOUNT);
    // Declared first, dropped last: on an early return the live objects
    // below (VM, lease) go before the record is undone.
    let mut rollback = Rollback::begin(
        cleanup::state_path(&req.bundle),
        HostRecord {
            mounts: vec![lowers_mount.clone()],
            cgroup: vm_cgroup(&plan.spec),
            ..HostRecord::new(&name, config.paths.state_dir.join(&name))
        },
    )?;

    // A pod's VM boots without a disk: its containers' files come
    // through its share.
    let pod_vm = matches!(plan.role, Role::Sandbox { .. });
    let disk = if pod_vm {
        rollback.update(|r| r.mounts.clear())?;
        None
    } else {
        let disk = build_disk(config, &plan.source, &name, lowers_mount).await?;
        rollback.update(|r| {
            // prepare() unmounted the lowers on every path.
            r.mounts.clear();
            if disk.scratch {
                r.scratch_files.push(disk.prepared.path.clone());
            }
        })?;
        Some(disk)
    };
    let layer = disk
        .as_ref()
        .map(|d| LayerDisk::primary(d.prepared.fs_type.as_str()));

    let mut attachment = None;
    let mut late_network = None;
    match &plan.network {
        NetMode::Join(netns) => {
            let tap = TapRecord::for_sandbox(netns, &name);
            rollback.update(|r| r.tap = Some(tap.clone()))?;
            attachment = Some(network::attach(&tap).await?);
        }
        NetMode::Own => late_network = Some(own_netns(config, &name, &mut rollback).await?),
        NetMode::None | NetMode::Host => {}
    }
    let net = match (&attachment, &late_network) {
        (Some(a), _) => Some(a.net_spec()),
        (None, Some(late)) => Some(NetSpec {
            tap: late.tap.clone(),
            mac: late.boot_mac.clone(),
            netns: Some(late.netns.clone()),
        }),
        (None, None) => None,
    };

    // No volumes, no share and no virtiofsd.
    let mut share = if pod_vm {
        let dir = volumes::share_dir(&config.paths.state_dir, &name);
        rollback.update(|r| r.share = Some(dir.clone()))?;
        Some(Share::prepare_live(&dir, &[], &[])?)
    } else if plan.volumes.is_empty() {
        None
    } else {
        let dir = volumes::share_dir(&config.paths.state_dir, &name);
        rollback.update(|r| r.share = Some(dir.clone()))?;
        Some(Share::prepare(
            &dir,
            &plan.volumes,
            &[&config.paths.state_dir, &config.paths.cache_dir],
        )?)
    };

    let backend = backend_for(config)?;
    // A pod's VM boots at its maximum, the rest of its size held in the
    // balloon as its room to grow.
    let vm_memory_mib = match plan.pod_max_mib {
        Some(max) if pod_vm => max.max(plan.size.memory_mib),
        _ => plan.size.memory_mib,
    };
    let opts = SandboxOptions {
        id: name.clone(),
        vcpus: plan.size.vcpus,
        memory_mib: vm_memory_mib,
        disks: match (&layer, &disk) {
            (Some(layer), Some(disk)) => vec![layer.disk_spec(disk.prepared.path.clone())],
            _ => Vec::new(),
        },
        net,
        kernel_args: Vec::new(),
        network: attachment.as_ref().map(|a| a.guest.clone()),
        balloon_opt_out: !plan.balloon_policy,
        share_dir: share.as_ref().map(|s| s.dir().to_path_buf()),
        cgroup: vm_cgroup(&plan.spec),
    };
    let hotplug = capsid_sandbox::hotplug::grows_by_hotplug(config, vm_memory_mib);
    let reserve_mib =
        vm_memory_mib - sizing::pod_vm_usable(plan.size.memory_mib, vm_memory_mib, hotplug);
    let sandbox = Sandbox::start_reserved(config, backend, opts, reserve_mib).await?;
    rollback.update(|r| r.set_vm_processes(&sandbox.pids()))?;
    let timings = sandbox.timings;
    tracing::info!(
        container = %req.id,
        sandbox = %name,
        vcpus = plan.size.vcpus,
        memory_mib = plan.size.memory_mib,
        vm_memory_mib,
        vm_spawned_ms = timings.vm_spawned.as_millis(),
        agent_connected_ms = timings.agent_connected.as_millis(),
        guest_boot_ms = timings.guest_boot_to_agent.as_millis(),
        "sandbox started"
    );

    run_create_hooks(req, plan, &sandbox).await?;

    let dns = container_dns(
        req,
        plan,
        &sandbox,
        attachment.as_ref(),
        late_network.as_ref(),
    )?;
    let sandbox = Arc::new(sandbox);
    if let Some(share) = pod_vm.then(|| share.take()).flatten() {
        // The pause container runs in the VM like the pod's others: their
        // namespaces are its.
        let (tx, rx) = watch::channel(None);
        let pod = Arc::new(Pod::new(
            &req.id,
            sandbox.clone(),
            plan.size,
            share.dir().to_path_buf(),
            rx,
            config,
        ));
        let added = crate::pod::add(&pod, req, plan, true, dns).await?;
        let host_pid = vm_pid(&sandbox)?;
        let record = rollback
            .commit()
            .ok_or_else(|| ContainerError::Internal("the sandbox record is gone".into()))?;
        share.keep();
        return Ok(Made {
            sandbox,
            record,
            rootfs: None,
            pod: Some((pod, tx)),
            pid: added.pid,
            host_pid,
            late_network,
            io: added.io,
        });
    }
    let layer = layer.ok_or_else(|| ContainerError::Internal("no rootfs disk".into()))?;
    let hosts = plan
        .hosts_file
        .as_deref()
        .and_then(network::hosts_from_file);
    let created = sandbox
        .create_container(ContainerSpec {
            id: &req.id,
            oci: &plan.spec,
            layers: std::slice::from_ref(&layer),
            rootfs_in_share: None,
            dns: dns.as_ref(),
            hosts: hosts.as_deref(),
            streams: req.stdio.wanted(),
        })
        .await?;
    let owner = LogOwner {
        id: req.id.clone(),
        namespace: req.namespace.clone(),
    };
    let io = ProcessIo::connect(&req.stdio, created.streams, &owner).await?;
    let host_pid = vm_pid(&sandbox)?;
    let record = rollback
        .commit()
        .ok_or_else(|| ContainerError::Internal("the sandbox record is gone".into()))?;
    // From here on the record takes the share down, at Delete or after a
    // crash.
    if let Some(share) = share {
        share.keep();
    }
    Ok(Made {
        sandbox,
        record,
        rootfs: disk,
        pod: None,
        pid: created.pid,
        host_pid,
        late_network,
        io,
    })
}

/// Puts the container of `req` in a pooled sandbox ([`crate::warm`])
/// instead of booting one: the VM's tap joins the spec's network (moved
/// into its namespace, or left in the sandbox's own for a network made
/// after Create, as Docker makes it), and the container's rootfs and
/// volumes go into an entry of the VM's share, as a pod's first
/// container's do. On error the sandbox is undone like a cold one.
pub async fn make_warm(
    req: &CreateRequest,
    plan: &Plan,
    config: &Config,
    warm: crate::warm::WarmVm,
) -> Result<Made> {
    let name = warm.name.clone();
    let parts = warm.into_parts();
    // Declared first, dropped last: the VM goes before the record's undo.
    let mut rollback = Rollback::resume(parts.record);
    let sandbox = parts.sandbox;
    let late = parts.late;
    let mut attachment = None;
    let mut late_network = None;
    match &plan.network {
        NetMode::Join(netns) => {
            // Recorded in its new namespace before it moves there.
            let tap = TapRecord {
                netns: netns.clone(),
                tap: late.tap.clone(),
            };
            rollback.update(|r| r.tap = Some(tap.clone()))?;
            let (from, tap_name, to) = (late.netns.clone(), late.tap.clone(), netns.clone());
            let adopted = tokio::task::spawn_blocking(move || {
                capsid_sandbox::network::adopt_tap(&from, &tap_name, &to)
            })
            .await
            .map_err(|e| ContainerError::Internal(format!("network attach task: {e}")))??;
            sandbox
                .configure_late_network(&adopted.guest, &late.boot_mac)
                .await?;
            attachment = Some(adopted);
        }
        NetMode::Own => late_network = Some(late),
        NetMode::None | NetMode::Host => {}
    }
    // The VM's processes go where a cold boot would have put them, so
    // the node's accounting sees the container's VM.
    let cgroup = vm_cgroup(&plan.spec);
    if let Some(cgroup) = cgroup.clone() {
        rollback.update(|r| r.cgroup = Some(cgroup.clone()))?;
        let sandbox_name = name.clone();
        tokio::task::spawn_blocking(move || {
            capsid_sandbox::backend::jail::move_sandbox_cgroups(&sandbox_name, &cgroup)
        })
        .await
        .map_err(|e| ContainerError::Internal(format!("cgroup task: {e}")))?
        .map_err(capsid_sandbox::sandbox::SandboxError::from)?;
    }
    rollback.update(|r| r.set_vm_processes(&sandbox.pids()))?;
    // The guest gets the container's size: the balloon gives it (or takes
    // back) the difference from the pool's, within the over-assignment
    // limit.
    let sandbox = Arc::new(sandbox);
    if sandbox.memory().1 != plan.size.memory_mib {
        sandbox.resize(config, plan.size.memory_mib).await?;
    }
    tracing::info!(container = %req.id, sandbox = %name, ?cgroup, memory_mib = plan.size.memory_mib, "container takes a pooled sandbox");

    run_create_hooks(req, plan, &sandbox).await?;
    let dns = container_dns(
        req,
        plan,
        &sandbox,
        attachment.as_ref(),
        late_network.as_ref(),
    )?;
    // The container goes in as a pod's first one does; the pod is only
    // the means (nothing else can join this VM).
    let (_tx, rx) = watch::channel(None);
    let pod = Pod::new(
        &req.id,
        sandbox.clone(),
        plan.size,
        parts.share_dir,
        rx,
        config,
    );
    let added = crate::pod::add(&pod, req, plan, true, dns).await?;
    drop(pod);
    let host_pid = vm_pid(&sandbox)?;
    let record = rollback
        .commit()
        .ok_or_else(|| ContainerError::Internal("the sandbox record is gone".into()))?;
    Ok(Made {
        sandbox,
        record,
        rootfs: None,
        pod: None,
        pid: added.pid,
        host_pid,
        late_network,
        io: added.io,
    })
}

/// The container's resolver settings: the spec's resolv.conf, else what
/// its network's namespace gives. Loopback resolvers (Docker's
/// 127.0.0.11) live in the container's namespace on the host: the guest
/// reaches them through a relay, set up here.
fn container_dns(
    req: &CreateRequest,
    plan: &Plan,
    sandbox: &Sandbox,
    attachment: Option<&capsid_sandbox::network::TapAttachment>,
    late_network: Option<&LateNetwork>,
) -> Result<Option<capsid_sandbox::network::GuestDns>> {
    let from_spec = plan.resolv_conf.as_deref().and_then(network::dns_from_file);
    let dns = from_spec.or_else(|| {
        attachment
            .map(|a| a.guest.dns.clone())
            .filter(|d| !d.is_empty())
    });
    let netns = attachment
        .map(|a| a.netns.clone())
        .or_else(|| late_network.map(|l| l.netns.clone()));
    if let (Some(dns), Some(netns)) = (&dns, &netns) {
        if sandbox.relay_dns(netns, dns)? {
            tracing::info!(container = %req.id, "DNS for loopback resolvers relayed to the host");
        }
    }
    Ok(dns)
}

/// Makes the sandbox's own network namespace and its VM's tap, recorded
/// first (deleting the namespace takes the tap and anything moved in). It
/// is pinned under capsid's state directory, like the sandbox's run
/// directory (Docker keeps its containers' namespaces under its own too).
pub(crate) async fn own_netns(
    config: &Config,
    name: &str,
    rollback: &mut Rollback,
) -> Result<LateNetwork> {
    let dir = config.paths.state_dir.join(OWN_NETNS_DIR);
    let path = dir.join(name);
    rollback.update(|r| r.own_netns = Some(path.clone()))?;
    let tap = tap_name_for(name);
    let boot_mac = own::boot_mac(name);
    let (netns_tap, ns_name) = (tap.clone(), name.to_owned());
    tokio::task::spawn_blocking(move || -> Result<PathBuf> {
        let ns = NamedNetns::create_in(&dir, &ns_name).map_err(NetworkError::from)?;
        own::prepare_tap(ns.path(), &netns_tap)?;
        Ok(ns.keep())
    })
    .await
    .map_err(|e| ContainerError::Internal(format!("network namespace task: {e}")))??;
    tracing::info!(sandbox = name, netns = %path.display(), "network namespace made for the sandbox");
    Ok(LateNetwork {
        netns: path,
        tap,
        boot_mac,
    })
}

/// Runs the spec's prestart/createRuntime hooks on the host, once the VM
/// (the task's pid) exists and before the container is made in it.
pub async fn run_create_hooks(req: &CreateRequest, plan: &Plan, sandbox: &Sandbox) -> Result<()> {
    if plan.hooks.create.is_empty() {
        return Ok(());
    }
    let hooks = plan.hooks.clone();
    let (id, bundle) = (req.id.clone(), req.bundle.clone());
    let pid = vm_pid(sandbox)?;
    tokio::task::spawn_blocking(move || {
        let state = hooks.state(&id, "creating", pid, &bundle);
        hooks::run("prestart/createRuntime", &hooks.create, &state)
    })
    .await
    .map_err(|e| ContainerError::Internal(format!("hook task: {e}")))??;
    Ok(())
}

/// The VM's main host process: the task's pid as containerd and hooks see it.
pub fn vm_pid(sandbox: &Sandbox) -> Result<u32> {
    sandbox.vm_pid().ok_or_else(|| {
        ContainerError::FailedPrecondition("the sandbox VM has no host process left".into())
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

/// The sandbox's name: unique per (namespace, id) — `a-b`/`c` and
/// `a`/`b-c` must never share a run directory — and readable when short:
/// `{namespace}-{id}-{digest}`, the digest of both with a separator that
/// neither may contain; only the digest when that is too long (it names a
/// run directory whose sockets must fit in a Unix socket path).
pub fn sandbox_name(namespace: &str, id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = format!(
        "{:x}",
        Sha256::digest(format!("{namespace}/{id}").as_bytes())
    );
    let name = format!("{namespace}-{id}-{}", &digest[..8]);
    if name.len() <= 48 {
        return name;
    }
    format!("c-{}", &digest[..30])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_names_fit_socket_paths() {
        let short = sandbox_name("default", "t1");
        assert!(short.starts_with("default-t1-"), "{short}");
        assert_eq!(short.len(), "default-t1-".len() + 8);
        assert_ne!(sandbox_name("a-b", "c"), sandbox_name("a", "b-c"));
        let long = "a".repeat(64);
        let name = sandbox_name("k8s.io", &long);
        assert_eq!(name.len(), 32);
        assert!(name.starts_with("c-"));
        assert_ne!(name, sandbox_name("other", &long));
    }
}
