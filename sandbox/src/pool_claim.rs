//! A claimant's side of the pool ([`crate::pool`]): the smallest ready
//! warm shim that fits a container's VM is taken and handed the
//! container. Shared by the shim's `start` and by `capsid run`; each logs
//! the outcome, and boots cold with the reason when nothing was taken.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::config::Config;
use crate::pool::{self, Claim, ClaimAnswer, Shape};

/// How long a warm shim may take to start serving the claimed task (it
/// binds a socket and, for containerd, connects to its event service).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What came of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// Pooled sandbox `sandbox` serves the container now.
    Yes {
        /// The warm shim's name.
        sandbox: String,
    },
    /// Nothing was taken: boot cold, for this reason.
    No {
        /// Why, for the log.
        why: String,
    },
}

/// Hands `claim` to the smallest ready warm shim whose shape fits
/// `vcpus` and `memory_mib` (`config_file`: the file `config` was read
/// from, part of the shape key). The pool must be enabled.
pub fn claim(
    config: &Config,
    config_file: Option<&Path>,
    vcpus: u32,
    memory_mib: u32,
    claim: &Claim,
) -> Result<Taken, pool::PoolError> {
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
    let mut taken = None;
    for shape in &shapes {
        let key = pool::shape_key(config, config_file, config.backend.kind, *shape);
        taken = pool::take(config, &key)?;
        if taken.is_some() {
            break;
        }
    }
    let Some(socket) = taken else {
        return Ok(Taken::No {
            why: why_empty(config, vcpus, memory_mib),
        });
    };
    let sandbox = socket
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let answer = send(&socket, claim);
    // The warm shim removes it once connected; gone either way.
    let _ = std::fs::remove_file(&socket);
    Ok(match answer {
        Ok(ClaimAnswer { error: None }) => Taken::Yes { sandbox },
        Ok(ClaimAnswer { error: Some(e) }) => Taken::No {
            why: format!("pooled sandbox {sandbox} refused the claim: {e}"),
        },
        Err(e) => Taken::No {
            why: format!("pooled sandbox {sandbox} did not answer: {e}"),
        },
    })
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

    fn a_claim() -> Claim {
        Claim {
            namespace: "n".into(),
            id: "i".into(),
            bundle: "/b".into(),
            address: "unix:///x".into(),
            ttrpc_address: String::new(),
            containerd_address: String::new(),
            debug: false,
            owner_pid: None,
        }
    }

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
        let claim = a_claim();
        assert!(send(&path, &claim).is_err());
        t.join().unwrap();
    }

    #[test]
    fn an_unpooled_shape_is_named() {
        let config = Config::default();
        let claim = a_claim();
        let taken = super::claim(&config, None, 2, 512, &claim).unwrap();
        assert_eq!(
            taken,
            Taken::No {
                why: "no [[pool.shapes]] entry fits 2 vCPUs and 512 MiB".into()
            }
        );
    }
}
