//! Explicit exposure: the bridge makes the container's address routable
//! from the host (and from anything the host forwards for), so without more
//! every port the guest opens would be reachable. These iptables rules let
//! in only what `portmap` DNATed (the published ports) and replies to the
//! container's own connections; new connections to any other port are
//! rejected. One chain per container, jumped to from `filter` OUTPUT (the
//! host's own connections) and FORWARD (everyone else's).
//!
//! FORWARD sees traffic between two guests on one bridge only where
//! `br_netfilter` hands bridged frames to iptables. So on the bundled
//! network each sandbox's bridge port is also isolated ([`isolate_port`]):
//! the bridge never forwards a frame between two isolated ports, whatever
//! is loaded, while traffic to and from the bridge device itself (the host,
//! NAT, published ports) still flows.

use std::net::Ipv4Addr;
use std::process::Command;

use sha2::{Digest, Sha256};

use super::result::CniResult;
use super::{CniError, Result};

/// The inbound filter of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    chain: String,
    comment: String,
    addr: Ipv4Addr,
}

impl Isolation {
    /// The rules for container `id` on network `network` at `addr`.
    pub fn new(network: &str, id: &str, addr: Ipv4Addr) -> Self {
        let hash = Sha256::digest(format!("{network}\0{id}").as_bytes());
        let hex: String = hash.iter().take(10).map(|b| format!("{b:02x}")).collect();
        Self {
            // iptables chain names are at most 28 characters.
            chain: format!("CAPSID-{}", hex.to_uppercase()),
            comment: format!("capsid network {network} container {id}"),
            addr,
        }
    }

    /// The chain's name.
    pub fn chain(&self) -> &str {
        &self.chain
    }

