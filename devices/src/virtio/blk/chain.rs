//! Splitting a descriptor chain into its device-readable and device-writable
//! parts (virtio 1.2, section 2.7.4), refusing chains that are cut short.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// One guest buffer: `len` bytes at `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A run of guest buffers read or written as one byte stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Buffers {
    segments: Vec<Segment>,
    len: u64,
}

impl Buffers {
    /// Appends a buffer; empty ones are dropped.
    fn push(&mut self, addr: GuestAddress, len: u32) {
        if len > 0 {
            self.segments.push(Segment { addr, len });
            self.len += u64::from(len);
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// The buffers, in order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Keeps the first `at` bytes and returns the rest; `None` when `at` is
    /// beyond the end or a split address would overflow.
    pub fn split_off(&mut self, at: u64) -> Option<Buffers> {
        if at > self.len {
            return None;
        }
        let mut tail = Buffers::default();
        let mut kept: u64 = 0;
        let mut index = 0;
        while index < self.segments.len() {
            let seg = self.segments[index];
            let end = kept + u64::from(seg.len);
            if end <= at {
                kept = end;
                index += 1;
                continue;
            }
            // This segment straddles `at` (or lies wholly after it).
            let head_len = u32::try_from(at - kept).ok()?;
            if head_len > 0 {
                let rest = seg.addr.checked_add(u64::from(head_len))?;
                tail.push(rest, seg.len - head_len);
                self.segments[index].len = head_len;
                index += 1;
            }
            break;
        }
        for seg in self.segments.drain(index..) {
            tail.push(seg.addr, seg.len);
        }
        self.len = at;
        Some(tail)
    }

    /// Fills `buf` from the start of the buffers; false when they are too
    /// short or lie outside guest memory.
    pub fn read_prefix<M: GuestMemory>(&self, mem: &M, buf: &mut [u8]) -> bool {
        let mut done = 0;
        for seg in &self.segments {
            if done == buf.len() {
                break;
            }
            let take = (buf.len() - done).min(seg.len as usize);
            if mem
                .read_slice(&mut buf[done..done + take], seg.addr)
                .is_err()
            {
                return false;
            }
            done += take;
        }
        done == buf.len()
    }

    /// Copies `data` to the start of the buffers (as much as fits); returns
    /// the bytes written, or `None` when guest memory refused them.
    pub fn write_prefix<M: GuestMemory>(&self, mem: &M, data: &[u8]) -> Option<usize> {
        let mut done = 0;
        for seg in &self.segments {
            if done == data.len() {
                break;
            }
            let take = (data.len() - done).min(seg.len as usize);
            mem.write_slice(&data[done..done + take], seg.addr).ok()?;
            done += take;
        }
        Some(done)
    }
}

/// Why a chain has no well-defined end (and so no status byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum ChainError {
    /// The head yielded no descriptor (unreadable, or a bad indirect table).
    #[error("empty or unreadable descriptor chain")]
    Empty,
    /// More descriptors than a chain may hold.
    #[error("descriptor chain longer than {0} descriptors")]
    TooLong(usize),
    /// The walk stopped at a descriptor that still had NEXT set: a loop, a
    /// next index outside the table, an unreadable descriptor, or lengths
    /// summing past 4 GiB.
    #[error("descriptor chain cut short (loop, bad next index or length overflow)")]
    Truncated,
}

/// A chain split by direction.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Layout {
    /// Device-readable buffers, in chain order.
    pub readable: Buffers,
    /// Device-writable buffers, in chain order.
    pub writable: Buffers,
    /// A device-readable descriptor came after a device-writable one.
    pub misordered: bool,
}

