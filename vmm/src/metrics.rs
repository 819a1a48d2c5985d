//! Counters the control API reports: vCPU exits by reason, and the moment
//! the first vCPU first entered the guest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

pub use capsid_vmm_api::control::ExitCounts;

/// Exits of one vCPU, by reason.
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port reads.
    pub io_in: AtomicU64,
    /// Port writes.
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// HLT exits (only without an in-kernel LAPIC).
    pub hlt: AtomicU64,
    /// KVM_RUN interrupted by a signal (pause, shutdown).
    pub interrupted: AtomicU64,
    /// Triple faults, failed entries, internal errors, system events.
    pub fatal: AtomicU64,
    /// Anything else.
    pub other: AtomicU64,
}

impl ExitCounters {
    /// Counts one exit.
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> ExitCounts {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ExitCounts {
            io_in: l(&self.io_in),
            io_out: l(&self.io_out),
            mmio_read: l(&self.mmio_read),
            mmio_write: l(&self.mmio_write),
            hlt: l(&self.hlt),
            interrupted: l(&self.interrupted),
            fatal: l(&self.fatal),
            other: l(&self.other),
        }
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds (comparable across processes).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec owned by this frame;
    // clock_gettime only writes it, and CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

static FIRST_KVM_RUN_NS: OnceLock<u64> = OnceLock::new();

/// Records the first KVM_RUN of the VM (only the first call counts) and
/// logs it.
pub fn record_first_kvm_run() {
    let mut first = false;
    let ns = *FIRST_KVM_RUN_NS.get_or_init(|| {
        first = true;
        monotonic_ns()
    });
    if first {
        tracing::info!(monotonic_ns = ns, "first KVM_RUN");
    }
}

/// When the first KVM_RUN happened (CLOCK_MONOTONIC ns), if it has.
pub fn first_kvm_run_ns() -> Option<u64> {
    FIRST_KVM_RUN_NS.get().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_snapshot() {
        let c = ExitCounters::default();
        ExitCounters::count(&c.io_out);
        ExitCounters::count(&c.io_out);
        ExitCounters::count(&c.mmio_read);
        let s = c.snapshot();
        assert_eq!((s.io_out, s.mmio_read, s.io_in), (2, 1, 0));
    }

    #[test]
    fn first_run_is_recorded_once() {
        record_first_kvm_run();
        let a = first_kvm_run_ns().unwrap();
        record_first_kvm_run();
        assert_eq!(first_kvm_run_ns(), Some(a));
        assert!(a <= monotonic_ns());
    }
}
