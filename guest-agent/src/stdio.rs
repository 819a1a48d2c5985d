//! A process's standard streams: vsock connections to the host ports the
//! host named, handed to the process as its fds (no copying in the agent),
//! or, for a terminal, a pty whose master the agent pumps to and from the
//! host streams.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use capsid_protocol::agent::Stdio;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use crate::host;

/// Errors wiring stdio.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// A host stream could not be connected.
    #[error("cannot connect {stream} to host port {port}")]
    Connect {
        /// stdin, stdout or stderr.
        stream: &'static str,
        /// The host port.
        port: u32,
        /// Why.
        #[source]
        source: host::HostError,
    },
    /// /dev/null could not be opened.
    #[error("cannot open /dev/null")]
    DevNull(#[source] std::io::Error),
    /// The pty master did not arrive on the console socket.
    #[error("no pty from the runtime")]
    Console(#[source] std::io::Error),
}

/// Result of stdio operations.
pub type Result<T> = std::result::Result<T, StdioError>;

/// The three fds a process gets.
#[derive(Debug)]
pub struct Streams {
    /// stdin.
    pub stdin: OwnedFd,
    /// stdout.
    pub stdout: OwnedFd,
    /// stderr.
    pub stderr: OwnedFd,
}

fn connect(stream: &'static str, port: u32) -> Result<OwnedFd> {
    if port == 0 {
        return File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map(OwnedFd::from)
            .map_err(StdioError::DevNull);
    }
    host::connect_to_host(port).map_err(|source| StdioError::Connect {
        stream,
        port,
        source,
    })
}

/// Connects the host streams of `stdio` (ports of 0 get /dev/null).
pub fn connect_streams(stdio: &Stdio) -> Result<Streams> {
    Ok(Streams {
        stdin: connect("stdin", stdio.stdin_port)?,
        stdout: connect("stdout", stdio.stdout_port)?,
        stderr: connect("stderr", stdio.stderr_port)?,
    })
}

/// Receives the pty master the runtime sends over the console socket.
pub fn receive_pty_master(listener: &UnixListener, timeout: Duration) -> Result<OwnedFd> {
    // The runtime may fail before it ever connects: poll the accept with a
    // deadline rather than block on it.
    listener
        .set_nonblocking(true)
        .map_err(StdioError::Console)?;
    let deadline = std::time::Instant::now() + timeout;
    let conn = loop {
        match listener.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() >= deadline {
                    return Err(StdioError::Console(std::io::ErrorKind::TimedOut.into()));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(StdioError::Console(e)),
        }
    };
    conn.set_nonblocking(false).map_err(StdioError::Console)?;
    conn.set_read_timeout(Some(timeout))
        .map_err(StdioError::Console)?;
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| StdioError::Console(e.into()))?;
    for c in msg.cmsgs().map_err(|e| StdioError::Console(e.into()))? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: SCM_RIGHTS just installed `fd` in this process;
                // nothing else owns it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(StdioError::Console(std::io::Error::other(
        "console socket message carried no fd",
    )))
}

/// The pumps between a pty master and the host streams.
#[derive(Debug)]
pub struct TtyPump {
    master: OwnedFd,
    output: Option<JoinHandle<()>>,
}

impl TtyPump {
    /// Starts copying host stdin → master and master → host stdout.
    pub fn start(master: OwnedFd, streams: Streams) -> std::io::Result<Self> {
        let mut master_in = File::from(master.try_clone()?);
        let mut master_out = File::from(master.try_clone()?);
        let mut stdin = File::from(streams.stdin);
        let mut stdout = File::from(streams.stdout);
        drop(streams.stderr);
        std::thread::Builder::new()
            .name("tty-in".into())
            .spawn(move || {
                let _ = std::io::copy(&mut stdin, &mut master_in);
            })?;
        let output = std::thread::Builder::new()
            .name("tty-out".into())
            .spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                // EIO once every slave fd is closed: the process is gone.
                while let Ok(n) = master_out.read(&mut buf) {
                    if n == 0 || stdout.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self {
            master,
            output: Some(output),
        })
    }

    /// Sets the terminal size.
    pub fn resize(&self, rows: u16, cols: u16) -> std::io::Result<()> {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from the pointer, which is valid
        // for the duration of the call; the fd is our pty master.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until all terminal output has been sent to the host.
    pub fn drain(&mut self) {
        if let Some(h) = self.output.take() {
            let _ = h.join();
        }
    }
}

/// A console socket path for a terminal process of container `bundle`.
pub fn console_socket_path(bundle: &Path, exec_id: &str) -> std::path::PathBuf {
    bundle.join(format!(
        "console-{}.sock",
        if exec_id.is_empty() { "init" } else { exec_id }
    ))
}
