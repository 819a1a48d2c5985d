//! Putting a VM on a network namespace prepared by someone else (CNI, the
//! CRI plugin, nerdctl, `capsid run`): a tap is created next to the
//! namespace's veth and the two are joined by tc, so every frame arriving on
//! one leaves by the other; the veth's addresses, routes and MTU are read so
//! the guest can take them over (see docs/networking.md).
//!
//! ```text
//! peer ⇄ veth ─ingress u32 → mirred egress redirect→ tap ⇄ capsid-vhost net ⇄ guest eth0
//!        veth ←mirred egress redirect← u32 ingress─ tap
//! ```
//!
//! The veth keeps its configuration (other tools expect to find it), but the
//! namespace's own stack never sees a frame from the wire: the ingress
//! redirect takes them all before it, so the guest, which has the same MAC
//! and addresses, answers ARP and owns every connection.
//!
//! Everything here runs iproute2 (`ip`, `tc`) through `nsenter --net`; calls
//! block for a few milliseconds each.

mod guest;
pub mod own;
mod read;

use std::path::{Path, PathBuf};

pub use guest::{GuestDns, GuestInterface, GuestNetwork, GuestRoute, IpPrefix};

use crate::backend::NetSpec;
use crate::netns::{Netns, NetnsError};

/// The ingress qdisc handle used on both interfaces.
const INGRESS: &str = "ffff:";

/// Errors of network attachment.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// Finding or using the network namespace failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The tap name cannot be an interface name.
    #[error("invalid tap name {name:?}: {reason}")]
    BadTapName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// No (or no single) interface to join the tap to.
    #[error("network namespace {}: {reason}", netns.display())]
    NoInterface {
        /// The namespace.
        netns: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// The anti-spoofing filter could not be put on the tap (fails the
    /// attach: a tap is never joined unguarded).
    #[error("cannot put the anti-spoofing filter on tap {tap}")]
    Guard {
        /// The tap.
        tap: String,
        /// Why (the filter's code lives with `capsid run`'s containment).
        #[source]
        source: Box<crate::cni::CniError>,
    },
    /// A command printed something unexpected.
    #[error("unexpected output from `{command}`: {reason}")]
    Parse {
        /// What was run.
        command: String,
        /// What was wrong.
        reason: String,
    },
}

/// The tap made for a sandbox in a network namespace someone else owns
/// (CNI through containerd, nerdctl, the CRI plugin), recorded before it is
/// made so that [`detach_leftovers`] can remove it after a crash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TapRecord {
    /// The network namespace file.
    pub netns: PathBuf,
    /// The tap made in it.
    pub tap: String,
}

impl TapRecord {
    /// The tap of sandbox `sandbox` in `netns`.
    pub fn for_sandbox(netns: &Path, sandbox: &str) -> Self {
        Self {
            netns: netns.to_owned(),
            tap: tap_name_for(sandbox),
        }
    }
}

/// A tap joined to a veth inside a network namespace. Dropping it leaves the
/// wiring in place (the shim outlives its own processes' restarts); call
/// [`TapAttachment::detach`] or [`detach_leftovers`] to remove it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TapAttachment {
    /// The network namespace.
    pub netns: PathBuf,
    /// The tap created for the VM.
    pub tap: String,
    /// The interface the tap is joined to.
    pub veth: String,
    /// What the guest must configure.
    pub guest: GuestNetwork,
}

impl TapAttachment {
    /// The VM's NIC: on the tap, in the namespace, with the veth's MAC.
    pub fn net_spec(&self) -> NetSpec {
        NetSpec {
            tap: self.tap.clone(),
            mac: self
                .guest
                .interfaces
                .first()
                .map(|i| i.mac.clone())
                .unwrap_or_default(),
            netns: Some(self.netns.clone()),
        }
    }

    /// Removes the filters, the qdiscs and the tap. A namespace that no
    /// longer exists has nothing left to remove.
    pub fn detach(self) -> Result<(), NetworkError> {
        if !Netns::exists(&self.netns) {
            return Ok(());
        }
        let ns = Netns::open(&self.netns)?;
        remove(&ns, &self.tap, Some(&self.veth))
    }
}

