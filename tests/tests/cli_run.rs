//! `capsid run`: a container in a microVM from the command line, with the
//! bundled images, QEMU-TCG here.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use capsid_tests::cli::{stderr, stdout, Capsid};
use sha2::{Digest, Sha256};

#[test]
fn echo_and_exit_status() {
    let c = Capsid::new();
    let o = c.run(&["--", "echo", "hello"], None);
    assert_eq!(stdout(&o), "hello\n", "{}", stderr(&o));
    assert_eq!(o.status.code(), Some(0));
    let o = c.run(&["busybox", "--", "sh", "-c", "exit 7"], None);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    c.assert_no_leftovers();
}

#[test]
fn stdin_and_bulk_output_are_exact() {
    let c = Capsid::new();
    let input = c.dir.path().join("input");
    let data: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(&input, &data).unwrap();
    let o = c.run(&["--", "sha256sum"], Some(&input));
    assert_eq!(
        stdout(&o),
        format!("{:x}  -\n", Sha256::digest(&data)),
        "{}",
        stderr(&o)
    );

    let o = c.run(
        &["--", "sh", "-c", "head -c 52428800 /dev/zero; echo err >&2"],
        None,
    );
    assert_eq!(o.stdout.len(), 50 << 20);
    assert!(o.stdout.iter().all(|&b| b == 0));
    assert!(stderr(&o).ends_with("err\n"), "{}", stderr(&o));
    assert_eq!(o.status.code(), Some(0));
    c.assert_no_leftovers();
}

#[test]
fn settings_reach_the_container() {
    let c = Capsid::new();
    let o = c.run(
        &[
            "--env",
            "GREETING=hi",
            "--workdir",
            "/tmp",
            "--user",
            "1000:1000",
            "--hostname",
            "box",
            "--rlimit",
            "nofile=100:200",
            "--",
            "sh",
            "-c",
            "echo $GREETING; pwd; id -u; hostname; ulimit -n",
        ],
        None,
    );
    assert_eq!(stdout(&o), "hi\n/tmp\n1000\nbox\n100\n", "{}", stderr(&o));
    let o = c.run(
        &[
            "--read-only",
            "--",
            "sh",
            "-c",
            "touch /x 2>/dev/null && echo writable || echo read-only",
        ],
        None,
    );
    assert_eq!(stdout(&o), "read-only\n", "{}", stderr(&o));
    c.assert_no_leftovers();
}

