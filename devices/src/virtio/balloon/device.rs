//! The balloon device model: features, configuration space (virtio 1.2,
//! section 5.5.4), the queues by role, and the statistics timer.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::timerfd::TimerFd;

use super::discard::{HostDiscarder, PageDiscarder};
use super::request::{
    process_deflate, process_inflate, process_reporting, BalloonCounters, BalloonStats, StatsQueue,
};
use super::{
    BalloonError, Result, BALLOON_PAGE_SIZE, VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_PAGE_REPORTING, VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_ID_BALLOON,
};
use crate::virtio::{
    queue_bit, read_config_bytes, DeviceError, DeviceEvent, ModelState, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

/// Size of every balloon queue.
pub const BALLOON_QUEUE_SIZE: u16 = 256;

/// `struct virtio_balloon_config`: num_pages, actual,
/// free_page_hint_cmd_id, poison_val.
const CONFIG_LEN: usize = 16;
/// Offset of `actual` in the configuration space.
const CONFIG_ACTUAL: u64 = 4;

/// How to build a balloon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BalloonConfig {
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Ask the guest for statistics this often (seconds); 0: only on
    /// request. The statistics queue is offered either way.
    pub stats_polling_interval_s: u32,
    /// Offer free page reporting.
    pub free_page_reporting: bool,
}

/// What the balloon keeps beyond its transport's registers and queues,
/// for snapshots: the host's target, what the driver reported holding,
/// and the statistics buffer held until the host wants fresh figures
/// (without it, the driver would never be asked again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BalloonState {
    /// `num_pages`.
    pub target_pages: u32,
    /// `actual`.
    pub actual_pages: u32,
    /// Head descriptor of the held statistics buffer.
    pub stats_buffer: Option<u16>,
}

/// What a queue index means once features are negotiated: absent queues
/// are skipped in the numbering (section 5.5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// virtio-balloon.
#[derive(Debug)]
pub struct Balloon<P: PageDiscarder = HostDiscarder> {
    config: BalloonConfig,
    discarder: P,
    acked: u64,
    target_pages: u32,
    actual_pages: u32,
    stats_queue: StatsQueue,
    timer: Option<TimerFd>,
    queue_sizes: Vec<u16>,
    /// What the balloon has done since start.
    pub counters: BalloonCounters,
}

impl Balloon<HostDiscarder> {
    /// A balloon that discards through the host mapping.
    pub fn new(config: BalloonConfig) -> Result<Self> {
        Self::with_discarder(config, HostDiscarder)
    }
}

impl<P: PageDiscarder> Balloon<P> {
    /// A balloon discarding through `discarder`.
    pub fn with_discarder(config: BalloonConfig, discarder: P) -> Result<Self> {
        let timer = if config.stats_polling_interval_s > 0 {
            Some(TimerFd::new().map_err(|e| BalloonError::Timer(e.into()))?)
        } else {
            None
        };
        let queues = 3 + usize::from(config.free_page_reporting);
        Ok(Self {
            config,
            discarder,
            acked: 0,
            target_pages: 0,
            actual_pages: 0,
            stats_queue: StatsQueue::default(),
            timer,
            queue_sizes: vec![BALLOON_QUEUE_SIZE; queues],
            counters: BalloonCounters::default(),
        })
    }

    /// Sets the target size in 4 KiB pages; the host side must then signal
    /// a configuration change.
    pub fn set_target_pages(&mut self, pages: u32) {
        self.target_pages = pages;
    }

    /// The target in 4 KiB pages.
    pub fn target_pages(&self) -> u32 {
        self.target_pages
    }

    /// Pages the driver says it holds (`actual`).
    pub fn actual_pages(&self) -> u32 {
        self.actual_pages
    }

    /// What a snapshot keeps of the model.
    pub fn state(&self) -> BalloonState {
        BalloonState {
            target_pages: self.target_pages,
            actual_pages: self.actual_pages,
            stats_buffer: self.stats_queue.held_buffer(),
        }
    }

    /// Takes a snapshot's `state` back (after the transport's, which
    /// negotiated the features again).
    pub fn restore_state(&mut self, state: &BalloonState) {
        self.target_pages = state.target_pages;
        self.actual_pages = state.actual_pages;
        self.stats_queue.hold(state.stats_buffer);
    }

    /// The guest's last statistics.
    pub fn stats(&self) -> BalloonStats {
        self.stats_queue.stats
    }

    /// Whether the driver negotiated the statistics queue.
    pub fn stats_enabled(&self) -> bool {
        self.acked & VIRTIO_BALLOON_F_STATS_VQ != 0
    }

