//! The transmit path (virtio 1.2, 5.1.6.2): frames the driver posts,
//! gathered into one bounded buffer and written to the tap, with no fds or
//! threads.

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemory};

use super::tap::FrameIo;
use super::{
    NetError, NetStats, Result, ETH_HLEN, MAX_BUFFER_SIZE, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};

/// Sends every frame available on `queue` to `tap`, returning whether the
/// driver must be notified.
///
/// `buf` (at least [`MAX_BUFFER_SIZE`] bytes) holds one frame at a time.
/// A malformed chain (a device-writable descriptor, an address outside
/// guest memory, broken links, more than [`MAX_BUFFER_SIZE`] bytes, a
/// header asking for an offload not in `acked_features`) is dropped and
/// counted; a frame the tap refuses is counted too. Every chain is returned
/// to the driver.
pub fn process_tx<Q, M>(
    queue: &mut Q,
    mem: &M,
    tap: &mut dyn FrameIo,
    buf: &mut [u8],
    header_len: usize,
    acked_features: u64,
    stats: &mut NetStats,
) -> Result<bool>
where
    Q: QueueT + QueueOwnedT,
    M: GuestMemory,
{
    if !queue.ready() {
        return Ok(false);
    }
    let mut used = 0u32;
    // Event-index drivers only kick again once notifications are
    // re-enabled: drain, re-enable, and go round if more arrived.
    loop {
        queue.disable_notification(mem).map_err(NetError::Queue)?;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match gather(chain, mem, buf)
                .and_then(|len| check_header(&buf[..len], header_len, acked_features).map(|()| len))
            {
                Ok(len) => match tap.write_frame(&buf[..len]) {
                    Ok(()) => {
                        tracing::trace!(head, len, "virtio-net: frame sent");
                        stats.tx_frames += 1;
                        stats.tx_bytes += len as u64;
                    }
                    Err(e) => {
                        tracing::debug!(head, len, error = %e, "virtio-net: tap refused a frame");
                        stats.tx_dropped += 1;
                    }
                },
                Err(e) => {
                    tracing::debug!(head, error = %e, "virtio-net: malformed transmit chain");
                    stats.tx_malformed += 1;
                }
            }
            queue.add_used(mem, head, 0).map_err(NetError::Queue)?;
            used += 1;
        }
        if !queue.enable_notification(mem).map_err(NetError::Queue)? {
            break;
        }
        if !crate::virtio::avail_ring_sane(queue, mem).map_err(NetError::Queue)? {
            tracing::warn!("virtio-net: transmit ring index runs more than a queue ahead; ignored");
            break;
        }
    }
    Ok(used > 0 && queue.needs_notification(mem).map_err(NetError::Queue)?)
}

/// Copies the device-readable buffers of `chain` into `buf`, returning the
/// number of bytes (header and frame).
fn gather<M: GuestMemory>(chain: DescriptorChain<&M>, mem: &M, buf: &mut [u8]) -> Result<usize> {
    let limit = buf.len().min(MAX_BUFFER_SIZE);
    let mut len = 0usize;
    let mut count = 0usize;
    let mut dangling = false;
    for desc in chain {
        count += 1;
        if desc.is_write_only() {
            return Err(NetError::WrongDirection);
        }
        let n = desc.len() as usize;
        let end = len
            .checked_add(n)
            .filter(|&end| end <= limit)
            .ok_or(NetError::Oversize)?;
        mem.read_slice(&mut buf[len..end], desc.addr())
            .map_err(|_| NetError::OutsideMemory)?;
        len = end;
        dangling = desc.has_next();
    }
    // The chain iterator stops quietly at a bad index, a loop (after queue
    // size links) or an unreadable descriptor; the last one it yielded
    // then still points further.
    if count == 0 || dangling {
        return Err(NetError::BrokenChain);
    }
    Ok(len)
}

