//! Claiming a Unix socket path for a listener, safely against a second
//! process given the same path.
//!
//! Probing a path by connecting to it would be taken by the first process
//! as a client (a vhost-user backend would take it for its frontend and
//! exit). Instead every listener holds an exclusive `flock` on
//! `<path>.lock` for its lifetime: a second claim fails at once, a stale
//! socket left by a dead process is replaced, and both files go away when
//! the claim is dropped.

use std::fs::{File, OpenOptions};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Errors claiming a socket path.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another process holds the path.
    #[error("socket {0} is in use by another process")]
    InUse(PathBuf),
    /// The lock file cannot be created.
    #[error("cannot create lock file {path}")]
    LockFile {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The listening socket cannot be made or put in place.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A stale socket cannot be removed.
    #[error("cannot remove stale socket {path}")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A claimed socket path; dropping it removes the socket and its lock file.
#[derive(Debug)]
pub struct SocketClaim {
    path: PathBuf,
    lock_path: PathBuf,
    _lock: Flock<File>,
}

impl SocketClaim {
    /// Claims `path`: takes its lock and removes a stale socket there.
    pub fn new(path: &Path) -> Result<Self, ClaimError> {
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| ClaimError::LockFile {
                path: lock_path.clone(),
                source,
            })?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| ClaimError::InUse(path.to_path_buf()))?;
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                let _ = std::fs::remove_file(&lock_path);
                return Err(ClaimError::RemoveStale {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            lock_path,
            _lock: lock,
        })
    }

    /// Listens on the claimed path. The socket is bound and listening under
    /// a temporary name first and then renamed into place, so a peer that
    /// waits for the path to appear never finds a socket that refuses it
    /// (between `bind` and `listen` a connect is refused).
    pub fn listen(&self) -> Result<UnixListener, ClaimError> {
        let listen_error = |source| ClaimError::Listen {
            path: self.path.clone(),
            source,
        };
        // Named after the final name (each is claimed by one process; a
        // pid would not do: every jailed device is pid 1 of its own pid
        // namespace) and short, so the 108-byte limit on socket paths does
        // not fail the temporary where the final name fits.
        let name = self.path.file_name().unwrap_or_default();
        let staging = self
            .path
            .with_file_name(format!(".{}", radix36(fnv1a(name.as_encoded_bytes()))));
        let _ = std::fs::remove_file(&staging);
        let listener = UnixListener::bind(&staging).map_err(listen_error)?;
        if let Err(e) = std::fs::rename(&staging, &self.path) {
            let _ = std::fs::remove_file(&staging);
            return Err(listen_error(e));
        }
        Ok(listener)
    }

    /// The claimed path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The 32-bit FNV-1a hash of `bytes`.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// `n` in base 36, for short file names.
fn radix36(mut n: u32) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(digits[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

impl Drop for SocketClaim {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_is_refused_and_files_go_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let first = SocketClaim::new(&path).unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let e = SocketClaim::new(&path).unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        // The first listener is untouched by the refused claim.
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        drop(first);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let claim = SocketClaim::new(&path).unwrap();
        assert!(!path.exists());
        assert!(std::os::unix::net::UnixListener::bind(claim.path()).is_ok());
    }

    #[test]
    fn the_socket_appears_only_once_it_listens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let claim = SocketClaim::new(&path).unwrap();
        let listener = claim.listen().unwrap();
        // Queued in the backlog, not refused.
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.iter().all(|n| n.starts_with("s.sock")), "{names:?}");
        drop(claim);
        drop(listener);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(radix36(0), "0");
        assert_eq!(radix36(36 * 36 + 35), "10z");
        assert_ne!(fnv1a(b"vhost-blk0.sock"), fnv1a(b"vhost-blk1.sock"));
    }

    #[test]
    fn unwritable_directory_is_named() {
        let e = SocketClaim::new(Path::new("/nonexistent/dir/s.sock")).unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/dir/s.sock.lock"),
            "{e}"
        );
    }
}
