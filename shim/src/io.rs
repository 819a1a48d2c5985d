//! A process's stdio on the host: containerd's FIFOs (or `file://` and
//! `binary://` log URIs, see [`crate::binlog`]) joined to the agent's vsock
//! streams.
//!
//! Output FIFOs are opened read-write, as the runc shim does, so that a
//! client that went away causes no EPIPE. The stdin FIFO is opened for
//! reading in the background — the open completes when the client opens
//! its end — so the process reads EOF when the client closes it, or on
//! CloseIO, after what was already written is delivered.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use capsid_sandbox::stdio::{Streams, StreamsWanted};

use crate::binlog::{self, BinaryUri, Logger};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Bytes moved per read.
const COPY_BUFFER: usize = 64 << 10;

/// Errors opening stdio.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// A URI scheme the shim does not handle.
    #[error("unsupported stdio URI {0:?} (capsid takes FIFO paths, file:// and binary:// URIs)")]
    Unsupported(String),
    /// A `binary://` logger is unusable.
    #[error(transparent)]
    Binlog(#[from] crate::binlog::BinlogError),
    /// A FIFO or file cannot be opened.
    #[error("cannot open {what} {}", path.display())]
    Open {
        /// "stdin", "stdout" or "stderr".
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Result of stdio operations.
pub type Result<T> = std::result::Result<T, IoError>;

/// Where a process's streams go, as containerd names them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    /// stdin FIFO (empty: none).
    pub stdin: String,
    /// stdout FIFO or URI (empty: discarded).
    pub stdout: String,
    /// stderr FIFO or URI (empty: discarded; unused with a terminal).
    pub stderr: String,
    /// Run the process on a pty.
    pub terminal: bool,
}

/// Where one stream goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// A FIFO (or any file) at this path.
    Path(PathBuf),
    /// A file written in append mode (`file:///path`).
    File(PathBuf),
    /// A logger program (`binary:///path?args`).
    Binary(BinaryUri),
}

fn target(uri: &str) -> Result<Option<Target>> {
    if uri.is_empty() {
        return Ok(None);
    }
    if let Some(binary) = BinaryUri::parse(uri) {
        return Ok(Some(Target::Binary(binary?)));
    }
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(Some(Target::File(PathBuf::from(path))));
    }
    if uri.contains("://") {
        return Err(IoError::Unsupported(uri.to_string()));
    }
    Ok(Some(Target::Path(PathBuf::from(uri))))
}

impl StdioPaths {
    /// Which streams the agent should wire.
    pub fn wanted(&self) -> StreamsWanted {
        StreamsWanted {
            stdin: !self.stdin.is_empty(),
            stdout: !self.stdout.is_empty(),
            stderr: !self.stderr.is_empty() && !self.terminal,
            terminal: self.terminal,
        }
    }

    /// Refuses what cannot be wired, before anything is started.
    pub fn validate(&self) -> Result<()> {
        if self.stdin.contains("://") {
            return Err(IoError::Unsupported(self.stdin.clone()));
        }
        target(&self.stdout)?;
        target(&self.stderr)?;
        Ok(())
    }
}

/// Whose output a logger program gets (its environment).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOwner {
    /// The container id (`CONTAINER_ID`).
    pub id: String,
    /// The containerd namespace (`CONTAINER_NAMESPACE`).
    pub namespace: String,
}

/// The copying of one process's streams.
#[derive(Debug)]
pub struct ProcessIo {
    stdin_fifo: Option<PathBuf>,
    loggers: Mutex<Vec<Logger>>,
    close_stdin: Mutex<Option<oneshot::Sender<()>>>,
    stdin_task: Mutex<Option<JoinHandle<()>>>,
    outputs: Mutex<Vec<JoinHandle<()>>>,
}

