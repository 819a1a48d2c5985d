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
        Ok(Self { guest_cid, muxer: Muxer::new(guest_cid, uds_path)?, acked: 0, malformed: 0 })
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Muxer counters.
    pub fn stats(&self) -> MuxerStats {
        self.muxer.stats
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
                        let data = pkt.data_slice().and_then(|d| d.subslice(0, pkt.len() as usize).ok());
                        self.muxer.on_guest_packet(&hdr, data.as_ref());
                    }
                    Err(e) => {
                        self.malformed += 1;
                        tracing::debug!(error = %e, "vsock: malformed tx chain");
                    }
                }
                queue.add_used(mem, head, 0).map_err(VsockError::Queue)?;
                used_any = true;
            }
            if !queue.enable_notification(mem).map_err(VsockError::Queue)? {
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
                if more {
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
                    queue.add_used(mem, head, 0).map_err(VsockError::Queue)?;
                    used_any = true;
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
            let used = u32::try_from(pkt.header_slice().len()).unwrap_or(0).saturating_add(rx.len);
            queue.add_used(mem, head, used).map_err(VsockError::Queue)?;
            used_any = true;
        }
        Ok(used_any && queue.needs_notification(mem).map_err(VsockError::Queue)?)
    }
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
}
