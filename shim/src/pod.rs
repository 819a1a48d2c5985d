//! A Kubernetes pod in one VM. The pod's sandbox (pause) task boots the
//! VM — with the pod's network (the CNI namespace's veth) and a live
//! virtio-fs share, no disk — and runs the pause container in it like
//! any other. Each container of the pod is then added to the running VM:
//! its root filesystem (containerd's snapshot, mounted on the host as
//! runc would) and its volumes become an entry of the share
//! ([`capsid_sandbox::pod_share`]), its IPC, UTS and PID namespaces are
//! the pause container's when the CRI plugin asks to share them, and all
//! of the pod's containers share the VM's network (localhost between
//! them works). The VM is the pod's boundary, as Kata makes it.
//!
//! A container's entry is recorded in its own bundle, so it is taken down
//! at its Delete or by containerd's `delete` after a crash, whichever of
//! the pod's tasks goes first.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use capsid_sandbox::backend::VmExit;
use capsid_sandbox::container::ContainerSpec;
use capsid_sandbox::pod_share::{self, PodEntry};
use capsid_sandbox::record::{HostRecord, PodEntryRecord, RecordFile, Rollback};
use capsid_sandbox::sandbox::Sandbox;
use capsid_sandbox::volumes;
use containerd_shim_protos::api::Mount;
use nix::mount::MsFlags;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use tokio::sync::watch;

use crate::cleanup;
use crate::container::{ContainerError, CreateRequest, Result};
use crate::create::Plan;
use crate::io::{LogOwner, ProcessIo};
use crate::network;
use crate::sizing::VmSize;

/// A pod's memory.
#[derive(Debug)]
struct PodMemory {
    /// The memory limits of the pod's containers, MiB, by container id.
    limits: std::collections::HashMap<String, u64>,
    /// The pod's size: the guest RAM its containers may have, MiB (the
    /// VM's RAM is the maximum, the rest held in the balloon).
    size_mib: u32,
}

/// Whether the pod takes new containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PodState {
    Running,
    Stopping,
}

/// A pod's VM and what its containers share.
#[derive(Debug)]
pub struct Pod {
    /// The pod's sandbox id (its pause task's id).
    pub id: String,
    /// The VM.
    pub sandbox: Arc<Sandbox>,
    /// The VM's size when it booted: the vCPUs every container's quota
    /// must fit in, and the guest RAM its containers had then. Memory
    /// grows as containers are added ([`Pod::fit_memory`]).
    pub size: VmSize,
    /// `[pod] max_memory_mib` when the pod started (0: no growth), named
    /// in errors.
    config_max_mib: u32,
    /// The host's configuration (for the over-assignment limit).
    config: capsid_sandbox::config::Config,
    /// The pod's memory: its containers' limits and its size. Locked
    /// across a resize, so growths happen one at a time.
    memory: tokio::sync::Mutex<PodMemory>,
    /// The VM's share, where containers' entries go.
    share: PathBuf,
    /// The guest pid of the pause container: its namespaces are the pod's.
    pause_pid: AtomicU32,
    /// The VM's end, as the pod sandbox's watcher saw it.
    pub vm_exit: watch::Receiver<Option<VmExit>>,
    state: Mutex<PodState>,
    next_entry: AtomicU32,
    /// The pod's containers told of OOM kills (one reader of the VM's
    /// events, the pod sandbox's).
    pub oom_targets: crate::container::OomTargets,
}

impl Pod {
    /// A pod whose VM is `sandbox`, sharing `share`.
    pub fn new(
        id: &str,
        sandbox: Arc<Sandbox>,
        size: VmSize,
        share: PathBuf,
        vm_exit: watch::Receiver<Option<VmExit>>,
        config: &capsid_sandbox::config::Config,
    ) -> Self {
        Self {
            id: id.to_string(),
            sandbox,
            size,
            config_max_mib: config.pod.max_memory_mib,
            config: config.clone(),
            memory: tokio::sync::Mutex::new(PodMemory {
                limits: Default::default(),
                size_mib: size.memory_mib,
            }),
            share,
            pause_pid: AtomicU32::new(0),
            vm_exit,
            state: Mutex::new(PodState::Running),
            next_entry: AtomicU32::new(0),
            oom_targets: Default::default(),
        }
    }

