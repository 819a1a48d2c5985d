//! virtio-net served by capsid-vhost on a tap in a private network
//! namespace, driven by a Linux guest under QEMU-TCG: ping both ways, then
//! 16 MiB over TCP from the guest to a listener in the namespace, and the
//! same bytes back.
//!
//! All traffic stays between the guest and its namespace (10.203.0.0/24);
//! the namespace, its tap and every process are removed on every path.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capsid_tests::qemu::Guest;
use capsid_tests::vhost::VhostDevice;
use capsid_tests::{artifact, initramfs};

const HOST_IP: &str = "10.203.0.1";
const GUEST_IP: &str = "10.203.0.2";
const TAP: &str = "capt0";
const BLOB_BYTES: u64 = 16 * 1024 * 1024;
const DATA_PORT: u16 = 5001;
const GO_PORT: u16 = 5002;
const BACK_PORT: u16 = 5003;
const BUSYBOX: &str = "/bin/busybox";

/// A network namespace of this test; deleted (with its tap) on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("capsid-{tag}-{}", std::process::id());
        let (code, _, err) = capsid_tests::run(Command::new("ip").args(["netns", "add", &name]));
        assert_eq!(code, 0, "ip netns add {name}: {err}");
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> <args…>`, which must succeed.
    fn ip(&self, args: &[&str]) {
        let (code, out, err) =
            capsid_tests::run(Command::new("ip").args(["-n", &self.name]).args(args));
        assert_eq!(code, 0, "ip -n {} {args:?}: {out}{err}", self.name);
    }

    /// A command run inside the namespace.
    fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// A tap named [`TAP`] with [`HOST_IP`]/24, up.
    fn add_tap(&self) {
        self.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]);
        self.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
        self.ip(&["link", "set", TAP, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["-n", &self.name, "link", "del", TAP])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Killed {
    /// Waits up to `timeout` for the process to exit; its exit code.
    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status.code();
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Waits for `marker` on the serial console; panics on `NET-FAIL`, QEMU
/// exiting or the deadline.
fn wait_serial(serial: &Path, qemu: &mut Killed, marker: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        if text.contains(marker) {
            return text;
        }
        assert!(!text.contains("NET-FAIL"), "guest failed:\n{text}");
        if let Some(status) = qemu.0.try_wait().unwrap() {
            panic!("QEMU exited ({status}) before {marker:?}:\n{text}");
        }
        assert!(
            start.elapsed() < timeout,
            "no {marker:?} after {timeout:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether something listens on TCP `port` inside `ns`.
fn listening(ns: &Netns, port: u16) -> bool {
    // busybox nc listens on :: when the kernel has IPv6.
    let out = ns
        .exec("cat")
        .args(["/proc/net/tcp", "/proc/net/tcp6"])
        .output()
        .unwrap();
    let local = format!(":{port:04X}");
    String::from_utf8_lossy(&out.stdout).lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&local) && f[3] == "0A"
    })
}

/// Sends `file` to the guest's TCP `port` with busybox nc from the
/// namespace, trying again while the guest is not listening yet (it prints
/// its marker a moment before its `nc -l` listens). Returns when the
/// successful attempt started; the guest has everything when it returns.
fn send_to_guest(ns: &Netns, port: u16, file: &Path) -> Instant {
    let first = Instant::now();
    loop {
        let attempt = Instant::now();
        let mut nc = Killed(
            ns.exec(BUSYBOX)
                .args(["nc", GUEST_IP, &port.to_string()])
                .stdin(File::open(file).unwrap())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        if nc.wait_exit(Duration::from_secs(300)) == Some(0) {
            return attempt;
        }
        assert!(
            first.elapsed() < Duration::from_secs(60),
            "the guest never accepted on port {port}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn guest_script() -> String {
    format!(
        "ip link set lo up\n\
         ip link set eth0 up\n\
         ip addr add {GUEST_IP}/24 dev eth0\n\
         n=0\n\
         until ping -c 1 -W 2 {HOST_IP} >/dev/null 2>&1; do\n\
           n=$((n+1)); [ $n -lt 15 ] || {{ echo NET-FAIL guest ping; exit 1; }}\n\
         done\n\
         echo GUEST-PING-OK\n\
         head -c {BLOB_BYTES} /dev/urandom > /tmp/blob\n\
         echo \"GUEST-SHA $(sha256sum /tmp/blob)\"\n\
         echo NET-READY\n\
         nc -l -p {GO_PORT} > /tmp/go || {{ echo NET-FAIL go; exit 1; }}\n\
         echo \"GO $(cat /tmp/go)\"\n\
         nc {HOST_IP} {DATA_PORT} < /tmp/blob\n\
         rc=$?\n\
         echo \"SENT rc=$rc\"\n\
         [ $rc = 0 ] || exit $rc\n\
         nc -l -p {BACK_PORT} > /tmp/back || {{ echo NET-FAIL back; exit 1; }}\n\
         echo \"BACK-SHA $(sha256sum < /tmp/back)\""
    )
}

#[test]
fn guest_pings_and_streams_tcp_over_a_tap() {
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("net");
    ns.add_tap();
    let mut dev = VhostDevice::spawn_in_netns(
        &ns.name,
        &["net", "--tap", TAP, "--mac", "52:54:00:12:34:56"],
        &dir.path().join("net.sock"),
    );
    let initrd = initramfs::build(dir.path(), &guest_script(), &[]);
    let serial = dir.path().join("serial.log");
    let guest = Guest::new(&artifact("kernel/vmlinux"), &initrd)
        .args([
            "-chardev",
            &format!("socket,id=n0,path={}", dev.socket().display()),
        ])
        .args(["-netdev", "vhost-user,id=net0,chardev=n0"])
        .args([
            "-device",
            "virtio-net-device,netdev=net0,mac=52:54:00:12:34:56",
        ]);
    let mut qemu = Killed(guest.spawn(&serial));

    // (a) The guest reached the host; now the host pings the guest while
    // it waits for the go-ahead.
    let text = wait_serial(&serial, &mut qemu, "NET-READY", Duration::from_secs(300));
    assert!(text.contains("GUEST-PING-OK"), "{text}");
    let guest_sha = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("GUEST-SHA "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no GUEST-SHA line:\n{text}"))
        .to_string();
    // Three echo requests, one at a time, each waiting long enough for a
    // TCG guest on a busy host (busybox gives up on a late reply after
    // 2 RTT once the last request of a series is out).
    for seq in 0..3 {
        let out = ns
            .exec(BUSYBOX)
            .args(["ping", "-c", "1", "-W", "20", GUEST_IP])
            .output()
            .unwrap();
        let ping = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && ping.contains("1 packets received"),
            "host → guest ping {seq}:\n{ping}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // (b) A listener in the namespace, then the go-ahead: the guest sends.
    // Its stdin stays open: busybox nc half-closes the connection when its
    // stdin ends, and the guest's nc stops at that.
    let received = dir.path().join("received");
    let mut listener = Killed(
        ns.exec(BUSYBOX)
            .args(["nc", "-l", "-p", &DATA_PORT.to_string()])
            .stdin(Stdio::piped())
            .stdout(File::create(&received).unwrap())
            .spawn()
            .unwrap(),
    );
    let _listener_stdin = listener.0.stdin.take();
    let start = Instant::now();
    while !listening(&ns, DATA_PORT) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "listener never listened"
        );
        assert!(listener.0.try_wait().unwrap().is_none(), "listener exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let go = dir.path().join("go");
    std::fs::write(&go, "go\n").unwrap();
    send_to_guest(&ns, GO_PORT, &go);
    let started = Instant::now();
    let listener_rc = listener.wait_exit(Duration::from_secs(600));
    let up = started.elapsed();
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    assert_eq!(listener_rc, Some(0), "listener did not finish:\n{text}");
    let got = std::fs::metadata(&received).unwrap().len();
    assert_eq!(got, BLOB_BYTES, "received {got} bytes:\n{text}");
    let (code, sum, _) = capsid_tests::run(Command::new("sha256sum").arg(&received));
    assert_eq!(code, 0);
    assert_eq!(sum.split_whitespace().next(), Some(guest_sha.as_str()));

    // The same bytes back to the guest: the receive path at volume,
    // including running out of receive buffers.
    let down = send_to_guest(&ns, BACK_PORT, &received).elapsed();
    let qemu_rc = qemu.wait_exit(Duration::from_secs(300));
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    assert_eq!(qemu_rc, Some(0), "QEMU did not exit:\n{text}");
    assert!(text.contains("GO go"), "{text}");
    assert_eq!(initramfs::script_status(&text), Some(0), "{text}");
    let back_sha = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("BACK-SHA "))
        .and_then(|l| l.split_whitespace().next());
    assert_eq!(back_sha, Some(guest_sha.as_str()), "{text}");

    let mib = BLOB_BYTES as f64 / (1024.0 * 1024.0);
    for (way, t) in [("guest → host", up), ("host → guest", down)] {
        eprintln!(
            "{way} TCP: {mib:.0} MiB in {:.2} s = {:.1} MiB/s (QEMU-TCG)",
            t.as_secs_f64(),
            mib / t.as_secs_f64()
        );
    }

    // The device process ends by itself once QEMU is gone.
    assert_eq!(
        dev.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        dev.stderr()
    );
    assert!(!dev.socket().exists(), "socket left behind");
}

#[test]
fn missing_tap_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let (code, _, stderr) = capsid_tests::run(
        Command::new(capsid_tests::bin("capsid-vhost"))
            .args(["net", "--tap", "doesnotexist", "--socket"])
            .arg(&sock),
    );
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("\"doesnotexist\""), "{stderr}");
    assert!(!sock.exists(), "socket left behind");
}

#[test]
fn interface_that_is_not_a_tap_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let ns = Netns::new("nontap");
    let out = ns
        .exec(capsid_tests::bin("capsid-vhost").to_str().unwrap())
        .args(["net", "--tap", "lo", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot attach to \"lo\""), "{stderr}");
    assert!(!sock.exists(), "socket left behind");
}

#[test]
fn invalid_mac_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let (code, _, stderr) = capsid_tests::run(
        Command::new(capsid_tests::bin("capsid-vhost"))
            .args([
                "net",
                "--tap",
                "capt0",
                "--mac",
                "01:00:5e:00:00:01",
                "--socket",
            ])
            .arg(&sock),
    );
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("unicast"), "{stderr}");
    assert!(!sock.exists(), "socket left behind");
}
