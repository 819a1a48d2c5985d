//! Reaching the host over vsock: the agent connects out to the host when
//! it is ready (so the host learns of readiness without polling) and serves
//! its API on that connection; process stdio streams are further
//! connections to host ports the host names.

use std::os::fd::{AsRawFd, OwnedFd};

use capsid_protocol::{AGENT_HOST_PORT, VSOCK_HOST_CID};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};

/// Errors reaching the host.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The guest has no vsock transport (no virtio-vsock device).
    #[error("no vsock socket could be created")]
    Socket(#[source] nix::Error),
    /// The host did not accept the connection.
    #[error("cannot connect to host vsock port {port}")]
    Connect {
        /// The host port.
        port: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Result of host connection operations.
pub type Result<T> = std::result::Result<T, HostError>;

/// The host port the agent serves on: `capsid.agent_port=` on the kernel
/// command line, or [`AGENT_HOST_PORT`].
pub fn agent_port(cmdline: &str) -> u32 {
    cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("capsid.agent_port="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(AGENT_HOST_PORT)
}

/// Connects a blocking stream to the host's vsock `port`.
pub fn connect_to_host(port: u32) -> Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(HostError::Socket)?;
    connect(fd.as_raw_fd(), &VsockAddr::new(VSOCK_HOST_CID, port)).map_err(|e| {
        HostError::Connect {
            port,
            source: e.into(),
        }
    })?;
    Ok(fd)
}

/// Connects the agent's control stream to the host.
pub async fn connect_control(port: u32) -> Result<tokio_vsock::VsockStream> {
    tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(VSOCK_HOST_CID, port))
        .await
        .map_err(|source| HostError::Connect { port, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_comes_from_cmdline() {
        assert_eq!(
            agent_port("console=ttyS0 capsid.agent_port=2048 quiet"),
            2048
        );
        assert_eq!(agent_port("console=ttyS0"), AGENT_HOST_PORT);
        assert_eq!(agent_port("capsid.agent_port=junk"), AGENT_HOST_PORT);
    }
}
