//! The one VM backend interface, and its implementations: QEMU microvm
//! (`qemu`, KVM or TCG, devices over vhost-user) and capsid-vmm.
//!
//! A backend turns a [`VmSpec`] into a running [`Vm`]; the sandbox talks to
//! the guest only through the hybrid vsock socket the VM exposes, so
//! nothing above this module knows which backend runs.

pub mod capsid_vmm;
pub mod jail;
mod process;
pub mod qemu;
pub mod virtiofsd;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::BackendKind;

/// Errors starting or stopping a VM.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A file the VM needs is missing.
    #[error("{what} {path} does not exist")]
    Missing {
        /// What it is ("kernel", "initramfs", "disk image").
        what: &'static str,
        /// Where it was expected.
        path: PathBuf,
    },
    /// A binary the backend runs is missing.
    #[error("{0} not found (install capsid with `make install`)")]
    BinaryNotFound(String),
    /// The VM's run directory cannot be prepared.
    #[error("cannot prepare run directory {path}")]
    RunDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A process could not be started.
    #[error("cannot start {what}")]
    Spawn {
        /// Which process.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A process died while the VM was being set up.
    #[error("{what} exited during start-up: {detail}")]
    StartFailed {
        /// Which process.
        what: String,
        /// Its exit status and last words.
        detail: String,
    },
    /// Waiting for or signalling a process failed.
    #[error("cannot supervise {what}")]
    Supervise {
        /// Which process.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM's config document cannot be written as JSON.
    #[error("cannot encode the VM config (its paths must be UTF-8)")]
    Encode(#[source] serde_json::Error),
    /// The spec asks for something this backend cannot do.
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    /// The sandbox's jail cannot be prepared.
    #[error("jail: cannot {what} {}", path.display())]
    Jail {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Result of backend operations.
pub type Result<T> = std::result::Result<T, BackendError>;

/// A disk attached to the VM (virtio-blk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Backing file.
    pub path: PathBuf,
    /// The guest cannot write to it.
    pub readonly: bool,
    /// Serial the guest sees (VIRTIO_BLK_T_GET_ID), at most 20 bytes.
    pub serial: String,
}

/// A network interface attached to the VM (virtio-net on a tap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// An existing tap device.
    pub tap: String,
    /// The guest interface's MAC address.
    pub mac: String,
    /// Network namespace the tap lives in (a path under /var/run/netns or
    /// /proc/PID/ns/net), when not the host's.
    pub netns: Option<PathBuf>,
}

/// How the guest caches a virtio-fs share (virtiofsd's `--cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsCache {
    /// Data and metadata cached for a second, revalidated on open
    /// (close-to-open consistency with the host).
    #[default]
    Auto,
    /// Nothing cached: every access goes to the host.
    Never,
    /// Cached until the guest evicts it: fastest, blind to host changes.
    Always,
}

impl FsCache {
    /// virtiofsd's word for it.
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Never => "never",
            Self::Always => "always",
        }
    }
}

/// A host directory shared with the guest over virtio-fs (crate::volumes
/// prepares it; the backend runs virtiofsd on it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsSpec {
    /// The virtiofsd binary (a bare name is looked up like capsid's own).
    pub daemon: PathBuf,
    /// The directory exported.
    pub shared_dir: PathBuf,
    /// The tag the guest mounts it by (at most 36 bytes).
    pub tag: String,
    /// The guest's caching.
    pub cache: FsCache,
}

/// Everything a backend needs to start one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// Name for logs and process titles.
    pub name: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Guest kernel (vmlinux with PVH note, or bzImage).
    pub kernel: PathBuf,
    /// Initramfs.
    pub initramfs: PathBuf,
    /// Extra kernel command-line arguments (after the backend's own).
    pub kernel_args: Vec<String>,
    /// Disks, in order (the guest sees vda, vdb, ...).
    pub disks: Vec<DiskSpec>,
    /// Network interface, if any.
    pub net: Option<NetSpec>,
    /// The sandbox's virtio-fs share, if it has volumes.
    pub fs: Option<FsSpec>,
    /// Guest CID for vsock.
    pub guest_cid: u32,
    /// Directory for the VM's sockets and logs. The backend creates it and
    /// removes it when the VM is stopped.
    pub run_dir: PathBuf,
    /// The cgroup the VM's processes go in, in every hierarchy (the OCI
    /// `linux.cgroupsPath` of the sandbox, cgroupfs form: absolute from
    /// the hierarchy's root); `None`: `capsid/<sandbox>` under the
    /// caller's own cgroup.
    pub cgroup: Option<PathBuf>,
}

