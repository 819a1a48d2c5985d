//! The guest agent runs OCI containers: a real guest under QEMU-TCG, the
//! busybox rootfs on our virtio-blk, stdio over our vsock.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsid_sandbox::container::ContainerSpec;
use capsid_sandbox::sandbox::Sandbox;
use capsid_sandbox::spec::RunOptions;
use capsid_sandbox::stdio::StreamsWanted;
use capsid_tests::sandbox::{
    all_streams, busybox_layer, busybox_sandbox, busybox_sandbox_with, create,
    in_the_agents_pid_namespace, oci_spec, run_container, sh, test_config,
};
use oci_spec::runtime::Capability;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

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

/// The agent's debug lines that say where a job's runtime helper came from
/// (guest-agent/src/standby.rs, container/process.rs).
const STANDBY_READY: &str = "standby runtime helper started";
const HANDED: &str = "job handed to the standby runtime helper";
const NOT_USABLE: &str = "standby runtime helper not usable: spawning one";

/// A busybox sandbox whose agent logs at debug level on the console.
async fn debug_sandbox(dir: &Path, id: &str) -> (Sandbox, PathBuf) {
    sandbox_with_args(dir, id, &["CAPSID_AGENT_LOG=debug"]).await
}

/// A busybox sandbox with `args` on the kernel command line; its console log.
async fn sandbox_with_args(dir: &Path, id: &str, args: &[&str]) -> (Sandbox, PathBuf) {
    let sb = busybox_sandbox_with(dir, id, |o| {
        o.kernel_args = args.iter().map(|a| a.to_string()).collect();
    })
    .await;
    let log = find_file(&test_config(dir).paths.state_dir.join(id), "console.log")
        .expect("the sandbox's console.log");
    (sb, log)
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        }
    }
    None
}

fn count_in(log: &Path, needle: &str) -> usize {
    String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default())
        .matches(needle)
        .count()
}

