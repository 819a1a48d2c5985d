//! Fuzzes the virtio-vsock device from the guest side: the input is guest
//! memory holding a tx and an rx split queue and whatever their descriptors
//! point at. Every tx chain is parsed and handled, then rx is filled. A
//! host service listens on port 1, so connections really open and carry
//! data. Nothing may panic, whatever the rings say.

#![no_main]

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::sync::{Mutex, OnceLock};

use capsid_devices::virtio::vsock::Vsock;
use capsid_devices::virtio::{DeviceEvent, VirtioDevice};
use capsid_fuzz::queue;
use libfuzzer_sys::fuzz_target;

const MEM_SIZE: usize = 0x2_0000;
/// Ring layouts (descriptor table, available ring, used ring) per queue.
const RX: (u32, u32, u32) = (0x0, 0x100, 0x200);
const TX: (u32, u32, u32) = (0x400, 0x500, 0x600);
const EVT: (u32, u32, u32) = (0x800, 0x900, 0xa00);

fn device() -> &'static Mutex<Vsock> {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    static DEV: OnceLock<Mutex<Vsock>> = OnceLock::new();
    DEV.get_or_init(|| {
        let dir = DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"));
        let uds = dir.path().join("v.sock");
        // A host service on port 1 that reads and discards.
        let listener = UnixListener::bind(format!("{}_1", uds.display())).expect("listener");
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut sink = [0u8; 4096];
                    while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
                });
            }
        });
        Mutex::new(Vsock::new(3, &uds).expect("vsock device"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, image)) = data.split_first() else {
        return;
    };
    let mem = capsid_fuzz::guest_memory(image, MEM_SIZE);
    let mut rx = queue(RX, control & 1 != 0);
    let mut tx = queue(TX, control & 2 != 0);
    let mut evt = queue(EVT, false);
    let Ok(mut dev) = device().lock() else { return };
    let mut queues = [&mut rx, &mut tx, &mut evt];
    let _ = dev.process(DeviceEvent::Queue(1), &mut queues, &mem);
    let _ = dev.process(DeviceEvent::Backend, &mut queues, &mem);
    let _ = dev.process(DeviceEvent::Queue(0), &mut queues, &mem);
});