/// The agent request applying `network`'s interfaces and routes (DNS goes
/// into each CreateContainer request instead).
pub fn configure_request(
    network: &GuestNetwork,
) -> capsid_protocol::agent::ConfigureNetworkRequest {
    use capsid_protocol::agent::{ConfigureNetworkRequest, NetworkInterface, NetworkRoute};
    let mut req = ConfigureNetworkRequest::new();
    req.interfaces = network
        .interfaces
        .iter()
        .map(|i| {
            let mut n = NetworkInterface::new();
            n.mac.clone_from(&i.mac);
            n.mtu = i.mtu;
            n.addresses = i.addresses.iter().map(ToString::to_string).collect();
            n
        })
        .collect();
    req.routes = network
        .routes
        .iter()
        .map(|r| {
            let mut n = NetworkRoute::new();
            n.destination = r.destination.map(|d| d.to_string()).unwrap_or_default();
            n.gateway = r.gateway.map(|g| g.to_string()).unwrap_or_default();
            n.interface_mac.clone_from(&r.interface_mac);
            n
        })
        .collect();
    req
}

/// Joins a new tap `tap_name` to the namespace's one non-loopback interface
/// and reads what the guest must configure. On error nothing is left.
pub fn attach(netns: &Path, tap_name: &str) -> Result<TapAttachment, NetworkError> {
    attach_to(netns, tap_name, None)
}

/// [`attach`], to the interface named `veth` (any non-tap Ethernet
/// interface), or to the only candidate when `None`.
pub fn attach_to(
    netns: &Path,
    tap_name: &str,
    veth: Option<&str>,
) -> Result<TapAttachment, NetworkError> {
    let (ns, veth, guest, mtu) = interface_for(netns, tap_name, veth)?;
    ns.ip(&["tuntap", "add", "dev", tap_name, "mode", "tap"])?;
    let mut veth_qdisc = false;
    let wired = wire(&ns, tap_name, &veth.ifname, &guest, &mtu, &mut veth_qdisc);
    if let Err(e) = wired {
        if veth_qdisc {
            if let Err(undo) = remove_ingress(&ns, &veth.ifname) {
                tracing::warn!(error = %undo, "undoing a failed attach");
            }
        }
        // Deleting the tap takes its qdisc and filter with it.
        if let Err(undo) = ns.ip(&["link", "del", "dev", tap_name]) {
            tracing::warn!(error = %undo, "undoing a failed attach");
        }
        return Err(e);
    }
    tracing::info!(netns = %netns.display(), tap = tap_name, veth = %veth.ifname, "tap attached");
    Ok(TapAttachment {
        netns: netns.to_owned(),
        tap: tap_name.to_owned(),
        veth: veth.ifname,
        guest,
    })
}

/// [`attach`] for a VM that booted already with its NIC on `tap` in
/// `from` (a pooled sandbox's own namespace, [`crate::pool`]): the tap
/// moves into `netns` and is wired to its only interface exactly as a new
/// one would be. The tap must be recorded in `netns` before this is called:
/// from the move on, deleting it there is the undo.
pub fn adopt_tap(from: &Path, tap_name: &str, netns: &Path) -> Result<TapAttachment, NetworkError> {
    let (ns, veth, guest, mtu) = interface_for(netns, tap_name, None)?;
    let target = netns.to_str().ok_or_else(|| NetworkError::NoInterface {
        netns: netns.to_owned(),
        reason: "the namespace's path is not UTF-8".into(),
    })?;
    // A device that changes namespace comes down and loses its addresses
    // and qdiscs; wire() brings it up with the veth's MTU.
    Netns::open(from)?.ip(&["link", "set", "dev", tap_name, "netns", target])?;
    let mut veth_qdisc = false;
    if let Err(e) = wire(&ns, tap_name, &veth.ifname, &guest, &mtu, &mut veth_qdisc) {
        if veth_qdisc {
            if let Err(undo) = remove_ingress(&ns, &veth.ifname) {
                tracing::warn!(error = %undo, "undoing a failed tap adoption");
            }
        }
        // The tap stays (the VM holds it, and the record deletes it).
        let _ = remove_ingress(&ns, tap_name);
        return Err(e);
    }
    tracing::info!(netns = %netns.display(), tap = tap_name, veth = %veth.ifname, "pooled VM's tap moved in and attached");
    Ok(TapAttachment {
        netns: netns.to_owned(),
        tap: tap_name.to_owned(),
        veth: veth.ifname,
        guest,
    })
}

