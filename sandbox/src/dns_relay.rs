//! The host's end of the guest's DNS relay (see the agent's `dns_relay`):
//! resolvers on loopback addresses of the container's network namespace
//! (Docker's embedded DNS at 127.0.0.11, served in that namespace through
//! NAT rules dockerd made there) cannot be reached from the VM, so the
//! guest sends each query over vsock, and the host asks the resolver from
//! a socket made inside the namespace.
//!
//! The guest is not trusted: at most [`MAX_CONNECTIONS`] relays run at
//! once, each query waits at most [`QUERY_TIMEOUT`] for its frame and its
//! answer, and only the namespace's own loopback resolvers are asked.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

/// The guest-to-host vsock port of the relay.
pub const DNS_RELAY_PORT: u32 = 1053;
/// Connections served at once; the guest's further connections wait.
pub const MAX_CONNECTIONS: usize = 64;
/// How long one query may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors starting the relay.
#[derive(Debug, thiserror::Error)]
pub enum DnsRelayError {
    /// The vsock listener could not be made.
    #[error("cannot listen on {}", path.display())]
    Listen {
        /// Its socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The network namespace cannot be opened.
    #[error("cannot open network namespace {}", path.display())]
    Netns {
        /// The namespace.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A running relay; stops (and removes its socket) when dropped.
#[derive(Debug)]
pub struct DnsRelay {
    task: tokio::task::JoinHandle<()>,
    path: PathBuf,
}

impl DnsRelay {
    /// Listens on the guest's vsock port [`DNS_RELAY_PORT`] (the socket
    /// `VSOCK_PATH_1053`) and relays to the first of `resolvers` (loopback
    /// addresses, port 53) inside `netns`.
    pub fn start(
        vsock_path: &Path,
        netns: &Path,
        resolvers: &[IpAddr],
    ) -> Result<Option<Self>, DnsRelayError> {
        let Some(resolver) = resolvers.iter().copied().find(IpAddr::is_loopback) else {
            return Ok(None);
        };
        let netns_file = std::fs::File::open(netns).map_err(|source| DnsRelayError::Netns {
            path: netns.to_owned(),
            source,
        })?;
        let path = PathBuf::from(format!("{}_{DNS_RELAY_PORT}", vsock_path.display()));
        let listener = UnixListener::bind(&path)
            .and_then(|l| {
                // The vsock device (a jailed process) connects to it.
                crate::private_dir::give_to_dir_owner(&path)?;
                Ok(l)
            })
            .map_err(|source| DnsRelayError::Listen {
                path: path.clone(),
                source,
            })?;
        let upstream = SocketAddr::new(resolver, 53);
        let sockets = SocketMaker::start(netns_file, upstream);
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let task = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of fds, say: wait rather than spin.
                        tracing::debug!(error = %e, "DNS relay: accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    return;
                };
                let sockets = sockets.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let relayed =
                        tokio::time::timeout(QUERY_TIMEOUT, relay(stream, &sockets)).await;
                    match relayed {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!(error = %e, "DNS relay: query failed"),
                        Err(_) => tracing::debug!("DNS relay: query timed out"),
                    }
                });
            }
        });
        tracing::info!(%upstream, socket = %path.display(), "DNS relay for the guest");
        Ok(Some(Self { task, path }))
    }
}

impl Drop for DnsRelay {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One framed query from the guest, asked of the upstream resolver from a
/// socket made in the namespace.
async fn relay(mut guest: UnixStream, sockets: &SocketMaker) -> std::io::Result<()> {
    let mut len = [0u8; 2];
    guest.read_exact(&mut len).await?;
    let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
    guest.read_exact(&mut query).await?;
    let Made::Udp(socket) = sockets.make(Kind::Udp).await? else {
        return Err(std::io::Error::other(
            "the namespace thread made the wrong socket",
        ));
    };
    let socket = tokio::net::UdpSocket::from_std(socket)?;
    socket.send(&query).await?;
    let mut reply = vec![0u8; 65535];
    let n = socket.recv(&mut reply).await?;
    reply.truncate(n);
    // Truncated (TC): the whole answer only comes over TCP.
    if reply.get(2).is_some_and(|flags| flags & 0x02 != 0) {
        if let Made::Tcp(stream) = sockets.make(Kind::Tcp).await? {
            let mut stream = tokio::net::TcpStream::from_std(stream)?;
            stream.write_all(&len).await?;
            stream.write_all(&query).await?;
            let mut answer_len = [0u8; 2];
            stream.read_exact(&mut answer_len).await?;
            reply = vec![0u8; usize::from(u16::from_be_bytes(answer_len))];
            stream.read_exact(&mut reply).await?;
        }
    }
    let n16 = u16::try_from(reply.len()).map_err(|_| std::io::Error::other("reply too long"))?;
    guest.write_all(&n16.to_be_bytes()).await?;
    guest.write_all(&reply).await?;
    guest.flush().await
}

/// Which socket to make.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Udp,
    Tcp,
}

