//! Memory ballooning, the same for both backends: set a sandbox's balloon
//! size and read its guest's memory statistics, through QEMU's QMP socket
//! (`qmp`) or capsid-vmm's control socket (`vmm_control`). Around it: the
//! registry of running sandboxes (`registry`), the host's memory view
//! (`host`), the reclaim policy (`policy`, pure decisions) and the
//! coordinator that applies it (`coordinator`). docs/memory.md tells the
//! whole story.
//!
//! The one meaning of a "target" here is the balloon's size: MiB taken
//! from the guest. Guest-usable memory is `assigned - balloon`.

pub mod coordinator;
pub mod host;
pub mod policy;
pub mod qmp;
pub mod registry;
pub mod stats;
pub mod vmm_control;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use stats::GuestMemStats;

/// One MiB in bytes.
pub const MIB: u64 = 1 << 20;

/// Errors of balloon operations.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// The requested balloon is larger than the VM's memory.
    #[error("balloon target {target_mib} MiB exceeds the sandbox's {assigned_mib} MiB of memory")]
    TargetTooLarge {
        /// Requested balloon size.
        target_mib: u64,
        /// Memory assigned to the VM.
        assigned_mib: u32,
    },
    /// The target would give the guest RAM it has not added yet.
    #[error(
        "balloon target {target_mib} MiB is below the {absent_mib} MiB of the VM's RAM the guest \
         has not added: add memory to the guest first"
    )]
    BelowAbsent {
        /// Requested balloon size.
        target_mib: u64,
        /// The VM's RAM the guest has not added.
        absent_mib: u32,
    },
    /// QEMU's QMP socket cannot be reached or did not answer.
    #[error("cannot talk to the VMM at {socket}")]
    Io {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// QEMU answered with an error or something unexpected.
    #[error("the VMM at {socket} refused {what}: {message}")]
    Refused {
        /// The socket.
        socket: PathBuf,
        /// Which operation.
        what: &'static str,
        /// What it said.
        message: String,
    },
    /// capsid-vmm's control socket failed or refused.
    #[error(transparent)]
    Control(#[from] crate::vmm_control::ControlError),
    /// The registry of sandboxes cannot be read or written.
    #[error("balloon registry {path}")]
    Registry {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Starting the sandbox would assign more memory than the host may lend.
    #[error(
        "starting {id} ({new_mib} MiB) would assign {total_mib} MiB in all, over the limit of \
         {limit_mib} MiB (memory.overcommit_ratio {ratio} x {host_mib} MiB of host memory)"
    )]
    Overcommitted {
        /// The sandbox being started.
        id: String,
        /// Its memory.
        new_mib: u64,
        /// The sum with every running sandbox.
        total_mib: u64,
        /// The limit.
        limit_mib: u64,
        /// The configured ratio.
        ratio: f64,
        /// The host memory the ratio applies to.
        host_mib: u64,
    },
    /// Growing a pod's sandbox would assign more memory than the host may
    /// lend.
    #[error(
        "growing {id} from {from_mib} to {to_mib} MiB would assign {total_mib} MiB in all, over \
         the limit of {limit_mib} MiB (memory.overcommit_ratio {ratio} x {host_mib} MiB of host \
         memory)"
    )]
    GrowthOvercommitted {
        /// The sandbox growing.
        id: String,
        /// Its memory now.
        from_mib: u64,
        /// Its memory asked for.
        to_mib: u64,
        /// The sum with every other running sandbox.
        total_mib: u64,
        /// The limit.
        limit_mib: u64,
        /// The configured ratio.
        ratio: f64,
        /// The host memory the ratio applies to.
        host_mib: u64,
    },
}

/// Result of balloon operations.
pub type Result<T> = std::result::Result<T, BalloonError>;

/// Which VMM serves a balloon, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum BalloonEndpoint {
    /// QEMU's `virtio-balloon-device`, through QMP.
    Qmp {
        /// The QMP Unix socket.
        socket: PathBuf,
    },
    /// capsid-vmm's balloon, through its control socket.
    CapsidVmm {
        /// The control Unix socket.
        socket: PathBuf,
    },
}

