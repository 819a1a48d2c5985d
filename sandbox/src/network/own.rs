//! A network namespace the sandbox owns: when the spec asks for a new
//! network namespace without naming one (Docker ≥ 26), the runtime makes
//! it, and the VM's host processes live in it so that the task's pid names
//! it (`/proc/<pid>/ns/net`). The VM boots with a NIC on a tap that leads
//! nowhere yet; whoever sets up the container's network (dockerd, a CNI
//! plugin run by a hook) moves a veth in and configures it between Create
//! and Start, and at Start [`join_late`] joins the tap to it, exactly as
//! [`super::attach`] does for a namespace that was ready before Create.
//!
//! Unlike a CNI namespace, this one has traffic of its own: dockerd's
//! embedded DNS resolver runs in it and forwards names it does not know to
//! the upstream servers from there. So the namespace's ephemeral ports are
//! moved to [`HOST_PORTS`], which the guest's kernel never uses for its own
//! (its range ends at 60999), and replies to them, and ARP, which both
//! stacks need, are let through to the namespace ahead of the redirect to
//! the VM (ARP is also copied to the VM).

use std::path::Path;

use super::{check_ifname, read, remove_ingress, wire, NetworkError, TapAttachment, INGRESS};
use crate::netns::Netns;

/// The namespace's own ephemeral ports: 61440–65535, one u32 mask match
/// (`dport & 0xf000 == 0xf000`), above the guest's 32768–60999.
pub const HOST_PORTS: (u16, u16) = (61440, 65535);

/// Brings up loopback and makes the VM's tap in the sandbox's own
/// namespace `netns`. On error the tap is not left behind (the namespace
/// is the caller's to delete).
pub fn prepare_tap(netns: &Path, tap: &str) -> Result<(), NetworkError> {
    check_ifname(tap)?;
    let ns = Netns::open(netns)?;
    ns.ip(&["link", "set", "dev", "lo", "up"])?;
    let range = format!("{} {}", HOST_PORTS.0, HOST_PORTS.1);
    ns.run(
        "sh",
        &[
            "-c",
            "echo \"$1\" > /proc/sys/net/ipv4/ip_local_port_range",
            "sh",
            &range,
        ],
    )?;
    ns.ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
    if let Err(e) = ns.ip(&["link", "set", "dev", tap, "addrgenmode", "none"]) {
        tracing::debug!(error = %e, "tap keeps its IPv6 address generation");
    }
    if let Err(e) = ns.ip(&["link", "set", "dev", tap, "up"]) {
        if let Err(undo) = ns.ip(&["link", "del", "dev", tap]) {
            tracing::warn!(error = %undo, "undoing a failed tap");
        }
        return Err(e.into());
    }
    Ok(())
}

/// Joins the existing `tap` to the interface that appeared in `netns`
/// since [`prepare_tap`], and reads what the guest must configure. `None`
/// when no interface came (`docker run --network none`). With several,
/// the first by name is joined (the VM has one NIC) and the others are
/// named in a warning.
pub fn join_late(netns: &Path, tap: &str) -> Result<Option<TapAttachment>, NetworkError> {
    let ns = Netns::open(netns)?;
    let links = read::links(&ns)?;
    let mut candidates: Vec<&read::Link> = links
        .iter()
        .filter(|l| l.ifname != tap && l.joinable())
        .collect();
    candidates.sort_by(|a, b| a.ifname.cmp(&b.ifname));
    let Some(veth) = candidates.first().map(|l| (*l).clone()) else {
        return Ok(None);
    };
    if candidates.len() > 1 {
        tracing::warn!(
            netns = %netns.display(),
            joined = %veth.ifname,
            ignored = ?candidates[1..].iter().map(|l| &l.ifname).collect::<Vec<_>>(),
            "the VM has one NIC: only the first interface carries its traffic"
        );
    }
    let guest = read::guest_network(&ns, &veth)?;
    let mtu = veth.mtu.to_string();
    let mut veth_qdisc = false;
    // The tap is guarded before its redirect exists (the VM runs already).
    let wired = wire(&ns, tap, &veth.ifname, &guest, &mtu, &mut veth_qdisc)
        .and_then(|()| let_host_traffic_through(&ns, &veth.ifname, tap));
    if let Err(e) = wired {
        // The tap stays (the VM holds it); its filters go.
        let _ = remove_ingress(&ns, tap);
        if veth_qdisc {
            let _ = remove_ingress(&ns, &veth.ifname);
        }
        return Err(e);
    }
    tracing::info!(netns = %netns.display(), tap, veth = %veth.ifname, "tap joined to the interface made after Create");
    Ok(Some(TapAttachment {
        netns: netns.to_owned(),
        tap: tap.to_owned(),
        veth: veth.ifname,
        guest,
    }))
}

/// Ahead of the veth's catch-all redirect: ARP is copied to the VM and
/// delivered to the namespace too; UDP and TCP to [`HOST_PORTS`] are the
/// namespace's (a u32 match that returns a class ends classification and
/// lets the frame go up the namespace's stack).
fn let_host_traffic_through(ns: &Netns, veth: &str, tap: &str) -> Result<(), NetworkError> {
    ns.tc(&[
        "filter", "add", "dev", veth, "parent", INGRESS, "prio", "1", "protocol", "arp", "u32",
        "match", "u8", "0", "0", "action", "mirred", "egress", "mirror", "dev", tap,
    ])?;
    for (prio, proto) in [("2", "17"), ("3", "6")] {
        ns.tc(&[
            "filter", "add", "dev", veth, "parent", INGRESS, "prio", prio, "protocol", "ip", "u32",
            "match", "ip", "protocol", proto, "0xff", "match", "ip", "dport", "0xf000", "0xf000",
            "flowid", "ffff:1",
        ])?;
    }
    Ok(())
}

/// A locally administered unicast MAC for the VM's NIC until it takes the
/// veth's, derived from the sandbox's name.
pub fn boot_mac(sandbox: &str) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(sandbox.as_bytes());
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        (d[0] & 0xfe) | 0x02,
        d[1],
        d[2],
        d[3],
        d[4],
        d[5]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_macs_are_local_unicast_and_stable() {
        let m = boot_mac("default-web");
        assert_eq!(m, boot_mac("default-web"));
        assert_ne!(m, boot_mac("default-db"));
        let first = u8::from_str_radix(&m[..2], 16).unwrap();
        assert_eq!(first & 0x03, 0x02, "{m}");
        assert_eq!(m.len(), 17);
    }
}
