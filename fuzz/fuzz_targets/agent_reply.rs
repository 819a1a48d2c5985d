//! Fuzzes the host's side of the agent API on what the guest agent sends
//! back. The first input byte picks a call; its low bit picks how the rest
//! arrives:
//!
//! - as the bytes of a ttrpc `Response` (status and payload), decoded as
//!   the client does, its status turned into the host's error and its
//!   payload merged into the call's reply type; the rest is also decoded
//!   as that reply type directly. Each reply then goes through what the
//!   host makes of it: containerd metrics from stats, exit times from
//!   waits and events, boot timings from health;
//! - or as the byte stream a fake agent writes on the connection (ttrpc
//!   frames), after it has read the host's request: the real client makes
//!   the call and gets whatever the stream holds.
//!
//! Nothing may panic, whatever the guest says, and every call must end.

#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use capsid_protocol::agent::{
    event, CreateContainerResponse, Empty, Event, ExecProcessResponse, HealthResponse,
    ListProcessesResponse, StartProcessResponse, StatsResponse, WaitProcessResponse,
};
use capsid_sandbox::agent::{bind_agent_listener, Agent, AgentError, AGENT_HOST_PORT};
use capsid_shim::metrics;
use capsid_shim::process::ExitInfo;
use libfuzzer_sys::fuzz_target;
use protobuf::Message;
use ttrpc::proto::{Codec, Response};

/// The reply types the host reads.
const REPLY_TYPES: u8 = 9;

/// What the host makes of a reply of type `kind` (see [`REPLY_TYPES`]).
fn use_reply(kind: u8, bytes: &[u8], merge_into_default: bool) {
    fn decode<M: Message>(bytes: &[u8], merge: bool) -> Option<M> {
        if merge {
            // As the ttrpc client does with a response payload.
            let mut m = M::new();
            m.merge_from_bytes(bytes).ok().map(|()| m)
        } else {
            M::parse_from_bytes(bytes).ok()
        }
    }
    let merge = merge_into_default;
    match kind % REPLY_TYPES {
        0 => {
            if let Some(h) = decode::<HealthResponse>(bytes, merge) {
                // As the sandbox records its start-up timings.
                let _ = Duration::from_nanos(h.kernel_boot_ns);
                let _ = Duration::from_nanos(h.agent_started_ns);
                let _ = (h.now_ns > 0).then(|| Duration::from_nanos(h.now_ns));
                let _ = h.version.len();
            }
        }
        1 => {
            let _ = decode::<CreateContainerResponse>(bytes, merge);
        }
        2 => {
            let _ = decode::<StartProcessResponse>(bytes, merge);
        }
        3 => {
            let _ = decode::<ExecProcessResponse>(bytes, merge);
        }
        4 => {
            if let Some(w) = decode::<WaitProcessResponse>(bytes, merge) {
                let exit = ExitInfo::from_agent(w.exit_status, w.exited_at_unix_ns);
                let _ = exit.timestamp();
            }
        }
        5 => {
            if let Some(l) = decode::<ListProcessesResponse>(bytes, merge) {
                for p in &l.processes {
                    let _ = (p.pid, p.exec_id.len(), p.command.len());
                }
            }
        }
        6 => {
            if let Some(s) = decode::<StatsResponse>(bytes, merge) {
                let m = metrics::from_agent(&s);
                let any = metrics::to_any(&m).expect("metrics encode");
                assert!(!any.type_url.is_empty());
            }
        }
        7 => {
            if let Some(e) = decode::<Event>(bytes, merge) {
                // As the shim turns an exit event into a task exit.
                if let Some(event::Kind::Exited(x)) = &e.kind {
                    let exit = ExitInfo::from_agent(x.exit_status, x.exited_at_unix_ns);
                    let _ = exit.timestamp();
                }
            }
        }
        _ => {
            let _ = decode::<Empty>(bytes, merge);
        }
    }
}

/// The ttrpc envelope, as the client unpacks it.
fn use_response(kind: u8, bytes: &[u8]) {
    let Ok(response) = Response::decode(bytes) else {
        return;
    };
    let status = response.status();
    if status.code() != ttrpc::Code::OK {
        let e = AgentError::from(ttrpc::Error::RpcStatus(status.clone()));
        let _ = e.to_string();
        return;
    }
    use_reply(kind, &response.payload, true);
}

/// The host's runtime and the socket the fake agent dials, made once.
struct Host {
    runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    path: PathBuf,
    listener: tokio::net::UnixListener,
}

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        // SAFETY: ignoring SIGPIPE changes no memory; the client may write to
        // an agent that has hung up, as under Rust's runtime, which ignores
        // SIGPIPE too.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let dir = tempfile::tempdir().expect("socket directory");
        let vsock = dir.path().join("vsock");
        let listener = {
            let _guard = runtime.enter();
            bind_agent_listener(&vsock).expect("agent listener")
        };
        let path = PathBuf::from(format!("{}_{AGENT_HOST_PORT}", vsock.display()));
        Host {
            runtime,
            _dir: dir,
            path,
            listener,
        }
    })
}

/// A fake agent: dials the host, reads one request frame, writes `stream`
/// and hangs up.
fn fake_agent(path: PathBuf, stream: Vec<u8>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok(mut conn) = UnixStream::connect(&path) else {
            return;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        // A ttrpc frame: length (u32, big-endian), stream id, type, flags.
        let mut header = [0u8; 10];
        if conn.read_exact(&mut header).is_err() {
            return;
        }
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let mut request = vec![0u8; len.min(1 << 20) as usize];
        if conn.read_exact(&mut request).is_err() {
            return;
        }
        let _ = conn.write_all(&stream);
    })
}

/// Makes call `kind` through the real client against a fake agent.
fn call(kind: u8, stream: &[u8]) {
    let host = host();
    let agent_thread = fake_agent(host.path.clone(), stream.to_vec());
    host.runtime.block_on(async {
        let Ok(agent) = Agent::accept(&host.listener, Duration::from_secs(5)).await else {
            return;
        };
        let (c, e) = ("c", "e");
        match kind % 11 {
            0 => drop(agent.health().await),
            1 => drop(agent.start_process(c, e).await),
            2 => {
                if let Ok(w) = agent.wait_process(c, e).await {
                    let _ = ExitInfo::from_agent(w.exit_status, w.exited_at_unix_ns).timestamp();
                }
            }
            3 => drop(agent.signal_process(c, e, 9, true).await),
            4 => drop(agent.resize_pty(c, e, 24, 80).await),
            5 => drop(agent.list_processes(c).await),
            6 => {
                if let Ok(s) = agent.stats(c).await {
                    let _ = metrics::to_any(&metrics::from_agent(&s));
                }
            }
            7 => drop(agent.update_container(c, b"{}".to_vec()).await),
            8 => drop(agent.pause_container(c, true).await),
            9 => drop(agent.next_event().await),
            _ => drop(agent.shutdown().await),
        }
    });
    agent_thread.join().expect("fake agent");
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let kind = control >> 1;
    if control & 1 == 0 {
        use_response(kind, rest);
        use_reply(kind, rest, false);
    } else {
        call(kind, rest);
    }
});
