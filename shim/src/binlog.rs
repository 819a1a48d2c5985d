//! `binary://` log URIs, with the semantics of containerd's runc shim
//! (nerdctl's `-d`, `start` and compose use them): for
//! `binary:///path/to/logger?key=value&flag`, the shim starts
//! `/path/to/logger key value flag` with `CONTAINER_ID` and
//! `CONTAINER_NAMESPACE` in its environment, the read end of the
//! process's stdout on fd 3, of its stderr on fd 4, and the write end of a
//! readiness pipe on fd 5, which the logger closes once it is ready. The
//! process's output is copied into fds 3 and 4; when the process has
//! exited and its output is copied, both are closed, the logger gets
//! SIGTERM and [`EXIT_GRACE`] to finish, and is then killed. A logger that exits early
//! costs its output, never the process (its output keeps being read and
//! dropped).
//!
//! `binary-v2://` is taken as a synonym.

use std::os::fd::OwnedFd;

use command_fds::{CommandFdExt, FdMapping};
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

/// How long a logger may take to signal readiness.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a logger may take to finish after its input ended.
pub const EXIT_GRACE: Duration = Duration::from_secs(12);

/// Errors starting a logger.
#[derive(Debug, thiserror::Error)]
pub enum BinlogError {
    /// The URI is not a usable `binary://` URI.
    #[error("log URI {uri:?}: {reason}")]
    BadUri {
        /// The URI.
        uri: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A pipe could not be made.
    #[error("cannot make the log binary's pipes")]
    Pipe(#[source] nix::Error),
    /// The pipes could not be given to the logger as fds 3-5.
    #[error("cannot pass the log binary its pipes")]
    Fds(#[source] command_fds::FdMappingCollision),
    /// The logger could not be started.
    #[error("cannot start log binary {}", path.display())]
    Spawn {
        /// The program.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The logger did not close fd 5 in time, or failed first.
    #[error("log binary {}: {reason}", path.display())]
    NotReady {
        /// The program.
        path: PathBuf,
        /// What happened.
        reason: String,
    },
}

/// A parsed `binary://` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryUri {
    /// The logger (absolute).
    pub path: PathBuf,
    /// Its arguments: each query key, then its value when it has one.
    pub args: Vec<String>,
}

impl BinaryUri {
    /// `None` when `uri` is not a `binary://` URI at all.
    pub fn parse(uri: &str) -> Option<Result<Self, BinlogError>> {
        let rest = uri
            .strip_prefix("binary://")
            .or_else(|| uri.strip_prefix("binary-v2://"))?;
        let bad = |reason| BinlogError::BadUri {
            uri: uri.to_owned(),
            reason,
        };
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let path = percent_decode(path);
        if !path.starts_with('/') {
            return Some(Err(bad("the log binary's path must be absolute")));
        }
        let mut args = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            args.push(percent_decode(key));
            if !value.is_empty() {
                args.push(percent_decode(value));
            }
        }
        Some(Ok(Self {
            path: PathBuf::from(path),
            args,
        }))
    }
}

/// Undoes URI percent-encoding (and `+` in queries is kept: Go's url
/// package turns it into a space only in form values, which containerd
/// does not use).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%' && i + 3 <= bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A running logger.
#[derive(Debug)]
pub struct Logger {
    path: PathBuf,
    child: tokio::process::Child,
}

/// A started logger and the write ends of its stdout and stderr pipes.
#[derive(Debug)]
pub struct Started {
    /// The logger.
    pub logger: Logger,
    /// Where the process's stdout goes.
    pub stdout: pipe::Sender,
    /// Where the process's stderr goes.
    pub stderr: pipe::Sender,
}

/// Starts the logger of `uri` for container `id` in `namespace` and waits
/// until it is ready (at most [`READY_TIMEOUT`]).
pub async fn start(uri: &BinaryUri, id: &str, namespace: &str) -> Result<Started, BinlogError> {
    start_within(uri, id, namespace, READY_TIMEOUT).await
}

async fn start_within(
    uri: &BinaryUri,
    id: &str,
    namespace: &str,
    ready_timeout: Duration,
) -> Result<Started, BinlogError> {
    let (out_r, out_w) = cloexec_pipe()?;
    let (err_r, err_w) = cloexec_pipe()?;
    let (ready_r, ready_w) = cloexec_pipe()?;
    let mut cmd = tokio::process::Command::new(&uri.path);
    cmd.args(&uri.args)
        .env("CONTAINER_ID", id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let mappings = [out_r, err_r, ready_w]
        .into_iter()
        .zip(3..)
        .map(|(parent_fd, child_fd)| FdMapping {
            parent_fd,
            child_fd,
        })
        .collect();
    cmd.fd_mappings(mappings).map_err(BinlogError::Fds)?;
    let spawned = cmd.spawn();
    // The command holds the parent's copies of the child's ends: dropping
    // it closes them, so that EOF on the ready pipe means the logger closed
    // fd 5 (or died).
    drop(cmd);
    let mut child = spawned.map_err(|source| BinlogError::Spawn {
        path: uri.path.clone(),
        source,
    })?;
    let not_ready = |reason: String| BinlogError::NotReady {
        path: uri.path.clone(),
        reason,
    };
    let mut ready = pipe::Receiver::from_owned_fd(ready_r).map_err(|e| not_ready(e.to_string()))?;
    let mut byte = [0u8; 1];
    match tokio::time::timeout(ready_timeout, ready.read(&mut byte)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(not_ready(format!("reading its readiness pipe: {e}"))),
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(not_ready(format!(
                "did not signal readiness (close fd 5) within {} s",
                ready_timeout.as_secs()
            )));
        }
    }
    let sender =
        |fd: OwnedFd| pipe::Sender::from_owned_fd(fd).map_err(|e| not_ready(e.to_string()));
    Ok(Started {
        logger: Logger {
            path: uri.path.clone(),
            child,
        },
        stdout: sender(out_w)?,
        stderr: sender(err_w)?,
    })
}

impl Logger {
    /// After its input ended (both write ends dropped): asks the logger to
    /// finish (SIGTERM, as containerd's runc shim does), waits up to
    /// [`EXIT_GRACE`] for it to exit, then kills it; reaped either way.
    pub async fn finish(mut self) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        match tokio::time::timeout(EXIT_GRACE, self.child.wait()).await {
            Ok(Ok(status)) if !status.success() => {
                tracing::warn!(logger = %self.path.display(), %status, "log binary failed");
            }
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(logger = %self.path.display(), "log binary did not exit; killed");
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
            }
        }
    }
}

