//! x86 processor state a vCPU starts with besides CPUID: boot MSRs, FPU
//! control words, the LAPIC's local interrupt pins, and the general
//! registers of each entry mode.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs};

use crate::boot::loader::BootEntry;
use crate::boot::tables::EntryMode;
use crate::boot::{BOOT_STACK_POINTER, PVH_INFO_START, ZERO_PAGE_START};

/// Time-stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
/// SYSENTER code segment.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// SYSENTER stack pointer.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// SYSENTER entry point.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// Miscellaneous features.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// MISC_ENABLE: fast string operations.
pub const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
/// Default memory type of the MTRRs.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back.
pub const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;
/// SYSCALL segments.
pub const MSR_STAR: u32 = 0xc000_0081;
/// 64-bit SYSCALL entry.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// Compatibility-mode SYSCALL entry.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// SYSCALL RFLAGS mask.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// SWAPGS shadow.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// LAPIC register: LVT LINT0.
pub const APIC_LVT0: usize = 0x350;
/// LAPIC register: LVT LINT1.
pub const APIC_LVT1: usize = 0x360;
/// LVT delivery mode: external interrupt (the 8259 through virtual wire).
pub const APIC_MODE_EXTINT: u32 = 0x7;
/// LVT delivery mode: NMI.
pub const APIC_MODE_NMI: u32 = 0x4;

/// The MSRs every vCPU starts with (as a BIOS would leave them): syscall
/// machinery cleared, TSC at 0, fast strings on, MTRRs on and write-back.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// FPU state after FNINIT, SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = state.regs[offset + i] as u8;
    }
    u32::from_le_bytes(b)
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *byte as _;
    }
}

fn delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires the LAPIC's LINT0 to ExtINT and LINT1 to NMI, the virtual-wire
/// set-up a PC BIOS leaves and the MP table announces.
pub fn set_lint(state: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(state, APIC_LVT0);
    set_lapic_reg(state, APIC_LVT0, delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(state, APIC_LVT1);
    set_lapic_reg(state, APIC_LVT1, delivery_mode(lvt1, APIC_MODE_NMI));
}

/// General registers at the kernel entry.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    match entry.mode {
        // 64-bit boot protocol: RSI holds the zero page.
        EntryMode::Long => kvm_regs {
            rflags: 0x2,
            rip: entry.addr,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        // PVH: EBX holds the start info; interrupts off.
        EntryMode::Protected32 => kvm_regs {
            rflags: 0x2,
            rip: entry.addr,
            rbx: PVH_INFO_START,
            rsp: BOOT_STACK_POINTER,
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_pins_get_their_delivery_modes() {
        let mut s = kvm_lapic_state::default();
        set_lapic_reg(&mut s, APIC_LVT0, 0x0001_0700);
        set_lint(&mut s);
        assert_eq!(lapic_reg(&s, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&s, APIC_LVT1), 0x400);
        set_lapic_reg(&mut s, APIC_LVT0, 0x0001_0000);
        set_lint(&mut s);
        assert_eq!(lapic_reg(&s, APIC_LVT0), 0x0001_0700);
    }

    #[test]
    fn entry_registers() {
        let r = boot_regs(BootEntry {
            addr: 0x100_0000,
            mode: EntryMode::Long,
        });
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100_0000, ZERO_PAGE_START, 2));
        let r = boot_regs(BootEntry {
            addr: 0x100_01c0,
            mode: EntryMode::Protected32,
        });
        assert_eq!((r.rip, r.rbx), (0x100_01c0, PVH_INFO_START));
    }

    #[test]
    fn msrs_are_the_boot_set() {
        let m = boot_msrs();
        assert!(m
            .iter()
            .any(|e| e.index == MSR_MTRR_DEF_TYPE && e.data == 0x806));
        assert_eq!(m.len(), 11);
    }
}
