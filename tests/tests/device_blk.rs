//! virtio-blk served by capsid-vhost, driven by the guest's virtio_blk
//! driver under QEMU microvm (TCG) through `-device vhost-user-blk`.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use capsid_tests::qemu::{Guest, GuestRun};
use capsid_tests::vhost::VhostDevice;
use capsid_tests::{artifact, initramfs};

const MIB: usize = 1024 * 1024;

/// Writes `len` random bytes to `path`.
fn random_image(path: &Path, len: usize) {
    let mut data = Vec::with_capacity(len);
    File::open("/dev/urandom")
        .unwrap()
        .take(len as u64)
        .read_to_end(&mut data)
        .unwrap();
    std::fs::write(path, data).unwrap();
}

/// The host's sha256 of a file, in hex.
fn host_sha256(path: &Path) -> String {
    let (code, out, err) = capsid_tests::run(Command::new("sha256sum").arg(path));
    assert_eq!(code, 0, "{err}");
    out.split_whitespace().next().unwrap().to_string()
}

/// The value printed on the console as `key=value`.
fn console_value<'a>(serial: &'a str, key: &str) -> Option<&'a str> {
    serial
        .lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
}

/// Boots a guest with `blk` as its disk, running `script`.
fn boot(dir: &Path, blk: &VhostDevice, script: &str) -> GuestRun {
    let initrd = initramfs::build(dir, script, &[]);
    Guest::new(&artifact("kernel/vmlinux"), &initrd)
        .args([
            "-chardev",
            &format!("socket,id=blk0,path={}", blk.socket().display()),
        ])
        .args(["-device", "vhost-user-blk,chardev=blk0"])
        .run_to_exit(Duration::from_secs(300))
}

/// The device process ends by itself once QEMU is gone, and takes its
/// socket with it.
fn assert_device_gone(blk: &mut VhostDevice) {
    assert_eq!(
        blk.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        blk.stderr()
    );
    assert!(!blk.socket().exists(), "socket left behind");
}

fn spawn(image: &Path, socket: PathBuf, extra: &[&str]) -> VhostDevice {
    let mut args = vec!["blk", "--path", image.to_str().unwrap()];
    args.extend_from_slice(extra);
    VhostDevice::spawn(&args, &socket)
}

#[test]
fn guest_reads_disk_matching_host_hash() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    random_image(&image, 64 * MIB);
    let want = host_sha256(&image);
    let mut blk = spawn(
        &image,
        dir.path().join("blk.sock"),
        &["--serial", "capsid-test-disk"],
    );
    let run = boot(
        dir.path(),
        &blk,
        "echo sectors=$(cat /sys/block/vda/size)\n\
         echo id=$(cat /sys/block/vda/serial)\n\
         echo sha=$(sha256sum /dev/vda | cut -d' ' -f1)",
    );
    assert_eq!(
        initramfs::script_status(&run.serial),
        Some(0),
        "{}",
        run.serial
    );
    assert_eq!(
        console_value(&run.serial, "sectors"),
        Some("131072"),
        "{}",
        run.serial
    );
    assert_eq!(
        console_value(&run.serial, "id"),
        Some("capsid-test-disk"),
        "{}",
        run.serial
    );
    assert_eq!(
        console_value(&run.serial, "sha"),
        Some(want.as_str()),
        "{}",
        run.serial
    );
    assert_device_gone(&mut blk);
    assert_eq!(host_sha256(&image), want, "reading changed the image");
}

#[test]
fn guest_write_reaches_host_file() {
    const SEEK_BLOCKS: usize = 100;
    const DISCARD_AT: usize = 2 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    random_image(&image, 4 * MIB);
    let before = std::fs::read(&image).unwrap();
    let mut blk = spawn(&image, dir.path().join("blk.sock"), &[]);
    let run = boot(
        dir.path(),
        &blk,
        &format!(
            "yes capsid-blk-write | head -c 65536 > /tmp/p\n\
             dd if=/tmp/p of=/dev/vda bs=4096 seek={SEEK_BLOCKS} conv=fsync\n\
             echo dd_rc=$?\n\
             blkdiscard -o {DISCARD_AT} -l {MIB} /dev/vda\n\
             echo discard_rc=$?"
        ),
    );
    assert_eq!(
        initramfs::script_status(&run.serial),
        Some(0),
        "{}",
        run.serial
    );
    assert_eq!(
        console_value(&run.serial, "dd_rc"),
        Some("0"),
        "{}",
        run.serial
    );
    assert_eq!(
        console_value(&run.serial, "discard_rc"),
        Some("0"),
        "{}",
        run.serial
    );
    assert_device_gone(&mut blk);

    let after = std::fs::read(&image).unwrap();
    assert_eq!(after.len(), before.len());
    let at = SEEK_BLOCKS * 4096;
    let pattern: Vec<u8> = b"capsid-blk-write\n"
        .iter()
        .copied()
        .cycle()
        .take(65536)
        .collect();
    assert!(after[at..at + 65536] == pattern[..], "pattern not on disk");
    assert!(
        after[..at] == before[..at],
        "bytes before the write changed"
    );
    assert!(
        after[at + 65536..DISCARD_AT] == before[at + 65536..DISCARD_AT],
        "bytes after the write changed"
    );
    // The host file system punches the hole, so the range reads as zeroes.
    assert!(
        after[DISCARD_AT..DISCARD_AT + MIB].iter().all(|&b| b == 0),
        "discarded range not deallocated"
    );
    assert!(after[DISCARD_AT + MIB..] == before[DISCARD_AT + MIB..]);
}

