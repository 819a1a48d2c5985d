//! Reading a namespace's interfaces, addresses and routes (`ip -j`) and
//! turning the chosen interface's configuration into a [`GuestNetwork`].

use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;

use super::{GuestDns, GuestInterface, GuestNetwork, GuestRoute, IpPrefix, NetworkError};
use crate::netns::Netns;

/// One entry of `ip -j -d link show`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Link {
    pub(crate) ifname: String,
    #[serde(default)]
    pub(crate) mtu: u32,
    #[serde(default)]
    pub(crate) address: String,
    #[serde(default)]
    link_type: String,
    #[serde(default)]
    linkinfo: Option<LinkInfo>,
}

#[derive(Debug, Clone, Deserialize)]
struct LinkInfo {
    #[serde(default)]
    info_kind: String,
}

impl Link {
    fn kind(&self) -> &str {
        self.linkinfo.as_ref().map_or("", |i| i.info_kind.as_str())
    }

    /// An Ethernet interface a tap can be joined to (not loopback, not a
    /// tap, not a bridge).
    pub(crate) fn joinable(&self) -> bool {
        self.link_type == "ether" && !matches!(self.kind(), "tun" | "bridge")
    }
}

#[derive(Debug, Deserialize)]
struct AddrEntry {
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Debug, Deserialize)]
struct AddrInfo {
    #[serde(default)]
    local: Option<String>,
    #[serde(default)]
    prefixlen: u8,
    #[serde(default)]
    scope: String,
}

