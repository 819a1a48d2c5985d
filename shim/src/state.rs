//! What `delete` needs to clean up after a shim that died: a small JSON file
//! in the bundle, written before anything is made on the host and updated
//! as the sandbox grows (VM processes, mounts, per-container disks).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The state file's name in the bundle.
pub const STATE_FILE: &str = "capsid-state.json";

/// Errors reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file cannot be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file exists but cannot be read or parsed.
    #[error("cannot read {}: {reason}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Result of state file operations.
pub type Result<T> = std::result::Result<T, StateError>;

pub use capsid_sandbox::backend::ProcessRef;

/// Everything one container's sandbox made on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimState {
    /// The sandbox's name (its run directory's name).
    pub sandbox: String,
    /// The VM's run directory (sockets, logs); processes whose command line
    /// names it belong to this sandbox.
    pub run_dir: PathBuf,
    /// The VM's host processes, once started.
    pub vm_processes: Vec<ProcessRef>,
    /// A mount point the shim mounts while it builds the rootfs disk.
    pub mount_point: Option<PathBuf>,
    /// Files made for this container only (removed on delete).
    pub scratch_files: Vec<PathBuf>,
    /// The tap made in the container's network namespace (recorded before
    /// it is made).
    #[serde(default)]
    pub network: Option<crate::network::NetworkRecord>,
}

/// The state file of `bundle`.
pub fn path(bundle: &Path) -> PathBuf {
    bundle.join(STATE_FILE)
}

impl ShimState {
    /// Writes the state atomically (temp file, fsync, rename).
    pub fn save(&self, bundle: &Path) -> Result<()> {
        let target = path(bundle);
        let temp = bundle.join(format!(".{STATE_FILE}.tmp"));
        let write_err = |source| StateError::Write {
            path: target.clone(),
            source,
        };
        let text = serde_json::to_vec_pretty(self).map_err(|e| write_err(io::Error::other(e)))?;
        let mut file = fs::File::create(&temp).map_err(write_err)?;
        file.write_all(&text).map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
        fs::rename(&temp, &target).map_err(write_err)
    }

    /// Reads the state of `bundle`; `None` if there is none.
    pub fn load(bundle: &Path) -> Result<Option<Self>> {
        let file = path(bundle);
        let text = match fs::read(&file) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StateError::Read {
                    path: file,
                    reason: e.to_string(),
                })
            }
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| StateError::Read {
                path: file,
                reason: e.to_string(),
            })
    }

    /// Removes the state file of `bundle` (absent is fine).
    pub fn remove(bundle: &Path) -> Result<()> {
        let file = path(bundle);
        match fs::remove_file(&file) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Write { path: file, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_goes_away() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ShimState::load(dir.path()).unwrap(), None);
        let state = ShimState {
            sandbox: "s1".into(),
            run_dir: "/run/capsid/s1".into(),
            vm_processes: vec![ProcessRef {
                pid: 7,
                start_time: 9,
            }],
            mount_point: Some("/b/m".into()),
            scratch_files: vec!["/c/d.erofs".into()],
            network: Some(crate::network::NetworkRecord {
                netns: "/var/run/netns/x".into(),
                tap: "tap0_0123456789".into(),
            }),
        };
        state.save(dir.path()).unwrap();
        assert_eq!(ShimState::load(dir.path()).unwrap(), Some(state));
        ShimState::remove(dir.path()).unwrap();
        ShimState::remove(dir.path()).unwrap();
        assert_eq!(ShimState::load(dir.path()).unwrap(), None);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
