//! The container's network: when the OCI spec names a network namespace by
//! path (CNI, the CRI plugin, nerdctl, `ctr run --with-ns`), the VM gets a
//! NIC on a tap joined to that namespace's veth, and the guest takes over
//! the veth's addresses and routes. A new network namespace without a path
//! (Docker ≥ 26) is made by the shim, the VM's processes live in it, and the
//! interface that appears there before Start is joined then
//! ([`capsid_sandbox::network::own`]). Either way the tap is guarded
//! against spoofing before its redirect to the interface exists: only the
//! interface's MAC and addresses (what the CNI or Docker gave it) get out
//! (`capsid_sandbox::cni::containment::guard`). No network namespace
//! entry, no NIC.
//! The container itself shares the VM's network namespace (the agent drops
//! the entry).

use std::path::{Path, PathBuf};

use capsid_sandbox::netns::{self, NetnsError};
use capsid_sandbox::network::{self, GuestDns, NetworkError, TapAttachment, TapRecord};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// Where the VM's NIC goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetMode {
    /// No NIC of its own: a pod's container, in its pod's VM.
    None,
    /// The spec has no network namespace entry: it wants the host's
    /// network, which a VM cannot share (refused at Create).
    Host,
    /// Joined to the veth of the namespace at this path.
    Join(PathBuf),
    /// A namespace of the sandbox's own, wired at Start.
    Own,
}

/// What the spec asks of the network. A pod's sandbox (pause) spec names
/// the pod's namespace (the CNI's): the pod's VM gets the NIC there.
pub fn mode(spec: &Spec) -> NetMode {
    let entry = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| ns.iter().find(|n| n.typ() == LinuxNamespaceType::Network));
    match entry {
        None => NetMode::Host,
        Some(n) => match n.path().clone().filter(|p| !p.as_os_str().is_empty()) {
            Some(path) => NetMode::Join(path),
            None => NetMode::Own,
        },
    }
}

/// Checks the namespace exists and is not the host's own (a VM joined to
/// it would take over the host's addresses), before anything is made.
pub fn check_netns(path: &Path) -> Result<(), NetworkError> {
    netns::check_exists(path)?;
    let host = ["/proc/self/ns/net", "/proc/1/ns/net"];
    if host
        .iter()
        .any(|h| netns::same_namespace(path, Path::new(h)))
    {
        return Err(NetworkError::NoInterface {
            netns: path.to_owned(),
            reason: "this is the host's own network namespace; a VM cannot join it".into(),
        });
    }
    Ok(())
}

/// Makes the tap and wiring of `tap` (blocking work off the runtime).
pub async fn attach(tap: &TapRecord) -> Result<TapAttachment, NetworkError> {
    let tap = tap.clone();
    tokio::task::spawn_blocking(move || network::attach(&tap.netns, &tap.tap))
        .await
        .map_err(|e| NetnsError::Spawn {
            program: "network attach task".into(),
            source: std::io::Error::other(e),
        })?
}

/// The host file the spec binds on `destination` (/etc/resolv.conf and
/// /etc/hosts: the CRI plugin's, Docker's and nerdctl's way of giving
/// resolver settings and host names).
pub fn bind_source(spec: &Spec, destination: &str) -> Option<PathBuf> {
    spec.mounts()
        .as_ref()?
        .iter()
        .find(|m| m.destination() == Path::new(destination))?
        .source()
        .clone()
}

/// The largest /etc/hosts passed to the guest.
const MAX_HOSTS: u64 = 64 << 10;

/// An /etc/hosts on the host, for the guest's (`None` if unreadable, not
/// text or over [`MAX_HOSTS`]: the guest then writes its own).
pub fn hosts_from_file(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_HOSTS + 1)
        .read_to_string(&mut text)
        .ok()?;
    if text.len() as u64 > MAX_HOSTS || text.contains('\0') {
        tracing::warn!(path = %path.display(), "the hosts file is not used: over 64 KiB or not text");
        return None;
    }
    Some(text)
}

/// Resolver settings from a resolv.conf on the host; the agent writes the
/// guest's own file from them, since host files cannot be bound in.
pub fn dns_from_file(path: &Path) -> Option<GuestDns> {
    let text = std::fs::read_to_string(path).ok()?;
    let dns = GuestDns::parse_resolv_conf(&text);
    (!dns.is_empty()).then_some(dns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(namespaces: serde_json::Value, mounts: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "mounts": mounts,
            "linux": {"namespaces": namespaces}
        }))
        .unwrap()
    }

    #[test]
    fn the_network_mode_comes_from_the_spec() {
        let s = spec(
            serde_json::json!([{"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"}]),
            serde_json::json!([]),
        );
        assert_eq!(mode(&s), NetMode::Join(PathBuf::from("/var/run/netns/x")));
        let s = spec(
            serde_json::json!([{"type": "network"}]),
            serde_json::json!([]),
        );
        assert_eq!(mode(&s), NetMode::Own);
        let s = spec(serde_json::json!([{"type": "pid"}]), serde_json::json!([]));
        assert_eq!(mode(&s), NetMode::Host);
        // A pod's sandbox gets the pod's network for the pod's VM.
        let mut s = spec(
            serde_json::json!([{"type": "network", "path": "/var/run/netns/x"}]),
            serde_json::json!([]),
        );
        s.set_annotations(Some(
            [(
                crate::pod_role::CONTAINER_TYPE.to_string(),
                "sandbox".to_string(),
            )]
            .into(),
        ));
        assert_eq!(mode(&s), NetMode::Join(PathBuf::from("/var/run/netns/x")));
    }

    #[test]
    fn the_hosts_own_namespace_is_refused() {
        let err = check_netns(Path::new("/proc/self/ns/net")).unwrap_err();
        assert!(err.to_string().contains("host's own"), "{err}");
    }

    #[test]
    fn a_missing_netns_is_named() {
        let err = check_netns(Path::new("/var/run/netns/capsid-nope")).unwrap_err();
        assert!(
            err.to_string().contains("/var/run/netns/capsid-nope"),
            "{err}"
        );
    }

    #[test]
    fn resolv_conf_binds_give_dns() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("resolv.conf");
        std::fs::write(
            &file,
            "nameserver 10.0.0.2\nsearch svc.local\noptions ndots:5\n",
        )
        .unwrap();
        let s = spec(
            serde_json::json!([]),
            serde_json::json!([{"destination": "/etc/resolv.conf", "type": "bind",
                                "source": file, "options": ["rbind", "ro"]}]),
        );
        let dns = dns_from_file(&bind_source(&s, "/etc/resolv.conf").unwrap()).unwrap();
        assert_eq!(dns.servers, ["10.0.0.2"]);
        assert_eq!(dns.search, ["svc.local"]);
        assert_eq!(dns.options, ["ndots:5"]);
        let s = spec(serde_json::json!([]), serde_json::json!([]));
        assert_eq!(bind_source(&s, "/etc/resolv.conf"), None);
    }
}