#[derive(Debug, Deserialize)]
struct RouteEntry {
    dst: String,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

/// Every interface in the namespace.
pub(crate) fn links(ns: &Netns) -> Result<Vec<Link>, NetworkError> {
    Ok(ns.ip_json(&["-d", "link", "show"])?)
}

/// The interface named `wanted`, or the only joinable one.
pub(crate) fn pick_interface(
    ns: &Netns,
    links: &[Link],
    wanted: Option<&str>,
) -> Result<Link, NetworkError> {
    let no = |reason: String| NetworkError::NoInterface {
        netns: ns.path().to_owned(),
        reason,
    };
    if let Some(name) = wanted {
        let link = links
            .iter()
            .find(|l| l.ifname == name)
            .ok_or_else(|| no(format!("no interface named {name}")))?;
        if !link.joinable() {
            return Err(no(format!(
                "{name} is not an Ethernet interface a tap can be joined to"
            )));
        }
        return Ok(link.clone());
    }
    let candidates: Vec<&Link> = links.iter().filter(|l| l.joinable()).collect();
    match candidates.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(no("no Ethernet interface (veth) to attach the VM to".into())),
        many => Err(no(format!(
            "several interfaces could carry the VM's traffic ({}); name one",
            many.iter()
                .map(|l| l.ifname.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The interface's MAC, MTU, addresses and routes, and the namespace's DNS
/// settings.
pub(crate) fn guest_network(ns: &Netns, link: &Link) -> Result<GuestNetwork, NetworkError> {
    let parse_err = |command: &str, reason: String| NetworkError::Parse {
        command: command.to_owned(),
        reason,
    };
    let mac = link.address.to_ascii_lowercase();
    if !is_unicast_mac(&mac) {
        return Err(parse_err(
            "ip link show",
            format!("{} has no unicast MAC address ({mac:?})", link.ifname),
        ));
    }
    let entries: Vec<AddrEntry> = ns.ip_json(&["addr", "show", "dev", &link.ifname])?;
    let mut addresses = Vec::new();
    for info in entries.iter().flat_map(|e| &e.addr_info) {
        // Link-local addresses the guest derives itself (same MAC, same
        // fe80:: address); host-scope ones do not travel.
        if info.scope != "global" && info.scope != "site" {
            continue;
        }
        let Some(local) = &info.local else { continue };
        let addr: IpAddr = local
            .parse()
            .map_err(|_| parse_err("ip addr show", format!("bad address {local:?}")))?;
        addresses
            .push(IpPrefix::new(addr, info.prefixlen).map_err(|r| parse_err("ip addr show", r))?);
    }
    let mut routes = Vec::new();
    for family in ["-4", "-6"] {
        let entries: Vec<RouteEntry> =
            ns.ip_json(&[family, "route", "show", "dev", &link.ifname])?;
        for entry in entries {
            if let Some(route) = guest_route(&entry, &mac, family == "-6")
                .map_err(|r| parse_err("ip route show", r))?
            {
                routes.push(route);
            }
        }
    }
    Ok(GuestNetwork {
        interfaces: vec![GuestInterface {
            mac,
            mtu: link.mtu,
            addresses,
        }],
        routes,
        dns: dns_for(ns.path()),
    })
}

/// A route the guest must add itself, or `None` for one the kernel makes
/// from an address (prefix routes, link-local, multicast).
fn guest_route(entry: &RouteEntry, mac: &str, v6: bool) -> Result<Option<GuestRoute>, String> {
    if entry.protocol.as_deref() == Some("kernel") {
        return Ok(None);
    }
    if entry.kind.as_deref().is_some_and(|k| k != "unicast") {
        return Ok(None);
    }
    let destination = if entry.dst == "default" {
        None
    } else if entry.dst.contains('/') {
        Some(entry.dst.parse::<IpPrefix>()?)
    } else {
        let addr: IpAddr = entry
            .dst
            .parse()
            .map_err(|_| format!("bad route destination {:?}", entry.dst))?;
        Some(IpPrefix::new(addr, if addr.is_ipv4() { 32 } else { 128 })?)
    };
    if let Some(d) = destination {
        if let IpAddr::V6(a) = d.addr {
            if a.segments()[0] & 0xffc0 == 0xfe80 || a.segments()[0] & 0xff00 == 0xff00 {
                return Ok(None);
            }
        }
    }
    let gateway = match &entry.gateway {
        None => None,
        Some(g) => Some(
            g.parse::<IpAddr>()
                .map_err(|_| format!("bad gateway {g:?}"))?,
        ),
    };
    if destination.is_none() && gateway.is_none() {
        // A default route on the link (no gateway): keep it as such.
        tracing::debug!(v6, "default route without a gateway");
    }
    Ok(Some(GuestRoute {
        destination,
        gateway,
        interface_mac: mac.to_owned(),
    }))
}

/// DNS settings the `ip netns` convention keeps for a named namespace
/// (`/etc/netns/NAME/resolv.conf`); empty otherwise (the caller knows
/// better, e.g. from a CNI result).
fn dns_for(netns: &Path) -> GuestDns {
    let named = netns
        .parent()
        .is_some_and(|p| p == Path::new("/var/run/netns") || p == Path::new("/run/netns"));
    let Some(name) = netns.file_name().filter(|_| named) else {
        return GuestDns::default();
    };
    let file = Path::new("/etc/netns").join(name).join("resolv.conf");
    std::fs::read_to_string(file)
        .map(|t| GuestDns::parse_resolv_conf(&t))
        .unwrap_or_default()
}

/// Whether `dev`'s ingress filters redirect to `tap`.
pub(crate) fn redirects_to(ns: &Netns, dev: &str, tap: &str) -> bool {
    ns.tc(&["filter", "show", "dev", dev, "parent", super::INGRESS])
        .is_ok_and(|out| out.contains(&format!("to device {tap})")))
}

/// `aa:bb:cc:dd:ee:ff`, not multicast, not all zeros.
pub(crate) fn is_unicast_mac(mac: &str) -> bool {
    let bytes: Vec<Option<u8>> = mac
        .split(':')
        .map(|b| {
            (b.len() == 2)
                .then(|| u8::from_str_radix(b, 16).ok())
                .flatten()
        })
        .collect();
    if bytes.len() != 6 || bytes.iter().any(Option::is_none) {
        return false;
    }
    let first = bytes[0].unwrap_or(1);
    first & 1 == 0 && bytes.iter().any(|b| *b != Some(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(json: &str) -> Option<GuestRoute> {
        let entry: RouteEntry = serde_json::from_str(json).unwrap();
        guest_route(&entry, "02:00:00:00:00:01", false).unwrap()
    }

    #[test]
    fn routes_from_ip_json() {
        let r = route(r#"{"dst":"default","gateway":"10.9.0.1","flags":[]}"#).unwrap();
        assert_eq!(r.destination, None);
        assert_eq!(r.gateway, Some("10.9.0.1".parse().unwrap()));
        assert!(route(r#"{"dst":"10.9.0.0/24","protocol":"kernel","scope":"link"}"#).is_none());
        let r = route(r#"{"dst":"10.10.0.0/16","gateway":"10.9.0.1"}"#).unwrap();
        assert_eq!(r.destination.unwrap().to_string(), "10.10.0.0/16");
        let r = route(r#"{"dst":"10.1.2.3","scope":"link"}"#).unwrap();
        assert_eq!(r.destination.unwrap().to_string(), "10.1.2.3/32");
        assert_eq!(r.gateway, None);
        assert!(route(r#"{"dst":"fe80::/64","metric":256}"#).is_none());
        assert!(route(r#"{"dst":"10.1.0.0/16","type":"unreachable"}"#).is_none());
        let bad: RouteEntry = serde_json::from_str(r#"{"dst":"x/8"}"#).unwrap();
        assert!(guest_route(&bad, "02:00:00:00:00:01", false).is_err());
    }

    #[test]
    fn macs_are_checked() {
        assert!(is_unicast_mac("a6:7c:a2:af:bd:f1"));
        assert!(!is_unicast_mac("01:00:5e:00:00:01"));
        assert!(!is_unicast_mac("00:00:00:00:00:00"));
        assert!(!is_unicast_mac("a6:7c:a2:af:bd"));
        assert!(!is_unicast_mac("a6:7c:a2:af:bd:zz"));
    }
}
