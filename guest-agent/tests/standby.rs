//! The standby runtime helper as a process (`capsid-agent
//! __runtime-standby`): what it does with a job, a broken message, a job
//! with the wrong stdio, and a socket closed without a job. No guest and
//! no root: the job here is an exec into a container that does not exist,
//! which the helper reports as an `error` result like a spawned helper.

// A test file: helpers outside `#[test]` functions unwrap too.
#![allow(clippy::unwrap_used)]

use std::io::{IoSlice, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    recv, sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};

const AGENT: &str = env!("CARGO_BIN_EXE_capsid-agent");

/// A standby with its socket as stdin and stderr captured; the agent's end.
fn standby() -> (Child, OwnedFd) {
    let (agent, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    let child = Command::new(AGENT)
        .arg("__runtime-standby")
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, agent)
}

/// The message format of `standby::encode`: tag, count, arguments.
fn message(args: &[&str]) -> Vec<u8> {
    let mut msg = b"capsid-standby/1\0".to_vec();
    msg.extend_from_slice(format!("{}\0", args.len()).as_bytes());
    for a in args {
        msg.extend_from_slice(a.as_bytes());
        msg.push(0);
    }
    msg
}

fn send(sock: &OwnedFd, msg: &[u8], fds: &[RawFd]) {
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(msg)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
}

/// The standby's answer: whether it took the job (it answers "+" before
/// anything else), or closed its end without.
fn took_it(sock: &OwnedFd) -> bool {
    let mut answer = [0u8; 8];
    match recv(sock.as_raw_fd(), &mut answer, MsgFlags::empty()) {
        Ok(1) if answer[0] == b'+' => true,
        Ok(0) | Err(nix::errno::Errno::ECONNRESET) => false,
        other => panic!("the standby answered {other:?} {answer:?}"),
    }
}

/// Waits (bounded) for the standby to exit: its code and stderr.
fn finish(mut child: Child) -> (i32, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the standby did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code().unwrap_or(-1), err)
}

fn exec_job(dir: &Path) -> (Vec<String>, std::path::PathBuf) {
    let result = dir.join("result-e1");
    let args = [
        "__runtime",
        "exec",
        "no-such-container-of-this-test",
        dir.join("exec-e1.json").to_str().unwrap(),
        "--result",
        result.to_str().unwrap(),
    ]
    .map(str::to_string)
    .to_vec();
    (args, result)
}

#[test]
fn a_job_runs_on_the_stdio_it_came_with() {
    let dir = tempfile::tempdir().unwrap();
    let (args, result) = exec_job(dir.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (child, sock) = standby();
    let (host_in, guest_in) = UnixStream::pair().unwrap();
    let (mut host_out, guest_out) = UnixStream::pair().unwrap();
    let (mut host_err, guest_err) = UnixStream::pair().unwrap();
    send(
        &sock,
        &message(&args),
        &[
            guest_in.as_raw_fd(),
            guest_out.as_raw_fd(),
            guest_err.as_raw_fd(),
        ],
    );
    // As the agent does: its copies go right after the send.
    drop((guest_in, guest_out, guest_err));
    assert!(took_it(&sock));
    drop(sock);
    let (code, stderr) = finish(child);
    assert_eq!(code, 0, "a result was written; stderr: {stderr}");
    let text = std::fs::read_to_string(&result).unwrap();
    assert!(text.starts_with("error "), "{text}");
    assert!(
        text.contains("no-such-container-of-this-test"),
        "the job's own failure: {text}"
    );
    // The job's stdout and stderr were the standby's, and are closed now
    // that it has exited: the host sees EOF.
    let mut rest = String::new();
    host_out.read_to_string(&mut rest).unwrap();
    host_err.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "");
    drop(host_in);
}

#[test]
fn a_job_without_its_stdio_gets_an_error_result() {
    let dir = tempfile::tempdir().unwrap();
    let (args, result) = exec_job(dir.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (child, sock) = standby();
    send(&sock, &message(&args), &[]);
    assert!(took_it(&sock), "the job is taken, then refused");
    let (code, stderr) = finish(child);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&result).unwrap(),
        "error standby runtime helper: the job came with 0 stdio fds, 3 expected\n"
    );
}

#[test]
fn a_broken_message_ends_the_standby() {
    let (child, sock) = standby();
    send(&sock, b"capsid-standby/1\x003\0__runtime\0create\0", &[]);
    assert!(!took_it(&sock), "a broken message is not taken");
    let (code, stderr) = finish(child);
    assert_eq!(code, 2);
    assert!(stderr.contains("bad job message"), "{stderr}");

    let (child, sock) = standby();
    let (args, _) = exec_job(Path::new("/nonexistent"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cut = message(&args);
    cut.truncate(cut.len() - 3);
    send(&sock, &cut, &[]);
    assert!(!took_it(&sock));
    let (code, stderr) = finish(child);
    assert_eq!(code, 2, "a cut message is refused: {stderr}");
}

#[test]
fn a_socket_closed_without_a_job_ends_it_quietly() {
    let (child, sock) = standby();
    drop(sock);
    let (code, stderr) = finish(child);
    assert_eq!((code, stderr.as_str()), (0, ""));
}
