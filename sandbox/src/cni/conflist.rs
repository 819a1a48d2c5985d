//! CNI network configuration lists (CNI spec 1.0.0, "Network configuration
//! lists"): the bundled `capsid` network, reading a user's conflist, and
//! the per-plugin configuration a runtime hands each plugin on stdin
//! (section "Deriving execution configuration from plugin configuration").

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{CniError, Result};
use crate::config::{parse_subnet, NetworkConfig};

/// The CNI version capsid speaks (and the plugins in Debian 12 accept).
pub const CNI_VERSION: &str = "1.0.0";
/// Name of the bundled network.
pub const BUNDLED_NETWORK: &str = "capsid";

/// A network configuration list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfList {
    /// CNI version of every plugin configuration in the list.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// Network name: keys IPAM leases and the plugins' iptables chains.
    pub name: String,
    /// Plugin configurations, run in order on ADD and in reverse on DEL.
    pub plugins: Vec<Map<String, Value>>,
}

impl ConfList {
    /// The bundled network: a `bridge` with a gateway address and outbound
    /// masquerading, `host-local` leases under `ipam_dir`, `portmap` for
    /// published ports (with SNAT so 127.0.0.1 works), and `firewall` so
    /// hosts whose FORWARD policy is DROP still pass the container's
    /// outbound traffic.
    pub fn bundled(config: &NetworkConfig, ipam_dir: &Path) -> Result<Self> {
        let (net, prefix) = parse_subnet(&config.subnet).map_err(|reason| CniError::Config {
            what: "network.subnet".into(),
            reason,
        })?;
        let plugins = vec![
            json!({
                "type": "bridge",
                "bridge": config.bridge,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": format!("{net}/{prefix}") }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": ipam_dir,
                },
            }),
            json!({
                "type": "portmap",
                "capabilities": { "portMappings": true },
                "snat": true,
            }),
            json!({ "type": "firewall" }),
        ];
        Ok(Self {
            cni_version: CNI_VERSION.into(),
            name: BUNDLED_NETWORK.into(),
            plugins: plugins
                .into_iter()
                .filter_map(|v| match v {
                    Value::Object(m) => Some(m),
                    _ => None,
                })
                .collect(),
        })
    }

    /// Reads and checks a conflist file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).map_err(|source| CniError::Io {
            what: format!("conflist {}", path.display()),
            source,
        })?;
        let list: Self = serde_json::from_slice(&text).map_err(|source| CniError::ConfList {
            path: path.to_path_buf(),
            source,
        })?;
        list.check().map_err(|reason| CniError::Config {
            what: format!("conflist {}", path.display()),
            reason,
        })?;
        Ok(list)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.name.is_empty() {
            return Err("the network has no name".into());
        }
        if self.plugins.is_empty() {
            return Err("no plugins".into());
        }
        for (i, p) in self.plugins.iter().enumerate() {
            let ty = p.get("type").and_then(Value::as_str).unwrap_or("");
            if ty.is_empty() || ty.contains('/') || ty.starts_with('.') {
                return Err(format!("plugin {i} has no valid \"type\""));
            }
        }
        Ok(())
    }

    /// Whether some plugin declares `capability` (e.g. `portMappings`).
    pub fn has_capability(&self, capability: &str) -> bool {
        self.plugins
            .iter()
            .any(|p| plugin_has_capability(p, capability))
    }
}

