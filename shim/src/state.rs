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

/// A host process, named so that a recycled pid is never mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    /// Process id.
    pub pid: u32,
    /// Its start time in clock ticks after boot (`/proc/PID/stat` field 22).
    pub start_time: u64,
}

impl ProcessRef {
    /// The running process `pid`, if it exists.
    pub fn of(pid: u32) -> Option<Self> {
        start_time(pid).map(|start_time| Self { pid, start_time })
    }

    /// Whether this very process still exists (and is not a zombie).
    pub fn is_alive(&self) -> bool {
        match stat_fields(self.pid) {
            Some((state, start)) => start == self.start_time && state != 'Z' && state != 'X',
            None => false,
        }
    }
}

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

/// State and start time of `pid` from `/proc/PID/stat`.
fn stat_fields(pid: u32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// The start time of `pid`, in clock ticks after boot.
pub fn start_time(pid: u32) -> Option<u64> {
    stat_fields(pid).map(|(_, start)| start)
}

/// State (field 3) and start time (field 22) of a `/proc/PID/stat` line.
/// The command name (field 2) may hold spaces and parentheses: fields are
/// counted after its last `)`.
fn parse_stat(text: &str) -> Option<(char, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 3 was `state`; field 22 is 19 further on.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names_parse() {
        let line = "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 987654 1000 200";
        assert_eq!(parse_stat(line), Some(('S', 987654)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_recycled_pid_is_not() {
        let me = ProcessRef::of(std::process::id()).unwrap();
        assert!(me.is_alive());
        let other = ProcessRef {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other.is_alive());
    }

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
