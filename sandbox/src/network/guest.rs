//! What the guest's network looks like: the interfaces, addresses, routes and
//! DNS settings the agent applies inside the VM. Read from a CNI-prepared
//! network namespace by [`super::attach`], or built by whoever sets up the
//! network; serializable so the shim can keep it in its state.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An address with its prefix length (`10.88.0.5/16`, `fd00::5/64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IpPrefix {
    /// The address.
    pub addr: IpAddr,
    /// Prefix length: at most 32 for IPv4, 128 for IPv6.
    pub prefix_len: u8,
}

impl IpPrefix {
    /// Checks the prefix length fits the address family.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Self, String> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(format!("prefix length {prefix_len} is too long for {addr}"));
        }
        Ok(Self { addr, prefix_len })
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for IpPrefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not ADDRESS/PREFIX"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let len: u8 = len
            .parse()
            .map_err(|_| format!("{len:?} is not a prefix length"))?;
        Self::new(addr, len)
    }
}

/// One guest network interface, found in the guest by its MAC address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInterface {
    /// MAC address, `aa:bb:cc:dd:ee:ff` (lower case); the VM's NIC has it.
    pub mac: String,
    /// MTU.
    pub mtu: u32,
    /// Addresses with prefixes (IPv4 and IPv6; no link-local ones, the guest
    /// makes its own).
    pub addresses: Vec<IpPrefix>,
}

/// One route in the guest's main table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRoute {
    /// Destination; `None` is the default route (of the gateway's family).
    pub destination: Option<IpPrefix>,
    /// Next hop; `None` for a route on the link.
    pub gateway: Option<IpAddr>,
    /// MAC of the [`GuestInterface`] the route goes out of.
    pub interface_mac: String,
}

/// The container's resolver settings (its /etc/resolv.conf).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestDns {
    /// Name servers.
    pub servers: Vec<String>,
    /// Search domains.
    pub search: Vec<String>,
    /// `options` entries (`ndots:5`, ...).
    pub options: Vec<String>,
}

impl GuestDns {
    /// Nothing set: the image's resolv.conf stays as it is.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty() && self.search.is_empty() && self.options.is_empty()
    }

    /// As resolv.conf text (for a container given it as a file, as Docker
    /// does, rather than written by the agent).
    pub fn to_resolv_conf(&self) -> String {
        let mut text = String::new();
        for server in &self.servers {
            text.push_str(&format!("nameserver {server}\n"));
        }
        if !self.search.is_empty() {
            text.push_str(&format!("search {}\n", self.search.join(" ")));
        }
        if !self.options.is_empty() {
            text.push_str(&format!("options {}\n", self.options.join(" ")));
        }
        text
    }

    /// Parses resolv.conf text (`nameserver`, `search`/`domain`, `options`).
    pub fn parse_resolv_conf(text: &str) -> Self {
        let mut dns = Self::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => dns.servers.extend(words.next().map(str::to_owned)),
                Some("search") | Some("domain") => {
                    dns.search = words.map(str::to_owned).collect();
                }
                Some("options") => dns.options.extend(words.map(str::to_owned)),
                _ => {}
            }
        }
        dns
    }
}

/// Everything the agent needs to configure the guest's network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    /// Interfaces (today at most one).
    pub interfaces: Vec<GuestInterface>,
    /// Routes, applied after every interface has its addresses.
    pub routes: Vec<GuestRoute>,
    /// Resolver settings for the container.
    pub dns: GuestDns,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_text_round_trips() {
        let dns = GuestDns {
            servers: vec!["10.0.0.1".into(), "fd00::53".into()],
            search: vec!["a.example".into(), "b.example".into()],
            options: vec!["ndots:2".into()],
        };
        let text = dns.to_resolv_conf();
        assert_eq!(
            text,
            "nameserver 10.0.0.1\nnameserver fd00::53\nsearch a.example b.example\noptions ndots:2\n"
        );
        assert_eq!(GuestDns::parse_resolv_conf(&text), dns);
    }

    #[test]
    fn prefixes_parse_and_check_length() {
        let p: IpPrefix = "10.88.0.5/16".parse().unwrap();
        assert_eq!(p.to_string(), "10.88.0.5/16");
        assert!("10.0.0.1/33".parse::<IpPrefix>().is_err());
        assert!("fd00::1/128".parse::<IpPrefix>().is_ok());
        assert!("fd00::1/129".parse::<IpPrefix>().is_err());
        assert!("10.0.0.1".parse::<IpPrefix>().is_err());
        assert!("x/8".parse::<IpPrefix>().is_err());
    }

    #[test]
    fn resolv_conf_is_parsed() {
        let dns = GuestDns::parse_resolv_conf(
            "# comment\nnameserver 10.0.0.2\nnameserver fd00::53 ; x\n\
             search a.example b.example\noptions ndots:5 edns0\n",
        );
        assert_eq!(dns.servers, ["10.0.0.2", "fd00::53"]);
        assert_eq!(dns.search, ["a.example", "b.example"]);
        assert_eq!(dns.options, ["ndots:5", "edns0"]);
        assert!(GuestDns::parse_resolv_conf("").is_empty());
    }
}
