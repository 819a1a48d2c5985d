//! `capsid run --network none|bridge`, `--publish`, `--dns`: the flags
//! checked up front (one clear error each, before anything exists), the
//! CNI network set up for the sandbox, and the container's resolver.
//!
//! Without `--publish` the default is `none`: `capsid run` is also the
//! tool of tests and start-up benchmarks, which must not depend on (or pay
//! for) a network, and nothing is exposed unless asked. `--publish` implies
//! `bridge`.

use std::net::IpAddr;

use anyhow::bail;
use capsid_sandbox::cni::ports::PortMapping;
use capsid_sandbox::cni::{self, CniError, CniNetwork, Tap};
use capsid_sandbox::config::Config;
use capsid_sandbox::network::GuestDns;

use crate::runs::RunJournal;

/// Which network the sandbox joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No NIC at all.
    None,
    /// The CNI network of the config (the bundled bridge by default).
    Bridge,
}

/// The checked network flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The network.
    pub mode: Mode,
    /// Published ports.
    pub ports: Vec<PortMapping>,
    /// `--dns` servers.
    pub dns: Vec<IpAddr>,
}

impl Plan {
    /// Parses the flags; ports are not checked against the host yet.
    pub fn parse(
        network: Option<&str>,
        publish: &[String],
        dns: &[String],
    ) -> anyhow::Result<Self> {
        let mode = match network {
            None if publish.is_empty() => Mode::None,
            None | Some("bridge") => Mode::Bridge,
            Some("none") => Mode::None,
            Some(other) => {
                bail!("--network {other:?}: unknown network mode (expected none or bridge)")
            }
        };
        let ports = publish
            .iter()
            .map(|p| {
                p.parse::<PortMapping>()
                    .map_err(|e| anyhow::anyhow!("--publish {p:?}: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if mode == Mode::None && !ports.is_empty() {
            bail!("--publish needs a network: it cannot be used with --network none");
        }
        let dns = dns
            .iter()
            .map(|d| {
                d.parse::<IpAddr>()
                    .map_err(|_| anyhow::anyhow!("--dns {d:?} is not an IP address"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self { mode, ports, dns })
    }

    /// Checks the published ports are distinct and free on the host.
    pub fn check_ports(&self) -> anyhow::Result<()> {
        Ok(cni::check_ports(&self.ports)?)
    }

    /// Puts sandbox `id` on the network (`None` for `--network none`),
    /// noting each step in `journal` before it is taken.
    pub async fn setup(
        &self,
        config: &Config,
        id: &str,
        journal: &mut RunJournal,
    ) -> anyhow::Result<Option<CniNetwork>> {
        self.setup_with(config, id, Tap::Attach, journal).await
    }

    /// [`Plan::setup`] for a pooled sandbox, whose booted VM's tap is moved
    /// into the namespace ([`Tap::Leave`]).
    pub async fn setup_with(
        &self,
        config: &Config,
        id: &str,
        tap: Tap,
        journal: &mut RunJournal,
    ) -> anyhow::Result<Option<CniNetwork>> {
        if self.mode == Mode::None {
            return Ok(None);
        }
        let (config, id, ports) = (config.clone(), id.to_owned(), self.ports.clone());
        let net = tokio::task::block_in_place(|| {
            CniNetwork::setup_recorded(&config, &id, &ports, tap, &mut |record| {
                journal.set_network(record).map_err(|e| CniError::Io {
                    what: "recording the network set-up".into(),
                    source: std::io::Error::other(format!("{e:#}")),
                })
            })
        })?;
        Ok(Some(net))
    }

    /// The container's resolver: `--dns`; else, on a network, what the
    /// plugins returned or else the host's resolv.conf without loopback
    /// servers (a local stub resolver is unreachable from the guest);
    /// else nothing (the image's own file stays).
    pub fn resolver(&self, net: Option<&CniNetwork>) -> GuestDns {
        if !self.dns.is_empty() {
            return GuestDns {
                servers: self.dns.iter().map(IpAddr::to_string).collect(),
                ..GuestDns::default()
            };
        }
        let Some(net) = net else {
            return GuestDns::default();
        };
        let from_cni = net.dns_servers();
        if !from_cni.is_empty() {
            return GuestDns {
                servers: from_cni,
                ..GuestDns::default()
            };
        }
        let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        host_resolver(&host)
    }
}

/// The host's resolver settings minus loopback servers; empty when none is
/// left.
fn host_resolver(resolv_conf: &str) -> GuestDns {
    let mut dns = GuestDns::parse_resolv_conf(resolv_conf);
    dns.servers
        .retain(|s| s.parse::<IpAddr>().is_ok_and(|ip| !ip.is_loopback()));
    if dns.servers.is_empty() {
        return GuestDns::default();
    }
    dns
}

/// Tears the network down off the async threads; failures are reported
/// (and the run's record kept, so the next run tries again) but do not
/// change the container's exit status.
pub async fn teardown(net: Option<CniNetwork>, journal: &mut RunJournal) {
    let Some(net) = net else { return };
    let done = tokio::task::spawn_blocking(move || net.teardown()).await;
    let failure = match done {
        Ok(Ok(())) => return,
        Ok(Err(e)) => format!("{:#}", anyhow::Error::from(e)),
        Err(e) => e.to_string(),
    };
    eprintln!("capsid: removing the network: {failure}");
    journal.keep();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(network: Option<&str>, publish: &[&str], dns: &[&str]) -> anyhow::Result<Plan> {
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        Plan::parse(network, &s(publish), &s(dns))
    }

    #[test]
    fn default_is_none_unless_publishing() {
        assert_eq!(parse(None, &[], &[]).unwrap().mode, Mode::None);
        assert_eq!(parse(None, &["8080:80"], &[]).unwrap().mode, Mode::Bridge);
        assert_eq!(parse(Some("bridge"), &[], &[]).unwrap().mode, Mode::Bridge);
        assert_eq!(
            parse(Some("none"), &[], &["1.1.1.1"]).unwrap().mode,
            Mode::None
        );
    }

    #[test]
    fn bad_flags_say_which() {
        let e = |r: anyhow::Result<Plan>| format!("{:#}", r.unwrap_err());
        assert_eq!(
            e(parse(Some("bogus"), &[], &[])),
            "--network \"bogus\": unknown network mode (expected none or bridge)"
        );
        assert_eq!(
            e(parse(None, &["99999:80"], &[])),
            "--publish \"99999:80\": host port 99999 is not between 1 and 65535"
        );
        assert!(e(parse(None, &["abc"], &[])).starts_with("--publish \"abc\": "));
        assert!(e(parse(Some("none"), &["80:80"], &[])).contains("--network none"));
        assert_eq!(
            e(parse(None, &[], &["8.8.8"])),
            "--dns \"8.8.8\" is not an IP address"
        );
    }

    #[test]
    fn host_resolver_drops_loopback() {
        let dns = host_resolver("nameserver 127.0.0.53\nnameserver 10.0.0.2\nsearch lan\n");
        assert_eq!(dns.servers, ["10.0.0.2"]);
        assert_eq!(dns.search, ["lan"]);
        assert!(host_resolver("nameserver 127.0.0.53\nsearch lan\n").is_empty());
        assert!(host_resolver("").is_empty());
    }

    #[test]
    fn dns_flag_wins() {
        let plan = parse(None, &[], &["10.1.1.1", "fd00::1"]).unwrap();
        assert_eq!(plan.resolver(None).servers, ["10.1.1.1", "fd00::1"]);
        assert!(parse(None, &[], &[]).unwrap().resolver(None).is_empty());
    }
}
