//! Pre-booted sandboxes: where they wait and how one is taken.
//!
//! `capsid-poold` keeps `[[pool.shapes]]` filled with *warm shims*: shim
//! processes that booted a VM of one shape (kernel up, agent connected, a
//! live virtio-fs share and a NIC on a tap in a network namespace of their
//! own, no container) and wait for one claim. Each listens on
//! `<state>/.pool/<shape key>/<name>.sock`. A shim's `start` that wants
//! that shape renames one such socket into `<state>/.pool/claimed/`
//! (rename is atomic: of two claimants one wins, the other tries the
//! next) and sends it a [`Claim`]; the warm shim then serves containerd's
//! Task API for that container and is never offered again. A sandbox is
//! used once: nothing of one tenant's container can be seen by another's.
//!
//! The shape key names everything that must match for a pooled VM to be
//! the one a cold boot would have made: vCPUs, memory, the kernel and
//! initramfs (path, size and modification time), the backend, and the
//! configuration file.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{BackendKind, Config};

/// Errors finding or taking a pooled sandbox.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The pool's claimed directory is not private.
    #[error(transparent)]
    Private(#[from] crate::private_dir::PrivateDirError),
    /// A pool directory cannot be read or made.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Result of pool operations.
pub type Result<T> = std::result::Result<T, PoolError>;

/// Environment variable naming the warm shim's sandbox (set by the daemon).
pub const NAME_ENV: &str = "CAPSID_POOL_NAME";
/// Environment variable with the warm shim's vCPUs.
pub const VCPUS_ENV: &str = "CAPSID_POOL_VCPUS";
/// Environment variable with the warm shim's memory, MiB.
pub const MEMORY_ENV: &str = "CAPSID_POOL_MEMORY_MIB";
/// The shim action that boots a warm sandbox and waits for its claim.
pub const WARM_ACTION: &str = "warm";
/// The daemon's status socket, in [`dir`].
pub const DAEMON_SOCKET: &str = "poold.sock";
/// The line a warm shim writes on stdout once it listens.
pub const READY_LINE: &str = "ready";

/// Environment variable with the warm shim's VM RAM, MiB.
pub const MAX_MEMORY_ENV: &str = "CAPSID_POOL_MAX_MEMORY_MIB";

/// A pooled VM's shape ([`crate::config::PoolShapeConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM a waiting sandbox has, MiB.
    pub memory_mib: u32,
    /// The VM's RAM, MiB (at least `memory_mib`; the balloon holds the
    /// difference while it waits).
    pub max_memory_mib: u32,
}

impl Shape {
    /// The shape `config` describes.
    pub fn of(config: &crate::config::PoolShapeConfig) -> Self {
        Self {
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            max_memory_mib: config.vm_memory_mib(),
        }
    }

    /// Whether a container whose VM would have `vcpus` and `memory_mib`
    /// can take a sandbox of this shape: the same vCPUs, and no more
    /// memory than the VM has (the balloon gives it its size).
    pub fn fits(&self, vcpus: u32, memory_mib: u32) -> bool {
        vcpus == self.vcpus && memory_mib <= self.max_memory_mib
    }

    /// The environment a warm shim of this shape is started with.
    pub fn env(&self) -> [(&'static str, String); 3] {
        [
            (VCPUS_ENV, self.vcpus.to_string()),
            (MEMORY_ENV, self.memory_mib.to_string()),
            (MAX_MEMORY_ENV, self.max_memory_mib.to_string()),
        ]
    }

    /// The shape of [`Shape::env`]; `MAX_MEMORY_ENV` may be absent.
    pub fn from_env() -> std::result::Result<Self, String> {
        let number = |name: &str| -> std::result::Result<Option<u32>, String> {
            match std::env::var(name) {
                Err(_) => Ok(None),
                Ok(text) => text
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("${name} = {text:?} is not a number")),
            }
        };
        let vcpus = number(VCPUS_ENV)?.ok_or_else(|| format!("${VCPUS_ENV} is not set"))?;
        let memory_mib = number(MEMORY_ENV)?.ok_or_else(|| format!("${MEMORY_ENV} is not set"))?;
        let max_memory_mib = number(MAX_MEMORY_ENV)?.unwrap_or(memory_mib);
        if max_memory_mib < memory_mib {
            return Err(format!(
                "${MAX_MEMORY_ENV} = {max_memory_mib} is below ${MEMORY_ENV} = {memory_mib}"
            ));
        }
        Ok(Self {
            vcpus,
            memory_mib,
            max_memory_mib,
        })
    }
}

