//! `start`'s side of the pool ([`capsid_sandbox::pool`]): for a container
//! of its own VM, take a warm shim of the container's shape and hand it
//! the task, instead of spawning a shim that boots a VM. Whenever that
//! cannot be done, `start` goes on as without a pool, and the log says
//! why: the pool is disabled, its daemon is down, the shape is not pooled
//! or none of it is ready, or the warm shim did not take the claim.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use capsid_sandbox::config::Config;
use capsid_sandbox::pool::{self, Claim, ClaimAnswer, Shape};
use containerd_shim::Flags;
use oci_spec::runtime::Spec;

/// How long a warm shim may take to start serving the claimed task (it
/// binds a socket and connects to containerd's event service).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

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
    // The smallest shape that fits: the least RAM held for nothing.
    let mut shapes: Vec<Shape> = config
        .pool
        .shapes
        .iter()
        .filter(|s| s.size > 0)
        .map(Shape::of)
        .filter(|s| s.fits(vcpus, memory_mib))
        .collect();
    shapes.sort_by_key(|s| (s.max_memory_mib, s.memory_mib));
    if shapes.is_empty() {
        return Ok(Taken::No {
            why: format!("no [[pool.shapes]] entry fits {vcpus} vCPUs and {memory_mib} MiB"),
        });
    }
    let file = pool::config_file(config_path);
    let mut taken = None;
    for shape in &shapes {
        let key = pool::shape_key(&config, file.as_deref(), config.backend.kind, *shape);
        taken = pool::take(&config, &key).map_err(|e| crate::describe(&e))?;
        if taken.is_some() {
            break;
        }
    }
    let Some(socket) = taken else {
        return Ok(Taken::No {
            why: why_empty(&config, vcpus, memory_mib),
        });
    };
    let sandbox = socket
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let claim = Claim {
        namespace: flags.namespace.clone(),
        id: flags.id.clone(),
        bundle: bundle.to_path_buf(),
        address: address.to_string(),
        ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
        containerd_address: flags.address.clone(),
        debug: flags.debug,
    };
    let answer = send(&socket, &claim);
    // The warm shim removes it once connected; gone either way.
    let _ = std::fs::remove_file(&socket);
    match answer {
        Ok(ClaimAnswer { error: None }) => Ok(Taken::Yes { sandbox }),
        Ok(ClaimAnswer { error: Some(e) }) => Ok(Taken::No {
            why: format!("pooled sandbox {sandbox} refused the claim: {e}"),
        }),
        Err(e) => Ok(Taken::No {
            why: format!("pooled sandbox {sandbox} did not answer: {e}"),
        }),
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

/// Why no fitting sandbox was there to take.
fn why_empty(config: &Config, vcpus: u32, memory_mib: u32) -> String {
    let daemon = pool::dir(config).join(pool::DAEMON_SOCKET);
    if UnixStream::connect(&daemon).is_err() {
        return format!(
            "capsid-poold is not running (nothing answers at {})",
            daemon.display()
        );
    }
    format!("the pool has no sandbox for {vcpus} vCPUs and {memory_mib} MiB ready (being refilled)")
}

/// Sends `claim` to the warm shim at `socket` and reads its answer.
fn send(socket: &Path, claim: &Claim) -> std::io::Result<ClaimAnswer> {
    let mut conn = UnixStream::connect(socket)?;
    conn.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    conn.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    let mut text = serde_json::to_string(claim).map_err(std::io::Error::other)?;
    text.push('\n');
    conn.write_all(text.as_bytes())?;
    let mut line = String::new();
    BufReader::new((&conn).take(64 << 10)).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "it closed the connection",
        ));
    }
    serde_json::from_str(line.trim()).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_daemon_is_named() {
        let mut config = Config::default();
        let dir = tempfile::tempdir().unwrap();
        config.paths.state_dir = dir.path().to_path_buf();
        let why = why_empty(&config, 1, 256);
        assert!(why.contains("capsid-poold is not running"), "{why}");
    }

    #[test]
    fn a_shim_that_closes_is_no_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (c, _) = listener.accept().unwrap();
            drop(c);
        });
        let claim = Claim {
            namespace: "n".into(),
            id: "i".into(),
            bundle: "/b".into(),
            address: "unix:///x".into(),
            ttrpc_address: String::new(),
            containerd_address: String::new(),
            debug: false,
        };
        assert!(send(&path, &claim).is_err());
        t.join().unwrap();
    }
}
