//! The VM-wide state KVM keeps in the kernel: the in-kernel interrupt
//! controllers (both 8259 PICs and the IOAPIC; the LAPICs are per vCPU),
//! the PIT, and the KVM clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// Errors reading or writing the VM's state.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// A VM ioctl failed.
    #[error("{what} failed")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A saved interrupt controller is another one than its place says.
    #[error("the saved {what} has chip id {found}")]
    ChipId {
        /// Which controller.
        what: &'static str,
        /// Its id in the state.
        found: u32,
    },
}

/// Result of VM state operations.
pub type Result<T> = std::result::Result<T, VmStateError>;

/// The VM-wide state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC: redirection table, pending pins.
    pub ioapic: kvm_irqchip,
    /// The PIT's channels.
    pub pit: kvm_pit_state2,
    /// The KVM clock (kvmclock's base).
    pub clock: kvm_clock_data,
}

fn ioctl(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError::Ioctl { what, source }
}

fn chip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)
        .map_err(ioctl("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Reads the VM's state (its vCPUs paused).
pub fn save(fd: &VmFd) -> Result<VmState> {
    let mut clock = fd.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?;
    // KVM_SET_CLOCK refuses the flags KVM_GET_CLOCK reports (TSC_STABLE),
    // and with KVM_CLOCK_REALTIME it would move the clock on by the time
    // the snapshot sat on disk. Without flags the guest's clock goes on
    // from where it stood, as its TSC does (the TSC MSR is restored too).
    clock.flags = 0;
    Ok(VmState {
        pic_master: chip(fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(fd, KVM_IRQCHIP_IOAPIC)?,
        pit: fd.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
        clock,
    })
}

/// Writes `state` into a VM whose vCPUs are restored and have not run:
/// after them, so that an interrupt pending in the IOAPIC or a PIC (which
/// KVM delivers as it takes their state) reaches a LAPIC that already
/// holds its own saved state.
pub fn restore(fd: &VmFd, state: &VmState) -> Result<()> {
    for (what, chip, id) in [
        ("master PIC", &state.pic_master, KVM_IRQCHIP_PIC_MASTER),
        ("slave PIC", &state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        ("IOAPIC", &state.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        if chip.chip_id != id {
            return Err(VmStateError::ChipId {
                what,
                found: chip.chip_id,
            });
        }
    }
    fd.set_pit2(&state.pit).map_err(ioctl("KVM_SET_PIT2"))?;
    fd.set_clock(&state.clock).map_err(ioctl("KVM_SET_CLOCK"))?;
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        fd.set_irqchip(chip).map_err(ioctl("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}
