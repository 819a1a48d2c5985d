//! The socket device model: virtio queues on one side, the muxer on the other.

use std::os::fd::RawFd;
use std::path::Path;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::GuestMemoryMmap;

use super::muxer::{Muxer, MuxerStats, TxHeader};
use super::{
    Result, VsockError, EVT_QUEUE, MAX_PKT_DATA, MIN_GUEST_CID, RX_QUEUE, TX_QUEUE,
    VIRTIO_ID_VSOCK, VSOCK_HOST_CID, VSOCK_TYPE_STREAM,
};
use crate::virtio::{queue_bit, DeviceError, DeviceEvent, VirtioDevice, COMMON_FEATURES};

/// Largest queue the driver may set up (QEMU asks for 1024).
pub const VSOCK_QUEUE_SIZE: u16 = 1024;
const QUEUE_SIZES: [u16; 3] = [VSOCK_QUEUE_SIZE; 3];
/// Queue size offered to an MMIO driver: Linux fills the receive queue
/// with a 4 KiB buffer per entry, so 1024 entries would keep 4 MiB of
/// every guest's RAM. 256 entries (1 MiB in flight, as Firecracker
/// offers) are plenty for the agent's streams.
pub const VSOCK_OFFERED_QUEUE_SIZE: u16 = 256;
const OFFERED_SIZES: [u16; 3] = [VSOCK_OFFERED_QUEUE_SIZE; 3];

/// virtio-vsock with the hybrid Unix-socket host side.
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    acked: u64,
    /// Chains from the guest that were not valid packets.
    pub malformed: u64,
}

impl Vsock {
    /// A device for guest `guest_cid`, listening on `uds_path` for host
    /// clients and connecting to `<uds_path>_<port>` for the guest.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self> {
        if guest_cid < MIN_GUEST_CID || guest_cid > u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        Ok(Self {
            guest_cid,
            muxer: Muxer::new(guest_cid, uds_path)?,
            acked: 0,
            malformed: 0,
        })
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Muxer counters.
    pub fn stats(&self) -> MuxerStats {
        self.muxer.stats
    }

    /// Returns a chain to the driver. A head index the guest made up (out of
    /// the ring) cannot be returned: it is counted and skipped, and the
    /// device carries on.
    fn return_chain(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> bool {
        match queue.add_used(mem, head, len) {
            Ok(()) => true,
            Err(e) => {
                self.malformed += 1;
                tracing::debug!(error = %e, head, "vsock: cannot return chain");
                false
            }
        }
    }

    /// Takes every packet the guest queued on tx.
    fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool> {
        let mut used_any = false;
        loop {
            queue.disable_notification(mem).map_err(VsockError::Queue)?;
            while let Some(mut chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                    Ok(pkt) => {
                        let hdr = TxHeader {
                            src_cid: pkt.src_cid(),
                            dst_cid: pkt.dst_cid(),
                            src_port: pkt.src_port(),
                            dst_port: pkt.dst_port(),
                            type_: pkt.type_(),
                            op: pkt.op(),
                            flags: pkt.flags(),
                            buf_alloc: pkt.buf_alloc(),
                            fwd_cnt: pkt.fwd_cnt(),
                        };
                        let data = pkt
                            .data_slice()
                            .and_then(|d| d.subslice(0, pkt.len() as usize).ok());
                        self.muxer.on_guest_packet(&hdr, data.as_ref());
                    }
                    Err(e) => {
                        self.malformed += 1;
                        tracing::debug!(error = %e, "vsock: malformed tx chain");
                    }
                }
                used_any |= self.return_chain(queue, mem, head, 0);
            }
            if !queue.enable_notification(mem).map_err(VsockError::Queue)?
                || !ring_sane(queue, mem)?
            {
                break;
            }
        }
        Ok(used_any && queue.needs_notification(mem).map_err(VsockError::Queue)?)
    }

