//! virtio-vsock served by capsid-vhost with the hybrid Unix-socket host
//! side, driven by the guest's vsock driver and a static guest tool.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use capsid_tests::qemu::Guest;
use capsid_tests::vhost::VhostDevice;
use capsid_tests::{artifact, initramfs, repo_root, vsock};
use sha2::{Digest, Sha256};

const GUEST_CID: &str = "3";

fn guest_tool() -> PathBuf {
    let p = repo_root().join("target/x86_64-unknown-linux-gnu/release/capsid-guest-tool");
    assert!(p.exists(), "{} missing: run `make guest-tool`", p.display());
    p
}

fn vsock_guest(dir: &Path, script: &str) -> (VhostDevice, Guest, PathBuf) {
    let uds = dir.join("vsock.sock");
    let dev = VhostDevice::spawn(
        &[
            "vsock",
            "--guest-cid",
            GUEST_CID,
            "--uds-path",
            uds.to_str().unwrap(),
        ],
        &dir.join("vhost-vsock.sock"),
    );
    let tool = guest_tool();
    let initrd = initramfs::build(dir, script, &[(&tool, "bin/capsid-guest-tool")]);
    let guest = Guest::new(&artifact("kernel/vmlinux"), &initrd)
        .args([
            "-chardev",
            &format!("socket,id=vs,path={}", dev.socket().display()),
        ])
        .args(["-device", "vhost-user-vsock-device,chardev=vs"]);
    (dev, guest, uds)
}

/// Deterministic bytes: a test can regenerate what it sent.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Sends `data` to the guest echo server and reads it all back at the same
/// time; returns (sha256 sent, sha256 received, bytes received).
fn echo_through(uds: &Path, port: u32, data: Vec<u8>) -> ([u8; 32], [u8; 32], usize) {
    let stream = vsock::connect(uds, port).expect("CONNECT to the guest echo server");
    let mut writer = stream.try_clone().unwrap();
    let sent: [u8; 32] = Sha256::digest(&data).into();
    let w = thread::spawn(move || {
        for chunk in data.chunks(256 * 1024) {
            writer.write_all(chunk).unwrap();
        }
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut reader = stream;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n;
    }
    w.join().unwrap();
    (sent, hasher.finalize().into(), total)
}

/// Waits for the guest echo server's "listening" call on the control port
/// and returns the control connection (closing it ends the guest).
fn wait_for_server(listener: &UnixListener) -> UnixStream {
    let (conn, _) = listener.accept().unwrap();
    let mut line = String::new();
    BufReader::new(conn.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "listening\n");
    conn
}

#[test]
fn guest_connects_to_host_and_host_echoes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut dev, guest, uds) = vsock_guest(
        dir.path(),
        "echo hello-from-guest | capsid-guest-tool vsock-connect 1234",
    );
    let listener = UnixListener::bind(format!("{}_1234", uds.display())).unwrap();
    let host = thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(conn.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        let mut conn = conn;
        conn.write_all(format!("host-echo: {line}").as_bytes())
            .unwrap();
        line
    });
    let run = guest.run_to_exit(Duration::from_secs(120));
    assert_eq!(
        initramfs::script_status(&run.serial),
        Some(0),
        "{}",
        run.serial
    );
    assert_eq!(host.join().unwrap(), "hello-from-guest\n");
    assert!(
        run.serial.contains("host-echo: hello-from-guest"),
        "{}",
        run.serial
    );
    assert_eq!(
        dev.wait_exit(Duration::from_secs(5)),
        Some(0),
        "{}",
        dev.stderr()
    );
    assert!(!uds.exists(), "vsock socket left behind");
}

#[test]
fn host_connects_to_guest_64mib_both_ways_and_32_concurrent() {
    let dir = tempfile::tempdir().unwrap();
    let (mut dev, guest, uds) =
        vsock_guest(dir.path(), "capsid-guest-tool vsock-echo-server 5000 1235");
    let control = UnixListener::bind(format!("{}_1235", uds.display())).unwrap();
    let uds_host = uds.clone();
    let host = thread::spawn(move || {
        let control_conn = wait_for_server(&control);

        let start = std::time::Instant::now();
        let (sent, got, n) = echo_through(&uds_host, 5000, pattern(1, 64 << 20));
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(n, 64 << 20, "echoed byte count");
        assert_eq!(sent, got, "64 MiB echo differs");
        eprintln!(
            "vsock echo: 64 MiB each way in {secs:.2} s ({:.1} MiB/s each way)",
            64.0 / secs
        );

        let workers: Vec<_> = (0..32)
            .map(|i| {
                let uds = uds_host.clone();
                thread::spawn(move || {
                    echo_through(&uds, 5000, pattern(100 + i, 256 * 1024 + i as usize))
                })
            })
            .collect();
        for (i, w) in workers.into_iter().enumerate() {
            let (sent, got, n) = w.join().unwrap();
            assert_eq!(n, 256 * 1024 + i, "connection {i} byte count");
            assert_eq!(sent, got, "connection {i} data differs");
        }
        drop(control_conn);
    });
    let run = guest.run_to_exit(Duration::from_secs(600));
    host.join().unwrap();
    assert_eq!(
        initramfs::script_status(&run.serial),
        Some(0),
        "{}",
        run.serial
    );
    assert_eq!(
        dev.wait_exit(Duration::from_secs(5)),
        Some(0),
        "{}",
        dev.stderr()
    );
}

#[test]
fn connect_to_a_port_nobody_listens_on_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, guest, uds) = vsock_guest(
        dir.path(),
        "capsid-guest-tool vsock-echo-server 5000 1235 &\n\
         echo x | capsid-guest-tool vsock-connect 4444; echo guest-connect-rc=$?\n\
         wait",
    );
    let control = UnixListener::bind(format!("{}_1235", uds.display())).unwrap();
    let uds_host = uds.clone();
    let host = thread::spawn(move || {
        let control_conn = wait_for_server(&control);
        // Nobody listens on guest port 6000: the CONNECT is answered by a reset.
        let refused = vsock::connect(&uds_host, 6000);
        assert!(refused.is_err(), "connect to a closed guest port succeeded");
        // A garbage CONNECT line closes the client, and the device lives on.
        let mut bad = UnixStream::connect(&uds_host).unwrap();
        bad.write_all(b"HELLO\n").unwrap();
        let mut rest = Vec::new();
        bad.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        let (sent, got, _) = echo_through(&uds_host, 5000, pattern(7, 4096));
        assert_eq!(sent, got);
        drop(control_conn);
    });
    let run = guest.run_to_exit(Duration::from_secs(120));
    host.join().unwrap();
    assert!(run.serial.contains("guest-connect-rc=1"), "{}", run.serial);
    assert_eq!(
        initramfs::script_status(&run.serial),
        Some(0),
        "{}",
        run.serial
    );
}

#[test]
fn bad_arguments_are_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        capsid_tests::run(
            std::process::Command::new(capsid_tests::bin("capsid-vhost"))
                .args(args)
                .current_dir(dir.path()),
        )
    };
    let (code, _, err) = run(&[
        "vsock",
        "--socket",
        "v.sock",
        "--guest-cid",
        "2",
        "--uds-path",
        "u.sock",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("guest CID 2 is reserved"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let (code, _, err) = run(&[
        "vsock",
        "--socket",
        "v.sock",
        "--guest-cid",
        "3",
        "--uds-path",
        "/nonexistent/dir/u.sock",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/dir/u.sock"), "{err}");
    let (code, _, err) = run(&["frobnicate", "--socket", "x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("frobnicate"), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "files left behind"
    );
}
