//! The balloon's queues, with no fds or threads: inflate and deflate page
//! frame arrays, free page reports, and the statistics buffer the device
//! holds until it wants fresh figures (virtio 1.2, sections 5.5.6–5.5.6.4).
//!
//! Every page frame number and range comes from the guest and is checked
//! against guest memory before anything is done with it; bad ones are
//! counted and skipped. Arrays are read in small fixed chunks, so no
//! length the guest states makes the host allocate.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::Address;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::discard::PageDiscarder;
use super::{
    BalloonError, Result, BALLOON_PAGE_SIZE, MAX_STAT_ENTRIES, STAT_ENTRY_LEN,
    VIRTIO_BALLOON_PFN_SHIFT, VIRTIO_BALLOON_S_AVAIL, VIRTIO_BALLOON_S_CACHES,
    VIRTIO_BALLOON_S_HTLB_PGALLOC, VIRTIO_BALLOON_S_HTLB_PGFAIL, VIRTIO_BALLOON_S_MAJFLT,
    VIRTIO_BALLOON_S_MEMFREE, VIRTIO_BALLOON_S_MEMTOT, VIRTIO_BALLOON_S_MINFLT,
    VIRTIO_BALLOON_S_SWAP_IN, VIRTIO_BALLOON_S_SWAP_OUT,
};

/// Page frame numbers read from guest memory at a time.
const PFN_CHUNK: usize = 256;

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// What the balloon has done since start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BalloonCounters {
    /// Pages the guest gave back (inflate), each discarded on the host.
    pub inflated_pages: u64,
    /// Pages the guest took back (deflate).
    pub deflated_pages: u64,
    /// Page frame numbers outside guest memory, skipped.
    pub invalid_pfns: u64,
    /// Bytes of free page reports discarded on the host.
    pub reported_bytes: u64,
    /// Reported ranges outside guest memory or unaligned, skipped.
    pub invalid_reports: u64,
    /// Discards the host refused.
    pub discard_failures: u64,
    /// Chains with device-writable buffers where readable ones belong, or
    /// pointing outside guest memory.
    pub malformed_chains: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
}

/// The guest's memory statistics, as last reported; a figure the guest did
/// not report is `None`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BalloonStats {
    /// Bytes swapped in.
    pub swap_in: Option<u64>,
    /// Bytes swapped out.
    pub swap_out: Option<u64>,
    /// Major page faults.
    pub major_faults: Option<u64>,
    /// Minor page faults.
    pub minor_faults: Option<u64>,
    /// Free memory, bytes.
    pub free_memory: Option<u64>,
    /// Total memory, bytes.
    pub total_memory: Option<u64>,
    /// Available memory, bytes.
    pub available_memory: Option<u64>,
    /// Disk caches, bytes.
    pub disk_caches: Option<u64>,
    /// Successful hugetlb page allocations.
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb page allocations.
    pub hugetlb_failures: Option<u64>,
}

impl BalloonStats {
    fn set(&mut self, tag: u16, value: u64) {
        let slot = match tag {
            VIRTIO_BALLOON_S_SWAP_IN => &mut self.swap_in,
            VIRTIO_BALLOON_S_SWAP_OUT => &mut self.swap_out,
            VIRTIO_BALLOON_S_MAJFLT => &mut self.major_faults,
            VIRTIO_BALLOON_S_MINFLT => &mut self.minor_faults,
            VIRTIO_BALLOON_S_MEMFREE => &mut self.free_memory,
            VIRTIO_BALLOON_S_MEMTOT => &mut self.total_memory,
            VIRTIO_BALLOON_S_AVAIL => &mut self.available_memory,
            VIRTIO_BALLOON_S_CACHES => &mut self.disk_caches,
            VIRTIO_BALLOON_S_HTLB_PGALLOC => &mut self.hugetlb_allocations,
            VIRTIO_BALLOON_S_HTLB_PGFAIL => &mut self.hugetlb_failures,
            // Tags from a newer spec are ignored.
            _ => return,
        };
        *slot = Some(value);
    }
}

