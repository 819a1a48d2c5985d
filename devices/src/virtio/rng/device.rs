//! The entropy device model.

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::request::{process_queue, EntropySource, HostEntropy};
use super::{RNG_NUM_QUEUES, VIRTIO_ID_RNG};
use crate::virtio::{queue_bit, DeviceError, DeviceEvent, VirtioDevice, COMMON_FEATURES};

/// Queue size offered to the driver (QEMU's vhost-user-rng asks for 1024).
pub const RNG_QUEUE_SIZE: u16 = 1024;

/// virtio-rng serving the host's entropy.
#[derive(Debug)]
pub struct Rng<S: EntropySource = HostEntropy> {
    source: S,
    acked: u64,
    /// Bytes served since start, for metrics.
    pub bytes_served: u64,
}

impl Default for Rng<HostEntropy> {
    fn default() -> Self {
        Self::with_source(HostEntropy)
    }
}

impl<S: EntropySource> Rng<S> {
    /// A device drawing from `source`.
    pub fn with_source(source: S) -> Self {
        Self {
            source,
            acked: 0,
            bytes_served: 0,
        }
    }
}

impl<S: EntropySource + Send> VirtioDevice for Rng<S> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn name(&self) -> &'static str {
        "rng"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[RNG_QUEUE_SIZE; RNG_NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // The entropy device has no configuration space.
        data.fill(0);
    }

    fn process(
        &mut self,
        event: DeviceEvent,
        queues: &mut [&mut Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, DeviceError> {
        let (DeviceEvent::Queue(0), Some(queue)) = (event, queues.get_mut(0)) else {
            return Ok(0);
        };
        let (stats, notify) = process_queue(&mut **queue, mem, &mut self.source)
            .map_err(|e| DeviceError::new("rng", e))?;
        self.bytes_served += stats.bytes;
        Ok(if notify { queue_bit(0) } else { 0 })
    }
}
