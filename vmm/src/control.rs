//! The control API's socket: line-delimited JSON on a Unix socket, one
//! request ([`Request`]) per line and one [`Reply`] per request; the
//! messages are capsid-vmm's wire, shared with its clients
//! (`capsid_vmm_api::control`, re-exported here). docs/vmm.md lists the
//! operations.
//!
//! This module only speaks the protocol: every request is handed to the
//! machine's own thread over a channel, which owns the VM and answers.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

pub use capsid_vmm_api::control::*;

/// Clients served at once at most.
pub const MAX_CLIENTS: usize = 8;
/// How long a client waits for the machine to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A request on its way to the machine, with where to send the answer.
#[derive(Debug)]
pub struct Call {
    /// The request.
    pub request: Request,
    /// Takes the answer.
    pub reply: Sender<Reply>,
}

/// Whether test-only requests are honoured: [`TEST_CONTROL_ENV`] is `1`.
pub fn test_control_from_env() -> bool {
    std::env::var_os(TEST_CONTROL_ENV).is_some_and(|v| v == "1")
}

/// Serves `listener` on a thread of its own; every request becomes a
/// [`Call`] sent with `send` (which wraps it in the machine's event type).
/// Test-only requests are honoured when [`TEST_CONTROL_ENV`] is `1`.
pub fn spawn<F>(listener: UnixListener, send: F) -> std::io::Result<()>
where
    F: Fn(Call) -> bool + Send + Sync + 'static,
{
    spawn_with(listener, test_control_from_env(), send)
}

/// [`spawn`], honouring test-only requests when `test_control`.
pub fn spawn_with<F>(listener: UnixListener, test_control: bool, send: F) -> std::io::Result<()>
where
    F: Fn(Call) -> bool + Send + Sync + 'static,
{
    let send = Arc::new(send);
    let clients = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            // Client threads started from here inherit this filter.
            crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Control);
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if clients.load(Ordering::SeqCst) >= MAX_CLIENTS {
                    let _ = reply_line(&stream, &Reply::refused("too many control clients"));
                    continue;
                }
                clients.fetch_add(1, Ordering::SeqCst);
                let (send, clients) = (Arc::clone(&send), Arc::clone(&clients));
                let spawned = std::thread::Builder::new()
                    .name("control-client".into())
                    .spawn(move || {
                        serve_client(stream, test_control, send.as_ref());
                        clients.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    tracing::warn!("cannot start a control client thread");
                }
            }
        })
        .map(|_| ())
}

fn reply_line(mut stream: &UnixStream, reply: &Reply) -> std::io::Result<()> {
    // Through a `Value`, whose keys are sorted: every answer line keeps the
    // key order it has always had.
    let mut line = serde_json::to_value(reply)
        .map_err(std::io::Error::other)?
        .to_string();
    line.push('\n');
    stream.write_all(line.as_bytes())
}

fn serve_client(stream: UnixStream, test_control: bool, send: &dyn Fn(Call) -> bool) {
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
                let _ = reply_line(&stream, &Reply::refused("request line too long"));
                return;
            }
            Ok(_) => {}
            Err(_) => return,
        }
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(Request::TestForbiddenSyscall) => forbidden_syscall(test_control),
            Ok(request) => call(send, request),
            Err(e) => Reply::refused(format!("invalid request: {e}")),
        };
        if reply_line(&stream, &reply).is_err() {
            return;
        }
    }
}

/// `test_forbidden_syscall`: makes a system call that no seccomp list
/// allows, so that the kernel kills the VMM; refused unless
/// `test_control`. The call is `reboot(2)` with wrong magic numbers,
/// which does nothing even where no filter stops it (`--seccomp off`): the
/// kernel answers EPERM or EINVAL, and so does the reply.
fn forbidden_syscall(test_control: bool) -> Reply {
    if !test_control {
        return Reply::refused(format!(
            "test_forbidden_syscall is a test-only request: start capsid-vmm with {TEST_CONTROL_ENV}=1"
        ));
    }
    tracing::warn!("test_forbidden_syscall: calling reboot(2), which no seccomp list allows");
    // SAFETY: reboot(2) with magic numbers that are not the kernel's
    // reboots nothing (EINVAL, or EPERM without CAP_SYS_BOOT) and takes no
    // pointer to read (the fourth argument is read only for
    // LINUX_REBOOT_CMD_RESTART2 with valid magic).
    let rc = unsafe { libc::syscall(libc::SYS_reboot, 0, 0, 0, 0) };
    let error = std::io::Error::last_os_error();
    Reply::refused(format!(
        "reboot(2) was not stopped by a seccomp filter (returned {rc}: {error})"
    ))
}

fn call(send: &dyn Fn(Call) -> bool, request: Request) -> Reply {
    let (reply, answer) = mpsc::channel();
    if !send(Call { request, reply }) {
        return Reply::refused("the VM is ending");
    }
    answer
        .recv_timeout(ANSWER_TIMEOUT)
        .unwrap_or_else(|_| Reply::refused("the VM did not answer"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
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
    fn socket_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        spawn_with(listener, false, |call: Call| {
            let reply = match call.request {
                Request::Pause => Reply::done(),
                Request::Metrics => Reply::with_body(&serde_json::json!({"z": 1, "a": 2})).unwrap(),
                other => Reply::refused(format!("{other:?} refused")),
            };
            call.reply.send(reply).is_ok()
        })
        .unwrap();
        let stream = UnixStream::connect(&path).unwrap();
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        let mut ask_line = |line: &str| {
            (&stream).write_all(line.as_bytes()).unwrap();
            let mut out = String::new();
            reader.read_line(&mut out).unwrap();
            out
        };
        assert_eq!(ask_line("{\"op\":\"pause\"}\n"), "{\"ok\":true}\n");
        // Keys in sorted order, as the lines have always been.
        assert_eq!(
            ask_line("{\"op\":\"metrics\"}\n"),
            "{\"a\":2,\"ok\":true,\"z\":1}\n"
        );
        let mut ask = |line: &str| serde_json::from_str::<Value>(&ask_line(line)).unwrap();
        let v = ask("{\"op\":\"resume\"}\n");
        assert_eq!(v["ok"], false);
        assert!(v["error"].as_str().unwrap().contains("Resume"));
        // Test-only requests are refused unless enabled, and never reach
        // the machine.
        let v = ask("{\"op\":\"test_forbidden_syscall\"}\n");
        assert_eq!(v["ok"], false);
        assert!(
            v["error"].as_str().unwrap().contains(TEST_CONTROL_ENV),
            "{v}"
        );
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
