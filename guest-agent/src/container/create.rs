//! Creating a container: the id reserved, the share mounted if the
//! container uses it, the rootfs assembled, /etc and the OCI spec made to
//! fit the guest, the init created (not started).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use capsid_protocol::agent::{Rootfs, Stdio};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use super::process::Process;
use super::{Container, ContainerError, Containers, Laps, Result, Stage, CGROUP_PARENT};
use crate::lock::LockExt as _;
use crate::rootfs::{self, RootfsError};
use crate::runtime::{Job, STATE_ROOT};
use crate::undo::Undo;

/// Request to create a container.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// Container id.
    pub id: String,
    /// config.json bytes.
    pub spec_json: Vec<u8>,
    /// The rootfs: disks, or a directory of the share.
    pub rootfs: Rootfs,
    /// Stdio wiring.
    pub stdio: Stdio,
    /// resolv.conf servers.
    pub dns_servers: Vec<String>,
    /// resolv.conf search domains.
    pub dns_search: Vec<String>,
    /// resolv.conf options.
    pub dns_options: Vec<String>,
    /// The container's /etc/hosts (empty: the agent's own).
    pub etc_hosts: String,
    /// Non-zero: the host's vsock port answering DNS for the loopback
    /// servers ([`crate::dns_relay`]).
    pub dns_relay_port: u32,
    /// Non-empty: the virtio-fs share the spec's volumes live on.
    pub share_tag: String,
}

impl Containers {
    /// Prepares the container: rootfs, bundle, init process created but not
    /// started. Returns the init's pid.
    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> Result<u32> {
        let _busy = self.standby.busy();
        if !rootfs::valid_id(&req.id) {
            return Err(ContainerError::Invalid(format!(
                "container id {:?}",
                req.id
            )));
        }
        let spec: Spec =
            serde_json::from_slice(&req.spec_json).map_err(|source| ContainerError::Json {
                what: "OCI spec",
                source,
            })?;
        let container = self.reserve(&req.id)?;
        // From here on a failure gives the id back and removes what the
        // container got: its rootfs and bundle, libcontainer's state.
        // The id goes last: a new create of the same id must not start
        // while this one's rootfs is still being torn down.
        let undo = Undo::new(|| {
            if let Err(e) = rootfs::teardown(&req.id) {
                tracing::warn!(container = %req.id, error = %crate::describe(&e), "rootfs of a failed create left");
            }
            let _ = fs::remove_dir_all(Path::new(STATE_ROOT).join(&req.id));
            self.by_id.lock_or_recover().remove(&req.id);
        });
        let pid = self.prepare(&container, &req, spec).await?;
        container.set_stage(Stage::Ready);
        undo.disarm();
        Ok(pid)
    }

    /// Reserves `id` while the slow part of creating it runs.
    fn reserve(&self, id: &str) -> Result<Arc<Container>> {
        let mut by_id = self.by_id.lock_or_recover();
        if by_id.contains_key(id) {
            return Err(ContainerError::AlreadyExists(format!("container {id:?}")));
        }
        let container = Arc::new(Container::new(id));
        by_id.insert(id.to_string(), container.clone());
        Ok(container)
    }