/// Serves every available chain of `queue` with `f` (which returns the
/// used length), re-enabling notifications the way event-index drivers
/// need. Returns whether the driver must be notified.
fn drain<F>(queue: &mut Queue, mem: &GuestMemoryMmap, mut f: F) -> Result<bool>
where
    F: FnMut(Chain<'_>) -> u32,
{
    let mut used = 0u64;
    loop {
        queue
            .disable_notification(mem)
            .map_err(BalloonError::Queue)?;
        let mut popped = 0u64;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            popped += 1;
            let head = chain.head_index();
            let len = f(chain);
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::debug!(error = %e, head, "balloon: cannot return chain");
                continue;
            }
            used += 1;
        }
        // A ring that reports work but yields none would make this spin.
        if popped == 0 {
            queue
                .enable_notification(mem)
                .map_err(BalloonError::Queue)?;
            break;
        }
        if !queue
            .enable_notification(mem)
            .map_err(BalloonError::Queue)?
        {
            break;
        }
        if !crate::virtio::avail_ring_sane(queue, mem).map_err(BalloonError::Queue)? {
            tracing::warn!(
                "balloon: available ring index runs more than a queue ahead; queue ignored"
            );
            break;
        }
    }
    Ok(used > 0 && queue.needs_notification(mem).map_err(BalloonError::Queue)?)
}

/// Calls `f` with every page frame number in the chain's device-readable
/// buffers, in order. False when the chain is malformed (a device-writable
/// buffer, or one outside guest memory); the numbers before the fault have
/// been passed on.
fn for_each_pfn(chain: Chain<'_>, mem: &GuestMemoryMmap, mut f: impl FnMut(u32)) -> bool {
    let mut raw = [0u8; PFN_CHUNK * 4];
    for desc in chain {
        if desc.is_write_only() {
            return false;
        }
        let count = desc.len() as usize / 4;
        let mut done = 0usize;
        while done < count {
            let n = (count - done).min(PFN_CHUNK);
            let Some(addr) = desc.addr().checked_add(done as u64 * 4) else {
                return false;
            };
            let buf = &mut raw[..n * 4];
            if mem.read_slice(buf, addr).is_err() {
                return false;
            }
            for bytes in buf.chunks_exact(4) {
                f(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]));
            }
            done += n;
        }
    }
    true
}

/// A run of contiguous pages waiting to be discarded.
#[derive(Debug, Default)]
struct Run {
    start: u64,
    pages: u64,
}

impl Run {
    /// Adds page frame `pfn`; returns the run that ended, if it did.
    fn push(&mut self, pfn: u64) -> Option<Run> {
        if self.pages > 0 && self.start + self.pages == pfn {
            self.pages += 1;
            return None;
        }
        let ended = std::mem::replace(
            self,
            Run {
                start: pfn,
                pages: 1,
            },
        );
        (ended.pages > 0).then_some(ended)
    }
}

fn discard_run(
    run: Run,
    mem: &GuestMemoryMmap,
    discarder: &mut dyn PageDiscarder,
    counters: &mut BalloonCounters,
) {
    let addr = GuestAddress(run.start << VIRTIO_BALLOON_PFN_SHIFT);
    let len = run.pages * BALLOON_PAGE_SIZE;
    if let Err(e) = discarder.discard(mem, addr, len) {
        counters.discard_failures += 1;
        tracing::warn!(error = %crate::describe(&e), "balloon: discard failed");
    }
}

/// Whether page frame `pfn` is guest RAM.
fn pfn_valid(mem: &GuestMemoryMmap, pfn: u32) -> bool {
    let addr = GuestAddress(u64::from(pfn) << VIRTIO_BALLOON_PFN_SHIFT);
    mem.check_range(addr, 1 << VIRTIO_BALLOON_PFN_SHIFT)
}

/// Serves the inflate queue: every page listed is discarded on the host.
pub fn process_inflate(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    discarder: &mut dyn PageDiscarder,
    counters: &mut BalloonCounters,
) -> Result<bool> {
    drain(queue, mem, |chain| {
        let mut run = Run::default();
        let ok = for_each_pfn(chain, mem, |pfn| {
            if !pfn_valid(mem, pfn) {
                counters.invalid_pfns += 1;
                return;
            }
            counters.inflated_pages += 1;
            if let Some(ended) = run.push(u64::from(pfn)) {
                discard_run(ended, mem, discarder, counters);
            }
        });
        if run.pages > 0 {
            discard_run(run, mem, discarder, counters);
        }
        if !ok {
            counters.malformed_chains += 1;
        }
        0
    })
}

