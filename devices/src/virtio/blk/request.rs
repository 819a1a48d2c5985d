//! Serving block requests from a virtio queue (virtio 1.2, section 5.2.6),
//! with no fds or threads of its own.
//!
//! Every chain is first split by direction ([`super::chain`]). Its status
//! byte is the last device-writable byte. A chain with a status byte is
//! always completed: the request is checked (header, directions, lengths,
//! sector range, guest addresses) before any I/O, and anything wrong with
//! it becomes `VIRTIO_BLK_S_IOERR` (or `VIRTIO_BLK_S_UNSUPP` for a request
//! the device does not do). A chain with no status byte — none writable,
//! the byte outside guest memory, or no well-defined end (a loop, too many
//! descriptors, a bad next index, lengths summing past 4 GiB) — cannot be
//! answered: it is not returned to the driver, only counted as malformed
//! and logged.

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemory, Permissions};

use super::chain::{self, Buffers, Layout};
use super::disk::Disk;
use super::{
    BlkError, Result, DISCARD_SEGMENT_LEN, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG,
    REQUEST_HEADER_LEN, SECTOR_SIZE, SEG_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

/// What requests are served against.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext<'a> {
    /// The backing store.
    pub disk: &'a Disk,
    /// The id string for VIRTIO_BLK_T_GET_ID, NUL-padded.
    pub serial: &'a [u8; VIRTIO_BLK_ID_BYTES],
    /// VIRTIO_BLK_F_DISCARD was negotiated.
    pub discard: bool,
    /// VIRTIO_BLK_F_WRITE_ZEROES was negotiated.
    pub write_zeroes: bool,
}

/// What one pass over the queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlkStats {
    /// Chains completed (returned to the driver with a status).
    pub requests: u64,
    /// Bytes read from the disk into guest memory.
    pub read_bytes: u64,
    /// Bytes written from guest memory to the disk.
    pub write_bytes: u64,
    /// Requests completed with `VIRTIO_BLK_S_IOERR`.
    pub io_errors: u64,
    /// Requests completed with `VIRTIO_BLK_S_UNSUPP`.
    pub unsupported: u64,
    /// Chains with no status byte, dropped without being returned.
    pub malformed: u64,
}

impl BlkStats {
    /// Adds another pass's counts.
    pub fn add(&mut self, other: &BlkStats) {
        self.requests += other.requests;
        self.read_bytes += other.read_bytes;
        self.write_bytes += other.write_bytes;
        self.io_errors += other.io_errors;
        self.unsupported += other.unsupported;
        self.malformed += other.malformed;
    }
}

/// How a request ended: its status and the bytes written into the chain
/// ahead of the status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outcome {
    status: u8,
    written: u64,
}

impl Outcome {
    const fn ok(written: u64) -> Self {
        Self {
            status: VIRTIO_BLK_S_OK,
            written,
        }
    }

    const fn ioerr(written: u64) -> Self {
        Self {
            status: VIRTIO_BLK_S_IOERR,
            written,
        }
    }

    const UNSUPP: Self = Self {
        status: VIRTIO_BLK_S_UNSUPP,
        written: 0,
    };
}

/// Serves every request available on `queue`, returning what it did and
/// whether the driver must be notified.
pub fn process_queue<Q, M>(
    queue: &mut Q,
    mem: &M,
    ctx: &RequestContext<'_>,
) -> Result<(BlkStats, bool)>
where
    Q: QueueT + QueueOwnedT,
    M: GuestMemory,
{
    let mut stats = BlkStats::default();
    // A chain may be as long as the queue, and always long enough for the
    // segments the configuration promises.
    let max_descriptors = usize::from(queue.size()).max(SEG_MAX as usize + 2);
    // Event-index drivers only kick again once we re-enable notifications,
    // so drain, re-enable, and go round if more arrived meanwhile.
    loop {
        queue.disable_notification(mem).map_err(BlkError::Queue)?;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match serve_chain(chain, mem, ctx, max_descriptors, &mut stats) {
                Some(used) => {
                    queue.add_used(mem, head, used).map_err(BlkError::Queue)?;
                    stats.requests += 1;
                }
                None => stats.malformed += 1,
            }
        }
        if !queue.enable_notification(mem).map_err(BlkError::Queue)? {
            break;
        }
        if !crate::virtio::avail_ring_sane(queue, mem).map_err(BlkError::Queue)? {
            // The walk stopped on a bad ring, not an empty one: going round
            // again would spin. The queue stays idle until the driver
            // resets it.
            tracing::warn!(
                next_avail = queue.next_avail(),
                "blk: available ring index runs more than a queue ahead; queue ignored"
            );
            break;
        }
    }
    let notify = stats.requests > 0 && queue.needs_notification(mem).map_err(BlkError::Queue)?;
    Ok((stats, notify))
}

