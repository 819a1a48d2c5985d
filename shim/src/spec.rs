//! containerd's config.json made fit for a guest: host bind mounts cannot
//! reach into the VM, so they are refused with a clear error — except the
//! few that the CRI plugin adds for every container, which the guest
//! provides itself (/etc/hosts, /etc/hostname and /etc/resolv.conf are
//! written by the agent; /dev/shm becomes a tmpfs of the container's own;
//! /dev/termination-log stays in the container's rootfs).

use oci_spec::runtime::{Mount, MountBuilder, Spec};

/// Errors adapting the spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A host bind mount.
    #[error(
        "host bind mount {source} -> {destination} is not supported: \
         capsid cannot share host directories with the VM yet",
        source = host
    )]
    HostBind {
        /// The host path.
        host: String,
        /// Where the container wanted it.
        destination: String,
    },
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

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"))
}

/// Checks and adapts `spec`'s mounts; says what it changed, for the log.
pub fn adapt(spec: &mut Spec) -> Result<Vec<String>> {
    if spec.process().is_none() {
        return Err(SpecError::NoProcess);
    }
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
        return Err(SpecError::HostBind {
            host: source,
            destination,
        });
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
    fn host_binds_are_refused_by_name() {
        let mut s = spec_with(serde_json::json!([
            {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "rw"]}
        ]));
        let e = adapt(&mut s).unwrap_err().to_string();
        assert!(e.contains("/srv/data -> /data"), "{e}");
        let mut s = spec_with(serde_json::json!([
            {"destination": "/data", "source": "/srv/data", "options": ["bind"]}
        ]));
        assert!(matches!(adapt(&mut s), Err(SpecError::HostBind { .. })));
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
    fn a_spec_without_process_is_refused() {
        let mut s = spec_with(serde_json::json!([]));
        s.set_process(None);
        assert!(matches!(adapt(&mut s), Err(SpecError::NoProcess)));
    }
}