    /// Gives the guest every packet the muxer has for it, as long as rx
    /// buffers last.
    fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool> {
        let mut used_any = false;
        while self.muxer.has_pending_rx() {
            let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
                // Out of buffers: stop reading the host until the guest
                // posts more (it kicks the rx queue when it does).
                self.muxer.set_rx_starved(true);
                let more = queue.enable_notification(mem).map_err(VsockError::Queue)?;
                if more && ring_sane(queue, mem)? {
                    self.muxer.set_rx_starved(false);
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let mut pkt = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => pkt,
                Err(e) => {
                    self.malformed += 1;
                    tracing::debug!(error = %e, "vsock: malformed rx chain");
                    used_any |= self.return_chain(queue, mem, head, 0);
                    continue;
                }
            };
            let data = pkt.data_slice().copied();
            let Some((key, rx)) = self.muxer.next_rx(data.as_ref()) else {
                // Nothing after all (a stream had no data): give the buffer back.
                queue.go_to_previous_position();
                break;
            };
            pkt.set_src_cid(VSOCK_HOST_CID)
                .set_dst_cid(self.guest_cid)
                .set_src_port(key.local_port)
                .set_dst_port(key.peer_port)
                .set_type(VSOCK_TYPE_STREAM)
                .set_op(rx.op)
                .set_flags(rx.flags)
                .set_len(rx.len)
                .set_buf_alloc(rx.buf_alloc)
                .set_fwd_cnt(rx.fwd_cnt);
            let used = u32::try_from(pkt.header_slice().len())
                .unwrap_or(0)
                .saturating_add(rx.len);
            used_any |= self.return_chain(queue, mem, head, used);
        }
        Ok(used_any && queue.needs_notification(mem).map_err(VsockError::Queue)?)
    }
}

