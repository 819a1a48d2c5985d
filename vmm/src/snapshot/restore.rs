//! Loading a snapshot to restore: everything that can be checked without
//! a VM is checked here, before `builder::restore` creates one: the state
//! file's container (magic, format, length, checksum, capsid-vmm
//! version), that its content describes one consistent machine, that a
//! config given with `--config` describes the same machine, and that the
//! memory file is there with the size of the snapshot's guest RAM. Each
//! refusal is one error naming the file and what is wrong with it.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::format::{self, FormatError};
use super::memory::{MemoryLayout, RegionLayout};
use super::MachineState;
use crate::config::{self, BootConfig, ConfigError, InvalidConfig, VmConfig};
use crate::vstate::memory::ram_ranges;

/// Why a snapshot is not restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The state file cannot be read.
    #[error("cannot read the snapshot state file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not one this capsid-vmm restores.
    #[error("cannot restore the snapshot {path}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: FormatError,
    },
    /// The payload does not parse (its checksum was right: a bug).
    #[error("cannot restore the snapshot {path}: its state does not parse")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The snapshot's config is not valid.
    #[error("cannot restore the snapshot {path}: the config it holds is invalid")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: InvalidConfig,
    },
    /// The snapshot's parts do not agree with each other.
    #[error("cannot restore the snapshot {path}: {reason}")]
    Inconsistent {
        /// The file.
        path: PathBuf,
        /// What disagrees.
        reason: String,
    },
    /// The config given with the snapshot cannot be read.
    #[error("cannot restore with the config {path}")]
    ReadConfig {
        /// The config file.
        path: PathBuf,
        /// Why.
        #[source]
        source: ConfigError,
    },
    /// The config given with the snapshot describes another machine.
    #[error("the config {path} does not describe the snapshot's VM: {field} differs (only host-side paths may: serial, control_socket, drives[].path, net[].tap, vsock.uds_path, boot)")]
    ConfigMismatch {
        /// The config file.
        path: PathBuf,
        /// The first field that differs.
        field: String,
    },
    /// The memory file cannot be opened.
    #[error("cannot open the snapshot's memory file {path}")]
    OpenMemory {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The memory file is not the size of the snapshot's guest RAM.
    #[error(
        "the memory file {path} is {found} bytes; the snapshot's guest RAM is {expected} bytes"
    )]
    MemorySize {
        /// The file.
        path: PathBuf,
        /// Its size.
        found: u64,
        /// The snapshot's.
        expected: u64,
    },
}

/// Result of loading a snapshot.
pub type Result<T> = std::result::Result<T, RestoreError>;

/// A snapshot checked and ready to build.
#[derive(Debug)]
pub struct Loaded {
    /// The config to build with: the snapshot's, or the one given (which
    /// describes the same machine).
    pub config: VmConfig,
    /// The saved state.
    pub state: MachineState,
    /// The memory file, open read-only.
    pub memory: File,
    /// Its path.
    pub memory_path: PathBuf,
}

/// Loads and checks the snapshot `state_path`, with its memory file at
/// `memory_path` (default: where the snapshot was written) and, if
/// given, a config `config_path` whose host-side paths replace the
/// snapshot's.
pub fn load(
    state_path: &Path,
    memory_path: Option<&Path>,
    config_path: Option<&Path>,
) -> Result<Loaded> {
    let bytes = std::fs::read(state_path).map_err(|source| RestoreError::Read {
        path: state_path.to_path_buf(),
        source,
    })?;
    let payload = format::decode(&bytes).map_err(|source| RestoreError::Format {
        path: state_path.to_path_buf(),
        source,
    })?;
    let state: MachineState =
        serde_json::from_slice(payload).map_err(|source| RestoreError::Parse {
            path: state_path.to_path_buf(),
            source,
        })?;
    check_consistent(&state).map_err(|e| match e {
        Consistency::Config(source) => RestoreError::Config {
            path: state_path.to_path_buf(),
            source,
        },
        Consistency::Reason(reason) => RestoreError::Inconsistent {
            path: state_path.to_path_buf(),
            reason,
        },
    })?;
    let config = match config_path {
        None => state.config.clone(),
        Some(path) => {
            let given = config::from_file(path).map_err(|source| RestoreError::ReadConfig {
                path: path.to_path_buf(),
                source,
            })?;
            if let Some(field) = first_difference(&guest_view(&state.config), &guest_view(&given)) {
                return Err(RestoreError::ConfigMismatch {
                    path: path.to_path_buf(),
                    field,
                });
            }
            given
        }
    };
    let memory_path = memory_path.map_or_else(|| state.memory_file.clone(), Path::to_path_buf);
    let memory = File::open(&memory_path).map_err(|source| RestoreError::OpenMemory {
        path: memory_path.clone(),
        source,
    })?;
    let found = memory
        .metadata()
        .map_err(|source| RestoreError::OpenMemory {
            path: memory_path.clone(),
            source,
        })?
        .len();
    if found != state.memory.size {
        return Err(RestoreError::MemorySize {
            path: memory_path,
            found,
            expected: state.memory.size,
        });
    }
    Ok(Loaded {
        config,
        state,
        memory,
        memory_path,
    })
}

enum Consistency {
    Config(InvalidConfig),
    Reason(String),
}

