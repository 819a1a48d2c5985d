//! virtio-rng, the entropy device (virtio 1.2, section 5.4).
//!
//! One queue; the driver posts device-writable buffers and the device fills
//! them with random bytes from the host's `getrandom(2)`.

mod device;
mod request;

pub use device::{Rng, RNG_QUEUE_SIZE};
pub use request::{process_queue, EntropySource, HostEntropy, RngStats};

/// Virtio device id of the entropy device.
pub const VIRTIO_ID_RNG: u32 = 4;

/// The entropy device has a single request queue.
pub const RNG_NUM_QUEUES: usize = 1;

/// Bytes served for one request at most: a guest asking for more gets a
/// short fill, which the driver handles, and the host never allocates or
/// spends unbounded time for one buffer.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

/// Errors of the entropy device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// The host's random source failed.
    #[error(
        "the host's getrandom(2) failed: {0} (capsid needs getrandom(2) or a readable \
         /dev/urandom on the host)"
    )]
    // A String: getrandom 0.2's Error implements std::error::Error only with its `std` feature, which is off.
    Entropy(String),
    /// A descriptor chain could not be read from the queue.
    #[error("malformed descriptor chain")]
    Queue(#[source] virtio_queue::Error),
    /// Writing into guest memory failed (address outside guest RAM).
    #[error("cannot write random bytes into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// Result of entropy device operations.
pub type Result<T> = std::result::Result<T, RngError>;
