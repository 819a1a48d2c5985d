//! The virtio devices in a snapshot: each transport's registers and
//! queues (`capsid_devices::hosting::mmio::TransportState`, mirrored here
//! with serde), and the little a device model keeps besides (the
//! balloon's). Restoring puts them into devices freshly built from the
//! same config; what cannot survive the move to a new process is said in
//! docs/vmm.md ("What a restore resets").

use std::sync::MutexGuard;

use capsid_devices::hosting::mmio::{MmioDevice, TransportRestoreError, TransportState};
use capsid_devices::virtio::balloon::BalloonState;
use capsid_devices::virtio::ModelState;
use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

use crate::devices::event_loop::LoopHandle;
use crate::devices::MmioSlot;

/// Errors saving or restoring the virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    /// A device's lock was poisoned by a panic: its state is unknown.
    #[error("virtio device {index} ({name}) is out of service")]
    Poisoned {
        /// Its place on the bus.
        index: usize,
        /// Its name.
        name: &'static str,
    },
    /// The devices built from the config are not the snapshot's.
    #[error("the snapshot has {saved} virtio devices ({names}), the config builds {built}")]
    Count {
        /// In the snapshot.
        saved: usize,
        /// Their names.
        names: String,
        /// Built.
        built: usize,
    },
    /// A device is not the one the snapshot has at its place.
    #[error("virtio device {index} is {built}, the snapshot has {saved} there")]
    Order {
        /// Its place on the bus.
        index: usize,
        /// Built from the config.
        built: &'static str,
        /// In the snapshot.
        saved: String,
    },
    /// A transport refused its saved state.
    #[error("virtio device {index} ({name}) cannot be restored")]
    Transport {
        /// Its place on the bus.
        index: usize,
        /// Its name.
        name: &'static str,
        /// Why.
        #[source]
        source: TransportRestoreError,
    },
}

/// Result of device state operations.
pub type Result<T> = std::result::Result<T, DeviceStateError>;

/// One queue: its registers and where the device stands in its rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table.
    pub desc_table: u64,
    /// Available (driver) ring.
    pub avail_ring: u64,
    /// Used (device) ring.
    pub used_ring: u64,
    /// Next available entry the device takes.
    pub next_avail: u16,
    /// Next used entry the device fills.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    pub event_idx: bool,
}

