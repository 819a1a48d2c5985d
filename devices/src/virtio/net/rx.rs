//! The receive path (virtio 1.2, 5.1.6.3–5.1.6.4): frames from the tap into
//! the driver's receive buffers, with no fds or threads.
//!
//! At most one frame waits in the device: read from the tap when no receive
//! buffer was available. While it waits the device reports
//! [`RxStatus::Blocked`], its owner stops polling the tap, and the frame is
//! delivered as soon as the driver posts buffers (and kicks).

use std::io;

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemory, Permissions};

use super::tap::FrameIo;
use super::{
    NetError, NetStats, Result, ETH_HLEN, MAX_BUFFER_SIZE, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_LEN, VIRTIO_NET_HDR_NUM_BUFFERS,
};

/// Frames moved per call at most, so a busy tap cannot starve transmit;
/// the tap stays readable and the event loop comes back.
pub const RX_BUDGET: usize = 256;

/// The receive side's state: one frame buffer, maybe holding a frame.
#[derive(Debug)]
pub struct RxState {
    buf: Vec<u8>,
    /// Length of the frame waiting in `buf` (header included); 0 for none.
    pending: usize,
}

impl Default for RxState {
    fn default() -> Self {
        Self {
            buf: vec![0; MAX_BUFFER_SIZE],
            pending: 0,
        }
    }
}

impl RxState {
    /// Whether a frame waits for a receive buffer.
    pub fn has_pending(&self) -> bool {
        self.pending > 0
    }

    /// Drops the waiting frame (device reset).
    pub fn clear(&mut self) {
        self.pending = 0;
    }
}

/// Whether the tap should be polled after a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxStatus {
    /// The tap is drained or the budget spent: keep polling it.
    Poll,
    /// A frame waits and there is no receive buffer (or the queue is not
    /// ready): stop polling until the driver posts buffers.
    Blocked,
}

/// Moves frames from `tap` into receive buffers on `queue` until the tap is
/// drained, the buffers run out, or [`RX_BUDGET`] frames were read.
/// Returns what the owner should do with the tap and whether the driver
/// must be notified.
///
/// `header_len` is the negotiated virtio-net header length (the tap writes
/// the same length). A malformed receive chain is returned unused (length
/// 0) and the frame goes to the next one; a frame too big for its buffer,
/// or carrying an offload the driver did not negotiate, is dropped.
pub fn process_rx<Q, M>(
    queue: &mut Q,
    mem: &M,
    tap: &mut dyn FrameIo,
    state: &mut RxState,
    header_len: usize,
    stats: &mut NetStats,
) -> Result<(RxStatus, bool)>
where
    Q: QueueT + QueueOwnedT,
    M: GuestMemory,
{
    if !queue.ready() {
        return Ok((RxStatus::Blocked, false));
    }
    queue.disable_notification(mem).map_err(NetError::Queue)?;
    let mut used = 0u32;
    let mut read = 0usize;
    let status = loop {
        if state.pending == 0 {
            if read == RX_BUDGET {
                break RxStatus::Poll;
            }
            match tap.read_frame(&mut state.buf) {
                Ok(n) if n >= state.buf.len() => {
                    // Cut short: no frame the device handles fills the
                    // whole buffer.
                    read += 1;
                    tracing::debug!(len = n, "virtio-net: dropping a frame too long to read");
                    stats.rx_dropped += 1;
                    continue;
                }
                Ok(n) => {
                    read += 1;
                    if let Err(e) = prepare_header(&mut state.buf[..n], header_len) {
                        tracing::debug!(error = %e, "virtio-net: dropping frame from the tap");
                        stats.rx_dropped += 1;
                        continue;
                    }
                    state.pending = n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break RxStatus::Poll,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NetError::TapRead(e)),
            }
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            // Out of buffers: ask for a kick when more are posted, unless
            // some arrived meanwhile.
            if !queue.enable_notification(mem).map_err(NetError::Queue)? {
                break RxStatus::Blocked;
            }
            if !crate::virtio::avail_ring_sane(queue, mem).map_err(NetError::Queue)? {
                // Nothing can be popped from such a ring: wait for a kick.
                tracing::warn!("virtio-net: receive ring index runs more than a queue ahead");
                break RxStatus::Blocked;
            }
            queue.disable_notification(mem).map_err(NetError::Queue)?;
            continue;
        };
        let head = chain.head_index();
        let frame = &state.buf[..state.pending];
        let len = match write_frame(chain, mem, frame) {
            Ok(len) => {
                tracing::trace!(head, len, "virtio-net: frame received");
                stats.rx_frames += 1;
                stats.rx_bytes += u64::from(len);
                state.pending = 0;
                len
            }
            Err(e @ NetError::BufferTooSmall { .. }) => {
                tracing::debug!(error = %e, "virtio-net: dropping frame");
                stats.rx_dropped += 1;
                state.pending = 0;
                0
            }
            Err(e) => {
                // The frame stays for the next chain.
                tracing::debug!(head, error = %e, "virtio-net: malformed receive chain");
                stats.rx_malformed += 1;
                0
            }
        };
        queue.add_used(mem, head, len).map_err(NetError::Queue)?;
        used += 1;
    };
    let notify = used > 0 && queue.needs_notification(mem).map_err(NetError::Queue)?;
    Ok((status, notify))
}

