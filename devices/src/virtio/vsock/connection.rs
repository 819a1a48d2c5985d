//! One vsock stream connection: its state machine, credit-based flow
//! control, and the host Unix stream it is joined to.
//!
//! Credit (virtio 1.2, 5.10.6.3): each side announces how much buffer it has
//! (`buf_alloc`) and how many bytes it has consumed (`fwd_cnt`); a sender may
//! have at most `buf_alloc - (sent - fwd_cnt)` bytes in flight. capsid gives
//! the guest [`CONN_TX_BUF_SIZE`] of credit and never buffers more than that
//! per connection; towards the guest it never sends more than the guest's
//! credit allows.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use super::{
    CONN_TX_BUF_SIZE, VSOCK_FLAGS_SHUTDOWN_RCV, VSOCK_FLAGS_SHUTDOWN_SEND, VSOCK_OP_CREDIT_UPDATE,
    VSOCK_OP_REQUEST, VSOCK_OP_RESPONSE, VSOCK_OP_RST, VSOCK_OP_RW, VSOCK_OP_SHUTDOWN,
};

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated; our REQUEST is (or is about to be) with the guest.
    LocalInit,
    /// Data flows.
    Established,
    /// Finished: a RST is owed to the guest (or was received), and the
    /// connection goes away once nothing more is owed.
    Closing,
}

/// What the connection owes the guest (one bit per packet kind).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// A REQUEST (host-initiated connect).
    pub request: bool,
    /// A RESPONSE (guest-initiated connect accepted).
    pub response: bool,
    /// Host data is (maybe) readable.
    pub rw: bool,
    /// A CREDIT_UPDATE.
    pub credit_update: bool,
    /// A SHUTDOWN (host stopped sending).
    pub shutdown: bool,
    /// A RST.
    pub rst: bool,
}

impl Pending {
    /// Anything owed at all.
    pub fn any(&self) -> bool {
        self.request || self.response || self.rw || self.credit_update || self.shutdown || self.rst
    }
}

/// Header fields of a packet for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxHeader {
    /// VSOCK_OP_*.
    pub op: u16,
    /// SHUTDOWN flags.
    pub flags: u32,
    /// Payload length (RW only).
    pub len: u32,
    /// Our receive buffer.
    pub buf_alloc: u32,
    /// Bytes we have forwarded to the host side.
    pub fwd_cnt: u32,
}

/// What a guest packet did to the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxOutcome {
    /// Handled; the connection lives on.
    Ok,
    /// The guest broke the protocol (credit overrun, data before connect):
    /// the connection must be reset.
    Violation,
    /// The guest reset the connection: remove it.
    Reset,
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// The state.
    pub state: ConnState,
    /// What we owe the guest.
    pub pending: Pending,
    /// Guest→host bytes the host has not taken yet (at most CONN_TX_BUF_SIZE).
    tx_buf: VecDeque<u8>,
    /// Bytes forwarded to the host side so far.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// The guest's receive buffer.
    peer_buf_alloc: u32,
    /// Bytes the guest has consumed.
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// The host side sent EOF (read returned 0).
    host_eof: bool,
    /// The guest will send no more.
    peer_no_send: bool,
    /// The guest will receive no more.
    peer_no_recv: bool,
    /// The write half of the host stream was shut down already.
    host_write_shut: bool,
    /// Bytes of the `OK <port>` line still at the front of `tx_buf`.
    ok_line_left: usize,
}

impl Connection {
    /// A host-initiated connection whose REQUEST is owed to the guest.
    pub fn local_init(stream: UnixStream) -> Self {
        let mut c = Self::new(stream, ConnState::LocalInit);
        c.pending.request = true;
        c
    }

    /// A guest-initiated connection the host accepted: a RESPONSE is owed.
    pub fn peer_init(stream: UnixStream, peer_buf_alloc: u32, peer_fwd_cnt: u32) -> Self {
        let mut c = Self::new(stream, ConnState::Established);
        c.peer_buf_alloc = peer_buf_alloc;
        c.peer_fwd_cnt = Wrapping(peer_fwd_cnt);
        c.pending.response = true;
        c
    }

    fn new(stream: UnixStream, state: ConnState) -> Self {
        Self {
            stream,
            state,
            pending: Pending::default(),
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            host_eof: false,
            peer_no_send: false,
            peer_no_recv: false,
            host_write_shut: false,
            ok_line_left: 0,
        }
    }

