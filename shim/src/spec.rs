//! containerd's config.json made fit for a guest. Host LSM labels and host
//! namespace paths (other than the network's) are dropped. Host bind
//! mounts stay, to be shared with the VM over virtio-fs
//! (`capsid_sandbox::volumes`) — except the few that the CRI plugin and
//! Docker add for every container, which the guest provides itself
//! (/etc/hosts, /etc/hostname and /etc/resolv.conf are written by the
//! agent; /dev/shm becomes a tmpfs of the container's own;
//! /dev/termination-log stays in the container's rootfs).

use oci_spec::runtime::{LinuxNamespaceType, Mount, MountBuilder, Spec};

/// Errors adapting the spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The spec has no process to run.
    #[error("the OCI spec has no process")]
    NoProcess,
    /// A mount capsid puts in place of a host bind could not be built
    /// (oci-spec's builder fails only on a missing field: capsid's mistake).
    #[error("cannot build the {destination} mount: this is a capsid bug, please report it")]
    Mount {
        /// Where the mount goes in the container.
        destination: &'static str,
        /// What oci-spec said.
        #[source]
        source: oci_spec::OciSpecError,
    },
}

/// Result of spec adaptation.
pub type Result<T> = std::result::Result<T, SpecError>;

/// Files the guest agent writes into every container.
const GUEST_PROVIDED: &[&str] = &[
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/dev/termination-log",
];

use capsid_sandbox::volumes::is_bind;

/// Checks and adapts `spec`; says what it changed, for the log.
pub fn adapt(spec: &mut Spec) -> Result<Vec<String>> {
    if spec.process().is_none() {
        return Err(SpecError::NoProcess);
    }
    let mut changes = drop_lsm_labels(spec);
    changes.extend(unjoin_host_namespaces(spec));
    changes.extend(adapt_mounts(spec)?);
    Ok(changes)
}

/// The host's LSM (AppArmor, SELinux) labels mean nothing to the guest,
/// which runs neither: the VM is the confinement. Docker sets them on hosts
/// that have an LSM.
fn drop_lsm_labels(spec: &mut Spec) -> Vec<String> {
    let mut dropped = Vec::new();
    if let Some(mut process) = spec.process().clone() {
        if let Some(profile) = process.apparmor_profile().clone() {
            dropped.push(format!("AppArmor profile {profile}"));
            process.set_apparmor_profile(None);
        }
        if let Some(label) = process.selinux_label().clone() {
            dropped.push(format!("SELinux label {label}"));
            process.set_selinux_label(None);
        }
        spec.set_process(Some(process));
    }
    if let Some(mut linux) = spec.linux().clone() {
        if let Some(label) = linux.mount_label().clone() {
            dropped.push(format!("SELinux mount label {label}"));
            linux.set_mount_label(None);
            spec.set_linux(Some(linux));
        }
    }
    if dropped.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "dropped the host's LSM labels, the guest has no LSM: {}",
        dropped.join(", ")
    )]
}

/// A namespace path (other than the network's, which the VM joins) names a
/// host process's namespace — Docker's `--ipc/--pid container:X` — which no
/// guest can enter: the container gets a namespace of its own in the VM.
fn unjoin_host_namespaces(spec: &mut Spec) -> Vec<String> {
    let Some(mut linux) = spec.linux().clone() else {
        return Vec::new();
    };
    let Some(mut namespaces) = linux.namespaces().clone() else {
        return Vec::new();
    };
    let mut changes = Vec::new();
    for ns in &mut namespaces {
        if ns.typ() == LinuxNamespaceType::Network {
            continue;
        }
        if let Some(path) = ns.path().clone().filter(|p| !p.as_os_str().is_empty()) {
            changes.push(format!(
                "{:?} namespace {} is on the host: the container gets its own in the VM",
                ns.typ(),
                path.display()
            ));
            ns.set_path(None);
        }
    }
    linux.set_namespaces(Some(namespaces));
    spec.set_linux(Some(linux));
    changes
}

