//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2): the
//! register file a driver programs, in front of a [`VirtioDevice`] model.
//!
//! The transport itself holds no file descriptors. The host side (capsid-vmm)
//! routes MMIO exits to [`MmioTransport::read`]/[`MmioTransport::write`],
//! turns queue notifications (ioeventfds) into [`MmioTransport::process`]
//! calls, and delivers the interrupt through an [`Interrupt`] (an irqfd).
//! Only the modern interface is offered: `VIRTIO_F_VERSION_1` must be
//! negotiated.
//!
//! Whatever a driver writes, in whatever order and width, is answered with
//! a register value, ignored, or a refused status bit: never a panic.

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::virtio::{queue_bit, DeviceEvent, ModelState, VirtioDevice, VIRTIO_F_VERSION_1};

/// "virt" in little-endian: the value of `MagicValue`.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The transport version: 2, the modern (non-legacy) interface.
pub const MMIO_VERSION: u32 = 2;
/// `VendorID` reported to the driver ("CPSD").
pub const MMIO_VENDOR_ID: u32 = u32::from_le_bytes(*b"CPSD");
/// Bytes of guest-physical address space one device occupies.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;

/// `MagicValue` register.
pub const VIRTIO_MMIO_MAGIC_VALUE: u64 = 0x000;
/// `Version` register.
pub const VIRTIO_MMIO_VERSION: u64 = 0x004;
/// `DeviceID` register.
pub const VIRTIO_MMIO_DEVICE_ID: u64 = 0x008;
/// `VendorID` register.
pub const VIRTIO_MMIO_VENDOR_ID: u64 = 0x00c;
/// `DeviceFeatures` register (32 bits selected by `DeviceFeaturesSel`).
pub const VIRTIO_MMIO_DEVICE_FEATURES: u64 = 0x010;
/// `DeviceFeaturesSel` register.
pub const VIRTIO_MMIO_DEVICE_FEATURES_SEL: u64 = 0x014;
/// `DriverFeatures` register.
pub const VIRTIO_MMIO_DRIVER_FEATURES: u64 = 0x020;
/// `DriverFeaturesSel` register.
pub const VIRTIO_MMIO_DRIVER_FEATURES_SEL: u64 = 0x024;
/// `QueueSel` register.
pub const VIRTIO_MMIO_QUEUE_SEL: u64 = 0x030;
/// `QueueNumMax` register.
pub const VIRTIO_MMIO_QUEUE_NUM_MAX: u64 = 0x034;
/// `QueueNum` register.
pub const VIRTIO_MMIO_QUEUE_NUM: u64 = 0x038;
/// `QueueReady` register.
pub const VIRTIO_MMIO_QUEUE_READY: u64 = 0x044;
/// `QueueNotify` register.
pub const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x050;
/// `InterruptStatus` register.
pub const VIRTIO_MMIO_INTERRUPT_STATUS: u64 = 0x060;
/// `InterruptACK` register.
pub const VIRTIO_MMIO_INTERRUPT_ACK: u64 = 0x064;
/// `Status` register.
pub const VIRTIO_MMIO_STATUS: u64 = 0x070;
/// `QueueDescLow` register.
pub const VIRTIO_MMIO_QUEUE_DESC_LOW: u64 = 0x080;
/// `QueueDescHigh` register.
pub const VIRTIO_MMIO_QUEUE_DESC_HIGH: u64 = 0x084;
/// `QueueDriverLow` register (available ring).
pub const VIRTIO_MMIO_QUEUE_AVAIL_LOW: u64 = 0x090;
/// `QueueDriverHigh` register.
pub const VIRTIO_MMIO_QUEUE_AVAIL_HIGH: u64 = 0x094;
/// `QueueDeviceLow` register (used ring).
pub const VIRTIO_MMIO_QUEUE_USED_LOW: u64 = 0x0a0;
/// `QueueDeviceHigh` register.
pub const VIRTIO_MMIO_QUEUE_USED_HIGH: u64 = 0x0a4;
/// `SHMLenLow` register.
pub const VIRTIO_MMIO_SHM_LEN_LOW: u64 = 0x0b0;
/// `SHMLenHigh` register.
pub const VIRTIO_MMIO_SHM_LEN_HIGH: u64 = 0x0b4;
/// `SHMBaseLow` register.
pub const VIRTIO_MMIO_SHM_BASE_LOW: u64 = 0x0b8;
/// `SHMBaseHigh` register.
pub const VIRTIO_MMIO_SHM_BASE_HIGH: u64 = 0x0bc;
/// `ConfigGeneration` register.
pub const VIRTIO_MMIO_CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device-specific configuration space.
pub const VIRTIO_MMIO_CONFIG: u64 = 0x100;

/// `InterruptStatus` bit: a used buffer was added to a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 1;
/// `InterruptStatus` bit: the configuration space changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 2;

