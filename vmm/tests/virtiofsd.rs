//! capsid-vmm's virtio-fs frontend against the real virtiofsd
//! (`/usr/local/bin/virtiofsd`, `--sandbox namespace`): the vhost-user
//! handshake at connection and DRIVER_OK on shared guest RAM, then one
//! FUSE_INIT request on the request queue, answered by virtiofsd through
//! its own mapping of guest memory and signalled back as an interrupt with
//! the VRING bit. Skipped, saying so, where virtiofsd is not installed.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsid_devices::hosting::mmio::*;
use capsid_devices::virtio::{DeviceEvent, VIRTIO_F_VERSION_1};
use capsid_vmm::config::FsConfig;
use capsid_vmm::devices::vhost_user::fs::{VhostUserFs, VIRTIO_ID_FS};
use capsid_vmm::vstate::memory::{create_guest_memory, Backing};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const VIRTIOFSD: &str = "/usr/local/bin/virtiofsd";
const FUSE_INIT: u32 = 26;
const UNIQUE: u64 = 0x1234;
/// (descriptors, available ring, used ring) of hiprio and request queue.
const QUEUES: [(u64, u64, u64); 2] = [(0x10000, 0x11000, 0x12000), (0x20000, 0x21000, 0x22000)];
const REQUEST: u64 = 0x30000;
const REPLY: u64 = 0x31000;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_virtiofsd(shared: &Path, socket: &Path) -> Daemon {
    let child = Command::new(VIRTIOFSD)
        .arg("--shared-dir")
        .arg(shared)
        .arg("--socket-path")
        .arg(socket)
        .args(["--sandbox", "namespace", "--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start virtiofsd");
    let mut daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Some(status) = daemon.0.try_wait().unwrap() {
            panic!("virtiofsd exited ({status}) before its socket appeared");
        }
        assert!(Instant::now() < deadline, "no virtiofsd socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    daemon
}

#[derive(Default)]
struct Counter(AtomicU32);

impl Interrupt for Counter {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

type Fs = MmioTransport<VhostUserFs>;

fn r(t: &mut Fs, offset: u64) -> u32 {
    let mut d = [0u8; 4];
    t.read(offset, &mut d);
    u32::from_le_bytes(d)
}

fn w(t: &mut Fs, offset: u64, v: u32) -> TransportEvent {
    t.write(offset, &v.to_le_bytes())
}

/// A FUSE_INIT request (header + `fuse_init_in` of protocol 7.31, no
/// extended flags) in one readable descriptor, a 4 KiB writable one for
/// the answer, on the request queue.
fn post_fuse_init(mem: &GuestMemoryMmap) {
    let mut req = Vec::new();
    let body_len = 64u32;
    req.extend_from_slice(&(40 + body_len).to_le_bytes()); // len
    req.extend_from_slice(&FUSE_INIT.to_le_bytes()); // opcode
    req.extend_from_slice(&UNIQUE.to_le_bytes()); // unique
    req.extend_from_slice(&0u64.to_le_bytes()); // nodeid
    req.extend_from_slice(&[0u8; 16]); // uid, gid, pid, extlen, padding
    req.extend_from_slice(&7u32.to_le_bytes()); // major
    req.extend_from_slice(&31u32.to_le_bytes()); // minor
    req.extend_from_slice(&0x2_0000u32.to_le_bytes()); // max_readahead
    req.extend_from_slice(&[0u8; 52]); // flags, flags2, unused
    mem.write_slice(&req, GuestAddress(REQUEST)).unwrap();
    let (desc, avail, _) = QUEUES[1];
    let mut table = Vec::new();
    // Readable, chained to 1.
    table.extend_from_slice(&REQUEST.to_le_bytes());
    table.extend_from_slice(&u32::try_from(req.len()).unwrap().to_le_bytes());
    table.extend_from_slice(&1u16.to_le_bytes());
    table.extend_from_slice(&1u16.to_le_bytes());
    // Writable.
    table.extend_from_slice(&REPLY.to_le_bytes());
    table.extend_from_slice(&4096u32.to_le_bytes());
    table.extend_from_slice(&2u16.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes());
    mem.write_slice(&table, GuestAddress(desc)).unwrap();
    mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
}

#[test]
fn virtiofsd_takes_the_rings_and_answers_fuse_init() {
    if !Path::new(VIRTIOFSD).exists() {
        eprintln!("SKIPPED: {VIRTIOFSD} is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("share");
    std::fs::create_dir(&shared).unwrap();
    let socket = dir.path().join("virtiofsd.sock");
    let _daemon = start_virtiofsd(&shared, &socket);

    let mem = create_guest_memory(32 << 20, Backing::Shared).unwrap();
    let config = FsConfig::new(&socket, "capsid");
    let kicks: Vec<EventFd> = (0..config.queue_count())
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let clones = kicks.iter().map(|k| k.try_clone().unwrap()).collect();
    // Connection: SET_OWNER, features, protocol features, queue count.
    let dev = VhostUserFs::connect(&config, clones).expect("handshake with virtiofsd");
    assert!(!dev.backend().is_closed());
    let irq = Arc::new(Counter::default());
    let mut t = MmioTransport::new(dev, mem.clone(), irq.clone());
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_FS);
    w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES) & 1, 1, "VERSION_1");

    // The driver's side, as Linux does it.
    w(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    w(
        &mut t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(
        &mut t,
        VIRTIO_MMIO_DRIVER_FEATURES,
        (VIRTIO_F_VERSION_1 >> 32) as u32,
    );
    let features_ok =
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
    w(&mut t, VIRTIO_MMIO_STATUS, features_ok);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), features_ok);
    for (q, (desc, avail, used)) in QUEUES.iter().enumerate() {
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, q as u32);
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, *desc as u32);
        w(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, *avail as u32);
        w(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, *used as u32);
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    }
    // DRIVER_OK: memory table, rings, kick and call fds, enable.
    assert_eq!(
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            features_ok | VIRTIO_CONFIG_S_DRIVER_OK
        ),
        TransportEvent::Activated
    );
    assert!(
        t.is_activated(),
        "status {:#x}",
        r(&mut t, VIRTIO_MMIO_STATUS)
    );
    assert_eq!(t.device().started_rings(), &[0, 1]);

    // FUSE_INIT on the request queue; the kick is what KVM would signal.
    post_fuse_init(&mem);
    kicks[1].write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t.process(DeviceEvent::Backend) {
        assert!(Instant::now() < deadline, "no call from virtiofsd");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(irq.0.load(Ordering::SeqCst), 1);
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING
    );
    let used = QUEUES[1].2;
    assert_eq!(mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 1);
    let written = mem.read_obj::<u32>(GuestAddress(used + 8)).unwrap();
    // fuse_out_header: len, error, unique; then fuse_init_out: major, minor.
    let len = mem.read_obj::<u32>(GuestAddress(REPLY)).unwrap();
    let error = mem.read_obj::<i32>(GuestAddress(REPLY + 4)).unwrap();
    let unique = mem.read_obj::<u64>(GuestAddress(REPLY + 8)).unwrap();
    let major = mem.read_obj::<u32>(GuestAddress(REPLY + 16)).unwrap();
    let minor = mem.read_obj::<u32>(GuestAddress(REPLY + 20)).unwrap();
    assert_eq!((error, unique, major), (0, UNIQUE, 7), "len {len}");
    assert!(minor >= 31, "minor {minor}");
    assert_eq!(written, len);

    // Reset takes the rings back from virtiofsd; the process lives on.
    assert_eq!(w(&mut t, VIRTIO_MMIO_STATUS, 0), TransportEvent::Reset);
    assert!(t.device().started_rings().is_empty());
    assert!(!t.device().backend().is_closed());
}
