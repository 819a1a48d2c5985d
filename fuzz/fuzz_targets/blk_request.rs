//! Fuzzes the virtio-blk request path: the input is guest memory holding a
//! split queue (descriptor table, available ring) and whatever the
//! descriptors point at; every available chain is served against a small
//! disk. Nothing may panic, whatever the rings say.

#![no_main]

use std::sync::OnceLock;

use capsid_devices::virtio::blk::{process_queue, Disk, RequestContext, SECTOR_SIZE};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const QUEUE_SIZE: u16 = 16;
const MEM_SIZE: usize = 0x1_0000;
/// 16 descriptors of 16 bytes.
const DESC_TABLE: u32 = 0x0;
/// flags, idx, 16 ring entries, used_event.
const AVAIL_RING: u32 = 0x100;
/// flags, idx, 16 elements of 8 bytes, avail_event.
const USED_RING: u32 = 0x200;
/// Sectors on the fuzzed disks.
const DISK_SECTORS: u64 = 64;

/// A read-write and a read-only disk, made once per process.
fn disks() -> &'static (Disk, Disk) {
    static DISKS: OnceLock<(Disk, Disk)> = OnceLock::new();
    DISKS.get_or_init(|| {
        let make = |read_only| {
            let file = tempfile::tempfile().expect("temp file");
            file.set_len(DISK_SECTORS * SECTOR_SIZE)
                .expect("size temp file");
            Disk::from_file(file, read_only).expect("disk")
        };
        (make(false), make(true))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, image)) = data.split_first() else {
        return;
    };
    let mem = capsid_fuzz::guest_memory(image, MEM_SIZE);
    // Keep the number of chains per run small; the ring wraps anyway.
    let avail_idx = GuestAddress(u64::from(AVAIL_RING) + 2);
    let idx: u16 = mem.read_obj(avail_idx).expect("avail idx");
    mem.write_obj(idx % 64, avail_idx).expect("avail idx");

    let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(DESC_TABLE), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING), Some(0));
    queue.set_used_ring_address(Some(USED_RING), Some(0));
    queue.set_event_idx(control & 1 != 0);
    queue.set_ready(true);

    let (rw, ro) = disks();
    let serial = *b"capsid-fuzz-disk\0\0\0\0";
    let ctx = RequestContext {
        disk: if control & 2 != 0 { ro } else { rw },
        serial: &serial,
        discard: control & 4 != 0,
        write_zeroes: control & 8 != 0,
    };
    let _ = process_queue(&mut queue, &mem, &ctx);
});