/// The namespace at `netns`, the interface a tap named `tap_name` is to
/// be joined to (`veth`, or the only candidate), what the guest must
/// configure from it, and its MTU. A namespace that has an interface of
/// the tap's name already is refused (attached twice?).
fn interface_for(
    netns: &Path,
    tap_name: &str,
    veth: Option<&str>,
) -> Result<(Netns, read::Link, GuestNetwork, String), NetworkError> {
    check_ifname(tap_name)?;
    let ns = Netns::open(netns)?;
    let links = read::links(&ns)?;
    if links.iter().any(|l| l.ifname == tap_name) {
        return Err(NetworkError::NoInterface {
            netns: netns.to_owned(),
            reason: format!("an interface named {tap_name} already exists (attached twice?)"),
        });
    }
    let veth = read::pick_interface(&ns, &links, veth)?;
    let guest = read::guest_network(&ns, &veth)?;
    let mtu = veth.mtu.to_string();
    Ok((ns, veth, guest, mtu))
}

/// Configures the new tap and joins it to `veth` both ways, the tap's side
/// guarded against spoofing ([`crate::cni::containment::guard`], from the
/// MAC and addresses `guest` read from `veth`) before its redirect exists:
/// no frame of the guest reaches the veth unchecked, even from a VM that
/// already runs ([`own::join_late`]). Sets `veth_qdisc` once the veth's
/// ingress qdisc exists (it is then ours to remove if a later step fails).
fn wire(
    ns: &Netns,
    tap: &str,
    veth: &str,
    guest: &GuestNetwork,
    mtu: &str,
    veth_qdisc: &mut bool,
) -> Result<(), NetworkError> {
    // No IPv6 link-local address (and so no router solicitations) on the
    // tap: it is a wire, not a host. Namespaces without IPv6 refuse this,
    // which is fine.
    if let Err(e) = ns.ip(&["link", "set", "dev", tap, "addrgenmode", "none"]) {
        tracing::debug!(error = %e, "tap keeps its IPv6 address generation");
    }
    ns.ip(&["link", "set", "dev", tap, "mtu", mtu, "up"])?;
    ns.tc(&["qdisc", "add", "dev", tap, "handle", INGRESS, "ingress"])?;
    let guard = |source| NetworkError::Guard {
        tap: tap.to_owned(),
        source: Box::new(source),
    };
    // (read::guest_network always gives the veth's interface.)
    let iface = guest.interfaces.first().ok_or_else(|| {
        guard(crate::cni::CniError::Config {
            what: format!("network of tap {tap}"),
            reason: "no interface to guard".into(),
        })
    })?;
    crate::cni::containment::guard(ns, tap, veth, iface).map_err(guard)?;
    redirect(ns, tap, veth)?;
    ns.tc(&["qdisc", "add", "dev", veth, "handle", INGRESS, "ingress"])
        .map_err(|e| match e {
            NetnsError::Command { netns, reason, .. } => NetworkError::NoInterface {
                netns,
                reason: format!(
                    "cannot add an ingress qdisc to {veth} (already joined to another tap?): {reason}"
                ),
            },
            e => e.into(),
        })?;
    *veth_qdisc = true;
    redirect(ns, veth, tap)
}

/// Removes what [`attach`] made for `tap_name` in `netns`, after a crash:
/// the tap and the ingress qdisc of any interface redirecting to it. Missing
/// pieces (or a missing namespace) are not errors.
pub fn detach_leftovers(netns: &Path, tap_name: &str) -> Result<(), NetworkError> {
    if !Netns::exists(netns) {
        return Ok(());
    }
    let ns = Netns::open(netns)?;
    remove(&ns, tap_name, None)
}