/// Checks the driver's header against what was negotiated: a partial
/// checksum only with VIRTIO_NET_F_CSUM, TCP segmentation only with
/// VIRTIO_NET_F_HOST_TSO4/6, and no other flags. The tap validates the
/// offsets themselves when it builds the packet.
fn check_header(frame: &[u8], header_len: usize, acked: u64) -> Result<()> {
    if frame.len() < header_len + ETH_HLEN {
        return Err(NetError::ShortFrame(frame.len()));
    }
    let (flags, gso_type) = (frame[0], frame[1]);
    let csum_ok =
        flags == 0 || (flags == VIRTIO_NET_HDR_F_NEEDS_CSUM && acked & VIRTIO_NET_F_CSUM != 0);
    let gso_ok = match gso_type {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => acked & VIRTIO_NET_F_HOST_TSO4 != 0,
        VIRTIO_NET_HDR_GSO_TCPV6 => acked & VIRTIO_NET_F_HOST_TSO6 != 0,
        _ => false,
    };
    if csum_ok && gso_ok {
        Ok(())
    } else {
        Err(NetError::Offload { flags, gso_type })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::tap::FakeTap;
    use crate::virtio::net::VIRTIO_NET_HDR_LEN;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const N: u32 = VRING_DESC_F_NEXT;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            u16::try_from(flags).unwrap(),
            next,
        ))
    }

    struct Run {
        tap: FakeTap,
        stats: NetStats,
        notify: bool,
    }

    fn run_with(q: &mut Queue, mem: &GuestMemoryMmap, acked: u64) -> Run {
        let mut tap = FakeTap::new();
        let mut stats = NetStats::default();
        let mut buf = vec![0u8; MAX_BUFFER_SIZE];
        let notify = process_tx(
            q,
            mem,
            &mut tap,
            &mut buf,
            VIRTIO_NET_HDR_LEN,
            acked,
            &mut stats,
        )
        .unwrap();
        Run { tap, stats, notify }
    }

    fn run(q: &mut Queue, mem: &GuestMemoryMmap) -> Run {
        run_with(q, mem, 0)
    }

    #[test]
    fn header_and_frame_are_sent_as_one() {
        let mem = memory();
        mem.write_slice(&[0u8; 12], GuestAddress(0x4_0000)).unwrap();
        mem.write_slice(&[0xab; 60], GuestAddress(0x5_0000))
            .unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(0x4_0000, 12, N, 1), desc(0x5_0000, 60, 0, 0)])
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();

        let r = run(&mut q, &mem);
        assert!(r.notify);
        assert_eq!(r.stats.tx_frames, 1);
        assert_eq!(r.stats.tx_bytes, 72);
        assert_eq!(r.tap.sent.len(), 1);
        assert_eq!(&r.tap.sent[0][..12], &[0u8; 12]);
        assert!(r.tap.sent[0][12..].iter().all(|&b| b == 0xab));
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
    }

    #[test]
    fn header_may_share_a_descriptor_with_the_frame() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(0x4_0000, 200, 0, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let r = run(&mut q, &mem);
        assert_eq!(r.stats.tx_frames, 1);
        assert_eq!(r.tap.sent[0].len(), 200);
    }

    #[test]
    fn indirect_chain_is_gathered() {
        let mem = memory();
        // Header, then two frame pieces, in an indirect table at 0x8_0000.
        let table = [
            desc(0x4_0000, 12, N, 1),
            desc(0x5_0000, 40, N, 2),
            desc(0x6_0000, 50, 0, 0),
        ];
        for (i, d) in table.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(0x8_0000 + 16 * i as u64))
                .unwrap();
        }
        mem.write_slice(&[7u8; 50], GuestAddress(0x6_0000)).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(0x8_0000, 48, VRING_DESC_F_INDIRECT, 0)])
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let r = run(&mut q, &mem);
        assert_eq!(r.stats.tx_malformed, 0, "{:?}", r.stats);
        assert_eq!(r.stats.tx_frames, 1);
        assert_eq!(r.tap.sent[0].len(), 102);
        assert!(r.tap.sent[0][52..].iter().all(|&b| b == 7));
    }

    #[test]
    fn address_outside_memory_is_dropped() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(0x4_0000, 12, N, 1), desc(0xffff_0000, 100, 0, 0)])
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let r = run(&mut q, &mem);
        assert_eq!(r.stats.tx_malformed, 1);
        assert!(r.tap.sent.is_empty());
        // Returned to the driver all the same.
        assert_eq!(vq.used().idx().load(), 1);
    }

    #[test]
    fn address_that_wraps_is_dropped() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(u64::MAX - 4, 100, 0, 0)])
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let r = run(&mut q, &mem);
        assert_eq!(r.stats.tx_malformed, 1);
        assert!(r.tap.sent.is_empty());
    }

    #[test]
    fn device_writable_descriptor_is_dropped() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[
            desc(0x4_0000, 12, N, 1),
            desc(0x5_0000, 100, VRING_DESC_F_WRITE, 0),
        ])
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let r = run(&mut q, &mem);
        assert_eq!(r.stats.tx_malformed, 1);
        assert!(r.tap.sent.is_empty());
    }

    #[test]
    fn oversize_frame_is_dropped() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        // Exactly the limit is fine, one byte more is not.
        vq.add_desc_chains(
            &[
                desc(0x4_0000, 65_000, N, 1),
                desc(0x14_0000, 562, 0, 0),
                desc(0x4_0000, 65_000, N, 3),
                desc(0x14_0000, 563, 0, 0),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let r = run(&mut q, &mem);
        assert_eq!(r.stats.tx_frames, 1);
        assert_eq!(r.tap.sent[0].len(), MAX_BUFFER_SIZE);
        assert_eq!(r.stats.tx_malformed, 1);
        assert_eq!(vq.used().idx().load(), 2);
    }

    #[test]
    fn overflowing_lengths_are_dropped() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[
            desc(0x4_0000, u32::MAX, N, 1),
            desc(0x5_0000, u32::MAX, N, 2),
            desc(0x6_0000, 100, 0, 0),
        ])
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let r = run(&mut q, &mem);
        assert_eq!(r.stats.tx_malformed, 1);
        assert!(r.tap.sent.is_empty());
    }

    #[test]
    fn descriptor_loop_is_dropped() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        // Small descriptors looping 0 → 1 → 0: the bytes stay under the
        // size limit, so only the link check catches it.
        vq.add_desc_chains(&[desc(0x4_0000, 20, N, 1), desc(0x5_0000, 20, N, 0)], 0)
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let r = run(&mut q, &mem);
        assert_eq!(r.stats.tx_malformed, 1);
        assert!(r.tap.sent.is_empty());
    }

    #[test]
    fn dangling_next_index_is_dropped() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x4_0000, 100, N, 40)], 0)
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let r = run(&mut q, &mem);
        assert_eq!(r.stats.tx_malformed, 1);
    }

    #[test]
    fn chain_shorter_than_headers_is_dropped() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(0x4_0000, 20, 0, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let r = run(&mut q, &mem);
        assert_eq!(r.stats.tx_malformed, 1);
    }

    #[test]
    fn offloads_need_negotiation() {
        let mem = memory();
        // NEEDS_CSUM, then TSO4 with NEEDS_CSUM, then an unknown flag.
        mem.write_slice(&[VIRTIO_NET_HDR_F_NEEDS_CSUM, 0], GuestAddress(0x4_0000))
            .unwrap();
        mem.write_slice(
            &[VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4],
            GuestAddress(0x5_0000),
        )
        .unwrap();
        mem.write_slice(&[0x4, 0], GuestAddress(0x6_0000)).unwrap();
        let chains = [
            desc(0x4_0000, 100, 0, 0),
            desc(0x5_0000, 100, 0, 0),
            desc(0x6_0000, 100, 0, 0),
        ];

        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&chains, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let r = run(&mut q, &mem);
        assert_eq!(r.stats.tx_malformed, 3);

        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&chains, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let r = run_with(&mut q, &mem, VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4);
        assert_eq!(r.stats.tx_frames, 2);
        assert_eq!(r.stats.tx_malformed, 1);
    }

    #[test]
    fn refused_frames_are_counted() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(0x4_0000, 100, 0, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut tap = FakeTap::new();
        tap.refuse_writes = true;
        let mut stats = NetStats::default();
        let mut buf = vec![0u8; MAX_BUFFER_SIZE];
        process_tx(
            &mut q,
            &mem,
            &mut tap,
            &mut buf,
            VIRTIO_NET_HDR_LEN,
            0,
            &mut stats,
        )
        .unwrap();
        assert_eq!(stats.tx_dropped, 1);
        assert_eq!(vq.used().idx().load(), 1);
    }

    #[test]
    fn avail_index_far_ahead_does_not_spin() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        vq.avail().idx().store(40);
        let r = run(&mut q, &mem);
        assert_eq!(r.stats, NetStats::default());
        assert!(!r.notify);
    }

    #[test]
    fn many_chains_are_drained_in_one_pass() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let chains: Vec<_> = (0..16)
            .map(|i| desc(0x4_0000 + i * 0x1000, 64, 0, 0))
            .collect();
        vq.add_desc_chains(&chains, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let r = run(&mut q, &mem);
        assert_eq!(r.stats.tx_frames, 16);
        assert_eq!(vq.used().idx().load(), 16);
    }
}