#[test]
fn memory_limit_is_enforced_and_reported() {
    let c = Capsid::new();
    let o = c.run(
        &[
            "--memory-limit",
            "64",
            "--",
            "dd",
            "if=/dev/zero",
            "of=/dev/null",
            "bs=128M",
            "count=1",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(137), "{}", stderr(&o));
    assert!(stderr(&o).contains("memory limit"), "{}", stderr(&o));
    c.assert_no_leftovers();
}

#[test]
fn layered_image_shows_whiteouts_and_opaque_dirs() {
    let c = Capsid::new();
    let o = c.run(
        &[
            "layered",
            "--",
            "sh",
            "-c",
            "ls /data; echo --; ls /opaque; echo --; cat /etc/layer",
        ],
        None,
    );
    assert_eq!(
        stdout(&o),
        "keep.txt\n--\nnew.txt\n--\n3\n",
        "{}",
        stderr(&o)
    );
    c.assert_no_leftovers();
}

/// Starts a container that prints a line when ready, and returns the child
/// and a reader of its stdout.
fn start_waiting(
    c: &Capsid,
    script: &str,
) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let mut child = c
        .run_cmd(&["--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    (child, out)
}

fn signal(child: &std::process::Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

#[test]
fn signals_reach_the_container() {
    let c = Capsid::new();
    // A trap: SIGTERM reaches it, it prints and exits 3.
    let (child, mut out) = start_waiting(
        &c,
        "trap 'echo got TERM; exit 3' TERM; echo ready; while true; do sleep 0.1; done",
    );
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(rest, "got TERM\n");
    assert_eq!(o.status.code(), Some(3));

    // A container that ignores SIGINT (as a PID 1 without a handler does):
    // a second one within the grace period escalates to SIGKILL.
    let (child, _out) = start_waiting(
        &c,
        "trap '' INT; echo ready; while true; do sleep 0.1; done",
    );
    signal(&child, nix::sys::signal::Signal::SIGINT);
    std::thread::sleep(Duration::from_millis(500));
    signal(&child, nix::sys::signal::Signal::SIGINT);
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(137),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    c.assert_no_leftovers();
}

#[test]
fn a_signal_while_the_container_is_created_ends_the_run_cleanly() {
    let c = Capsid::new();
    // The sandbox_start span closes when the VM runs with its agent
    // connected; creating the container takes a while after that (about
    // 700 ms under TCG), and a signal then must end the run, not vanish.
    let mut child = c
        .run_cmd(&["--", "sleep", "1000"])
        .env("CAPSID_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "no start: {seen}");
        seen.push_str(&line);
        if line.contains("sandbox_start") && line.contains("close") {
            break;
        }
    }
    signal(&child, nix::sys::signal::Signal::SIGINT);
    // A lost signal would leave it running `sleep 1000`: fail, not hang.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(60));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    });
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(125), "{rest}");
    assert!(
        rest.contains("capsid: interrupted by signal 2 while creating the container")
            || rest.contains("capsid: interrupted by signal 2 while starting the container"),
        "{rest}"
    );
    c.assert_no_leftovers();
}

#[test]
fn tty_works_under_a_pty() {
    let c = Capsid::new();
    let (text, code) = c.run_under_pty("", "--tty -- sh -c 'tty; echo hello-tty'");
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("hello-tty"), "{text}");
    assert_eq!(code, Some(0), "{text}");
    c.assert_no_leftovers();
}

#[test]
fn bad_input_is_one_clear_error() {
    let c = Capsid::new();
    // Convert the image first, so its progress lines are not in the way.
    assert_eq!(c.run(&["--", "true"], None).status.code(), Some(0));
    let cases: [(&[&str], &str); 4] = [
        (&["no-such-image", "--", "true"], "no-such-image"),
        (&["--memory", "8", "--", "true"], "--memory 8"),
        (&["--", "/no/such/command"], "/no/such/command"),
        (&["--user", "alice", "--", "true"], "alice"),
    ];
    for (args, needle) in cases {
        let o = c.run(args, None);
        assert_eq!(o.status.code(), Some(125), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(
            err.lines().filter(|l| l.starts_with("capsid:")).count(),
            1,
            "{args:?}: {err}"
        );
    }
    c.assert_no_leftovers();

    // A corrupt layer (in a fresh cache, so the conversion's own checks
    // speak; a cache hit checks the blobs too, image_rootfs.rs): the digest
    // check names it, nothing is cached.
    let c = Capsid::new();
    let bad = c.dir.path().join("bad");
    let src = capsid_tests::artifact("images/busybox");
    assert!(std::process::Command::new("cp")
        .arg("-r")
        .arg(&src)
        .arg(&bad)
        .status()
        .unwrap()
        .success());
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bad.join("index.json")).unwrap()).unwrap();
    let blob = |d: &str| {
        bad.join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let layer = blob(manifest["layers"][0]["digest"].as_str().unwrap());
    let mut bytes = std::fs::read(&layer).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&layer, bytes).unwrap();
    let o = c.run(&[bad.to_str().unwrap(), "--", "true"], None);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains("does not match its digest"),
        "{}",
        stderr(&o)
    );
    c.assert_no_leftovers();
    let cached = std::fs::read_dir(c.dir.path().join("cache/images"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(cached, 0, "a corrupt image left something in the cache");
}

#[test]
fn exec_format_error_is_reported() {
    let c = Capsid::new();
    let image = capsid_tests::oci::busybox_plus(
        c.dir.path(),
        "garbage",
        &[("/bin/garbage", b"\x00\x01 this is not a program\n", 0o755)],
    );
    let o = c.run(&[image.to_str().unwrap(), "--", "/bin/garbage"], None);
    let err = stderr(&o);
    assert_ne!(o.status.code(), Some(0), "{err}");
    assert!(err.to_lowercase().contains("exec format error"), "{err}");
    c.assert_no_leftovers();
}

#[test]
fn seccomp_default_unconfined_and_a_profile_file() {
    let c = Capsid::new();
    let script = "exec 2>&1; grep '^Seccomp:' /proc/self/status; mkdir /tmp/x && echo made; \
                  echo \"sub $(echo shell)\"; unshare -U true || echo no-unshare";

    // The default profile: ordinary work goes on, namespaces are refused.
    let o = c.run(&["--", "sh", "-c", script], None);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("Seccomp:\t2\nmade\nsub shell\n"), "{out}");
    assert!(
        out.contains("Operation not permitted\nno-unshare\n"),
        "{out}"
    );

    // Unconfined: no filter.
    let o = c.run(&["--seccomp", "unconfined", "--", "sh", "-c", script], None);
    assert!(
        stdout(&o).starts_with("Seccomp:\t0\nmade\n"),
        "{}",
        stdout(&o)
    );

    // A profile file refusing mkdir with EPERM.
    let profile = c.dir.path().join("no-mkdir.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
             {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}"#,
    )
    .unwrap();
    let o = c.run(
        &[
            "--seccomp",
            profile.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "exec 2>&1; grep '^Seccomp:' /proc/self/status; mkdir /tmp/x && echo made",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "Seccomp:\t2\nmkdir: can't create directory '/tmp/x': Operation not permitted\n"
    );

    // A file that is not a profile: one clear error, nothing started.
    std::fs::write(&profile, r#"{"defaultAction": "SCMP_ACT_MAYBE"}"#).unwrap();
    let o = c.run(
        &["--seccomp", profile.to_str().unwrap(), "--", "true"],
        None,
    );
    assert_eq!(o.status.code(), Some(125));
    let err = stderr(&o);
    assert!(
        err.contains("seccomp profile") && err.contains("no-mkdir.json"),
        "{err}"
    );
    c.assert_no_leftovers();
}
