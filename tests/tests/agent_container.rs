//! The guest agent runs OCI containers: a real guest under QEMU-TCG, the
//! busybox rootfs on our virtio-blk, stdio over our vsock.

use capsid_sandbox::spec::RunOptions;
use capsid_sandbox::stdio::StreamsWanted;
use capsid_tests::sandbox::{all_streams, busybox_sandbox, create, run_container, sh};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_exit_codes_and_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    let sb = busybox_sandbox(dir.path(), "agent-basic").await;
    let out = run_container(&sb, "c1", &sh("echo hello; echo oops >&2"), b"").await;
    assert_eq!(text(&out.stdout), "hello\n");
    assert_eq!(text(&out.stderr), "oops\n");
    assert_eq!(out.status, 0);
    let out = run_container(&sb, "c2", &sh("exit 7"), b"").await;
    assert_eq!(out.status, 7);
    // The container's init is PID 1 of its namespace: it cannot kill
    // itself with a signal from inside, but a child killed by one shows.
    let out = run_container(&sb, "c3", &sh("sleep 100 & kill -9 $!; wait $!"), b"").await;
    assert_eq!(out.status, 137, "child killed by signal 9");
    // A command that does not exist is the container's failure, reported.
    let outputs = StreamsWanted {
        stdin: false,
        stdout: true,
        stderr: true,
        terminal: false,
    };
    let no_binary = RunOptions {
        command: vec!["/no/such/binary".into()],
        ..Default::default()
    };
    let created = create(&sb, "c4", &no_binary, outputs).await;
    let e = created.unwrap_err().to_string();
    assert!(
        e.contains("/no/such/binary") || e.contains("No such file"),
        "{e}"
    );
    let pids = sb.pids();
    sb.stop().await;
    assert!(
        !dir.path().join("run/agent-basic").exists(),
        "run dir left behind"
    );
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} survived"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_stdin_and_stdout_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let sb = busybox_sandbox(dir.path(), "agent-bulk").await;
    let input: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let expected = format!("{:x}", Sha256::digest(&input));
    let out = run_container(
        &sb,
        "c1",
        &RunOptions {
            command: vec!["sha256sum".into()],
            ..Default::default()
        },
        &input,
    )
    .await;
    assert_eq!(text(&out.stdout), format!("{expected}  -\n"));
    let out = run_container(
        &sb,
        "c2",
        &sh("head -c 52428800 /dev/zero; echo err >&2"),
        b"",
    )
    .await;
    assert_eq!(out.stdout.len(), 50 << 20, "stdout bytes");
    assert!(out.stdout.iter().all(|&b| b == 0));
    assert_eq!(text(&out.stderr), "err\n");
    assert_eq!(out.status, 0);
    sb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_settings_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let sb = busybox_sandbox(dir.path(), "agent-settings").await;
    let opts = RunOptions {
        env: vec!["GREETING=hi there".into()],
        workdir: Some("/tmp".into()),
        user: Some("1000:1000".into()),
        hostname: "capsid-box".into(),
        rlimits: vec!["nofile=64:128".into()],
        ..sh(
            "echo \"$GREETING\"; pwd; id -u; id -g; hostname; cat /etc/hostname; ulimit -n; \
              grep NoNewPrivs /proc/self/status; grep CapEff /proc/self/status; \
              cat /proc/kcore >/dev/null 2>&1 && echo kcore-readable || echo kcore-masked",
        )
    };
    let out = run_container(&sb, "c1", &opts, b"").await;
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(
        lines,
        [
            "hi there",
            "/tmp",
            "1000",
            "1000",
            "capsid-box",
            "capsid-box",
            "64",
            "NoNewPrivs:\t1",
            "CapEff:\t0000000000000000",
            "kcore-masked"
        ],
        "stderr: {}",
        text(&out.stderr)
    );

    let ro = RunOptions {
        read_only: true,
        ..sh("touch /newfile && echo wrote || echo read-only; touch /tmp/x 2>/dev/null; echo done")
    };
    let out = run_container(&sb, "c2", &ro, b"").await;
    assert!(
        text(&out.stdout).starts_with("read-only\n"),
        "{}",
        text(&out.stdout)
    );

    // A writable rootfs: writes land in the container's own upper layer.
    let out = run_container(
        &sb,
        "c3",
        &sh("echo data > /newfile && cat /newfile; ls /proc/1/ns | wc -l"),
        b"",
    )
    .await;
    assert!(
        text(&out.stdout).starts_with("data\n"),
        "{}",
        text(&out.stdout)
    );
    sb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_oom_kills_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let sb = busybox_sandbox(dir.path(), "agent-oom").await;
    let opts = RunOptions {
        memory_limit: Some(64 << 20),
        ..sh("dd if=/dev/zero of=/dev/null bs=128M count=1; echo survived")
    };
    let out = run_container(&sb, "c1", &opts, b"").await;
    // dd dies; the shell goes on: the container exits 0 but an OOM kill is
    // on record. Make the container's main process the victim instead.
    assert!(
        text(&out.stdout).contains("survived"),
        "{}",
        text(&out.stdout)
    );
    let opts = RunOptions {
        memory_limit: Some(64 << 20),
        command: vec![
            "dd".into(),
            "if=/dev/zero".into(),
            "of=/dev/null".into(),
            "bs=128M".into(),
            "count=1".into(),
        ],
        ..Default::default()
    };
    let out = run_container(&sb, "c2", &opts, b"").await;
    assert_eq!(out.status, 137, "stderr: {}", text(&out.stderr));
    assert!(out.oom_killed, "OOM kill not reported");
    sb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_exec_list_stats_pause() {
    let dir = tempfile::tempdir().unwrap();
    let sb = busybox_sandbox(dir.path(), "agent-signals").await;
    let agent = sb.agent();
    let script =
        sh("trap 'echo got TERM; exit 3' TERM; echo ready; while true; do sleep 0.1; done");
    let created = create(&sb, "c1", &script, all_streams(&script))
        .await
        .unwrap();
    let init_pid = created.pid;
    let streams = created.streams;
    sb.start_init("c1").await.unwrap();
    let mut stdout = BufReader::new(streams.stdout.unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).await.unwrap();
    assert_eq!(line, "ready\n");

    // An exec process joins the container's namespaces: it sees the init as PID 1.
    let process = oci_spec::runtime::ProcessBuilder::default()
        .args(vec![
            "sh".to_string(),
            "-c".into(),
            "echo $$; cat /proc/1/cmdline | tr '\\0' ' '".into(),
        ])
        .env(vec!["PATH=/bin:/usr/bin".to_string()])
        .cwd("/")
        .build()
        .unwrap();
    let exec_wanted = StreamsWanted {
        stdin: false,
        stdout: true,
        stderr: true,
        terminal: false,
    };
    let prepared = sb
        .prepare_exec(
            "c1",
            "e1",
            &serde_json::to_vec(&process).unwrap(),
            exec_wanted,
        )
        .await
        .unwrap();
    let (_exec_pid, exec_streams) = sb.start_exec("c1", prepared).await.unwrap();
    let mut exec_out = String::new();
    exec_streams
        .stdout
        .unwrap()
        .read_to_string(&mut exec_out)
        .await
        .unwrap();
    let exec_exit = agent.wait_process("c1", "e1").await.unwrap();
    assert_eq!(exec_exit.exit_status, 0);
    let mut exec_lines = exec_out.lines();
    let exec_pid: u32 = exec_lines.next().unwrap().parse().unwrap();
    assert!(exec_pid > 1, "exec pid {exec_pid}");
    assert!(
        exec_lines.next().unwrap().starts_with("sh -c trap"),
        "{exec_out}"
    );

    let procs = agent.list_processes("c1").await.unwrap();
    assert!(
        procs
            .iter()
            .any(|p| p.pid == init_pid && p.command.starts_with("sh -c")),
        "{procs:?}"
    );

    let stats = agent.stats("c1").await.unwrap();
    assert!(stats.memory.usage_bytes > 0);
    assert!(stats.pids.current >= 1);
    assert!(stats.guest_memory.total > 100 << 20);

    agent.pause_container("c1", true).await.unwrap();
    let frozen = std::time::Instant::now();
    agent.pause_container("c1", false).await.unwrap();
    assert!(frozen.elapsed() < std::time::Duration::from_secs(10));

    agent.signal_process("c1", "", 15, false).await.unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).await.unwrap();
    assert_eq!(rest, "got TERM\n");
    let exit = agent.wait_process("c1", "").await.unwrap();
    assert_eq!(exit.exit_status, 3);
    drop(streams.stdin);

    // SIGKILL from the host ends even an init without handlers: 128+9.
    let sleeper = RunOptions {
        command: vec!["sleep".into(), "1000".into()],
        ..Default::default()
    };
    let outputs = StreamsWanted {
        stdin: false,
        stdout: true,
        stderr: true,
        terminal: false,
    };
    let _created = create(&sb, "c2", &sleeper, outputs).await.unwrap();
    sb.start_init("c2").await.unwrap();
    agent.signal_process("c2", "", 9, false).await.unwrap();
    assert_eq!(agent.wait_process("c2", "").await.unwrap().exit_status, 137);
    sb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_processes_get_a_pty() {
    let dir = tempfile::tempdir().unwrap();
    let sb = busybox_sandbox(dir.path(), "agent-tty").await;
    let opts = RunOptions {
        tty: true,
        ..sh("tty; stty size; echo done")
    };
    let streams = create(&sb, "c1", &opts, all_streams(&opts))
        .await
        .unwrap()
        .streams;
    assert!(streams.stderr.is_none(), "a terminal has one output stream");
    sb.agent().resize_pty("c1", "", 33, 101).await.unwrap();
    sb.start_init("c1").await.unwrap();
    let mut out = String::new();
    streams
        .stdout
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    let exit = sb.agent().wait_process("c1", "").await.unwrap();
    assert_eq!(exit.exit_status, 0);
    let out = out.replace('\r', "");
    assert!(out.contains("/dev/pts/"), "{out}");
    assert!(out.contains("33 101"), "{out}");
    assert!(out.contains("done"), "{out}");
    drop(streams.stdin);
    sb.stop().await;
}
