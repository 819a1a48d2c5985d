//! Turns a [`VmConfig`] into a [`Machine`] ready to run: guest memory, the
//! KVM VM, the virtio devices and their wiring, the kernel and its boot
//! structures, the vCPUs' entry state, the legacy devices, the control
//! socket ([`build`]); or a loaded snapshot into the machine it was, its
//! memory file mapped copy-on-write ([`restore`]). Anything that fails
//! leaves nothing behind.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use capsid_devices::hosting::mmio::MMIO_DEVICE_SIZE;
use capsid_devices::socket_claim::{ClaimError, SocketClaim};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::loader::{self, BootEntry, LinuxBoot};
use crate::boot::{self, BootError, I8042_GSI, SERIAL_GSI};
use crate::config::{BootConfig, VmConfig, SERIAL_STDOUT};
use crate::devices::event_loop::EventLoop;
use crate::devices::legacy::{LegacyBus, LegacyError};
use crate::devices::{self, DeviceError, IrqLine, MmioPlacement, VmBus};
use crate::machine::{ControlSocket, Machine};
use crate::snapshot;
use crate::snapshot::restore::Loaded;
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

/// The command line every Linux guest gets before the devices and the
/// config's own arguments: console on COM1, reboot through the i8042
/// (which ends the VMM), reboot at once on panic.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The KVM VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Loading the kernel or writing the boot structures.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A device.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// The boot image cannot be read.
    #[error("cannot read boot image {path}")]
    ReadImage {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The boot image does not fit where it must go.
    #[error("boot image {path} ({size} bytes) does not fit in guest memory at {addr:#x}")]
    ImageTooLarge {
        /// The file.
        path: String,
        /// Its size.
        size: usize,
        /// Where it was to be loaded.
        addr: u64,
    },
    /// The serial console file cannot be opened.
    #[error("cannot open serial console file {path}")]
    Serial {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The control socket path cannot be claimed.
    #[error(transparent)]
    ControlClaim(#[from] ClaimError),
    /// The kernel loader thread ended without a result.
    #[error("the kernel loader thread failed")]
    Loader,
    /// A snapshot's VM-wide state was refused by KVM.
    #[error("cannot restore the VM's interrupt controllers, PIT or clock")]
    VmState(#[from] snapshot::vm::VmStateError),
    /// A snapshot's virtio devices could not be restored.
    #[error(transparent)]
    DeviceState(#[from] snapshot::devices::DeviceStateError),
    /// A snapshot's legacy devices could not be restored.
    #[error(transparent)]
    Legacy(#[from] LegacyError),
}

/// Result of building.
pub type Result<T> = std::result::Result<T, BuildError>;

/// The full kernel command line with `extra` and devices at `places`.
pub fn kernel_cmdline(extra: &str, places: &[MmioPlacement]) -> String {
    let mut cmdline = String::from(BASE_CMDLINE);
    for place in places {
        cmdline.push_str(&format!(
            " virtio_mmio.device={}K@{:#x}:{}",
            MMIO_DEVICE_SIZE >> 10,
            place.base,
            place.gsi
        ));
    }
    let extra = extra.trim();
    if !extra.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    cmdline
}

/// Builds the VM `config` describes.
pub fn build(config: &VmConfig) -> Result<Machine> {
    let start = std::time::Instant::now();
    let phase = |name: &str| {
        tracing::debug!(
            phase = name,
            elapsed_us = start.elapsed().as_micros(),
            "build"
        );
    };
    // A vhost-user backend maps guest RAM itself: then it is a shared
    // memfd; otherwise private anonymous memory, as it always was.
    let backing = if config.fs.is_some() {
        memory::Backing::Shared
    } else {
        memory::Backing::Private
    };
    let memory = memory::create_guest_memory(config.memory_bytes(), backing)?;
    // Devices go in a fixed order at fixed places, so the command line is
    // known before they exist: the kernel loads on a second thread while
    // KVM sets up the VM (both take milliseconds, mostly page faults and
    // memory slot set-up).
    let places: Vec<MmioPlacement> = (0..config.virtio_device_count())
        .map(devices::placement)
        .collect();
    // Huge pages for the boot image only when the host has free 2 MiB
    // blocks to spare: otherwise each of the loader's huge-page faults
    // could compact host memory first (memory::advise_huge_pages).
    if backing == memory::Backing::Private
        && memory::huge_pages_at_hand(2 * boot_image_blocks(config))
    {
        memory::advise_huge_pages(&memory);
    }
    let (entry, vm_devices) = std::thread::scope(|scope| {
        let loader = std::thread::Builder::new()
            .name("loader".into())
            .spawn_scoped(scope, || {
                let entry = load_boot_image(config, &memory, &places);
                tracing::debug!(
                    elapsed_us = start.elapsed().as_micros(),
                    cpu_us = thread_cpu_us(),
                    "loader done"
                );
                entry
            });
        let vm_devices = Vm::new(&memory, config.vcpus)
            .map_err(BuildError::from)
            .and_then(|vm| {
                phase("vm");
                let virtio = devices::create_virtio(&vm, &memory, config)?;
                phase("devices");
                Ok((vm, virtio))
            });
        let entry = match loader {
            Ok(handle) => handle.join().unwrap_or(Err(BuildError::Loader)),
            // No second thread: load here.
            Err(_) => load_boot_image(config, &memory, &places),
        };
        (entry, vm_devices)
    });
    let (vm, virtio) = vm_devices?;
    let entry = entry?;
    // Huge pages for the guest's own memory in any case, now that the boot
    // image is written.
    memory::advise_huge_pages(&memory);
    phase("boot image");

    let supported = vm.supported_cpuid()?;
    let tsc_deadline = vm.has_tsc_deadline();
    let caps = Arc::new(vm.state_caps()?);
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for index in 0..config.vcpus {
        let mut vcpu = Vcpu::new(vm.fd(), index, Arc::clone(&caps))?;
        vcpu.configure(&supported, config.vcpus, tsc_deadline)?;
        vcpus.push(vcpu);
    }
    if let Some(bsp) = vcpus.first() {
        match entry {
            Entry::Kernel(entry) => bsp.setup_boot(entry)?,
            Entry::RealMode(ip) => bsp.setup_real_mode(ip)?,
        }
    }
    phase("vcpus");

    // Files last, so that a failure above leaves none behind.
    let control = config
        .control_socket
        .as_deref()
        .map(bind_control)
        .transpose()?;
    let legacy = LegacyBus::new(
        open_console(config)?,
        IrqLine::new(&vm, SERIAL_GSI)?,
        IrqLine::new(&vm, I8042_GSI)?,
    );
    let slots = Arc::new(virtio.slots);
    let event_loop = EventLoop::new(Arc::clone(&slots))?;
    let bus = Arc::new(VmBus::new(legacy, Arc::clone(&slots), event_loop.handle()));
    Ok(Machine::new(
        config.clone(),
        vcpus,
        vm,
        bus,
        slots,
        event_loop,
        virtio.balloon,
        memory,
        control,
    ))
}

/// Builds the machine a snapshot saved, from its checked files
/// (`snapshot::restore::load`): guest RAM is the memory file mapped
/// private, the devices are built from the config as at boot and then
/// given their saved registers and queues, every vCPU and the interrupt
/// controllers their saved state. Nothing of the guest is loaded or set
/// up for a boot: the vCPUs go on where they stopped.
pub fn restore(loaded: Loaded) -> Result<Machine> {
    let start = std::time::Instant::now();
    let phase = |name: &str| {
        tracing::debug!(
            phase = name,
            elapsed_us = start.elapsed().as_micros(),
            "restore"
        );
    };
    let Loaded {
        config,
        state,
        memory: memory_file,
        memory_path,
    } = loaded;
    let memory = memory::map_private_file(memory_file, config.memory_bytes())?;
    let vm = Vm::new(&memory, config.vcpus)?;
    phase("vm");
    let virtio = devices::create_virtio(&vm, &memory, &config)?;
    phase("devices");
    // vCPUs before the interrupt controllers: see snapshot::vm::restore.
    let caps = Arc::new(vm.state_caps()?);
    let vcpus = state
        .vcpus
        .iter()
        .map(|s| Vcpu::restore(vm.fd(), s, Arc::clone(&caps)))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    snapshot::vm::restore(vm.fd(), &state.vm)?;
    phase("vcpus");
    let slots = Arc::new(virtio.slots);
    let event_loop = EventLoop::new(Arc::clone(&slots))?;
    snapshot::devices::restore(&slots, &state.devices, &event_loop.handle())?;

    // Files last, so that a failure above leaves none behind.
    let control = config
        .control_socket
        .as_deref()
        .map(bind_control)
        .transpose()?;
    let legacy = LegacyBus::restore(
        open_console(&config)?,
        IrqLine::new(&vm, SERIAL_GSI)?,
        IrqLine::new(&vm, I8042_GSI)?,
        &state.legacy,
    )?;
    snapshot::devices::announce(&slots)?;
    phase("devices restored");
    tracing::info!(
        memory = %memory_path.display(),
        vcpus = vcpus.len(),
        devices = slots.len(),
        elapsed_us = start.elapsed().as_micros(),
        "snapshot restored"
    );
    let bus = Arc::new(VmBus::new(legacy, Arc::clone(&slots), event_loop.handle()));
    Ok(Machine::new(
        config,
        vcpus,
        vm,
        bus,
        slots,
        event_loop,
        virtio.balloon,
        memory,
        control,
    ))
}

/// COM1's output as the config says.
fn open_console(config: &VmConfig) -> Result<Box<dyn Write + Send>> {
    Ok(match &config.serial {
        Some(path) if path.as_os_str() == SERIAL_STDOUT => Box::new(std::io::stdout()),
        Some(path) => Box::new(open_serial(path)?),
        None => Box::new(std::io::sink()),
    })
}

/// 2 MiB blocks of guest RAM that loading the boot image touches, at most:
/// the files' sizes (an ELF kernel loads less than its file), one block
/// more for each file's unaligned end, one for the boot structures.
fn boot_image_blocks(config: &VmConfig) -> u64 {
    let blocks = |path: &Path| std::fs::metadata(path).map_or(0, |m| m.len().div_ceil(2 << 20) + 1);
    let files = match &config.boot {
        BootConfig::Linux {
            kernel, initramfs, ..
        } => blocks(kernel) + initramfs.as_deref().map_or(0, blocks),
        BootConfig::RealMode { image, .. } => blocks(image),
    };
    files + 1
}

/// CPU time this thread has used, in microseconds (for the build's debug
/// log: the loader's page faults are CPU time of its own).
fn thread_cpu_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec owned by this frame;
    // clock_gettime only writes it.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1000
}

enum Entry {
    Kernel(BootEntry),
    RealMode(u16),
}

fn load_boot_image(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    places: &[MmioPlacement],
) -> Result<Entry> {
    match &config.boot {
        BootConfig::Linux {
            kernel,
            initramfs,
            cmdline,
        } => {
            let ram: Vec<(u64, u64)> =
                memory::ram_ranges(usize::try_from(config.memory_bytes()).unwrap_or(usize::MAX))
                    .into_iter()
                    .map(|(a, l)| (a.0, l as u64))
                    .collect();
            let low_ram_end = ram.first().map_or(0, |(a, l)| a + l);
            let memory_map = boot::memory_map(&ram);
            let cmdline = kernel_cmdline(cmdline, places);
            let entry = loader::load_linux(
                mem,
                &LinuxBoot {
                    kernel,
                    initramfs: initramfs.as_deref(),
                    cmdline: &cmdline,
                    memory_map: &memory_map,
                    low_ram_end,
                    vcpus: config.vcpus,
                },
            )?;
            Ok(Entry::Kernel(entry))
        }
        BootConfig::RealMode { image, load_addr } => {
            let bytes = std::fs::read(image).map_err(|source| BuildError::ReadImage {
                path: image.display().to_string(),
                source,
            })?;
            let addr = u64::from(*load_addr);
            mem.write_slice(&bytes, GuestAddress(addr))
                .map_err(|_| BuildError::ImageTooLarge {
                    path: image.display().to_string(),
                    size: bytes.len(),
                    addr,
                })?;
            // Validation keeps load_addr below 64 KiB.
            Ok(Entry::RealMode(u16::try_from(*load_addr).unwrap_or(0)))
        }
    }
}

fn bind_control(path: &Path) -> Result<ControlSocket> {
    let claim = SocketClaim::new(path)?;
    // Listening before it appears: the launcher waits for the path.
    let listener = claim.listen()?;
    Ok(ControlSocket { listener, claim })
}

/// The console log: capped and rotating, since the guest decides how much
/// it prints (capsid_devices::capped_log).
fn open_serial(path: &Path) -> Result<capsid_devices::capped_log::CappedLog> {
    capsid_devices::capped_log::CappedLog::open(path, capsid_devices::capped_log::DEFAULT_MAX_BYTES)
        .map_err(|source| BuildError::Serial {
            path: path.display().to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_without_devices() {
        assert_eq!(
            kernel_cmdline("  quiet  ", &[]),
            format!("{BASE_CMDLINE} quiet")
        );
        assert_eq!(kernel_cmdline("", &[]), BASE_CMDLINE);
    }
}
