//! What tearing a sandbox's CNI network down needs, written down while it
//! is set up, so that another process can undo it all after the one that
//! made it died (SIGKILL, a crash): [`NetworkRecord`] is handed to the
//! caller before each step that makes something, and [`recover`] runs the
//! same teardown from it.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::conflist::ConfList;
use super::exec::{Attachment, Plugins};
use super::isolation::Isolation;
use super::result::CniResult;
use super::{CniError, CniNetwork, Result};
use crate::netns::{self, NamedNetns};
use crate::network;
use crate::process::{kill_all, ProcessRef};

/// How long killed plugin processes get to disappear.
const PLUGIN_KILL_WAIT: Duration = Duration::from_secs(5);

/// One sandbox's attachment to a CNI network, as far as it got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// The configuration list ADD ran with (DEL must get the same).
    pub list: ConfList,
    /// Where the plugins were found.
    pub plugin_dirs: Vec<PathBuf>,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// The named network namespace (it may not exist yet).
    pub netns: PathBuf,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// Runtime arguments (`portMappings`).
    pub runtime: Map<String, Value>,
    /// The tap made for the VM in the namespace (it may not exist yet).
    pub tap: String,
    /// The bundled bridge and its lock file; `None` for a user's conflist.
    pub bridge: Option<(String, PathBuf)>,
    /// The ADD result, once ADD succeeded; DEL gets it as `prevResult`.
    /// (Without it DEL still runs: plugins find their state by container
    /// id.)
    pub added: Option<Value>,
}

impl CniNetwork {
    /// The record of this attachment.
    pub(super) fn record(&self) -> NetworkRecord {
        NetworkRecord {
            list: self.list.clone(),
            plugin_dirs: self.plugins.dirs().to_vec(),
            container_id: self.attachment.container_id.clone(),
            netns: self.attachment.netns.clone(),
            ifname: self.attachment.ifname.clone(),
            runtime: self.runtime.clone(),
            tap: network::tap_name_for(&self.attachment.container_id),
            bridge: self.bridge.clone(),
            added: self.added.as_ref().map(|r| r.raw.clone()),
        }
    }
}