/// Walks a chain of at most `max_descriptors` descriptors.
pub(super) fn collect<I>(descriptors: I, max_descriptors: usize) -> Result<Layout, ChainError>
where
    I: IntoIterator<Item = Descriptor>,
{
    let mut layout = Layout::default();
    let mut count = 0usize;
    let mut seen_writable = false;
    let mut last_has_next = false;
    for desc in descriptors {
        count += 1;
        if count > max_descriptors {
            return Err(ChainError::TooLong(max_descriptors));
        }
        tracing::trace!(
            addr = desc.addr().0,
            len = desc.len(),
            flags = desc.flags(),
            "blk: descriptor"
        );
        last_has_next = desc.has_next();
        if desc.is_write_only() {
            seen_writable = true;
            layout.writable.push(desc.addr(), desc.len());
        } else {
            layout.misordered |= seen_writable;
            layout.readable.push(desc.addr(), desc.len());
        }
    }
    if count == 0 {
        return Err(ChainError::Empty);
    }
    if last_has_next {
        return Err(ChainError::Truncated);
    }
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestMemoryMmap;

    fn buffers(parts: &[(u64, u32)]) -> Buffers {
        let mut b = Buffers::default();
        for &(addr, len) in parts {
            b.push(GuestAddress(addr), len);
        }
        b
    }

    fn desc(addr: u64, len: u32, flags: u32) -> Descriptor {
        Descriptor::new(addr, len, u16::try_from(flags).unwrap(), 0)
    }

    #[test]
    fn split_inside_a_segment() {
        let mut b = buffers(&[(0x1000, 16), (0x2000, 8)]);
        let tail = b.split_off(10).unwrap();
        assert_eq!(b, buffers(&[(0x1000, 10)]));
        assert_eq!(tail, buffers(&[(0x100a, 6), (0x2000, 8)]));
    }

    #[test]
    fn split_on_a_boundary_and_at_the_ends() {
        let mut b = buffers(&[(0x1000, 16), (0x2000, 8)]);
        let tail = b.split_off(16).unwrap();
        assert_eq!(b, buffers(&[(0x1000, 16)]));
        assert_eq!(tail, buffers(&[(0x2000, 8)]));

        let mut b = buffers(&[(0x1000, 16)]);
        assert_eq!(b.split_off(16).unwrap().len(), 0);
        assert_eq!(b.split_off(0).unwrap().len(), 16);
        assert_eq!(b.len(), 0);
        assert!(b.split_off(1).is_none());
    }

    #[test]
    fn split_refuses_address_overflow() {
        let mut b = buffers(&[(u64::MAX, 16)]);
        assert!(b.split_off(4).is_none());
    }

    #[test]
    fn prefix_reads_span_segments() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        mem.write_slice(&[1, 2, 3], GuestAddress(0x100)).unwrap();
        mem.write_slice(&[4, 5], GuestAddress(0x200)).unwrap();
        let b = buffers(&[(0x100, 3), (0x200, 2)]);
        let mut got = [0u8; 5];
        assert!(b.read_prefix(&mem, &mut got));
        assert_eq!(got, [1, 2, 3, 4, 5]);
        let mut too_long = [0u8; 6];
        assert!(!b.read_prefix(&mem, &mut too_long));
        let outside = buffers(&[(0xffff_0000, 4)]);
        assert!(!outside.read_prefix(&mem, &mut [0u8; 4]));
    }

    #[test]
    fn collect_splits_by_direction() {
        let layout = collect(
            [
                desc(0x1000, 16, VRING_DESC_F_NEXT),
                desc(0x2000, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT),
                desc(0x3000, 1, VRING_DESC_F_WRITE),
            ],
            8,
        )
        .unwrap();
        assert_eq!(layout.readable.len(), 16);
        assert_eq!(layout.writable.len(), 513);
        assert!(!layout.misordered);
    }

    #[test]
    fn collect_flags_readable_after_writable() {
        let layout = collect(
            [
                desc(0x1000, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT),
                desc(0x2000, 16, VRING_DESC_F_NEXT),
                desc(0x3000, 1, VRING_DESC_F_WRITE),
            ],
            8,
        )
        .unwrap();
        assert!(layout.misordered);
    }

    #[test]
    fn collect_refuses_cut_short_and_overlong_chains() {
        assert_eq!(
            collect([desc(0x1000, 16, VRING_DESC_F_NEXT)], 8),
            Err(ChainError::Truncated)
        );
        assert_eq!(
            collect(
                std::iter::repeat_n(desc(0x1000, 1, VRING_DESC_F_NEXT), 9),
                8
            ),
            Err(ChainError::TooLong(8))
        );
        assert_eq!(collect([], 8), Err(ChainError::Empty));
    }
}