/// Removes `dev`'s ingress qdisc, and with it every filter on it.
fn remove_ingress(ns: &Netns, dev: &str) -> Result<String, NetnsError> {
    ns.tc(&["qdisc", "del", "dev", dev, "handle", INGRESS, "ingress"])
}

/// Adds `from`'s ingress filter sending every frame out of `to`.
fn redirect(ns: &Netns, from: &str, to: &str) -> Result<(), NetworkError> {
    // u32 with an empty match is a catch-all that every kernel has
    // (matchall and flower may not be built).
    ns.tc(&[
        "filter", "add", "dev", from, "parent", INGRESS, "protocol", "all", "u32", "match", "u8",
        "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
    ])?;
    Ok(())
}

/// Removes `tap` and the ingress qdisc of `veth` (or of every interface
/// whose ingress filters redirect to `tap` when `veth` is unknown). Tries
/// every step; the first error is returned.
fn remove(ns: &Netns, tap: &str, veth: Option<&str>) -> Result<(), NetworkError> {
    let links = read::links(ns)?;
    let mut first_err = None;
    let targets: Vec<String> = match veth {
        Some(v) => vec![v.to_owned()],
        None => links
            .iter()
            .filter(|l| l.ifname != tap)
            .filter(|l| read::redirects_to(ns, &l.ifname, tap))
            .map(|l| l.ifname.clone())
            .collect(),
    };
    for target in targets {
        if !links.iter().any(|l| l.ifname == target) {
            continue;
        }
        // Only our qdisc: one whose filters redirect to this tap.
        if veth.is_some() && !read::redirects_to(ns, &target, tap) {
            continue;
        }
        if let Err(e) = remove_ingress(ns, &target) {
            first_err.get_or_insert(NetworkError::from(e));
        }
    }
    if links.iter().any(|l| l.ifname == tap) {
        // Deleting the tap takes its qdisc and filters with it.
        if let Err(e) = ns.ip(&["link", "del", "dev", tap]) {
            first_err.get_or_insert(e.into());
        }
    }
    match first_err {
        None => {
            tracing::info!(netns = %ns.path().display(), tap, "tap detached");
            Ok(())
        }
        Some(e) => Err(e),
    }
}

/// Checks a Linux interface name: 1–15 bytes, no `/`, `:` or white space.
fn check_ifname(name: &str) -> Result<(), NetworkError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > 15 {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("not a name")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Some("contains '/', ':' or white space")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(NetworkError::BadTapName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// The tap name for sandbox `id`: `tap0_` and 10 hex digits of its
/// SHA-256, so it fits Linux's 15 bytes, differs between sandboxes sharing a
/// namespace, and can be computed again after a crash.
pub fn tap_name_for(id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = format!("{:x}", Sha256::digest(id.as_bytes()));
    format!("tap0_{}", &digest[..10])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        assert!(check_ifname("tap0_abcdefghij").is_ok());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("tap0_abcdefghijk").is_err());
        assert!(check_ifname("a/b").is_err());
        assert!(check_ifname("a b").is_err());
        assert!(check_ifname("a:b").is_err());
    }

    #[test]
    fn tap_names_fit_and_differ() {
        let a = tap_name_for("default-web");
        assert_eq!(a.len(), 15);
        assert!(check_ifname(&a).is_ok());
        assert_eq!(a, tap_name_for("default-web"));
        assert_ne!(a, tap_name_for("default-web2"));
    }

    #[test]
    fn a_missing_namespace_is_named_in_the_error() {
        let err = attach(Path::new("/var/run/netns/capsid-no-such-ns"), "tap0_x").unwrap_err();
        assert_eq!(
            err.to_string(),
            "network namespace /var/run/netns/capsid-no-such-ns does not exist"
        );
        assert!(detach_leftovers(Path::new("/var/run/netns/capsid-no-such-ns"), "tap0_x").is_ok());
    }
}