impl From<&QueueState> for QueueSnapshot {
    fn from(q: &QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl From<&QueueSnapshot> for QueueState {
    fn from(q: &QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The balloon model's own state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonSnapshot {
    /// The host's target, 4 KiB pages.
    pub target_pages: u32,
    /// What the driver reported holding, 4 KiB pages.
    pub actual_pages: u32,
    /// Head descriptor of the statistics buffer the device holds.
    pub stats_buffer: Option<u16>,
}

/// One virtio-mmio device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Its name ("blk", "rng", …): the order is checked against the
    /// devices the config builds.
    pub name: String,
    /// Its virtio device id.
    pub device_type: u32,
    /// `Status`.
    pub status: u32,
    /// `DeviceFeaturesSel`.
    pub features_select: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_select: u32,
    /// What the driver accepted.
    pub driver_features: u64,
    /// `QueueSel`.
    pub queue_select: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// Its queues.
    pub queues: Vec<QueueSnapshot>,
    /// The balloon's own state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonSnapshot>,
}

impl DeviceState {
    fn new(name: &str, t: &TransportState) -> Self {
        let balloon = t.model.map(|m| match m {
            ModelState::Balloon(b) => BalloonSnapshot {
                target_pages: b.target_pages,
                actual_pages: b.actual_pages,
                stats_buffer: b.stats_buffer,
            },
        });
        Self {
            name: name.to_string(),
            device_type: t.device_type,
            status: t.device_status,
            features_select: t.features_select,
            driver_features_select: t.driver_features_select,
            driver_features: t.driver_features,
            queue_select: t.queue_select,
            interrupt_status: t.interrupt_status,
            config_generation: t.config_generation,
            queues: t.queues.iter().map(QueueSnapshot::from).collect(),
            balloon,
        }
    }

    fn transport(&self) -> TransportState {
        TransportState {
            device_type: self.device_type,
            device_status: self.status,
            features_select: self.features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(QueueState::from).collect(),
            model: self.balloon.map(|b| {
                ModelState::Balloon(BalloonState {
                    target_pages: b.target_pages,
                    actual_pages: b.actual_pages,
                    stats_buffer: b.stats_buffer,
                })
            }),
        }
    }
}

/// Every device of `slots`, locked: while the guards live, nothing works
/// on a device or writes guest memory for one (the event loop takes the
/// same locks), so the memory file and the device states agree.
pub fn lock_all(slots: &[MmioSlot]) -> Result<Vec<MutexGuard<'_, dyn MmioDevice + 'static>>> {
    slots
        .iter()
        .enumerate()
        .map(|(index, slot)| {
            slot.device()
                .lock()
                .map_err(|_| DeviceStateError::Poisoned {
                    index,
                    name: slot.name(),
                })
        })
        .collect()
}

/// The states of the devices `locked` (from [`lock_all`]).
pub fn save(
    slots: &[MmioSlot],
    locked: &[MutexGuard<'_, dyn MmioDevice + 'static>],
) -> Vec<DeviceState> {
    slots
        .iter()
        .zip(locked)
        .map(|(slot, dev)| DeviceState::new(slot.name(), &dev.save_state()))
        .collect()
}

/// Puts `states` into the devices of `slots` (built from the snapshot's
/// config, in its order); a running device's host-side fd is handed to
/// the event loop through `event_loop`. Nothing is raised or processed
/// yet: [`announce`] does that.
pub fn restore(slots: &[MmioSlot], states: &[DeviceState], event_loop: &LoopHandle) -> Result<()> {
    if slots.len() != states.len() {
        return Err(DeviceStateError::Count {
            saved: states.len(),
            names: states
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            built: slots.len(),
        });
    }
    for (index, (slot, state)) in slots.iter().zip(states).enumerate() {
        let name = slot.name();
        if state.name != name {
            return Err(DeviceStateError::Order {
                index,
                built: name,
                saved: state.name.clone(),
            });
        }
        let running = slot
            .device()
            .lock()
            .map_err(|_| DeviceStateError::Poisoned { index, name })?
            .restore_state(&state.transport())
            .map_err(|source| DeviceStateError::Transport {
                index,
                name,
                source,
            })?;
        // The lock is released: the loop handle takes it again.
        if running {
            event_loop.activated(index);
        }
    }
    Ok(())
}

/// The restored devices' first acts, once every interrupt controller and
/// vCPU holds its restored state (see `MmioTransport::restored`).
pub fn announce(slots: &[MmioSlot]) -> Result<()> {
    for (index, slot) in slots.iter().enumerate() {
        let mut dev = slot
            .device()
            .lock()
            .map_err(|_| DeviceStateError::Poisoned {
                index,
                name: slot.name(),
            })?;
        dev.restored();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transport_state_survives_json() {
        let t = TransportState {
            device_type: 5,
            device_status: 0xf,
            features_select: 1,
            driver_features_select: 1,
            driver_features: 1 << 32 | 2,
            queue_select: 2,
            interrupt_status: 1,
            config_generation: 3,
            queues: vec![QueueState {
                max_size: 256,
                next_avail: 7,
                next_used: 6,
                event_idx_enabled: true,
                size: 128,
                ready: true,
                desc_table: 0x3_0000,
                avail_ring: 0x3_1000,
                used_ring: 0x3_2000,
            }],
            model: Some(ModelState::Balloon(BalloonState {
                target_pages: 10,
                actual_pages: 9,
                stats_buffer: Some(4),
            })),
        };
        let state = DeviceState::new("balloon", &t);
        let json = serde_json::to_string(&state).unwrap();
        let back: DeviceState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        assert_eq!(back.transport(), t);
        let plain = TransportState {
            model: None,
            ..t.clone()
        };
        let json = serde_json::to_value(DeviceState::new("rng", &plain)).unwrap();
        assert!(json.get("balloon").is_none(), "{json}");
    }
}
