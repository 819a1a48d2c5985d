//! Reaching the host: the agent connects out over vsock when it is ready, so
//! the host learns of readiness without polling.

use std::os::fd::OwnedFd;

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
        source: nix::Error,
    },
}

/// Result of host connection operations.
pub type Result<T> = std::result::Result<T, HostError>;

/// The host port the agent connects to: `capsid.agent_port=` on the kernel
/// command line, or [`AGENT_HOST_PORT`].
pub fn agent_port(cmdline: &str) -> u32 {
    cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("capsid.agent_port="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(AGENT_HOST_PORT)
}

/// Connects a stream to the host's vsock `port`.
pub fn connect_to_host(port: u32) -> Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(HostError::Socket)?;
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &VsockAddr::new(VSOCK_HOST_CID, port),
    )
    .map_err(|source| HostError::Connect { port, source })?;
    Ok(fd)
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