/// Serves one chain; returns the used length (bytes written into the chain,
/// status included), or `None` when the chain has no status byte.
fn serve_chain<I, M>(
    descriptors: I,
    mem: &M,
    ctx: &RequestContext<'_>,
    max_descriptors: usize,
    stats: &mut BlkStats,
) -> Option<u32>
where
    I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
    M: GuestMemory,
{
    let Layout {
        readable,
        mut writable,
        misordered,
    } = match chain::collect(descriptors, max_descriptors) {
        Ok(layout) => layout,
        Err(e) => {
            tracing::debug!(error = %e, "blk: chain dropped");
            return None;
        }
    };
    let Some(status_at) = writable.len().checked_sub(1) else {
        tracing::debug!("blk: chain dropped: no device-writable status byte");
        return None;
    };
    let status_addr = writable.split_off(status_at)?.segments().first()?.addr;
    if !mem.check_range(status_addr, 1, Permissions::Write) {
        tracing::debug!(
            addr = status_addr.0,
            "blk: chain dropped: status byte outside guest memory"
        );
        return None;
    }
    let outcome = if misordered {
        tracing::debug!("blk: device-readable descriptor after a device-writable one");
        Outcome::ioerr(0)
    } else {
        execute(mem, ctx, readable, &writable, stats)
    };
    match outcome.status {
        VIRTIO_BLK_S_IOERR => stats.io_errors += 1,
        VIRTIO_BLK_S_UNSUPP => stats.unsupported += 1,
        _ => {}
    }
    if mem.write_obj(outcome.status, status_addr).is_err() {
        return None;
    }
    // The data written lies within a chain of under 4 GiB.
    Some(u32::try_from(outcome.written.saturating_add(1)).unwrap_or(u32::MAX))
}

/// Runs the request whose device-readable part is `readable` and whose
/// device-writable part (status byte excluded) is `writable`.
fn execute<M: GuestMemory>(
    mem: &M,
    ctx: &RequestContext<'_>,
    mut readable: Buffers,
    writable: &Buffers,
    stats: &mut BlkStats,
) -> Outcome {
    let Some(body) = readable.split_off(REQUEST_HEADER_LEN) else {
        tracing::debug!(
            len = readable.len(),
            "blk: request header missing or device-writable"
        );
        return Outcome::ioerr(0);
    };
    let mut header = [0u8; 16];
    if !readable.read_prefix(mem, &mut header) {
        tracing::debug!("blk: request header outside guest memory");
        return Outcome::ioerr(0);
    }
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
    let kind = u32::from_le_bytes([t0, t1, t2, t3]);
    let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    tracing::trace!(kind, sector, "blk: request");
    match kind {
        VIRTIO_BLK_T_IN if body.len() == 0 => read(mem, ctx.disk, sector, writable, stats),
        VIRTIO_BLK_T_OUT if writable.len() == 0 => write(mem, ctx.disk, sector, &body, stats),
        VIRTIO_BLK_T_FLUSH if body.len() == 0 && writable.len() == 0 => match ctx.disk.flush() {
            Ok(()) => Outcome::ok(0),
            Err(e) => {
                tracing::warn!(error = %e, "blk: flush failed");
                Outcome::ioerr(0)
            }
        },
        VIRTIO_BLK_T_GET_ID if body.len() == 0 => match writable.write_prefix(mem, ctx.serial) {
            Some(n) => Outcome::ok(n as u64),
            None => Outcome::ioerr(0),
        },
        VIRTIO_BLK_T_DISCARD if ctx.discard && writable.len() == 0 => {
            discard_or_zero(mem, ctx.disk, &body, false)
        }
        VIRTIO_BLK_T_WRITE_ZEROES if ctx.write_zeroes && writable.len() == 0 => {
            discard_or_zero(mem, ctx.disk, &body, true)
        }
        VIRTIO_BLK_T_IN
        | VIRTIO_BLK_T_OUT
        | VIRTIO_BLK_T_FLUSH
        | VIRTIO_BLK_T_GET_ID
        | VIRTIO_BLK_T_DISCARD
        | VIRTIO_BLK_T_WRITE_ZEROES
            if known(kind, ctx) =>
        {
            tracing::debug!(kind, "blk: data buffer in the wrong direction");
            Outcome::ioerr(0)
        }
        _ => {
            tracing::debug!(kind, "blk: unsupported request type");
            Outcome::UNSUPP
        }
    }
}

/// Whether `kind` is a request this device serves under the negotiated
/// features.
fn known(kind: u32, ctx: &RequestContext<'_>) -> bool {
    match kind {
        VIRTIO_BLK_T_DISCARD => ctx.discard,
        VIRTIO_BLK_T_WRITE_ZEROES => ctx.write_zeroes,
        _ => true,
    }
}