fn cloexec_pipe() -> Result<(OwnedFd, OwnedFd), BinlogError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(BinlogError::Pipe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn uris_parse_as_containerd_reads_them() {
        let u = BinaryUri::parse(
            "binary:///usr/local/bin/nerdctl?_NERDCTL_INTERNAL_LOGGING=%2Fvar%2Flib%2Fnerdctl&flag",
        )
        .unwrap()
        .unwrap();
        assert_eq!(u.path, PathBuf::from("/usr/local/bin/nerdctl"));
        assert_eq!(
            u.args,
            ["_NERDCTL_INTERNAL_LOGGING", "/var/lib/nerdctl", "flag"]
        );
        let u = BinaryUri::parse("binary-v2:///bin/logger")
            .unwrap()
            .unwrap();
        assert!(u.args.is_empty());
        assert!(BinaryUri::parse("file:///x").is_none());
        assert!(BinaryUri::parse("/run/fifo").is_none());
        let e = BinaryUri::parse("binary://relative/logger")
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains("must be absolute"), "{e}");
    }

    fn script(dir: &std::path::Path, name: &str, body: &str) -> BinaryUri {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        BinaryUri {
            path,
            args: vec![dir.join("out").display().to_string()],
        }
    }

    #[tokio::test]
    async fn a_logger_gets_both_streams_and_its_environment() {
        let dir = tempfile::tempdir().unwrap();
        let uri = script(
            dir.path(),
            "logger",
            "trap '' TERM; exec 5>&-; echo \"$CONTAINER_NAMESPACE/$CONTAINER_ID\" > \"$1\"; \
             cat <&3 >> \"$1\"; cat <&4 >> \"$1\"",
        );
        let mut started = start(&uri, "c1", "ns").await.unwrap();
        started.stdout.write_all(b"out line\n").await.unwrap();
        started.stderr.write_all(b"err line\n").await.unwrap();
        drop((started.stdout, started.stderr));
        started.logger.finish().await;
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out")).unwrap(),
            "ns/c1\nout line\nerr line\n"
        );
    }

    #[tokio::test]
    async fn a_logger_that_never_gets_ready_or_cannot_start_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let uri = script(dir.path(), "stuck", "exec sleep 30");
        let e = start_within(&uri, "c1", "ns", Duration::from_secs(1))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("did not signal readiness"), "{e}");
        let uri = BinaryUri {
            path: dir.path().join("missing"),
            args: Vec::new(),
        };
        assert!(matches!(
            start(&uri, "c1", "ns").await,
            Err(BinlogError::Spawn { .. })
        ));
    }
}
