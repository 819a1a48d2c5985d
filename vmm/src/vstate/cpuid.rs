//! The CPUID a vCPU sees: what KVM supports, with the topology of this VM
//! (one package, one thread per core, APIC id = vCPU index), the
//! hypervisor bit, KVM's paravirtual signature, and no performance
//! monitoring.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// CPUID.1:ECX bit: TSC-deadline LAPIC timer.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:ECX bit: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;
/// CPUID.6:ECX bit: energy-performance bias MSR (not emulated).
const ECX_EPB: u32 = 1 << 3;
/// Leaf 0xb/0x1f level types.
const LEVEL_TYPE_SMT: u32 = 1;
/// Core level.
const LEVEL_TYPE_CORE: u32 = 2;
/// KVM's paravirtual signature leaf.
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// The features leaf that follows it.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

/// Bits needed to number `n` things (ceil(log2 n)).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts one leaf for vCPU `apic_id` of `count`.
fn filter_entry(e: &mut kvm_cpuid_entry2, apic_id: u8, count: u8, tsc_deadline: bool) {
    let id = u32::from(apic_id);
    let n = u32::from(count.max(1));
    match e.function {
        0x1 => {
            e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (n << 16);
            e.ecx |= ECX_HYPERVISOR;
            if tsc_deadline {
                e.ecx |= ECX_TSC_DEADLINE;
            } else {
                e.ecx &= !ECX_TSC_DEADLINE;
            }
            if n > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        0x4 => {
            // Cores per package - 1 in 31:26; logical processors sharing
            // the cache - 1 in 25:14 (the last level is shared by all).
            let level = (e.eax >> 5) & 0x7;
            let sharing = if level >= 3 { n - 1 } else { 0 };
            e.eax = (e.eax & 0x3fff) | ((n - 1).min(63) << 26) | (sharing.min(0xfff) << 14);
        }
        0x6 => e.ecx &= !ECX_EPB,
        // No PMU: the guest must not program counters KVM does not offer.
        0xa => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        0xb | 0x1f => {
            e.edx = id;
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                }
                1 => {
                    e.eax = bits_for(n);
                    e.ebx = n;
                    e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        KVM_CPUID_SIGNATURE => {
            e.eax = e.eax.max(KVM_CPUID_FEATURES);
            e.ebx = u32::from_le_bytes(*b"KVMK");
            e.ecx = u32::from_le_bytes(*b"VMKV");
            e.edx = u32::from_le_bytes(*b"M\0\0\0");
        }
        _ => {}
    }
}

/// The CPUID for vCPU `apic_id` of `count`, from KVM's supported set.
pub fn vcpu_cpuid(supported: &CpuId, apic_id: u8, count: u8, tsc_deadline: bool) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        filter_entry(e, apic_id, count, tsc_deadline);
    }
    // Every leaf-0xb sub-leaf the topology names must be there.
    for index in [0u32, 1] {
        let has_leaf = cpuid.as_slice().iter().any(|e| e.function == 0xb);
        let has = cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == 0xb && e.index == index);
        if has_leaf && !has {
            let mut e = kvm_cpuid_entry2 {
                function: 0xb,
                index,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            };
            filter_entry(&mut e, apic_id, count, tsc_deadline);
            // A full table keeps what KVM gave: the guest then sees the
            // host's topology leaf, which is still self-consistent.
            let _ = cpuid.push(e);
        }
    }
    if !cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == KVM_CPUID_SIGNATURE)
    {
        let mut e = kvm_cpuid_entry2 {
            function: KVM_CPUID_SIGNATURE,
            ..Default::default()
        };
        filter_entry(&mut e, apic_id, count, tsc_deadline);
        let _ = cpuid.push(e);
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn topology_and_identity() {
        let mut leaf1 = entry(1, 0);
        leaf1.ebx = 0x0008_0800;
        let mut l3 = entry(4, 3);
        l3.eax = (3 << 5) | 0x1;
        let supported =
            CpuId::from_entries(&[leaf1, entry(4, 0), l3, entry(0xa, 0), entry(0xb, 0)]).unwrap();
        let c = vcpu_cpuid(&supported, 2, 3, true);
        let e = find(&c, 1, 0);
        assert_eq!(e.ebx >> 24, 2);
        assert_eq!((e.ebx >> 16) & 0xff, 3);
        assert_eq!((e.ebx >> 8) & 0xff, 8);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
        assert_eq!(find(&c, 4, 3).eax >> 26, 2);
        assert_eq!((find(&c, 4, 3).eax >> 14) & 0xfff, 2);
        assert_eq!((find(&c, 4, 0).eax >> 14) & 0xfff, 0);
        let core = find(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 3, 2, 2));
        let smt = find(&c, 0xb, 0);
        assert_eq!((smt.ebx, smt.ecx >> 8), (1, 1));
        let kvm = find(&c, KVM_CPUID_SIGNATURE, 0);
        assert_eq!(&kvm.ebx.to_le_bytes(), b"KVMK");
        assert_eq!(find(&c, 0xa, 0).eax, 0);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut leaf1 = entry(1, 0);
        leaf1.edx = EDX_HTT;
        let supported = CpuId::from_entries(&[leaf1]).unwrap();
        let c = vcpu_cpuid(&supported, 0, 1, false);
        assert_eq!(find(&c, 1, 0).edx & EDX_HTT, 0);
        assert_eq!(find(&c, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(32), 5);
    }
}