/// Device status: the guest found the device.
pub const VIRTIO_CONFIG_S_ACKNOWLEDGE: u32 = 1;
/// Device status: the guest has a driver for it.
pub const VIRTIO_CONFIG_S_DRIVER: u32 = 2;
/// Device status: the driver is ready to drive the device.
pub const VIRTIO_CONFIG_S_DRIVER_OK: u32 = 4;
/// Device status: feature negotiation is complete.
pub const VIRTIO_CONFIG_S_FEATURES_OK: u32 = 8;
/// Device status: the device hit an error and needs a reset.
pub const VIRTIO_CONFIG_S_NEEDS_RESET: u32 = 0x40;
/// Device status: the driver gave up on the device.
pub const VIRTIO_CONFIG_S_FAILED: u32 = 0x80;

/// How the device raises its interrupt line (an irqfd in capsid-vmm).
pub trait Interrupt: Send + Sync {
    /// Raises the interrupt once.
    fn trigger(&self) -> std::io::Result<()>;
}

/// What a register write means for the host side of the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportEvent {
    /// Nothing to do.
    None,
    /// The driver set DRIVER_OK on a valid set-up: start serving the
    /// device's host-side fd.
    Activated,
    /// The driver reset a device that was active, or marked it FAILED:
    /// stop serving its fd.
    Reset,
    /// The driver wrote `QueueNotify` through an exit (no ioeventfd caught
    /// it): the queue needs processing.
    QueueNotify(u16),
}

/// Counters of one transport, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MmioStats {
    /// Device events processed (queue kicks and host-side readiness).
    pub events: u64,
    /// Interrupts raised (used buffers and configuration changes).
    pub interrupts: u64,
    /// Device model errors (logged, the device lives on).
    pub device_errors: u64,
    /// Register accesses refused: wrong width, read-only or unknown
    /// register, write at the wrong time.
    pub refused_accesses: u64,
    /// Interrupts that could not be delivered.
    pub interrupt_failures: u64,
}

/// A transport's registers and queues, as a snapshot keeps them: what
/// the driver programmed (virtio 1.2, section 4.2.2) and where each queue
/// stands, and the little a device model keeps beyond what feature
/// negotiation gives it (which [`MmioTransport::restore_state`] hands it
/// again).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransportState {
    /// The device's virtio id (a restore checks it is the same device).
    pub device_type: u32,
    /// `Status`.
    pub device_status: u32,
    /// `DeviceFeaturesSel`.
    pub features_select: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_select: u32,
    /// The features the driver wrote.
    pub driver_features: u64,
    /// `QueueSel`.
    pub queue_select: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// Every queue: its registers and the device's positions in its rings.
    pub queues: Vec<QueueState>,
    /// The model's own state, for the models that have one.
    pub model: Option<ModelState>,
}

/// Why a transport refused a saved state.
#[derive(Debug, thiserror::Error)]
pub enum TransportRestoreError {
    /// The state is another kind of device's.
    #[error("the saved state is of virtio device type {saved}, this device is type {device}")]
    DeviceType {
        /// In the state.
        saved: u32,
        /// This device's.
        device: u32,
    },
    /// The state has another number of queues.
    #[error("the saved state has {saved} queues, the device has {device}")]
    QueueCount {
        /// In the state.
        saved: usize,
        /// This device's.
        device: usize,
    },
    /// A queue's saved registers are not valid for it.
    #[error("queue {index} cannot be restored")]
    Queue {
        /// The queue.
        index: usize,
        /// What virtio-queue said.
        #[source]
        source: virtio_queue::Error,
    },
    /// The saved driver features are not a modern subset of the device's.
    #[error("the saved driver features {driver:#x} are not accepted by the device (it offers {offered:#x})")]
    Features {
        /// In the state.
        driver: u64,
        /// The device's.
        offered: u64,
    },
    /// A running device has a ready queue outside guest memory.
    #[error("queue {index} of a running device lies outside guest memory")]
    QueueOutsideMemory {
        /// The queue.
        index: usize,
    },
    /// The device model refused to start on the restored queues.
    #[error("the device cannot start on its restored queues")]
    Activate(#[source] crate::virtio::DeviceError),
    /// The device model refused its saved state.
    #[error("the device model refused its saved state")]
    Model(#[source] crate::virtio::DeviceError),
}

/// The virtio-mmio register file around a device model.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    queues: Vec<Queue>,
    device_status: u32,
    features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    interrupt_status: u32,
    config_generation: u32,
    stats: MmioStats,
}

impl<D: VirtioDevice> std::fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device", &self.device.name())
            .field("status", &self.device_status)
            .finish()
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Puts `device` behind a transport on guest memory `mem`, signalling
    /// the driver through `interrupt`.
    pub fn new(device: D, mem: GuestMemoryMmap, interrupt: Arc<dyn Interrupt>) -> Self {
        let offered = device.queue_offered_sizes();
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(i, &max)| offered.get(i).map_or(max, |&o| o.min(max)))
            .filter_map(|size| Queue::new(largest_power_of_two(size)).ok())
            .collect();
        Self {
            device,
            mem,
            interrupt,
            queues,
            device_status: 0,
            features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            interrupt_status: 0,
            config_generation: 0,
            stats: MmioStats::default(),
        }
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, mutably (host-side requests such as a balloon
    /// target).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Whether the driver has set DRIVER_OK on a valid set-up.
    pub fn is_activated(&self) -> bool {
        self.device_status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.device_status & (VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET) == 0
    }

    /// The device status register.
    pub fn device_status(&self) -> u32 {
        self.device_status
    }

    /// Number of queues the device has.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Counters.
    pub fn stats(&self) -> MmioStats {
        self.stats
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::try_from(self.queue_select).ok()?)
    }

