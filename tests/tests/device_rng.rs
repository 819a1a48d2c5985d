//! virtio-rng served by capsid-vhost, driven by the guest's hw_random driver.

use std::time::Duration;

use capsid_tests::qemu::Guest;
use capsid_tests::vhost::VhostDevice;
use capsid_tests::{artifact, initramfs};

#[test]
fn guest_reads_hwrng() {
    let dir = tempfile::tempdir().unwrap();
    let rng = VhostDevice::spawn(&["rng"], &dir.path().join("rng.sock"));
    let initrd = initramfs::build(
        dir.path(),
        "cat /sys/class/misc/hw_random/rng_current\n\
         head -c 4096 /dev/hwrng > /tmp/r\n\
         echo bytes=$(wc -c < /tmp/r)\n\
         echo distinct=$(od -A n -t x1 -v /tmp/r | tr ' ' '\\n' | grep . | sort -u | wc -l)",
        &[],
    );
    let mut rng = rng;
    let run = Guest::new(&artifact("kernel/vmlinux"), &initrd)
        .args([
            "-chardev",
            &format!("socket,id=rng,path={}", rng.socket().display()),
        ])
        .args(["-device", "vhost-user-rng,chardev=rng"])
        .run_to_exit(Duration::from_secs(90));
    assert_eq!(
        initramfs::script_status(&run.serial),
        Some(0),
        "{}",
        run.serial
    );
    assert!(run.serial.contains("virtio_rng"), "{}", run.serial);
    assert!(run.serial.contains("bytes=4096"), "{}", run.serial);
    // 4 KiB of real randomness covers (nearly) every byte value.
    let distinct: u32 = run
        .serial
        .lines()
        .find_map(|l| l.strip_prefix("distinct="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    assert!(
        distinct > 200,
        "only {distinct} distinct byte values:\n{}",
        run.serial
    );
    // The device process ends by itself once QEMU is gone.
    assert_eq!(
        rng.wait_exit(Duration::from_secs(5)),
        Some(0),
        "{}",
        rng.stderr()
    );
    assert!(!rng.socket().exists(), "socket left behind");
}

#[test]
fn socket_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("rng.sock");
    let mut first = VhostDevice::spawn(&["rng"], &sock);
    let (code, _, stderr) = capsid_tests::run(
        std::process::Command::new(capsid_tests::bin("capsid-vhost"))
            .args(["rng", "--socket"])
            .arg(&sock),
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("in use"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // The refused second process did not disturb the first.
    assert_eq!(
        first.wait_exit(Duration::from_millis(300)),
        None,
        "first device exited"
    );
    assert!(sock.exists());
}
