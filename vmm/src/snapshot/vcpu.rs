//! One vCPU's state in a snapshot: what KVM holds for it, read on the
//! vCPU's own thread (the fd lives there) while the VM is paused, and
//! written back on a fresh vCPU before it first runs. The orders of both
//! follow KVM's dependencies (as Firecracker and QEMU keep them): the MP
//! state is read first because reading it makes the LAPIC accept pending
//! INIT/SIPI events; on restore CPUID comes first, the LAPIC after the
//! special registers (they hold the APIC base) and before the MSRs (the
//! TSC deadline is only accepted by a configured LAPIC), the TSC deadline
//! after the TSC, and the vCPU events last (setting the registers clears
//! pending exceptions, which the events bring back).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, kvm_xsave2, CpuId, Msrs, Xsave,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::vstate::arch::MSR_IA32_TSC;

/// TSC-deadline timer MSR: restored after the TSC (see the module).
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// 32-bit words of `struct kvm_xsave` without its flexible array.
const XSAVE_WORDS: usize = std::mem::size_of::<kvm_xsave>() / 4;
/// TSC frequencies within 250 parts per million are the same clock (as
/// QEMU and Firecracker allow: calibration differs between boots).
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

/// Errors reading or writing a vCPU's state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM ioctl on the vCPU failed.
    #[error("vCPU {index}: {what} failed")]
    Ioctl {
        /// The vCPU.
        index: u8,
        /// Which ioctl.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused one of the saved MSRs.
    #[error("vCPU {index}: KVM refused saved MSR {msr:#x}")]
    Msr {
        /// The vCPU.
        index: u8,
        /// The MSR.
        msr: u32,
    },
    /// A saved list does not fit KVM's structures.
    #[error("vCPU {index}: the saved {what} does not fit KVM's structure")]
    Size {
        /// The vCPU.
        index: u8,
        /// CPUID, MSRs or XSAVE area.
        what: &'static str,
    },
    /// The guest stopped while its pending exit was completed.
    #[error("vCPU {index}: the guest stopped while its state was saved ({why})")]
    Stopped {
        /// The vCPU.
        index: u8,
        /// What it did.
        why: String,
    },
}

/// Result of vCPU state operations.
pub type Result<T> = std::result::Result<T, VcpuStateError>;

/// What this host's KVM lets a snapshot read and write of a vCPU, found
/// once per VM (the MSR list is a /dev/kvm ioctl, which vCPU threads
/// cannot make under their seccomp filter).
#[derive(Debug, Clone, Default)]
pub struct StateCaps {
    /// The MSRs KVM can save and restore (KVM_GET_MSR_INDEX_LIST).
    pub msrs: Vec<u32>,
    /// Bytes of the XSAVE area (KVM_CAP_XSAVE2; 4096 without it).
    pub xsave_size: usize,
    /// KVM_GET_XSAVE2 is there.
    pub xsave2: bool,
    /// KVM_GET_XCRS is there.
    pub xcrs: bool,
}

