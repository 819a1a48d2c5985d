//! The block device model: features, configuration space (virtio 1.2,
//! section 5.2.4) and the request queue.

use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::disk::Disk;
use super::request::{process_queue, BlkStats, RequestContext};
use super::{
    BlkError, Result, BLK_NUM_QUEUES, DISCARD_SECTOR_ALIGNMENT, MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG, SEG_MAX, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_ID_BLOCK,
};
use crate::virtio::{
    queue_bit, read_config_bytes, DeviceError, DeviceEvent, VirtioDevice, COMMON_FEATURES,
};

/// Largest queue offered to the driver (QEMU's vhost-user-blk asks for 128
/// by default).
pub const BLK_QUEUE_SIZE: u16 = 1024;

/// Length of the configuration space served: `struct virtio_blk_config`
/// up to and including `write_zeroes_may_unmap` and its padding.
const CONFIG_LEN: usize = 60;

/// How to build a block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkConfig {
    /// The backing file or block device.
    pub path: PathBuf,
    /// Refuse writes (the file is opened read-only, VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// The id returned for VIRTIO_BLK_T_GET_ID (at most 20 bytes); the
    /// backing file's name when `None`.
    pub serial: Option<String>,
}

/// virtio-blk serving one disk image.
#[derive(Debug)]
pub struct Blk {
    disk: Disk,
    serial: [u8; VIRTIO_BLK_ID_BYTES],
    config: [u8; CONFIG_LEN],
    acked: u64,
    /// What the device has done since start, for metrics.
    pub stats: BlkStats,
}

impl Blk {
    /// Opens the backing file and builds the device.
    pub fn new(config: &BlkConfig) -> Result<Self> {
        let serial = match &config.serial {
            Some(s) => s.as_bytes().to_vec(),
            None => config
                .path
                .file_name()
                .map(|n| {
                    n.as_bytes()
                        .iter()
                        .copied()
                        .take(VIRTIO_BLK_ID_BYTES)
                        .collect()
                })
                .unwrap_or_default(),
        };
        let disk = Disk::open(&config.path, config.read_only)?;
        let blk = Self::with_disk(disk, &serial)?;
        tracing::info!(
            path = %config.path.display(),
            capacity_sectors = blk.disk.capacity(),
            read_only = config.read_only,
            "blk: serving disk"
        );
        Ok(blk)
    }

    /// A device serving `disk`, identified by `serial` (at most 20 bytes).
    pub fn with_disk(disk: Disk, serial: &[u8]) -> Result<Self> {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
        id.get_mut(..serial.len())
            .ok_or(BlkError::SerialTooLong(serial.len()))?
            .copy_from_slice(serial);
        let config = config_space(&disk);
        Ok(Self {
            disk,
            serial: id,
            config,
            acked: 0,
            stats: BlkStats::default(),
        })
    }
}

/// `struct virtio_blk_config`, little-endian.
fn config_space(disk: &Disk) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, &disk.capacity().to_le_bytes());
    // size_max (8) is not offered: segments may be any length.
    put(12, &SEG_MAX.to_le_bytes());
    // geometry (16), blk_size (20), topology (24), writeback (32) unused;
    // num_queues (34) is valid only with VIRTIO_BLK_F_MQ.
    put(34, &1u16.to_le_bytes());
    if !disk.read_only() {
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEG.to_le_bytes());
        put(44, &DISCARD_SECTOR_ALIGNMENT.to_le_bytes());
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &MAX_DISCARD_SEG.to_le_bytes());
        // write_zeroes_may_unmap: the unmap flag punches holes.
        put(56, &[1]);
    }
    c
}

