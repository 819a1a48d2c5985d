//! Snapshots: a paused VM saved to two files, and a VM started from them
//! in a new process, as Firecracker does.
//!
//! * The **memory file** ([`memory`]) is guest RAM, region after region,
//!   sparse where pages are zero. A restore maps it private
//!   (copy-on-write): pages load on first touch, and the file stays as it
//!   was, for further restores.
//! * The **state file** ([`format`]: magic, format version, capsid-vmm
//!   version, length, SHA-256) holds [`MachineState`] as JSON: the config
//!   the VM was built from, each vCPU ([`vcpu`]), the interrupt
//!   controllers, PIT and clock ([`vm`]), the legacy devices, and every
//!   virtio transport with its queues ([`devices`]).
//!
//! Taking one ([`take`]) needs the VM paused; the machine's thread asks
//! every parked vCPU for its state first (`VcpuGate::save_parked`).
//! Restoring ([`restore::load`], then `builder::restore`) checks both
//! files before any VM exists. docs/vmm.md ("Snapshots") is the user's
//! side of it.

pub mod devices;
pub mod format;
pub mod memory;
pub mod restore;
pub mod vcpu;
pub mod vm;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use crate::config::VmConfig;
use crate::control::SnapshotReply;
use crate::devices::legacy::{LegacyBus, LegacyError, LegacyState};
use crate::devices::MmioSlot;
use crate::vstate::vm::Vm;

/// Errors taking a snapshot; the VM goes on (paused) after any of them.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The vCPUs are running.
    #[error("the VM is not paused: send {{\"op\":\"pause\"}} first")]
    NotPaused,
    /// A virtio-fs device's other half is virtiofsd's, which cannot be
    /// saved.
    #[error("a VM with a virtio-fs device cannot be snapshotted: virtiofsd's state (open files, the rings it serves) cannot be saved")]
    VirtioFs,
    /// A vCPU thread has ended: the VM is ending.
    #[error("vCPU {0} has stopped")]
    VcpuEnded(u8),
    /// Not every vCPU gave its state in time.
    #[error("the vCPUs did not give their state in time")]
    VcpuTimeout,
    /// A vCPU's state could not be read.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuStateError),
    /// The VM's state could not be read.
    #[error(transparent)]
    Vm(#[from] vm::VmStateError),
    /// The virtio devices' states could not be read.
    #[error(transparent)]
    Devices(#[from] devices::DeviceStateError),
    /// The legacy devices' states could not be read.
    #[error(transparent)]
    Legacy(#[from] LegacyError),
    /// The memory file could not be written.
    #[error(transparent)]
    Memory(#[from] memory::MemoryFileError),
    /// The state and memory files are one path.
    #[error("the state and memory files must be two different paths")]
    SamePath,
    /// The state could not be encoded (a bug).
    #[error("cannot encode the VM state")]
    Encode(#[source] serde_json::Error),
    /// The state file could not be written.
    #[error("cannot write the state file {path}")]
    WriteState {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Result of taking a snapshot.
pub type Result<T> = std::result::Result<T, SnapshotError>;

/// Everything but guest RAM: the state file's payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// The config the VM was built from: a restore builds the same
    /// machine from it.
    pub config: VmConfig,
    /// The memory file's layout and size.
    pub memory: memory::MemoryLayout,
    /// The memory file as the snapshot request named it (the default of
    /// `--memory`).
    pub memory_file: PathBuf,
    /// Interrupt controllers, PIT, clock.
    pub vm: vm::VmState,
    /// Every vCPU, by index.
    pub vcpus: Vec<vcpu::VcpuState>,
    /// COM1 and the i8042.
    pub legacy: LegacyState,
    /// Every virtio-mmio device, in bus order.
    pub devices: Vec<devices::DeviceState>,
}

/// What [`take`] saves.
#[derive(Debug)]
pub struct Source<'a> {
    /// The config the VM was built from.
    pub config: &'a VmConfig,
    /// The KVM VM.
    pub vm: &'a Vm,
    /// Guest RAM.
    pub memory: &'a GuestMemoryMmap,
    /// The virtio devices.
    pub slots: &'a [MmioSlot],
    /// The legacy devices.
    pub legacy: &'a LegacyBus,
    /// Every vCPU's state, as the parked vCPUs gave it.
    pub vcpus: Vec<vcpu::VcpuState>,
}

/// Where a file is written before it is renamed into place: a reader of
/// the path never sees half a file, and a failed snapshot leaves no
/// file that looks whole.
fn partial(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Saves `source` to `state_path` and `memory_path`: the memory file
/// first (renamed into place), then the state file, so that a state file
/// is only ever next to a complete memory file. The vCPUs must be paused
/// (their states are in `source`); every device is locked while guest RAM
/// is copied, so the event loop cannot change it meanwhile.
pub fn take(source: Source<'_>, state_path: &Path, memory_path: &Path) -> Result<SnapshotReply> {
    let started = Instant::now();
    if source.config.fs.is_some() {
        return Err(SnapshotError::VirtioFs);
    }
    if state_path == memory_path {
        return Err(SnapshotError::SamePath);
    }
    let mut vcpus = source.vcpus;
    vcpus.sort_by_key(|v| v.index);
    let memory_partial = partial(memory_path);
    let (state, written) = {
        let locked = devices::lock_all(source.slots)?;
        let vm = vm::save(source.vm.fd())?;
        let devices = devices::save(source.slots, &locked);
        let legacy = source.legacy.state()?;
        let (layout, written) =
            memory::write(source.memory, &memory_partial).inspect_err(|_| {
                let _ = std::fs::remove_file(&memory_partial);
            })?;
        let state = MachineState {
            config: source.config.clone(),
            memory: layout,
            memory_file: memory_path.to_path_buf(),
            vm,
            vcpus,
            legacy,
            devices,
        };
        (state, written)
    };
    std::fs::rename(&memory_partial, memory_path).map_err(|source| {
        let _ = std::fs::remove_file(&memory_partial);
        memory::MemoryFileError::Write {
            path: memory_path.display().to_string(),
            source,
        }
    })?;
    let payload = serde_json::to_vec(&state).map_err(SnapshotError::Encode)?;
    let file = format::encode(&payload);
    write_atomically(state_path, &file)?;
    let reply = SnapshotReply {
        state_bytes: file.len() as u64,
        memory_bytes: state.memory.size,
        memory_written_bytes: written,
        took_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
    };
    tracing::info!(
        state = %state_path.display(),
        memory = %memory_path.display(),
        state_bytes = reply.state_bytes,
        memory_written_bytes = written,
        took_us = reply.took_us,
        "snapshot taken"
    );
    Ok(reply)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = partial(path);
    let result = File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    result.map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        SnapshotError::WriteState {
            path: path.display().to_string(),
            source,
        }
    })
}
