//! The control API: line-delimited JSON on a Unix socket. Each request is
//! one JSON object on one line with an `op` field; each gets one JSON
//! object back on one line, `{"ok":true,...}` or
//! `{"ok":false,"error":"..."}`. docs/vmm.md lists the operations.
//!
//! This module only speaks the protocol: every request is handed to the
//! machine's own thread over a channel, which owns the VM and answers.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest request line accepted.
pub const MAX_REQUEST_LEN: u64 = 64 * 1024;
/// Clients served at once at most.
pub const MAX_CLIENTS: usize = 8;
/// How long a client waits for the machine to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default grace period of `shutdown`.
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 1000;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Sets the balloon target.
    BalloonSet {
        /// Target in MiB.
        target_mib: u32,
    },
    /// Returns the balloon's state and the guest's last statistics, and
    /// asks the guest for fresh ones.
    BalloonStats,
    /// Parks every vCPU.
    Pause,
    /// Lets the vCPUs run again.
    Resume,
    /// Exit counters, device counters, guest memory layout, start-up time.
    Metrics,
    /// Presses Ctrl-Alt-Del; if the guest has not reset within
    /// `timeout_ms`, the VMM ends anyway.
    Shutdown {
        /// Grace period (default 1000 ms).
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
}

/// A request on its way to the machine, with where to send the answer.
#[derive(Debug)]
pub struct Call {
    /// The request.
    pub request: Request,
    /// Takes the answer.
    pub reply: Sender<std::result::Result<Value, String>>,
}

/// Builds the answer line for a result.
pub fn answer(result: std::result::Result<Value, String>) -> Value {
    match result {
        Ok(Value::Object(mut fields)) => {
            fields.insert("ok".into(), Value::Bool(true));
            Value::Object(fields)
        }
        Ok(Value::Null) => serde_json::json!({ "ok": true }),
        Ok(other) => serde_json::json!({ "ok": true, "result": other }),
        Err(error) => serde_json::json!({ "ok": false, "error": error }),
    }
}

/// Serves `listener` on a thread of its own; every request becomes a
/// [`Call`] sent with `send` (which wraps it in the machine's event type).
pub fn spawn<F>(listener: UnixListener, send: F) -> std::io::Result<()>
where
    F: Fn(Call) -> bool + Send + Sync + 'static,
{
    let send = Arc::new(send);
    let clients = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if clients.load(Ordering::SeqCst) >= MAX_CLIENTS {
                    let _ = reply_line(&stream, &answer(Err("too many control clients".into())));
                    continue;
                }
                clients.fetch_add(1, Ordering::SeqCst);
                let (send, clients) = (Arc::clone(&send), Arc::clone(&clients));
                let spawned = std::thread::Builder::new()
                    .name("control-client".into())
                    .spawn(move || {
                        serve_client(stream, send.as_ref());
                        clients.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    tracing::warn!("cannot start a control client thread");
                }
            }
        })
        .map(|_| ())
}

fn reply_line(mut stream: &UnixStream, value: &Value) -> std::io::Result<()> {
    let mut line = value.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes())
}

fn serve_client(stream: UnixStream, send: &dyn Fn(Call) -> bool) {
    let Ok(reader) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(reader.take(u64::MAX));
    loop {
        let mut line = String::new();
        reader.get_mut().set_limit(MAX_REQUEST_LEN);
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST_LEN => {
                let _ = reply_line(&stream, &answer(Err("request line too long".into())));
                return;
            }
            Ok(_) => {}
            Err(_) => return,
        }
        if line.trim().is_empty() {
            continue;
        }
        let result = match serde_json::from_str::<Request>(&line) {
            Ok(request) => call(send, request),
            Err(e) => Err(format!("invalid request: {e}")),
        };
        if reply_line(&stream, &answer(result)).is_err() {
            return;
        }
    }
}

fn call(send: &dyn Fn(Call) -> bool, request: Request) -> std::result::Result<Value, String> {
    let (reply, answer) = mpsc::channel();
    if !send(Call { request, reply }) {
        return Err("the VM is ending".into());
    }
    answer
        .recv_timeout(ANSWER_TIMEOUT)
        .unwrap_or_else(|_| Err("the VM did not answer".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    #[test]
    fn requests_parse() {
        let r: Request = serde_json::from_str(r#"{"op":"balloon_set","target_mib":64}"#).unwrap();
        assert_eq!(r, Request::BalloonSet { target_mib: 64 });
        let r: Request = serde_json::from_str(r#"{"op":"shutdown"}"#).unwrap();
        assert_eq!(r, Request::Shutdown { timeout_ms: None });
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
    }

    #[test]
    fn answers_carry_ok() {
        assert_eq!(answer(Ok(Value::Null)), serde_json::json!({"ok": true}));
        assert_eq!(
            answer(Ok(serde_json::json!({"a": 1}))),
            serde_json::json!({"ok": true, "a": 1})
        );
        assert_eq!(
            answer(Err("no".into())),
            serde_json::json!({"ok": false, "error": "no"})
        );
    }

    #[test]
    fn socket_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        spawn(listener, |call: Call| {
            let result = match call.request {
                Request::Pause => Ok(Value::Null),
                other => Err(format!("{other:?} refused")),
            };
            call.reply.send(result).is_ok()
        })
        .unwrap();
        let stream = UnixStream::connect(&path).unwrap();
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        let mut ask = |line: &str| {
            (&stream).write_all(line.as_bytes()).unwrap();
            let mut out = String::new();
            reader.read_line(&mut out).unwrap();
            serde_json::from_str::<Value>(&out).unwrap()
        };
        assert_eq!(ask("{\"op\":\"pause\"}\n")["ok"], true);
        let v = ask("{\"op\":\"resume\"}\n");
        assert_eq!(v["ok"], false);
        assert!(v["error"].as_str().unwrap().contains("Resume"));
        let v = ask("not json\n");
        assert!(v["error"].as_str().unwrap().contains("invalid request"));
        let long = format!(
            "{}\n",
            "x".repeat(usize::try_from(MAX_REQUEST_LEN).unwrap() + 10)
        );
        let v = ask(&long);
        assert!(v["error"].as_str().unwrap().contains("too long"));
    }
}
