//! Docker Engine 26.1 (Debian 13's, on a private containerd 1.7) running
//! containers with `--runtime capsid` (daemon.json: runtimeType
//! `io.containerd.capsid.v2`), each behaviour checked with runc first as
//! the reference. The real `docker` CLI drives everything; see
//! capsid_tests::docker for the harness.

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use capsid_tests::docker::{DockerHarness, BUSYBOX, CAPSID, RUNTIMES, TOOLS, UPSTREAM_NAME};

/// The gateway address of Docker's default bridge network.
fn bridge_gateway(h: &DockerHarness) -> String {
    let (code, out, err) = h.docker(&[
        "network",
        "inspect",
        "bridge",
        "-f",
        "{{(index .IPAM.Config 0).Gateway}}",
    ]);
    assert_eq!(code, 0, "{err}");
    out.trim().to_string()
}

/// Runs `docker ARGS…` with `input` on its stdin.
fn docker_with_input(h: &DockerHarness, args: &[&str], input: &[u8]) -> (i32, String, String) {
    let mut child = h
        .cmd(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_container_runs_with_the_options_people_use() {
    let h = DockerHarness::start();
    for rt in RUNTIMES {
        h.run_ok(rt, &[BUSYBOX, "true"]);
        let (code, _, err) = h.run(rt, &["--rm", BUSYBOX, "sh", "-c", "exit 3"]);
        assert_eq!(code, 3, "[{rt}] {err}");

        let out = h.run_ok(
            rt,
            &[
                "-e",
                "GREETING=hello there",
                "-w",
                "/tmp",
                "-u",
                "1000:1000",
                BUSYBOX,
                "sh",
                "-c",
                "echo \"$GREETING|$(pwd)|$(id -u):$(id -g)\"",
            ],
        );
        assert_eq!(out.trim(), "hello there|/tmp|1000:1000", "[{rt}]");

        let out = h.run_ok(
            rt,
            &[
                "--read-only",
                "--tmpfs",
                "/scratch",
                BUSYBOX,
                "sh",
                "-c",
                "touch /x 2>/dev/null && echo root-writable || echo root-ro; \
                 touch /scratch/x && echo tmpfs-writable",
            ],
        );
        assert_eq!(out.trim(), "root-ro\ntmpfs-writable", "[{rt}]");

        let out = h.run_ok(
            rt,
            &[
                "--shm-size",
                "32m",
                BUSYBOX,
                "sh",
                "-c",
                "df -k /dev/shm | tail -1",
            ],
        );
        let size: u64 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert_eq!(size, 32 * 1024, "[{rt}] {out}");

        // Docker's default sysctls reach the container's network namespace.
        let out = h.run_ok(
            rt,
            &[
                BUSYBOX,
                "cat",
                "/proc/sys/net/ipv4/ip_unprivileged_port_start",
            ],
        );
        assert_eq!(out.trim(), "0", "[{rt}]");

        // Docker's /etc/hosts: --add-host and the container's own address.
        let out = h.run_ok(
            rt,
            &[
                "--add-host",
                "extra.capsid.test:10.1.1.1",
                BUSYBOX,
                "cat",
                "/etc/hosts",
            ],
        );
        assert!(out.contains("10.1.1.1\textra.capsid.test"), "[{rt}] {out}");

        // -i: stdin to EOF.
        let (code, out, err) = docker_with_input(
            &h,
            &["run", "--rm", "-i", "--runtime", rt, BUSYBOX, "wc", "-c"],
            b"twelve bytes",
        );
        assert_eq!((code, out.trim()), (0, "12"), "[{rt}] {err}");

        // Another container's pid namespace names a host process's: under
        // capsid the container gets its own in its VM (it still runs).
        let peer = format!("peer-{rt}");
        let (code, _, err) = h.run(rt, &["-d", "--name", &peer, BUSYBOX, "sleep", "1000"]);
        assert_eq!(code, 0, "[{rt}] {err}");
        h.wait_for(&peer, "{{.State.Running}}", "true", Duration::from_secs(60));
        let out = h.run_ok(
            rt,
            &[
                "--pid",
                &format!("container:{peer}"),
                BUSYBOX,
                "echo",
                "joined",
            ],
        );
        assert_eq!(out.trim(), "joined", "[{rt}]");
        let (code, _, err) = h.docker(&["rm", "-f", &peer]);
        assert_eq!(code, 0, "[{rt}] {err}");

        // -t: the process has a terminal.
        let out = h.run_ok(
            rt,
            &["-t", BUSYBOX, "sh", "-c", "test -t 1 && echo has-tty"],
        );
        assert_eq!(out.trim(), "has-tty", "[{rt}]");
    }
    h.assert_clean();
}

#[test]
fn a_detached_container_lives_and_dies_as_docker_says() {
    let h = DockerHarness::start();
    let script = "trap 'echo got-term; exit 0' TERM; trap 'echo got-usr1' USR1; \
                  echo started; while :; do sleep 0.2; done";
    for rt in RUNTIMES {
        let name = format!("life-{rt}");
        let (code, _, err) = h.run(rt, &["-d", "--name", &name, BUSYBOX, "sh", "-c", script]);
        assert_eq!(code, 0, "[{rt}] {err}\n{}", h.log_tail());
        h.wait_for(&name, "{{.State.Running}}", "true", Duration::from_secs(60));
        wait_log(&h, &name, "started");

        // State.Pid is a host process: the one `docker top` shows.
        let pid = h.inspect(&name, "{{.State.Pid}}");
        assert!(pid.parse::<u32>().unwrap() > 0, "[{rt}] pid {pid}");
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "[{rt}]"
        );
        let (code, out, err) = h.docker(&["top", &name]);
        assert_eq!(code, 0, "[{rt}] {err}");
        assert!(
            out.lines()
                .skip(1)
                .any(|l| l.split_whitespace().nth(1) == Some(pid.as_str())),
            "[{rt}] pid {pid} not in docker top:\n{out}"
        );

        let (code, out, err) =
            h.docker(&["stats", "--no-stream", "--format", "{{.MemUsage}}", &name]);
        assert_eq!(code, 0, "[{rt}] {err}");
        assert!(out.contains("iB"), "[{rt}] {out}");

        let (code, out, _) = h.docker(&["exec", &name, "echo", "from-exec"]);
        assert_eq!((code, out.trim()), (0, "from-exec"), "[{rt}]");
        let (code, _, _) = h.docker(&["exec", &name, "sh", "-c", "exit 7"]);
        assert_eq!(code, 7, "[{rt}]");
        let (code, out, err) = docker_with_input(&h, &["exec", "-i", &name, "cat"], b"piped");
        assert_eq!((code, out.as_str()), (0, "piped"), "[{rt}] {err}");

        let (code, _, err) = h.docker(&["kill", "-s", "USR1", &name]);
        assert_eq!(code, 0, "[{rt}] {err}");
        wait_log(&h, &name, "got-usr1");

        // A trapped SIGTERM: a graceful stop well within the timeout.
        let (code, _, err) = h.docker(&["stop", "-t", "60", &name]);
        assert_eq!(code, 0, "[{rt}] {err}");
        assert_eq!(h.inspect(&name, "{{.State.ExitCode}}"), "0", "[{rt}]");
        wait_log(&h, &name, "got-term");

        // start and restart make a new task of the same container.
        let (code, _, err) = h.docker(&["start", &name]);
        assert_eq!(code, 0, "[{rt}] {err}\n{}", h.log_tail());
        h.wait_for(&name, "{{.State.Running}}", "true", Duration::from_secs(60));
        let (code, _, err) = h.docker(&["restart", "-t", "30", &name]);
        assert_eq!(code, 0, "[{rt}] {err}\n{}", h.log_tail());
        h.wait_for(&name, "{{.State.Running}}", "true", Duration::from_secs(60));
        wait_log_count(&h, &name, "started", 3);

        let (code, _, err) = h.docker(&["rm", "-f", &name]);
        assert_eq!(code, 0, "[{rt}] {err}");

        // No handler: PID 1 ignores SIGTERM, so stop ends in SIGKILL.
        let name = format!("stubborn-{rt}");
        let (code, _, err) = h.run(rt, &["-d", "--name", &name, BUSYBOX, "sleep", "1000"]);
        assert_eq!(code, 0, "[{rt}] {err}");
        h.wait_for(&name, "{{.State.Running}}", "true", Duration::from_secs(60));
        let (code, _, err) = h.docker(&["stop", "-t", "1", &name]);
        assert_eq!(code, 0, "[{rt}] {err}");
        assert_eq!(h.inspect(&name, "{{.State.ExitCode}}"), "137", "[{rt}]");
        let (code, _, err) = h.docker(&["rm", &name]);
        assert_eq!(code, 0, "[{rt}] {err}");

        // A healthcheck runs (as an exec) and turns the container healthy.
        let name = format!("healthy-{rt}");
        let (code, _, err) = h.run(
            rt,
            &[
                "-d",
                "--name",
                &name,
                "--health-cmd",
                "test -e /proc/1",
                "--health-interval",
                "1s",
                BUSYBOX,
                "sleep",
                "1000",
            ],
        );
        assert_eq!(code, 0, "[{rt}] {err}");
        h.wait_for(
            &name,
            "{{.State.Health.Status}}",
            "healthy",
            Duration::from_secs(90),
        );
        let (code, _, err) = h.docker(&["rm", "-f", &name]);
        assert_eq!(code, 0, "[{rt}] {err}");
    }
    h.assert_clean();
}

#[test]
fn containers_are_on_dockers_networks() {
    let h = DockerHarness::start();
    let gateway = bridge_gateway(&h);
    h.load_tools_image();
    let (code, _, err) = h.docker(&["network", "create", "testnet"]);
    assert_eq!(code, 0, "{err}");
    for (rt, port) in RUNTIMES.into_iter().zip(["18080", "18081"]) {
        // The default bridge, its gateway, and the address Docker gave.
        let name = format!("web-{rt}");
        let (code, _, err) = h.run(
            rt,
            &[
                "-d",
                "--name",
                &name,
                "-p",
                &format!("{port}:80"),
                BUSYBOX,
                "sh",
                "-c",
                "mkdir /www && echo hello-from-web > /www/index.html && httpd -f -p 80 -h /www",
            ],
        );
        assert_eq!(code, 0, "[{rt}] {err}\n{}", h.log_tail());
        h.wait_for(&name, "{{.State.Running}}", "true", Duration::from_secs(60));
        let ip = h.inspect(&name, "{{.NetworkSettings.IPAddress}}");
        let (code, out, _) = h.docker(&["exec", &name, "ip", "-4", "-o", "addr", "show", "eth0"]);
        assert_eq!(code, 0, "[{rt}]");
        assert!(out.contains(&format!("{ip}/")), "[{rt}] {ip} not in {out}");
        let out = h.run_ok(rt, &[BUSYBOX, "ping", "-c", "1", "-W", "10", &gateway]);
        assert!(out.contains("1 packets received"), "[{rt}] {out}");

        // A published port answers on the host.
        let url = format!("http://127.0.0.1:{port}/index.html");
        let mut answered = String::new();
        for _ in 0..100 {
            let (code, out, _) = h.in_netns("wget", &["-q", "-T", "5", "-O", "-", &url]);
            if code == 0 {
                answered = out;
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(
            answered.trim(),
            "hello-from-web",
            "[{rt}] {url}\n{}",
            h.log_tail()
        );

        // --network none: no address but loopback's, no route. (capsid's
        // VM keeps its NIC, down and unconfigured.)
        let out = h.run_ok(
            rt,
            &[
                "--network",
                "none",
                BUSYBOX,
                "sh",
                "-c",
                "ip -o addr; echo routes:; ip route",
            ],
        );
        let (addrs, routes) = out.split_once("routes:").unwrap();
        let inet: Vec<&str> = addrs.lines().filter(|l| l.contains(" inet")).collect();
        assert!(
            inet.iter().all(|l| l.contains(" lo ")) && !inet.is_empty(),
            "[{rt}] {out}"
        );
        assert!(routes.trim().is_empty(), "[{rt}] {out}");

        // A user-defined network: containers reach each other by name
        // through Docker's embedded DNS. (busybox's static wget cannot run
        // under runc here: glibc's NSS crashes it; ping by address can.)
        let server = format!("server-{rt}");
        let (code, _, err) = h.run(
            rt,
            &[
                "-d",
                "--name",
                &server,
                "--network",
                "testnet",
                BUSYBOX,
                "sh",
                "-c",
                "mkdir /www && echo hello-by-name > /www/index.html && httpd -f -p 80 -h /www",
            ],
        );
        assert_eq!(code, 0, "[{rt}] {err}");
        h.wait_for(
            &server,
            "{{.State.Running}}",
            "true",
            Duration::from_secs(60),
        );
        let out = h.run_ok(
            rt,
            &[
                "--network",
                "testnet",
                TOOLS,
                "sh",
                "-c",
                &format!(
                    "for i in $(seq 50); do \
                       ip=$(capsid-guest-tool resolve {server}) \
                       && ping -c 1 -W 5 $ip >/dev/null && echo reached-by-name && exit 0; \
                     sleep 0.2; done; exit 1"
                ),
            ],
        );
        assert_eq!(out.trim(), "reached-by-name", "[{rt}]");

        // A name Docker's embedded DNS does not know is asked of the
        // upstream server, from the container's namespace on the host; on
        // the default bridge the container asks it directly.
        let (upstream, ip) = UPSTREAM_NAME;
        let want = format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3]);
        for network in ["testnet", "bridge"] {
            let out = h.run_ok(
                rt,
                &[
                    "--network",
                    network,
                    TOOLS,
                    "capsid-guest-tool",
                    "resolve",
                    upstream,
                ],
            );
            assert_eq!(out.trim(), want, "[{rt}] {network}");
        }
        for n in [&name, &server] {
            let (code, _, err) = h.docker(&["rm", "-f", n]);
            assert_eq!(code, 0, "[{rt}] {err}");
        }
    }
    h.assert_clean();
    let (code, _, err) = h.docker(&["network", "rm", "testnet"]);
    assert_eq!(code, 0, "{err}");
}

/// The container's memory limit and CPU quota, then nproc and MemTotal:
/// cgroup v2 (its own cgroup, found through /proc/self/cgroup when it has
/// no cgroup namespace), or v1 as runc gives on a v1 host.
const CGROUP_LIMITS: &str = "if [ -e /sys/fs/cgroup/cgroup.controllers ]; then \
       d=/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup); \
       [ -e $d/memory.max ] || d=/sys/fs/cgroup; \
       cat $d/memory.max; cut -d' ' -f1 $d/cpu.max; \
     else cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.cfs_quota_us; fi; \
     nproc; grep MemTotal /proc/meminfo";

#[test]
fn memory_and_cpus_size_the_container() {
    let h = DockerHarness::start();
    for rt in RUNTIMES {
        let out = h.run_ok(
            rt,
            &[
                "--memory",
                "256m",
                "--cpus",
                "2",
                BUSYBOX,
                "sh",
                "-c",
                CGROUP_LIMITS,
            ],
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "268435456", "[{rt}] {out}");
        assert_eq!(lines[1], "200000", "[{rt}] {out}");
        if rt == CAPSID {
            // The VM itself is sized from the limits: 2 vCPUs, and RAM
            // for the limit plus the guest's own headroom, not the host's.
            assert_eq!(lines[2], "2", "[{rt}] {out}");
            let kib: u64 = lines[3].split_whitespace().nth(1).unwrap().parse().unwrap();
            assert!((256 * 1024..1024 * 1024).contains(&kib), "[{rt}] {out}");
        }
        // A limit below the VM's minimum still runs: the VM gets its
        // minimum, the container its limit.
        let out = h.run_ok(rt, &["--memory", "16m", BUSYBOX, "sh", "-c", CGROUP_LIMITS]);
        assert_eq!(out.lines().next(), Some("16777216"), "[{rt}] {out}");

        // Going over the limit is an OOM kill Docker reports.
        let name = format!("oom-{rt}");
        let (code, _, _) = h.run(
            rt,
            &[
                "--name",
                &name,
                "--memory",
                "32m",
                "--memory-swap",
                "32m",
                BUSYBOX,
                "sh",
                "-c",
                "a=xxxxxxxxxxxxxxxx; while :; do a=$a$a; done",
            ],
        );
        assert_eq!(code, 137, "[{rt}]");
        assert_eq!(h.inspect(&name, "{{.State.OOMKilled}}"), "true", "[{rt}]");
        let (code, _, err) = h.docker(&["rm", &name]);
        assert_eq!(code, 0, "[{rt}] {err}");
    }
    h.assert_clean();
}

#[test]
fn bad_input_gets_dockers_error_and_leaves_nothing() {
    let h = DockerHarness::start();
    let mut reference = Vec::new();
    for rt in RUNTIMES {
        let cases: [&[&str]; 3] = [
            &["--rm", BUSYBOX, "/no/such/program"],
            &["--rm", "-u", "nosuchuser", BUSYBOX, "true"],
            &["--rm", "--network", "host", BUSYBOX, "true"],
        ];
        let mut codes = Vec::new();
        for args in cases {
            let (code, out, err) = h.run(rt, args);
            let line = err
                .lines()
                .find(|l| l.starts_with("docker: Error response"));
            codes.push(code);
            if rt == CAPSID && args.contains(&"host") {
                // Host networking is what a VM cannot give.
                assert_eq!(code, 125, "[{rt}] {args:?}: {out}{err}");
                assert!(
                    line.is_some_and(|l| l.contains("host's network namespace")),
                    "[{rt}] {err}"
                );
                continue;
            }
            if !args.contains(&"host") {
                assert_ne!(code, 0, "[{rt}] {args:?}: {out}{err}");
                assert!(line.is_some(), "[{rt}] {args:?}: no error line in {err:?}");
            }
        }
        if rt == RUNTIMES[0] {
            reference = codes;
        } else {
            assert_eq!(codes[..2], reference[..2], "exit codes differ from runc's");
        }
    }
    let (code, _, err) = h.docker(&[
        "run",
        "--rm",
        "--runtime",
        "io.containerd.capsid-nosuch.v2",
        BUSYBOX,
        "true",
    ]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("capsid-nosuch"), "{err}");
    let (code, _, err) = h.docker(&[
        "run",
        "--rm",
        "--runtime",
        "capsid-missing-config",
        BUSYBOX,
        "true",
    ]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("no-such-config.toml"), "{err}");
    h.assert_clean();
}

/// Waits until `docker logs NAME` contains `text`.
fn wait_log(h: &DockerHarness, name: &str, text: &str) {
    for _ in 0..300 {
        let (_, out, _) = h.docker(&["logs", name]);
        if out.contains(text) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, out, err) = h.docker(&["logs", name]);
    panic!(
        "{name}: {text:?} not in its logs:\n{out}{err}\n{}",
        h.log_tail()
    );
}

/// Waits until `docker logs NAME` contains `text` `count` times.
fn wait_log_count(h: &DockerHarness, name: &str, text: &str, count: usize) {
    for _ in 0..300 {
        let (_, out, _) = h.docker(&["logs", name]);
        if out.matches(text).count() >= count {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, out, err) = h.docker(&["logs", name]);
    panic!(
        "{name}: {text:?} not {count} times in its logs:\n{out}{err}\n{}",
        h.log_tail()
    );
}

#[test]
fn volumes_bind_mounts_named_volumes_and_init() {
    let h = DockerHarness::start();
    let host = h.dir().join("host-data");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("in.txt"), "from the host\n").unwrap();
    let cfg = h.dir().join("app.conf");
    std::fs::write(&cfg, "setting=1\n").unwrap();
    let data = format!("{}:/data", host.display());
    let mount = format!("type=bind,src={},dst=/etc/app.conf,readonly", cfg.display());
    for rt in RUNTIMES {
        // -v read-write, --mount read-only single file.
        let out = h.run_ok(
            rt,
            &[
                "-v",
                &data,
                "--mount",
                &mount,
                BUSYBOX,
                "sh",
                "-c",
                &format!(
                    "cat /data/in.txt /etc/app.conf; echo {rt} > /data/by-{rt}; \
                     echo x >> /etc/app.conf 2>/dev/null || echo conf-refused"
                ),
            ],
        );
        assert_eq!(out, "from the host\nsetting=1\nconf-refused\n", "[{rt}]");
        assert_eq!(
            std::fs::read_to_string(host.join(format!("by-{rt}"))).unwrap(),
            format!("{rt}\n"),
            "[{rt}] the write is on the host when the container exited"
        );
        assert_eq!(std::fs::read_to_string(&cfg).unwrap(), "setting=1\n");

        // A named volume keeps data from one container to the next.
        let volume = format!("vol-{rt}");
        let (code, _, err) = h.docker(&["volume", "create", &volume]);
        assert_eq!(code, 0, "{err}");
        let at = format!("{volume}:/v");
        h.run_ok(rt, &["-v", &at, BUSYBOX, "sh", "-c", "echo kept > /v/f"]);
        let out = h.run_ok(rt, &["-v", &at, BUSYBOX, "cat", "/v/f"]);
        assert_eq!(out, "kept\n", "[{rt}]");

        // --init: Docker binds its docker-init (tini) as the container's init.
        let out = h.run_ok(
            rt,
            &[
                "--init",
                BUSYBOX,
                "sh",
                "-c",
                "cat /proc/1/cmdline | tr '\\0' ' '",
            ],
        );
        assert!(out.starts_with("/sbin/docker-init -- sh"), "[{rt}] {out}");
    }
    // A device node cannot be shared with a VM: one error (runc binds it).
    let (code, _, err) = h.run(CAPSID, &["--rm", "-v", "/dev/null:/x", BUSYBOX, "true"]);
    assert_eq!(code, 125, "{err}");
    assert!(
        err.contains("/dev/null") && err.contains("device node"),
        "{err}"
    );
    h.assert_clean();
}

#[test]
fn docker_run_takes_a_pooled_sandbox_on_dockers_network() {
    let h = DockerHarness::start();
    let gateway = bridge_gateway(&h);
    let config = h.dir().join("capsid.toml");
    capsid_tests::pool::enable(&config, 256, 1);
    let daemon = capsid_tests::pool::PoolDaemon::start(&config);
    for rt in RUNTIMES {
        if rt == CAPSID {
            daemon.wait_ready(1, Duration::from_secs(180));
        }
        let out = h.run_ok(
            rt,
            &[
                BUSYBOX,
                "sh",
                "-c",
                &format!("ip -4 -o addr show eth0 | grep -c inet; ping -c 1 -W 10 {gateway} | grep -c '1 packets received'"),
            ],
        );
        assert_eq!(out, "1\n1\n", "[{rt}] {}", h.log_tail());
    }
    assert!(
        h.log().contains("the task takes a pooled sandbox"),
        "{}",
        h.log_tail()
    );
    drop(daemon);
    h.assert_clean();
}