impl VirtioDevice for Blk {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn name(&self) -> &'static str {
        "blk"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[BLK_QUEUE_SIZE; BLK_NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        let mut features = COMMON_FEATURES | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH;
        if self.disk.read_only() {
            features |= VIRTIO_BLK_F_RO;
        } else {
            features |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
        }
        features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process(
        &mut self,
        event: DeviceEvent,
        queues: &mut [&mut Queue],
        mem: &GuestMemoryMmap,
    ) -> std::result::Result<u64, DeviceError> {
        let (DeviceEvent::Queue(0), Some(queue)) = (event, queues.get_mut(0)) else {
            return Ok(0);
        };
        let ctx = RequestContext {
            disk: &self.disk,
            serial: &self.serial,
            discard: self.acked & VIRTIO_BLK_F_DISCARD != 0,
            write_zeroes: self.acked & VIRTIO_BLK_F_WRITE_ZEROES != 0,
        };
        let (stats, notify) =
            process_queue(&mut **queue, mem, &ctx).map_err(|e| DeviceError::new("blk", e))?;
        self.stats.add(&stats);
        Ok(if notify { queue_bit(0) } else { 0 })
    }

    fn reset(&mut self) {
        self.acked = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(len: usize) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new()
            .prefix("a-rather-long-disk-image-name")
            .tempfile()
            .unwrap();
        f.write_all(&vec![0u8; len]).unwrap();
        f
    }

    fn le32(c: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(c[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn config_space_carries_capacity_and_limits() {
        let f = image(8 * 1024 * 1024);
        let blk = Blk::new(&BlkConfig {
            path: f.path().to_path_buf(),
            read_only: false,
            serial: None,
        })
        .unwrap();
        let mut c = [0u8; 64];
        blk.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c[..8].try_into().unwrap()), 16384);
        assert_eq!(le32(&c, 12), SEG_MAX);
        assert_eq!(le32(&c, 36), MAX_DISCARD_SECTORS);
        assert_eq!(le32(&c, 52), MAX_DISCARD_SEG);
        assert_eq!(c[56], 1);
        assert_eq!(&c[60..], &[0u8; 4]);
        // Reads at an offset, as QEMU does field by field.
        let mut cap_hi = [0u8; 4];
        blk.read_config(4, &mut cap_hi);
        assert_eq!(cap_hi, [0, 0, 0, 0]);

        let f = blk.features();
        assert_ne!(f & VIRTIO_BLK_F_FLUSH, 0);
        assert_ne!(f & VIRTIO_BLK_F_SEG_MAX, 0);
        assert_ne!(f & VIRTIO_BLK_F_DISCARD, 0);
        assert_eq!(f & VIRTIO_BLK_F_RO, 0);
    }

    #[test]
    fn read_only_device_offers_ro_and_no_discard() {
        let f = image(4096);
        let blk = Blk::new(&BlkConfig {
            path: f.path().to_path_buf(),
            read_only: true,
            serial: Some("ro-disk".into()),
        })
        .unwrap();
        let features = blk.features();
        assert_ne!(features & VIRTIO_BLK_F_RO, 0);
        assert_eq!(
            features & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES),
            0
        );
        let mut c = [0u8; CONFIG_LEN];
        blk.read_config(0, &mut c);
        assert_eq!(le32(&c, 36), 0);
        assert_eq!(&blk.serial[..8], b"ro-disk\0");
    }

    #[test]
    fn serial_defaults_to_the_file_name() {
        let f = image(512);
        let blk = Blk::new(&BlkConfig {
            path: f.path().to_path_buf(),
            read_only: true,
            serial: None,
        })
        .unwrap();
        assert_eq!(&blk.serial, b"a-rather-long-disk-i");
    }

    #[test]
    fn long_serial_is_refused() {
        let f = image(512);
        let err = Blk::new(&BlkConfig {
            path: f.path().to_path_buf(),
            read_only: true,
            serial: Some("x".repeat(21)),
        })
        .unwrap_err();
        assert!(matches!(err, BlkError::SerialTooLong(21)), "{err}");
    }

    #[test]
    fn unnegotiated_features_are_dropped() {
        let f = image(512);
        let mut blk = Blk::new(&BlkConfig {
            path: f.path().to_path_buf(),
            read_only: true,
            serial: None,
        })
        .unwrap();
        blk.ack_features(VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_FLUSH);
        assert_eq!(blk.acked, VIRTIO_BLK_F_FLUSH);
        blk.reset();
        assert_eq!(blk.acked, 0);
    }
}