/// Waits until the console log has `n` lines with `needle`.
async fn wait_for_lines(log: &Path, needle: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while count_in(log, needle) < n {
        if Instant::now() > deadline {
            let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default())
                .lines()
                .filter(|l| l.contains("standby") || l.contains("spawn"))
                .collect::<Vec<_>>()
                .join("\n");
            panic!(
                "{n} lines of {needle:?} expected in the console log; the standby's lines:\n{text}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `script` as exec `exec_id` of container `id` on stdio of its own
/// (a terminal if `terminal`), with `stdin` fed then closed: stdout,
/// stderr and the exit status.
async fn exec_with_stdin(
    sb: &Sandbox,
    id: &str,
    exec_id: &str,
    script: &str,
    stdin: &[u8],
    terminal: bool,
) -> (String, String, i32) {
    let process = oci_spec::runtime::ProcessBuilder::default()
        .args(vec!["sh".to_string(), "-c".into(), script.into()])
        .env(vec!["PATH=/bin:/usr/bin".to_string()])
        .cwd("/")
        .terminal(terminal)
        .build()
        .unwrap();
    let wanted = StreamsWanted {
        stdin: true,
        stdout: true,
        stderr: true,
        terminal,
    };
    let prepared = sb
        .prepare_exec(id, exec_id, &serde_json::to_vec(&process).unwrap(), wanted)
        .await
        .unwrap();
    let (_pid, streams) = sb.start_exec(id, prepared).await.unwrap();
    let mut input = streams.stdin.unwrap();
    let data = stdin.to_vec();
    let feeder = tokio::spawn(async move {
        input.write_all(&data).await.unwrap();
        input.shutdown().await.unwrap();
        // A terminal's input ends with the process, not with this stream.
        input
    });
    let read = |s: Option<tokio::net::UnixStream>| async move {
        let mut text = String::new();
        if let Some(mut s) = s {
            s.read_to_string(&mut text).await.unwrap();
        }
        text
    };
    let (out, err, exit) = tokio::join!(
        read(streams.stdout),
        read(streams.stderr),
        sb.agent().wait_process(id, exec_id)
    );
    drop(feeder.await.unwrap());
    (out, err, exit.unwrap().exit_status)
}

/// Jobs handed to standby runtime helpers (one per job, each started after
/// the previous job) behave like jobs of helpers spawned for them: every
/// process gets its own stdio (input, EOF, output and errors on their own
/// streams), exit codes, and a terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_runtime_helpers_run_jobs_like_spawned_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (sb, log) = debug_sandbox(dir.path(), "agent-standby").await;
    // Before each job a standby is ready, so the job is handed to it.
    let mut jobs = 0;

    wait_for_lines(&log, STANDBY_READY, jobs + 1).await;
    let out = run_container(
        &sb,
        "c1",
        &sh("cat; echo out-c1; echo err-c1 >&2; exit 3"),
        b"in-c1\n",
    )
    .await;
    assert_eq!(
        (text(&out.stdout), text(&out.stderr), out.status),
        ("in-c1\nout-c1\n".into(), "err-c1\n".into(), 3)
    );
    jobs += 1;
    wait_for_lines(&log, HANDED, jobs).await;

    wait_for_lines(&log, STANDBY_READY, jobs + 1).await;
    let sleeper = RunOptions {
        command: vec!["sleep".into(), "100000".into()],
        ..Default::default()
    };
    let none = StreamsWanted {
        stdin: false,
        stdout: false,
        stderr: false,
        terminal: false,
    };
    create(&sb, "c2", &sleeper, none).await.unwrap();
    sb.start_init("c2").await.unwrap();
    jobs += 1;
    wait_for_lines(&log, HANDED, jobs).await;

    for i in 1..=4 {
        wait_for_lines(&log, STANDBY_READY, jobs + 1).await;
        // Field 19 of /proc/PID/stat: the nice value, the agent's (0), as
        // a spawned helper's process gets.
        let script = format!(
            "cat; echo out-{i} nice=$(cut -d' ' -f19 /proc/self/stat); echo err-{i} >&2; exit {i}"
        );
        let input = format!("in-{i}\n");
        let got = exec_with_stdin(
            &sb,
            "c2",
            &format!("e{i}"),
            &script,
            input.as_bytes(),
            false,
        )
        .await;
        assert_eq!(
            got,
            (format!("in-{i}\nout-{i} nice=0\n"), format!("err-{i}\n"), i),
            "exec {i}"
        );
        jobs += 1;
        wait_for_lines(&log, HANDED, jobs).await;
    }

    wait_for_lines(&log, STANDBY_READY, jobs + 1).await;
    let (out, err, status) = exec_with_stdin(&sb, "c2", "tty1", "tty; echo done", b"", true).await;
    let out = out.replace('\r', "");
    assert!(out.contains("/dev/pts/") && out.contains("done"), "{out}");
    assert_eq!((err.as_str(), status), ("", 0));
    jobs += 1;
    wait_for_lines(&log, HANDED, jobs).await;

    wait_for_lines(&log, STANDBY_READY, jobs + 1).await;
    let out = run_container(
        &sb,
        "c3",
        &sh("cat; echo out-c3; echo err-c3 >&2; exit 5"),
        b"in-c3\n",
    )
    .await;
    assert_eq!(
        (text(&out.stdout), text(&out.stderr), out.status),
        ("in-c3\nout-c3\n".into(), "err-c3\n".into(), 5)
    );
    jobs += 1;
    wait_for_lines(&log, HANDED, jobs).await;
    assert_eq!(count_in(&log, NOT_USABLE), 0);
    sb.stop().await;
}

/// A standby killed while it waits: the next job spawns its own helper
/// and works; the one after that gets a standby again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_standby_is_replaced_by_a_spawned_helper() {
    let dir = tempfile::tempdir().unwrap();
    let (sb, log) = debug_sandbox(dir.path(), "agent-standby-kill").await;

    // The killer: in the VM's PID namespace, allowed to kill and to read
    // other processes' memory maps. For each line on its stdin it reports
    // the memory of every idle standby (there is one), kills it, and says
    // "end".
    let mut spec = oci_spec(&sh(r#"
        while read cmd; do
          for p in /proc/[0-9]*; do
            case "$(tr '\000' ' ' < $p/cmdline 2>/dev/null)" in
              "/proc/self/exe __runtime-standby"*)
                echo "memory $(grep -E '^(Rss|Pss|Private_Clean|Private_Dirty|Shared_Clean):' $p/smaps_rollup | tr -s ' \n' '  ')"
                kill -9 ${p#/proc/} && echo "killed ${p#/proc/}" ;;
            esac
          done
          echo end
        done"#));
    in_the_agents_pid_namespace(&mut spec, &[Capability::Kill, Capability::SysPtrace]);

    wait_for_lines(&log, STANDBY_READY, 1).await;
    let killer = sb
        .create_container(ContainerSpec {
            id: "killer",
            oci: &spec,
            layers: &[busybox_layer()],
            dns: None,
            hosts: None,
            rootfs_in_share: None,
            streams: StreamsWanted {
                stdin: true,
                stdout: true,
                stderr: false,
                terminal: false,
            },
        })
        .await
        .unwrap();
    sb.start_init("killer").await.unwrap();
    wait_for_lines(&log, HANDED, 1).await;
    let mut orders = killer.streams.stdin.unwrap();
    let mut reports = BufReader::new(killer.streams.stdout.unwrap());

    // The second standby, idle (given a second to reach its socket):
    // killed.
    wait_for_lines(&log, STANDBY_READY, 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    orders.write_all(b"kill\n").await.unwrap();
    let mut said = Vec::new();
    loop {
        let mut line = String::new();
        reports.read_line(&mut line).await.unwrap();
        assert!(!line.is_empty(), "the killer ended: {said:?}");
        if line == "end\n" {
            break;
        }
        said.push(line.trim_end().to_string());
    }
    eprintln!("the idle standby: {said:?}");
    assert_eq!(said.len(), 2, "one standby found and killed: {said:?}");
    assert!(said[1].starts_with("killed "), "{said:?}");

    // The next create spawns its helper, and works.
    let out = run_container(
        &sb,
        "c1",
        &sh("cat; echo out-c1; echo err-c1 >&2; exit 4"),
        b"in-c1\n",
    )
    .await;
    assert_eq!(
        (text(&out.stdout), text(&out.stderr), out.status),
        ("in-c1\nout-c1\n".into(), "err-c1\n".into(), 4)
    );
    wait_for_lines(&log, NOT_USABLE, 1).await;
    assert_eq!(count_in(&log, HANDED), 1, "c1's job was not handed over");

    // A new standby follows, and takes the next job.
    wait_for_lines(&log, STANDBY_READY, 3).await;
    let out = run_container(&sb, "c2", &sh("cat; exit 6"), b"in-c2\n").await;
    assert_eq!((text(&out.stdout), out.status), ("in-c2\n".into(), 6));
    wait_for_lines(&log, HANDED, 2).await;

    drop(orders);
    assert_eq!(
        sb.agent()
            .wait_process("killer", "")
            .await
            .unwrap()
            .exit_status,
        0
    );
    sb.stop().await;
}

/// Not a test: what a create, a start and an exec cost in a VM that was
/// idle before each (a pooled sandbox's situation), from the host, in ms.
/// `CAPSID_BUILD_DIR` picks the initramfs to measure (docs/performance.md,
/// "The runtime helper started ahead of time").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand with --ignored --nocapture"]
async fn measure_jobs_in_an_idle_vm() {
    const RUNS: usize = 8;
    // Long enough for a standby to be started after the previous job
    // (a second after it) and to reach its socket.
    const IDLE: Duration = Duration::from_millis(2500);
    let dir = tempfile::tempdir().unwrap();
    // With CAPSID_MEASURE_DEBUG set, the agent's debug laps are printed too.
    // With CAPSID_MEASURE_NO_STANDBY set, the agent spawns every helper.
    let mut args = Vec::new();
    let debug = std::env::var_os("CAPSID_MEASURE_DEBUG").is_some();
    if debug {
        args.push("CAPSID_AGENT_LOG=debug");
    }
    if std::env::var_os("CAPSID_MEASURE_NO_STANDBY").is_some() {
        args.push("CAPSID_AGENT_STANDBY=off");
    }
    let (sb, log) = sandbox_with_args(dir.path(), "agent-measure", &args).await;
    let log = debug.then_some(log);
    let none = StreamsWanted {
        stdin: false,
        stdout: false,
        stderr: false,
        terminal: false,
    };
    let sleeper = RunOptions {
        command: vec!["sleep".into(), "100000".into()],
        ..Default::default()
    };
    tokio::time::sleep(IDLE).await;
    create(&sb, "host", &sleeper, none).await.unwrap();
    sb.start_init("host").await.unwrap();
    let process = oci_spec::runtime::ProcessBuilder::default()
        .args(vec!["true".to_string()])
        .env(vec!["PATH=/bin:/usr/bin".to_string()])
        .cwd("/")
        .build()
        .unwrap();
    let (mut creates, mut starts, mut runs, mut execs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    for i in 0..RUNS {
        tokio::time::sleep(IDLE).await;
        let id = format!("c{i}");
        let t = Instant::now();
        let outputs = StreamsWanted {
            stdin: false,
            stdout: true,
            stderr: true,
            terminal: false,
        };
        let created = create(
            &sb,
            &id,
            &RunOptions {
                command: vec!["echo".into()],
                ..Default::default()
            },
            outputs,
        )
        .await
        .unwrap();
        creates.push(ms(t));
        let t = Instant::now();
        sb.start_init(&id).await.unwrap();
        starts.push(ms(t));
        // Then what a shim waits for before it reports the exit: the
        // output at EOF, and the exit.
        let drain = |s: Option<tokio::net::UnixStream>| async move {
            let mut out = Vec::new();
            s.unwrap().read_to_end(&mut out).await.unwrap();
        };
        let (_, _, exit) = tokio::join!(
            drain(created.streams.stdout),
            drain(created.streams.stderr),
            sb.agent().wait_process(&id, "")
        );
        exit.unwrap();
        runs.push(ms(t));
        sb.remove_container(&id).await.unwrap();

        tokio::time::sleep(IDLE).await;
        let exec_id = format!("e{i}");
        let prepared = sb
            .prepare_exec(
                "host",
                &exec_id,
                &serde_json::to_vec(&process).unwrap(),
                none,
            )
            .await
            .unwrap();
        let t = Instant::now();
        sb.start_exec("host", prepared).await.unwrap();
        execs.push(ms(t));
        sb.agent().wait_process("host", &exec_id).await.unwrap();
    }
    for (what, mut v) in [
        ("CreateContainer", creates),
        ("StartProcess (init)", starts),
        ("start to EOF and exit", runs),
        ("StartProcess (exec)", execs),
    ] {
        v.sort_by(f64::total_cmp);
        eprintln!(
            "{what:22} min {:7.1}  median {:7.1}  max {:7.1}  all {:?}",
            v[0],
            (v[RUNS / 2 - 1] + v[RUNS / 2]) / 2.0,
            v[RUNS - 1],
            v.iter().map(|x| x.round() as i64).collect::<Vec<_>>()
        );
    }
    if let Some(log) = log {
        let text = String::from_utf8_lossy(&std::fs::read(log).unwrap()).into_owned();
        for line in text.lines() {
            if line.contains(" lap ") || line.contains("standby") || line.contains("rpc=") {
                eprintln!("{line}");
            }
        }
    }
    sb.stop().await;
}