    /// Records container `id`'s memory limit (`None`: none) and grows the
    /// VM when the pod's containers' limits plus the guest's headroom
    /// exceed what the guest may use now: the balloon deflates by the
    /// difference. Past the VM's maximum, or past the host's
    /// over-assignment limit, it is refused and nothing changes.
    pub async fn fit_memory(&self, id: &str, limit_mib: Option<u64>) -> Result<()> {
        let mut memory = self.memory.lock().await;
        let mut next = memory.limits.clone();
        match limit_mib {
            Some(l) => next.insert(id.to_string(), l),
            None => next.remove(id),
        };
        let total: u64 = next.values().copied().fold(0, u64::saturating_add);
        let (vm_mib, _) = self.sandbox.memory();
        if let Some(grow_to) = crate::sizing::pod_growth(
            total,
            limit_mib.unwrap_or(0),
            memory.size_mib,
            vm_mib,
            self.config_max_mib,
        )? {
            let hotplug = capsid_sandbox::hotplug::grows_by_hotplug(&self.config, vm_mib);
            let usable = crate::sizing::pod_vm_usable(grow_to, vm_mib, hotplug);
            self.sandbox.resize(&self.config, usable).await?;
            tracing::info!(pod = %self.id, container = %id, from_mib = memory.size_mib, to_mib = grow_to, vm_mib, "pod VM grown");
            memory.size_mib = grow_to;
        }
        memory.limits = next;
        Ok(())
    }

    /// Container `id`'s recorded memory limit.
    pub async fn memory_limit(&self, id: &str) -> Option<u64> {
        self.memory.lock().await.limits.get(id).copied()
    }

    /// Records container `id`'s memory limit without resizing the VM (a
    /// container that left, or an update undone). The VM keeps its size:
    /// what the guest frees returns to the host by free page reporting.
    pub async fn put_memory_limit(&self, id: &str, limit_mib: Option<u64>) {
        let mut memory = self.memory.lock().await;
        match limit_mib {
            Some(l) => memory.limits.insert(id.to_string(), l),
            None => memory.limits.remove(id),
        };
    }

    /// Refuses new containers from now on (the pod is being stopped).
    pub fn stop_taking(&self) {
        if let Ok(mut s) = self.state.lock() {
            *s = PodState::Stopping;
        }
    }

    fn check_running(&self) -> Result<()> {
        let stopping = self
            .state
            .lock()
            .map(|s| *s == PodState::Stopping)
            .unwrap_or(true);
        if stopping {
            return Err(ContainerError::FailedPrecondition(format!(
                "pod sandbox {} is stopping: it takes no new containers",
                self.id
            )));
        }
        if self.vm_exit.borrow().is_some() {
            return Err(ContainerError::FailedPrecondition(format!(
                "the VM of pod sandbox {} has exited",
                self.id
            )));
        }
        Ok(())
    }
}

/// A container added to a pod's VM.
#[derive(Debug)]
pub struct Added {
    /// The record of its entry (kept in its bundle until Delete; none
    /// for the pause container, whose entry goes with the pod).
    pub record: Option<RecordFile<HostRecord>>,
    /// The init's guest pid.
    pub pid: u32,
    /// The init's stdio copying.
    pub io: ProcessIo,
}

/// The namespaces the spec joins by path (besides the network's): a pod
/// container's IPC, UTS and PID namespaces are the pause container's, as
/// the CRI plugin asks by naming the sandbox's (`/proc/<pid>/ns/…`).
/// Read before [`crate::spec::adapt`] clears the host paths.
pub fn joined_namespaces(spec: &Spec) -> Vec<LinuxNamespaceType> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .map(|list| {
            list.iter()
                .filter(|n| {
                    matches!(
                        n.typ(),
                        LinuxNamespaceType::Ipc | LinuxNamespaceType::Uts | LinuxNamespaceType::Pid
                    ) && n.path().as_ref().is_some_and(|p| !p.as_os_str().is_empty())
                })
                .map(|n| n.typ())
                .collect()
        })
        .unwrap_or_default()
}

/// Points the spec's `joined` namespaces at the pause container's, by
/// their guest paths.
fn join_pause_namespaces(spec: &mut Spec, joined: &[LinuxNamespaceType], pause_pid: u32) {
    let Some(mut linux) = spec.linux().clone() else {
        return;
    };
    let Some(mut namespaces) = linux.namespaces().clone() else {
        return;
    };
    for ns in &mut namespaces {
        let name = match ns.typ() {
            LinuxNamespaceType::Ipc => "ipc",
            LinuxNamespaceType::Uts => "uts",
            LinuxNamespaceType::Pid => "pid",
            _ => continue,
        };
        if joined.contains(&ns.typ()) {
            ns.set_path(Some(PathBuf::from(format!("/proc/{pause_pid}/ns/{name}"))));
        }
    }
    linux.set_namespaces(Some(namespaces));
    spec.set_linux(Some(linux));
}