/// Serves the deflate queue: the pages are the guest's again; touching
/// them faults fresh zero pages in, so nothing needs doing but counting.
pub fn process_deflate(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    counters: &mut BalloonCounters,
) -> Result<bool> {
    drain(queue, mem, |chain| {
        let ok = for_each_pfn(chain, mem, |pfn| {
            if pfn_valid(mem, pfn) {
                counters.deflated_pages += 1;
            } else {
                counters.invalid_pfns += 1;
            }
        });
        if !ok {
            counters.malformed_chains += 1;
        }
        0
    })
}

/// Serves the free page reporting queue: each buffer of a chain is a free
/// block of guest memory, discarded on the host (section 5.5.6.5).
pub fn process_reporting(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    discarder: &mut dyn PageDiscarder,
    counters: &mut BalloonCounters,
) -> Result<bool> {
    drain(queue, mem, |chain| {
        for desc in chain {
            report_block(&desc, mem, discarder, counters);
        }
        0
    })
}

fn report_block(
    desc: &Descriptor,
    mem: &GuestMemoryMmap,
    discarder: &mut dyn PageDiscarder,
    counters: &mut BalloonCounters,
) {
    let (addr, len) = (desc.addr(), u64::from(desc.len()));
    let aligned = addr.0.is_multiple_of(BALLOON_PAGE_SIZE) && len.is_multiple_of(BALLOON_PAGE_SIZE);
    let inside = usize::try_from(len).is_ok_and(|l| mem.check_range(addr, l));
    if !aligned || !inside || len == 0 {
        counters.invalid_reports += 1;
        return;
    }
    match discarder.discard(mem, addr, len) {
        Ok(()) => counters.reported_bytes += len,
        Err(e) => {
            counters.discard_failures += 1;
            tracing::warn!(error = %crate::describe(&e), "balloon: discard of reported pages failed");
        }
    }
}

/// The statistics queue: the driver keeps one buffer on it; the device
/// holds that buffer and gives it back when it wants fresh figures, which
/// the driver then writes into a new buffer.
#[derive(Debug, Default)]
pub struct StatsQueue {
    held: Option<u16>,
    /// The figures from the last buffer.
    pub stats: BalloonStats,
}

