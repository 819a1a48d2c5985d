//! capsid-vmm's devices: interrupt lines (irqfds), the virtio-mmio devices
//! from the `devices` crate behind their transports (`bus`), virtio-fs as
//! a vhost-user frontend whose queues virtiofsd serves (`vhost_user`), the
//! legacy PC devices on port I/O (`legacy`: serial console, i8042), and the
//! one event loop thread that serves the virtio ones (`event_loop`).

pub mod bus;
pub mod event_loop;
pub mod legacy;
pub mod vhost_user;

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use capsid_devices::hosting::mmio::{Interrupt, MmioDevice, MmioTransport, MMIO_DEVICE_SIZE};
use capsid_devices::virtio::balloon::{mib_to_pages, Balloon, BalloonConfig as BalloonModel};
use capsid_devices::virtio::blk::{Blk, BlkConfig};
use capsid_devices::virtio::net::{parse_mac, Net, Tap};
use capsid_devices::virtio::rng::Rng;
use capsid_devices::virtio::vsock::Vsock;
use capsid_devices::virtio::VirtioDevice;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{FIRST_VIRTIO_GSI, MMIO_DEVICES_START};
use crate::config::VmConfig;
use crate::vstate::vm::{Vm, VmError};
use vhost_user::fs::VhostUserFs;

pub use bus::{MmioSlot, VmBus};

/// Errors creating devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// Registering an ioeventfd or irqfd with KVM failed.
    #[error(transparent)]
    Kvm(#[from] VmError),
    /// A device model could not be built (its file, tap or socket).
    #[error("cannot create the {device} device: {reason}")]
    Model {
        /// Which device.
        device: String,
        /// Why, with its sources.
        reason: String,
    },
    /// The event loop could not be set up.
    #[error("cannot set up the device event loop")]
    EventLoop(#[source] std::io::Error),
}

/// Result of device operations.
pub type Result<T> = std::result::Result<T, DeviceError>;

/// An interrupt line: an eventfd KVM turns into an edge on a GSI.
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl IrqLine {
    /// A line raising `gsi` of `vm`.
    pub fn new(vm: &Vm, gsi: u32) -> Result<Self> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&evt, gsi)?;
        Ok(Self(evt))
    }

    /// A line connected to nothing (unit tests).
    pub fn detached() -> Result<Self> {
        EventFd::new(EFD_NONBLOCK)
            .map(Self)
            .map_err(DeviceError::EventFd)
    }

    fn raise(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.raise()
    }
}

impl Interrupt for IrqLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.raise()
    }
}

/// The balloon's transport, kept typed for the control API.
pub type BalloonHandle = Arc<Mutex<MmioTransport<Balloon>>>;

/// A virtio-mmio device ready to be put on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioPlacement {
    /// Base address of its 4 KiB window.
    pub base: u64,
    /// Its GSI.
    pub gsi: u32,
}

/// Where device `index` goes.
pub fn placement(index: usize) -> MmioPlacement {
    MmioPlacement {
        base: MMIO_DEVICES_START + index as u64 * MMIO_DEVICE_SIZE,
        gsi: FIRST_VIRTIO_GSI + u32::try_from(index).unwrap_or(u32::MAX - FIRST_VIRTIO_GSI),
    }
}

/// The virtio devices of a VM, placed, wired to KVM, not yet served.
#[derive(Debug)]
pub struct VirtioDevices {
    /// Every device, in bus order.
    pub slots: Vec<MmioSlot>,
    /// The balloon, when there is one.
    pub balloon: Option<BalloonHandle>,
}

fn model_err(device: &str, e: &dyn std::error::Error) -> DeviceError {
    DeviceError::Model {
        device: device.to_string(),
        reason: capsid_devices::describe(e),
    }
}

