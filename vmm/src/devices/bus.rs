//! The VM's bus as vCPUs see it: port I/O to the legacy devices, MMIO to
//! the virtio-mmio windows. A transport event from a register write (a
//! device activated or reset, a queue notify that no ioeventfd caught) is
//! passed to the event loop from here.

use std::sync::{Arc, Mutex};

use capsid_devices::hosting::mmio::{MmioDevice, TransportEvent, MMIO_DEVICE_SIZE};
use vmm_sys_util::eventfd::EventFd;

use super::event_loop::LoopHandle;
use super::legacy::LegacyBus;
use super::{MmioPlacement, QueueService};
use crate::vstate::vcpu::Bus;

/// One virtio-mmio device on the bus.
pub struct MmioSlot {
    name: &'static str,
    place: MmioPlacement,
    device: Arc<Mutex<dyn MmioDevice>>,
    queue_evts: Vec<EventFd>,
    service: QueueService,
}

impl std::fmt::Debug for MmioSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioSlot")
            .field("name", &self.name)
            .field("place", &self.place)
            .finish()
    }
}

impl MmioSlot {
    /// A device at `place` with one notify eventfd per queue.
    pub fn new(
        name: &'static str,
        place: MmioPlacement,
        device: Arc<Mutex<dyn MmioDevice>>,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        Self {
            name,
            place,
            device,
            queue_evts,
            service: QueueService::EventLoop,
        }
    }

    /// The same slot, its queue notify eventfds read by `service`.
    pub fn served_by(mut self, service: QueueService) -> Self {
        self.service = service;
        self
    }

    /// Who reads the queue notify eventfds.
    pub fn queue_service(&self) -> QueueService {
        self.service
    }

    /// The device's short name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Where it sits.
    pub fn place(&self) -> MmioPlacement {
        self.place
    }

    /// The transport.
    pub fn device(&self) -> &Arc<Mutex<dyn MmioDevice>> {
        &self.device
    }

    /// The queue notify eventfds.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }
}

/// Port and memory-mapped I/O of the whole VM.
#[derive(Debug)]
pub struct VmBus {
    legacy: LegacyBus,
    slots: Arc<Vec<MmioSlot>>,
    event_loop: LoopHandle,
}

impl VmBus {
    /// The bus over `legacy` and the virtio `slots`, reporting transport
    /// events to `event_loop`.
    pub fn new(legacy: LegacyBus, slots: Arc<Vec<MmioSlot>>, event_loop: LoopHandle) -> Self {
        Self {
            legacy,
            slots,
            event_loop,
        }
    }

    /// The legacy devices.
    pub fn legacy(&self) -> &LegacyBus {
        &self.legacy
    }

    fn slot(&self, addr: u64) -> Option<(usize, u64)> {
        let first = self.slots.first()?.place.base;
        let index = usize::try_from(addr.checked_sub(first)? / MMIO_DEVICE_SIZE).ok()?;
        let slot = self.slots.get(index)?;
        Some((index, addr - slot.place.base))
    }
}

impl Bus for VmBus {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.legacy.pio_read(port, data);
    }

    fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        self.legacy.pio_write(port, data)
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.slot(addr) {
            Some((index, offset)) => match self.slots[index].device.lock() {
                Ok(mut dev) => dev.read(offset, data),
                Err(_) => data.fill(0xff),
            },
            None => self.legacy.mmio_read(addr, data),
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        let Some((index, offset)) = self.slot(addr) else {
            self.legacy.mmio_write(addr, data);
            return;
        };
        let slot = &self.slots[index];
        let event = match slot.device.lock() {
            Ok(mut dev) => dev.write(offset, data),
            Err(_) => return,
        };
        match event {
            TransportEvent::None => {}
            TransportEvent::QueueNotify(q) => {
                if let Some(evt) = slot.queue_evts.get(usize::from(q)) {
                    // The event loop reads it: a failed write here means the
                    // counter is saturated, so a wake-up is pending anyway.
                    let _ = evt.write(1);
                }
            }
            TransportEvent::Activated => self.event_loop.activated(index),
            TransportEvent::Reset => self.event_loop.reset(index),
        }
    }
}