/// A socket made in the namespace, connected to the upstream resolver.
#[derive(Debug)]
enum Made {
    Udp(std::net::UdpSocket),
    Tcp(std::net::TcpStream),
}

type Request = (Kind, tokio::sync::oneshot::Sender<std::io::Result<Made>>);

/// Makes sockets inside the namespace, connected to the upstream
/// resolver: one thread of its own enters the namespace once and serves
/// requests until the last handle goes (a socket keeps the namespace it
/// was made in; no thread of the runtime changes namespace, and a guest's
/// queries cost no thread each).
#[derive(Debug, Clone)]
struct SocketMaker {
    requests: std::sync::mpsc::Sender<Request>,
}

impl SocketMaker {
    fn start(netns: std::fs::File, upstream: SocketAddr) -> Self {
        let (requests, incoming) = std::sync::mpsc::channel::<Request>();
        std::thread::spawn(move || {
            let entered = nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from);
            for (kind, reply) in incoming {
                let made = match (&entered, kind) {
                    (Ok(()), Kind::Udp) => udp_socket(upstream).map(Made::Udp),
                    (Ok(()), Kind::Tcp) => tcp_stream(upstream).map(Made::Tcp),
                    (Err(e), _) => Err(std::io::Error::new(e.kind(), e.to_string())),
                };
                let _ = reply.send(made);
            }
        });
        Self { requests }
    }

    async fn make(&self, kind: Kind) -> std::io::Result<Made> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.requests
            .send((kind, tx))
            .map_err(|_| std::io::Error::other("the namespace thread ended"))?;
        rx.await
            .map_err(|_| std::io::Error::other("the namespace thread ended"))?
    }
}

/// A non-blocking UDP socket connected to `upstream`, in the calling
/// thread's network namespace.
fn udp_socket(upstream: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let bind: SocketAddr = match upstream {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    let socket = std::net::UdpSocket::bind(bind)?;
    socket.connect(upstream)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// A non-blocking TCP stream to `upstream` (a resolver on the namespace's
/// loopback: the connect is immediate, bounded anyway), in the calling
/// thread's network namespace.
fn tcp_stream(upstream: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let stream = std::net::TcpStream::connect_timeout(&upstream, Duration::from_secs(2))?;
    stream.set_nonblocking(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relays one framed `query` to a resolver on 127.0.0.1:`port` of
    /// this test's namespace; the framed reply.
    async fn relay_query(port: u16, query: &[u8]) -> Vec<u8> {
        let (mut guest, host) = UnixStream::pair().unwrap();
        let netns = std::fs::File::open("/proc/self/ns/net").unwrap();
        let sockets = SocketMaker::start(netns, SocketAddr::from(([127, 0, 0, 1], port)));
        let served = tokio::spawn(async move { relay(host, &sockets).await });
        let len = u16::try_from(query.len()).unwrap().to_be_bytes();
        guest.write_all(&len).await.unwrap();
        guest.write_all(query).await.unwrap();
        let mut reply = Vec::new();
        guest.read_to_end(&mut reply).await.unwrap();
        served.await.unwrap().unwrap();
        reply
    }

    #[tokio::test]
    async fn queries_reach_a_loopback_resolver_in_the_namespace() {
        // The test's own namespace stands in for the container's: a fake
        // resolver on 127.0.0.1 echoes each query reversed.
        let resolver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = resolver.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, peer)) = resolver.recv_from(&mut buf) {
                let mut answer = buf[..n].to_vec();
                answer.reverse();
                let _ = resolver.send_to(&answer, peer);
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let vsock = dir.path().join("vsock.sock");
        // Port 53 is the relay's; the test resolver has another port, so
        // drive relay() directly after checking start()'s choices.
        assert!(DnsRelay::start(
            &vsock,
            Path::new("/proc/self/ns/net"),
            &["10.0.0.1".parse().unwrap()]
        )
        .unwrap()
        .is_none());
        let relay_handle = DnsRelay::start(
            &vsock,
            Path::new("/proc/self/ns/net"),
            &["127.0.0.11".parse().unwrap()],
        )
        .unwrap()
        .unwrap();
        assert!(dir.path().join("vsock.sock_1053").exists());
        drop(relay_handle);
        assert!(!dir.path().join("vsock.sock_1053").exists());

        assert_eq!(relay_query(port, b"abc").await, [0, 3, b'c', b'b', b'a']);
    }

    #[tokio::test]
    async fn a_truncated_answer_is_asked_again_over_tcp() {
        // UDP says "truncated"; TCP on the same port has the whole answer.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((_, peer)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(&[0x12, 0x34, 0x82, 0x80], peer);
            }
        });
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for mut conn in tcp.incoming().flatten() {
                let mut len = [0u8; 2];
                let _ = conn.read_exact(&mut len);
                let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                let _ = conn.read_exact(&mut q);
                let _ = conn.write_all(&[0, 11]);
                let _ = conn.write_all(b"full-answer");
            }
        });
        let reply = relay_query(port, b"abc").await;
        assert_eq!(&reply[..2], &[0, 11]);
        assert_eq!(&reply[2..], b"full-answer");
    }
}
