//! A sandbox on a CNI network, for `capsid run --network bridge`: capsid is
//! the container runtime of the CNI spec (1.0.0) here. It creates a named
//! network namespace, runs the plugin chain of a conflist (the bundled
//! `capsid` network: bridge + host-local + portmap + firewall) to put a veth
//! in it, closes every unpublished port and, on the bundled bridge,
//! isolates the sandbox's port from the other guests' ([`isolation`]), and
//! joins a tap for the VM to the veth ([`crate::network::attach`]), guarded
//! against spoofing; on the bundled network the host drops every new connection
//! from a guest to itself ([`containment`]). Teardown undoes it all in
//! reverse: tap, filter, CNI DEL (iptables rules, IPAM lease, veth), the
//! bundled bridge and its host firewall once unused, namespace.

pub mod conflist;
pub mod containment;
pub mod exec;
pub mod isolation;
pub mod ports;
pub mod record;
pub mod result;

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use nix::fcntl::{Flock, FlockArg};

use serde_json::{Map, Value};

use crate::backend::NetSpec;
use crate::config::Config;
use crate::netns::{self, NamedNetns, NetnsError};
use crate::network::{self, GuestNetwork, NetworkError, TapAttachment};
use conflist::ConfList;
use containment::HostFirewall;
use exec::{Attachment, Plugins};
use isolation::Isolation;
use ports::PortMapping;
use record::NetworkRecord;
use result::CniResult;

/// The interface name the plugins give the veth inside the namespace.
pub const IFNAME: &str = "eth0";

/// Errors of CNI networking.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// A configuration is unusable.
    #[error("invalid {what}: {reason}")]
    Config {
        /// What was being read.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// A conflist file is not the JSON of a network configuration list.
    #[error("invalid conflist {path}")]
    ConfList {
        /// The file.
        path: PathBuf,
        /// What the JSON parser said.
        #[source]
        source: serde_json::Error,
    },
    /// A file or process operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A plugin executable is missing.
    #[error(
        "CNI plugin {plugin:?} not found in {path} (is containernetworking-plugins installed?)"
    )]
    NoPlugin {
        /// The plugin type.
        plugin: String,
        /// Where it was looked for.
        path: String,
    },
    /// A plugin failed; the reason is the plugin's own message.
    #[error("CNI plugin {plugin} failed ({command}): {reason}")]
    Plugin {
        /// The plugin type.
        plugin: String,
        /// ADD or DEL.
        command: String,
        /// Its error reply or stderr.
        reason: String,
    },
    /// A firewall command (iptables, nft) failed.
    #[error("`{command}` failed: {reason}")]
    Firewall {
        /// What was run.
        command: String,
        /// Its stderr.
        reason: String,
    },
    /// A published port cannot be had.
    #[error("--publish: {0}")]
    Port(String),
    /// The tap could not be joined to the veth.
    #[error("cannot attach the VM to the network")]
    Attach(#[source] NetworkError),
    /// The sandbox's network namespace could not be made or removed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// Result of CNI operations.
pub type Result<T> = std::result::Result<T, CniError>;

/// Checks published ports before anything is set up: distinct, and free
/// on the host.
pub fn check_ports(ports: &[PortMapping]) -> Result<()> {
    ports::check_distinct(ports).map_err(CniError::Port)?;
    for p in ports {
        p.check_free().map_err(CniError::Port)?;
    }
    Ok(())
}

/// The network configuration in effect: the configured conflist, or the
/// bundled one.
pub fn conflist_for(config: &Config) -> Result<ConfList> {
    match &config.network.conflist {
        Some(path) => ConfList::read(path),
        None => ConfList::bundled(
            &config.network,
            &conflist::ipam_dir(&config.paths.state_dir),
        ),
    }
}

/// One sandbox's place on a CNI network. [`CniNetwork::teardown`] removes
/// it; dropping it does the same, as a last resort on error paths.
#[derive(Debug)]
pub struct CniNetwork {
    plugins: Plugins,
    list: ConfList,
    attachment: Attachment,
    runtime: Map<String, Value>,
    netns: Option<NamedNetns>,
    /// The ADD result, once ADD succeeded (DEL is due from then on).
    added: Option<CniResult>,
    /// DEL is due even without an ADD result: recovering after a process
    /// that died during ADD.
    del_due: bool,
    isolation: Option<Isolation>,
    tap: Option<TapAttachment>,
    /// The bundled network's bridge and the lock serializing its creation
    /// (by ADD) and removal (after the last DEL); `None` for a user's
    /// conflist, whose bridges are not ours to remove.
    bridge: Option<(String, PathBuf)>,
}

/// Whether [`CniNetwork::setup_recorded`] attaches the VM's tap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tap {
    /// A new tap for a VM booted on this network.
    Attach,
    /// None: a booted VM's tap is moved in later.
    Leave,
}

