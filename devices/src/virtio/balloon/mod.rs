//! virtio-balloon, the memory balloon (virtio 1.2, section 5.5).
//!
//! The host sets a target (`num_pages`); the driver gives pages back on the
//! inflate queue and takes them again on the deflate queue. Pages given
//! back are discarded from the host mapping of guest RAM
//! (`madvise(MADV_DONTNEED)`, or `MADV_REMOVE` when RAM is a shared memfd),
//! so the host's resident memory drops; a page the guest touches again
//! after deflating is faulted in afresh. The
//! statistics queue reports guest memory figures; free page reporting hands
//! the host blocks the guest's allocator holds free, which are discarded
//! the same way.
//!
//! `request` is the queue logic (no fds), `discard` the one place that
//! touches the host mapping, `device` the model.

mod device;
mod discard;
mod request;

pub use device::{mib_to_pages, Balloon, BalloonConfig, BalloonState, BALLOON_QUEUE_SIZE};
pub use discard::{HostDiscarder, PageDiscarder};
pub use request::{
    process_deflate, process_inflate, process_reporting, BalloonCounters, BalloonStats, StatsQueue,
};

/// Virtio device id of the memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;

/// The host must be told before pages are used again (not offered: the
/// host needs no notice).
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u64 = 1 << 0;
/// A statistics queue is present.
pub const VIRTIO_BALLOON_F_STATS_VQ: u64 = 1 << 1;
/// The guest may deflate the balloon when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// Free page hinting (not offered).
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u64 = 1 << 3;
/// Page poisoning (not offered).
pub const VIRTIO_BALLOON_F_PAGE_POISON: u64 = 1 << 4;
/// Free page reporting: a reporting queue is present.
pub const VIRTIO_BALLOON_F_PAGE_REPORTING: u64 = 1 << 5;

/// Balloon page frame numbers count 4 KiB pages, whatever the guest's page
/// size.
pub const VIRTIO_BALLOON_PFN_SHIFT: u32 = 12;
/// Bytes per balloon page.
pub const BALLOON_PAGE_SIZE: u64 = 1 << VIRTIO_BALLOON_PFN_SHIFT;

/// Statistics tags (section 5.5.6.3).
pub const VIRTIO_BALLOON_S_SWAP_IN: u16 = 0;
/// Bytes swapped out.
pub const VIRTIO_BALLOON_S_SWAP_OUT: u16 = 1;
/// Major page faults.
pub const VIRTIO_BALLOON_S_MAJFLT: u16 = 2;
/// Minor page faults.
pub const VIRTIO_BALLOON_S_MINFLT: u16 = 3;
/// Free memory in bytes.
pub const VIRTIO_BALLOON_S_MEMFREE: u16 = 4;
/// Total memory in bytes.
pub const VIRTIO_BALLOON_S_MEMTOT: u16 = 5;
/// Available memory in bytes (as in /proc/meminfo MemAvailable).
pub const VIRTIO_BALLOON_S_AVAIL: u16 = 6;
/// Disk caches in bytes.
pub const VIRTIO_BALLOON_S_CACHES: u16 = 7;
/// Successful hugetlb allocations.
pub const VIRTIO_BALLOON_S_HTLB_PGALLOC: u16 = 8;
/// Failed hugetlb allocations.
pub const VIRTIO_BALLOON_S_HTLB_PGFAIL: u16 = 9;

/// Bytes of one statistics entry: a u16 tag and a u64 value, packed.
pub const STAT_ENTRY_LEN: usize = 10;
/// Statistics entries read from one buffer at most; the spec defines ten
/// tags, so a longer buffer is the guest's noise.
pub const MAX_STAT_ENTRIES: usize = 32;

/// Errors of the balloon device.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// A queue's rings could not be accessed.
    #[error("virtqueue access failed")]
    Queue(#[source] virtio_queue::Error),
    /// Discarding host memory failed.
    #[error("cannot discard {len} bytes of guest memory at {addr:#x}")]
    Discard {
        /// Guest-physical address.
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The range is not inside guest memory.
    #[error("range of {len} bytes at {addr:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest-physical address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The statistics timer could not be created or armed.
    #[error("statistics timer")]
    Timer(#[source] std::io::Error),
}

/// Result of balloon operations.
pub type Result<T> = std::result::Result<T, BalloonError>;