    /// Asks the driver for fresh statistics; returns the notification mask
    /// for the transport's queues.
    pub fn request_stats(&mut self, queues: &mut [&mut Queue], mem: &GuestMemoryMmap) -> u64 {
        let Some(index) = self.queue_index(Role::Stats) else {
            return 0;
        };
        let Some(queue) = queues.get_mut(index) else {
            return 0;
        };
        match self.stats_queue.request(queue, mem) {
            Ok(true) => queue_bit(index),
            Ok(false) => 0,
            Err(e) => {
                tracing::debug!(error = %e, "balloon: statistics request failed");
                0
            }
        }
    }

    fn role(&self, index: usize) -> Option<Role> {
        let mut roles = vec![Role::Inflate, Role::Deflate];
        if self.acked & VIRTIO_BALLOON_F_STATS_VQ != 0 {
            roles.push(Role::Stats);
        }
        if self.acked & VIRTIO_BALLOON_F_PAGE_REPORTING != 0 {
            roles.push(Role::Reporting);
        }
        roles.get(index).copied()
    }

    fn queue_index(&self, role: Role) -> Option<usize> {
        (0..self.queue_sizes.len()).find(|&i| self.role(i) == Some(role))
    }

    fn arm_timer(&mut self) {
        let interval = Duration::from_secs(u64::from(self.config.stats_polling_interval_s));
        if let Some(timer) = self.timer.as_mut() {
            if let Err(e) = timer.reset(interval, Some(interval)) {
                tracing::warn!(error = %e, "balloon: cannot arm the statistics timer");
            }
        }
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..4].copy_from_slice(&self.target_pages.to_le_bytes());
        c[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        c
    }
}

