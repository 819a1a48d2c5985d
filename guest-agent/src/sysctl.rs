//! The spec's `net.*` sysctls, applied by the agent. A container shares the
//! VM's network namespace (the VM is its network boundary), so libcontainer
//! would refuse them as "host network namespace" settings; but that
//! namespace is the container's alone (or its pod's), exactly what the
//! spec's new network namespace would have been. Docker sets two on every
//! container (`net.ipv4.ping_group_range`, `net.ipv4.ip_unprivileged_port_start`).

use std::collections::HashMap;
use std::path::PathBuf;

/// Errors applying sysctls.
#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    /// The key is not a sysctl name.
    #[error("invalid sysctl name {0:?}")]
    BadName(String),
    /// The kernel refused the value (or has no such setting).
    #[error("cannot set sysctl {key} to {value:?}")]
    Write {
        /// The sysctl.
        key: String,
        /// The value.
        value: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Takes the `net.*` entries out of `sysctls`, for [`apply`].
pub fn take_net(sysctls: &mut HashMap<String, String>) -> Vec<(String, String)> {
    // Dotted (`net.ipv4.x`) or slashed (`net/ipv4/x`), as sysctl(8) takes.
    let keys: Vec<String> = sysctls
        .keys()
        .filter(|k| k.starts_with("net.") || k.starts_with("net/"))
        .cloned()
        .collect();
    let mut taken: Vec<(String, String)> = keys
        .into_iter()
        .filter_map(|k| sysctls.remove_entry(&k))
        .collect();
    taken.sort();
    taken
}

/// The /proc/sys file of `key`: dots separate its parts, or slashes when
/// it has any (then a dot is part of a name, `eth0.100`), as in sysctl(8).
/// Refuses anything that could leave /proc/sys.
pub fn path_of(key: &str) -> Result<PathBuf, SysctlError> {
    let bad = || SysctlError::BadName(key.to_owned());
    let separator = if key.contains('/') { '/' } else { '.' };
    let parts: Vec<&str> = key.split(separator).collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '/' | '_' | '-'))
    {
        return Err(bad());
    }
    Ok(parts
        .iter()
        .fold(PathBuf::from("/proc/sys"), |path, part| path.join(part)))
}

/// Writes each sysctl in the agent's (the VM's) network namespace.
pub fn apply(sysctls: &[(String, String)]) -> Result<(), SysctlError> {
    for (key, value) in sysctls {
        let path = path_of(key)?;
        std::fs::write(&path, value).map_err(|source| SysctlError::Write {
            key: key.clone(),
            value: value.clone(),
            source,
        })?;
        tracing::info!(key, value, "sysctl set in the VM's network namespace");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_net_sysctls_are_taken() {
        let mut s: HashMap<String, String> = [
            ("net.ipv4.ping_group_range", "0 2147483647"),
            ("kernel.shmmax", "1"),
            ("net.ipv4.ip_unprivileged_port_start", "0"),
            ("net/ipv4/conf/all/forwarding", "1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let taken = take_net(&mut s);
        assert_eq!(taken.len(), 3);
        assert_eq!(taken[0].0, "net.ipv4.ip_unprivileged_port_start");
        assert_eq!(taken[2].0, "net/ipv4/conf/all/forwarding");
        assert_eq!(s.len(), 1);
        assert!(s.contains_key("kernel.shmmax"));
    }

    #[test]
    fn names_map_into_proc_sys_only() {
        assert_eq!(
            path_of("net.ipv4.ping_group_range").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/ping_group_range")
        );
        assert_eq!(
            path_of("net/ipv4/conf/eth0.100/forwarding").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/conf/eth0.100/forwarding")
        );
        for bad in ["net..x", "net/../../etc/passwd", "", "net.ipv4.a b", ".net"] {
            assert!(path_of(bad).is_err(), "{bad}");
        }
    }
}
