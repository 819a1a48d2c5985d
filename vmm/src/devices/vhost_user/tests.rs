//! The virtio-fs frontend against a real vhost-user backend (the
//! `vhost-user-backend` crate, in a thread of the test): the registers and
//! configuration space the guest sees, the set-up the backend receives at
//! DRIVER_OK (memory table, rings), a kick reaching the backend, its call
//! turned into `InterruptStatus` and an interrupt by the event loop, reset,
//! and backends that hang up or never answer.
#![allow(clippy::cast_possible_truncation)]

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use capsid_devices::hosting::mmio::*;
use capsid_devices::virtio::{
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Listener;
use vhost_user_backend::{
    ShutdownHandle, VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::QueueT;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::fs::{VhostUserFs, VIRTIO_ID_FS};
use super::{VhostUserError, VhostUserHandle, PROTOCOL_FEATURES};
use crate::config::FsConfig;
use crate::devices::bus::MmioSlot;
use crate::devices::event_loop::EventLoop;
use crate::devices::{placement, QueueService};
use crate::vstate::memory::{create_guest_memory, Backing};

/// A device-specific feature the backend offers that the guest must not
/// see (VIRTIO_FS_F_NOTIFICATION: a notification queue capsid has not).
const FS_NOTIFICATION: u64 = 1;
const MEM_SIZE: u64 = 16 << 20;
const QUEUES: [(u64, u64, u64); 2] = [(0x10000, 0x11000, 0x12000), (0x20000, 0x21000, 0x22000)];
const BUF: u64 = 0x40000;
const ACK_DRIVER: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
const ALL_OK: u32 = ACK_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;

/// What the test backend was told and did.
#[derive(Debug, Default)]
struct Seen {
    /// Guest-physical start and size of each region of its memory table.
    regions: Vec<(u64, u64)>,
    /// SET_FEATURES.
    acked_features: u64,
    /// Queue events, by queue: kicks, and the one vhost-user-backend makes
    /// up when a ring is enabled.
    events: Vec<u16>,
    /// Per buffer served: its queue, and the ring's guest addresses and
    /// size as the backend has them.
    served: Vec<(u16, u64, u64, u64, u16)>,
    /// Rings stopped (GET_VRING_BASE).
    stopped: Vec<u32>,
}

struct TestBackend {
    seen: Arc<Mutex<Seen>>,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    exit: (EventConsumer, EventNotifier),
}

impl VhostUserBackendMut for TestBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        1024
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | FS_NOTIFICATION
            | PROTOCOL_FEATURES
    }

    fn acked_features(&mut self, features: u64) {
        self.seen.lock().unwrap().acked_features = features;
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&mut self, _enabled: bool) {}

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        self.seen.lock().unwrap().regions = mem
            .memory()
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn stop_vring(&mut self, queue_index: u32) -> std::io::Result<()> {
        self.seen.lock().unwrap().stopped.push(queue_index);
        Ok(())
    }

    /// A kick: note it, fill the first buffer of the ring with "virtiofs"
    /// through the backend's own mapping of guest memory, put it on the
    /// used ring and signal the call eventfd.
    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        if !evset.contains(EventSet::IN) {
            return Ok(());
        }
        let Some(mem) = self.mem.as_ref().map(GuestMemoryAtomic::memory) else {
            return Ok(());
        };
        self.seen.lock().unwrap().events.push(device_event);
        let chain = vring
            .get_mut()
            .get_queue_mut()
            .pop_descriptor_chain(mem.clone());
        if let Some(chain) = chain {
            {
                let state = vring.get_ref();
                let q = state.get_queue();
                self.seen.lock().unwrap().served.push((
                    device_event,
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring(),
                    q.size(),
                ));
            }
            let head = chain.head_index();
            let mut len = 0;
            for desc in chain.writable() {
                mem.write_slice(b"virtiofs", desc.addr())
                    .map_err(std::io::Error::other)?;
                len = 8;
            }
            vring.add_used(head, len).map_err(std::io::Error::other)?;
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

/// A backend serving one connection on `path`, in a thread.
struct Backend {
    seen: Arc<Mutex<Seen>>,
    shutdown: std::sync::mpsc::Receiver<Option<ShutdownHandle>>,
    exit: EventNotifier,
}

impl Backend {
    fn spawn(path: &Path) -> Self {
        let mut listener = Listener::new(path, true).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let exit = new_event_consumer_and_notifier(EventFlag::NONBLOCK).unwrap();
        let notifier = exit.1.try_clone().unwrap();
        let backend = Arc::new(RwLock::new(TestBackend {
            seen: seen.clone(),
            mem: None,
            exit,
        }));
        let (tx, shutdown) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut daemon = VhostUserDaemon::new(
                "test-fs".into(),
                backend,
                GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            )
            .unwrap();
            daemon.start(&mut listener).unwrap();
            let _ = tx.send(daemon.shutdown_handle());
            let _ = daemon.wait();
        });
        Self {
            seen,
            shutdown,
            exit: notifier,
        }
    }

    /// Closes the connection from the backend's side.
    fn hang_up(&self) {
        let handle = self
            .shutdown
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .unwrap();
        handle.shutdown();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.exit.notify();
    }
}

