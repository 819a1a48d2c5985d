//! Turns a [`VmConfig`] into a running VM and runs it to its end.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::mpsc;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::config::{BootConfig, VmConfig};
use crate::legacy::LegacyBus;
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{Bus, Vcpu, VcpuError, VcpuStop};
use crate::vstate::vm::{Vm, VmError};

/// Errors building or running a VM.
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
    /// A vCPU thread could not be started.
    #[error("cannot start a vCPU thread")]
    Thread(#[source] std::io::Error),
}

/// Result of building and running.
pub type Result<T> = std::result::Result<T, BuildError>;

/// A VM ready to run.
#[derive(Debug)]
pub struct Machine {
    // Field order matters on drop: vCPUs and the VM go before the memory
    // they map.
    vcpus: Vec<Vcpu>,
    vm: Vm,
    bus: Arc<LegacyBus>,
    memory: GuestMemoryMmap,
}

/// Builds the VM `config` describes: memory, KVM VM, devices, vCPUs with
/// their entry state, boot image loaded.
pub fn build(config: &VmConfig) -> Result<Machine> {
    let console: Box<dyn Write + Send> = match &config.serial {
        Some(path) => Box::new(open_serial(path)?),
        None => Box::new(std::io::sink()),
    };
    let memory = memory::create_guest_memory(config.memory_bytes())?;
    let vm = Vm::new(&memory)?;
    let bus = Arc::new(LegacyBus::new(console));
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for index in 0..config.vcpus {
        vcpus.push(Vcpu::new(vm.fd(), index)?);
    }
    match &config.boot {
        BootConfig::RealMode { image, load_addr } => {
            let bytes = std::fs::read(image).map_err(|source| BuildError::ReadImage {
                path: image.display().to_string(),
                source,
            })?;
            let addr = u64::from(*load_addr);
            memory
                .write_slice(&bytes, GuestAddress(addr))
                .map_err(|_| BuildError::ImageTooLarge {
                    path: image.display().to_string(),
                    size: bytes.len(),
                    addr,
                })?;
            for vcpu in &vcpus {
                // Validation keeps load_addr below 0xa0000, so it fits 16 bits
                // only when below 64 KiB; larger addresses use CS.
                vcpu.setup_real_mode(u16::try_from(addr).unwrap_or(0))?;
            }
        }
    }
    Ok(Machine {
        vcpus,
        vm,
        bus,
        memory,
    })
}

fn open_serial(path: &std::path::Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| BuildError::Serial {
            path: path.display().to_string(),
            source,
        })
}

impl Machine {
    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Runs every vCPU on its own thread until the first one stops; that
    /// vCPU's reason is the VM's end. The process exits after this, which
    /// takes the other vCPU threads with it.
    pub fn run(self) -> Result<VcpuStop> {
        let (tx, rx) = mpsc::channel();
        let Machine {
            vcpus,
            vm: _vm,
            bus,
            memory,
        } = self;
        for mut vcpu in vcpus {
            let tx = tx.clone();
            let bus = Arc::clone(&bus);
            // Each vCPU thread holds the guest memory mapping, so it outlives
            // any vCPU still inside KVM_RUN while the VM is being torn down.
            let memory = memory.clone();
            std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.index()))
                .spawn(move || {
                    let result = vcpu.run(bus.as_ref() as &dyn Bus);
                    drop(memory);
                    // The receiver is gone only when the VM is already ending.
                    let _ = tx.send(result);
                })
                .map_err(BuildError::Thread)?;
        }
        drop(tx);
        rx.recv()
            .unwrap_or_else(|_| Ok(VcpuStop::Crash("every vCPU thread ended".into())))
            .map_err(BuildError::from)
    }
}
