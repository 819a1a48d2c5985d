//! Fuzzes the balloon's queue logic: the input is guest memory holding four
//! split queues (inflate, deflate, statistics, free page reporting) and
//! whatever their descriptors point at. The statistics buffers are read,
//! held and given back on request; page frame arrays and reported ranges
//! are checked and discarded. Nothing may panic, whatever the rings say,
//! and nothing may be discarded that is not page-aligned guest RAM.

#![no_main]

use capsid_devices::virtio::balloon::{
    process_deflate, process_inflate, process_reporting, BalloonCounters, HostDiscarder,
    PageDiscarder, StatsQueue, BALLOON_PAGE_SIZE,
};
use capsid_fuzz::queue;
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Four balloon pages: the rings and buffers fit in the first, and a page
/// frame array spanning all of memory stays cheap to walk.
const MEM_SIZE: usize = 0x4000;
/// Ring layouts (descriptor table, available ring, used ring) per queue.
const INFLATE: (u32, u32, u32) = (0x0, 0x100, 0x200);
const DEFLATE: (u32, u32, u32) = (0x400, 0x500, 0x600);
const STATS: (u32, u32, u32) = (0x800, 0x900, 0xa00);
const REPORTING: (u32, u32, u32) = (0xc00, 0xd00, 0xe00);

/// Checks every discard, then maybe really discards (`madvise` on the
/// fuzzer's own guest memory).
struct CheckingDiscarder {
    real: bool,
}

impl PageDiscarder for CheckingDiscarder {
    fn discard(
        &mut self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: u64,
    ) -> capsid_devices::virtio::balloon::Result<()> {
        assert!(len > 0, "empty discard at {addr:?}");
        assert!(
            addr.0.is_multiple_of(BALLOON_PAGE_SIZE) && len.is_multiple_of(BALLOON_PAGE_SIZE),
            "unaligned discard of {len:#x} bytes at {addr:?}"
        );
        let len_usize = usize::try_from(len).expect("discard length fits usize");
        assert!(
            mem.check_range(addr, len_usize),
            "discard of {len:#x} bytes at {addr:?} is outside guest memory"
        );
        if self.real {
            HostDiscarder.discard(mem, addr, len)
        } else {
            Ok(())
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, image)) = data.split_first() else {
        return;
    };
    let mem = capsid_fuzz::guest_memory(image, MEM_SIZE);
    let event_idx = control & 1 != 0;
    let mut counters = BalloonCounters::default();
    let mut discarder = CheckingDiscarder {
        real: control & 2 != 0,
    };

    // Statistics first: the buffer is read and held, given back on request,
    // and the queue is served again as after the driver's next kick.
    let mut stats_queue = queue(STATS, event_idx);
    let mut stats = StatsQueue::default();
    let _ = stats.process(&mut stats_queue, &mem, &mut counters);
    if control & 4 != 0 {
        let _ = stats.request(&mut stats_queue, &mem);
        let _ = stats.process(&mut stats_queue, &mem, &mut counters);
    }
    let held = stats.has_buffer();
    let _ = stats.request(&mut stats_queue, &mem);
    assert!(!stats.has_buffer());
    if !held {
        assert!(!stats.request(&mut stats_queue, &mem).unwrap_or(false));
    }

    let mut inflate = queue(INFLATE, event_idx);
    let _ = process_inflate(&mut inflate, &mem, &mut discarder, &mut counters);
    let mut deflate = queue(DEFLATE, event_idx);
    let _ = process_deflate(&mut deflate, &mem, &mut counters);
    let mut reporting = queue(REPORTING, event_idx);
    let _ = process_reporting(&mut reporting, &mem, &mut discarder, &mut counters);

    assert!(counters.reported_bytes.is_multiple_of(BALLOON_PAGE_SIZE));
});