impl ProcessIo {
    /// Opens the process's FIFOs and starts copying between them and the
    /// agent's `streams`.
    pub async fn connect(paths: &StdioPaths, streams: Streams, owner: &LogOwner) -> Result<Self> {
        let mut outputs = Vec::new();
        let (stdout, stderr) = (target(&paths.stdout)?, target(&paths.stderr)?);
        // One logger takes both streams when both name it (containerd's
        // runc shim starts one); its unused write end is dropped, so it
        // reads EOF there at once.
        let (mut loggers, mut logger_writers) = (Vec::new(), [None, None]);
        if let Some(Target::Binary(uri)) = &stdout {
            let started = binlog::start(uri, &owner.id, &owner.namespace).await?;
            logger_writers[0] = Some(Box::new(started.stdout) as Writer);
            if stderr == stdout {
                logger_writers[1] = Some(Box::new(started.stderr) as Writer);
            }
            loggers.push(started.logger);
        }
        if let Some(Target::Binary(uri)) = &stderr {
            if logger_writers[1].is_none() {
                let started = binlog::start(uri, &owner.id, &owner.namespace).await?;
                logger_writers[1] = Some(Box::new(started.stderr) as Writer);
                loggers.push(started.logger);
            }
        }
        let [out_logger, err_logger] = logger_writers;
        let out_targets = [
            ("stdout", stdout, out_logger, streams.stdout),
            ("stderr", stderr, err_logger, streams.stderr),
        ];
        for (what, target, logger, stream) in out_targets {
            if let (Some(target), Some(stream)) = (target, stream) {
                let writer = match logger {
                    Some(w) => w,
                    None => open_output(what, &target).await?,
                };
                outputs.push(tokio::spawn(copy_output(what, stream, writer)));
            }
        }
        let (close_tx, close_rx) = oneshot::channel();
        let mut stdin_fifo = None;
        let stdin_task = match (paths.stdin.is_empty(), streams.stdin) {
            (false, Some(stream)) => {
                let path = PathBuf::from(&paths.stdin);
                let input = if is_fifo(&path) {
                    stdin_fifo = Some(path.clone());
                    let opening = {
                        let path = path.clone();
                        tokio::task::spawn_blocking(move || std::fs::File::open(path))
                    };
                    Input::Fifo { path, opening }
                } else {
                    let file = std::fs::File::open(&path).map_err(|source| IoError::Open {
                        what: "stdin",
                        path,
                        source,
                    })?;
                    Input::File(Box::new(tokio::fs::File::from_std(file)))
                };
                Some(tokio::spawn(feed_stdin(input, stream, close_rx)))
            }
            _ => None,
        };
        Ok(Self {
            stdin_fifo,
            loggers: Mutex::new(loggers),
            close_stdin: Mutex::new(Some(close_tx)),
            stdin_task: Mutex::new(stdin_task),
            outputs: Mutex::new(outputs),
        })
    }

    /// CloseIO: delivers what is already written to stdin, then EOF.
    pub fn close_stdin(&self) {
        if let Some(tx) = self.close_stdin.lock().ok().and_then(|mut c| c.take()) {
            let _ = tx.send(());
        }
    }

    /// After the process exited: stops feeding stdin and waits up to
    /// `timeout` for its output to be copied out.
    pub async fn finish(&self, timeout: Duration) {
        self.stop_stdin();
        let outputs: Vec<JoinHandle<()>> = self
            .outputs
            .lock()
            .map(|mut o| o.drain(..).collect())
            .unwrap_or_default();
        for task in outputs {
            let abort = task.abort_handle();
            if tokio::time::timeout(timeout, task).await.is_err() {
                tracing::warn!(?timeout, "output not read by anyone; dropping the rest");
                abort.abort();
            }
        }
        // The copies ended and dropped their write ends: the loggers read
        // EOF and finish (or are killed).
        let loggers: Vec<Logger> = self
            .loggers
            .lock()
            .map(|mut l| l.drain(..).collect())
            .unwrap_or_default();
        for logger in loggers {
            logger.finish().await;
        }
    }
}

impl ProcessIo {
    /// Stops feeding stdin; an open of the FIFO still waiting for the
    /// client is released by opening (and closing) its write end.
    fn stop_stdin(&self) {
        if let Some(task) = self.stdin_task.lock().ok().and_then(|mut t| t.take()) {
            task.abort();
        }
        if let Some(path) = &self.stdin_fifo {
            let _ = release_fifo_open(path);
        }
    }
}

/// Completes a blocked read-open of the FIFO at `path` (if one waits).
/// False when nobody has the FIFO open for reading, so no read-open is
/// under way.
fn release_fifo_open(path: &Path) -> bool {
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .is_ok()
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        self.stop_stdin();
        if let Ok(mut outputs) = self.outputs.lock() {
            for task in outputs.drain(..) {
                task.abort();
            }
        }
    }
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;
type Reader = Box<dyn AsyncRead + Send + Unpin>;

