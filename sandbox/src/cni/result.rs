//! What CNI plugins print: the success result (CNI spec 1.0.0, "Success";
//! 0.4.0 results parse too, their extra `version` key is ignored) and the
//! error reply ("Error").

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A plugin's success result, parsed; [`CniResult::raw`] keeps it whole so
/// it can be passed on as the next plugin's `prevResult` unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct CniResult {
    /// The parsed fields capsid uses.
    pub parsed: ResultFields,
    /// The result as printed.
    pub raw: Value,
}

/// The fields of a success result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ResultFields {
    /// CNI version of the result.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// Interfaces created (host side and container side).
    pub interfaces: Vec<Interface>,
    /// Addresses assigned.
    pub ips: Vec<IpConfig>,
    /// Routes the container should have.
    pub routes: Vec<Route>,
    /// Resolver settings.
    pub dns: Dns,
}

/// One interface of a result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Interface {
    /// Interface name.
    pub name: String,
    /// MAC address.
    pub mac: String,
    /// The netns path for an interface inside the container; empty on the
    /// host side.
    pub sandbox: String,
}

/// One assigned address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IpConfig {
    /// `ADDRESS/PREFIX`.
    pub address: String,
    /// Gateway, if any.
    pub gateway: Option<String>,
    /// Index into `interfaces` of the interface holding the address.
    pub interface: Option<usize>,
}

/// One route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Route {
    /// Destination `ADDRESS/PREFIX`.
    pub dst: String,
    /// Next hop, if not the default gateway.
    pub gw: Option<String>,
}

/// Resolver settings of a result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Dns {
    /// Name servers.
    pub nameservers: Vec<String>,
    /// Local domain.
    pub domain: Option<String>,
    /// Search domains.
    pub search: Vec<String>,
    /// Resolver options.
    pub options: Vec<String>,
}

/// A plugin's error reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ErrorReply {
    /// Error code (1–99 are the spec's, 100+ the plugin's).
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer explanation.
    pub details: String,
}

impl ErrorReply {
    /// The message, with the details when they add something.
    pub fn message(&self) -> String {
        if self.details.is_empty() || self.msg.contains(&self.details) {
            self.msg.clone()
        } else {
            format!("{}: {}", self.msg, self.details)
        }
    }
}

impl CniResult {
    /// Parses a plugin's stdout.
    pub fn parse(stdout: &[u8]) -> Result<Self, String> {
        let raw: Value = serde_json::from_slice(stdout).map_err(|e| e.to_string())?;
        if !raw.is_object() {
            return Err("the result is not a JSON object".into());
        }
        let parsed = ResultFields::deserialize(&raw).map_err(|e| e.to_string())?;
        Ok(Self { parsed, raw })
    }

    /// The IPv4 addresses on container-side interfaces (those with a
    /// `sandbox`; an address naming no interface counts as the container's).
    pub fn container_ipv4(&self) -> Vec<(Ipv4Addr, u8)> {
        self.parsed
            .ips
            .iter()
            .filter(|ip| match ip.interface {
                Some(i) => self
                    .parsed
                    .interfaces
                    .get(i)
                    .is_some_and(|iface| !iface.sandbox.is_empty()),
                None => true,
            })
            .filter_map(|ip| {
                let (addr, len) = ip.address.split_once('/')?;
                Some((addr.parse().ok()?, len.parse().ok().filter(|l| *l <= 32)?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What bridge 1.1.1 printed here for an ADD.
    const BRIDGE_RESULT: &str = r#"{
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "capsid0", "mac": "1e:f4:58:40:0f:c5"},
            {"name": "veth4ba92610", "mac": "c2:aa:ad:66:f2:04"},
            {"name": "eth0", "mac": "3a:15:91:02:29:4e", "sandbox": "/run/netns/cx-inner"}
        ],
        "ips": [{"interface": 2, "address": "10.213.0.2/24", "gateway": "10.213.0.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    }"#;

    #[test]
    fn bridge_result_parses() {
        let r = CniResult::parse(BRIDGE_RESULT.as_bytes()).unwrap();
        assert_eq!(r.parsed.interfaces.len(), 3);
        assert_eq!(r.parsed.interfaces[2].sandbox, "/run/netns/cx-inner");
        assert_eq!(r.parsed.ips[0].gateway.as_deref(), Some("10.213.0.1"));
        assert_eq!(r.parsed.routes[0].dst, "0.0.0.0/0");
        assert!(r.parsed.dns.nameservers.is_empty());
        assert_eq!(r.container_ipv4(), [(Ipv4Addr::new(10, 213, 0, 2), 24)]);
        // Passed on unchanged.
        assert_eq!(r.raw["interfaces"][1]["name"], "veth4ba92610");
    }

    #[test]
    fn older_results_and_unknown_keys_parse() {
        let r = CniResult::parse(
            br#"{"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.1.0.9/16"}],
                 "dns":{"nameservers":["10.1.0.1"],"search":["x"]},"extra":1}"#,
        )
        .unwrap();
        assert_eq!(r.container_ipv4(), [(Ipv4Addr::new(10, 1, 0, 9), 16)]);
        assert_eq!(r.parsed.dns.nameservers, ["10.1.0.1"]);
        assert_eq!(r.raw["extra"], 1);
    }

    #[test]
    fn host_side_and_v6_addresses_are_not_the_containers_ipv4() {
        let r = CniResult::parse(
            br#"{"cniVersion":"1.0.0","interfaces":[{"name":"br"},{"name":"eth0","sandbox":"/n"}],
                 "ips":[{"interface":0,"address":"10.0.0.1/24"},{"interface":1,"address":"fd00::2/64"},
                        {"interface":1,"address":"10.0.0.2/24"},{"interface":7,"address":"10.0.0.3/24"}]}"#,
        )
        .unwrap();
        assert_eq!(r.container_ipv4(), [(Ipv4Addr::new(10, 0, 0, 2), 24)]);
    }

    #[test]
    fn garbage_is_refused() {
        assert!(CniResult::parse(b"").is_err());
        assert!(CniResult::parse(b"[1]").is_err());
        assert!(CniResult::parse(br#"{"ips":"no"}"#).is_err());
    }

    #[test]
    fn error_replies_read_well() {
        let e: ErrorReply = serde_json::from_str(
            r#"{"code":999,"msg":"failed to set bridge addr","details":"could not add IP address to \"capsid0\": file exists"}"#,
        )
        .unwrap();
        assert_eq!(
            e.message(),
            "failed to set bridge addr: could not add IP address to \"capsid0\": file exists"
        );
        let e: ErrorReply = serde_json::from_str(r#"{"code":7,"msg":"bad"}"#).unwrap();
        assert_eq!(e.message(), "bad");
    }
}
