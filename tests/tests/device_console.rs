//! `capsid-vhost console`, QEMU's serial console sink: a guest printing
//! 1 GiB leaves at most two capped generations on the host, the newest
//! output last, and the sink ends cleanly when QEMU goes.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capsid_tests::bin;

#[test]
fn a_gibibyte_of_console_output_stays_under_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("console.sock");
    let log = dir.path().join("console.log");
    let mut sink = Command::new(bin("capsid-vhost"))
        .args(["console", "--max-bytes", "65536", "--socket"])
        .arg(&socket)
        .arg("--log")
        .arg(&log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !socket.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut qemu = UnixStream::connect(&socket).unwrap();
    let line = b"a guest that prints forever .................................\n";
    let chunk: Vec<u8> = line.iter().copied().cycle().take(1 << 20).collect();
    for _ in 0..1024 {
        qemu.write_all(&chunk).unwrap();
    }
    qemu.write_all(b"\nthe last words\n").unwrap();
    drop(qemu);
    let status = sink.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let current = std::fs::read(&log).unwrap();
    let previous = std::fs::read(dir.path().join("console.log.1")).unwrap();
    assert!(current.len() <= 65536, "{}", current.len());
    assert!(previous.len() <= 65536, "{}", previous.len());
    assert!(current.ends_with(b"the last words\n"));
    let files = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(files, 2, "the log, its previous generation, no socket");
    eprintln!("1 GiB of console output in {:?}", start.elapsed());
}
