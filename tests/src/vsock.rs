//! Host side of hybrid vsock for tests: `CONNECT` to a guest port through
//! the device's Unix socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Connects to guest `port` through the vsock device's Unix socket at
/// `uds`: writes `CONNECT <port>\n` and reads the `OK <local>\n` line one
/// byte at a time (so no stream byte after it is consumed).
pub fn connect(uds: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if s.read(&mut b)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!(
                    "connection closed before OK (got {:?})",
                    String::from_utf8_lossy(&line)
                ),
            ));
        }
        line.push(b[0]);
    }
    let text = String::from_utf8_lossy(&line);
    if !text.starts_with("OK ") {
        return Err(std::io::Error::other(format!("unexpected reply {text:?}")));
    }
    Ok(s)
}