/// The pool's directory.
pub fn dir(config: &Config) -> PathBuf {
    config.paths.state_dir.join(".pool")
}

/// Where claimed sockets go until their shim takes its claim.
pub fn claimed_dir(config: &Config) -> PathBuf {
    dir(config).join("claimed")
}

/// The directory of one shape's warm shims.
pub fn shape_dir(config: &Config, key: &str) -> PathBuf {
    dir(config).join(key)
}

/// A warm shim's socket in its shape's directory.
pub fn socket_path(shape_dir: &Path, name: &str) -> PathBuf {
    shape_dir.join(format!("{name}.sock"))
}

/// A warm shim's host record ([`crate::record::HostRecord`]) until claimed.
pub fn record_path(shape_dir: &Path, name: &str) -> PathBuf {
    shape_dir.join(format!("{name}.record"))
}

/// A warm shim's log until claimed (then containerd's).
pub fn log_path(shape_dir: &Path, name: &str) -> PathBuf {
    shape_dir.join(format!("{name}.log"))
}

/// The configuration file a process loads ([`Config::load`]): `explicit`,
/// else `$CAPSID_CONFIG`, else the default file if it exists; `None`:
/// built-in defaults. Part of the shape key.
pub fn config_file(explicit: Option<&Path>) -> Option<PathBuf> {
    let env = std::env::var_os(crate::config::CONFIG_ENV).map(PathBuf::from);
    explicit.map(Path::to_path_buf).or(env).or_else(|| {
        let default = Path::new(crate::config::DEFAULT_CONFIG_PATH);
        default.exists().then(|| default.to_path_buf())
    })
}

/// The key of `shape` under `config` with `backend` ([`crate`] docs):
/// 16 hex digits. `config_file` is the configuration file the shim runs
/// with (`None`: the default one).
pub fn shape_key(
    config: &Config,
    config_file: Option<&Path>,
    backend: Option<BackendKind>,
    shape: Shape,
) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"capsid-pool-v1\0");
    h.update(shape.vcpus.to_le_bytes());
    h.update(shape.memory_mib.to_le_bytes());
    h.update(shape.max_memory_mib.to_le_bytes());
    for file in [&config.paths.kernel, &config.paths.initramfs] {
        h.update(file.as_os_str().as_encoded_bytes());
        h.update(b"\0");
        if let Ok(m) = std::fs::metadata(file) {
            h.update(m.size().to_le_bytes());
            h.update(m.mtime().to_le_bytes());
            h.update(m.mtime_nsec().to_le_bytes());
        }
    }
    h.update(backend.map_or("auto", BackendKind::as_str).as_bytes());
    h.update(b"\0");
    if let Some(file) = config_file {
        h.update(file.as_os_str().as_encoded_bytes());
    }
    let digest = h.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// What a claimant tells the warm shim it took: the container's identity
/// and containerd's addresses, as `start` hands them to a shim it spawns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// containerd namespace.
    pub namespace: String,
    /// The task's id.
    pub id: String,
    /// The bundle directory.
    pub bundle: PathBuf,
    /// The Task API address to serve (`unix://…`).
    pub address: String,
    /// containerd's event service (`$TTRPC_ADDRESS`).
    pub ttrpc_address: String,
    /// containerd's gRPC address (`-address`).
    pub containerd_address: String,
    /// Log at debug level.
    pub debug: bool,
    /// The claimant's process, for a client without containerd (`capsid
    /// run`): the task and its VM go when it ends, however it ends, as
    /// containerd's `delete` would undo them. `None` for containerd's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_pid: Option<u32>,
}

/// The warm shim's answer to a [`Claim`]: `None` when it serves the task,
/// else why it cannot (the claimant boots cold).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimAnswer {
    /// Why the claim failed; `None`: it serves.
    pub error: Option<String>,
}