impl CniNetwork {
    /// Creates namespace `capsid-ID`, runs ADD, closes unpublished ports
    /// and attaches tap for the VM. On error nothing is left. Blocks (runs
    /// plugins and iproute2).
    pub fn setup(config: &Config, id: &str, ports: &[PortMapping]) -> Result<Self> {
        Self::setup_recorded(config, id, ports, Tap::Attach, &mut |_| Ok(()))
    }

    /// [`CniNetwork::setup`], handing `record` what teardown needs before
    /// anything is made and again once ADD returned, so that
    /// [`record::recover`] can undo it all if this process dies. A failing
    /// `record` fails the set-up (nothing is left). With [`Tap::Leave`] the
    /// namespace is left for a VM's existing tap to be moved in (a pooled
    /// sandbox's, `network::adopt_tap`), as a CNI runtime leaves it for a
    /// container's shim.
    pub fn setup_recorded(
        config: &Config,
        id: &str,
        ports: &[PortMapping],
        tap: Tap,
        record: &mut dyn FnMut(&NetworkRecord) -> Result<()>,
    ) -> Result<Self> {
        let list = conflist_for(config)?;
        if !ports.is_empty() && !list.has_capability("portMappings") {
            return Err(CniError::Config {
                what: format!("network {:?}", list.name),
                reason: "--publish needs a plugin with the portMappings capability (portmap)"
                    .into(),
            });
        }
        check_ports(ports)?;
        let plugins = Plugins::new(&config.network.plugin_dirs);
        plugins.check(&list)?;
        let bridge = config.network.conflist.is_none().then(|| {
            (
                config.network.bridge.clone(),
                conflist::ipam_dir(&config.paths.state_dir).with_file_name("bridge.lock"),
            )
        });
        let mut runtime = Map::new();
        if !ports.is_empty() {
            runtime.insert(
                "portMappings".into(),
                Value::Array(ports.iter().map(PortMapping::to_cni).collect()),
            );
        }
        let name = format!("capsid-{id}");
        let mut net = Self {
            plugins,
            attachment: Attachment {
                container_id: id.to_owned(),
                netns: PathBuf::from(netns::NETNS_DIR).join(&name),
                ifname: IFNAME.into(),
            },
            list,
            runtime,
            netns: None,
            added: None,
            del_due: false,
            isolation: None,
            tap: None,
            bridge,
        };
        record(&net.record())?;
        net.netns = Some(NamedNetns::create(&name)?);
        // From here on an error drops `net`, which undoes what was done.
        let added = {
            let _lock = net.lock_bridge()?;
            // Before the first guest is on the bridge; replaced whole for
            // each sandbox, so a table changed or lost since is repaired.
            if let Some(firewall) = net.host_firewall()? {
                firewall.ensure()?;
            }
            net.plugins.add(&net.list, &net.attachment, &net.runtime)?
        };
        let addr = added.container_ipv4().first().map(|(a, _)| *a);
        // Guests on the bundled bridge never reach each other directly,
        // with or without br_netfilter; before the VM exists.
        let port = net
            .bridge
            .as_ref()
            .map(|(bridge, _)| isolation::isolate_port(bridge, &added));
        net.added = Some(added);
        record(&net.record())?;
        port.transpose()?;
        if let Some(addr) = addr {
            let iso = Isolation::new(&net.list.name, id, addr);
            iso.apply()?;
            net.isolation = Some(iso);
        } else {
            tracing::warn!(id, "the CNI result has no IPv4 address: no inbound filter");
        }
        if tap == Tap::Attach {
            // Guarded against spoofing by attach itself, before the redirect.
            let tap = network::attach(&net.attachment.netns, &network::tap_name_for(id))
                .map_err(CniError::Attach)?;
            net.tap = Some(tap);
        }
        tracing::info!(id, netns = %net.attachment.netns.display(), address = ?addr, "on CNI network {}", net.list.name);
        Ok(net)
    }

    /// The VM's NIC.
    pub fn net_spec(&self) -> Option<NetSpec> {
        self.tap.as_ref().map(TapAttachment::net_spec)
    }

    /// What the guest configures on its interface.
    pub fn guest_network(&self) -> Option<GuestNetwork> {
        self.tap.as_ref().map(|t| t.guest.clone())
    }

    /// The container's IPv4 address on the network.
    pub fn container_ipv4(&self) -> Option<Ipv4Addr> {
        self.added
            .as_ref()
            .and_then(|r| r.container_ipv4().first().map(|(a, _)| *a))
    }

    /// Name servers the plugins returned (the bundled network returns none).
    pub fn dns_servers(&self) -> Vec<String> {
        self.added
            .as_ref()
            .map(|r| r.parsed.dns.nameservers.clone())
            .unwrap_or_default()
    }