/// An interrupt line the test can watch: an eventfd, as an irqfd is.
struct Irq(EventFd);

impl Interrupt for Irq {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl Irq {
    /// Waits for the line to be raised.
    fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.0.read().is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
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

/// Negotiates `features` from scratch; returns the status.
fn negotiate(t: &mut Fs, features: u64) -> u32 {
    w(t, VIRTIO_MMIO_STATUS, 0);
    w(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    w(t, VIRTIO_MMIO_STATUS, ACK_DRIVER);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
    w(
        t,
        VIRTIO_MMIO_STATUS,
        ACK_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    r(t, VIRTIO_MMIO_STATUS)
}

/// Sets up both queues (16 entries) and sets DRIVER_OK.
fn start(t: &mut Fs) -> TransportEvent {
    for (q, (desc, avail, used)) in QUEUES.iter().enumerate() {
        w(t, VIRTIO_MMIO_QUEUE_SEL, q as u32);
        w(t, VIRTIO_MMIO_QUEUE_NUM, 16);
        w(t, VIRTIO_MMIO_QUEUE_DESC_LOW, *desc as u32);
        w(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, *avail as u32);
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        w(t, VIRTIO_MMIO_QUEUE_USED_LOW, *used as u32);
        w(t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        w(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }
    w(t, VIRTIO_MMIO_STATUS, ALL_OK)
}

/// Posts one 64-byte device-writable buffer on queue `q`.
fn post_buffer(mem: &GuestMemoryMmap, q: usize) {
    let (desc, avail, _) = QUEUES[q];
    let d = RawDescriptor::from(Descriptor::new(BUF, 64, 2, 0));
    mem.write_obj(d, GuestAddress(desc)).unwrap();
    mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
}

struct Setup {
    _dir: tempfile::TempDir,
    backend: Backend,
    mem: GuestMemoryMmap,
    /// The queues' notify eventfds (KVM's ioeventfds in capsid-vmm).
    kicks: Vec<EventFd>,
    irq: Arc<Irq>,
    fs: Arc<Mutex<Fs>>,
}

fn fs_config(socket: PathBuf) -> FsConfig {
    FsConfig {
        queue_size: 128,
        ..FsConfig::new(socket, "capsid")
    }
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fs.sock");
    let backend = Backend::spawn(&socket);
    let mem = create_guest_memory(MEM_SIZE, Backing::Shared).unwrap();
    let kicks: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let clones = kicks.iter().map(|k| k.try_clone().unwrap()).collect();
    let dev = VhostUserFs::connect(&fs_config(socket), clones).unwrap();
    let irq = Arc::new(Irq(EventFd::new(EFD_NONBLOCK).unwrap()));
    let fs = Arc::new(Mutex::new(MmioTransport::new(
        dev,
        mem.clone(),
        irq.clone(),
    )));
    Setup {
        _dir: dir,
        backend,
        mem,
        kicks,
        irq,
        fs,
    }
}

/// The device in the VMM's event loop, as the bus places it.
fn serve(s: &Setup) -> crate::devices::event_loop::EventLoopThread {
    let evts = s.kicks.iter().map(|k| k.try_clone().unwrap()).collect();
    let dyn_dev: Arc<Mutex<dyn MmioDevice>> = s.fs.clone();
    let slot = MmioSlot::new("fs", placement(0), dyn_dev, evts).served_by(QueueService::Backend);
    let event_loop = EventLoop::new(Arc::new(vec![slot])).unwrap();
    let handle = event_loop.handle();
    let thread = event_loop.spawn().unwrap();
    handle.activated(0);
    thread
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn registers_features_and_config_space() {
    let s = setup();
    let mut t = s.fs.lock().unwrap();
    assert_eq!(r(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC_VALUE);
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_FS);
    // Offered: what the backend offers of the transport features; neither
    // the vhost-user protocol bit nor the notification queue.
    w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    let low = r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES);
    w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    let high = r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES);
    assert_eq!(
        (u64::from(high) << 32) | u64::from(low),
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC
    );
    // Config space: tag[36], then num_request_queues (le), in any width.
    let mut tag = [0u8; 36];
    t.read(VIRTIO_MMIO_CONFIG, &mut tag);
    assert_eq!(&tag[..6], b"capsid");
    assert!(tag[6..].iter().all(|&b| b == 0));
    assert_eq!(r(&mut t, VIRTIO_MMIO_CONFIG + 36), 1);
    let mut one = [0u8; 1];
    t.read(VIRTIO_MMIO_CONFIG + 1, &mut one);
    assert_eq!(one, [b'a']);
    // Beyond it: zeros; writes are ignored.
    assert_eq!(r(&mut t, VIRTIO_MMIO_CONFIG + 40), 0);
    w(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    w(&mut t, VIRTIO_MMIO_STATUS, ACK_DRIVER);
    t.write(VIRTIO_MMIO_CONFIG, b"evil");
    t.read(VIRTIO_MMIO_CONFIG, &mut tag);
    assert_eq!(&tag[..6], b"capsid");
    // Two queues of 128 (hiprio, one request queue), no third.
    for q in 0..2 {
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, q);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 128);
    }
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 2);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    // A driver asking for the protocol bit, or the notification queue, or
    // without VERSION_1, is refused; a plain modern one accepted.
    for bad in [
        VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES,
        VIRTIO_F_VERSION_1 | FS_NOTIFICATION,
        VIRTIO_RING_F_EVENT_IDX,
    ] {
        assert_eq!(
            negotiate(&mut t, bad) & VIRTIO_CONFIG_S_FEATURES_OK,
            0,
            "{bad:#x}"
        );
    }
    assert_ne!(
        negotiate(&mut t, VIRTIO_F_VERSION_1) & VIRTIO_CONFIG_S_FEATURES_OK,
        0
    );
    // Nothing reached the backend before DRIVER_OK.
    assert!(s.backend.seen.lock().unwrap().regions.is_empty());
}

#[test]
fn driver_ok_hands_memory_and_rings_to_the_backend_and_calls_interrupt() {
    let s = setup();
    let lp = serve(&s);
    {
        let mut t = s.fs.lock().unwrap();
        assert_ne!(
            negotiate(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC)
                & VIRTIO_CONFIG_S_FEATURES_OK,
            0
        );
        assert_eq!(start(&mut t), TransportEvent::Activated);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), ALL_OK);
        assert!(t.is_activated());
        assert_eq!(t.device().started_rings(), &[0, 1]);
    }
    {
        // REPLY_ACK: everything was acknowledged by the time DRIVER_OK
        // returned.
        let seen = s.backend.seen.lock().unwrap();
        assert_eq!(seen.regions, vec![(0, MEM_SIZE)]);
        assert_eq!(
            seen.acked_features,
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | PROTOCOL_FEATURES
        );
        assert!(seen.served.is_empty(), "{seen:?}");
    }
    // vhost-user-backend looks at each ring once when it is enabled; let
    // that pass, so that what follows is the guest's kick.
    wait_until("the rings' first look", || {
        s.backend.seen.lock().unwrap().events.len() == 2
    });
    assert!(!s.irq.wait(Duration::from_millis(50)));
    // The guest posts a buffer on the request queue and kicks it: KVM
    // signals the ioeventfd, which the backend reads.
    post_buffer(&s.mem, 1);
    s.kicks[1].write(1).unwrap();
    assert!(s.irq.wait(Duration::from_secs(5)), "no interrupt");
    {
        let seen = s.backend.seen.lock().unwrap();
        assert_eq!(seen.events[2..], [1]);
        let (desc, avail, used) = QUEUES[1];
        assert_eq!(seen.served, vec![(1, desc, avail, used, 16)]);
    }
    // The backend took the kick off the eventfd.
    assert!(s.kicks[1].read().is_err());
    // The backend wrote through its own mapping of the memfd; the call
    // became the VRING bit, then the interrupt.
    let mut t = s.fs.lock().unwrap();
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING
    );
    assert_eq!(
        s.mem
            .read_obj::<u16>(GuestAddress(QUEUES[1].2 + 2))
            .unwrap(),
        1
    );
    let mut buf = [0u8; 8];
    s.mem.read_slice(&mut buf, GuestAddress(BUF)).unwrap();
    assert_eq!(&buf, b"virtiofs");
    assert_eq!(t.stats().interrupts, 1);
    w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);

    // Reset takes the rings back; a new driver starts them again.
    assert_eq!(w(&mut t, VIRTIO_MMIO_STATUS, 0), TransportEvent::Reset);
    assert!(t.device().started_rings().is_empty());
    let mut stopped = s.backend.seen.lock().unwrap().stopped.clone();
    stopped.sort_unstable();
    assert_eq!(stopped, vec![0, 1]);
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    assert_eq!(start(&mut t), TransportEvent::Activated);
    assert_eq!(
        s.backend.seen.lock().unwrap().acked_features,
        VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES
    );
    drop(t);
    lp.stop();
    // The VM's end (the device dropped) takes them back too.
    let Setup { backend, fs, .. } = s;
    drop(fs);
    assert_eq!(backend.seen.lock().unwrap().stopped.len(), 4);
}