/// Takes one ready warm shim's socket of `key`: renames it into
/// [`claimed_dir`] and returns its new path. `None` when none is ready.
/// Sockets a claimant loses to another are skipped.
pub fn take(config: &Config, key: &str) -> Result<Option<PathBuf>> {
    let shape_dir = shape_dir(config, key);
    let entries = match std::fs::read_dir(&shape_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PoolError::Io {
                what: "read",
                path: shape_dir,
                source,
            })
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".sock") && !n.starts_with('.'))
        .collect();
    // Oldest first: names begin with the boot time.
    names.sort();
    if names.is_empty() {
        return Ok(None);
    }
    let claimed = claimed_dir(config);
    crate::private_dir::ensure_root(&claimed)?;
    for name in names {
        let to = claimed.join(&name);
        match std::fs::rename(shape_dir.join(&name), &to) {
            Ok(()) => return Ok(Some(to)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(PoolError::Io {
                    what: "claim",
                    path: shape_dir.join(&name),
                    source,
                })
            }
        }
    }
    Ok(None)
}

/// The names of `key`'s ready warm shims.
pub fn ready(config: &Config, key: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(shape_dir(config, key)) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".sock").map(str::to_owned))
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_in(dir: &Path) -> Config {
        let mut c = Config::default();
        c.paths.state_dir = dir.to_path_buf();
        c
    }

    #[test]
    fn keys_differ_by_everything_that_shapes_the_vm() {
        let dir = tempfile::tempdir().unwrap();
        let c = config_in(dir.path());
        let s = Shape {
            vcpus: 1,
            memory_mib: 256,
            max_memory_mib: 256,
        };
        let k = shape_key(&c, None, None, s);
        assert_eq!(k.len(), 16);
        assert_eq!(k, shape_key(&c, None, None, s));
        assert_ne!(k, shape_key(&c, None, None, Shape { vcpus: 2, ..s }));
        assert_ne!(
            k,
            shape_key(
                &c,
                None,
                None,
                Shape {
                    max_memory_mib: 512,
                    ..s
                }
            )
        );
        let big = Shape {
            max_memory_mib: 512,
            ..s
        };
        assert!(big.fits(1, 512) && big.fits(1, 128) && !big.fits(1, 513) && !big.fits(2, 256));
        assert_ne!(
            k,
            shape_key(
                &c,
                None,
                None,
                Shape {
                    memory_mib: 512,
                    ..s
                }
            )
        );
        assert_ne!(k, shape_key(&c, Some(Path::new("/etc/x.toml")), None, s));
        assert_ne!(k, shape_key(&c, None, Some(BackendKind::QemuTcg), s));
        let mut other = c.clone();
        other.paths.kernel = dir.path().join("vmlinux");
        assert_ne!(k, shape_key(&other, None, None, s));
        // The same path with other contents is another kernel.
        std::fs::write(&other.paths.kernel, b"one").unwrap();
        let before = shape_key(&other, None, None, s);
        std::fs::write(&other.paths.kernel, b"other").unwrap();
        assert_ne!(before, shape_key(&other, None, None, s));
    }

    #[test]
    fn a_socket_is_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let c = config_in(dir.path());
        crate::private_dir::ensure_root(dir.path()).unwrap();
        assert!(take(&c, "k").unwrap().is_none(), "no pool yet");
        let shape = shape_dir(&c, "k");
        std::fs::create_dir_all(&shape).unwrap();
        std::fs::write(socket_path(&shape, "b"), b"").unwrap();
        std::fs::write(socket_path(&shape, "a"), b"").unwrap();
        std::fs::write(record_path(&shape, "a"), b"").unwrap();
        assert_eq!(ready(&c, "k"), ["a", "b"]);
        let first = take(&c, "k").unwrap().unwrap();
        assert_eq!(first, claimed_dir(&c).join("a.sock"));
        assert!(first.exists());
        assert_eq!(ready(&c, "k"), ["b"]);
        assert!(take(&c, "k").unwrap().is_some());
        assert!(take(&c, "k").unwrap().is_none(), "each is taken once");
    }
}