/// Checks and adapts the mounts.
fn adapt_mounts(spec: &mut Spec) -> Result<Vec<String>> {
    let mut changes = Vec::new();
    let Some(mounts) = spec.mounts().clone() else {
        return Ok(changes);
    };
    let mut kept = Vec::with_capacity(mounts.len());
    for m in mounts {
        if !is_bind(&m) {
            kept.push(m);
            continue;
        }
        let destination = m.destination().display().to_string();
        let source = m
            .source()
            .as_ref()
            .map(|s| s.display().to_string())
            .unwrap_or_default();
        if GUEST_PROVIDED.contains(&destination.as_str()) {
            changes.push(format!("dropped bind of {source} on {destination}"));
            continue;
        }
        if destination == "/dev/shm" {
            kept.push(shm_tmpfs()?);
            changes.push(format!("/dev/shm is a tmpfs instead of {source}"));
            continue;
        }
        kept.push(m);
    }
    spec.set_mounts(Some(kept));
    Ok(changes)
}

fn shm_tmpfs() -> Result<Mount> {
    MountBuilder::default()
        .destination("/dev/shm")
        .typ("tmpfs")
        .source("shm")
        .options(
            ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
                .map(String::from)
                .to_vec(),
        )
        .build()
        .map_err(|source| SpecError::Mount {
            destination: "/dev/shm",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(mounts: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "mounts": mounts
        }))
        .unwrap()
    }

    #[test]
    fn default_mounts_pass() {
        let mut s = spec_with(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"}
        ]));
        assert!(adapt(&mut s).unwrap().is_empty());
        assert_eq!(s.mounts().as_ref().unwrap().len(), 2);
    }

    #[test]
    fn host_binds_stay_for_the_share() {
        let mut s = spec_with(serde_json::json!([
            {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "rw"]},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind"]}
        ]));
        adapt(&mut s).unwrap();
        let mounts = s.mounts().as_ref().unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(
            mounts[0].source().as_deref(),
            Some(std::path::Path::new("/srv/data"))
        );
    }

    #[test]
    fn cri_files_are_provided_by_the_guest() {
        let mut s = spec_with(serde_json::json!([
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind"]},
            {"destination": "/dev/shm", "type": "bind", "source": "/run/x/shm", "options": ["rbind"]},
            {"destination": "/proc", "type": "proc", "source": "proc"}
        ]));
        let changes = adapt(&mut s).unwrap();
        assert_eq!(changes.len(), 2, "{changes:?}");
        let mounts = s.mounts().as_ref().unwrap();
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].typ().as_deref(), Some("tmpfs"));
        assert_eq!(mounts[0].destination().to_str(), Some("/dev/shm"));
    }

    #[test]
    fn lsm_labels_and_host_namespace_paths_are_adapted() {
        let mut s: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                        "apparmorProfile": "docker-default", "selinuxLabel": "system_u:r:t"},
            "root": {"path": "rootfs"},
            "linux": {"mountLabel": "system_u:object_r:f", "namespaces": [
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "network", "path": "/var/run/netns/n"},
                {"type": "pid"}
            ]}
        }))
        .unwrap();
        let changes = adapt(&mut s).unwrap();
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(changes[0].contains("docker-default"), "{changes:?}");
        let p = s.process().as_ref().unwrap();
        assert!(p.apparmor_profile().is_none() && p.selinux_label().is_none());
        let linux = s.linux().as_ref().unwrap();
        assert!(linux.mount_label().is_none());
        let ns = linux.namespaces().as_ref().unwrap();
        assert_eq!(ns[0].path(), &None);
        assert_eq!(
            ns[1].path().as_deref(),
            Some(std::path::Path::new("/var/run/netns/n"))
        );
        assert_eq!(ns.len(), 3);
    }

    #[test]
    fn a_spec_without_process_is_refused() {
        let mut s = spec_with(serde_json::json!([]));
        s.set_process(None);
        assert!(matches!(adapt(&mut s), Err(SpecError::NoProcess)));
    }
}
