//! virtio-fs (virtio 1.2, section 5.11) as a vhost-user frontend: the
//! device capsid-vmm puts behind a virtio-mmio transport holds the
//! configuration space (`tag[36]`, `num_request_queues`) and negotiates
//! features with both sides; the FUSE requests on its queues (hiprio, then
//! the request queues) are served by the backend, virtiofsd.
//!
//! * Features: the guest is offered what the backend offers of
//!   [`TRANSPORT_FEATURES`] (VIRTIO_F_VERSION_1, indirect descriptors,
//!   event index); nothing device-specific (no notification queue, no DAX
//!   window). At DRIVER_OK the backend gets the driver's choice plus the
//!   vhost-user protocol bit.
//! * Kicks: each queue's `QueueNotify` ioeventfd (KVM signals it) is the
//!   ring's kick fd, so guest notifications go to the backend without the
//!   VMM; the event loop does not watch them.
//! * Calls: virtio-mmio needs `InterruptStatus` set before the interrupt,
//!   so the backend signals a call eventfd per queue, which this device
//!   watches ([`VirtioDevice::backend_fd`], an epoll set of them); the
//!   transport then sets the VRING bit and raises the irqfd.
//! * Failure: a backend that hangs up, sends something unasked, or does
//!   not answer puts the device in DEVICE_NEEDS_RESET, logged once; the
//!   VMM and the other devices carry on.

use std::os::fd::{AsRawFd, RawFd};

use capsid_devices::virtio::{
    queue_bit, read_config_bytes, DeviceError, DeviceEvent, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{VhostUserError, VhostUserHandle, VringSetup, PROTOCOL_FEATURES};
use crate::config::{FsConfig, MAX_FS_TAG_LEN};

/// Virtio device id of a file system device.
pub const VIRTIO_ID_FS: u32 = 26;
/// Bytes of the configuration space: the tag, then `num_request_queues`.
pub const FS_CONFIG_LEN: usize = MAX_FS_TAG_LEN + 4;
/// Transport features the guest may get, when the backend offers them.
pub const TRANSPORT_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC;

/// Epoll token of the backend connection (queue call fds are their index).
const HANGUP: u64 = u64::MAX;

/// Errors of the virtio-fs frontend.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// Talking to the backend failed.
    #[error(transparent)]
    Backend(#[from] VhostUserError),
    /// The backend does not offer VIRTIO_F_VERSION_1, which capsid's
    /// transport requires.
    #[error("the vhost-user backend does not offer VIRTIO_F_VERSION_1 (features {0:#x})")]
    NotModern(u64),
    /// The call eventfds or their epoll set cannot be created.
    #[error("cannot set up the call eventfds")]
    Calls(#[source] std::io::Error),
    /// The device broke earlier (its backend went away); only a new VMM
    /// reconnects.
    #[error("the device's backend is gone")]
    Broken,
    /// The kick eventfds do not match the queues.
    #[error("{kicks} kick eventfds for {queues} queues")]
    Kicks {
        /// Kick eventfds given.
        kicks: usize,
        /// Queues of the device.
        queues: usize,
    },
}

/// Result of the virtio-fs frontend.
pub type Result<T> = std::result::Result<T, FsError>;

/// The configuration space for `tag` (cut at 36 bytes; the config is
/// validated before) and `request_queues`.
pub fn config_space(tag: &str, request_queues: u16) -> [u8; FS_CONFIG_LEN] {
    let mut config = [0u8; FS_CONFIG_LEN];
    let tag = tag.as_bytes();
    let len = tag.len().min(MAX_FS_TAG_LEN);
    config[..len].copy_from_slice(&tag[..len]);
    config[MAX_FS_TAG_LEN..].copy_from_slice(&u32::from(request_queues).to_le_bytes());
    config
}

/// A virtio-fs device whose queues a vhost-user backend serves.
pub struct VhostUserFs {
    backend: VhostUserHandle,
    config: [u8; FS_CONFIG_LEN],
    queue_sizes: Vec<u16>,
    offered: u64,
    acked: u64,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    epoll: Epoll,
    /// Rings handed to the backend and not stopped yet.
    started: Vec<usize>,
    failed: bool,
}

impl std::fmt::Debug for VhostUserFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFs")
            .field("backend", &self.backend)
            .field("queues", &self.queue_sizes.len())
            .field("started", &self.started)
            .field("failed", &self.failed)
            .finish()
    }
}