    /// The slow part of [`Self::create`], on the reserved `container`.
    async fn prepare(
        self: &Arc<Self>,
        container: &Arc<Container>,
        req: &CreateRequest,
        mut spec: Spec,
    ) -> Result<u32> {
        let mut laps = Laps::new("create", &req.id);
        rootfs::check(&req.rootfs).map_err(ContainerError::BadRootfs)?;
        let in_share = !req.rootfs.share_path.is_empty();
        if in_share && req.share_tag.is_empty() {
            return Err(ContainerError::Invalid(
                "a rootfs in the share needs the share's tag".into(),
            ));
        }
        // The share first: a rootfs may live on it.
        if !req.share_tag.is_empty() {
            crate::share::ensure(&req.share_tag)
                .map_err(|e| ContainerError::Runtime(crate::describe(&e)))?;
        }
        let id = req.id.clone();
        let rootfs_spec = req.rootfs.clone();
        let dirs = tokio::task::spawn_blocking(move || {
            rootfs::assemble(&id, &rootfs_spec, Path::new(crate::share::SHARE_DIR))
        })
        .await
        .map_err(ContainerError::task("rootfs task"))?
        .map_err(|e| rootfs_error("assembling the rootfs", e))?;
        laps.lap("rootfs");
        let hostname = spec.hostname().clone().unwrap_or_default();
        match rootfs::write_etc(
            &dirs.rootfs,
            &hostname,
            &req.etc_hosts,
            &req.dns_servers,
            &req.dns_search,
            &req.dns_options,
        ) {
            // The host may export a rootfs read-only: its /etc files are
            // then the spec's binds or the image's own.
            Err(RootfsError::Write { path, source })
                if in_share && source.raw_os_error() == Some(libc::EROFS) =>
            {
                tracing::warn!(container = %req.id, path = %path.display(), "read-only rootfs in the share: /etc left as it is");
            }
            done => done.map_err(|e| rootfs_error("writing /etc", e))?,
        }
        // root.readonly is the runtime's to apply, once the mount points
        // the spec needs (/proc, /dev, ...) are made in the rootfs, as
        // runc does: an image may lack them (a pause image holds one file).
        if req.dns_relay_port != 0 {
            crate::dns_relay::ensure(&req.dns_servers, req.dns_relay_port)
                .await
                .map_err(|e| ContainerError::Runtime(crate::describe(&e)))?;
        }

        let net_sysctls = adapt_spec(&mut spec, &dirs.rootfs, &req.id, req.stdio.terminal)?;
        container.shares_pid_namespace.store(
            !owns_pid_namespace(&spec),
            std::sync::atomic::Ordering::SeqCst,
        );
        check_program(&spec, &dirs.rootfs)?;
        crate::sysctl::apply(&net_sysctls)
            .map_err(|e| ContainerError::Invalid(crate::describe(&e)))?;
        let config = dirs.bundle.join("config.json");
        spec.save(&config).map_err(ContainerError::SaveSpec)?;
        laps.lap("etc+spec");

        let process = Process::new("");
        container
            .processes
            .lock_or_recover()
            .insert(String::new(), process.clone());
        let job = Job::Create {
            id: req.id.clone(),
            bundle: dirs.bundle.clone(),
        };
        let pid = self
            .run_runtime(container, &process, job, &req.stdio)
            .await?;
        laps.lap("runtime");
        Ok(u32::try_from(pid).unwrap_or(0))
    }
}

/// A rootfs failure is the request's when it names a disk the guest lacks,
/// a share path it cannot open beneath the share, or something the guest
/// refuses; the guest's otherwise.
fn rootfs_error(what: &'static str, e: RootfsError) -> ContainerError {
    match e {
        RootfsError::NoSuchDisk(_) | RootfsError::Invalid(_) | RootfsError::Share { .. } => {
            ContainerError::BadRootfs(e)
        }
        source => ContainerError::Rootfs { what, source },
    }
}

/// The host runs the hooks it can (prestart, createRuntime, poststart,
/// poststop) and leaves the guest those that run in the container's
/// namespaces: a createContainer hook must be a program of the guest
/// (the runtime's namespace), a startContainer hook one of the container's
/// filesystem. Those that are not are dropped, each with a log line.
fn keep_guest_hooks(spec: &mut Spec, rootfs: &Path) {
    let Some(mut hooks) = spec.hooks().clone() else {
        return;
    };
    let keep = |stage: &str, list: Option<Vec<oci_spec::runtime::Hook>>, root: &Path| {
        let kept: Vec<_> = list
            .unwrap_or_default()
            .into_iter()
            .filter(|h| {
                let found = rootfs::resolve_in(root, h.path()).is_some_and(|p| p.is_file());
                if !found {
                    tracing::warn!(stage, hook = %h.path().display(), "hook program not in the guest: dropped");
                }
                found
            })
            .collect();
        (!kept.is_empty()).then_some(kept)
    };
    hooks.set_create_container(keep(
        "createContainer",
        hooks.create_container().clone(),
        Path::new("/"),
    ));
    hooks.set_start_container(keep(
        "startContainer",
        hooks.start_container().clone(),
        rootfs,
    ));
    spec.set_hooks(Some(hooks));
}

/// Refuses a main program the kernel could not execute, with the reason.
fn check_program(spec: &Spec, rootfs: &Path) -> Result<()> {
    let Some(process) = spec.process() else {
        return Ok(());
    };
    let Some(program) = process.args().as_ref().and_then(|a| a.first()) else {
        return Err(ContainerError::Invalid("the process has no args".into()));
    };
    let path = process
        .env()
        .as_ref()
        .and_then(|env| env.iter().find_map(|kv| kv.strip_prefix("PATH=")))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let mount_points: Vec<PathBuf> = spec
        .mounts()
        .iter()
        .flatten()
        .map(|m| m.destination().clone())
        .collect();
    // A relative path with a slash is relative to the working directory.
    let program = if program.contains('/') && !program.starts_with('/') {
        process.cwd().join(program).display().to_string()
    } else {
        program.clone()
    };
    rootfs::check_executable(rootfs, &program, path, &mount_points)
        .map_err(ContainerError::NotExecutable)
}

