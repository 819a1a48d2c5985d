//! `start`'s side of the pool ([`capsid_sandbox::pool`]): for a container
//! of its own VM, take a warm shim of the container's shape and hand it
//! the task, instead of spawning a shim that boots a VM. Whenever that
//! cannot be done, `start` goes on as without a pool, and the log says
//! why: the pool is disabled, its daemon is down, the shape is not pooled
//! or none of it is ready, or the warm shim did not take the claim.

use std::path::Path;

use capsid_sandbox::config::Config;
use capsid_sandbox::pool::{self, Claim};
use capsid_sandbox::pool_claim;
use containerd_shim::Flags;
use oci_spec::runtime::Spec;

/// Tries to hand task `flags.id` (bundle `bundle`) to a warm shim, which
/// then serves `address`. True when one took it.
pub fn claim(flags: &Flags, bundle: &Path, config_path: Option<&Path>, address: &str) -> bool {
    match try_claim(flags, bundle, config_path, address) {
        Ok(Taken::Yes { sandbox }) => {
            tracing::info!(id = %flags.id, %sandbox, "the task takes a pooled sandbox");
            true
        }
        Ok(Taken::No { why }) => {
            tracing::info!(id = %flags.id, reason = %why, "no pooled sandbox: booting cold");
            false
        }
        Ok(Taken::Disabled) => false,
        Err(why) => {
            tracing::warn!(id = %flags.id, reason = %why, "the pool failed: booting cold");
            false
        }
    }
}

enum Taken {
    Yes { sandbox: String },
    No { why: String },
    Disabled,
}

fn try_claim(
    flags: &Flags,
    bundle: &Path,
    config_path: Option<&Path>,
    address: &str,
) -> Result<Taken, String> {
    let config = Config::load(config_path).map_err(|e| crate::describe(&e))?;
    if !config.pool.enabled {
        return Ok(Taken::Disabled);
    }
    let (vcpus, memory_mib) = match size_of(bundle, &config) {
        Ok(size) => size,
        // The cold path reports a bad spec as Create's error.
        Err(why) => return Ok(Taken::No { why }),
    };
    let claim = Claim {
        namespace: flags.namespace.clone(),
        id: flags.id.clone(),
        bundle: bundle.to_path_buf(),
        address: address.to_string(),
        ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
        containerd_address: flags.address.clone(),
        debug: flags.debug,
        owner_pid: None,
    };
    let file = pool::config_file(config_path);
    match pool_claim::claim(&config, file.as_deref(), vcpus, memory_mib, &claim) {
        Ok(pool_claim::Taken::Yes { sandbox }) => Ok(Taken::Yes { sandbox }),
        Ok(pool_claim::Taken::No { why }) => Ok(Taken::No { why }),
        Err(e) => Err(crate::describe(&e)),
    }
}

/// The vCPUs and memory a cold boot would give the bundle's container.
fn size_of(bundle: &Path, config: &Config) -> Result<(u32, u32), String> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let spec: Spec =
        serde_json::from_slice(&text).map_err(|e| format!("invalid {}: {e}", path.display()))?;
    let size = crate::sizing::vm_size(&spec, &config.vm).map_err(|e| crate::describe(&e))?;
    Ok((size.vcpus, size.memory_mib))
}
