//! The host side of the hybrid vsock: the device's listening Unix socket,
//! one Unix stream per connection, and the order in which connections get
//! to send packets to the guest.
//!
//! Everything host-side sits in one epoll set whose fd is the device's
//! backend fd. Interest follows state: a stream is read only while the
//! guest has credit for it and rx buffers exist, and written only while
//! guest data is buffered for it — so a level-triggered loop never spins on
//! work it cannot do, and memory per connection stays bounded.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::socket_claim::SocketClaim;

use super::connection::{read_connect_line, ConnState, Connection, RxHeader, TxOutcome};
use super::{
    Result, VsockError, FIRST_LOCAL_PORT, MAX_CONNECTIONS, MAX_CONNECT_LINE, VSOCK_HOST_CID,
    VSOCK_OP_CREDIT_REQUEST, VSOCK_OP_CREDIT_UPDATE, VSOCK_OP_REQUEST, VSOCK_OP_RESPONSE,
    VSOCK_OP_RST, VSOCK_OP_RW, VSOCK_OP_SHUTDOWN, VSOCK_TYPE_STREAM,
};

/// Epoll token of the listening socket (stream tokens are their fds).
const LISTENER_TOKEN: u64 = u64::MAX;
/// RSTs for packets of unknown connections, queued at most; more are
/// dropped (the guest times out instead).
const MAX_ORPHAN_RSTS: usize = 64;

/// A connection is named by its two ports: ours (host side) and the guest's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Host-side port.
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
}

/// Header fields of a packet from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxHeader {
    /// Source CID (must be the guest's).
    pub src_cid: u64,
    /// Destination CID (must be the host's).
    pub dst_cid: u64,
    /// Guest port.
    pub src_port: u32,
    /// Host port.
    pub dst_port: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// SHUTDOWN flags.
    pub flags: u32,
    /// Guest receive buffer.
    pub buf_alloc: u32,
    /// Guest consumed bytes.
    pub fwd_cnt: u32,
}

/// Counters for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MuxerStats {
    /// Connections made (either side).
    pub connections: u64,
    /// Packets dropped as invalid (wrong CID or type).
    pub dropped: u64,
    /// Connections reset for protocol violations.
    pub violations: u64,
    /// Host clients dropped for a bad `CONNECT` line.
    pub bad_connect_lines: u64,
}

struct Entry {
    conn: Connection,
    interest: EventSet,
    /// The host side hung up: the fd left the epoll set and reads are
    /// driven by credit alone.
    hup: bool,
}

/// The hybrid vsock muxer.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    /// The listening socket's path, removed (with its lock) on drop.
    _claim: SocketClaim,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Entry>,
    fd_keys: HashMap<RawFd, ConnKey>,
    connecting: HashMap<RawFd, (UnixStream, Vec<u8>)>,
    rxq: VecDeque<ConnKey>,
    queued: HashSet<ConnKey>,
    orphan_rsts: VecDeque<ConnKey>,
    next_local_port: u32,
    rx_starved: bool,
    /// Counters.
    pub stats: MuxerStats,
}

impl std::fmt::Debug for Muxer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Muxer")
            .field("uds_path", &self.uds_path)
            .field("connections", &self.conns.len())
            .finish()
    }
}