fn plugin_has_capability(plugin: &Map<String, Value>, capability: &str) -> bool {
    plugin
        .get("capabilities")
        .and_then(|c| c.get(capability))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// The plugin's `type`: the executable's name.
pub fn plugin_type(plugin: &Map<String, Value>) -> &str {
    plugin.get("type").and_then(Value::as_str).unwrap_or("")
}

/// The configuration one plugin gets on stdin: its own keys plus the
/// list's `name` and `cniVersion`, the runtime arguments for the
/// capabilities it declares (and only those), and the previous result.
pub fn plugin_config(
    list: &ConfList,
    plugin: &Map<String, Value>,
    runtime: &Map<String, Value>,
    prev_result: Option<&Value>,
) -> Value {
    let mut conf = plugin.clone();
    conf.insert("name".into(), Value::String(list.name.clone()));
    conf.insert("cniVersion".into(), Value::String(list.cni_version.clone()));
    let granted: Map<String, Value> = runtime
        .iter()
        .filter(|(k, _)| plugin_has_capability(plugin, k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if granted.is_empty() {
        conf.remove("runtimeConfig");
    } else {
        conf.insert("runtimeConfig".into(), Value::Object(granted));
    }
    match prev_result {
        Some(prev) => conf.insert("prevResult".into(), prev.clone()),
        None => conf.remove("prevResult"),
    };
    Value::Object(conf)
}

/// Where the bundled network keeps its host-local leases: under the state
/// directory, in a name no sandbox id can take (ids never start with a dot).
pub fn ipam_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(".cni").join("ipam")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundled() -> ConfList {
        ConfList::bundled(
            &NetworkConfig::default(),
            Path::new("/run/capsid/.cni/ipam"),
        )
        .unwrap()
    }

    #[test]
    fn bundled_network_renders() {
        let list = bundled();
        assert_eq!(list.name, "capsid");
        assert_eq!(list.cni_version, "1.0.0");
        let types: Vec<&str> = list.plugins.iter().map(plugin_type).collect();
        assert_eq!(types, ["bridge", "portmap", "firewall"]);
        let bridge = Value::Object(list.plugins[0].clone());
        assert_eq!(bridge["bridge"], "capsid0");
        assert_eq!(bridge["ipMasq"], true);
        assert_eq!(bridge["ipam"]["type"], "host-local");
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], "10.213.0.0/24");
        assert_eq!(bridge["ipam"]["dataDir"], "/run/capsid/.cni/ipam");
        assert!(list.has_capability("portMappings"));
        assert!(!list.has_capability("bandwidth"));
        // What a user would write as a file reads back the same.
        let text = serde_json::to_string(&list).unwrap();
        assert_eq!(serde_json::from_str::<ConfList>(&text).unwrap(), list);
    }

    #[test]
    fn plugin_config_gets_name_version_capabilities_and_prev_result() {
        let list = bundled();
        let mut runtime = Map::new();
        runtime.insert(
            "portMappings".into(),
            json!([{ "hostPort": 8080, "containerPort": 80, "protocol": "tcp" }]),
        );
        let prev = json!({ "cniVersion": "1.0.0", "ips": [] });
        let bridge = plugin_config(&list, &list.plugins[0], &runtime, None);
        assert_eq!(bridge["name"], "capsid");
        assert_eq!(bridge["cniVersion"], "1.0.0");
        assert!(
            bridge.get("runtimeConfig").is_none(),
            "bridge asked for nothing"
        );
        assert!(bridge.get("prevResult").is_none());
        let portmap = plugin_config(&list, &list.plugins[1], &runtime, Some(&prev));
        assert_eq!(
            portmap["runtimeConfig"]["portMappings"][0]["hostPort"],
            8080
        );
        assert_eq!(portmap["prevResult"], prev);
        assert_eq!(portmap["type"], "portmap");
    }

    #[test]
    fn an_invalid_subnet_is_refused() {
        let e = ConfList::bundled(
            &NetworkConfig {
                subnet: "x".into(),
                ..NetworkConfig::default()
            },
            Path::new("/x"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("network.subnet"), "{e}");
    }

    #[test]
    fn conflist_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("net.conflist");
        std::fs::write(
            &path,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        assert_eq!(ConfList::read(&path).unwrap().name, "n");
        std::fs::write(
            &path,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../x"}]}"#,
        )
        .unwrap();
        let e = ConfList::read(&path).unwrap_err().to_string();
        assert!(e.contains("plugin 0"), "{e}");
        std::fs::write(&path, r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#).unwrap();
        assert!(ConfList::read(&path).is_err());
        std::fs::write(&path, "{").unwrap();
        let e = ConfList::read(&path).unwrap_err();
        assert!(matches!(e, CniError::ConfList { .. }), "{e}");
        assert!(e.to_string().contains("net.conflist"), "{e}");
    }
}