#[test]
fn a_backend_that_hangs_up_puts_the_device_in_needs_reset() {
    let s = setup();
    let lp = serve(&s);
    {
        let mut t = s.fs.lock().unwrap();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        assert_eq!(start(&mut t), TransportEvent::Activated);
    }
    s.backend.hang_up();
    // The event loop hears the hang-up: DEVICE_NEEDS_RESET and a
    // configuration interrupt.
    assert!(s.irq.wait(Duration::from_secs(5)), "no interrupt");
    wait_until("NEEDS_RESET", || {
        r(&mut s.fs.lock().unwrap(), VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET != 0
    });
    let mut t = s.fs.lock().unwrap();
    assert_ne!(
        r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
        0
    );
    assert!(!t.is_activated());
    assert!(t.device().backend().is_closed());
    // Kicks and queue notifications go nowhere, harmlessly.
    s.kicks[1].write(1).unwrap();
    assert_eq!(w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1), TransportEvent::None);
    // The driver resets and tries again: refused at DRIVER_OK, no hang.
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    let started = Instant::now();
    assert_eq!(start(&mut t), TransportEvent::None);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_ne!(
        r(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
    drop(t);
    lp.stop();
}

#[test]
fn private_memory_cannot_be_handed_over() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fs.sock");
    let _backend = Backend::spawn(&socket);
    let mem = create_guest_memory(MEM_SIZE, Backing::Private).unwrap();
    let kicks = (0..2)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let dev = VhostUserFs::connect(&fs_config(socket), kicks).unwrap();
    let irq = Arc::new(Irq(EventFd::new(EFD_NONBLOCK).unwrap()));
    let mut t = MmioTransport::new(dev, mem, irq);
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    assert_eq!(start(&mut t), TransportEvent::None);
    assert_ne!(
        r(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
    assert_eq!(t.stats().device_errors, 1);
}

#[test]
fn a_backend_that_never_answers_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("mute.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    // Accepts, reads nothing, answers nothing, keeps the connection open.
    let mute = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
    let started = Instant::now();
    let e = VhostUserHandle::connect(&socket, 2, Duration::from_millis(300)).unwrap_err();
    assert!(matches!(e, VhostUserError::Timeout(_)), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    drop(mute.join());
}

#[test]
fn a_backend_that_closes_at_once_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("rude.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let rude = std::thread::spawn(move || drop(listener.accept()));
    let e = VhostUserHandle::connect(&socket, 2, Duration::from_secs(5)).unwrap_err();
    assert!(matches!(e, VhostUserError::Request { .. }), "{e}");
    rude.join().unwrap();
    // No socket at all: named.
    let e = VhostUserHandle::connect(&dir.path().join("none.sock"), 2, Duration::from_secs(1))
        .unwrap_err();
    assert!(e.to_string().contains("none.sock"), "{e}");
}

#[test]
fn a_backend_with_too_few_queues_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fs.sock");
    let _backend = Backend::spawn(&socket);
    let e = VhostUserHandle::connect(&socket, 3, Duration::from_secs(5)).unwrap_err();
    assert!(
        matches!(
            e,
            VhostUserError::TooFewQueues {
                backend: 2,
                wanted: 3
            }
        ),
        "{e}"
    );
}