    /// The namespace's path.
    pub fn netns_path(&self) -> PathBuf {
        self.attachment.netns.clone()
    }

    /// Removes everything [`CniNetwork::setup`] made; every step is tried,
    /// the first error is returned.
    pub fn teardown(mut self) -> Result<()> {
        self.undo()
    }

    fn undo(&mut self) -> Result<()> {
        let mut first_err: Option<CniError> = None;
        if let Some(tap) = self.tap.take() {
            if let Err(e) = tap.detach() {
                first_err.get_or_insert(CniError::Attach(e));
            }
        }
        if let Some(iso) = self.isolation.take() {
            if let Err(e) = iso.remove() {
                first_err.get_or_insert(e);
            }
        }
        let added = self.added.take();
        if let Some(added) = &added {
            // bridge's DEL finds the masquerade rules to remove through the
            // addresses still on the veth: make sure they are there.
            self.restore_addresses(added);
        }
        let lock = self.lock_bridge();
        if added.is_some() || self.del_due {
            if let Err(e) =
                self.plugins
                    .del(&self.list, &self.attachment, &self.runtime, added.as_ref())
            {
                first_err.get_or_insert(e);
            }
        }
        match lock {
            // Also after a failed ADD, which may have made the bridge.
            Ok(_lock) => {
                if let Err(e) = self.remove_unused_bridge() {
                    first_err.get_or_insert(e);
                }
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
        if let Some(ns) = self.netns.take() {
            if let Err(e) = ns.delete() {
                first_err.get_or_insert(e.into());
            }
        }
        match first_err {
            None => {
                tracing::info!(id = %self.attachment.container_id, "left CNI network {}", self.list.name);
                Ok(())
            }
            Some(e) => Err(e),
        }
    }

    /// Holds the bundled bridge's lock (nothing for a user's conflist).
    fn lock_bridge(&self) -> Result<Option<Flock<File>>> {
        let Some((_, path)) = &self.bridge else {
            return Ok(None);
        };
        let io = |source| CniError::Io {
            what: format!("locking {}", path.display()),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io)?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map(Some)
            .map_err(|(_, errno)| io(errno.into()))
    }

    /// The bundled network's host firewall (`None` for a user's conflist,
    /// whose host side is its owner's).
    fn host_firewall(&self) -> Result<Option<HostFirewall>> {
        self.bridge
            .as_ref()
            .map(|(bridge, _)| HostFirewall::for_bridge(bridge))
            .transpose()
    }

    /// Deletes the bundled bridge and its host firewall once no container
    /// is on it, so nothing of capsid stays on the host after its last
    /// container (the next ADD makes both again). Called with the bridge
    /// lock held, so no set-up is between its firewall and its ADD. A
    /// bridge that could not be deleted is only logged; the firewall's
    /// removal failing is the error.
    fn remove_unused_bridge(&self) -> Result<()> {
        let Some((bridge, _)) = &self.bridge else {
            return Ok(());
        };
        let quiet = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .stderr(std::process::Stdio::null())
                .output()
        };
        if quiet(&["link", "show", "dev", bridge]).is_ok_and(|o| o.status.success()) {
            match quiet(&["-o", "link", "show", "master", bridge]) {
                Ok(out) if out.status.success() && out.stdout.trim_ascii().is_empty() => {
                    let deleted = Command::new("ip")
                        .args(["link", "del", "dev", bridge])
                        .status();
                    if deleted.is_ok_and(|s| s.success()) {
                        tracing::info!(bridge, "removed the unused bridge");
                    } else {
                        tracing::warn!(bridge, "could not remove the unused bridge");
                    }
                }
                // In use (or unreadable): the firewall stays with it.
                _ => return Ok(()),
            }
        }
        match self.host_firewall()? {
            Some(firewall) => firewall.remove(),
            None => Ok(()),
        }
    }

    fn restore_addresses(&self, added: &CniResult) {
        for (addr, len) in added.container_ipv4() {
            let status = Command::new("nsenter")
                .arg(format!("--net={}", self.attachment.netns.display()))
                .args([
                    "ip",
                    "addr",
                    "replace",
                    &format!("{addr}/{len}"),
                    "dev",
                    IFNAME,
                ])
                .stderr(std::process::Stdio::null())
                .status();
            if !status.is_ok_and(|s| s.success()) {
                tracing::debug!(%addr, "could not put the address back on the veth");
            }
        }
    }
}

impl Drop for CniNetwork {
    fn drop(&mut self) {
        if self.netns.is_some() {
            if let Err(e) = self.undo() {
                tracing::warn!(error = %e, "tearing down the CNI network");
            }
        }
    }
}