/// The byte offset of `len` bytes at `sector`, if they lie on the disk.
fn disk_offset(disk: &Disk, sector: u64, len: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len)?;
    let size = disk.capacity().checked_mul(SECTOR_SIZE)?;
    (end <= size).then_some(offset)
}

/// Whether every buffer lies in guest memory with `access`.
fn in_guest_memory<M: GuestMemory>(mem: &M, buffers: &Buffers, access: Permissions) -> bool {
    buffers
        .segments()
        .iter()
        .all(|s| mem.check_range(s.addr, s.len as usize, access))
}

/// Checks a read or write of `data` at `sector`: a whole number of sectors,
/// on the disk, in guest memory. Returns the byte offset.
fn check_transfer<M: GuestMemory>(
    mem: &M,
    disk: &Disk,
    sector: u64,
    data: &Buffers,
    access: Permissions,
) -> Option<u64> {
    if !data.len().is_multiple_of(SECTOR_SIZE) {
        tracing::debug!(
            len = data.len(),
            "blk: data is not a whole number of sectors"
        );
        return None;
    }
    let Some(offset) = disk_offset(disk, sector, data.len()) else {
        tracing::debug!(
            sector,
            len = data.len(),
            capacity = disk.capacity(),
            "blk: request beyond the end of the disk"
        );
        return None;
    };
    if !in_guest_memory(mem, data, access) {
        tracing::debug!("blk: data buffer outside guest memory");
        return None;
    }
    Some(offset)
}

fn read<M: GuestMemory>(
    mem: &M,
    disk: &Disk,
    sector: u64,
    data: &Buffers,
    stats: &mut BlkStats,
) -> Outcome {
    let Some(mut offset) = check_transfer(mem, disk, sector, data, Permissions::Write) else {
        return Outcome::ioerr(0);
    };
    let mut done = 0u64;
    for seg in data.segments() {
        if let Err(e) = disk.read_to_guest(offset, mem, seg.addr, seg.len) {
            tracing::warn!(error = %e, offset, "blk: read failed");
            stats.read_bytes += done;
            return Outcome::ioerr(done);
        }
        offset += u64::from(seg.len);
        done += u64::from(seg.len);
    }
    stats.read_bytes += done;
    Outcome::ok(done)
}

fn write<M: GuestMemory>(
    mem: &M,
    disk: &Disk,
    sector: u64,
    data: &Buffers,
    stats: &mut BlkStats,
) -> Outcome {
    if disk.read_only() {
        tracing::debug!(sector, "blk: write to a read-only disk");
        return Outcome::ioerr(0);
    }
    let Some(mut offset) = check_transfer(mem, disk, sector, data, Permissions::Read) else {
        return Outcome::ioerr(0);
    };
    for seg in data.segments() {
        if let Err(e) = disk.write_from_guest(offset, mem, seg.addr, seg.len) {
            tracing::warn!(error = %e, offset, "blk: write failed");
            return Outcome::ioerr(0);
        }
        offset += u64::from(seg.len);
        stats.write_bytes += u64::from(seg.len);
    }
    Outcome::ok(0)
}

/// One parsed `struct virtio_blk_discard_write_zeroes`.
#[derive(Debug, Clone, Copy)]
struct Range {
    offset: u64,
    len: u64,
    unmap: bool,
}