impl StatsQueue {
    /// Takes the buffers the driver posted: reads their figures and keeps
    /// the last one. Returns whether the driver must be notified (it only
    /// is when it posted more than one buffer).
    pub fn process(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        counters: &mut BalloonCounters,
    ) -> Result<bool> {
        let mut returned = false;
        queue
            .disable_notification(mem)
            .map_err(BalloonError::Queue)?;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            if !self.read_stats(chain, mem) {
                counters.malformed_chains += 1;
            }
            counters.stats_updates += 1;
            if let Some(old) = self.held.replace(head) {
                returned |= queue.add_used(mem, old, 0).is_ok();
            }
        }
        queue
            .enable_notification(mem)
            .map_err(BalloonError::Queue)?;
        Ok(returned && queue.needs_notification(mem).map_err(BalloonError::Queue)?)
    }

    /// Asks the driver for fresh figures by giving its buffer back.
    /// Returns whether the driver must be notified.
    pub fn request(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool> {
        let Some(head) = self.held.take() else {
            return Ok(false);
        };
        if let Err(e) = queue.add_used(mem, head, 0) {
            tracing::debug!(error = %e, "balloon: cannot return the statistics buffer");
            return Ok(false);
        }
        queue.needs_notification(mem).map_err(BalloonError::Queue)
    }

    /// Whether a buffer is held (a request can be made).
    pub fn has_buffer(&self) -> bool {
        self.held.is_some()
    }

    /// Forgets the held buffer (device reset).
    pub fn reset(&mut self) {
        self.held = None;
    }

    /// The head descriptor of the held buffer (snapshots).
    pub fn held_buffer(&self) -> Option<u16> {
        self.held
    }

    /// Holds the buffer at head descriptor `head` again, as a restored
    /// device whose driver posted it before the snapshot.
    pub fn hold(&mut self, head: Option<u16>) {
        self.held = head;
    }

    /// Reads up to [`MAX_STAT_ENTRIES`] entries from the chain's readable
    /// buffers; false when the chain is malformed.
    fn read_stats(&mut self, chain: Chain<'_>, mem: &GuestMemoryMmap) -> bool {
        let mut raw = [0u8; MAX_STAT_ENTRIES * STAT_ENTRY_LEN];
        let mut filled = 0usize;
        for desc in chain {
            if desc.is_write_only() {
                return false;
            }
            let n = (desc.len() as usize).min(raw.len() - filled);
            if n == 0 {
                break;
            }
            if mem
                .read_slice(&mut raw[filled..filled + n], desc.addr())
                .is_err()
            {
                return false;
            }
            filled += n;
        }
        for entry in raw[..filled].chunks_exact(STAT_ENTRY_LEN) {
            let tag = u16::from_le_bytes([entry[0], entry[1]]);
            let mut value = [0u8; 8];
            value.copy_from_slice(&entry[2..10]);
            self.stats.set(tag, u64::from_le_bytes(value));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    /// Records what would be discarded.
    #[derive(Default)]
    struct Recorder(Vec<(u64, u64)>);

    impl PageDiscarder for Recorder {
        fn discard(&mut self, _mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<()> {
            self.0.push((addr.0, len));
            Ok(())
        }
    }

    const MEM: usize = 0x100_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            u16::try_from(flags).unwrap(),
            0,
        ))
    }

    fn pfns(mem: &GuestMemoryMmap, at: u64, list: &[u32]) {
        let bytes: Vec<u8> = list.iter().flat_map(|p| p.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    }

    #[test]
    fn inflate_discards_contiguous_runs() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        pfns(&mem, 0x10_0000, &[0x200, 0x201, 0x202, 0x300, 0x204]);
        vq.build_desc_chain(&[desc(0x10_0000, 20, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut rec = Recorder::default();
        let mut c = BalloonCounters::default();
        process_inflate(&mut q, &mem, &mut rec, &mut c).unwrap();
        assert_eq!(
            rec.0,
            vec![
                (0x20_0000, 0x3000),
                (0x30_0000, 0x1000),
                (0x20_4000, 0x1000)
            ]
        );
        assert_eq!(c.inflated_pages, 5);
        assert_eq!(vq.used().idx().load(), 1);
    }

    #[test]
    fn hostile_pfns_are_skipped() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        // Beyond RAM, the last possible frame, and one good page.
        pfns(&mem, 0x10_0000, &[0x1000, u32::MAX, 0x10, 0xfff]);
        // A length that is not a multiple of 4: the tail byte is ignored.
        vq.build_desc_chain(&[desc(0x10_0000, 17, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut rec = Recorder::default();
        let mut c = BalloonCounters::default();
        process_inflate(&mut q, &mem, &mut rec, &mut c).unwrap();
        assert_eq!(rec.0, vec![(0x1_0000, 0x1000), (0xff_f000, 0x1000)]);
        assert_eq!(c.invalid_pfns, 2);
        assert_eq!(c.inflated_pages, 2);
    }

    #[test]
    fn absurd_array_length_is_malformed_without_allocating() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        pfns(&mem, 0xff_fff0, &[0x20, 0x21, 0x22, 0x23]);
        // Claims 4 GiB of frame numbers starting 16 bytes before the end
        // of guest memory.
        vq.build_desc_chain(&[desc(0xff_fff0, u32::MAX, 0)])
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut rec = Recorder::default();
        let mut c = BalloonCounters::default();
        process_inflate(&mut q, &mem, &mut rec, &mut c).unwrap();
        assert_eq!(c.malformed_chains, 1);
        assert_eq!(c.inflated_pages, 0);
        // The chain is still returned so the driver is not stuck.
        assert_eq!(vq.used().idx().load(), 1);
    }

    #[test]
    fn writable_inflate_buffer_is_malformed() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        pfns(&mem, 0x10_0000, &[0x200]);
        vq.build_desc_chain(&[desc(0x10_0000, 4, VRING_DESC_F_WRITE)])
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut rec = Recorder::default();
        let mut c = BalloonCounters::default();
        process_inflate(&mut q, &mem, &mut rec, &mut c).unwrap();
        assert!(rec.0.is_empty());
        assert_eq!(c.malformed_chains, 1);
    }

    #[test]
    fn deflate_counts_pages() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        pfns(&mem, 0x10_0000, &[0x200, 0x201, 0x7fff_ffff]);
        vq.build_desc_chain(&[desc(0x10_0000, 12, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut c = BalloonCounters::default();
        process_deflate(&mut q, &mem, &mut c).unwrap();
        assert_eq!(c.deflated_pages, 2);
        assert_eq!(c.invalid_pfns, 1);
    }

    #[test]
    fn reports_are_discarded_when_sane() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[
            desc(0x40_0000, 0x20_0000, VRING_DESC_F_WRITE),
            desc(0x80_0001, 0x1000, VRING_DESC_F_WRITE),
            desc(0xff_f000, 0x2000, VRING_DESC_F_WRITE),
            desc(0x60_0000, 0, VRING_DESC_F_WRITE),
        ])
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut rec = Recorder::default();
        let mut c = BalloonCounters::default();
        process_reporting(&mut q, &mem, &mut rec, &mut c).unwrap();
        assert_eq!(rec.0, vec![(0x40_0000, 0x20_0000)]);
        assert_eq!(c.reported_bytes, 0x20_0000);
        assert_eq!(c.invalid_reports, 3);
    }

    fn stats_bytes(entries: &[(u16, u64)]) -> Vec<u8> {
        entries
            .iter()
            .flat_map(|(t, v)| {
                let mut e = t.to_le_bytes().to_vec();
                e.extend_from_slice(&v.to_le_bytes());
                e
            })
            .collect()
    }

    #[test]
    fn stats_buffer_is_read_held_and_returned_on_request() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let bytes = stats_bytes(&[
            (VIRTIO_BALLOON_S_MEMFREE, 100 << 20),
            (VIRTIO_BALLOON_S_MEMTOT, 256 << 20),
            (VIRTIO_BALLOON_S_CACHES, 7),
            (0xbeef, 1),
        ]);
        mem.write_slice(&bytes, GuestAddress(0x10_0000)).unwrap();
        vq.build_desc_chain(&[desc(0x10_0000, u32::try_from(bytes.len()).unwrap(), 0)])
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut s = StatsQueue::default();
        let mut c = BalloonCounters::default();
        assert!(!s.process(&mut q, &mem, &mut c).unwrap());
        assert_eq!(s.stats.free_memory, Some(100 << 20));
        assert_eq!(s.stats.total_memory, Some(256 << 20));
        assert_eq!(s.stats.disk_caches, Some(7));
        assert_eq!(s.stats.swap_in, None);
        assert!(s.has_buffer());
        assert_eq!(vq.used().idx().load(), 0);
        assert!(s.request(&mut q, &mem).unwrap());
        assert_eq!(vq.used().idx().load(), 1);
        assert!(!s.has_buffer());
        // Nothing held: nothing to return.
        assert!(!s.request(&mut q, &mem).unwrap());
    }

    #[test]
    fn oversized_stats_buffer_is_capped() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut entries = vec![(0x99u16, 0u64); MAX_STAT_ENTRIES];
        entries.push((VIRTIO_BALLOON_S_MEMFREE, 5));
        let bytes = stats_bytes(&entries);
        mem.write_slice(&bytes, GuestAddress(0x10_0000)).unwrap();
        vq.build_desc_chain(&[desc(0x10_0000, u32::MAX, 0)])
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut s = StatsQueue::default();
        let mut c = BalloonCounters::default();
        s.process(&mut q, &mem, &mut c).unwrap();
        // Entries past the cap are never read.
        assert_eq!(s.stats.free_memory, None);
        assert_eq!(c.stats_updates, 1);
    }

    #[test]
    fn ring_that_yields_nothing_does_not_spin() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        // virtio-queue will not pop from an available ring at address 0,
        // yet reports the entries on it as pending.
        q.set_avail_ring_address(Some(0), Some(0));
        mem.write_obj(3u16, GuestAddress(2)).unwrap();
        let mut c = BalloonCounters::default();
        process_deflate(&mut q, &mem, &mut c).unwrap();
        let mut rec = Recorder::default();
        process_inflate(&mut q, &mem, &mut rec, &mut c).unwrap();
        assert_eq!(c.deflated_pages + c.inflated_pages, 0);
    }

    #[test]
    fn avail_index_far_ahead_does_not_spin() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        vq.avail().idx().store(40);
        let mut c = BalloonCounters::default();
        process_deflate(&mut q, &mem, &mut c).unwrap();
        assert_eq!(c.deflated_pages, 0);
    }
}