#[test]
fn readonly_disk_refuses_guest_writes() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    random_image(&image, 4 * MIB);
    let want = host_sha256(&image);
    let mut blk = spawn(&image, dir.path().join("blk.sock"), &["--readonly"]);
    let run = boot(
        dir.path(),
        &blk,
        "echo ro=$(cat /sys/block/vda/ro)\n\
         yes capsid | head -c 4096 > /tmp/p\n\
         dd if=/tmp/p of=/dev/vda bs=4096 count=1 conv=fsync 2> /tmp/err\n\
         echo dd_rc=$?\n\
         echo dd_err=$(cat /tmp/err)\n\
         echo sha=$(sha256sum /dev/vda | cut -d' ' -f1)",
    );
    assert_eq!(
        initramfs::script_status(&run.serial),
        Some(0),
        "{}",
        run.serial
    );
    // The kernel took VIRTIO_BLK_F_RO and marked the disk read-only ...
    assert_eq!(
        console_value(&run.serial, "ro"),
        Some("1"),
        "{}",
        run.serial
    );
    // ... so the write fails before it reaches the device.
    assert_ne!(
        console_value(&run.serial, "dd_rc"),
        Some("0"),
        "{}",
        run.serial
    );
    let err = console_value(&run.serial, "dd_err").unwrap_or_default();
    assert!(
        ["not permitted", "Read-only", "I/O error"]
            .iter()
            .any(|m| err.contains(m)),
        "unexpected dd error: {err}\n{}",
        run.serial
    );
    // Reads still work and see the untouched image.
    assert_eq!(
        console_value(&run.serial, "sha"),
        Some(want.as_str()),
        "{}",
        run.serial
    );
    assert_device_gone(&mut blk);
    assert_eq!(host_sha256(&image), want, "read-only image changed");
}

/// Runs capsid-vhost to completion: (exit code, stderr).
fn run_vhost(args: &[&str]) -> (i32, String) {
    let (code, _, stderr) =
        capsid_tests::run(Command::new(capsid_tests::bin("capsid-vhost")).args(args));
    (code, stderr)
}

#[test]
fn missing_backing_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let missing = dir.path().join("no-such-disk.img");
    let (code, stderr) = run_vhost(&[
        "blk",
        "--socket",
        sock.to_str().unwrap(),
        "--path",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no-such-disk.img"), "{stderr}");
    assert!(stderr.contains("No such file"), "{stderr}");
    assert!(!sock.exists(), "socket left behind");
}

#[test]
fn overlong_serial_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let image = dir.path().join("disk.img");
    std::fs::write(&image, [0u8; 4096]).unwrap();
    let (code, stderr) = run_vhost(&[
        "blk",
        "--socket",
        sock.to_str().unwrap(),
        "--path",
        image.to_str().unwrap(),
        "--serial",
        "an-id-longer-than-twenty-bytes",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("serial"), "{stderr}");
    assert!(!sock.exists(), "socket left behind");
}

#[test]
fn socket_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let image = dir.path().join("disk.img");
    std::fs::write(&image, [0u8; 4096]).unwrap();
    let _first = spawn(&image, sock.clone(), &[]);
    let (code, stderr) = run_vhost(&[
        "blk",
        "--socket",
        sock.to_str().unwrap(),
        "--path",
        image.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
    assert!(stderr.contains("blk.sock"), "{stderr}");
}

/// Sequential read throughput of the guest (not a pass/fail test):
/// `cargo test -p capsid-tests --test device_blk -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark; prints MiB/s"]
fn sequential_read_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    random_image(&image, 256 * MIB);
    let mut blk = spawn(&image, dir.path().join("blk.sock"), &["--readonly"]);
    let run = boot(
        dir.path(),
        &blk,
        "time dd if=/dev/vda of=/dev/null bs=1M 2>&1\n\
         time dd if=/dev/vda of=/dev/null bs=1M iflag=direct 2>&1",
    );
    println!("{}", run.serial);
    assert_eq!(
        initramfs::script_status(&run.serial),
        Some(0),
        "{}",
        run.serial
    );
    // busybox time: "real\t0m 1.23s".
    let seconds: Vec<f64> = run
        .serial
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "real").then_some(())?;
            let min: f64 = words.next()?.strip_suffix('m')?.parse().ok()?;
            let sec: f64 = words.next()?.strip_suffix('s')?.parse().ok()?;
            Some(min * 60.0 + sec)
        })
        .collect();
    assert_eq!(seconds.len(), 2, "{}", run.serial);
    println!(
        "sequential read of 256 MiB: {:.0} MiB/s through the page cache, {:.0} MiB/s with O_DIRECT",
        256.0 / seconds[0],
        256.0 / seconds[1]
    );
    assert_device_gone(&mut blk);
}
