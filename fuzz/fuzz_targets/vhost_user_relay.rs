//! Fuzzes the vhost-user relay between QEMU and the daemon serving a
//! device: the input is the byte stream QEMU sends (vhost-user messages:
//! header, body) and the one the daemon sends back, cut into writes that
//! may carry file descriptors (sometimes more than a message may have).
//! The relay reads, gates and forwards both over real socket pairs while
//! the fuzzer plays both peers. Nothing may panic, whatever either peer
//! says, and the relay must end once both peers have said it all.

#![no_main]

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

use capsid_devices::hosting::fuzz_relay;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Writes that carry descriptors, at most, per peer and run.
const MAX_FD_WRITES: usize = 8;
/// Descriptors on a crowded write: more than a vhost-user message may carry.
const CROWD: usize = 40;

/// A file descriptor to pass along, made once per process, when SIGPIPE
/// is ignored too.
fn passed_fd() -> RawFd {
    static FD: OnceLock<OwnedFd> = OnceLock::new();
    FD.get_or_init(|| {
        // SAFETY: ignoring SIGPIPE changes no memory; the relay writes to
        // peers that may have gone, as capsid-vhost does under Rust's
        // runtime, which ignores SIGPIPE too.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let (read, _write) = std::io::pipe().expect("pipe");
        OwnedFd::from(read)
    })
    .as_fd()
    .as_raw_fd()
}

/// One side of the relay played by the fuzzer: what it still has to send
/// (pieces, and how many descriptors each carries); what it is sent is read
/// and dropped.
struct Peer {
    sock: UnixStream,
    pending: VecDeque<(Vec<u8>, usize)>,
    writing: bool,
    reading: bool,
}

impl Peer {
    /// `fds`: descriptors on each of the first writes; `crowd`: the first
    /// write carries [`CROWD`] instead.
    fn new(sock: UnixStream, bytes: &[u8], piece: usize, fds: usize, crowd: bool) -> Self {
        sock.set_nonblocking(true).expect("nonblocking peer");
        let pending = bytes
            .chunks(piece)
            .enumerate()
            .map(|(i, c)| match i {
                0 if crowd => (c.to_vec(), CROWD),
                i if i < MAX_FD_WRITES => (c.to_vec(), fds),
                _ => (c.to_vec(), 0),
            })
            .collect();
        Self {
            sock,
            pending,
            writing: true,
            reading: true,
        }
    }

    fn write_some(&mut self) {
        let Some((bytes, nfds)) = self.pending.front_mut() else {
            let _ = self.sock.shutdown(Shutdown::Write);
            self.writing = false;
            return;
        };
        let fds = vec![passed_fd(); *nfds];
        match self.sock.send_with_fds(&[&bytes[..]], &fds) {
            Ok(n) if n >= bytes.len() => {
                self.pending.pop_front();
            }
            Ok(n) => {
                bytes.drain(..n);
                *nfds = 0;
            }
            Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EINTR => {}
            // The relay has closed this side.
            Err(_) => self.writing = false,
        }
    }

    fn read_some(&mut self) {
        let mut buf = [0u8; 4096];
        match (&self.sock).read(&mut buf) {
            Ok(0) => self.reading = false,
            Ok(_) => {}
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.reading = false,
        }
    }

    fn events(&self) -> libc::c_short {
        let mut events = 0;
        if self.reading {
            events |= libc::POLLIN;
        }
        if self.writing {
            events |= libc::POLLOUT;
        }
        events
    }
}

/// Plays both peers until the relay has closed both connections.
fn play(mut peers: [Peer; 2]) {
    loop {
        let mut fds: Vec<libc::pollfd> = peers
            .iter()
            .map(|p| libc::pollfd {
                fd: p.sock.as_raw_fd(),
                events: p.events(),
                revents: 0,
            })
            .collect();
        if fds.iter().all(|f| f.events == 0) {
            return;
        }
        let nfds = libc::nfds_t::try_from(fds.len()).expect("two fds");
        // SAFETY: `fds` is a live, exclusively borrowed array of `nfds`
        // pollfd structs, which poll reads and writes for the call only.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds, -1) };
        if rc < 0 {
            assert_eq!(
                io::Error::last_os_error().kind(),
                io::ErrorKind::Interrupted,
                "poll failed"
            );
            continue;
        }
        for (peer, fd) in peers.iter_mut().zip(&fds) {
            let hangup = fd.revents & (libc::POLLERR | libc::POLLHUP) != 0;
            if peer.writing && (fd.revents & libc::POLLOUT != 0 || hangup) {
                peer.write_some();
            }
            if peer.reading && (fd.revents & libc::POLLIN != 0 || hangup) {
                peer.read_some();
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [control, len_lo, len_hi, rest @ ..] = data else {
        return;
    };
    // Before the relay writes to a peer that may have gone.
    passed_fd();
    let split = usize::from(u16::from_le_bytes([*len_lo, *len_hi])).min(rest.len());
    let (from_qemu, from_daemon) = rest.split_at(split);
    // Whole streams, or pieces of 1 to 16 bytes (a header read in parts).
    let piece = if control & 1 != 0 {
        usize::from(control >> 4) + 1
    } else {
        usize::MAX
    };

    let (qemu, front) = UnixStream::pair().expect("frontend socket pair");
    let (back, daemon) = UnixStream::pair().expect("daemon socket pair");
    let crowd = control & 8 != 0;
    let peers = [
        Peer::new(qemu, from_qemu, piece, usize::from(control & 2 != 0), crowd),
        Peer::new(
            daemon,
            from_daemon,
            piece,
            usize::from(control & 4 != 0),
            false,
        ),
    ];
    let player = std::thread::spawn(move || play(peers));
    let _ = fuzz_relay(front, back);
    player.join().expect("peers");
});
