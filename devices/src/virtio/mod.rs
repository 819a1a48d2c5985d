//! Virtio device models and what they share (virtio 1.2, sections 2–5).
//!
//! A device model implements [`VirtioDevice`]: it is told about queue kicks
//! and host-side readiness, works on the queues and guest memory it is
//! handed, and says which queues need their driver notified. Transport and
//! interrupt delivery are the hosting's business (`crate::hosting`), so the
//! same model runs in-process in capsid-vmm and behind vhost-user for QEMU.

pub mod balloon;
pub mod blk;
pub mod net;
pub mod rng;
pub mod vsock;

use std::num::Wrapping;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemory, GuestMemoryMmap};

/// VIRTIO_F_VERSION_1: a modern (non-legacy) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_EVENT_IDX: used/avail event suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// VIRTIO_RING_F_INDIRECT_DESC: descriptor tables (virtio-queue walks them).
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// What every capsid device offers. Nothing is offered that the models do
/// not implement (QEMU also assumes indirect descriptors for some
/// vhost-user devices without asking).
pub const COMMON_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC;

/// Why a device is being asked to work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The driver kicked queue `n`.
    Queue(u16),
    /// The device's host-side fd ([`VirtioDevice::backend_fd`]) is readable.
    Backend,
}

/// An error of a device model, named by device.
#[derive(Debug, thiserror::Error)]
#[error("virtio-{device}")]
pub struct DeviceError {
    /// The device kind ("blk", "vsock", ...).
    pub device: &'static str,
    /// What went wrong.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl DeviceError {
    /// Wraps a device module's error.
    pub fn new(
        device: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            device,
            source: Box::new(source),
        }
    }
}

/// What a device model keeps beyond its transport's registers and queues,
/// for snapshots. Most models keep nothing more than their negotiated
/// features, which the transport hands them again on restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelState {
    /// The balloon's target, reported size and held statistics buffer.
    Balloon(balloon::BalloonState),
}

/// A saved [`ModelState`] offered to a model that keeps none, or another
/// kind.
#[derive(Debug, thiserror::Error)]
#[error("the saved model state does not belong to this device")]
pub struct ForeignModelState;

/// Bit for queue `index` in a notification mask.
pub const fn queue_bit(index: usize) -> u64 {
    1 << index
}

/// A virtio device model, independent of transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (section 5).
    fn device_type(&self) -> u32;
    /// Short name for logs and errors ("blk", "vsock", ...).
    fn name(&self) -> &'static str;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Size of each queue offered to a driver that sizes its rings by the
    /// device (MMIO's QueueNumMax, which Linux takes as it is); at most
    /// [`Self::queue_max_sizes`], same length. A driver keeps a buffer per
    /// entry of a receive queue, in guest RAM, so a device whose receive
    /// queues need not be deep offers less. Over vhost-user the frontend
    /// picks the size within the maximum.
    fn queue_offered_sizes(&self) -> &[u16] {
        self.queue_max_sizes()
    }
    /// Feature bits the device offers.
    fn features(&self) -> u64;
    /// Feature bits the driver accepted (a subset of [`Self::features`]).
    fn ack_features(&mut self, features: u64);
    /// Reads device configuration space at `offset`; bytes beyond it read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space (ignored unless the device has
    /// writable fields).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// An fd that becomes readable when the host side has work for the
    /// device (a tap, an epoll set of sockets); `None` when there is none.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// Handles `event`, returning a mask ([`queue_bit`]) of the queues whose
    /// driver must be notified.
    fn process(
        &mut self,
        event: DeviceEvent,
        queues: &mut [&mut Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, DeviceError>;
    /// The driver set DRIVER_OK on queues the transport checked (each
    /// ready queue lies in guest memory): a device whose queues are served
    /// elsewhere (a vhost-user frontend) hands them over here. An error
    /// puts the device out of service until the driver resets it.
    fn activate(&mut self, _queues: &[Queue], _mem: &GuestMemoryMmap) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Whether the device broke while running (its backend went away) and
    /// the driver must reset it; asked after every [`Self::process`].
    fn needs_reset(&self) -> bool {
        false
    }
    /// The driver reset the device: drop all in-flight state.
    fn reset(&mut self) {}
    /// What a snapshot must keep of the model besides its features.
    fn model_state(&self) -> Option<ModelState> {
        None
    }
    /// Takes a snapshot's [`Self::model_state`] back, once the features
    /// are negotiated again.
    fn restore_model_state(&mut self, _state: &ModelState) -> Result<(), DeviceError> {
        Err(DeviceError::new(self.name(), ForeignModelState))
    }
    /// The device was restored from a snapshot into a new process, with
    /// the driver running on `queues`: host-side state that cannot
    /// survive that (connections) is gone, and the driver is told in the
    /// way the device's section of the spec has for it. Returns a mask
    /// ([`queue_bit`]) of the queues whose driver must be notified.
    fn restored(
        &mut self,
        _queues: &mut [&mut Queue],
        _mem: &GuestMemoryMmap,
    ) -> Result<u64, DeviceError> {
        Ok(0)
    }
}

/// Whether the driver's available index is at most a queue's worth of
/// entries ahead of the device. virtio-queue refuses to walk a ring that is
/// not, while `enable_notification` keeps reporting work on it: a drain
/// loop must stop there or a hostile driver makes it spin forever.
pub fn avail_ring_sane<Q: QueueT, M: GuestMemory>(
    queue: &Q,
    mem: &M,
) -> Result<bool, virtio_queue::Error> {
    let avail = queue.avail_idx(mem, Ordering::Acquire)?;
    Ok((avail - Wrapping(queue.next_avail())).0 <= queue.size())
}

/// Reads `data.len()` bytes of a configuration structure `config` at
/// `offset`; what lies beyond it reads as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let end = config.len().min(start.saturating_add(data.len()));
    data[..end - start].copy_from_slice(&config[start..end]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [9u8; 3];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0]);
        read_config_bytes(&cfg, 100, &mut d);
        assert_eq!(d, [0, 0, 0]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0, 0, 0]);
    }
}