impl VmSpec {
    /// Checks what can be checked before anything starts.
    pub fn validate(&self) -> Result<()> {
        for (what, path) in [("kernel", &self.kernel), ("initramfs", &self.initramfs)] {
            if !path.is_file() {
                return Err(BackendError::Missing {
                    what,
                    path: path.clone(),
                });
            }
        }
        for disk in &self.disks {
            if !disk.path.is_file() {
                return Err(BackendError::Missing {
                    what: "disk image",
                    path: disk.path.clone(),
                });
            }
            if disk.serial.len() > 20 {
                return Err(BackendError::InvalidSpec(format!(
                    "disk serial {:?} is longer than 20 bytes",
                    disk.serial
                )));
            }
        }
        if let Some(fs) = &self.fs {
            if fs.tag.is_empty() || fs.tag.len() > 36 {
                return Err(BackendError::InvalidSpec(format!(
                    "virtio-fs tag {:?} must be 1 to 36 bytes",
                    fs.tag
                )));
            }
            if !fs.shared_dir.is_dir() {
                return Err(BackendError::Missing {
                    what: "shared directory",
                    path: fs.shared_dir.clone(),
                });
            }
        }
        if self.vcpus == 0 || self.vcpus > crate::config::MAX_VCPUS {
            return Err(BackendError::InvalidSpec(format!(
                "{} vCPUs (must be 1 to {})",
                self.vcpus,
                crate::config::MAX_VCPUS
            )));
        }
        if self.memory_mib < crate::config::MIN_MEMORY_MIB {
            return Err(BackendError::InvalidSpec(format!(
                "{} MiB of memory (at least {} needed)",
                self.memory_mib,
                crate::config::MIN_MEMORY_MIB
            )));
        }
        if self.guest_cid < 3 {
            return Err(BackendError::InvalidSpec(format!(
                "guest CID {} is reserved",
                self.guest_cid
            )));
        }
        Ok(())
    }

    /// The hybrid vsock Unix socket of this VM.
    pub fn vsock_path(&self) -> PathBuf {
        self.run_dir.join("vsock.sock")
    }

    /// The guest's serial console log.
    pub fn serial_log(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }
}

/// How a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset or powered off by itself.
    GuestShutdown,
    /// The VM process ended otherwise (exit code, or signal number as 128+N).
    Failed(i32),
    /// It was stopped from the host.
    Stopped,
}

/// A running VM.
pub trait Vm: Send + std::fmt::Debug {
    /// The hybrid vsock socket: connect and write `CONNECT <port>\n` to
    /// reach guest port; guest connections to host port P arrive at
    /// `<path>_<P>`.
    fn vsock_path(&self) -> &Path;
    /// The guest's serial console log.
    fn serial_log(&self) -> &Path;
    /// Host processes making up the VM (VMM first).
    fn pids(&self) -> Vec<u32>;
    /// Whether the VM has ended, without blocking.
    fn try_wait(&mut self) -> Result<Option<VmExit>>;
    /// Waits until the VM ends or `timeout` passes.
    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<VmExit>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(exit) = self.try_wait()? {
                return Ok(Some(exit));
            }
            if std::time::Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    /// Stops the VM: asks the VMM to quit, kills it after `grace`, reaps
    /// every process and removes the run directory.
    fn stop(&mut self, grace: Duration) -> Result<VmExit>;
    /// The VM's balloon (set its size, read the guest's memory statistics),
    /// if it has one.
    fn balloon(&self) -> Option<crate::balloon::BalloonHandle> {
        None
    }
    /// Once the VM has ended: what its failed processes last wrote and the
    /// console's last lines, kept from before the run directory went (for
    /// error messages).
    fn last_words(&self) -> String {
        String::new()
    }
}

/// Something that starts VMs.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;
    /// Starts a VM. On error nothing is left running and the run directory
    /// is gone.
    fn start(&self, spec: &VmSpec) -> Result<Box<dyn Vm>>;
}
