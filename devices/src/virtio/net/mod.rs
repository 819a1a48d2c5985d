//! virtio-net, the network device (virtio 1.2, section 5.1), backed by a tap.
//!
//! Two queues: the driver posts receive buffers on queue 0 and frames to
//! send on queue 1. Every frame carries a `virtio_net_hdr` in front; the tap
//! is opened with `IFF_VNET_HDR` so the same header crosses to the host
//! kernel unchanged in layout. What the header may ask for (checksum and
//! segmentation offloads) is limited to what was negotiated.

mod device;
mod rx;
mod tap;
mod tx;

pub use device::{parse_mac, Net, NET_QUEUE_SIZE};
pub use rx::{process_rx, RxState, RxStatus};
pub use tap::{FrameIo, Tap, TapError};
pub use tx::process_tx;

/// Virtio device id of the network device.
pub const VIRTIO_ID_NET: u32 = 1;

/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// One receive/transmit pair, no control queue.
pub const NET_NUM_QUEUES: usize = 2;

/// The device handles packets with partial checksum (driver → device).
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
/// The device has a MAC address in its configuration space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// The device accepts TCPv4 segmentation offload.
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
/// The device accepts TCPv6 segmentation offload.
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
/// The driver can merge receive buffers.
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
/// The configuration space has a link status field.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;

/// Offloads the device accepts from the driver: partial checksums and TCP
/// segmentation, both passed to the tap in the header, where the host
/// kernel validates them as it builds the packet (and finishes or segments
/// it when it leaves by a device that cannot). Nothing is offloaded
/// towards the driver: the tap hands over complete, checksummed frames no
/// larger than its MTU.
pub const TX_OFFLOADS: u64 = VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6;

/// Link status bit of the `status` configuration field.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// `virtio_net_hdr.flags`: the checksum at `csum_start + csum_offset`
/// still has to be computed.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr.gso_type`: not a segmentation offload.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// `virtio_net_hdr.gso_type`: TCPv4 segmentation offload.
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// `virtio_net_hdr.gso_type`: TCPv6 segmentation offload.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// `virtio_net_hdr.gso_type` flag: the TCP segment carries ECN (CWR).
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// `struct virtio_net_hdr_v1`: the header when VIRTIO_F_VERSION_1 (or
/// VIRTIO_NET_F_MRG_RXBUF) is negotiated, ending in `num_buffers`.
pub const VIRTIO_NET_HDR_LEN: usize = 12;
/// The legacy header, without `num_buffers`.
pub const VIRTIO_NET_HDR_LEN_LEGACY: usize = 10;
/// Offset of `num_buffers` in the v1 header.
pub const VIRTIO_NET_HDR_NUM_BUFFERS: usize = 10;
/// Length of an Ethernet header: the shortest frame worth delivering.
pub const ETH_HLEN: usize = 14;

/// The most bytes (virtio-net header and frame) the device moves in one
/// chain: room for a 64 KiB segmentation-offload packet from the driver, or
/// the largest frame a tap carries (MTU 65521 with Ethernet and VLAN
/// headers). Each direction has one buffer of this size, allocated once;
/// nothing the guest says makes the device allocate more.
pub const MAX_BUFFER_SIZE: usize = 65562;

/// Counters of what the device did, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered to the driver.
    pub rx_frames: u64,
    /// Bytes delivered to the driver, headers included.
    pub rx_bytes: u64,
    /// Frames from the tap that were dropped (too big for the driver's
    /// buffer, or carrying an offload that was not negotiated).
    pub rx_dropped: u64,
    /// Receive chains returned unused because they were malformed.
    pub rx_malformed: u64,
    /// Frames written to the tap.
    pub tx_frames: u64,
    /// Bytes written to the tap, headers included.
    pub tx_bytes: u64,
    /// Transmit chains dropped because they were malformed (bad
    /// descriptors, oversize, a header asking for what was not negotiated).
    pub tx_malformed: u64,
    /// Well-formed frames the tap refused.
    pub tx_dropped: u64,
}

/// Errors of the network device. Problems with one descriptor chain are
/// counted and logged, never returned from the device; the others stop it.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A queue's rings could not be read or written.
    #[error("virtqueue access failed")]
    Queue(#[source] virtio_queue::Error),
    /// Reading a frame from the tap failed.
    #[error("cannot read from the tap")]
    TapRead(#[source] std::io::Error),
    /// The tap could not be added to or removed from the device's epoll set.
    #[error("cannot change polling of the tap")]
    Poll(#[source] std::io::Error),
    /// The device's epoll set could not be created.
    #[error("cannot create the device's epoll set")]
    Epoll(#[source] std::io::Error),
    /// A MAC address that is not six colon-separated hex bytes, or not unicast.
    #[error("invalid MAC address {0:?}: expected a unicast address like 52:54:00:12:34:56")]
    InvalidMac(String),
    /// A chain ends in a dangling, looping or unreadable link, or is empty.
    #[error("descriptor chain is empty or its links are broken")]
    BrokenChain,
    /// A descriptor has the wrong direction for its queue.
    #[error("descriptor has the wrong direction for its queue")]
    WrongDirection,
    /// A descriptor points outside guest memory.
    #[error("descriptor points outside guest memory")]
    OutsideMemory,
    /// A transmit chain holds more than [`MAX_BUFFER_SIZE`] bytes.
    #[error("transmit chain is longer than {MAX_BUFFER_SIZE} bytes")]
    Oversize,
    /// A frame is shorter than the virtio-net and Ethernet headers.
    #[error("frame of {0} bytes is shorter than its headers")]
    ShortFrame(usize),
    /// A receive chain cannot hold the frame.
    #[error("receive buffer of {have} bytes cannot hold a {need}-byte frame")]
    BufferTooSmall {
        /// Bytes of header and frame.
        need: usize,
        /// Bytes the chain can hold.
        have: u64,
    },
    /// A header asks for a checksum or segmentation offload that was not
    /// negotiated.
    #[error("header asks for an offload that was not negotiated (flags {flags:#x}, gso_type {gso_type:#x})")]
    Offload {
        /// `virtio_net_hdr.flags`.
        flags: u8,
        /// `virtio_net_hdr.gso_type`.
        gso_type: u8,
    },
}

/// Result of network device operations.
pub type Result<T> = std::result::Result<T, NetError>;

/// Length of the virtio-net header for the negotiated features.
pub fn header_len(acked_features: u64) -> usize {
    if acked_features & (crate::virtio::VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF) != 0 {
        VIRTIO_NET_HDR_LEN
    } else {
        VIRTIO_NET_HDR_LEN_LEGACY
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::VIRTIO_F_VERSION_1;

    #[test]
    fn header_length_follows_features() {
        assert_eq!(header_len(VIRTIO_F_VERSION_1), 12);
        assert_eq!(header_len(VIRTIO_NET_F_MRG_RXBUF), 12);
        assert_eq!(header_len(0), 10);
    }
}
