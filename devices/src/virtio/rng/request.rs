//! Serving entropy requests from a virtio queue, with no fds or threads.

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemory};

use super::{Result, RngError, MAX_BYTES_PER_REQUEST};

/// Where random bytes come from: the host in production, a fake in tests.
pub trait EntropySource {
    /// Fills `buf` completely with random bytes.
    fn fill(&mut self, buf: &mut [u8]) -> Result<()>;
}

/// The host kernel's `getrandom(2)`.
#[derive(Debug, Default)]
pub struct HostEntropy;

impl EntropySource for HostEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        // Text only: getrandom's Error is no std::error::Error here (see RngError::Entropy).
        getrandom::getrandom(buf).map_err(|e| RngError::Entropy(e.to_string()))
    }
}

/// What one pass over the queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RngStats {
    /// Chains completed (returned to the driver).
    pub requests: u64,
    /// Random bytes written into guest memory.
    pub bytes: u64,
    /// Chains rejected as malformed (returned with zero length).
    pub malformed: u64,
}

/// Serves every request available on `queue`, returning what it did and
/// whether the driver must be notified.
///
/// A malformed chain (a device-readable descriptor, an address outside guest
/// memory) is completed with zero bytes written, counted, and logged: the
/// guest gets nothing, the host carries on.
pub fn process_queue<Q, M>(
    queue: &mut Q,
    mem: &M,
    source: &mut dyn EntropySource,
) -> Result<(RngStats, bool)>
where
    Q: QueueT + QueueOwnedT,
    M: GuestMemory,
{
    let mut stats = RngStats::default();
    let mut buf = vec![0u8; MAX_BYTES_PER_REQUEST as usize];
    // Event-index drivers only kick again once we re-enable notifications,
    // so drain, re-enable, and go round if more arrived meanwhile.
    loop {
        queue.disable_notification(mem).map_err(RngError::Queue)?;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut written: u32 = 0;
            let mut ok = true;
            for desc in chain {
                if !desc.is_write_only() {
                    ok = false;
                    break;
                }
                let want = desc.len().min(MAX_BYTES_PER_REQUEST - written);
                if want == 0 {
                    break;
                }
                let chunk = &mut buf[..want as usize];
                source.fill(chunk)?;
                if let Err(e) = mem.write_slice(chunk, desc.addr()) {
                    tracing::debug!(error = %e, "rng: descriptor outside guest memory");
                    ok = false;
                    break;
                }
                written += want;
            }
            if !ok {
                stats.malformed += 1;
                written = 0;
            }
            // A head index the guest made up cannot be returned: count it
            // and carry on.
            if let Err(e) = queue.add_used(mem, head, written) {
                tracing::debug!(error = %e, head, "rng: cannot return chain");
                stats.malformed += 1;
                continue;
            }
            stats.requests += 1;
            stats.bytes += u64::from(written);
        }
        if !queue.enable_notification(mem).map_err(RngError::Queue)? {
            break;
        }
        if !crate::virtio::avail_ring_sane(queue, mem).map_err(RngError::Queue)? {
            tracing::warn!("rng: available ring index runs more than a queue ahead; queue ignored");
            break;
        }
    }
    let notify = stats.requests > 0 && queue.needs_notification(mem).map_err(RngError::Queue)?;
    Ok((stats, notify))
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    struct Counting(u8);

    impl EntropySource for Counting {
        fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
            for b in buf {
                self.0 = self.0.wrapping_add(1);
                *b = self.0;
            }
            Ok(())
        }
    }

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

    #[test]
    fn fills_writable_buffers() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let descs = [
            desc(0x4_0000, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            desc(0x5_0000, 8, VRING_DESC_F_WRITE, 0),
        ];
        vq.build_desc_chain(&descs).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();

        let (stats, _) = process_queue(&mut q, &mem, &mut Counting(0)).unwrap();
        assert_eq!(
            stats,
            RngStats {
                requests: 1,
                bytes: 24,
                malformed: 0
            }
        );
        let mut got = [0u8; 8];
        mem.read_slice(&mut got, GuestAddress(0x5_0000)).unwrap();
        assert_eq!(got, [17, 18, 19, 20, 21, 22, 23, 24]);
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 24);
    }

    #[test]
    fn readable_descriptor_is_rejected() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(0x4_0000, 16, 0, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let (stats, _) = process_queue(&mut q, &mem, &mut Counting(0)).unwrap();
        assert_eq!(stats.malformed, 1);
        assert_eq!(stats.bytes, 0);
        let mut got = [0u8; 16];
        mem.read_slice(&mut got, GuestAddress(0x4_0000)).unwrap();
        assert_eq!(got, [0u8; 16]);
    }

    #[test]
    fn address_outside_memory_is_rejected() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(0xffff_0000, 16, VRING_DESC_F_WRITE, 0)])
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let (stats, _) = process_queue(&mut q, &mem, &mut Counting(0)).unwrap();
        assert_eq!(
            stats,
            RngStats {
                requests: 1,
                bytes: 0,
                malformed: 1
            }
        );
    }

    #[test]
    fn avail_index_far_ahead_does_not_spin() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        vq.avail().idx().store(40);
        let (stats, _) = process_queue(&mut q, &mem, &mut Counting(0)).unwrap();
        assert_eq!(stats.requests, 0);
    }

    #[test]
    fn huge_request_is_capped() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(0x10_0000, 0x20_0000, VRING_DESC_F_WRITE, 0)])
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let (stats, _) = process_queue(&mut q, &mem, &mut HostEntropy).unwrap();
        assert_eq!(stats.bytes, u64::from(MAX_BYTES_PER_REQUEST));
    }
}
