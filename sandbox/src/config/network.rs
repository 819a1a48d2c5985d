//! `[network]`: the CNI network of `capsid run --network bridge`, and the
//! checks of its values (an IPv4 subnet, a Linux interface name) that the
//! CNI code uses too.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[network]`: the CNI network of `capsid run --network bridge`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// IPv4 subnet of the bundled network (`ADDRESS/PREFIX`); the bridge
    /// takes its first address, containers the others.
    pub subnet: String,
    /// Linux bridge of the bundled network.
    pub bridge: String,
    /// Where CNI plugins are looked up, in order (`CNI_PATH`).
    pub plugin_dirs: Vec<PathBuf>,
    /// A CNI conflist used instead of the bundled network (`subnet` and
    /// `bridge` then do not apply).
    pub conflist: Option<PathBuf>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            subnet: "10.213.0.0/24".into(),
            bridge: "capsid0".into(),
            plugin_dirs: vec![PathBuf::from("/usr/lib/cni"), PathBuf::from("/opt/cni/bin")],
            conflist: None,
        }
    }
}

/// Parses `A.B.C.D/N` (8 ≤ N ≤ 30, the network address itself).
pub fn parse_subnet(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not ADDRESS/PREFIX"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
    let len: u8 = len
        .parse()
        .map_err(|_| format!("{len:?} is not a prefix length"))?;
    if !(8..=30).contains(&len) {
        return Err(format!("prefix length {len} is not between 8 and 30"));
    }
    let mask = u32::MAX << (32 - u32::from(len));
    if u32::from(addr) & !mask != 0 {
        return Err(format!(
            "{text} has host bits set (the network is {}/{len})",
            Ipv4Addr::from(u32::from(addr) & mask)
        ));
    }
    Ok((addr, len))
}

/// Checks a Linux interface name: 1–15 bytes, no `/`, `:` or white space.
pub fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("{name:?} is not 1 to 15 bytes long"));
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(format!("{name:?} is not an interface name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_are_checked() {
        assert_eq!(
            parse_subnet("10.213.0.0/24").unwrap(),
            (Ipv4Addr::new(10, 213, 0, 0), 24)
        );
        assert!(parse_subnet("10.213.0.0").is_err());
        assert!(parse_subnet("10.213.0.0/31").is_err());
        assert!(parse_subnet("10.213.0.0/7").is_err());
        assert!(parse_subnet("fd00::/64").is_err());
        let e = parse_subnet("10.213.0.5/24").unwrap_err();
        assert!(e.contains("10.213.0.0/24"), "{e}");
        assert!(parse_subnet(&NetworkConfig::default().subnet).is_ok());
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(check_ifname("capsid0").is_ok());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("sixteen-bytes-xx").is_err());
        assert!(check_ifname("a/b").is_err());
        assert!(check_ifname(&NetworkConfig::default().bridge).is_ok());
    }
}