    fn jump(&self, base: &str) -> Vec<String> {
        [
            base,
            "-d",
            &format!("{}/32", self.addr),
            "-m",
            "comment",
            "--comment",
            &self.comment,
            "-j",
            &self.chain,
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn rules(&self) -> Vec<Vec<String>> {
        let rule = |args: &[&str]| {
            let mut v = vec!["-A".to_owned(), self.chain.clone()];
            v.extend(args.iter().map(|s| (*s).to_owned()));
            v
        };
        vec![
            rule(&[
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "ACCEPT",
            ]),
            // Published ports: portmap rewrote the destination.
            rule(&["-m", "conntrack", "--ctstate", "DNAT", "-j", "ACCEPT"]),
            rule(&["-j", "REJECT"]),
        ]
    }

    /// Adds the chain and the jumps (first in OUTPUT and FORWARD, ahead of
    /// rules that would accept everything). On error, what was added is
    /// removed.
    pub fn apply(&self) -> Result<()> {
        let applied = (|| {
            iptables(&["-N", &self.chain])?;
            for r in self.rules() {
                iptables(&r.iter().map(String::as_str).collect::<Vec<_>>())?;
            }
            for base in ["OUTPUT", "FORWARD"] {
                let mut args = vec!["-I".to_owned()];
                args.extend(self.jump(base));
                iptables(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
            }
            Ok(())
        })();
        if applied.is_err() {
            let _ = self.remove();
        }
        applied
    }

    /// Removes the jumps and the chain; what is already gone is no error.
    pub fn remove(&self) -> Result<()> {
        let mut first_err = None;
        for base in ["OUTPUT", "FORWARD"] {
            let mut check = vec!["-C".to_owned()];
            check.extend(self.jump(base));
            // Delete every copy (a retried apply could have added two).
            while iptables_quiet(&check) {
                let mut del = vec!["-D".to_owned()];
                del.extend(self.jump(base));
                if let Err(e) = iptables(&del.iter().map(String::as_str).collect::<Vec<_>>()) {
                    first_err.get_or_insert(e);
                    break;
                }
            }
        }
        if iptables_quiet(&["-S".to_owned(), self.chain.clone()]) {
            for args in [["-F", &self.chain], ["-X", &self.chain]] {
                if let Err(e) = iptables(&args) {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

/// Isolates the sandbox's port on `bridge` (the host end of the veth the
/// `bridge` plugin made, named in its ADD result `added`) from the
/// bridge's other isolated ports: `IFLA_BRPORT_ISOLATED`, Linux ≥ 4.18,
/// set by iproute2 like the rest of capsid's wiring. Read back, so that a
/// kernel that ignores the attribute fails the set-up instead of leaving
/// guests able to reach each other. The flag goes with the port at DEL.
/// Returns the port's name.
pub fn isolate_port(bridge: &str, added: &CniResult) -> Result<String> {
    let port = added
        .parsed
        .interfaces
        .iter()
        .find(|i| i.sandbox.is_empty() && !i.name.is_empty() && i.name != bridge)
        .map(|i| i.name.clone())
        .ok_or_else(|| CniError::Config {
            what: "CNI ADD result".into(),
            reason: format!("no host-side interface on bridge {bridge} to isolate"),
        })?;
    ip(&[
        "link",
        "set",
        "dev",
        &port,
        "type",
        "bridge_slave",
        "isolated",
        "on",
    ])?;
    let show = ["-j", "-d", "link", "show", "dev", &port];
    let out = ip(&show)?;
    let (master, isolated) = port_state(&out).ok_or_else(|| CniError::Firewall {
        command: format!("ip {}", show.join(" ")),
        reason: format!("unexpected output: {}", out.trim()),
    })?;
    if master != bridge || !isolated {
        return Err(CniError::Firewall {
            command: format!("ip link set dev {port} type bridge_slave isolated on"),
            reason: format!(
                "{port} is on {master:?} with isolation {}; this kernel may predate \
                 bridge port isolation (Linux 4.18)",
                if isolated { "on" } else { "off" }
            ),
        });
    }
    tracing::debug!(bridge, port, "bridge port isolated");
    Ok(port)
}

/// The master and the isolation flag of a bridge port, from `ip -j -d
/// link show dev PORT`.
fn port_state(json: &str) -> Option<(String, bool)> {
    let links: serde_json::Value = serde_json::from_str(json).ok()?;
    let link = links.as_array()?.first()?;
    let master = link.get("master")?.as_str()?.to_owned();
    let isolated = link
        .get("linkinfo")
        .and_then(|l| l.get("info_slave_data"))
        .and_then(|d| d.get("isolated"))
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    Some((master, isolated))
}

/// Runs `ip ARGS…`: its stdout.
fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| CniError::Io {
            what: "running ip".into(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(CniError::Firewall {
            command: format!("ip {}", args.join(" ")),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn iptables(args: &[&str]) -> Result<()> {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .map_err(|source| CniError::Io {
            what: "running iptables".into(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CniError::Firewall {
            command: format!("iptables {}", args.join(" ")),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn iptables_quiet(args: &[String]) -> bool {
    Command::new("iptables")
        .arg("-w")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_differ() {
        let a = Isolation::new("capsid", "run-1", Ipv4Addr::new(10, 213, 0, 2));
        let b = Isolation::new("capsid", "run-2", Ipv4Addr::new(10, 213, 0, 2));
        assert!(a.chain().len() <= 28, "{}", a.chain());
        assert!(a.chain().starts_with("CAPSID-"));
        assert_ne!(a.chain(), b.chain());
        assert_eq!(
            a.jump("OUTPUT")[..3],
            ["OUTPUT".to_owned(), "-d".into(), "10.213.0.2/32".into()]
        );
        assert!(a
            .jump("FORWARD")
            .contains(&"capsid network capsid container run-1".to_owned()));
        let rules = a.rules();
        assert_eq!(
            rules.last().unwrap()[2..],
            ["-j".to_owned(), "REJECT".into()]
        );
    }

    #[test]
    fn the_port_and_its_flag_are_read() {
        let json = r#"[{"ifname":"veth1","master":"capsid0","linkinfo":{"info_kind":"veth",
            "info_slave_kind":"bridge","info_slave_data":{"state":"forwarding","isolated":true}}}]"#;
        assert_eq!(port_state(json), Some(("capsid0".into(), true)));
        let off = json.replace("true", "false");
        assert_eq!(port_state(&off), Some(("capsid0".into(), false)));
        let old = r#"[{"ifname":"veth1","master":"capsid0","linkinfo":{"info_kind":"veth"}}]"#;
        assert_eq!(port_state(old), Some(("capsid0".into(), false)));
        assert_eq!(port_state(r#"[{"ifname":"veth1"}]"#), None);
        assert_eq!(port_state("not json"), None);
        // No host-side interface in the result: refused.
        let added = CniResult::parse(
            br#"{"cniVersion":"1.0.0","interfaces":[{"name":"capsid0"},
                {"name":"eth0","sandbox":"/run/netns/x"}]}"#,
        )
        .unwrap();
        let err = isolate_port("capsid0", &added).unwrap_err().to_string();
        assert!(err.contains("no host-side interface"), "{err}");
    }
}