async fn open_output(what: &'static str, target: &Target) -> Result<Writer> {
    let open_err = |path: &Path, source| IoError::Open {
        what,
        path: path.to_path_buf(),
        source,
    };
    match target {
        Target::Path(path) if is_fifo(path) => pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(path)
            .map(|s| Box::new(s) as Writer)
            .map_err(|e| open_err(path, e)),
        Target::Binary(uri) => Err(IoError::Unsupported(format!(
            "binary://{} (a logger is started by ProcessIo::connect)",
            uri.path.display()
        ))),
        Target::Path(path) | Target::File(path) => tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map(|f| Box::new(f) as Writer)
            .map_err(|e| open_err(path, e)),
    }
}

fn is_fifo(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// What stdin is read from.
enum Input {
    /// A FIFO being opened for reading: it ends when the client closes
    /// it, or by CloseIO.
    Fifo {
        /// The FIFO.
        path: PathBuf,
        /// The blocking open, done when the client opens its end.
        opening: JoinHandle<std::io::Result<std::fs::File>>,
    },
    /// A file: it ends at its end.
    File(Reader),
}

async fn copy_output(what: &'static str, mut stream: UnixStream, mut writer: Writer) {
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(what, error = %e, "output stream ended");
                break;
            }
        };
        if let Err(e) = writer.write_all(&buf[..n]).await {
            // The reader is gone (a logger that exited): the process's
            // output is still read, and dropped, so it never blocks.
            tracing::warn!(what, error = %e, "cannot write output; dropping the rest");
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            return;
        }
    }
    let _ = writer.flush().await;
}

async fn feed_stdin(input: Input, mut stream: UnixStream, mut close: oneshot::Receiver<()>) {
    let mut buf = vec![0u8; COPY_BUFFER];
    match input {
        Input::File(mut file) => loop {
            match file.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        },
        Input::Fifo { path, opening } => {
            let (fifo, mut closed) = open_stdin_fifo(&path, opening, &mut close).await;
            let Some(mut fifo) = fifo else {
                let _ = stream.shutdown().await;
                return;
            };
            while !closed {
                tokio::select! {
                    biased;
                    read = fifo.read(&mut buf) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    },
                    _ = &mut close => closed = true,
                }
            }
            if closed && !drain_fifo(&fifo, &mut stream, &mut buf).await {
                return;
            }
        }
    }
    let _ = stream.shutdown().await;
}

/// Waits for the stdin FIFO to open, or for CloseIO. Returns the FIFO (if
/// it opened) and whether CloseIO came.
///
/// CloseIO can come before this task has seen the open complete: a client
/// that wrote before CloseIO has its end open, so the open here is done or
/// completing in the kernel, and its FIFO holds what was written. The open
/// is then seen through rather than dropped: with a read-open under way,
/// opening (and closing) a write end here makes it complete promptly
/// whether or not a client came; with none (the open has not started),
/// no client can have written yet.
async fn open_stdin_fifo(
    path: &Path,
    mut opening: JoinHandle<std::io::Result<std::fs::File>>,
    close: &mut oneshot::Receiver<()>,
) -> (Option<pipe::Receiver>, bool) {
    let (file, closed) = tokio::select! {
        opened = &mut opening => (opened, false),
        _ = close => {
            if !release_fifo_open(path) {
                return (None, true);
            }
            ((&mut opening).await, true)
        }
    };
    let fifo = file
        .ok()
        .and_then(|f| f.ok())
        .and_then(|f| pipe::Receiver::from_file(f).ok());
    (fifo, closed)
}

