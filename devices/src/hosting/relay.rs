//! A vhost-user relay between QEMU and the daemon serving a device, for
//! QEMU's virtio-net front end.
//!
//! QEMU enables the rings of a vhost-user net backend
//! (`VHOST_USER_SET_VRING_ENABLE`) as soon as the backend *offers*
//! `VHOST_USER_F_PROTOCOL_FEATURES`, while the guest negotiates features and
//! before `VHOST_USER_SET_FEATURES` has *acked* them; the vhost crate refuses
//! such a message and drops the connection. The relay holds those messages
//! back (answering them itself when a reply is asked for) and replays the
//! last state of each ring right after a SET_FEATURES that acks the protocol
//! features. Every other message passes through unchanged, file descriptors
//! included.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vhost::vhost_user::VhostUserVirtioFeatures;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::seccomp::{Confinement, Role};

/// `VHOST_USER_SET_FEATURES`.
const VHOST_USER_SET_FEATURES: u32 = 2;
/// `VHOST_USER_SET_VRING_ENABLE`.
const VHOST_USER_SET_VRING_ENABLE: u32 = 18;
/// Header flags: protocol version 1.
const FLAG_VERSION_1: u32 = 0x1;
/// Header flags: this is a reply.
const FLAG_REPLY: u32 = 0x4;
/// Header flags: the sender waits for a reply.
const FLAG_NEED_REPLY: u32 = 0x8;
/// request, flags, size: three native-endian u32.
const HEADER_LEN: usize = 12;

/// One vhost-user message with the descriptors that came with it.
#[derive(Debug)]
struct Message {
    header: [u8; HEADER_LEN],
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn new(request: u32, flags: u32, body: Vec<u8>) -> Self {
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&request.to_ne_bytes());
        header[4..8].copy_from_slice(&flags.to_ne_bytes());
        let size = u32::try_from(body.len()).unwrap_or(u32::MAX);
        header[8..].copy_from_slice(&size.to_ne_bytes());
        Self {
            header,
            body,
            fds: Vec::new(),
        }
    }

    fn field(&self, index: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.header[index * 4..index * 4 + 4]);
        u32::from_ne_bytes(b)
    }

    fn request(&self) -> u32 {
        self.field(0)
    }

    fn flags(&self) -> u32 {
        self.field(1)
    }

    /// The u64 at `offset` of the body (vhost-user numbers are native-endian).
    fn body_u64(&self, offset: usize) -> Option<u64> {
        let bytes = self.body.get(offset..offset + 8)?;
        let mut b = [0u8; 8];
        b.copy_from_slice(bytes);
        Some(u64::from_ne_bytes(b))
    }

    /// The u32 at `offset` of the body.
    fn body_u32(&self, offset: usize) -> Option<u32> {
        let bytes = self.body.get(offset..offset + 4)?;
        let mut b = [0u8; 4];
        b.copy_from_slice(bytes);
        Some(u32::from_ne_bytes(b))
    }
}

/// Reads one message; `None` when the peer closed between messages.
fn read_message(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER_LEN];
    let mut raw_fds: [RawFd; MAX_ATTACHED_FD_ENTRIES] = [-1; MAX_ATTACHED_FD_ENTRIES];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    }];
    // SAFETY: the one iovec covers `header`, which is owned here and
    // exclusively borrowed for the call; any bytes are a valid `[u8]`.
    let (n, nfds) =
        unsafe { sock.recv_with_fds(&mut iov, &mut raw_fds) }.map_err(io::Error::from)?;
    let fds = raw_fds[..nfds.min(MAX_ATTACHED_FD_ENTRIES)]
        .iter()
        // SAFETY: recvmsg installed these descriptors in this process for
        // us; nothing else owns them, so each gets exactly one owner.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    (&*sock).read_exact(&mut header[n..])?;
    let mut msg = Message {
        header,
        body: Vec::new(),
        fds,
    };
    let size = usize::try_from(msg.field(2)).unwrap_or(usize::MAX);
    if size > MAX_MSG_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message of {size} bytes"),
        ));
    }
    msg.body = vec![0; size];
    (&*sock).read_exact(&mut msg.body)?;
    Ok(Some(msg))
}

/// Writes one message, its descriptors attached to the first byte.
fn write_message(sock: &UnixStream, msg: &Message) -> io::Result<()> {
    let fds: Vec<RawFd> = msg.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let total = HEADER_LEN + msg.body.len();
    let sent = sock
        .send_with_fds(&[&msg.header[..], &msg.body[..]], &fds)
        .map_err(io::Error::from)?;
    if sent < total {
        let mut all = msg.header.to_vec();
        all.extend_from_slice(&msg.body);
        (&*sock).write_all(&all[sent..])?;
    }
    Ok(())
}

/// Where a message goes after the gate.
#[derive(Debug)]
enum Route {
    ToDaemon(Message),
    ToFrontend(Message),
}

/// What the relay knows of the negotiation, frontend → daemon.
#[derive(Debug, Default)]
struct Gate {
    /// The last SET_FEATURES acked VHOST_USER_F_PROTOCOL_FEATURES.
    protocol_acked: bool,
    /// Ring enable states held back: ring index → 0 or 1.
    held: BTreeMap<u32, u32>,
}

