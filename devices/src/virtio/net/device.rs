//! The network device model: features, configuration space (virtio 1.2,
//! 5.1.3–5.1.4), and the tap, polled only while the driver has receive
//! buffers.
//!
//! The device's host-side fd is a private epoll set holding the tap. It is
//! level-triggered in the hosting's event loop, so while a frame waits for
//! a receive buffer the tap leaves the set; a receive-queue kick brings it
//! back.

use std::os::fd::{AsRawFd, RawFd};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::rx::{process_rx, RxState, RxStatus};
use super::tap::{FrameIo, Tap};
use super::tx::process_tx;
use super::{
    header_len, NetError, NetStats, Result, MAX_BUFFER_SIZE, NET_NUM_QUEUES, RX_QUEUE, TX_OFFLOADS,
    TX_QUEUE, VIRTIO_ID_NET, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use crate::virtio::{
    queue_bit, read_config_bytes, DeviceError, DeviceEvent, VirtioDevice, COMMON_FEATURES,
};

/// Largest queue size accepted, for both queues (QEMU's virtio-mmio
/// virtio-net front end asks for 1024).
pub const NET_QUEUE_SIZE: u16 = 1024;
/// Queue size offered to an MMIO driver: Linux keeps a receive buffer
/// (about 2 KiB without mergeable buffers) per entry of the receive
/// queue, so 256 entries rather than 1024 keep 1.5 MiB less of every
/// guest's RAM; QEMU's and Firecracker's default is 256 too.
pub const NET_OFFERED_QUEUE_SIZE: u16 = 256;

/// virtio-net over a tap.
pub struct Net<T: FrameIo + AsRawFd = Tap> {
    tap: T,
    /// The device's host-side fd: holds the tap while `polling`.
    epoll: Epoll,
    polling: bool,
    mac: Option<[u8; 6]>,
    acked: u64,
    rx: RxState,
    tx_buf: Vec<u8>,
    stats: NetStats,
}

impl<T: FrameIo + AsRawFd> std::fmt::Debug for Net<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &self.mac)
            .field("acked", &format_args!("{:#x}", self.acked))
            .field("polling", &self.polling)
            .field("stats", &self.stats)
            .finish()
    }
}

impl<T: FrameIo + AsRawFd> Net<T> {
    /// A device moving frames through `tap`. With `mac`, the device offers
    /// VIRTIO_NET_F_MAC and the driver uses that address; without it the
    /// driver picks a random one. (Under QEMU, QEMU's own virtio-net
    /// front end answers configuration reads with its `mac=` property.)
    pub fn new(tap: T, mac: Option<[u8; 6]>) -> Result<Self> {
        Ok(Self {
            tap,
            epoll: Epoll::new().map_err(NetError::Epoll)?,
            polling: false,
            mac,
            acked: 0,
            rx: RxState::default(),
            tx_buf: vec![0; MAX_BUFFER_SIZE],
            stats: NetStats::default(),
        })
    }

    /// What the device did so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Adds the tap to the device's epoll set, or takes it out.
    fn set_polling(&mut self, on: bool) -> Result<()> {
        if on == self.polling {
            return Ok(());
        }
        let (op, events) = if on {
            (ControlOperation::Add, EventSet::IN)
        } else {
            (ControlOperation::Delete, EventSet::empty())
        };
        self.epoll
            .ctl(op, self.tap.as_raw_fd(), EpollEvent::new(events, 0))
            .map_err(NetError::Poll)?;
        tracing::trace!(polling = on, "virtio-net: tap polling");
        self.polling = on;
        Ok(())
    }

    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<u64> {
        let result = process_rx(
            queue,
            mem,
            &mut self.tap,
            &mut self.rx,
            header_len(self.acked),
            &mut self.stats,
        );
        let (status, notify) = match result {
            Ok(done) => done,
            Err(e) => {
                // A broken ring or tap: the tap stays readable, so keep it
                // out of the set until the driver kicks again, or the event
                // loop would spin on the same error.
                let _ = self.set_polling(false);
                return Err(e);
            }
        };
        self.set_polling(status == RxStatus::Poll)?;
        Ok(if notify { queue_bit(RX_QUEUE) } else { 0 })
    }

    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<u64> {
        let notify = process_tx(
            queue,
            mem,
            &mut self.tap,
            &mut self.tx_buf,
            header_len(self.acked),
            self.acked,
            &mut self.stats,
        )?;
        Ok(if notify { queue_bit(TX_QUEUE) } else { 0 })
    }