/// Undoes what `record` says was (or may have been) set up: the tap, the
/// isolation chain, CNI DEL (portmap's DNAT, the masquerade, the IPAM lease,
/// the veth), the unused bundled bridge, the namespace. What is already
/// gone is no error; every step is tried and the first error returned.
pub fn recover(record: &NetworkRecord) -> Result<()> {
    let mut first_err = None;
    // Plugins the dead process was running would go on (an ADD finishing
    // after our DEL would leave its lease and rules): they go first.
    stop_plugins_of(&record.container_id);
    let added = match &record.added {
        Some(raw) => match CniResult::parse(raw.to_string().as_bytes()) {
            Ok(r) => Some(r),
            Err(reason) => {
                first_err.get_or_insert(CniError::Config {
                    what: "recorded CNI result".into(),
                    reason,
                });
                None
            }
        },
        // ADD never returned (its maker died during it): what the plugins
        // made so far is found by the addresses host-local leased, given
        // to DEL as the prevResult some plugins need (the firewall plugin
        // removes its rules by address only).
        None => leased_result(record),
    };
    // The namespace outlives its maker only while something pins it: the
    // bind mount (gone with a private mount namespace, e.g. under `ip netns
    // exec`) or a process in it. Gone, it took the tap and the veth along.
    let netns = if netns::is_live(&record.netns) {
        // (Deleting the namespace would take the tap with it, but only
        // once no process holds it.)
        if let Err(e) = network::detach_leftovers(&record.netns, &record.tap) {
            first_err.get_or_insert(CniError::Attach(e));
        }
        NamedNetns::adopt(record.netns.clone())
    } else {
        let addresses = match &added {
            Some(r) => r.container_ipv4(),
            None => leased_ipv4(&record.list, &record.container_id)
                .into_iter()
                .map(|a| (a, 32))
                .collect(),
        };
        match revive(record, &addresses) {
            Ok(ns) => ns,
            Err(e) => {
                first_err.get_or_insert(e);
                NamedNetns::adopt(record.netns.clone())
            }
        }
    };
    let isolation = added
        .as_ref()
        .and_then(|r| r.container_ipv4().first().map(|(a, _)| *a))
        .map(|addr| Isolation::new(&record.list.name, &record.container_id, addr));
    let net = CniNetwork {
        plugins: Plugins::new(&record.plugin_dirs),
        list: record.list.clone(),
        attachment: Attachment {
            container_id: record.container_id.clone(),
            netns: record.netns.clone(),
            ifname: record.ifname.clone(),
        },
        runtime: record.runtime.clone(),
        netns: Some(netns),
        added,
        del_due: true,
        isolation,
        tap: None,
        bridge: record.bridge.clone(),
    };
    tracing::info!(id = %record.container_id, netns = %record.netns.display(), "removing the network of a dead sandbox");
    if let Err(e) = net.teardown() {
        first_err.get_or_insert(e);
    }
    match first_err {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// A CNI result naming the addresses leased to `record`'s container, for a
/// DEL whose ADD never returned; `None` when nothing was leased.
fn leased_result(record: &NetworkRecord) -> Option<CniResult> {
    let ips: Vec<Value> = leased_ipv4(&record.list, &record.container_id)
        .into_iter()
        .map(|a| serde_json::json!({"address": format!("{a}/32"), "interface": 0}))
        .collect();
    if ips.is_empty() {
        return None;
    }
    let raw = serde_json::json!({
        "cniVersion": record.list.cni_version,
        "interfaces": [{"name": record.ifname, "sandbox": record.netns}],
        "ips": ips,
    });
    CniResult::parse(raw.to_string().as_bytes()).ok()
}

/// The IPv4 addresses `host-local` leased to `container_id` on `list`'s
/// network (its lease files are named by the address and start with the
/// container id): what a dead ADD got before its result was recorded.
fn leased_ipv4(list: &ConfList, container_id: &str) -> Vec<Ipv4Addr> {
    /// host-local's default `dataDir`.
    const HOST_LOCAL_DIR: &str = "/var/lib/cni/networks";
    let mut found = Vec::new();
    for plugin in &list.plugins {
        let Some(ipam) = plugin.get("ipam") else {
            continue;
        };
        if ipam.get("type").and_then(Value::as_str) != Some("host-local") {
            continue;
        }
        let data_dir = ipam
            .get("dataDir")
            .and_then(Value::as_str)
            .unwrap_or(HOST_LOCAL_DIR);
        let dir = std::path::Path::new(data_dir).join(&list.name);
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(addr) = entry.file_name().to_string_lossy().parse::<Ipv4Addr>() else {
                continue;
            };
            let owner = std::fs::read_to_string(entry.path()).unwrap_or_default();
            if owner.lines().next().map(str::trim) == Some(container_id) {
                found.push(addr);
            }
        }
    }
    found
}

/// Kills the plugin processes (and what they run: the IPAM plugin,
/// iptables) still working for `container_id`, found by the `CNI_*`
/// environment they were given, and waits for them to go.
fn stop_plugins_of(container_id: &str) {
    let needle = format!("CNI_CONTAINERID={container_id}");
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    let victims: Vec<ProcessRef> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
        })
        .filter_map(ProcessRef::of)
        .collect();
    for pid in kill_all(&victims, PLUGIN_KILL_WAIT) {
        tracing::info!(pid, container_id, "killed a CNI plugin of a dead sandbox");
    }
}

/// A fresh namespace in place of a dead one, with an interface `ifname`
/// holding the container's recorded addresses: `bridge`'s DEL finds the
/// masquerade rules to remove through the addresses of that interface.
fn revive(record: &NetworkRecord, addresses: &[(Ipv4Addr, u8)]) -> Result<NamedNetns> {
    NamedNetns::adopt(record.netns.clone()).delete()?;
    let dir = record
        .netns
        .parent()
        .unwrap_or_else(|| std::path::Path::new(netns::NETNS_DIR));
    let name = record
        .netns
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ns = NamedNetns::create_in(dir, &name)?;
    if addresses.is_empty() {
        return Ok(ns);
    }
    // A tap: `dummy` may not be built into the host kernel; tun is (the
    // VMs need it).
    let mut commands = vec![vec![
        "tuntap".to_owned(),
        "add".into(),
        "dev".into(),
        record.ifname.clone(),
        "mode".into(),
        "tap".into(),
    ]];
    for (addr, len) in addresses {
        commands.push(vec![
            "addr".into(),
            "add".into(),
            format!("{addr}/{len}"),
            "dev".into(),
            record.ifname.clone(),
        ]);
    }
    for args in commands {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", record.netns.display()))
            .arg("--")
            .arg("ip")
            .args(&args)
            .output()
            .map_err(|source| CniError::Io {
                what: "running nsenter".into(),
                source,
            })?;
        if !out.status.success() {
            // `ns` is dropped: the namespace goes again.
            return Err(CniError::Firewall {
                command: format!("ip {}", args.join(" ")),
                reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
    }
    tracing::debug!(netns = %record.netns.display(), "namespace re-made for CNI DEL");
    Ok(ns)
}
