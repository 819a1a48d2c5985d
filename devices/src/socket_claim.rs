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

    /// The claimed path.
    pub fn path(&self) -> &Path {
        &self.path
    }
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
    fn unwritable_directory_is_named() {
        let e = SocketClaim::new(Path::new("/nonexistent/dir/s.sock")).unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/dir/s.sock.lock"),
            "{e}"
        );
    }
}