/// After CloseIO: moves what the client wrote before it, i.e. what the FIFO
/// holds now, reading without waiting until it is empty. False if the
/// stream is gone.
async fn drain_fifo(fifo: &pipe::Receiver, stream: &mut UnixStream, buf: &mut [u8]) -> bool {
    loop {
        match nix::unistd::read(fifo, buf) {
            Ok(0) => return true,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return false;
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            // EAGAIN: empty, with the client's end still open.
            Err(_) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_and_paths() {
        assert_eq!(target("").unwrap(), None);
        assert_eq!(
            target("/run/containerd/fifo/1/t-stdout").unwrap(),
            Some(Target::Path("/run/containerd/fifo/1/t-stdout".into()))
        );
        assert_eq!(
            target("file:///var/log/t.log").unwrap(),
            Some(Target::File("/var/log/t.log".into()))
        );
        assert!(matches!(
            target("binary:///usr/bin/logger?x=1").unwrap(),
            Some(Target::Binary(_))
        ));
        let e = target("binary://logger").unwrap_err();
        assert!(e.to_string().contains("must be absolute"), "{e}");
        let e = target("syslog://x").unwrap_err();
        assert!(e.to_string().contains("binary://"), "{e}");
    }

    #[test]
    fn a_terminal_has_no_stderr_stream() {
        let paths = StdioPaths {
            stdin: "/f/in".into(),
            stdout: "/f/out".into(),
            stderr: "/f/err".into(),
            terminal: true,
        };
        let w = paths.wanted();
        assert!(w.stdin && w.stdout && !w.stderr && w.terminal);
        let none = StdioPaths::default().wanted();
        assert!(!none.stdin && !none.stdout && !none.stderr);
    }

    fn mkfifo(path: &Path) {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }

    /// Opens the client's end of a FIFO once the shim waits on the other.
    async fn client_end(fifo: &Path) -> pipe::Sender {
        for _ in 0..500 {
            if let Ok(w) = pipe::OpenOptions::new().open_sender(fifo) {
                return w;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the shim never opened {}", fifo.display());
    }

    async fn stdin_io(dir: &Path) -> (ProcessIo, PathBuf, UnixStream) {
        let fifo = dir.join("stdin");
        mkfifo(&fifo);
        let (host, guest) = UnixStream::pair().unwrap();
        let paths = StdioPaths {
            stdin: fifo.display().to_string(),
            ..Default::default()
        };
        let streams = Streams {
            stdin: Some(host),
            stdout: None,
            stderr: None,
        };
        let io = ProcessIo::connect(&paths, streams, &LogOwner::default())
            .await
            .unwrap();
        (io, fifo, guest)
    }

    async fn read_all(mut guest: UnixStream) -> Vec<u8> {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), guest.read_to_end(&mut got))
            .await
            .expect("stdin never reached EOF")
            .unwrap();
        got
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stdin_ends_when_the_client_closes_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_io, fifo, guest) = stdin_io(dir.path()).await;
        let mut writer = client_end(&fifo).await;
        writer.write_all(b"piped input\n").await.unwrap();
        drop(writer);
        assert_eq!(read_all(guest).await, b"piped input\n");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_io_delivers_what_was_written_then_eof() {
        let dir = tempfile::tempdir().unwrap();
        let (io, fifo, guest) = stdin_io(dir.path()).await;
        let mut writer = client_end(&fifo).await;
        writer.write_all(b"hello ").await.unwrap();
        writer.write_all(b"world").await.unwrap();
        io.close_stdin();
        assert_eq!(read_all(guest).await, b"hello world");
        drop(writer);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_never_comes_does_not_hold_the_shim() {
        let dir = tempfile::tempdir().unwrap();
        let (io, _fifo, guest) = stdin_io(dir.path()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        io.close_stdin();
        assert_eq!(read_all(guest).await, b"");
        tokio::time::timeout(Duration::from_secs(5), io.finish(Duration::from_secs(1)))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn output_is_all_copied_before_finish_returns() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("stdout");
        mkfifo(&fifo);
        let log = dir.path().join("err.log");
        let (host_out, mut guest_out) = UnixStream::pair().unwrap();
        let (host_err, mut guest_err) = UnixStream::pair().unwrap();
        let mut reader = pipe::OpenOptions::new().open_receiver(&fifo).unwrap();
        let paths = StdioPaths {
            stdout: fifo.display().to_string(),
            stderr: format!("file://{}", log.display()),
            ..Default::default()
        };
        let io = ProcessIo::connect(
            &paths,
            Streams {
                stdin: None,
                stdout: Some(host_out),
                stderr: Some(host_err),
            },
            &LogOwner::default(),
        )
        .await
        .unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let reading = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 8192];
            while got.len() < expected.len() {
                let n = reader.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        guest_out.write_all(&data).await.unwrap();
        guest_err.write_all(b"oops\n").await.unwrap();
        drop(guest_out);
        drop(guest_err);
        io.finish(Duration::from_secs(5)).await;
        assert_eq!(reading.await.unwrap(), data);
        assert_eq!(std::fs::read(&log).unwrap(), b"oops\n");
    }

    #[tokio::test]
    async fn a_missing_fifo_directory_is_named() {
        let paths = StdioPaths {
            stdout: "/nonexistent/dir/stdout".into(),
            ..Default::default()
        };
        let (host, _guest) = UnixStream::pair().unwrap();
        let e = ProcessIo::connect(
            &paths,
            Streams {
                stdin: None,
                stdout: Some(host),
                stderr: None,
            },
            &LogOwner::default(),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/dir/stdout"), "{e}");
    }
}
