//! Host directories and files in the container through virtio-fs
//! (virtiofsd), with `capsid run -v` on QEMU-TCG: read-write, read-only and
//! single-file volumes, escapes that must fail, Kubernetes' volume shapes,
//! data safety, bad input. Every test ends with nothing left on the host.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capsid_tests::cli::{stderr, stdout, Capsid};
use sha2::{Digest, Sha256};

/// A mount the test made, unmounted when dropped (a failing test too).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn vol(host: &Path, guest: &str) -> String {
    format!("{}:{guest}", host.display())
}

fn mkdir(p: &Path) -> PathBuf {
    std::fs::create_dir_all(p).unwrap();
    p.to_path_buf()
}

/// virtiofsd processes whose command line names `marker`.
fn virtiofsd_of(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let program = cmdline.split(' ').next().unwrap_or_default();
        if program.ends_with("/virtiofsd") && cmdline.contains(marker) {
            found.push(cmdline);
        }
    }
    found
}

/// `capsid run` in the background, stdout piped, read line by line.
struct Background {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Background {
    fn spawn(c: &Capsid, args: &[&str]) -> Self {
        let mut child = c
            .run_cmd(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, lines }
    }

    /// The next line of the container's output.
    fn line(&mut self) -> String {
        match self.lines.next() {
            Some(Ok(l)) => l,
            other => {
                let _ = self.child.kill();
                let out = self.child.wait_with_output_stderr();
                panic!("container output ended ({other:?}): {out}");
            }
        }
    }

    fn wait(mut self) -> (i32, String) {
        let rest: Vec<String> = self.lines.by_ref().map_while(Result::ok).collect();
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        (
            status.code().unwrap_or(-1),
            format!("{}\n{err}", rest.join("\n")),
        )
    }
}

trait StderrText {
    fn wait_with_output_stderr(&mut self) -> String;
}

impl StderrText for Child {
    fn wait_with_output_stderr(&mut self) -> String {
        let _ = self.wait();
        let mut err = String::new();
        if let Some(mut e) = self.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        err
    }
}

#[test]
fn read_write_read_only_and_single_file_volumes() {
    let c = Capsid::new();
    let data = mkdir(&c.dir.path().join("data"));
    std::fs::write(data.join("in.txt"), "from the host\n").unwrap();
    let conf = mkdir(&c.dir.path().join("conf"));
    std::fs::write(conf.join("app.conf"), "setting=1\n").unwrap();
    let token = c.dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let script = "cat /data/in.txt; cat /etc/app/app.conf; cat /var/run/token; \
        echo from-guest > /data/out.txt; mkdir -p /data/sub/deeper && echo deep > /data/sub/deeper/f; \
        echo x > /etc/app/new 2>&1 || echo conf-write-refused; \
        echo x >> /var/run/token 2>&1 || echo token-write-refused; \
        touch /etc/app/app.conf 2>/dev/null || echo touch-refused; \
        grep -E ' /(data|etc/app|var/run/token) ' /proc/mounts | cut -d' ' -f2-4";
    let o = c.run(
        &[
            "-v",
            &vol(&data, "/data"),
            "-v",
            &format!("{}:ro", vol(&conf, "/etc/app")),
            "-v",
            &format!("{}:ro", vol(&token, "/var/run/token")),
            "busybox",
            "--",
            "sh",
            "-c",
            script,
        ],
        None,
    );
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        &lines[..3],
        ["from the host", "setting=1", "s3cret"],
        "{out}"
    );
    assert!(out.contains("conf-write-refused"), "{out}");
    assert!(out.contains("token-write-refused"), "{out}");
    assert!(out.contains("touch-refused"), "{out}");
    // The shell says why (EROFS) on the container's stderr.
    assert!(
        stderr(&o).contains("Read-only file system"),
        "{}",
        stderr(&o)
    );
    assert!(out.contains("/data virtiofs rw"), "{out}");
    assert!(out.contains("/etc/app virtiofs ro"), "{out}");
    assert!(out.contains("/var/run/token virtiofs ro"), "{out}");
    // What the container wrote is on the host once it exited.
    assert_eq!(
        std::fs::read_to_string(data.join("out.txt")).unwrap(),
        "from-guest\n"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("sub/deeper/f")).unwrap(),
        "deep\n"
    );
    assert!(!conf.join("new").exists());
    assert_eq!(std::fs::read_to_string(&token).unwrap(), "s3cret\n");
    c.assert_no_leftovers();
}

