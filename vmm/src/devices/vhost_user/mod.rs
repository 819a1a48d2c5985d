//! The vhost-user frontend: capsid-vmm keeps a device's virtio-mmio
//! registers and configuration space, and hands its virtqueues to a
//! backend process (virtiofsd for virtio-fs) over a Unix socket, with the
//! `vhost` crate speaking the protocol. The backend maps guest RAM itself
//! (a shared memfd, `vstate::memory::Backing::Shared`), takes guest
//! notifications straight from KVM's ioeventfds, and signals used buffers
//! on call eventfds that the VMM's event loop turns into interrupts.
//!
//! A backend is another process, not trusted to stay up or to answer:
//! every exchange runs under a deadline ([`BACKEND_TIMEOUT`]) after which
//! the connection is shut down, so a stuck backend costs a vCPU at most
//! that long, once; a broken connection stays broken and every later
//! request fails at once.

pub mod fs;

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// How long the backend gets to answer one exchange (the set-up at
/// connection, the rings handed over at DRIVER_OK, the rings taken back at
/// reset) before the connection is given up.
pub const BACKEND_TIMEOUT: Duration = Duration::from_secs(5);

/// The vhost-user feature bit that announces protocol features (bit 30);
/// never offered to the guest.
pub const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// Errors of the vhost-user frontend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The backend's socket cannot be connected to.
    #[error("cannot connect to the vhost-user backend at {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A request failed: the backend refused it, or the connection broke.
    #[error("vhost-user {request} failed")]
    Request {
        /// Which request.
        request: &'static str,
        /// What the vhost crate said.
        #[source]
        source: vhost::Error,
    },
    /// The backend did not answer in time; the connection was shut down.
    #[error("the vhost-user backend did not answer within {0:?}; connection closed")]
    Timeout(Duration),
    /// The connection was lost earlier (hang-up, timeout, bad message).
    #[error("the vhost-user backend's connection is closed")]
    Closed,
    /// The backend serves fewer queues than the device has.
    #[error("the vhost-user backend serves {backend} queues; the device needs {wanted}")]
    TooFewQueues {
        /// GET_QUEUE_NUM's answer.
        backend: u64,
        /// The device's queues.
        wanted: usize,
    },
    /// Guest RAM is not shared (no memfd behind a region).
    #[error("guest RAM at {0:#x} is not shared memory: a vhost-user backend cannot map it")]
    PrivateMemory(u64),
    /// A ring the driver placed is not inside one region of guest RAM.
    #[error("queue {queue}'s {part} ({len} bytes at {addr:#x}) is not inside guest RAM")]
    Ring {
        /// The queue.
        queue: usize,
        /// Which part of the ring.
        part: &'static str,
        /// Its guest-physical address.
        addr: u64,
        /// Its length in bytes.
        len: u64,
    },
    /// The watchdog thread of an exchange could not be started.
    #[error("cannot start the vhost-user watchdog thread")]
    Watchdog(#[source] std::io::Error),
}

/// Result of frontend operations.
pub type Result<T> = std::result::Result<T, VhostUserError>;

fn request(name: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
    move |source| VhostUserError::Request {
        request: name,
        source,
    }
}

/// One virtqueue as the driver set it up, to be handed to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VringSetup {
    /// The queue's index.
    pub index: usize,
    /// Entries the driver chose.
    pub size: u16,
    /// Entries the device allows at most.
    pub max_size: u16,
    /// Guest-physical address of the descriptor table.
    pub desc: u64,
    /// Guest-physical address of the available (driver) ring.
    pub avail: u64,
    /// Guest-physical address of the used (device) ring.
    pub used: u64,
    /// Where the backend starts on the available ring.
    pub base: u16,
}

/// A connection to a vhost-user backend, set up (owner, features, protocol
/// features) and ready to be given memory and rings.
pub struct VhostUserHandle {
    frontend: Frontend,
    /// A second fd of the same connection: watched for hang-ups, and shut
    /// down when the backend does not answer (which unblocks the frontend).
    socket: UnixStream,
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    timeout: Duration,
    closed: bool,
}

impl std::fmt::Debug for VhostUserHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserHandle")
            .field(
                "backend_features",
                &format_args!("{:#x}", self.backend_features),
            )
            .field("protocol", &self.protocol)
            .field("closed", &self.closed)
            .finish()
    }
}