/// A VM's balloon: how to reach it and how much memory the VM has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonHandle {
    /// Where the balloon is driven.
    pub endpoint: BalloonEndpoint,
    /// Memory assigned to the VM, MiB.
    pub assigned_mib: u32,
    /// Of it, the RAM the guest kernel has not added (a VM booted with
    /// `mem=` below its RAM, crate::hotplug), MiB. It counts as held in
    /// the balloon: the guest cannot use it either. So a balloon size here
    /// is the device's plus this, and none may be below it.
    #[serde(default)]
    pub absent_mib: u32,
}

/// A balloon's state and the guest's view of its memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStatus {
    /// Memory assigned to the VM, MiB.
    pub assigned_mib: u32,
    /// Balloon size the host asked for, MiB (capsid-vmm only knows it;
    /// under QEMU it is what QEMU reports as asked, else `actual_mib`).
    pub target_mib: u32,
    /// Balloon size the guest has reached, MiB.
    pub actual_mib: u32,
    /// The guest's last statistics, sanitized.
    pub stats: GuestMemStats,
}

impl BalloonHandle {
    /// A handle for `endpoint` on a VM of `assigned_mib`.
    pub fn new(endpoint: BalloonEndpoint, assigned_mib: u32) -> Self {
        Self {
            endpoint,
            assigned_mib,
            absent_mib: 0,
        }
    }

    /// The same balloon on a VM whose guest has not added `absent_mib` of
    /// its RAM.
    pub fn with_absent(mut self, absent_mib: u32) -> Self {
        self.absent_mib = absent_mib.min(self.assigned_mib);
        self
    }

    /// Sets the balloon's size: `balloon_mib` MiB are taken from the guest
    /// (0 gives everything back). Larger than the VM's memory is an error.
    pub fn set_target(&self, balloon_mib: u64) -> Result<()> {
        if balloon_mib > u64::from(self.assigned_mib) {
            return Err(BalloonError::TargetTooLarge {
                target_mib: balloon_mib,
                assigned_mib: self.assigned_mib,
            });
        }
        let absent = u64::from(self.absent_mib);
        if balloon_mib < absent {
            return Err(BalloonError::BelowAbsent {
                target_mib: balloon_mib,
                absent_mib: self.absent_mib,
            });
        }
        // What the device holds: the absent RAM is not the guest's to give.
        let device_mib = balloon_mib - absent;
        match &self.endpoint {
            BalloonEndpoint::Qmp { socket } => {
                // QEMU takes the guest's size out of the VM's whole RAM.
                let guest_bytes = (u64::from(self.assigned_mib) - device_mib) * MIB;
                qmp::Qmp::connect(socket)?.set_guest_memory(guest_bytes)
            }
            BalloonEndpoint::CapsidVmm { socket } => {
                // Checked above: device_mib <= assigned_mib, a u32.
                let mib = u32::try_from(device_mib).unwrap_or(self.assigned_mib);
                vmm_control::set_target(socket, mib)
            }
        }
    }

    /// Reads the balloon's state and the guest's last statistics (and asks
    /// the guest for fresh ones).
    pub fn status(&self) -> Result<BalloonStatus> {
        let (target_mib, actual_mib, raw) = match &self.endpoint {
            BalloonEndpoint::Qmp { socket } => {
                let mut q = qmp::Qmp::connect(socket)?;
                let (actual_guest_bytes, raw) = q.balloon_state(qmp::STATS_POLL_INTERVAL_S)?;
                let balloon = balloon_from_guest_bytes(self.assigned_mib, actual_guest_bytes);
                (balloon, balloon, raw)
            }
            BalloonEndpoint::CapsidVmm { socket } => vmm_control::status(socket)?,
        };
        let absent = u64::from(self.absent_mib);
        let (target_mib, actual_mib) = (target_mib + absent, actual_mib + absent);
        let clamp = |mib: u64| u32::try_from(mib.min(u64::from(self.assigned_mib))).unwrap_or(0);
        Ok(BalloonStatus {
            assigned_mib: self.assigned_mib,
            target_mib: clamp(target_mib),
            actual_mib: clamp(actual_mib),
            stats: stats::sanitize(&raw, self.assigned_mib),
        })
    }
}