impl StateCaps {
    /// Asks `kvm`.
    pub fn probe(kvm: &Kvm) -> std::result::Result<Self, kvm_ioctls::Error> {
        let msrs = kvm.get_msr_index_list()?.as_slice().to_vec();
        let xsave2_size = usize::try_from(kvm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
        Ok(Self {
            msrs,
            xsave_size: xsave2_size.max(std::mem::size_of::<kvm_xsave>()),
            xsave2: xsave2_size > 0,
            xcrs: kvm.check_extension(Cap::Xcrs),
        })
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// Its index (APIC id).
    pub index: u8,
    /// The CPUID it was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Running, halted, waiting for SIPI…
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segments, control registers, descriptor tables, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// The XSAVE area (FPU, SSE, AVX…) as KVM lays it out, in 32-bit
    /// words: the 4 KiB of `struct kvm_xsave`, then what KVM_CAP_XSAVE2
    /// adds.
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0), where KVM has them.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM could read, in KVM's order, the TSC deadline last.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub vcpu_events: kvm_vcpu_events,
    /// The TSC frequency the guest calibrated against, when KVM says.
    pub tsc_khz: Option<u32>,
}

fn ioctl(index: u8, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Ioctl {
        index,
        what,
        source,
    }
}

/// Reads vCPU `index`'s state from `fd` (its thread, the VM paused and
/// the vCPU's last exit completed), with `cpuid` the CPUID it was given.
pub fn save(
    index: u8,
    fd: &VcpuFd,
    cpuid: &[kvm_cpuid_entry2],
    caps: &StateCaps,
) -> Result<VcpuState> {
    let mp_state = fd
        .get_mp_state()
        .map_err(ioctl(index, "KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(ioctl(index, "KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(ioctl(index, "KVM_GET_SREGS"))?;
    let xsave = save_xsave(index, fd, caps)?;
    let xcrs = if caps.xcrs {
        Some(fd.get_xcrs().map_err(ioctl(index, "KVM_GET_XCRS"))?)
    } else {
        None
    };
    let debugregs = fd
        .get_debug_regs()
        .map_err(ioctl(index, "KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(ioctl(index, "KVM_GET_LAPIC"))?;
    let msrs = save_msrs(index, fd, &caps.msrs)?;
    let vcpu_events = fd
        .get_vcpu_events()
        .map_err(ioctl(index, "KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        index,
        cpuid: cpuid.to_vec(),
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        vcpu_events,
        tsc_khz: fd.get_tsc_khz().ok(),
    })
}

fn save_xsave(index: u8, fd: &VcpuFd, caps: &StateCaps) -> Result<Vec<u32>> {
    if !caps.xsave2 {
        let xsave = fd.get_xsave().map_err(ioctl(index, "KVM_GET_XSAVE"))?;
        return Ok(xsave.region.to_vec());
    }
    let extra = caps.xsave_size.saturating_sub(XSAVE_WORDS * 4).div_ceil(4);
    let mut xsave = Xsave::new(extra).map_err(|_| VcpuStateError::Size {
        index,
        what: "XSAVE area",
    })?;
    // SAFETY: `xsave` holds `caps.xsave_size` bytes, what KVM_CAP_XSAVE2
    // says KVM_GET_XSAVE2 writes at most.
    unsafe { fd.get_xsave2(&mut xsave) }.map_err(ioctl(index, "KVM_GET_XSAVE2"))?;
    let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(xsave.as_slice());
    Ok(words)
}

/// Reads `list` in chunks KVM takes; an MSR that KVM lists but cannot
/// read for this vCPU (its CPUID lacks the feature) is left out, and
/// nothing depends on it since the guest cannot use it either.
fn save_msrs(index: u8, fd: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut saved = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::Size {
            index,
            what: "MSR list",
        })?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(ioctl(index, "KVM_GET_MSRS"))?;
        saved.extend_from_slice(&msrs.as_slice()[..read.min(chunk.len())]);
        // KVM stops at the first MSR it cannot read: skip that one.
        let skip = if read < chunk.len() {
            tracing::debug!(
                vcpu = index,
                msr = format_args!("{:#x}", chunk[read]),
                "MSR not saved: KVM cannot read it"
            );
            1
        } else {
            0
        };
        rest = &rest[(read + skip).min(rest.len())..];
    }
    Ok(order_msrs(saved))
}

/// The TSC deadline goes last, after the TSC it is compared with. A
/// deadline of 0 (timer disarmed as the snapshot was taken, its interrupt
/// not delivered yet) is set to the TSC, so that a guest whose timer was
/// just due gets its interrupt instead of waiting for ever (Firecracker
/// saw vCPUs never get another timer interrupt otherwise).
fn order_msrs(mut msrs: Vec<kvm_msr_entry>) -> Vec<kvm_msr_entry> {
    let tsc = msrs
        .iter()
        .find(|m| m.index == MSR_IA32_TSC)
        .map(|m| m.data);
    let mut deadline: Vec<kvm_msr_entry> = Vec::new();
    msrs.retain(|m| {
        if m.index == MSR_IA32_TSC_DEADLINE {
            deadline.push(*m);
            false
        } else {
            true
        }
    });
    for mut m in deadline {
        if m.data == 0 {
            if let Some(tsc) = tsc {
                m.data = tsc;
            }
        }
        msrs.push(m);
    }
    msrs
}

/// The CPUID of a state, as KVM takes it.
pub fn cpuid(state: &VcpuState) -> Result<CpuId> {
    CpuId::from_entries(&state.cpuid).map_err(|_| VcpuStateError::Size {
        index: state.index,
        what: "CPUID",
    })
}

/// Writes `state` into a fresh vCPU `fd` that has not run.
pub fn restore(fd: &VcpuFd, state: &VcpuState, caps: &StateCaps) -> Result<()> {
    let index = state.index;
    fd.set_cpuid2(&cpuid(state)?)
        .map_err(ioctl(index, "KVM_SET_CPUID2"))?;
    if let Some(saved) = state.tsc_khz {
        // The guest calibrated its clocks against this frequency: keep it
        // where this host's differs (KVM scales the TSC).
        let here = fd.get_tsc_khz().map_err(ioctl(index, "KVM_GET_TSC_KHZ"))?;
        if u64::from(here.abs_diff(saved)) * 1_000_000 > u64::from(saved) * TSC_KHZ_TOLERANCE_PPM {
            fd.set_tsc_khz(saved)
                .map_err(ioctl(index, "KVM_SET_TSC_KHZ"))?;
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(ioctl(index, "KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs)
        .map_err(ioctl(index, "KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs)
        .map_err(ioctl(index, "KVM_SET_SREGS"))?;
    restore_xsave(index, fd, &state.xsave, caps)?;
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs).map_err(ioctl(index, "KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&state.debugregs)
        .map_err(ioctl(index, "KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic)
        .map_err(ioctl(index, "KVM_SET_LAPIC"))?;
    for chunk in state.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(|_| VcpuStateError::Size {
            index,
            what: "MSR list",
        })?;
        let set = fd.set_msrs(&msrs).map_err(ioctl(index, "KVM_SET_MSRS"))?;
        if set < chunk.len() {
            return Err(VcpuStateError::Msr {
                index,
                msr: chunk[set].index,
            });
        }
    }
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(ioctl(index, "KVM_SET_VCPU_EVENTS"))
}

fn restore_xsave(index: u8, fd: &VcpuFd, words: &[u32], caps: &StateCaps) -> Result<()> {
    let size_err = || VcpuStateError::Size {
        index,
        what: "XSAVE area",
    };
    let (region, extra) = (words.get(..XSAVE_WORDS), words.get(XSAVE_WORDS..));
    let (Some(region), Some(extra)) = (region, extra) else {
        return Err(size_err());
    };
    let mut header = kvm_xsave2::default();
    header.xsave.region.copy_from_slice(region);
    let mut xsave = Xsave::from_header(header).map_err(|_| size_err())?;
    // KVM_SET_XSAVE reads as many bytes as this host's XSAVE area has,
    // whatever the saved one had: the buffer is at least that long.
    let here = caps.xsave_size.saturating_sub(XSAVE_WORDS * 4).div_ceil(4);
    for i in 0..extra.len().max(here) {
        xsave
            .push(extra.get(i).copied().unwrap_or(0))
            .map_err(|_| size_err())?;
    }
    // SAFETY: `xsave` is at least `caps.xsave_size` bytes, all that
    // KVM_SET_XSAVE reads on this host, and holds what KVM wrote for a
    // vCPU of the same configuration (a snapshot's checksum guards it; KVM
    // checks the header it reads).
    unsafe { fd.set_xsave2(&xsave) }.map_err(ioctl(index, "KVM_SET_XSAVE"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msr(index: u32, data: u64) -> kvm_msr_entry {
        kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }
    }

    #[test]
    fn tsc_deadline_goes_last_and_never_stays_zero() {
        let out = order_msrs(vec![
            msr(MSR_IA32_TSC_DEADLINE, 0),
            msr(MSR_IA32_TSC, 1234),
            msr(0x1b, 5),
        ]);
        let got: Vec<(u32, u64)> = out.iter().map(|m| (m.index, m.data)).collect();
        assert_eq!(
            got,
            vec![
                (MSR_IA32_TSC, 1234),
                (0x1b, 5),
                (MSR_IA32_TSC_DEADLINE, 1234)
            ]
        );
        let out = order_msrs(vec![msr(MSR_IA32_TSC_DEADLINE, 99), msr(MSR_IA32_TSC, 1)]);
        assert_eq!(out[1].data, 99);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[0x20] = 7;
        let state = VcpuState {
            index: 1,
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0x806f8,
                ..Default::default()
            }],
            mp_state: kvm_mp_state { mp_state: 2 },
            regs: kvm_regs {
                rip: 0x10_0000,
                rax: u64::MAX,
                ..Default::default()
            },
            sregs: kvm_sregs::default(),
            xsave: vec![0x37f; XSAVE_WORDS + 3],
            xcrs: None,
            debugregs: kvm_debugregs::default(),
            lapic,
            msrs: vec![msr(MSR_IA32_TSC, 42)],
            vcpu_events: kvm_vcpu_events::default(),
            tsc_khz: Some(2_000_000),
        };
        let json = serde_json::to_string(&state).unwrap();
        let back: VcpuState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.regs.rip, 0x10_0000);
        assert_eq!(back.regs.rax, u64::MAX);
        assert_eq!(back.lapic.regs[0x20], 7);
        assert_eq!(back.xsave.len(), XSAVE_WORDS + 3);
        assert_eq!(back.msrs[0].data, 42);
        assert_eq!(back.cpuid[0].eax, 0x806f8);
        assert_eq!(back.mp_state.mp_state, 2);
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
    }
}