impl VhostUserHandle {
    /// Connects to the backend at `path` (retrying while it is not yet
    /// listening, up to `timeout`), becomes its owner, reads its features
    /// and agrees on protocol features (MQ, REPLY_ACK); checks it serves
    /// `queues` queues.
    pub fn connect(path: &Path, queues: usize, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => {
                    return Err(VhostUserError::Connect {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        };
        let socket = stream
            .try_clone()
            .map_err(|source| VhostUserError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let mut handle = Self {
            frontend: Frontend::from_stream(stream, queues as u64),
            socket,
            backend_features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            timeout,
            closed: false,
        };
        handle
            .guarded(|frontend| {
                frontend.set_owner().map_err(request("SET_OWNER"))?;
                let features = frontend.get_features().map_err(request("GET_FEATURES"))?;
                let mut protocol = VhostUserProtocolFeatures::empty();
                if features & PROTOCOL_FEATURES != 0 {
                    let offered = frontend
                        .get_protocol_features()
                        .map_err(request("GET_PROTOCOL_FEATURES"))?;
                    protocol = offered
                        & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
                    frontend
                        .set_protocol_features(protocol)
                        .map_err(request("SET_PROTOCOL_FEATURES"))?;
                    if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                        // Every request is acknowledged from now on: a backend
                        // that refuses one says so at once.
                        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
                    }
                }
                // Without MQ a backend serves the queues it serves; what it
                // cannot, it refuses when the ring is handed over.
                if protocol.contains(VhostUserProtocolFeatures::MQ) {
                    let backend = frontend.get_queue_num().map_err(request("GET_QUEUE_NUM"))?;
                    if backend < queues as u64 {
                        return Err(VhostUserError::TooFewQueues {
                            backend,
                            wanted: queues,
                        });
                    }
                }
                Ok((features, protocol))
            })
            .map(|(features, protocol)| {
                handle.backend_features = features;
                handle.protocol = protocol;
                handle
            })
    }

    /// The virtio features the backend offers (GET_FEATURES).
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// The protocol features agreed on.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// Whether the connection is gone for good.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// An fd of the connection that is readable only when the backend
    /// hung up or sent something unasked (between exchanges, which the
    /// caller serializes, nothing else arrives).
    pub fn socket_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Closes the connection for good (the backend misbehaved).
    pub fn close(&mut self) {
        self.closed = true;
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }

    /// Runs one exchange `f` under the deadline: a watchdog thread shuts
    /// the connection down if `f` has not returned by then, which makes
    /// the blocked send or receive fail.
    fn guarded<T>(&mut self, f: impl FnOnce(&mut Frontend) -> Result<T>) -> Result<T> {
        if self.closed {
            return Err(VhostUserError::Closed);
        }
        let timeout = self.timeout;
        let timed_out = &AtomicBool::new(false);
        let socket = &self.socket;
        let frontend = &mut self.frontend;
        let result = std::thread::scope(|scope| {
            let (done, wait) = mpsc::channel::<()>();
            std::thread::Builder::new()
                .name("vhost-user-watchdog".into())
                .spawn_scoped(scope, move || {
                    crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::VhostUser);
                    if let Err(RecvTimeoutError::Timeout) = wait.recv_timeout(timeout) {
                        timed_out.store(true, Ordering::SeqCst);
                        let _ = socket.shutdown(std::net::Shutdown::Both);
                    }
                })
                .map_err(VhostUserError::Watchdog)?;
            let result = f(frontend);
            drop(done);
            result
        });
        if timed_out.load(Ordering::SeqCst) {
            self.closed = true;
            return Err(VhostUserError::Timeout(timeout));
        }
        if let Err(VhostUserError::Request { source, .. }) = &result {
            if connection_lost(source) {
                self.close();
            }
        }
        result
    }

    /// Hands the backend what it needs to serve `vrings`: the negotiated
    /// `features` (SET_FEATURES), guest memory (SET_MEM_TABLE, its memfd
    /// regions), then per ring its size, addresses, base, call and kick
    /// eventfds, and enables it. `started` collects the rings handed over,
    /// also when a later step fails, so that they can be stopped.
    pub fn start(
        &mut self,
        features: u64,
        mem: &GuestMemoryMmap,
        vrings: &[VringSetup],
        kicks: &[EventFd],
        calls: &[EventFd],
        started: &mut Vec<usize>,
    ) -> Result<()> {
        let regions = memory_regions(mem)?;
        let configs = vrings
            .iter()
            .map(|v| vring_config(mem, v).map(|c| (v, c)))
            .collect::<Result<Vec<_>>>()?;
        let enable = features & PROTOCOL_FEATURES != 0;
        self.guarded(|frontend| {
            frontend
                .set_features(features)
                .map_err(request("SET_FEATURES"))?;
            frontend
                .set_mem_table(&regions)
                .map_err(request("SET_MEM_TABLE"))?;
            for (v, config) in &configs {
                let (Some(kick), Some(call)) = (kicks.get(v.index), calls.get(v.index)) else {
                    continue;
                };
                started.push(v.index);
                frontend
                    .set_vring_num(v.index, v.size)
                    .map_err(request("SET_VRING_NUM"))?;
                frontend
                    .set_vring_addr(v.index, config)
                    .map_err(request("SET_VRING_ADDR"))?;
                frontend
                    .set_vring_base(v.index, v.base)
                    .map_err(request("SET_VRING_BASE"))?;
                frontend
                    .set_vring_call(v.index, call)
                    .map_err(request("SET_VRING_CALL"))?;
                frontend
                    .set_vring_kick(v.index, kick)
                    .map_err(request("SET_VRING_KICK"))?;
                if enable {
                    frontend
                        .set_vring_enable(v.index, true)
                        .map_err(request("SET_VRING_ENABLE"))?;
                }
            }
            Ok(())
        })
    }

    /// Stops the rings `indices` (GET_VRING_BASE: the backend stops
    /// processing them and forgets their eventfds).
    pub fn stop(&mut self, indices: &[usize]) -> Result<()> {
        self.guarded(|frontend| {
            for &index in indices {
                frontend
                    .get_vring_base(index)
                    .map_err(request("GET_VRING_BASE"))?;
            }
            Ok(())
        })
    }
}

/// Whether a vhost error means the connection itself is unusable (as
/// opposed to the backend refusing one request).
fn connection_lost(e: &vhost::Error) -> bool {
    use vhost::vhost_user::Error as E;
    match e {
        vhost::Error::VhostUserProtocol(e) => !matches!(
            e,
            E::BackendInternalError
                | E::InvalidParam
                | E::InactiveFeature(_)
                | E::InactiveOperation(_)
        ),
        _ => false,
    }
}

/// The regions of guest RAM as the backend maps them: its memfd and the
/// offset of each region in it.
fn memory_regions(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>> {
    mem.iter()
        .map(|region| {
            VhostUserMemoryRegionInfo::from_guest_region(region)
                .map_err(|_| VhostUserError::PrivateMemory(region.start_addr().raw_value()))
        })
        .collect()
}

/// The host address of `[addr, addr + len)` when it lies inside one region.
fn host_range(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Option<u64> {
    let region = mem.find_region(GuestAddress(addr))?;
    let offset = GuestAddress(addr).checked_offset_from(region.start_addr())?;
    if offset.checked_add(len)? > region.len() {
        return None;
    }
    let host = mem.get_host_address(GuestAddress(addr)).ok()?;
    Some(host as u64)
}

/// SET_VRING_ADDR's data for `v`: the frontend's own (host) addresses of
/// the rings, each checked to lie inside one region of guest RAM.
fn vring_config(mem: &GuestMemoryMmap, v: &VringSetup) -> Result<VringConfigData> {
    let n = u64::from(v.size);
    // Descriptors are 16 bytes; the rings have flags, index, the entries
    // (2 or 8 bytes) and the event index field.
    let parts = [
        ("descriptor table", v.desc, 16 * n),
        ("available ring", v.avail, 6 + 2 * n),
        ("used ring", v.used, 6 + 8 * n),
    ];
    let mut host = [0u64; 3];
    for (slot, (part, addr, len)) in host.iter_mut().zip(parts) {
        *slot = host_range(mem, addr, len).ok_or(VhostUserError::Ring {
            queue: v.index,
            part,
            addr,
            len,
        })?;
    }
    Ok(VringConfigData {
        queue_max_size: v.max_size,
        queue_size: v.size,
        flags: 0,
        desc_table_addr: host[0],
        used_ring_addr: host[2],
        avail_ring_addr: host[1],
        log_addr: None,
    })
}

#[cfg(test)]
mod tests;
