//! containerd runs capsid's shim: `ctr run` output and exit codes, signals,
//! exec, ps, metrics, pause/resume, a terminal, and the layered image's
//! whiteouts on a cached disk. A private containerd, QEMU-TCG sandboxes.

use std::process::Stdio;
use std::time::{Duration, Instant};

use capsid_tests::run;
use capsid_tests::shim::{shim_socket, Background, ShimHarness, BUSYBOX, LAYERED};
use containerd_shim_protos::api::UpdateTaskRequest;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim_async::TaskClient;
use containerd_shim_protos::ttrpc;

const LONG: Duration = Duration::from_secs(120);

#[test]
fn output_exit_codes_stdin_and_signals() {
    let h = ShimHarness::start();
    let (code, out, err) = h.run("t1", BUSYBOX, &["echo", "hello"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "hello\n"),
        "{err}\n{}",
        h.log_tail()
    );
    let (code, _, _) = h.run("t2", BUSYBOX, &["sh", "-c", "echo oops >&2; exit 3"]);
    assert_eq!(code, 3);

    // stdin: the process reads EOF once ctr's input ends.
    let mut cmd = h.run_cmd(
        &["--rm"],
        BUSYBOX,
        "t3",
        &["sh", "-c", "cat; echo after-eof"],
    );
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"piped input\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "piped input\nafter-eof\n"
    );
    assert!(out.status.success());

    // SIGKILL from the host: containerd records 128+9.
    let bg = Background::spawn(h.run_cmd(&["--rm"], BUSYBOX, "t4", &["sleep", "1000"]));
    h.wait_status("t4", "RUNNING", LONG);
    let (code, _, err) = h.ctr(&["task", "kill", "-s", "SIGKILL", "t4"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = bg.wait(LONG);
    assert_eq!(code, 137);

    // SIGTERM reaches an init that traps it; one without a handler (PID 1
    // of its namespace) ignores it, as with runc.
    let script = "trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 0.1; done";
    let bg = Background::spawn(h.run_cmd(&["--rm"], BUSYBOX, "t5", &["sh", "-c", script]));
    assert_eq!(bg.line(LONG), "ready");
    let (code, _, err) = h.ctr(&["task", "kill", "t5"]);
    assert_eq!(code, 0, "{err}");
    let (code, rest, _) = bg.wait(LONG);
    assert_eq!((code, rest.as_str()), (7, "got TERM\n"));

    h.run_detached("t6", &["sleep", "1000"]);
    let (code, _, err) = h.ctr(&["task", "kill", "-s", "SIGTERM", "t6"]);
    assert_eq!(code, 0, "{err}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(h.status("t6"), "RUNNING");
    let (code, _, err) = h.ctr(&["task", "kill", "-s", "SIGKILL", "t6"]);
    assert_eq!(code, 0, "{err}");
    h.wait_status("t6", "STOPPED", LONG);
    let (code, _, err) = h.ctr(&["task", "delete", "t6"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("exit code 137"), "{err}");
    let (code, _, err) = h.ctr(&["container", "delete", "t6"]);
    assert_eq!(code, 0, "{err}");

    h.assert_clean(&["t1", "t2", "t3", "t4", "t5", "t6"]);
}

#[test]
fn exec_ps_metrics_pause_resume() {
    let h = ShimHarness::start();
    h.run_detached("t2", &["sh", "-c", "while :; do sleep 0.1; done"]);

    let (code, out, err) = h.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "t2",
        "sh",
        "-c",
        "echo $$; cat /proc/1/cmdline | tr '\\0' ' '",
    ]);
    assert_eq!(code, 0, "{err}\n{}", h.log_tail());
    let mut lines = out.lines();
    let pid: u32 = lines.next().unwrap().parse().unwrap();
    assert!(pid > 1, "the exec is not the container's init: {out}");
    assert_eq!(
        lines.next().unwrap().trim(),
        "sh -c while :; do sleep 0.1; done"
    );
    let (code, _, _) = h.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e2",
        "t2",
        "sh",
        "-c",
        "exit 5",
    ]);
    assert_eq!(code, 5);

    let (code, out, err) = h.ctr(&["task", "ps", "t2"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("PID"), "{out}");
    assert!(out.lines().count() >= 2, "{out}");

    let (code, out, err) = h.ctr(&["task", "metrics", "t2"]);
    assert_eq!(code, 0, "{err}");
    for metric in ["pids.current", "cpu.usage_usec", "memory.usage"] {
        let value: u64 = out
            .lines()
            .find(|l| l.starts_with(metric))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {metric} in\n{out}"));
        assert!(value > 0, "{metric} = 0\n{out}");
    }

    let (code, _, err) = h.ctr(&["task", "pause", "t2"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(h.status("t2"), "PAUSED");
    let (code, _, err) = h.ctr(&["task", "resume", "t2"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(h.status("t2"), "RUNNING");
    let (code, out, err) = h.ctr(&["task", "exec", "--exec-id", "e3", "t2", "echo", "alive"]);
    assert_eq!((code, out.as_str()), (0, "alive\n"), "{err}");

    // Limits change inside the VM; the VM's size does not. (ctr 1.6 has no
    // `task update`: the request goes to the shim's socket as containerd
    // would send it.)
    let update = |resources: &str| -> Result<(), String> {
        let socket = shim_socket(&h.ctrd.socket(), "default", "t2");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client =
                ttrpc::asynchronous::Client::connect(&format!("unix://{}", socket.display()))
                    .await
                    .map_err(|e| e.to_string())?;
            let req = UpdateTaskRequest {
                id: "t2".into(),
                resources: MessageField::some(Any {
                    type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
                        .into(),
                    value: resources.as_bytes().to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            TaskClient::new(client)
                .update(ttrpc::context::with_timeout(30_000_000_000), &req)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    };
    update(r#"{"memory":{"limit":67108864},"pids":{"limit":64}}"#).unwrap();
    let (code, out, err) = h.ctr(&["task", "metrics", "t2"]);
    assert_eq!(code, 0, "{err}");
    let metric = |name: &str| -> String {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(metric("memory.usage_limit"), "67108864", "{out}");
    assert_eq!(metric("pids.limit"), "64", "{out}");
    let e = update(r#"{"memory":{"limit":4294967296}}"#).unwrap_err();
    assert!(e.contains("does not fit in the VM"), "{e}");

    let (code, _, err) = h.ctr(&["task", "kill", "--all", "-s", "SIGKILL", "t2"]);
    assert_eq!(code, 0, "{err}");
    h.wait_status("t2", "STOPPED", LONG);
    let (code, _, err) = h.ctr(&["task", "delete", "t2"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = h.ctr(&["container", "delete", "t2"]);
    assert_eq!(code, 0, "{err}");
    h.assert_clean(&["t2"]);
}

#[test]
fn a_terminal_under_a_pty() {
    let h = ShimHarness::start();
    let ctr = h.run_cmd(
        &["--rm", "-t"],
        BUSYBOX,
        "t3",
        &["sh", "-c", "tty; echo done-tty; exit 4"],
    );
    let quote = |a: &std::ffi::OsStr| format!("'{}'", a.to_string_lossy().replace('\'', "'\\''"));
    let line = std::iter::once(ctr.get_program())
        .chain(ctr.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ");
    // `script` gives ctr a pty, as a person's terminal would.
    let (code, out, err) = run(std::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .stdin(Stdio::null()));
    assert_eq!(code, 4, "{out}{err}\n{}", h.log_tail());
    assert!(out.contains("/dev/pts/"), "{out}");
    assert!(out.contains("done-tty"), "{out}");
    h.assert_clean(&["t3"]);
}

#[test]
fn layered_image_whiteouts_and_the_cached_disk() {
    let h = ShimHarness::start();
    let script = "ls /data; echo --; ls /opaque; echo --; cat /etc/layer; \
                  touch /data/mine && ls /data | tr '\\n' ' '";
    let started = Instant::now();
    let (code, out, err) = h.run("l1", LAYERED, &["sh", "-c", script]);
    let first = started.elapsed();
    assert_eq!(code, 0, "{err}\n{}", h.log_tail());
    assert_eq!(out, "keep.txt\n--\nnew.txt\n--\n3\nkeep.txt mine ");

    // The second container gets the same disk from the cache, and its own
    // writable layer: the first one's file is not there.
    let started = Instant::now();
    let (code, out, err) = h.run("l2", LAYERED, &["ls", "/data"]);
    let second = started.elapsed();
    assert_eq!((code, out.as_str()), (0, "keep.txt\n"), "{err}");
    let log = h.log();
    let prep: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("rootfs disk built") || l.contains("rootfs cache hit"))
        .collect();
    assert_eq!(prep.len(), 2, "{prep:?}");
    assert!(prep[0].contains("rootfs disk built") && prep[0].contains("default-l1"));
    assert!(prep[1].contains("rootfs cache hit") && prep[1].contains("default-l2"));
    let disks: Vec<_> = std::fs::read_dir(h.cache_dir().join("images"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(disks.len(), 1, "one disk for the image");
    let ms = |line: &str| -> u64 {
        line.split("elapsed_ms=")
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX)
    };
    eprintln!(
        "rootfs prep: built in {} ms, cache hit in {} ms; ctr run: {first:?} then {second:?}",
        ms(prep[0]),
        ms(prep[1])
    );
    assert!(ms(prep[1]) <= ms(prep[0]));
    h.assert_clean(&["l1", "l2"]);
}

#[test]
fn task_events_reach_containerd() {
    let h = ShimHarness::start();
    let events = Background::spawn({
        let mut c = h.ctrd.ctr();
        c.arg("events");
        c
    });
    h.run_detached("ev", &["sh", "-c", "while :; do sleep 0.1; done"]);
    let (code, _, err) = h.ctr(&["task", "exec", "--exec-id", "x1", "ev", "true"]);
    assert_eq!(code, 0, "{err}");
    for action in ["pause", "resume"] {
        let (code, _, err) = h.ctr(&["task", action, "ev"]);
        assert_eq!(code, 0, "{err}");
    }
    let (code, _, err) = h.ctr(&["task", "kill", "-s", "SIGKILL", "ev"]);
    assert_eq!(code, 0, "{err}");
    h.wait_status("ev", "STOPPED", LONG);
    let (code, _, err) = h.ctr(&["task", "delete", "ev"]);
    assert_eq!(code, 0, "{err}");

    // The cgroup OOM killer inside the guest: TaskOOM, and the init dies
    // of SIGKILL (the VM has room for dd's buffer; the cgroup has not).
    let (code, _, err) = h.run_with(
        &[
            "--rm",
            "--memory-limit",
            "67108864",
            "--annotation",
            "io.capsid.memory_mib=256",
        ],
        "oom",
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"],
    );
    assert_eq!(code, 137, "{err}\n{}", h.log_tail());

    let wanted = [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/exit",
        "/tasks/delete",
        "/tasks/oom",
    ];
    let has =
        |lines: &[String], topic: &str| lines.iter().any(|l| l.contains(&format!(" {topic} ")));
    let lines = events.lines_until(
        |lines| wanted.iter().all(|t| has(lines, t)),
        Duration::from_secs(30),
    );
    for topic in wanted {
        assert!(
            has(&lines, topic),
            "no {topic} event in\n{}",
            lines.join("\n")
        );
    }
    let exit = lines
        .iter()
        .find(|l| l.contains(" /tasks/exit ") && l.contains("\"id\":\"ev\""))
        .map(String::as_str)
        .unwrap_or_default();
    assert!(exit.contains("137"), "{exit}");
}

/// A profile that allows everything except creating directories.
const NO_MKDIR_PROFILE: &str = r#"{
  "defaultAction": "SCMP_ACT_ALLOW",
  "syscalls": [
    {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}
  ]
}"#;

/// A profile refusing mkdir when its mode has no group bits set.
const MASKED_PROFILE: &str = r#"{
  "defaultAction": "SCMP_ACT_ALLOW",
  "syscalls": [
    {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
     "args": [{"index": 1, "value": 56, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
    {"names": ["mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
     "args": [{"index": 2, "value": 56, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]}
  ]
}"#;

#[test]
fn seccomp_profiles_from_ctr() {
    let h = ShimHarness::start();
    let script = "grep '^Seccomp:' /proc/self/status; mkdir /tmp/x && echo made";

    // No seccomp section in the spec: nothing is filtered, as with runc.
    let (code, out, err) = h.run_with(&["--rm"], "s1", &["sh", "-c", script]);
    assert_eq!(code, 0, "{err}\n{}", h.log_tail());
    assert_eq!(out, "Seccomp:\t0\nmade\n");

    // containerd's default profile: filtered, yet a shell still forks
    // and makes directories.
    let (code, out, err) = h.run_with(&["--rm", "--seccomp"], "s2", &["sh", "-c", script]);
    assert_eq!(code, 0, "{err}\n{}", h.log_tail());
    assert_eq!(out, "Seccomp:\t2\nmade\n");

    // A profile of one's own: mkdir is refused with EPERM.
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("no-mkdir.json");
    std::fs::write(&profile, NO_MKDIR_PROFILE).unwrap();
    let profile = profile.display().to_string();
    let (code, out, err) = h.run_with(
        &["--rm", "--seccomp", "--seccomp-profile", &profile],
        "s3",
        &["sh", "-c", &format!("exec 2>&1; {script}")],
    );
    assert_eq!(code, 1, "{out}{err}\n{}", h.log_tail());
    assert!(out.starts_with("Seccomp:\t2\n"), "{out}");
    assert!(out.contains("Operation not permitted"), "{out}");
    assert!(!out.contains("made"), "{out}");

    // A masked comparison means `(arg & value) == valueTwo`, as in runc:
    // refusing modes without group bits leaves busybox's mkdir (mode
    // 0777, then chmod) alone.
    let profile = dir.path().join("masked.json");
    std::fs::write(&profile, MASKED_PROFILE).unwrap();
    let profile = profile.display().to_string();
    let (code, out, err) = h.run_with(
        &["--rm", "--seccomp", "--seccomp-profile", &profile],
        "s4",
        &["sh", "-c", &format!("exec 2>&1; {script}")],
    );
    assert_eq!(
        (code, out.as_str()),
        (0, "Seccomp:\t2\nmade\n"),
        "{err}\n{}",
        h.log_tail()
    );

    // Processes exec'd into a filtered container are filtered too.
    let (code, out, err) =
        run(&mut h.run_cmd(&["-d", "--seccomp"], BUSYBOX, "s5", &["sleep", "1000"]));
    assert_eq!(code, 0, "{out}{err}\n{}", h.log_tail());
    h.wait_status("s5", "RUNNING", LONG);
    let (code, out, err) = h.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "s5",
        "grep",
        "^Seccomp:",
        "/proc/self/status",
    ]);
    assert_eq!((code, out.as_str()), (0, "Seccomp:\t2\n"), "{err}");
    let (code, _, err) = h.ctr(&["task", "kill", "-s", "SIGKILL", "s5"]);
    assert_eq!(code, 0, "{err}");
    h.wait_status("s5", "STOPPED", LONG);
    for args in [["task", "delete", "s5"], ["container", "delete", "s5"]] {
        let (code, _, err) = h.ctr(&args);
        assert_eq!(code, 0, "{err}");
    }

    h.assert_clean(&["s1", "s2", "s3", "s4", "s5"]);
}

#[test]
fn bind_mounts_reach_the_guest_through_virtio_fs() {
    let h = ShimHarness::start();
    let data = h.state_dir().with_file_name("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("in.txt"), "from the host\n").unwrap();
    let token = h.state_dir().with_file_name("token");
    std::fs::write(&token, "t0k3n\n").unwrap();
    let rw = format!(
        "type=bind,src={},dst=/data,options=rbind:rw",
        data.display()
    );
    let ro = format!(
        "type=bind,src={},dst=/run/token,options=rbind:ro",
        token.display()
    );
    let (code, out, err) = h.run_with(
        &["--rm", "--mount", &rw, "--mount", &ro],
        "m1",
        &[
            "sh",
            "-c",
            "cat /data/in.txt /run/token; echo guest > /data/out.txt; \
             echo x >> /run/token 2>/dev/null || echo token-refused",
        ],
    );
    assert_eq!(code, 0, "{out}{err}\n{}", h.log_tail());
    assert_eq!(out, "from the host\nt0k3n\ntoken-refused\n");
    assert_eq!(
        std::fs::read_to_string(data.join("out.txt")).unwrap(),
        "guest\n"
    );
    assert_eq!(std::fs::read_to_string(&token).unwrap(), "t0k3n\n");

    // Bad sources and destinations: one error from Create, nothing left.
    let missing = h.state_dir().with_file_name("missing");
    // Outside the harness's directory, whose mounts count as leftovers.
    let ro_dir = tempfile::tempdir().unwrap();
    let ro = ro_dir.path().join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    let bound = std::process::Command::new("mount")
        .args(["--bind", "-o", "ro"])
        .arg(&data)
        .arg(&ro)
        .status()
        .unwrap();
    assert!(bound.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(ro.clone());
    for (mount, words) in [
        (
            format!(
                "type=bind,src={},dst=/data,options=rbind:rw",
                missing.display()
            ),
            "cannot be opened",
        ),
        (
            format!(
                "type=bind,src={},dst=/proc/x,options=rbind:rw",
                data.display()
            ),
            "inside /proc or /sys",
        ),
        (
            "type=bind,src=/dev/null,dst=/null,options=rbind:rw".to_string(),
            "device node",
        ),
        (
            format!("type=bind,src={},dst=/ro,options=rbind:rw", ro.display()),
            "read-only filesystem",
        ),
    ] {
        let (code, out, err) = h.run_with(&["--rm", "--mount", &mount], "m2", &["true"]);
        assert_ne!(code, 0, "{mount}: {out}");
        assert!(err.contains(words), "{mount}: {err}");
        let _ = h.ctr(&["container", "delete", "m2"]);
        h.assert_clean(&["m1", "m2"]);
    }
}