impl Gate {
    fn route(&mut self, msg: Message) -> Vec<Route> {
        match msg.request() {
            VHOST_USER_SET_VRING_ENABLE if !self.protocol_acked => {
                let (Some(index), Some(num)) = (msg.body_u32(0), msg.body_u32(4)) else {
                    // Malformed: let the daemon refuse it.
                    return vec![Route::ToDaemon(msg)];
                };
                tracing::debug!(
                    index,
                    num,
                    "vhost-user: holding back an early SET_VRING_ENABLE"
                );
                self.held.insert(index, num);
                if msg.flags() & FLAG_NEED_REPLY == 0 {
                    return Vec::new();
                }
                let ack = Message::new(
                    VHOST_USER_SET_VRING_ENABLE,
                    FLAG_VERSION_1 | FLAG_REPLY,
                    0u64.to_ne_bytes().to_vec(),
                );
                vec![Route::ToFrontend(ack)]
            }
            VHOST_USER_SET_FEATURES => {
                let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
                self.protocol_acked = msg.body_u64(0).is_some_and(|f| f & protocol != 0);
                let mut out = vec![Route::ToDaemon(msg)];
                let held = std::mem::take(&mut self.held);
                if self.protocol_acked {
                    out.extend(held.into_iter().map(|(index, num)| {
                        let mut body = index.to_ne_bytes().to_vec();
                        body.extend_from_slice(&num.to_ne_bytes());
                        Route::ToDaemon(Message::new(
                            VHOST_USER_SET_VRING_ENABLE,
                            FLAG_VERSION_1,
                            body,
                        ))
                    }));
                }
                out
            }
            _ => vec![Route::ToDaemon(msg)],
        }
    }
}

/// A private socket path beside `public`, where the daemon listens.
pub(super) fn private_path(public: &Path) -> PathBuf {
    let mut name = public.as_os_str().to_os_string();
    name.push(".daemon");
    PathBuf::from(name)
}

/// Accepts one frontend on `listener` and relays between it and `back`
/// (already connected to the daemon) until either side closes, its
/// threads confined by `seccomp`. Returns the relay thread.
pub(super) fn spawn(
    listener: std::os::unix::net::UnixListener,
    back: UnixStream,
    seccomp: Option<Confinement>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("vhost-user-relay".into())
        .spawn(move || {
            let result = listener.accept();
            drop(listener);
            match result {
                Ok((front, _)) => {
                    if let Err(e) = relay(front, back, seccomp) {
                        tracing::warn!(error = %e, "vhost-user relay failed");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "vhost-user relay cannot accept the frontend")
                }
            }
        })
}

/// Stacks the relay's filter on the calling thread.
fn confine(seccomp: Option<Confinement>) -> io::Result<()> {
    match seccomp {
        Some(s) => s.install(Role::Relay).map_err(io::Error::other),
        None => Ok(()),
    }
}

/// Runs the relay between two connected streams, `front` (QEMU's side)
/// and `back` (the daemon's), until either closes. Public only as the entry
/// point of the `vhost_user_relay` fuzz target (fuzz/): this module is
/// private, and the fuzzer plays both peers. Not part of the API.
#[doc(hidden)]
pub fn fuzz_relay(front: UnixStream, back: UnixStream) -> io::Result<()> {
    relay(front, back, None)
}