/// A pod's containers that share its IPC namespace share its `/dev/shm`
/// too (the CRI plugin binds the sandbox's into each): the pause
/// container's, bound from its root in the guest.
fn share_pause_shm(spec: &mut Spec, pause_pid: u32) {
    let Some(mut mounts) = spec.mounts().clone() else {
        return;
    };
    for m in &mut mounts {
        if m.destination() == Path::new("/dev/shm") {
            m.set_typ(Some("bind".into()));
            m.set_source(Some(PathBuf::from(format!(
                "/proc/{pause_pid}/root/dev/shm"
            ))));
            m.set_options(Some(
                ["rbind", "nosuid", "nodev", "noexec"]
                    .map(String::from)
                    .to_vec(),
            ));
        }
    }
    spec.set_mounts(Some(mounts));
}

/// Adds the container of `req` to `pod`'s VM: its rootfs and volumes in
/// an entry of the share, then the container through the agent, with
/// `dns` (else the spec's resolv.conf). On error nothing of it is left.
pub async fn add(
    pod: &Pod,
    req: &CreateRequest,
    plan: &Plan,
    pause: bool,
    dns: Option<capsid_sandbox::network::GuestDns>,
) -> Result<Added> {
    pod.check_running()?;
    if pause {
        return add_fitted(pod, req, plan, true, dns).await;
    }
    crate::sizing::check_fits_pod(&plan.spec, pod.size)?;
    pod.fit_memory(&req.id, crate::sizing::spec_memory_limit_mib(&plan.spec))
        .await?;
    let added = add_fitted(pod, req, plan, false, dns).await;
    if added.is_err() {
        pod.put_memory_limit(&req.id, None).await;
    }
    added
}

/// [`add`], once the container's limits fit in the pod's VM.
async fn add_fitted(
    pod: &Pod,
    req: &CreateRequest,
    plan: &Plan,
    pause: bool,
    dns: Option<capsid_sandbox::network::GuestDns>,
) -> Result<Added> {
    let n = pod.next_entry.fetch_add(1, Ordering::SeqCst);
    let name = format!("c{n}");
    // The pause container's entry goes with the pod's share (the pod
    // sandbox's record); every other container's is recorded in its own
    // bundle, with no run directory: the VM is not its to take down.
    let rollback = if pause {
        None
    } else {
        Some(Rollback::begin(
            cleanup::state_path(&req.bundle),
            HostRecord {
                pod_entry: Some(PodEntryRecord {
                    share: pod.share.clone(),
                    name: name.clone(),
                }),
                ..HostRecord::new(format!("{}/{}", pod.id, req.id), PathBuf::new())
            },
        )?)
    };
    let guard = EntryGuard {
        share: pod.share.clone(),
        name: name.clone(),
        armed: true,
    };
    let mut spec = plan.spec.clone();
    let guest_dir = Path::new(volumes::GUEST_SHARE_DIR).join(&name);
    let volumes = volumes::take_volumes_at(&mut spec, &guest_dir)?;
    if !pause {
        let pause_pid = pod.pause_pid.load(Ordering::SeqCst);
        join_pause_namespaces(&mut spec, &plan.joined_namespaces, pause_pid);
        if plan.joined_namespaces.contains(&LinuxNamespaceType::Ipc) {
            share_pause_shm(&mut spec, pause_pid);
        }
    }
    let (share, entry_name, mounts, bundle_root) = (
        pod.share.clone(),
        name.clone(),
        req.rootfs.clone(),
        plan.root_dir.clone(),
    );
    let protected = plan.protected.clone();
    let entry = tokio::task::spawn_blocking(move || -> Result<PathBuf> {
        let entry = PodEntry::begin(&share, &entry_name)?;
        let rootfs = entry.rootfs_dir();
        mount_rootfs(&mounts, &bundle_root, &rootfs)?;
        // The guest writes here through virtiofsd, as root: nothing it
        // makes (a setuid file, a device node) may act on the host.
        volumes::restrict_tree(&rootfs, false).map_err(|e| {
            ContainerError::Internal(format!(
                "cannot make {} nosuid,nodev: {e}",
                rootfs.display()
            ))
        })?;
        let protected: Vec<&Path> = protected.iter().map(PathBuf::as_path).collect();
        entry.add_volumes(&volumes, &protected)?;
        Ok(entry.publish()?)
    })
    .await
    .map_err(|e| ContainerError::Internal(format!("share entry task: {e}")))??;
    let rootfs_in_share = entry.join(pod_share::ROOTFS);

    // The pause container's hooks ran when its VM was made.
    if !pause {
        crate::create::run_create_hooks(req, plan, &pod.sandbox).await?;
    }
    let dns = dns.or_else(|| plan.resolv_conf.as_deref().and_then(network::dns_from_file));
    let hosts = plan
        .hosts_file
        .as_deref()
        .and_then(network::hosts_from_file);
    let created = pod
        .sandbox
        .create_container(ContainerSpec {
            id: &req.id,
            oci: &spec,
            layers: &[],
            rootfs_in_share: Some(&rootfs_in_share),
            dns: dns.as_ref(),
            hosts: hosts.as_deref(),
            streams: req.stdio.wanted(),
        })
        .await?;
    if pause {
        pod.pause_pid.store(created.pid, Ordering::SeqCst);
    }
    let owner = LogOwner {
        id: req.id.clone(),
        namespace: req.namespace.clone(),
    };
    let io = match ProcessIo::connect(&req.stdio, created.streams, &owner).await {
        Ok(io) => io,
        Err(e) => {
            // The VM runs on: the container made in it goes.
            if let Err(e) = pod.sandbox.remove_container(&req.id).await {
                tracing::warn!(container = %req.id, error = %crate::describe(&e), "cannot remove a half-made container from its pod's VM");
            }
            return Err(e.into());
        }
    };
    let record = match rollback {
        Some(r) => Some(
            r.commit()
                .ok_or_else(|| ContainerError::Internal("the container record is gone".into()))?,
        ),
        None => None,
    };
    guard.disarm();
    Ok(Added {
        record,
        pid: created.pid,
        io,
    })
}