    /// `struct virtio_net_config` up to `status`: the fields offered.
    fn config(&self) -> [u8; 8] {
        let mut cfg = [0u8; 8];
        if let Some(mac) = self.mac {
            cfg[..6].copy_from_slice(&mac);
        }
        cfg[6..].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        cfg
    }
}

impl<T: FrameIo + AsRawFd + Send> VirtioDevice for Net<T> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn name(&self) -> &'static str {
        "net"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[NET_QUEUE_SIZE; NET_NUM_QUEUES]
    }

    fn queue_offered_sizes(&self) -> &[u16] {
        &[NET_OFFERED_QUEUE_SIZE; NET_NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        let mac = if self.mac.is_some() {
            VIRTIO_NET_F_MAC
        } else {
            0
        };
        COMMON_FEATURES | VIRTIO_NET_F_STATUS | TX_OFFLOADS | mac
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
        let len = header_len(self.acked);
        if let Err(e) = self.tap.set_header_len(len) {
            tracing::error!(error = %e, len, "virtio-net: cannot set the tap's header length");
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process(
        &mut self,
        event: DeviceEvent,
        queues: &mut [&mut Queue],
        mem: &GuestMemoryMmap,
    ) -> std::result::Result<u64, DeviceError> {
        let result = match event {
            DeviceEvent::Queue(q) if usize::from(q) == TX_QUEUE => match queues.get_mut(TX_QUEUE) {
                Some(queue) => self.transmit(queue, mem),
                None => Ok(0),
            },
            DeviceEvent::Queue(q) if usize::from(q) != RX_QUEUE => Ok(0),
            DeviceEvent::Queue(_) | DeviceEvent::Backend => match queues.get_mut(RX_QUEUE) {
                Some(queue) => self.receive(queue, mem),
                None => Ok(0),
            },
        };
        result.map_err(|e| DeviceError::new("net", e))
    }

    fn reset(&mut self) {
        let s = self.stats;
        tracing::info!(
            rx_frames = s.rx_frames,
            rx_dropped = s.rx_dropped,
            rx_malformed = s.rx_malformed,
            tx_frames = s.tx_frames,
            tx_dropped = s.tx_dropped,
            tx_malformed = s.tx_malformed,
            "virtio-net reset"
        );
        self.rx.clear();
        self.acked = 0;
        if let Err(e) = self.set_polling(false) {
            tracing::error!(error = %e, "virtio-net: cannot stop polling the tap");
        }
    }
}

/// Parses a MAC address written as six colon-separated hex bytes; it must
/// be unicast (a driver cannot take a multicast address as its own).
pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let bad = || NetError::InvalidMac(text.to_string());
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 {
        return Err(bad());
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::tap::FakeTap;
    use crate::virtio::net::VIRTIO_NET_HDR_LEN;
    use crate::virtio::VIRTIO_F_VERSION_1;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn readable(fd: RawFd) -> bool {
        let probe = Epoll::new().unwrap();
        probe
            .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
            .unwrap();
        let mut events = [EpollEvent::default(); 1];
        probe.wait(0, &mut events).unwrap() == 1
    }

    fn frame(fill: u8) -> Vec<u8> {
        let mut f = vec![0u8; VIRTIO_NET_HDR_LEN];
        f.extend([fill; 60]);
        f
    }

    #[test]
    fn mac_is_offered_only_when_configured() {
        let net = Net::new(FakeTap::new(), Some(MAC)).unwrap();
        assert_ne!(net.features() & VIRTIO_NET_F_MAC, 0);
        let mut cfg = [0u8; 8];
        net.read_config(0, &mut cfg);
        assert_eq!(cfg, [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0]);
        let mut status = [0u8; 2];
        net.read_config(6, &mut status);
        assert_eq!(status, [1, 0]);

        let net = Net::new(FakeTap::new(), None).unwrap();
        assert_eq!(net.features() & VIRTIO_NET_F_MAC, 0);
        assert_ne!(net.features() & VIRTIO_NET_F_STATUS, 0);
    }

    #[test]
    fn acked_features_set_the_tap_header_length() {
        let mut net = Net::new(FakeTap::new(), None).unwrap();
        net.ack_features(0);
        assert_eq!(net.tap.header_len, 10);
        net.ack_features(VIRTIO_F_VERSION_1 | (1 << 60));
        assert_eq!(net.tap.header_len, 12);
        assert_eq!(net.acked, VIRTIO_F_VERSION_1);
    }

    #[test]
    fn tap_is_polled_only_while_buffers_last() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let rx = MockSplitQueue::new(&mem, 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x8_0000), 16);
        let desc = RawDescriptor::from(SplitDescriptor::new(
            0x4_0000,
            2048,
            u16::try_from(VRING_DESC_F_WRITE).unwrap(),
            0,
        ));
        rx.build_desc_chain(&[desc]).unwrap();
        let mut rxq: Queue = rx.create_queue().unwrap();
        let mut txq: Queue = tx.create_queue().unwrap();

        let mut net = Net::new(FakeTap::new(), None).unwrap();
        net.ack_features(VIRTIO_F_VERSION_1);
        let fd = net.backend_fd().unwrap();
        // Not polled before the driver posted buffers.
        assert!(!readable(fd));

        net.tap.incoming.push_back(frame(1));
        let notify = net
            .process(DeviceEvent::Queue(0), &mut [&mut rxq, &mut txq], &mem)
            .unwrap();
        assert_eq!(notify, queue_bit(RX_QUEUE));
        assert_eq!(net.stats().rx_frames, 1);
        assert!(readable(fd));

        // The only buffer is used: the next frame waits, the tap is dropped
        // from the set.
        net.tap.incoming.push_back(frame(2));
        net.tap.incoming.push_back(frame(3));
        net.process(DeviceEvent::Backend, &mut [&mut rxq, &mut txq], &mem)
            .unwrap();
        assert!(!readable(fd));
        assert_eq!(net.tap.incoming.len(), 1);

        // Reset drops the waiting frame.
        net.reset();
        assert!(!net.rx.has_pending());
        assert!(!readable(fd));
    }

    #[test]
    fn receive_error_stops_polling() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let rx = MockSplitQueue::new(&mem, 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x8_0000), 16);
        let desc = RawDescriptor::from(SplitDescriptor::new(
            0x4_0000,
            2048,
            u16::try_from(VRING_DESC_F_WRITE).unwrap(),
            0,
        ));
        rx.build_desc_chain(&[desc, desc]).unwrap();
        let mut rxq: Queue = rx.create_queue().unwrap();
        let mut txq: Queue = tx.create_queue().unwrap();
        let mut net = Net::new(FakeTap::new(), None).unwrap();
        net.ack_features(VIRTIO_F_VERSION_1);
        let fd = net.backend_fd().unwrap();
        net.process(DeviceEvent::Queue(0), &mut [&mut rxq, &mut txq], &mem)
            .unwrap();
        assert!(readable(fd));

        // The driver moves its used ring out of guest memory.
        rxq.try_set_used_ring_address(GuestAddress(0xfff0_0000))
            .unwrap();
        net.tap.incoming.push_back(frame(1));
        assert!(net
            .process(DeviceEvent::Backend, &mut [&mut rxq, &mut txq], &mem)
            .is_err());
        assert!(!readable(fd));
    }

    #[test]
    fn transmit_kick_sends() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let rx = MockSplitQueue::new(&mem, 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x8_0000), 16);
        tx.build_desc_chain(&[RawDescriptor::from(SplitDescriptor::new(
            0x4_0000, 80, 0, 0,
        ))])
        .unwrap();
        let mut rxq: Queue = rx.create_queue().unwrap();
        let mut txq: Queue = tx.create_queue().unwrap();
        let mut net = Net::new(FakeTap::new(), None).unwrap();
        net.ack_features(VIRTIO_F_VERSION_1);
        let notify = net
            .process(DeviceEvent::Queue(1), &mut [&mut rxq, &mut txq], &mem)
            .unwrap();
        assert_eq!(notify, queue_bit(TX_QUEUE));
        assert_eq!(net.tap.sent.len(), 1);
        // A kick for a queue the device does not have is ignored.
        let notify = net
            .process(DeviceEvent::Queue(7), &mut [&mut rxq, &mut txq], &mem)
            .unwrap();
        assert_eq!(notify, 0);
    }

    #[test]
    fn mac_addresses_parse() {
        assert_eq!(parse_mac("52:54:00:12:34:56").unwrap(), MAC);
        assert_eq!(parse_mac("02:AB:cd:00:00:01").unwrap()[1], 0xab);
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5",
            "52:54:00:12:34:5g",
            "52-54-00-12-34-56",
            "01:00:5e:00:00:01",
            "+2:54:00:12:34:56",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?}");
        }
    }
}