    fn selected_queue_mut(&mut self) -> Option<&mut Queue> {
        self.queues
            .get_mut(usize::try_from(self.queue_select).ok()?)
    }

    /// A guest load of `data.len()` bytes at `offset` into the device's
    /// 4 KiB window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= VIRTIO_MMIO_CONFIG {
            self.device.read_config(offset - VIRTIO_MMIO_CONFIG, data);
            return;
        }
        // Registers are 32 bits wide and read as such (section 4.2.2.2).
        if data.len() != 4 {
            data.fill(0);
            self.stats.refused_accesses += 1;
            return;
        }
        let features = self.device.features();
        let value = match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => MMIO_VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.features_select {
                0 => low32(features),
                1 => high32(features),
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected_queue().map_or(0, |q| u32::from(q.max_size()))
            }
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.device_status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: their length reads as all ones.
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_SHM_BASE_LOW | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            _ => {
                self.stats.refused_accesses += 1;
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A guest store of `data` at `offset` into the device's window.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> TransportEvent {
        if offset >= VIRTIO_MMIO_CONFIG {
            if self.device_status & VIRTIO_CONFIG_S_DRIVER != 0 {
                self.device.write_config(offset - VIRTIO_MMIO_CONFIG, data);
            } else {
                self.stats.refused_accesses += 1;
            }
            return TransportEvent::None;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.stats.refused_accesses += 1;
            return TransportEvent::None;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NUM => match u16::try_from(value) {
                Ok(size) => self.configure_queue(|q| q.set_size(size)),
                Err(_) => self.stats.refused_accesses += 1,
            },
            VIRTIO_MMIO_QUEUE_READY => self.configure_queue(|q| q.set_ready(value == 1)),
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.configure_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.configure_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.configure_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.configure_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.configure_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.configure_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                return match u16::try_from(value) {
                    Ok(queue) if self.is_activated() && usize::from(queue) < self.queues.len() => {
                        TransportEvent::QueueNotify(queue)
                    }
                    _ => {
                        self.stats.refused_accesses += 1;
                        TransportEvent::None
                    }
                };
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => return self.write_status(value),
            _ => self.stats.refused_accesses += 1,
        }
        TransportEvent::None
    }

    fn write_driver_features(&mut self, value: u32) {
        let negotiating = self.device_status & VIRTIO_CONFIG_S_DRIVER != 0
            && self.device_status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        if !negotiating {
            self.stats.refused_accesses += 1;
            return;
        }
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            // Feature bits beyond 63 do not exist; a driver setting them
            // asks for what is not offered.
            _ if value != 0 => self.driver_features |= 1 << 63,
            _ => {}
        }
    }

    /// Applies `f` to the selected queue, if the driver may configure
    /// queues now: after FEATURES_OK, before DRIVER_OK (section 4.2.3.2).
    fn configure_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        let configuring = self.device_status
            & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED)
            == VIRTIO_CONFIG_S_FEATURES_OK;
        match self.selected_queue_mut() {
            Some(queue) if configuring => f(queue),
            _ => self.stats.refused_accesses += 1,
        }
    }

    fn write_status(&mut self, value: u32) -> TransportEvent {
        if value == 0 {
            return self.reset();
        }
        if value & VIRTIO_CONFIG_S_FAILED != 0 {
            tracing::debug!(
                device = self.device.name(),
                "driver marked the device failed"
            );
            let was_active = self.is_activated();
            self.device_status |= VIRTIO_CONFIG_S_FAILED;
            // The device no longer processes anything: its host-side fd
            // must not be watched either, or a readable one (a tap, a
            // vhost-user call) would wake the event loop for nothing, for
            // ever.
            return if was_active {
                TransportEvent::Reset
            } else {
                TransportEvent::None
            };
        }
        // The driver only ever adds bits (section 2.1.2).
        if value & self.device_status != self.device_status {
            self.stats.refused_accesses += 1;
            return TransportEvent::None;
        }
        let mut event = TransportEvent::None;
        for bit in [
            VIRTIO_CONFIG_S_ACKNOWLEDGE,
            VIRTIO_CONFIG_S_DRIVER,
            VIRTIO_CONFIG_S_FEATURES_OK,
            VIRTIO_CONFIG_S_DRIVER_OK,
        ] {
            if value & bit == 0 || self.device_status & bit != 0 {
                continue;
            }
            let status = self.device_status;
            let accepted = match bit {
                VIRTIO_CONFIG_S_ACKNOWLEDGE => status == 0,
                VIRTIO_CONFIG_S_DRIVER => status == VIRTIO_CONFIG_S_ACKNOWLEDGE,
                VIRTIO_CONFIG_S_FEATURES_OK => {
                    status == VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
                        && self.features_acceptable()
                }
                _ => {
                    status
                        == VIRTIO_CONFIG_S_ACKNOWLEDGE
                            | VIRTIO_CONFIG_S_DRIVER
                            | VIRTIO_CONFIG_S_FEATURES_OK
                }
            };
            if !accepted {
                // FEATURES_OK left clear tells the driver its features were
                // refused; any other out-of-order bit is simply ignored.
                self.stats.refused_accesses += 1;
                break;
            }
            match bit {
                VIRTIO_CONFIG_S_FEATURES_OK => {
                    self.device.ack_features(self.driver_features);
                    self.device_status |= bit;
                }
                VIRTIO_CONFIG_S_DRIVER_OK => {
                    event = self.activate();
                    break;
                }
                _ => self.device_status |= bit,
            }
        }
        event
    }

    /// The driver's features are a subset of the device's and modern.
    fn features_acceptable(&self) -> bool {
        let offered = self.device.features();
        let ok =
            self.driver_features & !offered == 0 && self.driver_features & VIRTIO_F_VERSION_1 != 0;
        if !ok {
            tracing::debug!(
                device = self.device.name(),
                driver = format_args!("{:#x}", self.driver_features),
                offered = format_args!("{offered:#x}"),
                "feature negotiation refused"
            );
        }
        ok
    }

    fn activate(&mut self) -> TransportEvent {
        let event_idx = self.driver_features & crate::virtio::VIRTIO_RING_F_EVENT_IDX != 0;
        let mut valid = true;
        for queue in self.queues.iter_mut().filter(|q| q.ready()) {
            queue.set_event_idx(event_idx);
            // virtio-queue treats an available ring at address 0 as "not
            // ready" when popping, while still reporting work on it: a
            // device would spin on such a queue, so it is refused here.
            valid &= queue.is_valid(&self.mem) && queue.avail_ring() != 0;
        }
        if !valid {
            tracing::warn!(
                device = self.device.name(),
                "driver set DRIVER_OK with a queue outside guest memory; device needs reset"
            );
            self.device_status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            self.raise(VIRTIO_MMIO_INT_CONFIG);
            return TransportEvent::None;
        }
        if let Err(e) = self.device.activate(&self.queues, &self.mem) {
            self.stats.device_errors += 1;
            tracing::warn!(
                device = self.device.name(),
                error = %crate::describe(&e),
                "device cannot start; it needs reset"
            );
            self.device_status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            self.raise(VIRTIO_MMIO_INT_CONFIG);
            return TransportEvent::None;
        }
        self.device_status |= VIRTIO_CONFIG_S_DRIVER_OK;
        tracing::debug!(device = self.device.name(), "device activated");
        TransportEvent::Activated
    }

    fn reset(&mut self) -> TransportEvent {
        let was_active = self.is_activated();
        self.device.reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        self.device_status = 0;
        self.features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.interrupt_status = 0;
        if was_active {
            TransportEvent::Reset
        } else {
            TransportEvent::None
        }
    }

    fn raise(&mut self, bit: u32) {
        self.interrupt_status |= bit;
        self.stats.interrupts += 1;
        if let Err(e) = self.interrupt.trigger() {
            self.stats.interrupt_failures += 1;
            tracing::warn!(device = self.device.name(), error = %e, "cannot raise interrupt");
        }
    }

    /// Lets the device handle `event` (a queue kick or host-side
    /// readiness) and raises the interrupt when the driver must look at a
    /// queue. Does nothing before activation. Returns whether an interrupt
    /// was raised.
    pub fn process(&mut self, event: DeviceEvent) -> bool {
        if !self.is_activated() {
            return false;
        }
        if let DeviceEvent::Queue(index) = event {
            match self.queues.get(usize::from(index)) {
                Some(queue) if queue.ready() => {}
                _ => return false,
            }
        }
        self.stats.events += 1;
        let notify = {
            let mut queues: Vec<&mut Queue> = self.queues.iter_mut().collect();
            match self.device.process(event, &mut queues, &self.mem) {
                Ok(mask) => mask,
                Err(e) => {
                    self.stats.device_errors += 1;
                    tracing::warn!(device = self.device.name(), error = %crate::describe(&e), "request processing failed");
                    0
                }
            }
        };
        if self.device.needs_reset() {
            // The device logged why; the driver hears of it through the
            // status and a configuration interrupt (section 2.1.2).
            self.device_status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            self.raise(VIRTIO_MMIO_INT_CONFIG);
        }
        let ready_mask = self
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready())
            .fold(0, |m, (i, _)| m | queue_bit(i));
        if notify & ready_mask != 0 {
            self.raise(VIRTIO_MMIO_INT_VRING);
            true
        } else {
            false
        }
    }

    /// Runs a host-side request `f` on the device and its queues (a
    /// balloon statistics request, say), once the driver has the device
    /// running; raises the interrupt when the mask `f` returns names a
    /// ready queue. Returns whether it did.
    pub fn device_request<F>(&mut self, f: F) -> bool
    where
        F: FnOnce(&mut D, &mut [&mut Queue], &GuestMemoryMmap) -> u64,
    {
        if !self.is_activated() {
            return false;
        }
        let notify = {
            let mut queues: Vec<&mut Queue> = self.queues.iter_mut().collect();
            f(&mut self.device, &mut queues, &self.mem)
        };
        let ready = self
            .queues
            .iter()
            .enumerate()
            .any(|(i, q)| q.ready() && notify & queue_bit(i) != 0);
        if ready {
            self.raise(VIRTIO_MMIO_INT_VRING);
        }
        ready
    }

    /// Tells the driver the configuration space changed (a new balloon
    /// target, say): bumps `ConfigGeneration` and, once the driver is up,
    /// raises the configuration interrupt.
    pub fn signal_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.is_activated() {
            self.raise(VIRTIO_MMIO_INT_CONFIG);
        }
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// The registers and queues, for a snapshot. Taken while nothing else
    /// works on the device (the caller holds its lock, the vCPUs are
    /// paused).
    pub fn state(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            device_status: self.device_status,
            features_select: self.features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(Queue::state).collect(),
            model: self.device.model_state(),
        }
    }

    /// Puts a freshly built transport (its device built from the same
    /// description) in the saved `state`: registers and queues as the
    /// driver left them, the negotiated features handed to the device
    /// again (a tap's header length, the balloon's timer follow from
    /// them), and a running device started on its queues. Raises no
    /// interrupt and processes nothing: that is [`Self::restored`]'s, once
    /// the interrupt controller holds its own restored state. Returns
    /// whether the device is running (its host-side fd must be served).
    pub fn restore_state(&mut self, state: &TransportState) -> Result<bool, TransportRestoreError> {
        let device = self.device.device_type();
        if state.device_type != device {
            return Err(TransportRestoreError::DeviceType {
                saved: state.device_type,
                device,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(TransportRestoreError::QueueCount {
                saved: state.queues.len(),
                device: self.queues.len(),
            });
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| {
                Queue::try_from(*q).map_err(|source| TransportRestoreError::Queue { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.device_status = state.device_status;
        self.features_select = state.features_select;
        self.driver_features_select = state.driver_features_select;
        self.driver_features = state.driver_features;
        self.queue_select = state.queue_select;
        self.interrupt_status = state.interrupt_status;
        self.config_generation = state.config_generation;
        self.queues = queues;
        if self.device_status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            if !self.features_acceptable() {
                return Err(TransportRestoreError::Features {
                    driver: self.driver_features,
                    offered: self.device.features(),
                });
            }
            self.device.ack_features(self.driver_features);
        }
        if let Some(model) = &state.model {
            self.device
                .restore_model_state(model)
                .map_err(TransportRestoreError::Model)?;
        }
        if !self.is_activated() {
            return Ok(false);
        }
        for (index, queue) in self.queues.iter().enumerate() {
            if queue.ready() && (!queue.is_valid(&self.mem) || queue.avail_ring() == 0) {
                return Err(TransportRestoreError::QueueOutsideMemory { index });
            }
        }
        self.device
            .activate(&self.queues, &self.mem)
            .map_err(TransportRestoreError::Activate)?;
        Ok(true)
    }

    /// The first thing a restored, running device does, once the whole VM
    /// is restored and before its vCPUs run: an interrupt the driver had
    /// not acknowledged is raised again (it may not have reached the
    /// interrupt controller before the snapshot: irqfd delivery is
    /// asynchronous), the device tells the driver what did not survive
    /// ([`VirtioDevice::restored`]: vsock's transport reset), and every
    /// ready queue is processed once, as a kick the old process had not
    /// served yet would have had it. Returns whether an interrupt was
    /// raised.
    pub fn restored(&mut self) -> bool {
        if !self.is_activated() {
            return false;
        }
        let mut raised = false;
        if self.interrupt_status != 0 {
            let pending = self.interrupt_status;
            self.raise(pending);
            raised = true;
        }
        let notify = {
            let mut queues: Vec<&mut Queue> = self.queues.iter_mut().collect();
            match self.device.restored(&mut queues, &self.mem) {
                Ok(mask) => mask,
                Err(e) => {
                    self.stats.device_errors += 1;
                    tracing::warn!(device = self.device.name(), error = %crate::describe(&e), "device could not announce the restore");
                    0
                }
            }
        };
        let ready: Vec<u16> = self
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready())
            .filter_map(|(i, _)| u16::try_from(i).ok())
            .collect();
        if ready
            .iter()
            .any(|&i| notify & queue_bit(usize::from(i)) != 0)
        {
            self.raise(VIRTIO_MMIO_INT_VRING);
            raised = true;
        }
        for index in ready {
            raised |= self.process(DeviceEvent::Queue(index));
        }
        raised
    }
}

/// The largest power of two not above `size` (at least 1, at most 32768).
fn largest_power_of_two(size: u16) -> u16 {
    let size = size.clamp(1, 1 << 15);
    1 << (15 - size.leading_zeros())
}

fn low32(v: u64) -> u32 {
    (v & 0xffff_ffff) as u32
}

fn high32(v: u64) -> u32 {
    (v >> 32) as u32
}

/// The transport as the host side sees it, whatever the device model.
pub trait MmioDevice: Send {
    /// The device's short name.
    fn name(&self) -> &'static str;
    /// A guest load at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest store at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> TransportEvent;
    /// Handles a device event; true when an interrupt was raised.
    fn process(&mut self, event: DeviceEvent) -> bool;
    /// The model's host-side fd.
    fn backend_fd(&self) -> Option<RawFd>;
    /// Number of queues.
    fn queue_count(&self) -> usize;
    /// Counters.
    fn stats(&self) -> MmioStats;
    /// Whether the driver has the device running.
    fn is_activated(&self) -> bool;
    /// The registers and queues, for a snapshot.
    fn save_state(&self) -> TransportState;
    /// See [`MmioTransport::restore_state`].
    fn restore_state(&mut self, state: &TransportState) -> Result<bool, TransportRestoreError>;
    /// See [`MmioTransport::restored`].
    fn restored(&mut self) -> bool;
}

impl<D: VirtioDevice> MmioDevice for MmioTransport<D> {
    fn name(&self) -> &'static str {
        self.device.name()
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> TransportEvent {
        MmioTransport::write(self, offset, data)
    }

    fn process(&mut self, event: DeviceEvent) -> bool {
        MmioTransport::process(self, event)
    }

    fn backend_fd(&self) -> Option<RawFd> {
        self.device.backend_fd()
    }

    fn queue_count(&self) -> usize {
        MmioTransport::queue_count(self)
    }

    fn stats(&self) -> MmioStats {
        MmioTransport::stats(self)
    }

    fn is_activated(&self) -> bool {
        MmioTransport::is_activated(self)
    }

    fn save_state(&self) -> TransportState {
        MmioTransport::state(self)
    }

    fn restore_state(&mut self, state: &TransportState) -> Result<bool, TransportRestoreError> {
        MmioTransport::restore_state(self, state)
    }

    fn restored(&mut self) -> bool {
        MmioTransport::restored(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use vm_memory::{Bytes, GuestAddress};

    use crate::virtio::rng::{EntropySource, Rng, RngError};
    use crate::virtio::COMMON_FEATURES;

    #[derive(Default)]
    struct Counter(AtomicU32);

    impl Interrupt for Counter {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    struct Zeros;

    impl EntropySource for Zeros {
        fn fill(&mut self, buf: &mut [u8]) -> Result<(), RngError> {
            buf.fill(0x5a);
            Ok(())
        }
    }

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn transport() -> (MmioTransport<Rng<Zeros>>, Arc<Counter>, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = Arc::new(Counter::default());
        let t = MmioTransport::new(Rng::with_source(Zeros), mem.clone(), irq.clone());
        (t, irq, mem)
    }

    fn r(t: &mut MmioTransport<Rng<Zeros>>, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport<Rng<Zeros>>, offset: u64, v: u32) -> TransportEvent {
        t.write(offset, &v.to_le_bytes())
    }

    fn negotiate(t: &mut MmioTransport<Rng<Zeros>>, features: u64) -> u32 {
        w(t, VIRTIO_MMIO_STATUS, 0);
        w(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        w(
            t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, low32(features));
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, high32(features));
        w(
            t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        r(t, VIRTIO_MMIO_STATUS)
    }

    fn setup_queue(t: &mut MmioTransport<Rng<Zeros>>, size: u32) {
        w(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(r(t, VIRTIO_MMIO_QUEUE_READY), 0);
        w(t, VIRTIO_MMIO_QUEUE_NUM, size);
        w(t, VIRTIO_MMIO_QUEUE_DESC_LOW, low32(DESC));
        w(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, low32(AVAIL));
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        w(t, VIRTIO_MMIO_QUEUE_USED_LOW, low32(USED));
        w(t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        w(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    #[test]
    fn a_device_offers_drivers_less_than_its_maximum() {
        // vsock takes queues of up to 1024 entries over vhost-user, but an
        // MMIO driver, which fills every receive entry with a buffer of
        // guest RAM, is offered 256.
        let dir = tempfile::tempdir().unwrap();
        let vsock = crate::virtio::vsock::Vsock::new(3, &dir.path().join("v.sock")).unwrap();
        assert_eq!(vsock.queue_max_sizes(), &[1024; 3]);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut t = MmioTransport::new(vsock, mem, Arc::new(Counter::default()));
        let mut num_max = |queue: u32| {
            t.write(VIRTIO_MMIO_QUEUE_SEL, &queue.to_le_bytes());
            let mut d = [0u8; 4];
            t.read(VIRTIO_MMIO_QUEUE_NUM_MAX, &mut d);
            u32::from_le_bytes(d)
        };
        assert_eq!((num_max(0), num_max(1), num_max(2)), (256, 256, 256));
        assert_eq!(num_max(3), 0);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _, _) = transport();
        assert_eq!(r(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC_VALUE);
        assert_eq!(r(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), 4);
        assert_eq!(r(&mut t, VIRTIO_MMIO_VENDOR_ID), MMIO_VENDOR_ID);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
            high32(COMMON_FEATURES)
        );
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
            low32(COMMON_FEATURES)
        );
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 1024);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn narrow_register_access_is_refused() {
        let (mut t, _, _) = transport();
        let mut b = [0xffu8; 2];
        t.read(VIRTIO_MMIO_MAGIC_VALUE, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(t.write(VIRTIO_MMIO_STATUS, &[1]), TransportEvent::None);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(t.stats().refused_accesses, 2);
    }

    #[test]
    fn legacy_driver_is_refused() {
        let (mut t, _, _) = transport();
        let status = negotiate(&mut t, 0);
        assert_eq!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        // Features the device does not offer are refused too.
        let status = negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 40);
        assert_eq!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        let status = negotiate(&mut t, VIRTIO_F_VERSION_1);
        assert_ne!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    }

    #[test]
    fn out_of_order_status_is_ignored() {
        let (mut t, _, _) = transport();
        assert_eq!(
            w(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER_OK),
            TransportEvent::None
        );
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
        // Queue set-up before FEATURES_OK is refused.
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    }

    #[test]
    fn full_cycle_fills_a_buffer_and_interrupts() {
        let (mut t, irq, mem) = transport();
        assert_ne!(
            negotiate(&mut t, VIRTIO_F_VERSION_1) & VIRTIO_CONFIG_S_FEATURES_OK,
            0
        );
        setup_queue(&mut t, 16);
        let all = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        assert_eq!(
            w(&mut t, VIRTIO_MMIO_STATUS, all),
            TransportEvent::Activated
        );
        assert!(t.is_activated());
        // One device-writable buffer on the available ring.
        let d = RawDescriptor::from(SplitDescriptor::new(
            0x8000,
            32,
            u16::try_from(VRING_DESC_F_WRITE).unwrap(),
            0,
        ));
        mem.write_obj(d, GuestAddress(DESC)).unwrap();
        mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        assert_eq!(
            w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0),
            TransportEvent::QueueNotify(0)
        );
        assert!(t.process(DeviceEvent::Queue(0)));
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x8000)).unwrap(), 0x5a);
        // Reset takes it all back.
        assert_eq!(w(&mut t, VIRTIO_MMIO_STATUS, 0), TransportEvent::Reset);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert!(!t.process(DeviceEvent::Queue(0)));
    }

    #[test]
    fn a_driver_giving_up_stops_the_service() {
        let (mut t, _, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 16);
        let s = r(&mut t, VIRTIO_MMIO_STATUS);
        assert_eq!(
            w(&mut t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK),
            TransportEvent::Activated
        );
        let s = r(&mut t, VIRTIO_MMIO_STATUS);
        assert_eq!(
            w(&mut t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FAILED),
            TransportEvent::Reset
        );
        assert!(!t.is_activated());
        // Not again, and the later reset has nothing more to stop.
        let s = r(&mut t, VIRTIO_MMIO_STATUS);
        assert_eq!(w(&mut t, VIRTIO_MMIO_STATUS, s), TransportEvent::None);
        assert_eq!(w(&mut t, VIRTIO_MMIO_STATUS, 0), TransportEvent::None);
    }

    #[test]
    fn queue_outside_memory_needs_reset() {
        let (mut t, irq, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 16);
        w(&mut t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0x10);
        let s = r(&mut t, VIRTIO_MMIO_STATUS);
        assert_eq!(
            w(&mut t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK),
            TransportEvent::None
        );
        assert_ne!(
            r(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
        assert!(!t.is_activated());
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert!(!t.process(DeviceEvent::Queue(0)));
    }

    #[test]
    fn available_ring_at_zero_is_refused() {
        let (mut t, _, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 16);
        w(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0);
        let s = r(&mut t, VIRTIO_MMIO_STATUS);
        assert_eq!(
            w(&mut t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK),
            TransportEvent::None
        );
        assert_ne!(
            r(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
        assert!(!t.process(DeviceEvent::Queue(0)));
    }

    #[test]
    fn config_change_bumps_generation() {
        let (mut t, irq, _) = transport();
        t.signal_config_change();
        assert_eq!(r(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 1);
        // Not interrupting a driver that is not there yet.
        assert_eq!(irq.0.load(Ordering::SeqCst), 0);
    }

    /// A running transport with one filled buffer behind it, and one
    /// more posted that the device has not seen.
    fn running_with_pending_buffer() -> (MmioTransport<Rng<Zeros>>, GuestMemoryMmap) {
        let (mut t, _, mem) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 16);
        let s = r(&mut t, VIRTIO_MMIO_STATUS);
        w(&mut t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
        for (i, addr) in [(0u16, 0x8000u64), (1, 0x9000)] {
            let d = RawDescriptor::from(SplitDescriptor::new(
                addr,
                32,
                u16::try_from(VRING_DESC_F_WRITE).unwrap(),
                0,
            ));
            mem.write_obj(d, GuestAddress(DESC + 16 * u64::from(i)))
                .unwrap();
            mem.write_obj(i, GuestAddress(AVAIL + 4 + 2 * u64::from(i)))
                .unwrap();
        }
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        assert!(t.process(DeviceEvent::Queue(0)));
        // The second buffer is posted; its kick is "lost" with the process.
        mem.write_obj(2u16, GuestAddress(AVAIL + 2)).unwrap();
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        (t, mem)
    }

    #[test]
    fn a_restored_transport_goes_on_where_it_was() {
        let (t, mem) = running_with_pending_buffer();
        let state = t.state();
        assert_eq!(state.device_type, 4);
        assert_eq!(state.queues[0].next_avail, 1);
        assert_eq!(state.queues[0].next_used, 1);
        assert_eq!(state.interrupt_status, VIRTIO_MMIO_INT_VRING);
        assert_eq!(state.model, None);

        let irq = Arc::new(Counter::default());
        let mut back = MmioTransport::new(Rng::with_source(Zeros), mem.clone(), irq.clone());
        assert!(back.restore_state(&state).unwrap());
        assert!(back.is_activated());
        assert_eq!(back.state(), state);
        // Registers read as the driver left them; nothing raised yet.
        assert_eq!(r(&mut back, VIRTIO_MMIO_STATUS), 0xf);
        assert_eq!(r(&mut back, VIRTIO_MMIO_QUEUE_READY), 1);
        assert_eq!(irq.0.load(Ordering::SeqCst), 0);
        // Its first act: the unacknowledged interrupt again, and the
        // buffer the old process never saw, filled.
        assert!(back.restored());
        assert!(irq.0.load(Ordering::SeqCst) >= 2);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 2);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), 0x5a);
        assert_eq!(back.state().queues[0].next_avail, 2);
    }

    #[test]
    fn a_foreign_or_broken_state_is_refused() {
        let (t, mem) = running_with_pending_buffer();
        let state = t.state();
        let fresh = || {
            MmioTransport::new(
                Rng::with_source(Zeros),
                mem.clone(),
                Arc::new(Counter::default()),
            )
        };
        let e = fresh()
            .restore_state(&TransportState {
                device_type: 2,
                ..state.clone()
            })
            .unwrap_err();
        assert!(
            matches!(
                e,
                TransportRestoreError::DeviceType {
                    saved: 2,
                    device: 4
                }
            ),
            "{e}"
        );
        let e = fresh()
            .restore_state(&TransportState {
                queues: vec![],
                ..state.clone()
            })
            .unwrap_err();
        assert!(
            matches!(
                e,
                TransportRestoreError::QueueCount {
                    saved: 0,
                    device: 1
                }
            ),
            "{e}"
        );
        let mut bad = state.clone();
        bad.queues[0].size = 3;
        let e = fresh().restore_state(&bad).unwrap_err();
        assert!(
            matches!(e, TransportRestoreError::Queue { index: 0, .. }),
            "{e}"
        );
        let e = fresh()
            .restore_state(&TransportState {
                driver_features: VIRTIO_F_VERSION_1 | 1 << 40,
                ..state.clone()
            })
            .unwrap_err();
        assert!(matches!(e, TransportRestoreError::Features { .. }), "{e}");
        let mut bad = state.clone();
        bad.queues[0].used_ring = 0x10_0000_0000;
        let e = fresh().restore_state(&bad).unwrap_err();
        assert!(
            matches!(e, TransportRestoreError::QueueOutsideMemory { index: 0 }),
            "{e}"
        );
        let e = fresh()
            .restore_state(&TransportState {
                model: Some(ModelState::Balloon(Default::default())),
                ..state.clone()
            })
            .unwrap_err();
        assert!(matches!(e, TransportRestoreError::Model(_)), "{e}");
        // A device the driver never started is restored, and does nothing.
        let mut idle = fresh();
        assert!(!idle
            .restore_state(&TransportState {
                device_status: 0,
                interrupt_status: 0,
                ..state
            })
            .unwrap());
        assert!(!idle.restored());
    }

    #[test]
    fn largest_power_of_two_rounds_down() {
        assert_eq!(largest_power_of_two(0), 1);
        assert_eq!(largest_power_of_two(1), 1);
        assert_eq!(largest_power_of_two(256), 256);
        assert_eq!(largest_power_of_two(1000), 512);
        assert_eq!(largest_power_of_two(u16::MAX), 32768);
    }
}
