//! The host ends of a process's stdio: one Unix listener per stream at
//! `<vsock path>_<port>`, which the agent dials from the guest; the VM's
//! vsock credit gives back-pressure end to end.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use capsid_protocol::agent::Stdio;
use tokio::net::{UnixListener, UnixStream};

/// First host port handed to stdio streams.
const FIRST_STDIO_PORT: u32 = 2000;

/// Allocates host ports for stdio streams of one sandbox.
#[derive(Debug)]
pub struct PortAllocator {
    next: AtomicU32,
}

impl Default for PortAllocator {
    fn default() -> Self {
        Self {
            next: AtomicU32::new(FIRST_STDIO_PORT),
        }
    }
}

impl PortAllocator {
    fn take(&self) -> u32 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

/// Which streams a process gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamsWanted {
    /// Wire stdin (else the process reads /dev/null).
    pub stdin: bool,
    /// Wire stdout.
    pub stdout: bool,
    /// Wire stderr (ignored with a terminal: it shares stdout).
    pub stderr: bool,
    /// Allocate a pty.
    pub terminal: bool,
}

/// Listeners waiting for the agent to connect a process's streams.
#[derive(Debug)]
pub struct PendingStreams {
    /// The ports, as sent to the agent.
    pub stdio: Stdio,
    listeners: [Option<(UnixListener, PathBuf)>; 3],
}

/// A process's connected streams (host side).
#[derive(Debug)]
pub struct Streams {
    /// Write here to feed the process's stdin.
    pub stdin: Option<UnixStream>,
    /// The process's stdout (with a terminal: everything it prints).
    pub stdout: Option<UnixStream>,
    /// The process's stderr.
    pub stderr: Option<UnixStream>,
}

impl PendingStreams {
    /// Binds listeners for the wanted streams.
    pub fn bind(
        vsock_path: &Path,
        ports: &PortAllocator,
        wanted: StreamsWanted,
    ) -> std::io::Result<Self> {
        let mut stdio = Stdio::new();
        stdio.terminal = wanted.terminal;
        let bind = |want: bool| -> std::io::Result<(u32, Option<(UnixListener, PathBuf)>)> {
            if !want {
                return Ok((0, None));
            }
            let port = ports.take();
            let path = PathBuf::from(format!("{}_{port}", vsock_path.display()));
            let listener = UnixListener::bind(&path)?;
            // The vsock device (a jailed process) connects to it.
            crate::private_dir::give_to_dir_owner(&path)?;
            Ok((port, Some((listener, path))))
        };
        let (p0, l0) = bind(wanted.stdin)?;
        let (p1, l1) = bind(wanted.stdout)?;
        let (p2, l2) = bind(wanted.stderr && !wanted.terminal)?;
        stdio.stdin_port = p0;
        stdio.stdout_port = p1;
        stdio.stderr_port = p2;
        Ok(Self {
            stdio,
            listeners: [l0, l1, l2],
        })
    }

    /// Accepts the agent's connections (it makes them while creating or
    /// starting the process); the listener sockets are removed.
    pub async fn accept(self) -> std::io::Result<Streams> {
        let [a, b, c] = self.listeners;
        async fn one(l: Option<(UnixListener, PathBuf)>) -> std::io::Result<Option<UnixStream>> {
            let Some((listener, path)) = l else {
                return Ok(None);
            };
            let accepted = listener.accept().await.map(|(s, _)| Some(s));
            let _ = std::fs::remove_file(path);
            accepted
        }
        let (stdin, stdout, stderr) = tokio::try_join!(one(a), one(b), one(c))?;
        Ok(Streams {
            stdin,
            stdout,
            stderr,
        })
    }
}