/// Builds every virtio device `config` asks for on `mem`, with an irqfd
/// per device and an ioeventfd per queue registered with `vm`. Order:
/// drives, net, vsock, rng, balloon, fs (a VM without a share keeps the
/// places it always had).
pub fn create_virtio(vm: &Vm, mem: &GuestMemoryMmap, config: &VmConfig) -> Result<VirtioDevices> {
    let mut out = VirtioDevices {
        slots: Vec::new(),
        balloon: None,
    };
    for drive in &config.drives {
        let blk = Blk::new(&BlkConfig {
            path: drive.path.clone(),
            read_only: drive.read_only,
            serial: drive.serial.clone(),
        })
        .map_err(|e| model_err("blk", &e))?;
        add(vm, mem, &mut out, blk)?;
    }
    for net in &config.net {
        let mac = net
            .mac
            .as_deref()
            .map(parse_mac)
            .transpose()
            .map_err(|e| model_err("net", &e))?;
        let tap = Tap::open(&net.tap).map_err(|e| model_err("net", &e))?;
        let dev = Net::new(tap, mac).map_err(|e| model_err("net", &e))?;
        add(vm, mem, &mut out, dev)?;
    }
    if let Some(vsock) = &config.vsock {
        let dev = Vsock::new(u64::from(vsock.guest_cid), &vsock.uds_path)
            .map_err(|e| model_err("vsock", &e))?;
        add(vm, mem, &mut out, dev)?;
    }
    if config.rng {
        add(vm, mem, &mut out, Rng::default())?;
    }
    if let Some(b) = &config.balloon {
        let mut dev = Balloon::new(BalloonModel {
            deflate_on_oom: b.deflate_on_oom,
            stats_polling_interval_s: b.stats_polling_interval_s,
            free_page_reporting: b.free_page_reporting,
        })
        .map_err(|e| model_err("balloon", &e))?;
        dev.set_target_pages(mib_to_pages(b.target_mib));
        out.balloon = Some(add(vm, mem, &mut out, dev)?);
    }
    if let Some(fs) = &config.fs {
        // The queues' notify eventfds are the backend's kick fds: they
        // exist before the device, which hands them over at DRIVER_OK.
        let place = placement(out.slots.len());
        let queue_evts = queue_eventfds(vm, place, fs.queue_count())?;
        let kicks = queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(DeviceError::EventFd)?;
        let dev = VhostUserFs::connect(fs, kicks).map_err(|e| model_err("fs", &e))?;
        place_device(vm, mem, &mut out, dev, queue_evts, QueueService::Backend)?;
    }
    Ok(out)
}

/// Who reads a device's queue notify eventfds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueService {
    /// capsid-vmm's event loop, which hands kicks to the device model.
    EventLoop,
    /// A vhost-user backend, which was given them as its kick fds.
    Backend,
}

/// One notify eventfd per queue of the device at `place`, each signalled
/// by KVM when the guest writes the queue's index to `QueueNotify`.
fn queue_eventfds(vm: &Vm, place: MmioPlacement, queues: usize) -> Result<Vec<EventFd>> {
    let mut queue_evts = Vec::with_capacity(queues);
    for q in 0..queues {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_ioevent(
            &evt,
            place.base + capsid_devices::hosting::mmio::VIRTIO_MMIO_QUEUE_NOTIFY,
            u32::try_from(q).unwrap_or(u32::MAX),
        )?;
        queue_evts.push(evt);
    }
    Ok(queue_evts)
}

/// Puts `device` behind a transport at the next free place.
fn add<D: VirtioDevice + 'static>(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    out: &mut VirtioDevices,
    device: D,
) -> Result<Arc<Mutex<MmioTransport<D>>>> {
    let place = placement(out.slots.len());
    let queue_evts = queue_eventfds(vm, place, device.queue_max_sizes().len())?;
    place_device(vm, mem, out, device, queue_evts, QueueService::EventLoop)
}

/// Puts `device` behind a transport at the next free place, with its
/// queues' notify eventfds `queue_evts` (registered there) read by
/// `service`.
fn place_device<D: VirtioDevice + 'static>(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    out: &mut VirtioDevices,
    device: D,
    queue_evts: Vec<EventFd>,
    service: QueueService,
) -> Result<Arc<Mutex<MmioTransport<D>>>> {
    let place = placement(out.slots.len());
    let irq = IrqLine::new(vm, place.gsi)?;
    let name = device.name();
    let transport = Arc::new(Mutex::new(MmioTransport::new(
        device,
        mem.clone(),
        Arc::new(irq),
    )));
    tracing::debug!(
        device = name,
        base = format_args!("{:#x}", place.base),
        gsi = place.gsi,
        fd = queue_evts.first().map(AsRawFd::as_raw_fd),
        "virtio-mmio device placed"
    );
    let dyn_dev: Arc<Mutex<dyn MmioDevice>> = transport.clone();
    out.slots
        .push(MmioSlot::new(name, place, dyn_dev, queue_evts).served_by(service));
    Ok(transport)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_is_one_page_and_one_gsi_per_device() {
        assert_eq!(
            placement(0),
            MmioPlacement {
                base: 0xd000_0000,
                gsi: 5
            }
        );
        assert_eq!(
            placement(3),
            MmioPlacement {
                base: 0xd000_3000,
                gsi: 8
            }
        );
        assert_eq!(placement(crate::config::MAX_VIRTIO_DEVICES - 1).gsi, 23);
    }
}