impl VhostUserFs {
    /// The device `config` describes, on a backend connection already set
    /// up for `config.queue_count()` queues, with `kicks` the queues'
    /// notify eventfds (KVM's ioeventfds, one per queue, in order).
    pub fn new(config: &FsConfig, backend: VhostUserHandle, kicks: Vec<EventFd>) -> Result<Self> {
        let queues = config.queue_count();
        if kicks.len() != queues {
            return Err(FsError::Kicks {
                kicks: kicks.len(),
                queues,
            });
        }
        let features = backend.backend_features();
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(FsError::NotModern(features));
        }
        let epoll = Epoll::new().map_err(FsError::Calls)?;
        let mut calls = Vec::with_capacity(queues);
        for index in 0..queues {
            let call = EventFd::new(EFD_NONBLOCK).map_err(FsError::Calls)?;
            epoll
                .ctl(
                    ControlOperation::Add,
                    call.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, index as u64),
                )
                .map_err(FsError::Calls)?;
            calls.push(call);
        }
        epoll
            .ctl(
                ControlOperation::Add,
                backend.socket_fd().as_raw_fd(),
                EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, HANGUP),
            )
            .map_err(FsError::Calls)?;
        Ok(Self {
            config: config_space(&config.tag, config.num_request_queues),
            queue_sizes: vec![config.queue_size; queues],
            offered: features & TRANSPORT_FEATURES,
            acked: 0,
            kicks,
            calls,
            epoll,
            started: Vec::new(),
            failed: false,
            backend,
        })
    }

    /// Connects to the backend at `config.socket` (see
    /// [`VhostUserHandle::connect`]) and builds the device on it.
    pub fn connect(config: &FsConfig, kicks: Vec<EventFd>) -> Result<Self> {
        let backend =
            VhostUserHandle::connect(&config.socket, config.queue_count(), super::BACKEND_TIMEOUT)?;
        Self::new(config, backend, kicks)
    }

    /// The backend connection.
    pub fn backend(&self) -> &VhostUserHandle {
        &self.backend
    }

    /// Rings handed to the backend and not stopped.
    pub fn started_rings(&self) -> &[usize] {
        &self.started
    }

    /// Puts the device out of service, logging why once: the connection
    /// is closed and nothing is watched any more (a hung-up socket would
    /// otherwise keep the event loop awake).
    fn fail(&mut self, why: &dyn std::fmt::Display) {
        if self.failed {
            return;
        }
        self.failed = true;
        tracing::error!(
            device = "fs",
            error = %why,
            "vhost-user backend failed; the device needs reset and stays out of service"
        );
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            self.backend.socket_fd().as_raw_fd(),
            EpollEvent::default(),
        );
        for call in &self.calls {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                call.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.backend.close();
        self.started.clear();
    }

    /// Takes the rings back from the backend (GET_VRING_BASE each).
    fn stop_rings(&mut self) {
        if self.started.is_empty() || self.failed {
            self.started.clear();
            return;
        }
        let rings = std::mem::take(&mut self.started);
        tracing::debug!(
            device = "fs",
            ?rings,
            "taking the rings back from the vhost-user backend"
        );
        if let Err(e) = self.backend.stop(&rings) {
            if self.backend.is_closed() {
                self.fail(&capsid_devices::describe(&e));
            } else {
                tracing::warn!(
                    device = "fs",
                    error = %capsid_devices::describe(&e),
                    "cannot stop the backend's rings"
                );
            }
        }
        for call in &self.calls {
            let _ = call.read();
        }
    }

    fn drain_calls(&mut self) -> u64 {
        let mut events = [EpollEvent::default(); 32];
        let mut mask = 0;
        // Level-triggered: whatever does not fit is reported on the next
        // wake-up.
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                self.fail(&format_args!("epoll_wait on the call eventfds: {e}"));
                return 0;
            }
        };
        for event in &events[..n] {
            if event.data() == HANGUP {
                let hung_up = event
                    .event_set()
                    .intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR);
                self.fail(&if hung_up {
                    "the backend closed its socket"
                } else {
                    "the backend sent a message nobody asked for"
                });
                continue;
            }
            let Ok(index) = usize::try_from(event.data()) else {
                continue;
            };
            if let Some(call) = self.calls.get(index) {
                // Non-blocking: nothing to read is a spurious wake-up.
                if call.read().is_ok() && index < 64 {
                    mask |= queue_bit(index);
                }
            }
        }
        mask
    }
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn name(&self) -> &'static str {
        "fs"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.offered;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn activate(
        &mut self,
        queues: &[Queue],
        mem: &GuestMemoryMmap,
    ) -> std::result::Result<(), DeviceError> {
        if self.failed {
            return Err(DeviceError::new("fs", FsError::Broken));
        }
        // A driver that reset without our hearing of it (cannot happen
        // through the transport) still gets clean rings.
        self.stop_rings();
        let vrings: Vec<VringSetup> = queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready())
            .map(|(index, q)| VringSetup {
                index,
                size: q.size(),
                max_size: q.max_size(),
                desc: q.desc_table(),
                avail: q.avail_ring(),
                used: q.used_ring(),
                base: q.next_avail(),
            })
            .collect();
        let features = self.acked | (self.backend.backend_features() & PROTOCOL_FEATURES);
        let mut started = Vec::new();
        let result = self.backend.start(
            features,
            mem,
            &vrings,
            &self.kicks,
            &self.calls,
            &mut started,
        );
        self.started = started;
        match result {
            Ok(()) => {
                tracing::debug!(
                    device = "fs",
                    rings = ?self.started,
                    "rings handed to the vhost-user backend"
                );
                Ok(())
            }
            Err(e) => {
                if self.backend.is_closed() {
                    self.fail(&capsid_devices::describe(&e));
                } else {
                    // The backend refused something of this driver's set-up:
                    // take back what it got; a reset may do better.
                    self.stop_rings();
                }
                Err(DeviceError::new("fs", FsError::Backend(e)))
            }
        }
    }

    fn process(
        &mut self,
        event: DeviceEvent,
        _queues: &mut [&mut Queue],
        _mem: &GuestMemoryMmap,
    ) -> std::result::Result<u64, DeviceError> {
        // Queue kicks go to the backend; only its calls (and hang-ups)
        // arrive here.
        match event {
            DeviceEvent::Backend if !self.failed => Ok(self.drain_calls()),
            _ => Ok(0),
        }
    }

    fn needs_reset(&self) -> bool {
        self.failed
    }

    fn reset(&mut self) {
        self.stop_rings();
        self.acked = 0;
    }
}

impl Drop for VhostUserFs {
    fn drop(&mut self) {
        // The VM is ending: the backend stops using guest memory before
        // the connection goes.
        self.stop_rings();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_is_the_tag_then_the_queue_count() {
        let c = config_space("capsid", 1);
        assert_eq!(&c[..6], b"capsid");
        assert!(c[6..36].iter().all(|&b| b == 0));
        assert_eq!(&c[36..], &[1, 0, 0, 0]);
        let full = "t".repeat(36);
        let c = config_space(&full, 0x0102);
        assert_eq!(&c[..36], full.as_bytes());
        assert_eq!(&c[36..], &[2, 1, 0, 0]);
        // Longer tags are cut (validation refuses them before).
        let c = config_space(&"x".repeat(40), 1);
        assert_eq!(&c[..36], "x".repeat(36).as_bytes());
        assert_eq!(c.len(), FS_CONFIG_LEN);
    }
}
