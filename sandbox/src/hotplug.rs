//! A VM that may grow boots with only the RAM it uses.
//!
//! A pod's VM (and a pool shape's with `max_memory_mib`) is given its
//! maximum RAM by the VMM, so it can grow without the VMM's help. Booted
//! with all of it, the guest kernel would write a page descriptor (64
//! bytes) for every 4 KiB page of that maximum: 16 MiB of host memory for
//! 1024 MiB, whatever the balloon holds. So such a VM boots with `mem=`
//! what it uses, rounded up to a memory block, and when it grows past that
//! its agent adds the next blocks (guest-agent's hotplug module). The
//! RAM the guest has not added counts, for the balloon, as held in it
//! ([`crate::balloon::BalloonHandle::absent_mib`]), so the pod's reserve,
//! the policy and the over-assignment limit see the same VM as before.

use crate::config::Config;

/// The guest kernel's memory block on x86-64 with less than 64 GiB of RAM:
/// the unit the agent adds.
pub const BLOCK_MIB: u32 = 128;

/// The RAM a VM of `vm_mib` whose guest may use `usable_mib` boots with:
/// `Some` when it boots with less than all of it. Only when
/// `[vm] memory_hotplug` is on, and `vm_mib` is whole blocks (a partial
/// last block could never be added).
pub fn boot_present_mib(config: &Config, vm_mib: u32, usable_mib: u32) -> Option<u32> {
    if !grows_by_hotplug(config, vm_mib) {
        return None;
    }
    let present = present_for(usable_mib);
    (present < vm_mib).then_some(present)
}

/// Whether a VM of `vm_mib` that may grow does so by memory hotplug.
pub fn grows_by_hotplug(config: &Config, vm_mib: u32) -> bool {
    config.vm.memory_hotplug && vm_mib.is_multiple_of(BLOCK_MIB)
}

/// The RAM the guest must have added for `usable_mib` of it to be usable:
/// whole blocks.
pub fn present_for(usable_mib: u32) -> u32 {
    usable_mib.div_ceil(BLOCK_MIB).saturating_mul(BLOCK_MIB)
}

/// The kernel argument that boots the guest with `present_mib`: `mem=`
/// bounds the RAM the kernel takes from the firmware's map by address, and
/// the VMM's RAM starts at 0.
pub fn kernel_arg(present_mib: u32) -> String {
    format!("mem={present_mib}M")
}

/// What the host knows of the guest's RAM: how much of the VM's it has
/// not added, and what the agent last reported of it (its count may leave
/// out RAM no whole block covers, so the host counts by differences).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Absent {
    /// The VM's RAM the guest has not added, MiB: the host's count.
    pub mib: u32,
    /// The agent's count when it last answered, MiB.
    pub reported_mib: u64,
}

impl Absent {
    /// After the agent reported `now_mib` absent (before: `reported_mib`).
    /// A report of more than before (a guest may say anything) changes
    /// nothing; the host's count never goes below 0.
    pub fn after_report(self, now_mib: u64) -> Self {
        let now_mib = now_mib.min(self.reported_mib);
        let added = self.reported_mib - now_mib;
        Self {
            mib: self
                .mib
                .saturating_sub(u32::try_from(added).unwrap_or(u32::MAX)),
            reported_mib: now_mib,
        }
    }

    /// What the agent should leave absent for the guest to have
    /// `present_mib` of a VM of `vm_mib`.
    pub fn keep_for(self, vm_mib: u32, present_mib: u32) -> u64 {
        let wanted = vm_mib.saturating_sub(present_mib);
        let to_add = self.mib.saturating_sub(wanted);
        self.reported_mib.saturating_sub(u64::from(to_add))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_that_may_grow_boots_with_whole_blocks_of_what_it_uses() {
        let mut c = Config::default();
        assert_eq!(boot_present_mib(&c, 1024, 192), Some(256));
        assert_eq!(boot_present_mib(&c, 1024, 256), Some(256));
        assert_eq!(boot_present_mib(&c, 1024, 257), Some(384));
        // Nothing to leave out, or not whole blocks: all of it.
        assert_eq!(boot_present_mib(&c, 1024, 1000), None);
        assert_eq!(boot_present_mib(&c, 1000, 192), None);
        c.vm.memory_hotplug = false;
        assert_eq!(boot_present_mib(&c, 1024, 192), None);
        assert_eq!(kernel_arg(256), "mem=256M");
    }

    #[test]
    fn the_hosts_count_follows_the_agents_by_differences() {
        // 1024 MiB booted at 256: the host counts 768 absent; the agent
        // may count less (RAM no whole block covers).
        let a = Absent {
            mib: 768,
            reported_mib: 700,
        };
        // To have 512, add 256: the agent keeps 444 of its 700.
        assert_eq!(a.keep_for(1024, 512), 444);
        let b = a.after_report(444);
        assert_eq!(b.mib, 512);
        // Already there: add nothing.
        assert_eq!(b.keep_for(1024, 384), 444);
        // A guest that reports more absent than before, or absurd
        // figures, moves nothing the wrong way.
        assert_eq!(b.after_report(10_000), b);
        assert_eq!(b.after_report(0).mib, 68);
        let c = Absent {
            mib: 10,
            reported_mib: u64::MAX,
        };
        assert_eq!(c.after_report(0).mib, 0);
    }
}
