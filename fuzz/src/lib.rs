//! What the fuzz targets share: split queues laid out in fuzzed guest
//! memory, and the fd a device puts in its epoll set.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

use virtio_queue::{Queue, QueueT};

/// Descriptors per fuzzed queue.
pub const QUEUE_SIZE: u16 = 16;

/// A ready split queue of [`QUEUE_SIZE`] whose descriptor table, available
/// ring and used ring sit at `layout`'s guest addresses.
pub fn queue(layout: (u32, u32, u32), event_idx: bool) -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).expect("queue");
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(layout.0), Some(0));
    q.set_avail_ring_address(Some(layout.1), Some(0));
    q.set_used_ring_address(Some(layout.2), Some(0));
    q.set_event_idx(event_idx);
    q.set_ready(true);
    q
}

/// An fd the device can put in its epoll set, made once per process.
pub fn poll_fd() -> RawFd {
    static FD: OnceLock<OwnedFd> = OnceLock::new();
    FD.get_or_init(|| {
        let (read, _write) = std::io::pipe().expect("pipe");
        OwnedFd::from(read)
    })
    .as_fd()
    .as_raw_fd()
}

/// Guest memory of `size` bytes holding `image` (cut to fit) from address 0.
pub fn guest_memory(image: &[u8], size: usize) -> vm_memory::GuestMemoryMmap<()> {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).expect("guest memory");
    let n = image.len().min(size);
    mem.write_slice(&image[..n], GuestAddress(0))
        .expect("fill guest memory");
    mem
}
