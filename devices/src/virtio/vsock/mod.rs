//! virtio-vsock (virtio 1.2, section 5.10) with a Firecracker-style hybrid
//! host side: guest AF_VSOCK stream connections map to host Unix sockets.
//!
//! * Host-initiated: a host process connects to the device's Unix socket,
//!   writes `CONNECT <port>\n`, gets `OK <local_port>\n`, and from then on
//!   the stream is the guest connection.
//! * Guest-initiated to host port P: the device connects to the Unix socket
//!   `<path>_<P>`; nobody listening there means the guest sees a reset.
//!
//! `connection` is one stream's state machine and credit accounting,
//! `muxer` owns the Unix sockets and decides what goes to the guest next,
//! `device` is the virtio side (queues, packets).

mod connection;
mod device;
mod muxer;

pub use device::{Vsock, VSOCK_EVENT_TRANSPORT_RESET, VSOCK_QUEUE_SIZE};
pub use muxer::MuxerStats;

/// Virtio device id of the socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The host's CID.
pub const VSOCK_HOST_CID: u64 = 2;
/// Smallest CID a guest may have (0-2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;

/// Queue indices.
pub const RX_QUEUE: usize = 0;
/// Driver-to-device packets.
pub const TX_QUEUE: usize = 1;
/// Device events: the transport reset capsid-vmm sends after a restore.
pub const EVT_QUEUE: usize = 2;

/// VIRTIO_VSOCK_TYPE_STREAM.
pub const VSOCK_TYPE_STREAM: u16 = 1;

/// Packet operations.
pub const VSOCK_OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const VSOCK_OP_RESPONSE: u16 = 2;
/// Connection reset.
pub const VSOCK_OP_RST: u16 = 3;
/// One or both directions closed.
pub const VSOCK_OP_SHUTDOWN: u16 = 4;
/// Data.
pub const VSOCK_OP_RW: u16 = 5;
/// Receive-buffer space announcement.
pub const VSOCK_OP_CREDIT_UPDATE: u16 = 6;
/// Request for a credit update.
pub const VSOCK_OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more data.
pub const VSOCK_FLAGS_SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const VSOCK_FLAGS_SHUTDOWN_SEND: u32 = 2;

/// Largest payload in one packet, either way (Linux uses 64 KiB).
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// Per-connection buffer for guest-to-host data the host side has not
/// taken yet; it is also the credit (`buf_alloc`) the guest is given, so a
/// well-behaved guest can never overrun it.
pub const CONN_TX_BUF_SIZE: u32 = 256 * 1024;
/// Connections at most per device; further ones are refused.
pub const MAX_CONNECTIONS: usize = 1024;
/// First port handed to host-initiated connections.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line accepted.
pub const MAX_CONNECT_LINE: usize = 32;

/// Errors of the socket device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved.
    #[error("guest CID {0} is reserved (must be 3 or more)")]
    InvalidCid(u64),
    /// The host Unix socket cannot be created.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The host socket path cannot be claimed (in use, or unwritable).
    #[error(transparent)]
    Claim(#[from] crate::socket_claim::ClaimError),
    /// epoll failed.
    #[error("epoll")]
    Epoll(#[source] std::io::Error),
    /// A descriptor chain could not be used.
    #[error("malformed descriptor chain")]
    Queue(#[source] virtio_queue::Error),
}

/// Result of socket device operations.
pub type Result<T> = std::result::Result<T, VsockError>;
