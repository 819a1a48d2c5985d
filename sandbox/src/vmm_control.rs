//! A client of capsid-vmm's control socket (docs/vmm.md): one typed
//! [`Request`] per connection, one [`Reply`] back, both within
//! [`CONTROL_TIMEOUT`]. The messages are capsid-vmm's own types
//! (`capsid_vmm_api::control`), so both ends read and write the same wire.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

pub use capsid_vmm_api::control::{Reply, Request};

/// How long a control request may take, each way.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest answer read from the control socket; a longer one is cut there
/// (and then fails to parse) rather than read whole into memory.
pub const MAX_ANSWER: u64 = 256 * 1024;

/// Errors talking to capsid-vmm.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket cannot be reached, or the exchange failed or timed out.
    #[error("cannot talk to the VMM at {socket}")]
    Io {
        /// The control socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The answer is not a reply of this capsid's capsid-vmm.
    #[error(
        "the VMM at {socket} gave an unreadable answer to {op} (is it the capsid-vmm of \
         this capsid version?)"
    )]
    Answer {
        /// The control socket.
        socket: PathBuf,
        /// The request's `op`.
        op: &'static str,
        /// What does not fit.
        #[source]
        source: serde_json::Error,
    },
    /// capsid-vmm refused the request.
    #[error("the VMM at {socket} refused {op}: {message}")]
    Refused {
        /// The control socket.
        socket: PathBuf,
        /// The request's `op`.
        op: &'static str,
        /// What it said.
        message: String,
    },
}

/// Result of control requests.
pub type Result<T> = std::result::Result<T, ControlError>;

/// Sends `request` to the control socket `socket` and returns capsid-vmm's
/// reply, whether it carried the request out or not.
pub fn exchange(socket: &Path, request: &Request) -> Result<Reply> {
    let io = |source| ControlError::Io {
        socket: socket.to_path_buf(),
        source,
    };
    let stream = crate::private_dir::connect_no_follow(socket).map_err(io)?;
    stream.set_read_timeout(Some(CONTROL_TIMEOUT)).map_err(io)?;
    stream
        .set_write_timeout(Some(CONTROL_TIMEOUT))
        .map_err(io)?;
    let mut line = serde_json::to_vec(request)
        .map_err(std::io::Error::from)
        .map_err(io)?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io)?;
    let mut answer = String::new();
    if BufReader::new(&stream)
        .take(MAX_ANSWER)
        .read_line(&mut answer)
        .map_err(io)?
        == 0
    {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the connection closed without an answer",
        )));
    }
    serde_json::from_str(&answer).map_err(|source| ControlError::Answer {
        socket: socket.to_path_buf(),
        op: request.op(),
        source,
    })
}

/// Sends `request` and returns capsid-vmm's reply when it carried the
/// request out; a refusal is an error.
pub fn call(socket: &Path, request: &Request) -> Result<Reply> {
    let reply = exchange(socket, request)?;
    if reply.ok {
        return Ok(reply);
    }
    Err(ControlError::Refused {
        socket: socket.to_path_buf(),
        op: request.op(),
        message: reply.error.unwrap_or_else(|| "no reason given".to_string()),
    })
}

/// [`call`], reading the reply's fields as `T` (the operation's reply type).
pub fn call_for<T: DeserializeOwned>(socket: &Path, request: &Request) -> Result<T> {
    call(socket, request)?
        .body_as()
        .map_err(|source| ControlError::Answer {
            socket: socket.to_path_buf(),
            op: request.op(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    use capsid_vmm_api::control::BalloonStatsReply;

    /// A fake capsid-vmm answering `answers` in turn, one per connection;
    /// returns the request lines it read.
    fn fake_vmm(
        answers: &'static [&'static str],
    ) -> (
        tempfile::TempDir,
        PathBuf,
        std::thread::JoinHandle<Vec<String>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm-api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let fake = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for answer in answers {
                let (s, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).unwrap();
                seen.push(line);
                (&s).write_all(answer.as_bytes()).unwrap();
            }
            seen
        });
        (dir, path, fake)
    }

    #[test]
    fn a_request_is_one_line_and_its_reply_is_read() {
        let (_dir, path, fake) = fake_vmm(&[
            "{\"ok\":true}\n",
            "{\"ok\":false,\"error\":\"the VM is ending\"}\n",
            "{\"ok\":false,\"error\":\"no balloon\"}\n",
        ]);
        let shutdown = Request::Shutdown {
            timeout_ms: Some(500),
        };
        assert_eq!(exchange(&path, &shutdown).unwrap(), Reply::done());
        // A refusal is still a reply to `exchange`, an error to `call`.
        let reply = exchange(&path, &shutdown).unwrap();
        assert_eq!(reply.error.as_deref(), Some("the VM is ending"));
        let e = call(&path, &Request::BalloonStats).unwrap_err();
        assert!(
            matches!(
                e,
                ControlError::Refused {
                    op: "balloon_stats",
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().ends_with("refused balloon_stats: no balloon"),
            "{e}"
        );
        let seen = fake.join().unwrap();
        assert_eq!(seen[0], "{\"op\":\"shutdown\",\"timeout_ms\":500}\n");
        assert_eq!(seen[2], "{\"op\":\"balloon_stats\"}\n");
    }

    #[test]
    fn unreadable_or_missing_answers_are_errors() {
        let (_dir, path, fake) = fake_vmm(&["not json\n", "{\"ok\":true}\n", ""]);
        let e = exchange(&path, &Request::Pause).unwrap_err();
        assert!(matches!(e, ControlError::Answer { op: "pause", .. }), "{e}");
        let e = call_for::<BalloonStatsReply>(&path, &Request::BalloonStats).unwrap_err();
        assert!(matches!(e, ControlError::Answer { .. }), "{e}");
        let e = exchange(&path, &Request::Pause).unwrap_err();
        assert!(matches!(e, ControlError::Io { .. }), "{e}");
        fake.join().unwrap();
        std::fs::remove_file(&path).unwrap();
        let e = exchange(&path, &Request::Pause).unwrap_err();
        assert!(matches!(e, ControlError::Io { .. }), "{e}");
        assert!(e.to_string().contains("vmm-api.sock"), "{e}");
    }

    #[test]
    fn an_endless_control_answer_is_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm-api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // A VMM that answers with one line that never ends.
        let vmm = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let chunk = [b'x'; 4096];
            let mut sent = 0usize;
            while s.write_all(&chunk).is_ok() {
                sent += chunk.len();
            }
            sent
        });
        let e = exchange(&path, &Request::BalloonStats).unwrap_err();
        assert!(matches!(e, ControlError::Answer { .. }), "{e}");
        // The VMM could only send what the socket buffers beyond the limit.
        let sent = vmm.join().unwrap();
        assert!(sent < 16 << 20, "{sent} bytes read");
    }
}
