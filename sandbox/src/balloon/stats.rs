//! The guest's balloon statistics (virtio spec 5.5.6.3, "Memory Statistics
//! Tags"), and their sanitizing: the figures come from the guest, which may
//! lie, so every value is range-checked against the VM's memory before the
//! policy sees it, and an inconsistent report is marked unusable.

use serde::{Deserialize, Serialize};

use super::MIB;

/// Statistics as the VMM relayed them: bytes for memory, counts for
/// events; `None` for what the guest did not report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawStats {
    /// VIRTIO_BALLOON_S_SWAP_IN (bytes).
    pub swap_in: Option<u64>,
    /// VIRTIO_BALLOON_S_SWAP_OUT (bytes).
    pub swap_out: Option<u64>,
    /// VIRTIO_BALLOON_S_MAJFLT.
    pub major_faults: Option<u64>,
    /// VIRTIO_BALLOON_S_MINFLT.
    pub minor_faults: Option<u64>,
    /// VIRTIO_BALLOON_S_MEMFREE.
    pub free: Option<u64>,
    /// VIRTIO_BALLOON_S_MEMTOT.
    pub total: Option<u64>,
    /// VIRTIO_BALLOON_S_AVAIL.
    pub available: Option<u64>,
    /// VIRTIO_BALLOON_S_CACHES.
    pub caches: Option<u64>,
    /// When the VMM last received a report (Unix seconds), if it says.
    pub last_update: Option<u64>,
}

/// The guest's memory as the policy may use it, in MiB (events as counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMemStats {
    /// The report is complete and consistent: total, free, available and
    /// caches present, total within the VM's memory, free, available and
    /// caches within total. Otherwise the policy takes nothing from this
    /// guest on the strength of its numbers.
    pub valid: bool,
    /// Guest RAM the guest kernel manages, MiB.
    pub total_mib: u64,
    /// Free, MiB.
    pub free_mib: u64,
    /// Available (free + reclaimable), MiB.
    pub available_mib: u64,
    /// Page cache and buffers, MiB.
    pub caches_mib: u64,
    /// Major faults since boot.
    pub major_faults: Option<u64>,
    /// Minor faults since boot.
    pub minor_faults: Option<u64>,
    /// Bytes swapped in since boot.
    pub swap_in: Option<u64>,
    /// Bytes swapped out since boot.
    pub swap_out: Option<u64>,
    /// Seconds since the guest last reported, when the VMM says.
    pub age_s: Option<u64>,
}

impl GuestMemStats {
    /// MiB the guest could give up without touching its working set: its
    /// free memory plus its caches (0 for an unusable report).
    pub fn reclaimable_mib(&self) -> u64 {
        if !self.valid {
            return 0;
        }
        self.free_mib
            .saturating_add(self.caches_mib)
            .min(self.total_mib)
    }

    /// MiB the guest's processes and kernel use (total - available), not
    /// counting `balloon_mib` held by the balloon (with deflate-on-oom the
    /// guest counts balloon pages as used). `None` for an unusable report.
    pub fn working_set_mib(&self, balloon_mib: u64) -> Option<u64> {
        self.valid.then(|| {
            self.total_mib
                .saturating_sub(self.available_mib)
                .saturating_sub(balloon_mib)
        })
    }
}

/// Range-checks a report against a VM of `assigned_mib`.
pub fn sanitize(raw: &RawStats, assigned_mib: u32) -> GuestMemStats {
    let limit = u64::from(assigned_mib) * MIB;
    // A counter of absurd size is dropped rather than believed.
    let event = |v: Option<u64>| v.filter(|&v| v < (1 << 56));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut s = GuestMemStats {
        valid: false,
        age_s: raw.last_update.map(|t| now.saturating_sub(t)),
        major_faults: event(raw.major_faults),
        minor_faults: event(raw.minor_faults),
        swap_in: event(raw.swap_in),
        swap_out: event(raw.swap_out),
        ..GuestMemStats::default()
    };
    let (Some(total), Some(free), Some(available), Some(caches)) =
        (raw.total, raw.free, raw.available, raw.caches)
    else {
        return s;
    };
    let consistent =
        total > 0 && total <= limit && free <= total && available <= total && caches <= total;
    // (Free may exceed available: the kernel keeps reserves out of
    // MemAvailable.)
    if !consistent {
        tracing::debug!(
            ?raw,
            assigned_mib,
            "guest balloon statistics are inconsistent"
        );
        return s;
    }
    s.valid = true;
    s.total_mib = total / MIB;
    s.free_mib = free / MIB;
    s.available_mib = available / MIB;
    s.caches_mib = caches / MIB;
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(total: u64, free: u64, available: u64, caches: u64) -> RawStats {
        RawStats {
            total: Some(total * MIB),
            free: Some(free * MIB),
            available: Some(available * MIB),
            caches: Some(caches * MIB),
            ..RawStats::default()
        }
    }

    #[test]
    fn a_sane_report_passes() {
        let s = sanitize(&report(480, 100, 350, 240), 512);
        assert!(s.valid);
        assert_eq!(s.reclaimable_mib(), 340);
        assert_eq!(s.working_set_mib(0), Some(130));
        assert_eq!(s.working_set_mib(100), Some(30));
        assert_eq!(s.working_set_mib(1000), Some(0));
    }

    #[test]
    fn absurd_reports_are_unusable() {
        for raw in [
            // More memory than the VM has.
            report(100_000, 10, 10, 10),
            // Free, available or caches beyond total.
            report(480, 500, 500, 0),
            report(480, 10, 481, 0),
            report(480, 10, 20, 481),
            // Nothing at all.
            report(0, 0, 0, 0),
            RawStats {
                total: Some(u64::MAX),
                free: Some(u64::MAX),
                available: Some(u64::MAX),
                caches: Some(u64::MAX),
                ..RawStats::default()
            },
            // Missing figures.
            RawStats {
                total: Some(480 * MIB),
                ..RawStats::default()
            },
        ] {
            let s = sanitize(&raw, 512);
            assert!(!s.valid, "{raw:?}");
            assert_eq!(s.reclaimable_mib(), 0, "{raw:?}");
            assert_eq!(s.working_set_mib(0), None, "{raw:?}");
        }
    }

    #[test]
    fn free_above_available_is_normal() {
        // Seen from a real 512 MiB guest: the kernel's reserves are free
        // but not available.
        let raw = RawStats {
            total: Some(515_444_736),
            free: Some(483_160_064),
            available: Some(480_129_024),
            caches: Some(13_754_368),
            ..RawStats::default()
        };
        assert!(sanitize(&raw, 512).valid);
    }

    #[test]
    fn absurd_counters_are_dropped() {
        let mut raw = report(480, 100, 350, 240);
        raw.major_faults = Some(u64::MAX);
        raw.minor_faults = Some(12);
        let s = sanitize(&raw, 512);
        assert!(s.valid);
        assert_eq!(s.major_faults, None);
        assert_eq!(s.minor_faults, Some(12));
    }
}