/// The layout capsid-vmm gives guest RAM of `size` bytes in a memory file.
pub fn expected_layout(size: u64) -> MemoryLayout {
    let mut offset = 0;
    let regions = ram_ranges(usize::try_from(size).unwrap_or(usize::MAX))
        .into_iter()
        .map(|(addr, len)| {
            let region = RegionLayout {
                guest_addr: addr.0,
                size: len as u64,
                file_offset: offset,
            };
            offset += len as u64;
            region
        })
        .collect();
    MemoryLayout {
        size: offset,
        regions,
    }
}

fn check_consistent(state: &MachineState) -> std::result::Result<(), Consistency> {
    let config = &state.config;
    config.validate().map_err(Consistency::Config)?;
    if config.fs.is_some() {
        return Err(Consistency::Reason(
            "it has a virtio-fs device, which snapshots do not support".into(),
        ));
    }
    if state.memory != expected_layout(config.memory_bytes()) {
        return Err(Consistency::Reason(format!(
            "its memory layout is not that of {} MiB of guest RAM",
            config.memory_mib
        )));
    }
    let indices: Vec<u8> = state.vcpus.iter().map(|v| v.index).collect();
    if indices != (0..config.vcpus).collect::<Vec<u8>>() {
        return Err(Consistency::Reason(format!(
            "it has vCPUs {indices:?} for a VM of {} vCPUs",
            config.vcpus
        )));
    }
    if state.devices.len() != config.virtio_device_count() {
        return Err(Consistency::Reason(format!(
            "it has {} virtio devices, its config {}",
            state.devices.len(),
            config.virtio_device_count()
        )));
    }
    Ok(())
}

/// `config` without what may differ between the VM that was saved and
/// the one restored: where its files, sockets and taps are on the host,
/// and how it booted (a restored VM does not boot).
fn guest_view(config: &VmConfig) -> Value {
    let mut c = config.clone();
    c.serial = None;
    c.control_socket = None;
    c.boot = BootConfig::RealMode {
        image: PathBuf::new(),
        load_addr: 0,
    };
    for d in &mut c.drives {
        d.path = PathBuf::new();
    }
    for n in &mut c.net {
        n.tap = String::new();
    }
    if let Some(v) = &mut c.vsock {
        v.uds_path = PathBuf::new();
    }
    // A config is plain data: it always serializes.
    serde_json::to_value(&c).unwrap_or(Value::Null)
}

/// The path of the first value that differs between `a` and `b`
/// (`memory_mib`, `drives[0].read_only`), if one does.
fn first_difference(a: &Value, b: &Value) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| {
                let (va, vb) = (x.get(k), y.get(k));
                if va == vb {
                    return None;
                }
                match (va, vb) {
                    (Some(va), Some(vb)) => Some(match first_difference(va, vb) {
                        Some(sub) if sub.starts_with('[') => format!("{k}{sub}"),
                        Some(sub) => format!("{k}.{sub}"),
                        None => k.clone(),
                    }),
                    _ => Some(k.clone()),
                }
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            x.iter().zip(y).enumerate().find_map(|(i, (va, vb))| {
                (va != vb).then(|| match first_difference(va, vb) {
                    Some(sub) if sub.starts_with('[') => format!("[{i}]{sub}"),
                    Some(sub) => format!("[{i}].{sub}"),
                    None => format!("[{i}]"),
                })
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> VmConfig {
        config::from_json(json).unwrap()
    }

    const BASE: &str = r#"{"vcpus":1,"memory_mib":16,
        "boot":{"linux":{"kernel":"/a/guest.elf"}},
        "serial":"/a/serial.log","control_socket":"/a/api.sock",
        "drives":[{"path":"/a/disk.img","read_only":true}],
        "vsock":{"guest_cid":3,"uds_path":"/a/v.sock"},"rng":true}"#;

    #[test]
    fn host_paths_may_differ_the_machine_may_not() {
        let a = guest_view(&config(BASE));
        let moved = BASE.replace("/a/", "/b/");
        assert_eq!(first_difference(&a, &guest_view(&config(&moved))), None);
        let cases = [
            (
                BASE.replace("\"memory_mib\":16", "\"memory_mib\":32"),
                "memory_mib",
            ),
            (
                BASE.replace("\"read_only\":true", "\"read_only\":false"),
                "drives[0].read_only",
            ),
            (BASE.replace("\"rng\":true", "\"rng\":false"), "rng"),
            (
                BASE.replace("\"guest_cid\":3", "\"guest_cid\":4"),
                "vsock.guest_cid",
            ),
            (
                BASE.replace(",\"rng\":true", ",\"rng\":true,\"balloon\":{}"),
                "balloon",
            ),
            (
                BASE.replace(
                    "{\"path\":\"/a/disk.img\",\"read_only\":true}",
                    "{\"path\":\"/a/disk.img\",\"read_only\":true},{\"path\":\"/a/2.img\"}",
                ),
                "drives",
            ),
        ];
        for (json, field) in cases {
            assert_eq!(
                first_difference(&a, &guest_view(&config(&json))).as_deref(),
                Some(field),
                "{json}"
            );
        }
    }

    #[test]
    fn the_layout_follows_ram_ranges() {
        let l = expected_layout(16 << 20);
        assert_eq!(l.size, 16 << 20);
        assert_eq!(l.regions.len(), 1);
        let l = expected_layout((3 << 30) + (1 << 20));
        assert_eq!(l.regions.len(), 2);
        assert_eq!(l.regions[1].guest_addr, 1 << 32);
        assert_eq!(l.regions[1].file_offset, 3 << 30);
    }
}
