//! Answering DNS on loopback addresses that belong to the host. Docker's
//! user-defined networks give containers `nameserver 127.0.0.11`: Docker's
//! embedded resolver, reached in the container's network namespace on the
//! host through NAT rules dockerd put there. In a VM that address is the
//! guest's own loopback, so the agent listens on it (UDP and TCP, port 53)
//! and relays every query over vsock to the host, which asks the resolver
//! from inside that namespace and sends the answer back.
//!
//! On the vsock connection each message is framed as in DNS over TCP: a
//! 2-byte big-endian length, then the message. One connection per UDP
//! query; a TCP client's connection is relayed message by message.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::lock::LockExt as _;

/// Queries relayed at once; more wait (a flood cannot exhaust the guest).
const MAX_IN_FLIGHT: usize = 64;
/// How long one query may take end to end.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest DNS message.
const MAX_MESSAGE: usize = 65535;

/// Errors starting the relay.
#[derive(Debug, thiserror::Error)]
pub enum DnsRelayError {
    /// A listening socket could not be made.
    #[error("cannot listen for DNS on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The addresses the relay already answers on (one relay per VM: its
/// containers share the VM's network namespace).
fn started() -> &'static Mutex<HashSet<IpAddr>> {
    static STARTED: OnceLock<Mutex<HashSet<IpAddr>>> = OnceLock::new();
    STARTED.get_or_init(Default::default)
}

/// Starts answering on every loopback address of `servers` not answered on
/// yet, relaying to the host's vsock `port`.
pub async fn ensure(servers: &[String], port: u32) -> Result<(), DnsRelayError> {
    let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    for server in servers {
        let Ok(ip) = server.parse::<IpAddr>() else {
            continue;
        };
        if !ip.is_loopback() || started().lock_or_recover().contains(&ip) {
            continue;
        }
        let addr = SocketAddr::new(ip, 53);
        let listen_err = |source| DnsRelayError::Listen { addr, source };
        let udp = UdpSocket::bind(addr).await.map_err(listen_err)?;
        let tcp = TcpListener::bind(addr).await.map_err(listen_err)?;
        started().lock_or_recover().insert(ip);
        tokio::spawn(serve_udp(Arc::new(udp), port, limit.clone()));
        tokio::spawn(serve_tcp(tcp, port, limit.clone()));
        tracing::info!(%addr, port, "answering DNS by relaying to the host");
    }
    Ok(())
}

async fn serve_udp(socket: Arc<UdpSocket>, port: u32, limit: Arc<Semaphore>) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!(error = %e, "DNS relay: receiving");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let query = buf[..n].to_vec();
        let socket = socket.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(QUERY_TIMEOUT, ask_host(port, &query)).await {
                Ok(Ok(reply)) => {
                    let _ = socket.send_to(&reply, peer).await;
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "DNS relay: the host did not answer"),
                Err(_) => tracing::debug!("DNS relay: query timed out"),
            }
        });
    }
}

async fn serve_tcp(listener: TcpListener, port: u32, limit: Arc<Semaphore>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
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
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = relay_tcp(client, port).await {
                tracing::debug!(error = %e, "DNS relay: TCP client");
            }
        });
    }
}

/// Relays a TCP client's messages one by one until it closes.
async fn relay_tcp(mut client: TcpStream, port: u32) -> std::io::Result<()> {
    loop {
        let query = match tokio::time::timeout(QUERY_TIMEOUT, read_frame(&mut client)).await {
            Ok(Ok(Some(q))) => q,
            Ok(Ok(None)) | Err(_) => return Ok(()),
            Ok(Err(e)) => return Err(e),
        };
        let reply = tokio::time::timeout(QUERY_TIMEOUT, ask_host(port, &query))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        write_frame(&mut client, &reply).await?;
    }
}

/// One query to the host and its answer.
async fn ask_host(port: u32, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut host = crate::host::connect_control(port)
        .await
        .map_err(std::io::Error::other)?;
    write_frame(&mut host, query).await?;
    read_frame(&mut host)
        .await?
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
}

/// Reads one length-prefixed message; `None` at a clean end of stream.
async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    r.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

/// Writes one length-prefixed message.
async fn write_frame<W: AsyncWriteExt + Unpin>(w: &mut W, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "DNS message too long")
    })?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(msg).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_end_cleanly() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, b"query").await.unwrap();
        drop(a);
        assert_eq!(read_frame(&mut b).await.unwrap().unwrap(), b"query");
        assert!(read_frame(&mut b).await.unwrap().is_none());
        let (mut a, _b) = tokio::io::duplex(1024);
        assert!(write_frame(&mut a, &vec![0; 70000]).await.is_err());
    }
}