/// Whether the spec gives the container a PID namespace of its own (an
/// entry without a path).
fn owns_pid_namespace(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| {
            ns.iter().any(|n| {
                n.typ() == LinuxNamespaceType::Pid
                    && n.path().as_ref().is_none_or(|p| p.as_os_str().is_empty())
            })
        })
}

/// Makes the host's OCI spec fit the guest: the rootfs is the assembled
/// overlay (or share bind), the cgroup is under /capsid, the terminal flag
/// follows the stdio request, the container shares the VM's network
/// namespace — the VM is the network boundary, and the agent configures
/// its NIC — and seccomp argument rules are put in libcontainer's order.
/// Every other namespace entry is kept as it is, a `path` included: a
/// pod's container joins the IPC, UTS and PID namespaces of the pod's
/// first container by the `/proc/<guest pid>/ns/*` paths the host wrote,
/// and libcontainer setns(2)es into them (sethostname only for a UTS
/// namespace of its own). Returns the `net.*` sysctls, which the agent
/// applies itself ([`crate::sysctl`]).
fn adapt_spec(
    spec: &mut Spec,
    rootfs: &Path,
    id: &str,
    terminal: bool,
) -> Result<Vec<(String, String)>> {
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(rootfs.to_path_buf());
    spec.set_root(Some(root));
    let mut process = spec
        .process()
        .clone()
        .ok_or_else(|| ContainerError::Invalid("OCI spec has no process".into()))?;
    process.set_terminal(Some(terminal));
    spec.set_process(Some(process));
    let mut linux = spec.linux().clone().unwrap_or_default();
    linux.set_cgroups_path(Some(PathBuf::from(CGROUP_PARENT).join(id)));
    if let Some(ns) = linux.namespaces().clone() {
        let kept = ns
            .into_iter()
            .filter(|n| n.typ() != LinuxNamespaceType::Network)
            .collect();
        linux.set_namespaces(Some(kept));
    }
    if let Some(mut seccomp) = linux.seccomp().clone() {
        crate::seccomp::adapt(&mut seccomp);
        linux.set_seccomp(Some(seccomp));
    }
    keep_guest_hooks(spec, rootfs);
    let mut net_sysctls = Vec::new();
    if let Some(mut sysctls) = linux.sysctl().clone() {
        net_sysctls = crate::sysctl::take_net(&mut sysctls);
        linux.set_sysctl(Some(sysctls));
    }
    spec.set_linux(Some(linux));
    Ok(net_sysctls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_is_adapted_to_the_guest() {
        let mut spec = Spec::default();
        let mut linux = spec.linux().clone().unwrap();
        let ns = linux.namespaces().clone().unwrap();
        assert!(ns.iter().any(|n| n.typ() == LinuxNamespaceType::Network));
        linux.set_namespaces(Some(ns));
        spec.set_linux(Some(linux));
        adapt_spec(
            &mut spec,
            Path::new("/run/capsid/bundles/c1/rootfs"),
            "c1",
            true,
        )
        .unwrap();
        assert_eq!(
            spec.root().as_ref().unwrap().path(),
            Path::new("/run/capsid/bundles/c1/rootfs")
        );
        assert_eq!(spec.process().as_ref().unwrap().terminal(), Some(true));
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/capsid/c1"))
        );
        assert!(linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .all(|n| n.typ() != LinuxNamespaceType::Network));
        assert!(linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .any(|n| n.typ() == LinuxNamespaceType::Pid));
    }

    #[test]
    fn namespaces_given_by_path_are_kept_to_be_joined() {
        use oci_spec::runtime::LinuxNamespaceBuilder;
        let mut spec = Spec::default();
        let mut linux = spec.linux().clone().unwrap();
        let mut ns: Vec<_> = linux
            .namespaces()
            .clone()
            .unwrap()
            .into_iter()
            .filter(|n| {
                !matches!(
                    n.typ(),
                    LinuxNamespaceType::Ipc | LinuxNamespaceType::Uts | LinuxNamespaceType::Pid
                )
            })
            .collect();
        for (typ, name) in [
            (LinuxNamespaceType::Ipc, "ipc"),
            (LinuxNamespaceType::Uts, "uts"),
            (LinuxNamespaceType::Pid, "pid"),
            (LinuxNamespaceType::Network, "net"),
        ] {
            ns.retain(|n| n.typ() != typ);
            ns.push(
                LinuxNamespaceBuilder::default()
                    .typ(typ)
                    .path(format!("/proc/42/ns/{name}"))
                    .build()
                    .unwrap(),
            );
        }
        linux.set_namespaces(Some(ns));
        spec.set_linux(Some(linux));
        spec.set_hostname(Some("ignored-when-joined".into()));
        adapt_spec(&mut spec, Path::new("/r"), "c2", false).unwrap();
        let kept = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        let path_of = |typ| {
            kept.iter()
                .find(|n| n.typ() == typ)
                .and_then(|n| n.path().clone())
        };
        for (typ, name) in [
            (LinuxNamespaceType::Ipc, "ipc"),
            (LinuxNamespaceType::Uts, "uts"),
            (LinuxNamespaceType::Pid, "pid"),
        ] {
            assert_eq!(
                path_of(typ),
                Some(PathBuf::from(format!("/proc/42/ns/{name}"))),
                "{name}"
            );
        }
        assert!(kept.iter().all(|n| n.typ() != LinuxNamespaceType::Network));
        // Mount and cgroup namespaces stay the container's own.
        assert!(kept
            .iter()
            .any(|n| n.typ() == LinuxNamespaceType::Mount && n.path().is_none()));
    }

    #[test]
    fn guest_hooks_are_kept_only_when_their_program_is_there() {
        let rootfs = tempfile::tempdir().unwrap();
        std::fs::create_dir(rootfs.path().join("bin")).unwrap();
        std::fs::write(rootfs.path().join("bin/in-image"), "#!/bin/sh\n").unwrap();
        let mut spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "hooks": {
                "createContainer": [{"path": "/bin/sh"}, {"path": "/usr/bin/nerdctl"}],
                "startContainer": [{"path": "/bin/in-image"}, {"path": "/bin/not-in-image"}]
            }
        }))
        .unwrap();
        keep_guest_hooks(&mut spec, rootfs.path());
        let hooks = spec.hooks().as_ref().unwrap();
        let paths = |h: &Option<Vec<oci_spec::runtime::Hook>>| {
            h.iter()
                .flatten()
                .map(|h| h.path().display().to_string())
                .collect::<Vec<_>>()
        };
        // createContainer: programs of the guest itself (this test's host).
        assert_eq!(paths(hooks.create_container()), ["/bin/sh"]);
        assert_eq!(paths(hooks.start_container()), ["/bin/in-image"]);
    }

    #[test]
    fn a_joined_or_missing_pid_namespace_is_shared() {
        let with = |ns: serde_json::Value| -> Spec {
            serde_json::from_value(serde_json::json!({
                "ociVersion": "1.0.2",
                "linux": {"namespaces": ns}
            }))
            .unwrap()
        };
        assert!(owns_pid_namespace(&with(
            serde_json::json!([{"type": "pid"}])
        )));
        assert!(!owns_pid_namespace(&with(
            serde_json::json!([{"type": "pid", "path": "/proc/7/ns/pid"}])
        )));
        assert!(!owns_pid_namespace(&with(
            serde_json::json!([{"type": "mount"}])
        )));
    }

    #[test]
    fn spec_without_process_is_refused() {
        let mut spec = Spec::default();
        spec.set_process(None);
        let e = adapt_spec(&mut spec, Path::new("/r"), "c1", false).unwrap_err();
        assert!(e.to_string().contains("no process"));
    }

    #[test]
    fn rootfs_failures_are_sorted_by_fault() {
        let e = rootfs_error("assembling the rootfs", RootfsError::NoSuchDisk("d".into()));
        assert_eq!(e.kind(), super::super::ErrorKind::Invalid);
        let e = rootfs_error(
            "assembling the rootfs",
            RootfsError::Mount {
                what: "ext4 /dev/vda".into(),
                target: "/r".into(),
                source: nix::Error::EBUSY,
            },
        );
        assert_eq!(e.kind(), super::super::ErrorKind::Internal);
        assert!(crate::describe(&e)
            .starts_with("assembling the rootfs: cannot mount ext4 /dev/vda on /r: "));
    }
}