/// Relays between `front` (QEMU) and `back` (the daemon) until either side
/// closes; then closes both. Both threads stack `seccomp`'s relay filter
/// before reading a message.
fn relay(front: UnixStream, back: UnixStream, seccomp: Option<Confinement>) -> io::Result<()> {
    let front_out = Arc::new(Mutex::new(front.try_clone()?));
    let back_in = back.try_clone()?;
    let replies = {
        let front_out = Arc::clone(&front_out);
        let front = front.try_clone()?;
        std::thread::Builder::new()
            .name("vhost-user-relay-replies".into())
            .spawn(move || {
                let result = (|| -> io::Result<()> {
                    confine(seccomp)?;
                    while let Some(msg) = read_message(&back_in)? {
                        let out = front_out
                            .lock()
                            .map_err(|_| io::Error::other("relay lock poisoned"))?;
                        write_message(&out, &msg)?;
                    }
                    Ok(())
                })();
                let _ = front.shutdown(Shutdown::Both);
                let _ = back_in.shutdown(Shutdown::Both);
                result
            })?
    };
    let mut gate = Gate::default();
    let requests = (|| -> io::Result<()> {
        confine(seccomp)?;
        while let Some(msg) = read_message(&front)? {
            for route in gate.route(msg) {
                match route {
                    Route::ToDaemon(m) => write_message(&back, &m)?,
                    Route::ToFrontend(m) => {
                        let out = front_out
                            .lock()
                            .map_err(|_| io::Error::other("relay lock poisoned"))?;
                        write_message(&out, &m)?;
                    }
                }
            }
        }
        Ok(())
    })();
    let _ = back.shutdown(Shutdown::Both);
    let _ = front.shutdown(Shutdown::Both);
    let replies = replies
        .join()
        .map_err(|_| io::Error::other("relay thread panicked"))?;
    requests.and(replies)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROTOCOL: u64 = 1 << 30;

    fn set_features(features: u64) -> Message {
        Message::new(
            VHOST_USER_SET_FEATURES,
            FLAG_VERSION_1,
            features.to_ne_bytes().to_vec(),
        )
    }

    fn enable(index: u32, num: u32, flags: u32) -> Message {
        let mut body = index.to_ne_bytes().to_vec();
        body.extend_from_slice(&num.to_ne_bytes());
        Message::new(VHOST_USER_SET_VRING_ENABLE, FLAG_VERSION_1 | flags, body)
    }

    fn daemon_requests(routes: &[Route]) -> Vec<u32> {
        routes
            .iter()
            .filter_map(|r| match r {
                Route::ToDaemon(m) => Some(m.request()),
                Route::ToFrontend(_) => None,
            })
            .collect()
    }

    #[test]
    fn early_enable_is_held_and_replayed_after_set_features() {
        let mut gate = Gate::default();
        assert!(gate.route(enable(0, 1, 0)).is_empty());
        assert!(gate.route(enable(1, 1, 0)).is_empty());
        assert!(gate.route(enable(1, 0, 0)).is_empty());
        let out = gate.route(set_features(PROTOCOL | 1 << 32));
        assert_eq!(
            daemon_requests(&out),
            [
                VHOST_USER_SET_FEATURES,
                VHOST_USER_SET_VRING_ENABLE,
                VHOST_USER_SET_VRING_ENABLE
            ]
        );
        let Route::ToDaemon(ring1) = &out[2] else {
            panic!("{out:?}")
        };
        assert_eq!((ring1.body_u32(0), ring1.body_u32(4)), (Some(1), Some(0)));
        // Once acked, enables pass straight through.
        assert_eq!(
            daemon_requests(&gate.route(enable(0, 1, 0))),
            [VHOST_USER_SET_VRING_ENABLE]
        );
    }

    #[test]
    fn early_enable_asking_for_a_reply_is_answered() {
        let mut gate = Gate::default();
        let out = gate.route(enable(0, 1, FLAG_NEED_REPLY));
        let [Route::ToFrontend(ack)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(ack.request(), VHOST_USER_SET_VRING_ENABLE);
        assert_eq!(ack.flags(), FLAG_VERSION_1 | FLAG_REPLY);
        assert_eq!(ack.body_u64(0), Some(0));
    }

    #[test]
    fn held_states_are_dropped_without_protocol_features() {
        let mut gate = Gate::default();
        gate.route(enable(0, 1, 0));
        let out = gate.route(set_features(1 << 32));
        assert_eq!(daemon_requests(&out), [VHOST_USER_SET_FEATURES]);
    }

    #[test]
    fn messages_and_descriptors_cross_the_relay() {
        let (qemu, front) = UnixStream::pair().unwrap();
        let (back, daemon) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || relay(front, back, None));

        // An early enable, then SET_FEATURES, then a message carrying an fd.
        write_message(&qemu, &enable(0, 1, 0)).unwrap();
        write_message(&qemu, &set_features(PROTOCOL)).unwrap();
        let (r, w) = std::io::pipe().unwrap();
        let mut with_fd = Message::new(12, FLAG_VERSION_1, 7u64.to_ne_bytes().to_vec());
        with_fd.fds.push(OwnedFd::from(w));
        write_message(&qemu, &with_fd).unwrap();

        let got: Vec<Message> = (0..3)
            .map(|_| read_message(&daemon).unwrap().unwrap())
            .collect();
        assert_eq!(got[0].request(), VHOST_USER_SET_FEATURES);
        assert_eq!(got[1].request(), VHOST_USER_SET_VRING_ENABLE);
        assert_eq!(got[2].request(), 12);
        assert_eq!(got[2].fds.len(), 1);
        // The descriptor is the pipe's write end.
        let mut w = std::fs::File::from(got[2].fds.first().unwrap().try_clone().unwrap());
        w.write_all(b"x").unwrap();
        let mut buf = [0u8; 1];
        (&r).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"x");

        // A reply from the daemon reaches QEMU.
        write_message(
            &daemon,
            &Message::new(1, FLAG_VERSION_1 | FLAG_REPLY, vec![1; 8]),
        )
        .unwrap();
        let reply = read_message(&qemu).unwrap().unwrap();
        assert_eq!(reply.request(), 1);
        assert_eq!(reply.body, vec![1; 8]);

        // QEMU going away closes the daemon's side too.
        drop(qemu);
        assert!(read_message(&daemon).unwrap().is_none());
        t.join().unwrap().unwrap();
    }

    #[test]
    fn oversized_message_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut m = Message::new(12, FLAG_VERSION_1, Vec::new());
        m.header[8..].copy_from_slice(&u32::try_from(MAX_MSG_SIZE + 1).unwrap().to_ne_bytes());
        write_message(&a, &m).unwrap();
        assert!(read_message(&b).is_err());
    }
}