impl Muxer {
    /// Listens on `uds_path` for host-initiated connections to guest `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self> {
        let claim = SocketClaim::new(uds_path)?;
        let listen_err = |source| VsockError::Listen {
            path: uds_path.display().to_string(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(VsockError::Epoll)?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            _claim: claim,
            listener,
            epoll,
            conns: HashMap::new(),
            fd_keys: HashMap::new(),
            connecting: HashMap::new(),
            rxq: VecDeque::new(),
            queued: HashSet::new(),
            orphan_rsts: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            rx_starved: false,
            stats: MuxerStats::default(),
        })
    }

    /// The epoll fd that is readable when host-side work is waiting.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether packets wait to go to the guest.
    pub fn has_pending_rx(&self) -> bool {
        !self.rxq.is_empty() || !self.orphan_rsts.is_empty()
    }

    /// The guest has no rx buffers (true) or posted some again (false):
    /// reading host streams pauses while it has none.
    pub fn set_rx_starved(&mut self, starved: bool) {
        if self.rx_starved != starved {
            self.rx_starved = starved;
            let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
            for key in keys {
                self.refresh(key);
            }
        }
    }

    /// Handles one packet from the guest; `data` is its payload (RW only).
    pub fn on_guest_packet<B: BitmapSlice>(
        &mut self,
        hdr: &TxHeader,
        data: Option<&VolatileSlice<'_, B>>,
    ) {
        if hdr.src_cid != self.guest_cid
            || hdr.dst_cid != VSOCK_HOST_CID
            || hdr.type_ != VSOCK_TYPE_STREAM
        {
            self.stats.dropped += 1;
            tracing::debug!(?hdr, "vsock: dropping packet with bad addressing or type");
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.op == VSOCK_OP_REQUEST {
            self.on_guest_connect(key, hdr);
            return;
        }
        let Some(entry) = self.conns.get_mut(&key) else {
            if hdr.op != VSOCK_OP_RST {
                self.queue_orphan_rst(key);
            }
            return;
        };
        let conn = &mut entry.conn;
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        let outcome = match hdr.op {
            VSOCK_OP_RESPONSE => conn.on_response(key.local_port),
            VSOCK_OP_RW => match data {
                Some(data) => conn.on_rw(data),
                None => TxOutcome::Ok,
            },
            VSOCK_OP_SHUTDOWN => conn.on_shutdown(hdr.flags),
            VSOCK_OP_CREDIT_UPDATE => TxOutcome::Ok,
            VSOCK_OP_CREDIT_REQUEST => {
                conn.pending.credit_update = true;
                TxOutcome::Ok
            }
            VSOCK_OP_RST => TxOutcome::Reset,
            _ => TxOutcome::Violation,
        };
        // A hung-up host stream is out of the epoll set: new credit alone
        // says when to read it again.
        if entry.hup && conn.wants_host_read() {
            conn.pending.rw = true;
        }
        match outcome {
            TxOutcome::Ok => {}
            TxOutcome::Violation => {
                self.stats.violations += 1;
                conn.reset();
            }
            TxOutcome::Reset => {
                self.remove(key);
                return;
            }
        }
        self.refresh(key);
    }

    fn on_guest_connect(&mut self, key: ConnKey, hdr: &TxHeader) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.queue_orphan_rst(key);
            return;
        }
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), key.local_port));
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "vsock: guest connect refused");
                self.queue_orphan_rst(key);
                return;
            }
        };
        let conn = Connection::peer_init(stream, hdr.buf_alloc, hdr.fwd_cnt);
        self.insert(key, conn);
    }

    fn insert(&mut self, key: ConnKey, conn: Connection) {
        let fd = conn.stream.as_raw_fd();
        if self
            .epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::empty(), fd as u64),
            )
            .is_err()
        {
            self.queue_orphan_rst(key);
            return;
        }
        self.stats.connections += 1;
        self.fd_keys.insert(fd, key);
        self.conns.insert(
            key,
            Entry {
                conn,
                interest: EventSet::empty(),
                hup: false,
            },
        );
        self.refresh(key);
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(entry) = self.conns.remove(&key) {
            let fd = entry.conn.stream.as_raw_fd();
            self.fd_keys.remove(&fd);
            if !entry.hup {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        }
        self.queued.remove(&key);
    }

    fn queue_orphan_rst(&mut self, key: ConnKey) {
        if self.orphan_rsts.len() < MAX_ORPHAN_RSTS {
            self.orphan_rsts.push_back(key);
        }
    }

    /// Brings a connection's epoll interest and rx queue place in line with
    /// its state; removes it once it is closed and owes nothing.
    fn refresh(&mut self, key: ConnKey) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        if entry.conn.state == ConnState::Closing && !entry.conn.pending.any() {
            self.remove(key);
            return;
        }
        if entry.conn.pending.any() && self.queued.insert(key) {
            self.rxq.push_back(key);
        }
        if entry.hup {
            return;
        }
        let mut interest = EventSet::empty();
        if entry.conn.wants_host_read() && !self.rx_starved {
            interest |= EventSet::IN;
        }
        if entry.conn.wants_host_write() {
            interest |= EventSet::OUT;
        }
        if interest != entry.interest {
            let fd = entry.conn.stream.as_raw_fd();
            if self
                .epoll
                .ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(interest, fd as u64),
                )
                .is_ok()
            {
                entry.interest = interest;
            }
        }
    }

    /// Handles whatever the host side has ready: new clients, `CONNECT`
    /// lines, readable and writable streams.
    pub fn process_host_events(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: epoll_wait");
                    return;
                }
            };
            for event in &events[..n] {
                self.on_host_event(event.data(), event.event_set());
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn on_host_event(&mut self, token: u64, set: EventSet) {
        if token == LISTENER_TOKEN {
            self.accept_clients();
            return;
        }
        let Ok(fd) = RawFd::try_from(token) else {
            return;
        };
        if self.connecting.contains_key(&fd) {
            self.read_connect(fd);
            return;
        }
        let Some(&key) = self.fd_keys.get(&fd) else {
            return;
        };
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        if set.contains(EventSet::OUT) {
            entry.conn.flush_to_host();
        }
        if set
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR)
        {
            entry.conn.pending.rw = true;
        }
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) && !entry.hup {
            // HUP is reported whatever the interest: take the fd out of the
            // set, or a stream we cannot read yet would wake us forever.
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            entry.hup = true;
            if entry.conn.wants_host_write() {
                entry.conn.flush_to_host();
            }
        }
        self.refresh(key);
    }

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + self.connecting.len() >= MAX_CONNECTIONS
                        || stream.set_nonblocking(true).is_err()
                    {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Add,
                            fd,
                            EpollEvent::new(EventSet::IN, fd as u64),
                        )
                        .is_ok()
                    {
                        self.connecting.insert(fd, (stream, Vec::new()));
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    fn read_connect(&mut self, fd: RawFd) {
        let Some((stream, line)) = self.connecting.get_mut(&fd) else {
            return;
        };
        match read_connect_line(stream, line, MAX_CONNECT_LINE) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Ok(false) => {}
            Ok(true) => {
                let port = Connection::parse_connect_line(line);
                let Some((stream, _)) = self.connecting.remove(&fd) else {
                    return;
                };
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                match port {
                    Some(peer_port) => {
                        let key = ConnKey {
                            local_port: self.allocate_local_port(peer_port),
                            peer_port,
                        };
                        self.insert(key, Connection::local_init(stream));
                    }
                    None => {
                        self.stats.bad_connect_lines += 1;
                        tracing::debug!("vsock: host client sent a bad CONNECT line");
                    }
                }
            }
            Err(_) => {
                self.stats.bad_connect_lines += 1;
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                self.connecting.remove(&fd);
            }
        }
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&ConnKey {
                local_port: port,
                peer_port,
            }) {
                return port;
            }
        }
    }

    /// The next packet for the guest, with RW payload read into `data`.
    /// Returns the connection it belongs to and its header, or `None` when
    /// nothing can be sent now.
    pub fn next_rx<B: BitmapSlice>(
        &mut self,
        data: Option<&VolatileSlice<'_, B>>,
    ) -> Option<(ConnKey, RxHeader)> {
        if let Some(key) = self.orphan_rsts.pop_front() {
            let hdr = RxHeader {
                op: VSOCK_OP_RST,
                flags: 0,
                len: 0,
                buf_alloc: 0,
                fwd_cnt: 0,
            };
            return Some((key, hdr));
        }
        while let Some(key) = self.rxq.pop_front() {
            self.queued.remove(&key);
            let Some(entry) = self.conns.get_mut(&key) else {
                continue;
            };
            let hdr = entry.conn.next_rx(data);
            self.refresh(key);
            if let Some(hdr) = hdr {
                return Some((key, hdr));
            }
        }
        None
    }

    /// Drops every connection and pending packet (driver reset).
    pub fn reset_connections(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        for (fd, _) in self.connecting.drain() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.rxq.clear();
        self.queued.clear();
        self.orphan_rsts.clear();
        self.rx_starved = false;
    }
}

/// Connects to a host Unix socket without ever blocking: a listener whose
/// backlog is full refuses (EAGAIN) instead of stalling the device, so a
/// guest cannot hang it by connecting to a slow host service.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}