#[test]
fn a_container_without_volumes_gets_no_virtiofsd_and_one_with_gets_one() {
    let c = Capsid::new();
    let marker = c.dir.path().display().to_string();
    let mut bg = Background::spawn(
        &c,
        &[
            "busybox",
            "--",
            "sh",
            "-c",
            "grep -c virtiofs /proc/mounts; echo up; sleep 60",
        ],
    );
    assert_eq!(bg.line(), "0");
    assert_eq!(bg.line(), "up");
    assert!(
        virtiofsd_of(&marker).is_empty(),
        "{:?}",
        virtiofsd_of(&marker)
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(bg.child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = bg.wait();
    // A killed `capsid run` is cleaned up by the next one.
    let data = mkdir(&c.dir.path().join("data"));
    let mut bg = Background::spawn(
        &c,
        &[
            "-v",
            &vol(&data, "/data"),
            "busybox",
            "--",
            "sh",
            "-c",
            "echo up; sleep 60",
        ],
    );
    assert_eq!(bg.line(), "up");
    // virtiofsd forks into its sandbox: a parent waits for the child.
    let daemons = virtiofsd_of(&marker);
    assert!(!daemons.is_empty() && daemons.len() <= 2, "{daemons:?}");
    let share = format!("--shared-dir {marker}/run/.shares/");
    assert!(
        daemons
            .iter()
            .all(|d| d.contains("--sandbox namespace") && d.contains(&share)),
        "{daemons:?}"
    );
    // Killed outright: the next run takes its share down from the record.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(bg.child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = bg.wait();
    let shares = c.dir.path().join("run/.shares");
    assert_eq!(
        std::fs::read_dir(&shares).unwrap().count(),
        1,
        "the killed run's share"
    );
    let o = c.run(&["--", "true"], None);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    c.assert_no_leftovers();
}

#[test]
fn symlinks_and_dot_dot_cannot_reach_outside_the_volume() {
    let c = Capsid::new();
    let outside = c.dir.path().join("outside-secret");
    std::fs::write(&outside, "HOST-SECRET\n").unwrap();
    let data = mkdir(&c.dir.path().join("data"));
    symlink(&outside, data.join("abs")).unwrap();
    symlink("../outside-secret", data.join("rel")).unwrap();
    symlink("/", data.join("root")).unwrap();
    mkdir(&data.join("d"));
    std::fs::write(data.join("d/inside"), "inside\n").unwrap();
    // While the guest reads, the host swaps `d` with a symlink out and back.
    let swapper = {
        let data = data.clone();
        let outside_dir = c.dir.path().to_path_buf();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let t = std::thread::spawn(move || {
            let mut swaps = 0u32;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::rename(data.join("d"), data.join("d.real"));
                let _ = symlink(&outside_dir, data.join("d"));
                std::thread::sleep(Duration::from_millis(2));
                let _ = std::fs::remove_file(data.join("d"));
                let _ = std::fs::rename(data.join("d.real"), data.join("d"));
                std::thread::sleep(Duration::from_millis(2));
                swaps += 1;
            }
            swaps
        });
        (stop, t)
    };
    let script = "cat /data/abs /data/rel /data/root/outside-secret 2>&1; \
        ls /data/root/ | head -50; cat /data/../outside-secret 2>&1; \
        i=0; while [ $i -lt 300 ]; do cat /data/d/outside-secret /data/d/inside 2>/dev/null; i=$((i+1)); done; \
        echo done";
    let o = c.run(
        &[
            "-v",
            &vol(&data, "/data"),
            "busybox",
            "--",
            "sh",
            "-c",
            script,
        ],
        None,
    );
    swapper.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.1.join().unwrap();
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    assert!(out.ends_with("done\n"), "{out}");
    assert!(swaps > 10, "the host swapped only {swaps} times");
    // Symlinks resolve in the guest: no host path outside the share is
    // ever read, whatever the link says or however the host races it.
    assert!(!out.contains("HOST-SECRET"), "{out}");
    assert!(out.contains("inside"), "{out}");
    // `/data/root` is the guest's own root.
    assert!(out.contains("bin"), "{out}");
    assert!(outside.exists());
    c.assert_no_leftovers();
}

#[test]
fn kubernetes_volume_shapes() {
    let c = Capsid::new();
    // configMap as the kubelet writes it: a timestamped dir, `..data`
    // pointing at it, and each key a symlink through `..data`.
    let cm = mkdir(
        &c.dir
            .path()
            .join("pods/uid1/volumes/kubernetes.io~configmap/cfg"),
    );
    mkdir(&cm.join("..2026_12_06_01_00_00.1"));
    std::fs::write(cm.join("..2026_12_06_01_00_00.1/key"), "v1").unwrap();
    symlink("..2026_12_06_01_00_00.1", cm.join("..data")).unwrap();
    symlink("..data/key", cm.join("key")).unwrap();
    // emptyDir on disk, and emptyDir with medium: Memory (a host tmpfs).
    let empty = mkdir(
        &c.dir
            .path()
            .join("pods/uid1/volumes/kubernetes.io~empty-dir/cache"),
    );
    let mem = mkdir(
        &c.dir
            .path()
            .join("pods/uid1/volumes/kubernetes.io~empty-dir/mem"),
    );
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&mem)
        .status()
        .unwrap();
    assert!(mounted.success());
    let _unmount = Unmount(mem.clone());

    let script = "cat /etc/config/key; echo; \
        (while [ ! -f /cache/go ]; do sleep 0.1; done; echo ack-from-second > /cache/ack) & \
        echo go > /cache/go; wait; cat /cache/ack; \
        grep ' /mem ' /proc/mounts | cut -d' ' -f3; df -k /mem | tail -1 | awk '{print $2}'; \
        echo in-guest-memory > /mem/f; \
        echo waiting; \
        i=0; while [ \"$(cat /etc/config/key)\" = v1 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; \
        cat /etc/config/key; echo";
    let mut bg = Background::spawn(
        &c,
        &[
            "-v",
            &format!("{}:ro", vol(&cm, "/etc/config")),
            "-v",
            &vol(&empty, "/cache"),
            "-v",
            &vol(&mem, "/mem"),
            "busybox",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    assert_eq!(bg.line(), "v1");
    assert_eq!(bg.line(), "ack-from-second");
    assert_eq!(bg.line(), "tmpfs", "medium: Memory is a guest tmpfs");
    assert_eq!(bg.line(), "8192", "the tmpfs keeps the emptyDir's size");
    assert_eq!(bg.line(), "waiting");
    // The kubelet's atomic update: a new dir, `..data` swapped by rename.
    std::fs::create_dir(cm.join("..2026_12_06_01_05_00.2")).unwrap();
    std::fs::write(cm.join("..2026_12_06_01_05_00.2/key"), "v2").unwrap();
    symlink("..2026_12_06_01_05_00.2", cm.join("..data_tmp")).unwrap();
    let updated = Instant::now();
    std::fs::rename(cm.join("..data_tmp"), cm.join("..data")).unwrap();
    std::fs::remove_dir_all(cm.join("..2026_12_06_01_00_00.1")).unwrap();
    assert_eq!(bg.line(), "v2", "the update reached the guest");
    let seen_after = updated.elapsed();
    let (code, rest) = bg.wait();
    assert_eq!(code, 0, "{rest}");
    eprintln!("configMap update seen in the guest after {seen_after:?}");
    // Both processes' files are on the host; the memory one is not.
    assert_eq!(
        std::fs::read_to_string(empty.join("ack")).unwrap(),
        "ack-from-second\n"
    );
    assert_eq!(
        std::fs::read_dir(&mem).unwrap().count(),
        0,
        "the memory emptyDir lived in the guest"
    );
    c.assert_no_leftovers();
}

fn pseudo_random(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn large_files_match_and_synced_data_survives_a_killed_vm() {
    let c = Capsid::new();
    let data = mkdir(&c.dir.path().join("data"));
    let big = pseudo_random(64 << 20, 7);
    std::fs::write(data.join("host.bin"), &big).unwrap();
    let script = "sha256sum /data/host.bin | cut -d' ' -f1; \
        head -c 67108864 /dev/urandom > /data/guest.bin; sha256sum /data/guest.bin | cut -d' ' -f1; \
        head -c 4194304 /dev/urandom > /data/synced.bin; sync; \
        sha256sum /data/synced.bin | cut -d' ' -f1; echo synced; sleep 600";
    let mut bg = Background::spawn(
        &c,
        &[
            "-v",
            &vol(&data, "/data"),
            "busybox",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let host_sum = bg.line();
    assert_eq!(host_sum, format!("{:x}", Sha256::digest(&big)));
    let guest_sum = bg.line();
    let synced_sum = bg.line();
    assert_eq!(bg.line(), "synced");
    assert_eq!(
        guest_sum,
        format!(
            "{:x}",
            Sha256::digest(std::fs::read(data.join("guest.bin")).unwrap())
        )
    );
    // The VM dies without warning: QEMU is killed.
    let marker = c.dir.path().display().to_string();
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        // QEMU itself, not the jailer that started it.
        let program = cmdline.split(' ').next().unwrap_or("");
        if program.contains("qemu-system") && cmdline.contains(&marker) {
            let pid: i32 = entry.file_name().to_string_lossy().parse().unwrap();
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            killed += 1;
        }
    }
    assert_eq!(killed, 1);
    let (code, _) = bg.wait();
    assert_ne!(code, 0);
    assert_eq!(
        synced_sum,
        format!(
            "{:x}",
            Sha256::digest(std::fs::read(data.join("synced.bin")).unwrap())
        ),
        "what was synced before the VM died is on the host"
    );
    c.assert_no_leftovers();
}

#[test]
fn bad_volumes_get_one_clear_error_and_leave_nothing() {
    let c = Capsid::new();
    let data = mkdir(&c.dir.path().join("data"));
    let ro = mkdir(&c.dir.path().join("ro"));
    let bound = Command::new("mount")
        .args(["--bind", "-o", "ro"])
        .arg(&data)
        .arg(&ro)
        .status()
        .unwrap();
    assert!(bound.success());
    // Unmounted however the test ends.
    let ro_mount = Unmount(ro.clone());
    let missing = c.dir.path().join("missing");
    let state = c.dir.path().join("run");
    std::fs::create_dir_all(&state).unwrap();
    let cases: Vec<(String, &str)> = vec![
        (vol(&state, "/state"), "capsid's own directory"),
        (vol(c.dir.path(), "/all"), "capsid's own directory"),
        (vol(Path::new("/proc/self"), "/p"), "procfs"),
        (vol(&missing, "/data"), "cannot be opened"),
        (vol(&data, "/proc/x"), "inside /proc or /sys"),
        (vol(&data, "/sys/kernel/x"), "inside /proc or /sys"),
        (vol(Path::new("/dev/null"), "/null"), "device node"),
        (vol(&ro, "/data"), "read-only filesystem"),
        ("relative:/data".into(), "must be absolute"),
        (format!("{}:rx", vol(&data, "/data")), "unknown mode"),
    ];
    for (arg, words) in cases {
        let o = c.run(&["-v", &arg, "busybox", "--", "true"], None);
        let err = stderr(&o);
        assert_ne!(o.status.code(), Some(0), "{arg}: {err}");
        assert!(err.contains(words), "{arg}: {err}");
        // One error line, besides the image's progress on a first run.
        let errors: Vec<&str> = err
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| !l.contains("unpacking layer") && !l.contains("building erofs"))
            .collect();
        assert_eq!(errors.len(), 1, "{arg}: one error: {err}");
        c.assert_no_leftovers();
    }
    // virtiofsd missing: the run fails after the share was made; nothing
    // of it is left.
    let broken = c.dir.path().join("broken.toml");
    let text = std::fs::read_to_string(c.config()).unwrap();
    let text = text.replacen(
        "virtiofsd = \"virtiofsd\"",
        "virtiofsd = \"/nonexistent/virtiofsd\"",
        1,
    );
    assert!(text.contains("/nonexistent/virtiofsd"), "{text}");
    std::fs::write(&broken, text).unwrap();
    let o = Command::new(capsid_tests::bin("capsid"))
        .arg("--config")
        .arg(&broken)
        .args(["run", "-v", &vol(&data, "/data"), "busybox", "--", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("/nonexistent/virtiofsd"),
        "{}",
        stderr(&o)
    );
    c.assert_no_leftovers();
    // Read-only is fine.
    let o = c.run(
        &[
            "-v",
            &format!("{}:ro", vol(&ro, "/data")),
            "busybox",
            "--",
            "true",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    drop(ro_mount);
    c.assert_no_leftovers();
}