    /// Bytes the guest can still take from us.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether host data should be read now (interest in EPOLLIN).
    pub fn wants_host_read(&self) -> bool {
        self.state == ConnState::Established
            && !self.host_eof
            && !self.peer_no_recv
            && self.peer_credit() > 0
    }

    /// Whether buffered guest data waits for the host (interest in EPOLLOUT).
    pub fn wants_host_write(&self) -> bool {
        !self.tx_buf.is_empty()
    }

    /// Records the guest's credit fields, carried by every packet.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// Handles a guest RESPONSE to our REQUEST: tells the host client `OK`.
    pub fn on_response(&mut self, local_port: u32) -> TxOutcome {
        if self.state != ConnState::LocalInit {
            return TxOutcome::Violation;
        }
        self.state = ConnState::Established;
        self.pending.request = false;
        // The OK line goes through the same buffer as data, ahead of it.
        let line = format!("OK {local_port}\n");
        self.ok_line_left = line.len();
        self.tx_buf.extend(line.bytes());
        self.flush_to_host();
        TxOutcome::Ok
    }

    /// Handles guest data: straight to the host stream when it takes it, the
    /// rest buffered within the credit the guest was given.
    pub fn on_rw<B: BitmapSlice>(&mut self, data: &VolatileSlice<'_, B>) -> TxOutcome {
        if self.state != ConnState::Established || self.peer_no_send {
            return TxOutcome::Violation;
        }
        let len = data.len();
        if self.guest_bytes_buffered() + len > CONN_TX_BUF_SIZE as usize {
            tracing::debug!(
                len,
                buffered = self.tx_buf.len(),
                "vsock: guest overran its credit"
            );
            return TxOutcome::Violation;
        }
        let mut written = 0;
        if self.tx_buf.is_empty() && !self.host_write_shut {
            while written < len {
                let Ok(rest) = data.offset(written) else {
                    break;
                };
                match self.stream.write_volatile(&rest) {
                    Ok(0) => break,
                    Ok(n) => written += n,
                    Err(VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::Interrupted => {}
                    Err(VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::WouldBlock => {
                        break
                    }
                    Err(_) => return self.host_gone(),
                }
            }
        }
        self.fwd_cnt += Wrapping(u32::try_from(written).unwrap_or(u32::MAX));
        if written < len {
            let Ok(rest) = data.offset(written) else {
                return TxOutcome::Violation;
            };
            let mut bytes = vec![0u8; rest.len()];
            let copied = rest.copy_to(&mut bytes[..]);
            self.tx_buf.extend(&bytes[..copied]);
        }
        self.maybe_credit_update();
        TxOutcome::Ok
    }

    /// Guest bytes waiting in the buffer (not the OK line ahead of them).
    fn guest_bytes_buffered(&self) -> usize {
        self.tx_buf.len() - self.ok_line_left
    }

    /// Handles a guest SHUTDOWN.
    pub fn on_shutdown(&mut self, flags: u32) -> TxOutcome {
        self.peer_no_send |= flags & VSOCK_FLAGS_SHUTDOWN_SEND != 0;
        self.peer_no_recv |= flags & VSOCK_FLAGS_SHUTDOWN_RCV != 0;
        self.after_progress();
        TxOutcome::Ok
    }

    /// Writes buffered guest data to the host stream; called when the
    /// stream is writable.
    pub fn flush_to_host(&mut self) {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    // The OK line is not guest data: only what the guest
                    // sent counts towards its credit.
                    let line = n.min(self.ok_line_left);
                    self.ok_line_left -= line;
                    self.fwd_cnt += Wrapping(u32::try_from(n - line).unwrap_or(u32::MAX));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.host_gone();
                    return;
                }
            }
        }
        self.maybe_credit_update();
        self.after_progress();
    }

    /// The host side is gone for writing: the guest gets a reset.
    fn host_gone(&mut self) -> TxOutcome {
        self.tx_buf.clear();
        self.reset();
        TxOutcome::Ok
    }

    /// Marks the connection for a RST to the guest and removal.
    pub fn reset(&mut self) {
        self.state = ConnState::Closing;
        self.pending = Pending {
            rst: true,
            ..Pending::default()
        };
    }

    fn maybe_credit_update(&mut self) {
        // Tell the guest about freed space once a quarter of its credit has
        // been consumed (or all of it: it may be waiting for exactly that).
        let unannounced = (self.fwd_cnt - self.last_fwd_cnt_sent).0;
        if unannounced >= CONN_TX_BUF_SIZE / 4 || (self.tx_buf.is_empty() && unannounced > 0) {
            self.pending.credit_update = true;
        }
    }

    /// After data moved: half-close the host side once the guest is done
    /// sending and everything is delivered; reset when both sides are done.
    fn after_progress(&mut self) {
        if self.state != ConnState::Established {
            return;
        }
        if self.peer_no_send && self.tx_buf.is_empty() && !self.host_write_shut {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.host_write_shut = true;
        }
        let host_done = self.host_eof || self.peer_no_recv;
        if self.peer_no_send && self.tx_buf.is_empty() && host_done && !self.pending.shutdown {
            self.reset();
        }
    }

    /// Fills the next packet owed to the guest. For RW, host data is read
    /// straight into `data` (the packet's payload buffer). Returns `None`
    /// when nothing can be sent now.
    pub fn next_rx<B: BitmapSlice>(
        &mut self,
        data: Option<&VolatileSlice<'_, B>>,
    ) -> Option<RxHeader> {
        let op = if self.pending.rst {
            self.pending.rst = false;
            VSOCK_OP_RST
        } else if self.pending.request {
            self.pending.request = false;
            VSOCK_OP_REQUEST
        } else if self.pending.response {
            self.pending.response = false;
            VSOCK_OP_RESPONSE
        } else if self.pending.rw && self.wants_host_read() {
            match self.read_from_host(data) {
                Some(0) => {
                    self.host_eof = true;
                    self.pending.rw = false;
                    self.pending.shutdown = true;
                    return self.next_rx::<B>(None);
                }
                Some(len) => {
                    self.rx_cnt += Wrapping(len);
                    return Some(self.header(VSOCK_OP_RW, 0, len));
                }
                None => {
                    self.pending.rw = false;
                    return self.next_rx::<B>(None);
                }
            }
        } else if self.pending.shutdown {
            self.pending.shutdown = false;
            let hdr = self.header(VSOCK_OP_SHUTDOWN, VSOCK_FLAGS_SHUTDOWN_SEND, 0);
            self.after_progress();
            return Some(hdr);
        } else if self.pending.credit_update {
            self.pending.credit_update = false;
            VSOCK_OP_CREDIT_UPDATE
        } else {
            self.pending.rw = false;
            return None;
        };
        Some(self.header(op, 0, 0))
    }

    fn header(&mut self, op: u16, flags: u32, len: u32) -> RxHeader {
        // Every packet carries our credit, so no separate update is owed.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending.credit_update = false;
        RxHeader {
            op,
            flags,
            len,
            buf_alloc: CONN_TX_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Reads host data into `data`, at most the guest's credit. `Some(0)`
    /// is EOF, `None` is nothing available now.
    fn read_from_host<B: BitmapSlice>(
        &mut self,
        data: Option<&VolatileSlice<'_, B>>,
    ) -> Option<u32> {
        let data = data?;
        let max = data.len().min(self.peer_credit() as usize);
        if max == 0 {
            return None;
        }
        let mut window = data.subslice(0, max).ok()?;
        loop {
            match self.stream.read_volatile(&mut window) {
                Ok(n) => return u32::try_from(n).ok(),
                Err(VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::Interrupted => {}
                Err(VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::WouldBlock => {
                    return None
                }
                Err(_) => {
                    // A broken host stream reads as EOF; the write side will
                    // turn it into a reset.
                    return Some(0);
                }
            }
        }
    }

    /// Reads one byte-by-byte `CONNECT <port>\n` line (used before the
    /// connection exists).
    pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
        let text = std::str::from_utf8(line).ok()?;
        let port = text.strip_prefix("CONNECT ")?.strip_suffix('\n')?;
        port.trim().parse().ok()
    }
}

/// Reads what is available of a `CONNECT` line into `buf`, one byte at a
/// time so that no byte after the newline is consumed. Returns Ok(true)
/// once the newline has arrived.
pub fn read_connect_line(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<bool> {
    let mut byte = [0u8; 1];
    while buf.len() < limit {
        match stream.read(&mut byte) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(_) => {
                buf.push(byte[0]);
                if byte[0] == b'\n' {
                    return Ok(true);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ErrorKind::InvalidData.into())
}
