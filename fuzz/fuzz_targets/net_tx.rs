//! Fuzzes the virtio-net transmit path: the input is guest memory holding
//! a split queue (descriptor table, available ring) and whatever the
//! descriptors point at; the device is kicked on its transmit queue, so
//! every available chain is gathered, its header checked against the
//! negotiated offloads and written to an in-memory tap. Nothing may panic,
//! whatever the rings say, and every frame the tap gets must be one the
//! device may send: no longer than `MAX_BUFFER_SIZE`, no shorter than its
//! headers, asking only for offloads that were negotiated.

#![no_main]

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use capsid_devices::virtio::net::{
    FrameIo, Net, ETH_HLEN, MAX_BUFFER_SIZE, TX_QUEUE, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_LEN,
    VIRTIO_NET_HDR_LEN_LEGACY,
};
use capsid_devices::virtio::{DeviceEvent, VirtioDevice, VIRTIO_F_VERSION_1};
use capsid_fuzz::{poll_fd, queue};
use libfuzzer_sys::fuzz_target;

/// Room for a few maximum-size frames.
const MEM_SIZE: usize = 0x4_0000;
/// Ring layouts (descriptor table, available ring, used ring) per queue.
const RX: (u32, u32, u32) = (0x0, 0x100, 0x200);
const TX: (u32, u32, u32) = (0x400, 0x500, 0x600);

/// A tap in memory that checks what the device sends.
struct CheckingTap {
    /// Stands in for the tap's fd in the device's epoll set.
    fd: RawFd,
    header_len: usize,
    acked: u64,
    refuse: bool,
}

impl FrameIo for CheckingTap {
    fn read_frame(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        assert!(frame.len() <= MAX_BUFFER_SIZE, "oversize frame sent");
        assert!(
            frame.len() >= self.header_len + ETH_HLEN,
            "runt frame sent: {} bytes",
            frame.len()
        );
        let (flags, gso_type) = (frame[0], frame[1]);
        assert!(
            flags == 0
                || (flags == VIRTIO_NET_HDR_F_NEEDS_CSUM && self.acked & VIRTIO_NET_F_CSUM != 0),
            "checksum offload sent without negotiation: flags {flags:#x}"
        );
        let gso_ok = match gso_type {
            VIRTIO_NET_HDR_GSO_NONE => true,
            VIRTIO_NET_HDR_GSO_TCPV4 => self.acked & VIRTIO_NET_F_HOST_TSO4 != 0,
            VIRTIO_NET_HDR_GSO_TCPV6 => self.acked & VIRTIO_NET_F_HOST_TSO6 != 0,
            _ => false,
        };
        assert!(
            gso_ok,
            "segmentation offload {gso_type:#x} sent without negotiation"
        );
        if self.refuse {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }

    fn set_header_len(&mut self, len: usize) -> io::Result<()> {
        assert!(len == VIRTIO_NET_HDR_LEN || len == VIRTIO_NET_HDR_LEN_LEGACY);
        self.header_len = len;
        Ok(())
    }
}

impl AsRawFd for CheckingTap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, image)) = data.split_first() else {
        return;
    };
    let mem = capsid_fuzz::guest_memory(image, MEM_SIZE);

    // What the driver accepts: modern or legacy header, and any of the
    // transmit offloads (the device masks what it did not offer).
    let mut acked = 0;
    if control & 2 != 0 {
        acked |= VIRTIO_F_VERSION_1;
    }
    if control & 4 != 0 {
        acked |= VIRTIO_NET_F_CSUM;
    }
    if control & 8 != 0 {
        acked |= VIRTIO_NET_F_HOST_TSO4;
    }
    if control & 16 != 0 {
        acked |= VIRTIO_NET_F_HOST_TSO6;
    }
    let tap = CheckingTap {
        fd: poll_fd(),
        header_len: VIRTIO_NET_HDR_LEN,
        acked,
        refuse: control & 32 != 0,
    };
    let mut net = Net::new(tap, None).expect("net device");
    net.ack_features(acked);

    let mut rx = queue(RX, false);
    let mut tx = queue(TX, control & 1 != 0);
    let mut queues = [&mut rx, &mut tx];
    let kick = DeviceEvent::Queue(u16::try_from(TX_QUEUE).expect("queue index"));
    let _ = net.process(kick, &mut queues, &mem);
    // A second kick finds the ring drained (or still broken).
    let _ = net.process(kick, &mut queues, &mem);
    let stats = net.stats();
    assert_eq!(stats.rx_frames, 0);
});
