//! Fuzzes the host's balloon client on what the VMM sends back: the input
//! is the byte stream a fake QEMU writes on its QMP socket (greeting,
//! events, answers: JSON, one per line), or a fake capsid-vmm on its
//! control socket, while the host sets a balloon target or reads the
//! balloon's state and the guest's statistics and sanitizes them. Nothing
//! may panic, whatever the VMM says, and what the host makes of it must be
//! within the VM's memory.

#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::OnceLock;

use capsid_sandbox::balloon::qmp::parse_guest_stats;
use capsid_sandbox::balloon::{BalloonEndpoint, BalloonHandle};
use libfuzzer_sys::fuzz_target;

/// The fake VMM's socket, bound once per process.
struct Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
    listener: UnixListener,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        // SAFETY: ignoring SIGPIPE changes no memory; the host's writes may
        // meet a VMM that has hung up, as under Rust's runtime, which
        // ignores SIGPIPE too.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let dir = tempfile::tempdir().expect("socket directory");
        let path = dir.path().join("vmm.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        Server {
            _dir: dir,
            path,
            listener,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, reply)) = data.split_first() else {
        return;
    };
    let server = server();
    let reply = reply.to_vec();
    // One connection per run: the VMM says its piece, hangs up its side,
    // and reads what the host asked until the host is done.
    let vmm = std::thread::spawn(move || {
        let (mut conn, _) = server.listener.accept().expect("accept");
        let _ = conn.write_all(&reply);
        let _ = conn.shutdown(Shutdown::Write);
        let mut sink = [0u8; 1024];
        while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
    });

    let socket = server.path.clone();
    let endpoint = if control & 1 == 0 {
        BalloonEndpoint::Qmp { socket }
    } else {
        BalloonEndpoint::CapsidVmm { socket }
    };
    // A VM of 1 to 256 MiB.
    let assigned_mib = u32::from(control >> 2) * 4 + 1;
    let handle = BalloonHandle::new(endpoint, assigned_mib);
    if control & 2 == 0 {
        if let Ok(status) = handle.status() {
            assert!(status.target_mib <= assigned_mib, "{status:?}");
            assert!(status.actual_mib <= assigned_mib, "{status:?}");
            let s = status.stats;
            if s.valid {
                assert!(s.total_mib <= u64::from(assigned_mib), "{status:?}");
                assert!(s.reclaimable_mib() <= s.total_mib, "{status:?}");
            } else {
                assert_eq!(s.reclaimable_mib(), 0, "{status:?}");
            }
        }
    } else {
        let _ = handle.set_target(u64::from(assigned_mib / 2));
    }
    vmm.join().expect("fake VMM");

    // QEMU's statistics as the host reads them, from every line that is
    // JSON, whatever command it answers.
    for line in data[1..].split(|&b| b == b'\n') {
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(line) {
            let _ = parse_guest_stats(&value);
            if let Some(ret) = value.get("return") {
                let _ = parse_guest_stats(ret);
            }
        }
    }
});