/// Takes a share entry down unless disarmed (a container that could not
/// be created in the VM).
struct EntryGuard {
    share: PathBuf,
    name: String,
    armed: bool,
}

impl EntryGuard {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for EntryGuard {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = pod_share::undo_entry(&self.share, &self.name) {
                tracing::warn!(entry = %self.name, error = %crate::describe(&e), "cannot take a share entry down");
            }
        }
    }
}

/// Mounts containerd's rootfs `mounts` at `target`, as runc would mount
/// them at the bundle's rootfs; with none, the rootfs the caller mounted
/// at `root_dir` is bound there.
fn mount_rootfs(mounts: &[Mount], root_dir: &Path, target: &Path) -> Result<()> {
    let failed = |what: String| {
        move |source: nix::Error| {
            ContainerError::Internal(format!(
                "cannot mount {what} at {}: {source}",
                target.display()
            ))
        }
    };
    match mounts {
        [] => nix::mount::mount(
            Some(root_dir),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(failed(root_dir.display().to_string())),
        [m] => {
            let (flags, data) = mount_options(&m.options);
            let kind = (!m.type_.is_empty() && m.type_ != "bind").then_some(m.type_.as_str());
            nix::mount::mount(
                Some(m.source.as_str()),
                target,
                kind,
                flags,
                (!data.is_empty()).then_some(data.as_str()),
            )
            .map_err(failed(format!("the {} rootfs {}", m.type_, m.source)))
        }
        more => Err(ContainerError::Invalid(format!(
            "{} rootfs mounts (capsid takes one)",
            more.len()
        ))),
    }
}

/// mount(8)-style options: the flags, and the rest as the data string.
fn mount_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" | "defaults" => {}
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxBuilder, LinuxNamespaceBuilder, SpecBuilder};

    fn spec_with(ns: &[(LinuxNamespaceType, Option<&str>)]) -> Spec {
        let list = ns
            .iter()
            .map(|(t, p)| {
                let mut b = LinuxNamespaceBuilder::default().typ(*t);
                if let Some(p) = p {
                    b = b.path(PathBuf::from(p));
                }
                b.build().unwrap()
            })
            .collect::<Vec<_>>();
        SpecBuilder::default()
            .linux(LinuxBuilder::default().namespaces(list).build().unwrap())
            .build()
            .unwrap()
    }

    #[test]
    fn the_pods_namespaces_are_the_pause_containers() {
        use LinuxNamespaceType::*;
        let mut spec = spec_with(&[
            (Network, Some("/proc/77/ns/net")),
            (Ipc, Some("/proc/77/ns/ipc")),
            (Uts, Some("/proc/77/ns/uts")),
            (Pid, None),
            (Mount, None),
        ]);
        let joined = joined_namespaces(&spec);
        assert_eq!(joined, vec![Ipc, Uts]);
        join_pause_namespaces(&mut spec, &joined, 12);
        let ns = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        let path = |t| {
            ns.iter()
                .find(|n| n.typ() == t)
                .and_then(|n| n.path().clone())
        };
        assert_eq!(path(Ipc), Some(PathBuf::from("/proc/12/ns/ipc")));
        assert_eq!(path(Uts), Some(PathBuf::from("/proc/12/ns/uts")));
        assert_eq!(path(Pid), None);
        assert_eq!(path(Mount), None);
    }

    #[test]
    fn mount_options_split_flags_from_data() {
        let (flags, data) = mount_options(&[
            "ro".into(),
            "nosuid".into(),
            "lowerdir=/a:/b".into(),
            "upperdir=/u".into(),
        ]);
        assert_eq!(flags, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID);
        assert_eq!(data, "lowerdir=/a:/b,upperdir=/u");
    }
}
