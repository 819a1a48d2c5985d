//! virtio-blk, the block device (virtio 1.2, section 5.2).
//!
//! One request queue. Each request is a descriptor chain: a device-readable
//! 16-byte header (type, reserved, sector), the data (device-readable for
//! writes, device-writable for reads), and a final device-writable status
//! byte. The backing store is one host file or block device ([`Disk`]),
//! opened once; data moves between it and guest memory with positioned
//! reads and writes, without an intermediate buffer.

mod chain;
mod device;
mod disk;
mod request;

use std::path::PathBuf;

pub use device::{Blk, BlkConfig, BLK_QUEUE_SIZE};
pub use disk::Disk;
pub use request::{process_queue, BlkStats, RequestContext};

/// Virtio device id of the block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// The block device has a single request queue (no VIRTIO_BLK_F_MQ).
pub const BLK_NUM_QUEUES: usize = 1;

/// Sector size of the virtio-blk protocol: sector numbers and capacity are
/// always in 512-byte units.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;

/// VIRTIO_BLK_F_SEG_MAX: `seg_max` in the configuration is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// VIRTIO_BLK_F_RO: the device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_FLUSH: the device has a write cache and honours
/// VIRTIO_BLK_T_FLUSH.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// VIRTIO_BLK_F_DISCARD: VIRTIO_BLK_T_DISCARD is supported.
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
/// VIRTIO_BLK_F_WRITE_ZEROES: VIRTIO_BLK_T_WRITE_ZEROES is supported.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

/// Request type: read sectors into the driver's buffers.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write the driver's buffers to sectors.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: make completed writes stable.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: return the device id string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Request type: deallocate ranges of sectors.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Request type: make ranges of sectors read as zeroes.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Request status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Request status: device or driver error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Request status: request type not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Flag of a discard/write-zeroes segment: the range may be deallocated.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Length of the device id string returned for VIRTIO_BLK_T_GET_ID.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;

/// Length of the request header (`struct virtio_blk_req` up to the data).
pub const REQUEST_HEADER_LEN: u64 = 16;
/// Length of one discard/write-zeroes segment
/// (`struct virtio_blk_discard_write_zeroes`).
pub const DISCARD_SEGMENT_LEN: u64 = 16;

/// Data segments the driver may put in one request (`seg_max`). A chain
/// may hold this many plus the header and status descriptors even on a
/// queue smaller than that (through an indirect table).
pub const SEG_MAX: u32 = 126;
/// Sectors one discard or write-zeroes segment may cover (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Segments one discard or write-zeroes request may carry.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Preferred discard alignment in sectors (4 KiB, the host page size).
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

/// Errors of the block device.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The backing file could not be opened.
    #[error("cannot open backing file {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The size of the backing file could not be found out.
    #[error("cannot find the size of the backing file")]
    Size(#[source] std::io::Error),
    /// The backing path is neither a regular file nor a block device.
    #[error("backing file {0} is neither a regular file nor a block device")]
    NotADisk(PathBuf),
    /// The serial given is longer than the protocol carries.
    #[error("serial is {0} bytes long; at most 20 are allowed")]
    SerialTooLong(usize),
    /// The queue itself (its rings) could not be accessed.
    #[error("cannot access the request queue")]
    Queue(#[source] virtio_queue::Error),
}

/// Result of block device operations.
pub type Result<T> = std::result::Result<T, BlkError>;
