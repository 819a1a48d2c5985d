//! The CRI's streaming calls, Exec and Attach, as kubelet relays them for
//! `kubectl exec` and `kubectl attach`: the CRI answers with a URL on
//! containerd's streaming server, and the client speaks Kubernetes'
//! channel protocol (`v4.channel.k8s.io`) over a WebSocket there — one
//! byte of channel (0 stdin, 1 stdout, 2 stderr, 3 the status), then the
//! data. Run with runc, the reference, and with capsid.

use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use capsid_tests::cri::{busybox_container, CriHarness, CAPSID, RUNC};
use k8s_cri::v1::*;
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

/// Time allowed for a container to reach a state (a VM boots under
/// QEMU-TCG with capsid).
const LONG: Duration = Duration::from_secs(90);

/// What a stream session gave: stdout, stderr and the status message.
#[derive(Debug, Default)]
struct Session {
    stdout: String,
    stderr: String,
    status: String,
}

/// Connects to the streaming `url` from inside containerd's network
/// namespace (its server listens on that namespace's loopback), sends
/// `stdin` (if any) and reads until the server closes or `until` holds.
fn stream(
    h: &CriHarness,
    url: &str,
    stdin: Option<&str>,
    until: impl Fn(&Session) -> bool + Sync,
) -> Session {
    let netns = std::fs::File::open(h.netns().path()).unwrap();
    let url = url.replacen("http://", "ws://", 1);
    let stdin = stdin.map(str::to_owned);
    std::thread::scope(|s| {
        s.spawn(|| {
            // This thread only: its network namespace becomes containerd's.
            nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut request = url.as_str().into_client_request().unwrap();
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                "v4.channel.k8s.io".parse().unwrap(),
            );
            let host = request.uri().authority().unwrap().to_string();
            let tcp = std::net::TcpStream::connect(&host).unwrap();
            tcp.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let (mut ws, _) = tungstenite::client(request, tcp)
                .unwrap_or_else(|e| panic!("WebSocket to {url}: {e}"));
            if let Some(data) = &stdin {
                let mut frame = vec![0u8];
                frame.extend_from_slice(data.as_bytes());
                ws.send(Message::Binary(frame.into())).unwrap();
            }
            let mut got = Session::default();
            let deadline = Instant::now() + LONG;
            while Instant::now() < deadline && !until(&got) {
                match ws.read() {
                    Ok(Message::Binary(b)) if !b.is_empty() => {
                        let text = String::from_utf8_lossy(&b[1..]).into_owned();
                        match b[0] {
                            1 => got.stdout.push_str(&text),
                            2 => got.stderr.push_str(&text),
                            3 => got.status.push_str(&text),
                            _ => {}
                        }
                    }
                    Ok(Message::Close(_)) => break,
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(
                        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                    ) => break,
                    Err(e) => panic!("reading the stream: {e}"),
                }
            }
            let _ = ws.close(None);
            got
        })
        .join()
        .unwrap()
    })
}

fn exec_and_attach(handler: &str) {
    let h = CriHarness::start();
    let sandbox = h.pod_config("streams", None);
    let pod = h.run_pod(&sandbox, handler);
    // A container reading its stdin, for Attach.
    let mut echo = busybox_container(
        &sandbox,
        "echo",
        "while read l; do echo \"got $l\"; done",
        0,
    );
    echo.stdin = true;
    let echo = h.create_and_start(&pod, &sandbox, echo);
    let shell = h.create_and_start(
        &pod,
        &sandbox,
        busybox_container(&sandbox, "shell", "exec sleep 3600", 0),
    );
    h.wait_container_state(&echo, ContainerState::ContainerRunning, LONG);
    h.wait_container_state(&shell, ContainerState::ContainerRunning, LONG);

    // Exec with stdout and stderr, and a non-zero exit.
    let url = h
        .cri()
        .block_on(
            h.cri().runtime_service().exec(ExecRequest {
                container_id: shell.clone(),
                cmd: ["sh", "-c", "echo out; echo err >&2; exit 3"]
                    .map(String::from)
                    .to_vec(),
                stdout: true,
                stderr: true,
                ..Default::default()
            }),
        )
        .unwrap_or_else(|e| panic!("Exec: {e}\n{}", h.log_tail()))
        .url;
    let s = stream(&h, &url, None, |_| false);
    assert_eq!(
        (s.stdout.as_str(), s.stderr.as_str()),
        ("out\n", "err\n"),
        "{s:?}"
    );
    assert!(
        s.status.contains("NonZeroExitCode") && s.status.contains("\"3\""),
        "{s:?}"
    );

    // Exec with stdin.
    let url = h
        .cri()
        .block_on(h.cri().runtime_service().exec(ExecRequest {
            container_id: shell.clone(),
            cmd: ["head", "-n", "1"].map(String::from).to_vec(),
            stdin: true,
            stdout: true,
            ..Default::default()
        }))
        .unwrap()
        .url;
    let s = stream(&h, &url, Some("line from stdin\n"), |_| false);
    assert_eq!(s.stdout, "line from stdin\n", "{s:?}");
    assert!(s.status.contains("Success"), "{s:?}");

    // Attach to the running container: what is written reaches its
    // stdin, what it prints comes back.
    let url = h
        .cri()
        .block_on(h.cri().runtime_service().attach(AttachRequest {
            container_id: echo.clone(),
            stdin: true,
            stdout: true,
            ..Default::default()
        }))
        .unwrap_or_else(|e| panic!("Attach: {e}\n{}", h.log_tail()))
        .url;
    let s = stream(&h, &url, Some("hello\n"), |s| s.stdout.contains('\n'));
    assert_eq!(s.stdout, "got hello\n", "{s:?}");

    h.stop_and_remove_pod(&pod);
    h.assert_clean();
}

#[test]
fn exec_and_attach_runc() {
    exec_and_attach(RUNC);
}

#[test]
fn exec_and_attach_capsid() {
    exec_and_attach(CAPSID);
}