/// See [`crate::virtio::avail_ring_sane`]: a ring the guest broke is left
/// alone (with a warning) instead of being polled forever.
fn ring_sane(queue: &Queue, mem: &GuestMemoryMmap) -> Result<bool> {
    let sane = crate::virtio::avail_ring_sane(queue, mem).map_err(VsockError::Queue)?;
    if !sane {
        tracing::warn!("vsock: available ring index runs more than a queue ahead; queue ignored");
    }
    Ok(sane)
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn name(&self) -> &'static str {
        "vsock"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn queue_offered_sizes(&self) -> &[u16] {
        &OFFERED_SIZES
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        crate::virtio::read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn process(
        &mut self,
        event: DeviceEvent,
        queues: &mut [&mut Queue],
        mem: &GuestMemoryMmap,
    ) -> std::result::Result<u64, DeviceError> {
        let err = |e| DeviceError::new("vsock", e);
        let mut notify = 0;
        match event {
            DeviceEvent::Queue(q) if usize::from(q) == TX_QUEUE => {
                if let Some(tx) = queues.get_mut(TX_QUEUE) {
                    if self.process_tx(tx, mem).map_err(err)? {
                        notify |= queue_bit(TX_QUEUE);
                    }
                }
            }
            DeviceEvent::Queue(q) if usize::from(q) == RX_QUEUE => {
                self.muxer.set_rx_starved(false);
            }
            DeviceEvent::Queue(q) if usize::from(q) == EVT_QUEUE => return Ok(0),
            DeviceEvent::Queue(_) => return Ok(0),
            DeviceEvent::Backend => self.muxer.process_host_events(),
        }
        if let Some(rx) = queues.get_mut(RX_QUEUE) {
            if self.process_rx(rx, mem).map_err(err)? {
                notify |= queue_bit(RX_QUEUE);
            }
        }
        Ok(notify)
    }

    fn reset(&mut self) {
        // Connections die with the driver; the listening socket stays.
        self.muxer.reset_connections();
    }

    fn restored(
        &mut self,
        queues: &mut [&mut Queue],
        mem: &GuestMemoryMmap,
    ) -> std::result::Result<u64, DeviceError> {
        // The host ends of the guest's connections were Unix sockets of
        // the process the snapshot came from: they are gone. The spec's
        // transport reset event (5.10.6.4.3) makes the driver drop every
        // connection (its peers see a reset) and read the CID again;
        // listening sockets stay.
        let Some(queue) = queues.get_mut(EVT_QUEUE) else {
            return Ok(0);
        };
        Ok(if send_transport_reset(queue, mem) {
            queue_bit(EVT_QUEUE)
        } else {
            0
        })
    }
}

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, the id of `struct virtio_vsock_event`.
pub const VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

/// Puts a transport reset event in the first buffer the driver posted on
/// the event queue; false when there was none (a driver that posts no
/// event buffers is not told) or it was unusable.
fn send_transport_reset(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    use vm_memory::Bytes;

    let Some(chain) = queue.pop_descriptor_chain(mem) else {
        tracing::warn!("vsock: no event buffer for the transport reset after a restore");
        return false;
    };
    let head = chain.head_index();
    // struct virtio_vsock_event { le32 id; }
    const EVENT_LEN: u32 = 4;
    let written = chain
        .writable()
        .find(|d| d.len() >= EVENT_LEN)
        .is_some_and(|d| {
            mem.write_slice(&VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes(), d.addr())
                .is_ok()
        });
    let len = if written { EVENT_LEN } else { 0 };
    if queue.add_used(mem, head, len).is_err() {
        return false;
    }
    if !written {
        tracing::warn!("vsock: the event buffer cannot hold the transport reset");
    }
    written
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};

    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::vsock::{
        VSOCK_FLAGS_SHUTDOWN_SEND, VSOCK_OP_CREDIT_UPDATE, VSOCK_OP_REQUEST, VSOCK_OP_RESPONSE,
        VSOCK_OP_RST, VSOCK_OP_RW, VSOCK_OP_SHUTDOWN,
    };

    const CID: u64 = 3;
    const RXQ: u16 = 0;
    const TXQ: u16 = 1;
    const HDR: u32 = 44;
    const QSIZE: u16 = 16;
    const RX_Q: u64 = 0x0;
    const TX_Q: u64 = 0x1_0000;
    const EVT_Q: u64 = 0x2_0000;
    const TX_BUF: u64 = 0x10_0000;
    const RX_BUF: u64 = 0x40_0000;

    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    struct Hdr {
        src_cid: u64,
        dst_cid: u64,
        src_port: u32,
        dst_port: u32,
        len: u32,
        type_: u16,
        op: u16,
        flags: u32,
        buf_alloc: u32,
        fwd_cnt: u32,
    }

    impl Hdr {
        fn guest(op: u16, guest_port: u32, host_port: u32) -> Self {
            Hdr {
                src_cid: CID,
                dst_cid: VSOCK_HOST_CID,
                src_port: guest_port,
                dst_port: host_port,
                type_: VSOCK_TYPE_STREAM,
                op,
                buf_alloc: 1 << 20,
                ..Hdr::default()
            }
        }

        fn bytes(&self) -> Vec<u8> {
            let mut b = Vec::new();
            b.extend(self.src_cid.to_le_bytes());
            b.extend(self.dst_cid.to_le_bytes());
            b.extend(self.src_port.to_le_bytes());
            b.extend(self.dst_port.to_le_bytes());
            b.extend(self.len.to_le_bytes());
            b.extend(self.type_.to_le_bytes());
            b.extend(self.op.to_le_bytes());
            b.extend(self.flags.to_le_bytes());
            b.extend(self.buf_alloc.to_le_bytes());
            b.extend(self.fwd_cnt.to_le_bytes());
            b
        }

        fn parse(b: &[u8]) -> Self {
            let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
            let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
            let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
            Hdr {
                src_cid: u64_at(0),
                dst_cid: u64_at(8),
                src_port: u32_at(16),
                dst_port: u32_at(20),
                len: u32_at(24),
                type_: u16_at(28),
                op: u16_at(30),
                flags: u32_at(32),
                buf_alloc: u32_at(36),
                fwd_cnt: u32_at(40),
            }
        }
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            u16::try_from(flags).unwrap(),
            next,
        ))
    }

    /// A device with mock rx/tx/evt queues over (leaked) guest memory.
    struct Rig {
        dir: tempfile::TempDir,
        dev: Vsock,
        mem: &'static GuestMemoryMmap,
        rxq: MockSplitQueue<'static, GuestMemoryMmap>,
        txq: MockSplitQueue<'static, GuestMemoryMmap>,
        queues: [Queue; 3],
        tx_chains: u16,
        rx_chains: u16,
        rx_read: u16,
    }

    impl Rig {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let dev = Vsock::new(CID, &dir.path().join("v.sock")).unwrap();
            let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
            ));
            let rxq = MockSplitQueue::create(mem, GuestAddress(RX_Q), QSIZE);
            let txq = MockSplitQueue::create(mem, GuestAddress(TX_Q), QSIZE);
            let evq = MockSplitQueue::create(mem, GuestAddress(EVT_Q), QSIZE);
            let queues = [
                rxq.create_queue().unwrap(),
                txq.create_queue().unwrap(),
                evq.create_queue().unwrap(),
            ];
            Rig {
                dir,
                dev,
                mem,
                rxq,
                txq,
                queues,
                tx_chains: 0,
                rx_chains: 0,
                rx_read: 0,
            }
        }

        fn uds(&self) -> std::path::PathBuf {
            self.dir.path().join("v.sock")
        }

        fn run(&mut self, event: DeviceEvent) -> u64 {
            let [rx, tx, evt] = &mut self.queues;
            let mut queues = [rx, tx, evt];
            self.dev.process(event, &mut queues, self.mem).unwrap()
        }

        /// Puts one chain (at most two descriptors) on the tx queue; `next`
        /// fields are relative to the chain's first descriptor.
        fn push_tx(&mut self, descs: &[RawDescriptor]) {
            let offset = (self.tx_chains * 2) % QSIZE;
            let descs: Vec<RawDescriptor> = descs
                .iter()
                .map(|d| {
                    let s = SplitDescriptor::from(*d);
                    let next = (s.next() + offset) % QSIZE;
                    RawDescriptor::from(SplitDescriptor::new(s.addr().0, s.len(), s.flags(), next))
                })
                .collect();
            self.txq.add_desc_chains(&descs, offset).unwrap();
            self.tx_chains += 1;
        }

        fn send(&mut self, mut hdr: Hdr, data: &[u8]) {
            let base = TX_BUF + u64::from(self.tx_chains % 4) * 0x4_0000;
            hdr.len = u32::try_from(data.len()).unwrap();
            self.mem
                .write_slice(&hdr.bytes(), GuestAddress(base))
                .unwrap();
            if data.is_empty() {
                self.push_tx(&[desc(base, HDR, 0, 0)]);
            } else {
                self.mem
                    .write_slice(data, GuestAddress(base + 0x100))
                    .unwrap();
                self.push_tx(&[
                    desc(base, HDR, VRING_DESC_F_NEXT, 1),
                    desc(base + 0x100, hdr.len, 0, 0),
                ]);
            }
            self.run(DeviceEvent::Queue(TXQ));
        }

        /// Posts `n` rx buffers (header + 64 KiB each).
        fn post_rx(&mut self, n: u16) {
            for _ in 0..n {
                let slot = self.rx_chains % (QSIZE / 2);
                let base = RX_BUF + u64::from(slot) * 0x2_0000;
                let descs = [
                    desc(
                        base,
                        HDR,
                        VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                        slot * 2 + 1,
                    ),
                    desc(base + 0x100, MAX_PKT_DATA, VRING_DESC_F_WRITE, 0),
                ];
                self.rxq.add_desc_chains(&descs, slot * 2).unwrap();
                self.rx_chains += 1;
            }
        }

        /// Packets the device returned on rx since the last call.
        fn received(&mut self) -> Vec<(Hdr, Vec<u8>)> {
            let used = self.rxq.used().idx().load();
            let out = (self.rx_read..used)
                .map(|i| {
                    let elem = self
                        .rxq
                        .used()
                        .ring()
                        .ref_at(usize::from(i % QSIZE))
                        .unwrap()
                        .load();
                    let base = RX_BUF + u64::from(elem.id() / 2) * 0x2_0000;
                    let mut h = [0u8; HDR as usize];
                    self.mem.read_slice(&mut h, GuestAddress(base)).unwrap();
                    let hdr = Hdr::parse(&h);
                    assert_eq!(elem.len(), HDR + hdr.len, "used length");
                    let mut data = vec![0u8; hdr.len as usize];
                    self.mem
                        .read_slice(&mut data, GuestAddress(base + 0x100))
                        .unwrap();
                    (hdr, data)
                })
                .collect();
            self.rx_read = used;
            out
        }

        /// Lets host-side events happen, then runs the device on them.
        fn host_events(&mut self) {
            std::thread::sleep(std::time::Duration::from_millis(20));
            self.run(DeviceEvent::Backend);
        }
    }

    fn ops(pkts: &[(Hdr, Vec<u8>)]) -> Vec<u16> {
        pkts.iter().map(|(h, _)| h.op).collect()
    }

    #[test]
    fn guest_connect_without_listener_is_reset() {
        let mut r = Rig::new();
        r.post_rx(4);
        r.send(Hdr::guest(VSOCK_OP_REQUEST, 1000, 99), &[]);
        let got = r.received();
        assert_eq!(ops(&got), [VSOCK_OP_RST]);
        assert_eq!((got[0].0.src_port, got[0].0.dst_port), (99, 1000));
        assert_eq!((got[0].0.src_cid, got[0].0.dst_cid), (VSOCK_HOST_CID, CID));
    }

    #[test]
    fn guest_connect_and_data_both_ways() {
        let mut r = Rig::new();
        let listener = UnixListener::bind(format!("{}_77", r.uds().display())).unwrap();
        r.post_rx(8);
        r.send(Hdr::guest(VSOCK_OP_REQUEST, 1000, 77), &[]);
        assert_eq!(ops(&r.received()), [VSOCK_OP_RESPONSE]);
        let (mut host, _) = listener.accept().unwrap();

        r.send(Hdr::guest(VSOCK_OP_RW, 1000, 77), b"hello");
        let mut buf = [0u8; 5];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");

        host.write_all(b"world").unwrap();
        r.host_events();
        let got = r.received();
        let rw: Vec<_> = got.iter().filter(|(h, _)| h.op == VSOCK_OP_RW).collect();
        assert_eq!(rw.len(), 1, "{got:?}");
        assert_eq!(rw[0].1, b"world");
        assert_eq!(
            rw[0].0.fwd_cnt, 5,
            "our fwd_cnt counts the 5 bytes taken by the host"
        );

        // The host closes: the guest is told the host sends no more.
        drop(host);
        r.host_events();
        let got = r.received();
        assert!(got.iter().any(|(h, _)| h.op == VSOCK_OP_SHUTDOWN && h.flags & VSOCK_FLAGS_SHUTDOWN_SEND != 0), "{got:?}");
    }

    #[test]
    fn host_to_guest_data_respects_guest_credit() {
        let mut r = Rig::new();
        let listener = UnixListener::bind(format!("{}_77", r.uds().display())).unwrap();
        r.post_rx(8);
        let mut req = Hdr::guest(VSOCK_OP_REQUEST, 1000, 77);
        req.buf_alloc = 8;
        r.send(req, &[]);
        r.received();
        let (mut host, _) = listener.accept().unwrap();
        host.write_all(&[7u8; 100]).unwrap();
        r.host_events();
        let data: usize = r
            .received()
            .iter()
            .filter(|(h, _)| h.op == VSOCK_OP_RW)
            .map(|(_, d)| d.len())
            .sum();
        assert_eq!(data, 8, "sent more than the guest's credit");
        // No more until the guest says it consumed them.
        r.host_events();
        assert!(r.received().is_empty());
        let mut upd = Hdr::guest(VSOCK_OP_CREDIT_UPDATE, 1000, 77);
        upd.buf_alloc = 8;
        upd.fwd_cnt = 8;
        r.send(upd, &[]);
        r.host_events();
        let data: usize = r
            .received()
            .iter()
            .filter(|(h, _)| h.op == VSOCK_OP_RW)
            .map(|(_, d)| d.len())
            .sum();
        assert_eq!(data, 8);
    }

    #[test]
    fn host_connect_goes_through_request_and_response() {
        let mut r = Rig::new();
        r.post_rx(4);
        let mut client = UnixStream::connect(r.uds()).unwrap();
        client.write_all(b"CONNECT 5000\n").unwrap();
        r.host_events();
        r.host_events();
        let got = r.received();
        assert_eq!(ops(&got), [VSOCK_OP_REQUEST]);
        let req = got[0].0;
        assert_eq!(req.dst_port, 5000);
        assert!(req.src_port >= crate::virtio::vsock::FIRST_LOCAL_PORT);

        r.send(Hdr::guest(VSOCK_OP_RESPONSE, 5000, req.src_port), &[]);
        let mut line = [0u8; 64];
        let n = client.read(&mut line).unwrap();
        assert_eq!(
            std::str::from_utf8(&line[..n]).unwrap(),
            format!("OK {}\n", req.src_port)
        );
    }

    #[test]
    fn bad_connect_line_drops_the_client() {
        let mut r = Rig::new();
        let mut client = UnixStream::connect(r.uds()).unwrap();
        client.write_all(b"GET / HTTP/1.1\n").unwrap();
        r.host_events();
        r.host_events();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert_eq!(r.dev.stats().bad_connect_lines, 1);
        assert_eq!(r.dev.connection_count(), 0);
    }

    #[test]
    fn packets_for_unknown_connections_get_a_reset() {
        let mut r = Rig::new();
        r.post_rx(4);
        r.send(Hdr::guest(VSOCK_OP_RW, 1000, 77), b"stray");
        assert_eq!(ops(&r.received()), [VSOCK_OP_RST]);
        // ...but a stray RST is not answered.
        r.send(Hdr::guest(VSOCK_OP_RST, 1000, 77), &[]);
        assert!(r.received().is_empty());
    }

    #[test]
    fn wrong_addressing_is_dropped() {
        let mut r = Rig::new();
        r.post_rx(4);
        let mut h = Hdr::guest(VSOCK_OP_REQUEST, 1000, 77);
        h.src_cid = 42; // not this guest
        r.send(h, &[]);
        let mut h = Hdr::guest(VSOCK_OP_REQUEST, 1000, 77);
        h.type_ = 2; // SEQPACKET is not offered
        r.send(h, &[]);
        let mut h = Hdr::guest(VSOCK_OP_REQUEST, 1000, 77);
        h.dst_cid = 7;
        r.send(h, &[]);
        assert!(r.received().is_empty());
        assert_eq!(r.dev.stats().dropped, 3);
    }

    #[test]
    fn guest_overrunning_its_credit_is_reset() {
        let mut r = Rig::new();
        let listener = UnixListener::bind(format!("{}_77", r.uds().display())).unwrap();
        r.post_rx(8);
        r.send(Hdr::guest(VSOCK_OP_REQUEST, 1000, 77), &[]);
        r.received();
        let (_host, _) = listener.accept().unwrap(); // never reads
        let chunk = vec![1u8; MAX_PKT_DATA as usize];
        let mut reset = false;
        for _ in 0..64 {
            r.send(Hdr::guest(VSOCK_OP_RW, 1000, 77), &chunk);
            if r.received().iter().any(|(h, _)| h.op == VSOCK_OP_RST) {
                reset = true;
                break;
            }
        }
        assert!(reset, "a guest ignoring credit was never reset");
        assert_eq!(r.dev.stats().violations, 1);
        assert_eq!(r.dev.connection_count(), 0);
    }

    #[test]
    fn malformed_tx_chains_are_survived() {
        let mut r = Rig::new();
        r.post_rx(4);
        let good = Hdr::guest(VSOCK_OP_REQUEST, 1000, 99).bytes();
        r.mem.write_slice(&good, GuestAddress(TX_BUF)).unwrap();
        // Header in a device-writable descriptor.
        r.push_tx(&[desc(TX_BUF, HDR, VRING_DESC_F_WRITE, 0)]);
        // Header outside guest memory.
        r.push_tx(&[desc(0xffff_0000, HDR, 0, 0)]);
        // Header descriptor too short.
        r.push_tx(&[desc(TX_BUF, 8, 0, 0)]);
        // A payload length (u32::MAX) far beyond its data descriptor.
        let mut h = Hdr::guest(VSOCK_OP_RW, 1000, 99);
        h.len = u32::MAX;
        r.mem
            .write_slice(&h.bytes(), GuestAddress(TX_BUF + 0x1000))
            .unwrap();
        r.push_tx(&[
            desc(TX_BUF + 0x1000, HDR, VRING_DESC_F_NEXT, 1),
            desc(TX_BUF + 0x2000, 16, 0, 0),
        ]);
        // A descriptor loop (only the first two descriptors are ever read,
        // so it parses as a zero-length REQUEST and is answered).
        r.push_tx(&[
            desc(TX_BUF, HDR, VRING_DESC_F_NEXT, 1),
            desc(TX_BUF + 0x100, 16, VRING_DESC_F_NEXT, 0),
        ]);
        r.run(DeviceEvent::Queue(TXQ));
        assert_eq!(r.dev.malformed, 4);
        // Every chain was returned to the driver.
        assert_eq!(r.txq.used().idx().load(), 5);
        // The device still works.
        r.send(Hdr::guest(VSOCK_OP_REQUEST, 1001, 98), &[]);
        assert!(r
            .received()
            .iter()
            .any(|(h, _)| h.op == VSOCK_OP_RST && h.dst_port == 1001));
    }

    #[test]
    fn host_data_waits_for_rx_buffers() {
        let mut r = Rig::new();
        let listener = UnixListener::bind(format!("{}_77", r.uds().display())).unwrap();
        r.post_rx(1);
        r.send(Hdr::guest(VSOCK_OP_REQUEST, 1000, 77), &[]);
        assert_eq!(ops(&r.received()), [VSOCK_OP_RESPONSE]);
        let (mut host, _) = listener.accept().unwrap();
        host.write_all(b"queued").unwrap();
        // No rx buffer: nothing is lost, nothing is delivered.
        r.host_events();
        assert!(r.received().is_empty());
        r.post_rx(2);
        r.run(DeviceEvent::Queue(RXQ));
        r.host_events();
        let got = r.received();
        let rw: Vec<u8> = got
            .iter()
            .filter(|(h, _)| h.op == VSOCK_OP_RW)
            .flat_map(|(_, d)| d.clone())
            .collect();
        assert_eq!(rw, b"queued");
    }

    #[test]
    fn slow_host_listener_cannot_stall_the_device() {
        use nix::sys::socket::{
            bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
        };
        let mut r = Rig::new();
        // A host service that never accepts, with a backlog of one.
        let path = format!("{}_77", r.uds().display());
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &UnixAddr::new(path.as_str()).unwrap(),
        )
        .unwrap();
        listen(&fd, Backlog::new(1).unwrap()).unwrap();
        r.post_rx(4);
        let start = std::time::Instant::now();
        for port in 0..8 {
            r.send(Hdr::guest(VSOCK_OP_REQUEST, 2000 + port, 77), &[]);
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        // Past the backlog, connects are refused rather than waited for.
        assert!(r.dev.connection_count() < 8, "{}", r.dev.connection_count());
    }

    #[test]
    fn avail_index_far_ahead_does_not_spin() {
        let mut r = Rig::new();
        r.txq.avail().idx().store(40);
        r.run(DeviceEvent::Queue(TXQ));
        r.rxq.avail().idx().store(40);
        r.run(DeviceEvent::Queue(RXQ));
        // Reaching here is the test: neither drain loop spun.
    }

    #[test]
    fn a_restore_is_announced_as_a_transport_reset() {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = Vsock::new(CID, &dir.path().join("v.sock")).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_Q), QSIZE);
        let txq = MockSplitQueue::create(&mem, GuestAddress(TX_Q), QSIZE);
        let evq = MockSplitQueue::create(&mem, GuestAddress(EVT_Q), QSIZE);
        let mut queues = [
            rxq.create_queue().unwrap(),
            txq.create_queue().unwrap(),
            evq.create_queue().unwrap(),
        ];
        let restored = |dev: &mut Vsock, queues: &mut [Queue; 3]| {
            let [rx, tx, evt] = queues;
            dev.restored(&mut [rx, tx, evt], &mem).unwrap()
        };
        // A driver that posted no event buffer is not told.
        assert_eq!(restored(&mut dev, &mut queues), 0);
        mem.write_slice(&[0xff; 8], GuestAddress(0x80_0000))
            .unwrap();
        evq.add_desc_chains(&[desc(0x80_0000, 8, VRING_DESC_F_WRITE, 0)], 0)
            .unwrap();
        assert_eq!(restored(&mut dev, &mut queues), queue_bit(EVT_QUEUE));
        assert_eq!(evq.used().idx().load(), 1);
        let elem = evq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(elem.len(), 4);
        let mut event = [0u8; 8];
        mem.read_slice(&mut event, GuestAddress(0x80_0000)).unwrap();
        assert_eq!(event, [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn reserved_cids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for cid in [0, 1, 2, u64::from(u32::MAX) + 1] {
            assert!(
                Vsock::new(cid, &dir.path().join("x.sock")).is_err(),
                "cid {cid}"
            );
        }
    }
}