/// Registers a sandbox being started with the balloon policy (when
/// `memory.enabled`), refusing it when the memory assigned to all running
/// sandboxes would exceed `memory.overcommit_ratio` times the host's memory.
/// `memory_mib` is what the sandbox is assigned; a pod's VM holds
/// `reserve_mib` more in its balloon, which does not count.
pub fn register_sandbox(
    config: &crate::config::Config,
    id: &str,
    backend: crate::config::BackendKind,
    memory_mib: u32,
    reserve_mib: u32,
    policy: bool,
) -> Result<Option<registry::Registration>> {
    if !config.memory.enabled {
        return Ok(None);
    }
    let limit = overcommit_limit(config);
    let mut entry = registry::Entry::new(id, backend, memory_mib, policy);
    entry.reserve_mib = reserve_mib;
    registry::Registry::new(&config.paths.state_dir)
        .register(entry, limit)
        .map(Some)
}

/// The over-assignment limit of the configured host, when its size is known.
pub fn overcommit_limit(config: &crate::config::Config) -> Option<registry::Limit> {
    let memory = &config.memory;
    let host = coordinator::HostSource::from_config(memory);
    host.total_mib().map(|host_mib| registry::Limit {
        ratio: memory.overcommit_ratio,
        host_mib,
    })
}

/// The balloon size implied by QEMU's "guest has this many bytes" figure.
fn balloon_from_guest_bytes(assigned_mib: u32, guest_bytes: u64) -> u64 {
    u64::from(assigned_mib).saturating_sub(guest_bytes / MIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_above_assigned_is_refused_before_any_io() {
        let h = BalloonHandle::new(
            BalloonEndpoint::Qmp {
                socket: "/nonexistent/qmp.sock".into(),
            },
            256,
        );
        let e = h.set_target(257).unwrap_err();
        assert!(matches!(e, BalloonError::TargetTooLarge { .. }), "{e}");
        assert!(e.to_string().contains("257 MiB exceeds"), "{e}");
        let e = h.set_target(u64::MAX).unwrap_err();
        assert!(matches!(e, BalloonError::TargetTooLarge { .. }), "{e}");
        // In range: the error is about the socket, not the value.
        let e = h.set_target(256).unwrap_err();
        assert!(matches!(e, BalloonError::Io { .. }), "{e}");
    }

    #[test]
    fn ram_the_guest_has_not_added_counts_as_balloon_and_cannot_be_given() {
        let h = BalloonHandle::new(
            BalloonEndpoint::Qmp {
                socket: "/nonexistent/qmp.sock".into(),
            },
            1024,
        )
        .with_absent(768);
        let e = h.set_target(767).unwrap_err();
        assert!(
            matches!(
                e,
                BalloonError::BelowAbsent {
                    absent_mib: 768,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("add memory to the guest first"),
            "{e}"
        );
        let e = h.set_target(768).unwrap_err();
        assert!(matches!(e, BalloonError::Io { .. }), "{e}");
        // Never more absent than the VM has; and an entry written before
        // the field existed reads as nothing absent.
        assert_eq!(h.clone().with_absent(5000).absent_mib, 1024);
        let old = r#"{"endpoint":{"kind":"qmp","socket":"/q"},"assigned_mib":64}"#;
        let back: BalloonHandle = serde_json::from_str(old).unwrap();
        assert_eq!(back.absent_mib, 0);
    }

    #[test]
    fn qemu_guest_bytes_convert_to_a_balloon_size() {
        assert_eq!(balloon_from_guest_bytes(512, 512 * MIB), 0);
        assert_eq!(balloon_from_guest_bytes(512, 128 * MIB), 384);
        // QEMU never reports more than the VM has; if it did, no balloon.
        assert_eq!(balloon_from_guest_bytes(512, u64::MAX), 0);
    }

    #[test]
    fn endpoint_serializes_with_its_kind() {
        let h = BalloonHandle::new(
            BalloonEndpoint::CapsidVmm {
                socket: "/run/x/vmm-api.sock".into(),
            },
            64,
        );
        let j = serde_json::to_value(&h).unwrap();
        assert_eq!(j["endpoint"]["kind"], "capsid-vmm");
        let back: BalloonHandle = serde_json::from_value(j).unwrap();
        assert_eq!(back, h);
    }
}