/// Turns the header the tap wrote into the one the driver gets: no
/// offloads are negotiated on receive, so a frame asking for one is
/// refused, the rest of the header is zero, and `num_buffers` is 1.
fn prepare_header(frame: &mut [u8], header_len: usize) -> Result<()> {
    if frame.len() < header_len + ETH_HLEN {
        return Err(NetError::ShortFrame(frame.len()));
    }
    let (flags, gso_type) = (frame[0], frame[1]);
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 || gso_type != VIRTIO_NET_HDR_GSO_NONE {
        return Err(NetError::Offload { flags, gso_type });
    }
    frame[..header_len].fill(0);
    if header_len == VIRTIO_NET_HDR_LEN {
        frame[VIRTIO_NET_HDR_NUM_BUFFERS..VIRTIO_NET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
    }
    Ok(())
}

/// Writes `frame` into the device-writable buffers of `chain`, returning
/// the used length. The whole chain is checked before a byte is written.
fn write_frame<M: GuestMemory>(chain: DescriptorChain<&M>, mem: &M, frame: &[u8]) -> Result<u32> {
    let mut capacity: u64 = 0;
    let mut count = 0usize;
    let mut dangling = false;
    for desc in chain.clone() {
        count += 1;
        if !desc.is_write_only() {
            return Err(NetError::WrongDirection);
        }
        let len = usize::try_from(desc.len()).map_err(|_| NetError::OutsideMemory)?;
        if !mem.check_range(desc.addr(), len, Permissions::Write) {
            return Err(NetError::OutsideMemory);
        }
        capacity += u64::from(desc.len());
        dangling = desc.has_next();
    }
    // The chain iterator stops quietly at a bad index, a loop (after queue
    // size links) or an unreadable descriptor; the last one it yielded
    // then still points further.
    if count == 0 || dangling {
        return Err(NetError::BrokenChain);
    }
    if capacity < frame.len() as u64 {
        return Err(NetError::BufferTooSmall {
            need: frame.len(),
            have: capacity,
        });
    }
    let mut rest = frame;
    for desc in chain {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(desc.len() as usize);
        mem.write_slice(&rest[..n], desc.addr())
            .map_err(|_| NetError::OutsideMemory)?;
        rest = &rest[n..];
    }
    u32::try_from(frame.len()).map_err(|_| NetError::Oversize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::tap::FakeTap;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const W: u32 = VRING_DESC_F_WRITE;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            u16::try_from(flags).unwrap(),
            next,
        ))
    }

    /// A frame as the tap hands it over: a 12-byte header (with junk in
    /// `num_buffers`, which the tap leaves alone) and `len` payload bytes.
    fn tap_frame(len: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![0u8; VIRTIO_NET_HDR_LEN];
        f[10] = 0xaa;
        f[11] = 0xbb;
        f.extend(std::iter::repeat_n(fill, len));
        f
    }

    fn run(
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        tap: &mut FakeTap,
        st: &mut RxState,
    ) -> (RxStatus, NetStats) {
        let mut stats = NetStats::default();
        let (status, _) = process_rx(q, mem, tap, st, VIRTIO_NET_HDR_LEN, &mut stats).unwrap();
        (status, stats)
    }

    #[test]
    fn frame_lands_in_a_buffer_with_a_clean_header() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(0x4_0000, 1526, W, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut tap = FakeTap::new();
        tap.incoming.push_back(tap_frame(60, 0x5a));
        let mut st = RxState::default();

        let (status, stats) = run(&mut q, &mem, &mut tap, &mut st);
        assert_eq!(status, RxStatus::Poll);
        assert_eq!(stats.rx_frames, 1);
        assert_eq!(stats.rx_bytes, 72);
        let mut got = [0u8; 72];
        mem.read_slice(&mut got, GuestAddress(0x4_0000)).unwrap();
        assert_eq!(&got[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert!(got[12..].iter().all(|&b| b == 0x5a));
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 72);
    }

    #[test]
    fn frame_spans_several_descriptors() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[
            desc(0x4_0000, 12, W | VRING_DESC_F_NEXT, 1),
            desc(0x5_0000, 30, W | VRING_DESC_F_NEXT, 2),
            desc(0x6_0000, 100, W, 0),
        ])
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut tap = FakeTap::new();
        tap.incoming.push_back(tap_frame(60, 0x11));
        let mut st = RxState::default();
        let (_, stats) = run(&mut q, &mem, &mut tap, &mut st);
        assert_eq!(stats.rx_frames, 1);
        let mut tail = [0u8; 31];
        mem.read_slice(&mut tail, GuestAddress(0x6_0000)).unwrap();
        assert!(tail[..30].iter().all(|&b| b == 0x11));
        assert_eq!(tail[30], 0);
    }

    #[test]
    fn frame_too_big_for_the_buffer_is_dropped() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(0x4_0000, 64, W, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut tap = FakeTap::new();
        tap.incoming.push_back(tap_frame(1500, 0x77));
        let mut st = RxState::default();

        let (status, stats) = run(&mut q, &mem, &mut tap, &mut st);
        assert_eq!(status, RxStatus::Poll);
        assert_eq!(stats.rx_dropped, 1);
        assert_eq!(stats.rx_frames, 0);
        assert!(!st.has_pending());
        // The buffer goes back empty and untouched.
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
        let mut got = [0u8; 64];
        mem.read_slice(&mut got, GuestAddress(0x4_0000)).unwrap();
        assert_eq!(got, [0u8; 64]);
    }

    #[test]
    fn no_buffers_keeps_one_frame_and_blocks() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut tap = FakeTap::new();
        for i in 0..3 {
            tap.incoming.push_back(tap_frame(60, i));
        }
        let mut st = RxState::default();

        let (status, stats) = run(&mut q, &mem, &mut tap, &mut st);
        assert_eq!(status, RxStatus::Blocked);
        assert_eq!(stats, NetStats::default());
        assert!(st.has_pending());
        // One frame taken from the tap, the rest left there.
        assert_eq!(tap.incoming.len(), 2);

        // Still no buffers: nothing more is read.
        let (status, _) = run(&mut q, &mem, &mut tap, &mut st);
        assert_eq!(status, RxStatus::Blocked);
        assert_eq!(tap.incoming.len(), 2);

        // The driver posts two buffers: the waiting frame goes first.
        vq.add_desc_chains(&[desc(0x4_0000, 100, W, 0), desc(0x5_0000, 100, W, 0)], 0)
            .unwrap();
        let (status, stats) = run(&mut q, &mem, &mut tap, &mut st);
        assert_eq!(status, RxStatus::Blocked);
        assert_eq!(stats.rx_frames, 2);
        let mut first = [0u8; 13];
        mem.read_slice(&mut first, GuestAddress(0x4_0000)).unwrap();
        assert_eq!(first[12], 0);
        let mut second = [0u8; 13];
        mem.read_slice(&mut second, GuestAddress(0x5_0000)).unwrap();
        assert_eq!(second[12], 1);
        assert_eq!(tap.incoming.len(), 0);
        assert!(st.has_pending());
    }

    #[test]
    fn avail_index_far_ahead_does_not_spin() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        vq.avail().idx().store(40);
        let mut tap = FakeTap::new();
        tap.incoming.push_back(tap_frame(60, 1));
        let mut st = RxState::default();
        let (status, stats) = run(&mut q, &mem, &mut tap, &mut st);
        assert_eq!(status, RxStatus::Blocked);
        assert_eq!(stats, NetStats::default());
        assert!(st.has_pending());
    }

    #[test]
    fn queue_not_ready_blocks_without_reading() {
        let mem = memory();
        let mut q = Queue::new(16).unwrap();
        let mut tap = FakeTap::new();
        tap.incoming.push_back(tap_frame(60, 1));
        let mut st = RxState::default();
        let (status, _) = run(&mut q, &mem, &mut tap, &mut st);
        assert_eq!(status, RxStatus::Blocked);
        assert_eq!(tap.incoming.len(), 1);
    }

    #[test]
    fn readable_descriptor_is_malformed_and_the_frame_waits() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x4_0000, 100, 0, 0), desc(0x5_0000, 100, W, 0)], 0)
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut tap = FakeTap::new();
        tap.incoming.push_back(tap_frame(60, 9));
        let mut st = RxState::default();
        let (_, stats) = run(&mut q, &mem, &mut tap, &mut st);
        assert_eq!(stats.rx_malformed, 1);
        assert_eq!(stats.rx_frames, 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
        assert_eq!(vq.used().ring().ref_at(1).unwrap().load().len(), 72);
        let mut untouched = [0u8; 100];
        mem.read_slice(&mut untouched, GuestAddress(0x4_0000))
            .unwrap();
        assert_eq!(untouched, [0u8; 100]);
    }

    #[test]
    fn buffer_outside_memory_is_malformed() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[
            desc(0x4_0000, 12, W | VRING_DESC_F_NEXT, 1),
            desc(0xffff_0000, 2000, W, 0),
        ])
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut tap = FakeTap::new();
        tap.incoming.push_back(tap_frame(60, 9));
        let mut st = RxState::default();
        let (status, stats) = run(&mut q, &mem, &mut tap, &mut st);
        assert_eq!(status, RxStatus::Blocked);
        assert_eq!(stats.rx_malformed, 1);
        assert!(st.has_pending());
        // Nothing was written, not even the header.
        let mut hdr = [0u8; 12];
        mem.read_slice(&mut hdr, GuestAddress(0x4_0000)).unwrap();
        assert_eq!(hdr, [0u8; 12]);
    }

    #[test]
    fn descriptor_loop_is_malformed() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        // 0 → 1 → 0 → ...
        vq.add_desc_chains(
            &[
                desc(0x4_0000, 8, W | VRING_DESC_F_NEXT, 1),
                desc(0x5_0000, 8, W | VRING_DESC_F_NEXT, 0),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut tap = FakeTap::new();
        tap.incoming.push_back(tap_frame(60, 9));
        let mut st = RxState::default();
        let (_, stats) = run(&mut q, &mem, &mut tap, &mut st);
        assert_eq!(stats.rx_malformed, 1);
        assert_eq!(stats.rx_frames, 0);
    }

    #[test]
    fn dangling_next_index_is_malformed() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x4_0000, 2000, W | VRING_DESC_F_NEXT, 300)], 0)
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut tap = FakeTap::new();
        tap.incoming.push_back(tap_frame(60, 9));
        let mut st = RxState::default();
        let (_, stats) = run(&mut q, &mem, &mut tap, &mut st);
        assert_eq!(stats.rx_malformed, 1);
    }

    #[test]
    fn offloaded_or_runt_frames_from_the_tap_are_dropped() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(0x4_0000, 2000, W, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut tap = FakeTap::new();
        let mut gso = tap_frame(1400, 1);
        gso[1] = super::super::VIRTIO_NET_HDR_GSO_TCPV4;
        tap.incoming.push_back(gso);
        let mut csum = tap_frame(100, 1);
        csum[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        tap.incoming.push_back(csum);
        tap.incoming.push_back(tap_frame(3, 1));
        let mut st = RxState::default();
        let (status, stats) = run(&mut q, &mem, &mut tap, &mut st);
        assert_eq!(status, RxStatus::Poll);
        assert_eq!(stats.rx_dropped, 3);
        assert_eq!(vq.used().idx().load(), 0);
    }

    #[test]
    fn truncated_frame_from_the_tap_is_dropped() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(0x4_0000, 0x1_0000, W, 0)])
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut tap = FakeTap::new();
        tap.incoming.push_back(tap_frame(MAX_BUFFER_SIZE, 1));
        let mut st = RxState::default();
        let (status, stats) = run(&mut q, &mem, &mut tap, &mut st);
        assert_eq!(status, RxStatus::Poll);
        assert_eq!(stats.rx_dropped, 1, "{stats:?}");
        assert_eq!(vq.used().idx().load(), 0, "{stats:?}");
    }

    #[test]
    fn budget_bounds_one_pass() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut tap = FakeTap::new();
        // Frames the tap holds that all get dropped (runts): the pass still
        // stops after the budget.
        for _ in 0..RX_BUDGET + 10 {
            tap.incoming.push_back(vec![0u8; 4]);
        }
        let mut st = RxState::default();
        let (status, stats) = run(&mut q, &mem, &mut tap, &mut st);
        assert_eq!(status, RxStatus::Poll);
        assert_eq!(stats.rx_dropped, RX_BUDGET as u64);
        assert_eq!(tap.incoming.len(), 10);
    }

    #[test]
    fn legacy_header_has_no_num_buffers() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(0x4_0000, 200, W, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut tap = FakeTap::new();
        let mut f = vec![0u8; 10];
        f.extend([0xee; 60]);
        tap.incoming.push_back(f);
        let mut st = RxState::default();
        let mut stats = NetStats::default();
        process_rx(&mut q, &mem, &mut tap, &mut st, 10, &mut stats).unwrap();
        assert_eq!(stats.rx_bytes, 70);
        let mut got = [0u8; 11];
        mem.read_slice(&mut got, GuestAddress(0x4_0000)).unwrap();
        assert_eq!(&got[..10], &[0u8; 10]);
        assert_eq!(got[10], 0xee);
    }
}