/// Serves a discard (`zero` false) or write-zeroes request. Every segment
/// is checked before any is carried out.
fn discard_or_zero<M: GuestMemory>(mem: &M, disk: &Disk, body: &Buffers, zero: bool) -> Outcome {
    if disk.read_only() {
        return Outcome::ioerr(0);
    }
    let count = body.len() / DISCARD_SEGMENT_LEN;
    if body.len() == 0 || !body.len().is_multiple_of(DISCARD_SEGMENT_LEN) {
        tracing::debug!(len = body.len(), "blk: bad discard/write-zeroes payload");
        return Outcome::ioerr(0);
    }
    if count > u64::from(MAX_DISCARD_SEG) {
        return Outcome::UNSUPP;
    }
    let mut raw = [0u8; MAX_DISCARD_SEG as usize * 16];
    let Some(raw) = usize::try_from(body.len())
        .ok()
        .and_then(|n| raw.get_mut(..n))
    else {
        return Outcome::ioerr(0);
    };
    if !body.read_prefix(mem, raw) {
        return Outcome::ioerr(0);
    }
    let mut ranges = Vec::with_capacity(raw.len() / 16);
    for seg in raw.chunks_exact(16) {
        let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] =
            <[u8; 16]>::try_from(seg).unwrap_or([0; 16]);
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let sectors = u32::from_le_bytes([n0, n1, n2, n3]);
        let flags = u32::from_le_bytes([f0, f1, f2, f3]);
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        // Unknown flags, and unmap on a discard, are unsupported (5.2.6.2).
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (!zero && unmap) {
            return Outcome::UNSUPP;
        }
        if sectors > MAX_DISCARD_SECTORS {
            return Outcome::ioerr(0);
        }
        let len = u64::from(sectors) * SECTOR_SIZE;
        let Some(offset) = disk_offset(disk, sector, len) else {
            tracing::debug!(sector, sectors, "blk: discard beyond the end of the disk");
            return Outcome::ioerr(0);
        };
        ranges.push(Range { offset, len, unmap });
    }
    for r in ranges {
        let done = if zero {
            disk.write_zeroes(r.offset, r.len, r.unmap)
        } else {
            disk.discard(r.offset, r.len)
        };
        if let Err(e) = done {
            tracing::warn!(error = %e, offset = r.offset, "blk: discard/write-zeroes failed");
            return Outcome::ioerr(0);
        }
    }
    Outcome::ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const HEADER: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    const R: u32 = 0;
    const W: u32 = VRING_DESC_F_WRITE;
    /// Sectors on the test disk.
    const SECTORS: u64 = 64;

    struct Fixture {
        mem: GuestMemoryMmap,
        file: tempfile::NamedTempFile,
        disk: Disk,
        serial: [u8; VIRTIO_BLK_ID_BYTES],
    }

    /// Byte `i` of the test disk's original contents.
    fn pattern(i: usize) -> u8 {
        u8::try_from(i % 253).unwrap()
    }

    fn original() -> Vec<u8> {
        (0..usize::try_from(SECTORS * SECTOR_SIZE).unwrap())
            .map(pattern)
            .collect()
    }

    impl Fixture {
        fn new(read_only: bool) -> Self {
            let mut file = tempfile::NamedTempFile::new().unwrap();
            file.write_all(&original()).unwrap();
            let disk = Disk::open(file.path(), read_only).unwrap();
            let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
            serial[..9].copy_from_slice(b"capsid-id");
            Self {
                mem: GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
                file,
                disk,
                serial,
            }
        }

        fn ctx(&self) -> RequestContext<'_> {
            RequestContext {
                disk: &self.disk,
                serial: &self.serial,
                discard: true,
                write_zeroes: true,
            }
        }

        fn header(&self, kind: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
            // A status the device must overwrite.
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).unwrap()
        }

        fn on_disk(&self) -> Vec<u8> {
            std::fs::read(self.file.path()).unwrap()
        }

        /// Serves one chain (NEXT links filled in) on a queue of `size`.
        fn serve(&self, descs: &[RawDescriptor]) -> (BlkStats, Vec<u32>) {
            let vq = MockSplitQueue::new(&self.mem, 16);
            vq.build_desc_chain(descs).unwrap();
            self.run(&vq)
        }

        /// Serves whatever `vq` holds; returns the stats and used lengths.
        fn run(&self, vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> (BlkStats, Vec<u32>) {
            let mut q: Queue = vq.create_queue().unwrap();
            let (stats, _) = process_queue(&mut q, &self.mem, &self.ctx()).unwrap();
            let used = vq.used().idx().load();
            let lens = (0..used)
                .map(|i| {
                    vq.used()
                        .ring()
                        .ref_at(usize::from(i))
                        .unwrap()
                        .load()
                        .len()
                })
                .collect();
            (stats, lens)
        }
    }

    fn desc(addr: u64, len: u32, flags: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            u16::try_from(flags).unwrap(),
            0,
        ))
    }

    fn linked(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            u16::try_from(flags | VRING_DESC_F_NEXT).unwrap(),
            next,
        ))
    }

    fn status_desc() -> RawDescriptor {
        desc(STATUS, 1, W)
    }

    #[test]
    fn read_fills_guest_buffers() {
        let f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_IN, 2);
        let (stats, used) = f.serve(&[
            desc(HEADER, 16, R),
            desc(DATA, 512, W),
            desc(DATA + 0x1000, 1024, W),
            status_desc(),
        ]);
        assert_eq!(f.status(), VIRTIO_BLK_S_OK);
        assert_eq!(used, [1537]);
        assert_eq!(stats.read_bytes, 1536);
        let mut got = vec![0u8; 1024];
        f.mem
            .read_slice(&mut got, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert_eq!(got, &original()[1536..2560]);
    }

    #[test]
    fn write_reaches_the_file() {
        let f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_OUT, 3);
        f.mem
            .write_slice(&[0x5a; 1024], GuestAddress(DATA))
            .unwrap();
        let (stats, used) = f.serve(&[desc(HEADER, 16, R), desc(DATA, 1024, R), status_desc()]);
        assert_eq!(f.status(), VIRTIO_BLK_S_OK);
        assert_eq!(used, [1]);
        assert_eq!(stats.write_bytes, 1024);
        let disk = f.on_disk();
        assert_eq!(&disk[1536..2560], &[0x5a; 1024][..]);
        assert_eq!(&disk[..1536], &original()[..1536]);
        assert_eq!(&disk[2560..], &original()[2560..]);
    }

    #[test]
    fn header_and_data_may_share_a_descriptor() {
        let f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_OUT, 0);
        f.mem
            .write_slice(&[0x11; 512], GuestAddress(HEADER + 16))
            .unwrap();
        let (_, used) = f.serve(&[desc(HEADER, 16 + 512, R), status_desc()]);
        assert_eq!((f.status(), used), (VIRTIO_BLK_S_OK, vec![1]));
        assert_eq!(&f.on_disk()[..512], &[0x11; 512][..]);
    }

    #[test]
    fn flush_and_get_id() {
        let f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_FLUSH, 0);
        let (_, used) = f.serve(&[desc(HEADER, 16, R), status_desc()]);
        assert_eq!((f.status(), used), (VIRTIO_BLK_S_OK, vec![1]));

        f.header(VIRTIO_BLK_T_GET_ID, 0);
        f.mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();
        let (_, used) = f.serve(&[desc(HEADER, 16, R), desc(DATA, 20, W), status_desc()]);
        assert_eq!((f.status(), used), (VIRTIO_BLK_S_OK, vec![21]));
        let mut id = [0u8; 20];
        f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, &f.serial);
    }

    #[test]
    fn unknown_type_is_unsupported() {
        let f = Fixture::new(false);
        f.header(0x77, 0);
        let (stats, used) = f.serve(&[desc(HEADER, 16, R), status_desc()]);
        assert_eq!((f.status(), used), (VIRTIO_BLK_S_UNSUPP, vec![1]));
        assert_eq!(stats.unsupported, 1);
    }

    #[test]
    fn data_outside_guest_memory_is_an_io_error() {
        let f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_OUT, 0);
        let (stats, used) = f.serve(&[
            desc(HEADER, 16, R),
            desc(0xffff_0000, 512, R),
            status_desc(),
        ]);
        assert_eq!((f.status(), used), (VIRTIO_BLK_S_IOERR, vec![1]));
        assert_eq!(stats.io_errors, 1);
        assert_eq!(f.on_disk(), original());

        // A buffer running off the end of guest memory, and one whose end
        // overflows the address space.
        f.header(VIRTIO_BLK_T_IN, 0);
        for addr in [0x10_0000 - 256, u64::MAX - 100] {
            let (_, used) = f.serve(&[desc(HEADER, 16, R), desc(addr, 512, W), status_desc()]);
            assert_eq!((f.status(), used), (VIRTIO_BLK_S_IOERR, vec![1]));
        }
        // A header outside guest memory.
        let (_, used) = f.serve(&[desc(u64::MAX - 8, 16, R), status_desc()]);
        assert_eq!((f.status(), used), (VIRTIO_BLK_S_IOERR, vec![1]));
    }

    #[test]
    fn header_in_a_writable_descriptor_is_an_io_error() {
        let f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_IN, 0);
        let (_, used) = f.serve(&[desc(HEADER, 16, W), desc(DATA, 512, W), status_desc()]);
        assert_eq!((f.status(), used), (VIRTIO_BLK_S_IOERR, vec![1]));
    }

    #[test]
    fn data_in_the_wrong_direction_is_an_io_error() {
        let f = Fixture::new(false);
        // A read whose buffer the device may not write.
        f.header(VIRTIO_BLK_T_IN, 0);
        f.mem.write_slice(&[0x33; 512], GuestAddress(DATA)).unwrap();
        let (_, used) = f.serve(&[desc(HEADER, 16, R), desc(DATA, 512, R), status_desc()]);
        assert_eq!((f.status(), used), (VIRTIO_BLK_S_IOERR, vec![1]));
        let mut got = [0u8; 512];
        f.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, [0x33; 512], "guest buffer left alone");

        // A write whose data is device-writable.
        f.header(VIRTIO_BLK_T_OUT, 0);
        let (_, used) = f.serve(&[desc(HEADER, 16, R), desc(DATA, 512, W), status_desc()]);
        assert_eq!((f.status(), used), (VIRTIO_BLK_S_IOERR, vec![1]));
        assert_eq!(f.on_disk(), original());

        // A device-readable descriptor after a device-writable one.
        f.header(VIRTIO_BLK_T_OUT, 0);
        let (_, used) = f.serve(&[
            desc(HEADER, 16, R),
            desc(DATA, 512, W),
            desc(DATA + 0x1000, 512, R),
            status_desc(),
        ]);
        assert_eq!((f.status(), used), (VIRTIO_BLK_S_IOERR, vec![1]));
        assert_eq!(f.on_disk(), original());
    }

    #[test]
    fn partial_sector_is_an_io_error() {
        let f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_OUT, 0);
        let (_, used) = f.serve(&[desc(HEADER, 16, R), desc(DATA, 100, R), status_desc()]);
        assert_eq!((f.status(), used), (VIRTIO_BLK_S_IOERR, vec![1]));
        assert_eq!(f.on_disk(), original());
    }

    #[test]
    fn lengths_overflowing_u32_drop_the_chain() {
        let f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_IN, 0);
        // The walk stops where the running length would pass 4 GiB, so the
        // chain has no end and no status byte to answer through.
        let (stats, used) = f.serve(&[
            desc(HEADER, 16, R),
            desc(DATA, u32::MAX, W),
            desc(DATA, u32::MAX, W),
            status_desc(),
        ]);
        assert_eq!(stats.malformed, 1);
        assert!(used.is_empty());
        assert_eq!(f.status(), 0xff, "status byte untouched");
    }

    #[test]
    fn huge_lengths_within_u32_are_an_io_error() {
        let f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_IN, 0);
        let (stats, used) = f.serve(&[
            desc(HEADER, 16, R),
            desc(DATA, 0x8000_0000, W),
            desc(DATA, 0x7fff_0000, W),
            status_desc(),
        ]);
        assert_eq!((f.status(), used), (VIRTIO_BLK_S_IOERR, vec![1]));
        assert_eq!(stats.read_bytes, 0);
    }

    #[test]
    fn descriptor_loop_drops_the_chain() {
        let f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_IN, 0);
        let vq = MockSplitQueue::new(&f.mem, 16);
        vq.add_desc_chains(
            &[
                linked(HEADER, 16, R, 1),
                linked(DATA, 512, W, 2),
                linked(STATUS, 1, W, 1),
            ],
            0,
        )
        .unwrap();
        let (stats, used) = f.run(&vq);
        assert_eq!(stats.malformed, 1);
        assert!(used.is_empty());
    }

    #[test]
    fn next_index_outside_the_table_drops_the_chain() {
        let f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_IN, 0);
        let vq = MockSplitQueue::new(&f.mem, 16);
        vq.add_desc_chains(&[linked(HEADER, 16, R, 1), linked(STATUS, 1, W, 999)], 0)
            .unwrap();
        let (stats, used) = f.run(&vq);
        assert_eq!((stats.malformed, used.len()), (1, 0));
    }

    /// Puts `descs` (linked in order) in an indirect table and queues it.
    fn indirect(f: &Fixture, vq: &MockSplitQueue<'_, GuestMemoryMmap>, descs: &[RawDescriptor]) {
        const TABLE: u64 = 0x8_0000;
        for (i, d) in descs.iter().enumerate() {
            let d = SplitDescriptor::from(*d);
            let last = i + 1 == descs.len();
            let flags = if last {
                d.flags()
            } else {
                d.flags() | u16::try_from(VRING_DESC_F_NEXT).unwrap()
            };
            let raw =
                SplitDescriptor::new(d.addr().0, d.len(), flags, u16::try_from(i + 1).unwrap());
            f.mem
                .write_obj(raw, GuestAddress(TABLE + 16 * i as u64))
                .unwrap();
        }
        let len = u32::try_from(16 * descs.len()).unwrap();
        vq.add_desc_chains(&[desc(TABLE, len, VRING_DESC_F_INDIRECT)], 0)
            .unwrap();
    }

    #[test]
    fn chain_longer_than_the_queue_is_dropped() {
        let f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_IN, 0);
        let vq = MockSplitQueue::new(&f.mem, 256);
        let mut descs = vec![desc(HEADER, 16, R)];
        descs.extend((0..255).map(|i| desc(DATA + 512 * i, 512, W)));
        descs.push(status_desc());
        assert_eq!(descs.len(), 257);
        indirect(&f, &vq, &descs);
        let (stats, used) = f.run(&vq);
        assert_eq!((stats.malformed, used.len()), (1, 0));
        assert_eq!(f.status(), 0xff);
    }

    #[test]
    fn seg_max_segments_fit_a_small_queue() {
        let f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_IN, 0);
        let vq = MockSplitQueue::new(&f.mem, 16);
        let mut descs = vec![desc(HEADER, 16, R)];
        descs.extend((0..u64::from(SEG_MAX) / 2).flat_map(|i| {
            [
                desc(DATA + 512 * i, 256, W),
                desc(DATA + 512 * i + 256, 256, W),
            ]
        }));
        descs.push(status_desc());
        assert_eq!(descs.len(), SEG_MAX as usize + 2);
        indirect(&f, &vq, &descs);
        let (stats, used) = f.run(&vq);
        assert_eq!(f.status(), VIRTIO_BLK_S_OK);
        assert_eq!(used, [SEG_MAX * 256 + 1]);
        assert_eq!(stats.read_bytes, u64::from(SEG_MAX) * 256);
    }

    #[test]
    fn sector_beyond_capacity_is_an_io_error() {
        let f = Fixture::new(false);
        for (sector, len) in [
            (SECTORS, 512),
            (SECTORS - 1, 1024),
            (u64::MAX, 512),
            (u64::MAX / 512, 1024),
        ] {
            f.header(VIRTIO_BLK_T_OUT, sector);
            let (_, used) = f.serve(&[desc(HEADER, 16, R), desc(DATA, len, R), status_desc()]);
            assert_eq!(
                (f.status(), used),
                (VIRTIO_BLK_S_IOERR, vec![1]),
                "sector {sector}"
            );
            f.header(VIRTIO_BLK_T_IN, sector);
            let (_, used) = f.serve(&[desc(HEADER, 16, R), desc(DATA, len, W), status_desc()]);
            assert_eq!(
                (f.status(), used),
                (VIRTIO_BLK_S_IOERR, vec![1]),
                "sector {sector}"
            );
        }
        assert_eq!(f.on_disk(), original());
        // The last sector itself is fine.
        f.header(VIRTIO_BLK_T_IN, SECTORS - 1);
        let (_, used) = f.serve(&[desc(HEADER, 16, R), desc(DATA, 512, W), status_desc()]);
        assert_eq!((f.status(), used), (VIRTIO_BLK_S_OK, vec![513]));
    }

    #[test]
    fn chain_without_a_status_byte_is_dropped() {
        let f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_FLUSH, 0);
        // Nothing device-writable.
        let (stats, used) = f.serve(&[desc(HEADER, 16, R)]);
        assert_eq!((stats.malformed, used.len()), (1, 0));
        // Only an empty device-writable descriptor.
        let (stats, used) = f.serve(&[desc(HEADER, 16, R), desc(STATUS, 0, W)]);
        assert_eq!((stats.malformed, used.len()), (1, 0));
        // The status byte outside guest memory.
        f.header(VIRTIO_BLK_T_OUT, 0);
        let (stats, used) = f.serve(&[
            desc(HEADER, 16, R),
            desc(DATA, 512, R),
            desc(0xffff_0000, 1, W),
        ]);
        assert_eq!((stats.malformed, used.len()), (1, 0));
        assert_eq!(f.on_disk(), original(), "no I/O for an unanswerable chain");
    }

    #[test]
    fn status_is_the_last_writable_byte() {
        let f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_IN, 0);
        // Data and status in one descriptor: 512 data bytes then the status.
        let (_, used) = f.serve(&[desc(HEADER, 16, R), desc(DATA, 513, W)]);
        assert_eq!(used, [513]);
        assert_eq!(f.mem.read_obj::<u8>(GuestAddress(DATA + 512)).unwrap(), 0);
        let mut got = vec![0u8; 512];
        f.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, &original()[..512]);
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let f = Fixture::new(true);
        f.mem.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
        f.header(VIRTIO_BLK_T_OUT, 0);
        let (stats, used) = f.serve(&[desc(HEADER, 16, R), desc(DATA, 512, R), status_desc()]);
        assert_eq!((f.status(), used), (VIRTIO_BLK_S_IOERR, vec![1]));
        assert_eq!(stats.write_bytes, 0);
        for kind in [VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD] {
            f.header(kind, 0);
            let seg = segment(0, 8, 0);
            f.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
            let (_, used) = f.serve(&[desc(HEADER, 16, R), desc(DATA, 16, R), status_desc()]);
            assert_eq!((f.status(), used), (VIRTIO_BLK_S_IOERR, vec![1]));
        }
        assert_eq!(f.on_disk(), original());
        // Reads and flushes still work.
        f.header(VIRTIO_BLK_T_IN, 1);
        let (_, used) = f.serve(&[desc(HEADER, 16, R), desc(DATA, 512, W), status_desc()]);
        assert_eq!((f.status(), used), (VIRTIO_BLK_S_OK, vec![513]));
        f.header(VIRTIO_BLK_T_FLUSH, 0);
        let (_, used) = f.serve(&[desc(HEADER, 16, R), status_desc()]);
        assert_eq!((f.status(), used), (VIRTIO_BLK_S_OK, vec![1]));
    }

    fn segment(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        s
    }

    fn discard_request(f: &Fixture, kind: u32, segments: &[[u8; 16]]) -> (u8, Vec<u32>) {
        f.header(kind, 0);
        let bytes: Vec<u8> = segments.concat();
        f.mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
        let len = u32::try_from(bytes.len()).unwrap();
        let (_, used) = f.serve(&[desc(HEADER, 16, R), desc(DATA, len, R), status_desc()]);
        (f.status(), used)
    }

    #[test]
    fn write_zeroes_and_discard() {
        let f = Fixture::new(false);
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        assert_eq!(
            discard_request(
                &f,
                VIRTIO_BLK_T_WRITE_ZEROES,
                &[segment(1, 2, 0), segment(8, 8, unmap)]
            ),
            (VIRTIO_BLK_S_OK, vec![1])
        );
        let disk = f.on_disk();
        assert_eq!(&disk[..512], &original()[..512]);
        assert!(disk[512..1536].iter().all(|&b| b == 0));
        assert_eq!(&disk[1536..4096], &original()[1536..4096]);
        assert!(disk[4096..8192].iter().all(|&b| b == 0));
        assert_eq!(disk.len(), original().len());

        assert_eq!(
            discard_request(&f, VIRTIO_BLK_T_DISCARD, &[segment(16, 8, 0)]),
            (VIRTIO_BLK_S_OK, vec![1])
        );
    }

    #[test]
    fn bad_discard_requests() {
        let f = Fixture::new(false);
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        let cases: &[(u32, Vec<[u8; 16]>, u8)] = &[
            // Unmap on a discard, unknown flags.
            (
                VIRTIO_BLK_T_DISCARD,
                vec![segment(0, 8, unmap)],
                VIRTIO_BLK_S_UNSUPP,
            ),
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                vec![segment(0, 8, 4)],
                VIRTIO_BLK_S_UNSUPP,
            ),
            // Past the end, or overflowing.
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                vec![segment(SECTORS - 1, 2, 0)],
                VIRTIO_BLK_S_IOERR,
            ),
            (
                VIRTIO_BLK_T_DISCARD,
                vec![segment(u64::MAX, 1, 0)],
                VIRTIO_BLK_S_IOERR,
            ),
            // Too big a segment, too many segments.
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                vec![segment(0, MAX_DISCARD_SECTORS + 1, 0)],
                VIRTIO_BLK_S_IOERR,
            ),
            (
                VIRTIO_BLK_T_DISCARD,
                vec![segment(0, 1, 0); MAX_DISCARD_SEG as usize + 1],
                VIRTIO_BLK_S_UNSUPP,
            ),
            // One bad segment spoils the request before any is done.
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                vec![segment(0, 8, 0), segment(SECTORS, 1, 0)],
                VIRTIO_BLK_S_IOERR,
            ),
        ];
        for (kind, segs, want) in cases {
            assert_eq!(
                discard_request(&f, *kind, segs),
                (*want, vec![1]),
                "{segs:?}"
            );
        }
        assert_eq!(f.on_disk(), original());
        // A payload that is not whole segments.
        f.header(VIRTIO_BLK_T_DISCARD, 0);
        let (_, used) = f.serve(&[desc(HEADER, 16, R), desc(DATA, 10, R), status_desc()]);
        assert_eq!((f.status(), used), (VIRTIO_BLK_S_IOERR, vec![1]));
    }

    #[test]
    fn unnegotiated_discard_is_unsupported() {
        let f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_DISCARD, 0);
        f.mem
            .write_slice(&segment(0, 8, 0), GuestAddress(DATA))
            .unwrap();
        let vq = MockSplitQueue::new(&f.mem, 16);
        vq.build_desc_chain(&[desc(HEADER, 16, R), desc(DATA, 16, R), status_desc()])
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let ctx = RequestContext {
            discard: false,
            ..f.ctx()
        };
        let (stats, _) = process_queue(&mut q, &f.mem, &ctx).unwrap();
        assert_eq!(stats.unsupported, 1);
        assert_eq!(f.status(), VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn avail_index_far_ahead_does_not_spin() {
        let f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_FLUSH, 0);
        let vq = MockSplitQueue::new(&f.mem, 16);
        vq.build_desc_chain(&[desc(HEADER, 16, R), status_desc()])
            .unwrap();
        // The driver claims 40 new entries on a queue of 16.
        vq.avail().idx().store(40);
        let (stats, used) = f.run(&vq);
        assert_eq!(stats, BlkStats::default());
        assert!(used.is_empty());
    }

    #[test]
    fn several_chains_in_one_pass() {
        let f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_IN, 0);
        let vq = MockSplitQueue::new(&f.mem, 16);
        vq.add_desc_chains(
            &[
                linked(HEADER, 16, R, 1),
                linked(DATA, 512, W, 2),
                desc(STATUS, 1, W),
                // A chain without a status byte between two good ones.
                desc(HEADER, 16, R),
                linked(HEADER, 16, R, 5),
                desc(STATUS, 1, W),
            ],
            0,
        )
        .unwrap();
        let (stats, used) = f.run(&vq);
        assert_eq!(stats.requests, 2);
        assert_eq!(stats.malformed, 1);
        assert_eq!(used, [513, 1]);
    }
}