impl<P: PageDiscarder> VirtioDevice for Balloon<P> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn name(&self) -> &'static str {
        "balloon"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        // Indirect descriptors and event index are not offered: the Linux
        // driver posts single buffers and kicks for each.
        let mut f = VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_STATS_VQ;
        if self.config.deflate_on_oom {
            f |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        if self.config.free_page_reporting {
            f |= VIRTIO_BALLOON_F_PAGE_REPORTING;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
        if self.stats_enabled() {
            self.arm_timer();
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is the driver's to write.
        if offset == CONFIG_ACTUAL {
            if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                self.actual_pages = u32::from_le_bytes(bytes);
            }
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        self.timer.as_ref().map(AsRawFd::as_raw_fd)
    }

    fn process(
        &mut self,
        event: DeviceEvent,
        queues: &mut [&mut Queue],
        mem: &GuestMemoryMmap,
    ) -> std::result::Result<u64, DeviceError> {
        let err = |e| DeviceError::new("balloon", e);
        let index = match event {
            DeviceEvent::Backend => {
                if let Some(timer) = self.timer.as_mut() {
                    // Reading clears the expiry count; an error here only
                    // means there was nothing to read.
                    let _ = timer.wait();
                }
                return Ok(self.request_stats(queues, mem));
            }
            DeviceEvent::Queue(index) => usize::from(index),
        };
        let (Some(role), Some(queue)) = (self.role(index), queues.get_mut(index)) else {
            return Ok(0);
        };
        let notify = match role {
            Role::Inflate => {
                process_inflate(queue, mem, &mut self.discarder, &mut self.counters).map_err(err)?
            }
            Role::Deflate => process_deflate(queue, mem, &mut self.counters).map_err(err)?,
            Role::Stats => self
                .stats_queue
                .process(queue, mem, &mut self.counters)
                .map_err(err)?,
            Role::Reporting => {
                process_reporting(queue, mem, &mut self.discarder, &mut self.counters)
                    .map_err(err)?
            }
        };
        Ok(if notify { queue_bit(index) } else { 0 })
    }

    fn model_state(&self) -> Option<ModelState> {
        Some(ModelState::Balloon(self.state()))
    }

    fn restore_model_state(&mut self, state: &ModelState) -> std::result::Result<(), DeviceError> {
        let ModelState::Balloon(state) = state;
        Balloon::restore_state(self, state);
        Ok(())
    }

    fn reset(&mut self) {
        self.acked = 0;
        self.actual_pages = 0;
        self.stats_queue.reset();
        if let Some(timer) = self.timer.as_mut() {
            let _ = timer.clear();
        }
    }
}

/// Pages of [`BALLOON_PAGE_SIZE`] in `mib` MiB.
pub fn mib_to_pages(mib: u32) -> u32 {
    let pages = u64::from(mib) * (1 << 20) / BALLOON_PAGE_SIZE;
    u32::try_from(pages).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    struct Nothing;

    impl PageDiscarder for Nothing {
        fn discard(&mut self, _: &GuestMemoryMmap, _: GuestAddress, _: u64) -> Result<()> {
            Ok(())
        }
    }

    fn balloon(config: BalloonConfig) -> Balloon<Nothing> {
        Balloon::with_discarder(config, Nothing).unwrap()
    }

    #[test]
    fn features_follow_config() {
        let b = balloon(BalloonConfig::default());
        assert_eq!(b.features(), VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_STATS_VQ);
        assert_eq!(b.queue_max_sizes().len(), 3);
        let b = balloon(BalloonConfig {
            deflate_on_oom: true,
            stats_polling_interval_s: 1,
            free_page_reporting: true,
        });
        assert_ne!(b.features() & VIRTIO_BALLOON_F_DEFLATE_ON_OOM, 0);
        assert_ne!(b.features() & VIRTIO_BALLOON_F_PAGE_REPORTING, 0);
        assert_eq!(b.queue_max_sizes().len(), 4);
        assert!(b.backend_fd().is_some());
    }

    #[test]
    fn queue_roles_skip_absent_queues() {
        let mut b = balloon(BalloonConfig {
            free_page_reporting: true,
            ..Default::default()
        });
        b.ack_features(VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_PAGE_REPORTING);
        assert_eq!(b.role(2), Some(Role::Reporting));
        assert_eq!(b.role(3), None);
        b.ack_features(
            VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_STATS_VQ | VIRTIO_BALLOON_F_PAGE_REPORTING,
        );
        assert_eq!(b.role(2), Some(Role::Stats));
        assert_eq!(b.role(3), Some(Role::Reporting));
    }

    #[test]
    fn config_space_carries_target_and_actual() {
        let mut b = balloon(BalloonConfig::default());
        b.set_target_pages(mib_to_pages(64));
        let mut c = [0u8; 8];
        b.read_config(0, &mut c);
        assert_eq!(u32::from_le_bytes(c[..4].try_into().unwrap()), 16384);
        b.write_config(4, &7u32.to_le_bytes());
        assert_eq!(b.actual_pages(), 7);
        // num_pages is the host's: writes there are ignored.
        b.write_config(0, &1u32.to_le_bytes());
        assert_eq!(b.target_pages(), 16384);
        // Odd widths are ignored.
        b.write_config(4, &[1, 2]);
        assert_eq!(b.actual_pages(), 7);
    }

    #[test]
    fn stats_request_returns_the_held_buffer() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut b = balloon(BalloonConfig::default());
        b.ack_features(VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_STATS_VQ);
        let vqs: Vec<_> = (0..3)
            .map(|i| MockSplitQueue::create(&mem, GuestAddress(0x1_0000 * (i + 1)), 16))
            .collect();
        let entry = [4u8, 0, 0, 0, 0x10, 0, 0, 0, 0, 0];
        mem.write_slice(&entry, GuestAddress(0x8_0000)).unwrap();
        vqs[2]
            .build_desc_chain(&[RawDescriptor::from(SplitDescriptor::new(
                0x8_0000, 10, 0, 0,
            ))])
            .unwrap();
        let mut queues: Vec<Queue> = vqs.iter().map(|v| v.create_queue().unwrap()).collect();
        let mut refs: Vec<&mut Queue> = queues.iter_mut().collect();
        assert_eq!(
            b.process(DeviceEvent::Queue(2), &mut refs, &mem).unwrap(),
            0
        );
        assert_eq!(b.stats().free_memory, Some(0x10_0000));
        assert_eq!(b.request_stats(&mut refs, &mem), queue_bit(2));
        assert_eq!(vqs[2].used().idx().load(), 1);
    }

    #[test]
    fn state_comes_back_after_the_features() {
        let mut b = balloon(BalloonConfig::default());
        b.ack_features(VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_STATS_VQ);
        b.set_target_pages(300);
        b.write_config(4, &200u32.to_le_bytes());
        b.stats_queue.hold(Some(3));
        let state = b.model_state().unwrap();
        let mut back = balloon(BalloonConfig::default());
        back.ack_features(VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_STATS_VQ);
        back.restore_model_state(&state).unwrap();
        assert_eq!((back.target_pages(), back.actual_pages()), (300, 200));
        assert_eq!(back.stats_queue.held_buffer(), Some(3));
        assert_eq!(back.model_state(), Some(state));
    }

    #[test]
    fn mib_conversion_saturates() {
        assert_eq!(mib_to_pages(1), 256);
        assert_eq!(mib_to_pages(u32::MAX), u32::MAX);
    }
}
