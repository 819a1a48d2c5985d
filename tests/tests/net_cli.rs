//! `capsid run --network bridge --publish --dns`: the bundled CNI network
//! (Debian's plugins), published and unpublished ports, outbound traffic,
//! clean-up on every way out, and the bad-input refusals.
//!
//! Every `capsid run` here runs inside a network namespace the test makes
//! (`ip netns exec`), so the bridge, the NAT rules and all test traffic stay
//! in it: the host's own namespace is never touched and nothing is routed
//! off the machine. The test compares that namespace before and after.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use capsid_tests::bin;
use capsid_tests::cli::{stderr, Capsid};

/// How long a TCG guest may take to boot and start its servers.
const BOOT: Duration = Duration::from_secs(180);
/// The iptables chains the CNI plugins share between all their containers
/// (created once, never removed by DEL): the only CNI names allowed after.
const SHARED_CHAINS: [&str; 6] = [
    "CNI-HOSTPORT-DNAT",
    "CNI-HOSTPORT-SNAT",
    "CNI-HOSTPORT-MASQ",
    "CNI-HOSTPORT-SETMARK",
    "CNI-FORWARD",
    "CNI-ADMIN",
];

/// A network namespace of this test, deleted (with its processes) on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("capsid-t-{}-{tag}", std::process::id());
        sh(&format!(
            "ip netns add {name} && ip -n {name} link set lo up"
        ));
        Self { name }
    }

    /// `ip netns exec NAME ARGS`.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// A shell script inside the namespace: (status, stdout).
    fn sh(&self, script: &str) -> (i32, String) {
        let o = self.cmd(&["sh", "-c", script]).output().unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    }

    /// `capsid run ARGS` inside the namespace.
    fn capsid_run(&self, c: &Capsid, args: &[&str]) -> Command {
        self.capsid_run_with(c.config(), args)
    }

    /// `capsid --config CONFIG run ARGS` inside the namespace.
    fn capsid_run_with(&self, config: &Path, args: &[&str]) -> Command {
        let mut cmd = self.cmd(&[bin("capsid").to_str().unwrap(), "--config"]);
        cmd.arg(config).arg("run").args(args);
        cmd
    }

    /// Everything in the namespace that capsid or the plugins could leave:
    /// interfaces, iptables rules, nftables ruleset.
    fn snapshot(&self) -> String {
        self.sh("ip -o link show | cut -d' ' -f2; iptables-save | grep -v '^#'; nft list ruleset")
            .1
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                // After a failed test: capsid, killed, leaves its namespace file.
                "for p in $(ip netns pids {0}); do kill -9 $p; \
                 rm -f /run/netns/capsid-run-$p; done; ip netns del {0}",
                self.name
            ))
            .status();
    }
}

fn sh(script: &str) -> String {
    let o = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(
        o.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The named namespaces capsid made (`capsid-run-PID`).
fn capsid_netns() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("capsid-run-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Host-local leases of the bundled network in this capsid's state dir.
fn leases(c: &Capsid) -> Vec<String> {
    let dir = c.dir.path().join("run/.cni/ipam/capsid");
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "lock" && !n.starts_with("last_reserved_ip"))
                .collect()
        })
        .unwrap_or_default()
}

/// A `capsid run` in the background whose stdout lines are collected.
struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for the line `want`; panics with what was seen (and stderr)
    /// if the process ends first.
    fn wait_for(&mut self, want: &str) {
        loop {
            match self.lines.recv_timeout(BOOT) {
                Ok(line) => {
                    let done = line == want;
                    self.seen.push(line);
                    if done {
                        return;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    let err = read_stderr(&mut self.child);
                    panic!("no {want:?} line; stdout {:?}; stderr {err}", self.seen);
                }
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: &str) {
        sh(&format!("kill -{sig} {}", self.pid()));
    }

    /// Sends SIGINT until capsid ends (a second one within 5 s is SIGKILL
    /// for a container whose PID 1 ignores SIGINT).
    fn interrupt_until_exit(&mut self) {
        for _ in 0..20 {
            self.signal("INT");
            for _ in 0..20 {
                if self.child.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("capsid run does not end on SIGINT");
    }

    /// Closes stdin and waits: (status, stderr, all stdout lines).
    fn finish(mut self) -> (Option<i32>, String, Vec<String>) {
        drop(self.stdin.take());
        let status = self.child.wait().unwrap();
        let err = read_stderr(&mut self.child);
        // The reader thread ends at EOF: take every line it sent.
        self.seen.extend(self.lines.iter());
        (status.code(), err, self.seen)
    }
}

fn read_stderr(child: &mut Child) -> String {
    use std::io::Read;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    err
}

/// After a `capsid run` ended: no capsid namespace, no lease, nothing new
/// in the test namespace but the plugins' shared (empty) chains, nothing
/// of the sandbox on the host.
fn assert_clean(c: &Capsid, ns: &Netns, before: &str, pid: u32, ip: &str) {
    let netns = format!("capsid-run-{pid}");
    assert!(
        !capsid_netns().contains(&netns),
        "namespace {netns} left behind"
    );
    assert!(leases(c).is_empty(), "IPAM leases left: {:?}", leases(c));
    let after = ns.snapshot();
    // Interfaces: exactly those there were (no bridge, veth or tap).
    let links = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| l.ends_with(':') && !l.contains(' ') && !l.starts_with(':'))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(links(&after), links(before), "interfaces left behind");
    for line in after.lines() {
        if before.lines().any(|b| b == line) {
            continue;
        }
        let lower = line.to_lowercase();
        assert!(
            !lower.contains("capsid")
                && !line.contains(&format!("run-{pid}"))
                && (ip.is_empty()
                    || !line.contains(&format!("{ip}/")) && !line.contains(&format!("{ip} "))),
            "left in the test namespace: {line}\n--- before:\n{before}\n--- after:\n{after}"
        );
        for word in line.split(|c: char| c.is_whitespace() || c == '"' || c == ':') {
            if word.starts_with("CNI-") {
                assert!(
                    SHARED_CHAINS.contains(&word),
                    "per-container chain left: {line}\n--- after:\n{after}"
                );
            }
        }
    }
    c.assert_no_leftovers();
}

/// Serves `text` from a second test namespace joined to `ns` by a veth
/// (10.250.0.1 ↔ 10.250.0.2): the guest's outbound target.
fn outside_server(ns: &Netns, srv: &Netns, dir: &Path, text: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("index.html"), text).unwrap();
    sh(&format!(
        "ip -n {ns} link add vh0 type veth peer name vs0 netns {srv} && \
         ip -n {ns} addr add 10.250.0.1/24 dev vh0 && ip -n {ns} link set vh0 up && \
         ip -n {srv} addr add 10.250.0.2/24 dev vs0 && ip -n {srv} link set vs0 up",
        ns = ns.name,
        srv = srv.name
    ));
    let o = srv
        .cmd(&[
            "busybox",
            "httpd",
            "-p",
            "8000",
            "-h",
            dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `wget` from inside `ns`: the body, or `None` when it cannot connect.
fn fetch(ns: &Netns, url: &str) -> Option<String> {
    let (code, out) = ns.sh(&format!("timeout 30 busybox wget -q -O- {url}"));
    (code == 0).then_some(out)
}

#[test]
fn published_port_serves_and_nothing_else_is_exposed() {
    let c = Capsid::new();
    let ns = Netns::new("pub");
    let srv = Netns::new("srv");
    // (Its files live apart from capsid's: the server is not a leftover.)
    let www = tempfile::tempdir().unwrap();
    outside_server(&ns, &srv, www.path(), "OUTSIDE\n");
    let before = ns.snapshot();

    let script = "mkdir -p /w && echo PAGE > /w/index.html && echo SECRET > /w/s.html && \
                  httpd -p 81 -h /w && httpd -p 80 -h /w && \
                  wget -q -O- http://10.250.0.2:8000/; \
                  grep nameserver /etc/resolv.conf; echo READY; read x; echo BYE";
    let mut run = Running::spawn(ns.capsid_run(
        &c,
        &[
            "--publish",
            "18080:80",
            "--publish",
            "18053:53/udp",
            "--dns",
            "10.250.0.53",
            "--",
            "sh",
            "-c",
            script,
        ],
    ));
    run.wait_for("READY");
    // Outbound: the guest reached a server in another namespace through
    // the bridge and the masquerade; --dns reached its resolv.conf.
    assert!(run.seen.contains(&"OUTSIDE".to_owned()), "{:?}", run.seen);
    assert!(
        run.seen.contains(&"nameserver 10.250.0.53".to_owned()),
        "{:?}",
        run.seen
    );
    let pid = run.pid();
    assert!(capsid_netns().contains(&format!("capsid-run-{pid}")));
    let lease = leases(&c);
    assert_eq!(lease.len(), 1, "{lease:?}");
    let ip = lease[0].clone();

    // Published: on 127.0.0.1 and on the namespace's own address.
    assert_eq!(
        fetch(&ns, "http://127.0.0.1:18080/").as_deref(),
        Some("PAGE\n")
    );
    assert_eq!(
        fetch(&ns, "http://10.250.0.1:18080/s.html").as_deref(),
        Some("SECRET\n")
    );
    // Unpublished: port 81, whether through loopback or the container's own
    // address, and port 80 straight to the container (only 18080 is
    // published).
    assert_eq!(fetch(&ns, "http://127.0.0.1:81/"), None);
    assert_eq!(fetch(&ns, &format!("http://{ip}:81/")), None);
    assert_eq!(fetch(&ns, &format!("http://{ip}:80/")), None);
    // The DNAT rule names the container's address while it runs.
    assert!(ns.snapshot().contains(&ip));

    let (code, err, seen) = run.finish();
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(seen.last().map(String::as_str), Some("BYE"), "{seen:?}");
    assert_clean(&c, &ns, &before, pid, &ip);
}

#[test]
fn signals_and_vm_death_still_clean_up() {
    let c = Capsid::new();
    let ns = Netns::new("sig");
    let before = ns.snapshot();

    // Ctrl-C: the container ends by SIGINT (130) or, if its PID 1 ignores
    // that, by the SIGKILL a second one sends (137).
    let mut run = Running::spawn(ns.capsid_run(
        &c,
        &[
            "--publish",
            "18090:80",
            "--",
            "sh",
            "-c",
            "echo READY; read x",
        ],
    ));
    run.wait_for("READY");
    let (pid, ip) = (run.pid(), leases(&c).pop().unwrap());
    run.interrupt_until_exit();
    let (code, err, _) = run.finish();
    assert!(matches!(code, Some(130) | Some(137)), "{code:?} {err}");
    assert_clean(&c, &ns, &before, pid, &ip);

    // SIGTERM while the VM is starting (the namespace exists, the
    // container may or may not run yet): capsid stops, removing everything.
    let mut run = Running::spawn(ns.capsid_run(
        &c,
        &[
            "--network",
            "bridge",
            "--",
            "sh",
            "-c",
            "trap 'exit 143' TERM; echo READY; while :; do sleep 1; done",
        ],
    ));
    let pid = run.pid();
    let netns = PathBuf::from(format!("/run/netns/capsid-run-{pid}"));
    while !netns.exists() {
        assert!(
            run.child.try_wait().unwrap().is_none(),
            "capsid ended before making its network"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ip = leases(&c).pop().unwrap_or_default();
    run.signal("TERM");
    let (code, err, _) = run.finish();
    assert!(matches!(code, Some(125) | Some(143)), "{code:?} {err}");
    assert_clean(&c, &ns, &before, pid, &ip);

    // The VM dies under the container: capsid reports it and cleans up.
    let mut run = Running::spawn(ns.capsid_run(
        &c,
        &[
            "--publish",
            "18091:80",
            "--",
            "sh",
            "-c",
            "echo READY; read x",
        ],
    ));
    run.wait_for("READY");
    let (pid, ip) = (run.pid(), leases(&c).pop().unwrap());
    let marker = c.dir.path().display().to_string();
    let qemu: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.split('\0')
                    .next()
                    .is_some_and(|exe| exe.contains("qemu-system"))
                    && c.contains(&marker)
            })
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    sh(&format!("kill -9 {}", qemu[0]));
    let (code, err, _) = run.finish();
    assert_eq!(code, Some(125), "{err}");
    // (Whichever notices first: the VM's exit or the agent's lost socket.)
    assert!(
        err.lines()
            .last()
            .is_some_and(|l| l.starts_with("capsid: ")),
        "{err}"
    );
    assert_clean(&c, &ns, &before, pid, &ip);
}

/// Runs `capsid run ARGS -- true` in `ns` and checks the refusal: exit
/// 125, one `capsid:` line containing `want`, nothing made.
fn refused(c: &Capsid, ns: &Netns, args: &[&str], want: &str) {
    let before = ns.snapshot();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--", "true"]);
    let o: Output = ns
        .capsid_run(c, &all)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(125), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    assert!(
        err.starts_with("capsid: ") && err.contains(want),
        "{args:?}: {err}"
    );
    assert_eq!(ns.snapshot(), before, "{args:?} changed the namespace");
    assert!(!c.dir.path().join("run/.cni").exists(), "{args:?}");
    c.assert_no_leftovers();
}

#[test]
fn bad_network_flags_are_refused_with_nothing_left() {
    let c = Capsid::new();
    let ns = Netns::new("bad");
    refused(
        &c,
        &ns,
        &["--publish", "99999:80"],
        "--publish \"99999:80\": host port 99999 is not between 1 and 65535",
    );
    refused(
        &c,
        &ns,
        &["--publish", "abc"],
        "--publish \"abc\": expected HOST:CONTAINER[/tcp|udp]",
    );
    refused(
        &c,
        &ns,
        &["--publish", "8080:80/sctp"],
        "protocol \"sctp\" is not tcp or udp",
    );
    refused(
        &c,
        &ns,
        &["--network", "bogus"],
        "--network \"bogus\": unknown network mode (expected none or bridge)",
    );
    refused(
        &c,
        &ns,
        &["--network", "none", "--publish", "8080:80"],
        "cannot be used with --network none",
    );
    refused(
        &c,
        &ns,
        &["--dns", "nowhere"],
        "--dns \"nowhere\" is not an IP address",
    );
    // A port something already listens on (in the namespace capsid runs in).
    // (Served from a directory of its own: it is not capsid's leftover.)
    let www = tempfile::tempdir().unwrap();
    let o = ns
        .cmd(&[
            "busybox",
            "httpd",
            "-p",
            "18081",
            "-h",
            www.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    refused(
        &c,
        &ns,
        &["--publish", "18081:80"],
        "--publish: host port 18081/tcp is already in use",
    );
    refused(
        &c,
        &ns,
        &["--publish", "18082:80", "--publish", "18082:81"],
        "host port 18082/tcp is published twice",
    );
    // Without --publish nor --network there is no NIC (only loopback and
    // the kernel's own sit0) and no namespace.
    let before = ns.snapshot();
    let o = ns
        .capsid_run(&c, &["--", "sh", "-c", "ls /sys/class/net"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let nics = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(nics.lines().all(|n| n == "lo" || n == "sit0"), "{nics}");
    assert_eq!(ns.snapshot(), before);
    assert!(!c.dir.path().join("run/.cni").exists());
    c.assert_no_leftovers();
}

#[test]
fn failing_plugin_is_quoted_and_its_chain_undone() {
    let c = Capsid::new();
    let ns = Netns::new("plug");
    // A user's conflist whose last plugin fails: the bridge, portmap and
    // firewall ADDs before it must all be DELeted.
    let ipam = c.dir.path().join("ipam");
    let conflist = c.dir.path().join("bad.conflist");
    std::fs::write(
        &conflist,
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "capsidbad",
            "plugins": [
                { "type": "bridge", "bridge": "capsidb0", "isGateway": true, "ipMasq": true,
                  "ipam": { "type": "host-local", "ranges": [[{ "subnet": "10.214.0.0/24" }]],
                            "dataDir": ipam } },
                { "type": "portmap", "capabilities": { "portMappings": true } },
                { "type": "firewall" },
                { "type": "tuning", "sysctl": { "net.ipv4.conf.eth0.no_such_knob": "1" } },
            ],
        })
        .to_string(),
    )
    .unwrap();
    let mut config: capsid_sandbox::config::Config =
        toml::from_str(&std::fs::read_to_string(c.config()).unwrap()).unwrap();
    config.network.conflist = Some(conflist);
    let config_path = c.dir.path().join("bad.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();

    let child = ns
        .capsid_run_with(&config_path, &["--publish", "18083:80", "--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(125), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("capsid: CNI plugin tuning failed (ADD): ")
            && last.contains("no_such_knob"),
        "{err}"
    );
    assert!(!capsid_netns().contains(&format!("capsid-run-{pid}")));
    let leases: Vec<_> = std::fs::read_dir(ipam.join("capsidbad"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
        .collect();
    assert!(leases.is_empty(), "{leases:?}");
    let rules = ns.sh("iptables-save").1;
    assert!(
        !rules.contains("10.214.0.") && !rules.contains("run-") && !rules.contains("CAPSID-"),
        "{rules}"
    );
    // The user's bridge stays, as CNI bridges do; no veth is left on it.
    let (_, ports) = ns.sh("ip -o link show master capsidb0");
    assert_eq!(ports, "");
    c.assert_no_leftovers();
}

/// The processes of this test's capsid (their command line names its
/// directory), but not the `capsid run` itself.
fn sandbox_processes(c: &Capsid, capsid_pid: u32) -> Vec<u32> {
    let marker = c.dir.path().display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| *pid != capsid_pid)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&marker))
        })
        .filter(|pid| {
            // (A zombie waiting for its reaper is gone.)
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
        })
        .collect()
}

/// The records of running `capsid run`s in this capsid's state dir.
fn run_records(c: &Capsid) -> Vec<String> {
    capsid_tests::cli::run_records(&c.dir.path().join("run/.runs"))
}

/// Waits (up to `BOOT`) until `what` holds.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < BOOT, "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_runs_leftovers_are_removed_by_the_next_run_or_gc() {
    let c = Capsid::new();
    let ns = Netns::new("kill");
    let before = ns.snapshot();

    // SIGKILL once the container runs: nothing of capsid runs its
    // clean-up, but the kernel kills the VM's processes with it. (Entered
    // with nsenter, which keeps the host's mount namespace, as a
    // `capsid run` on the host has: the bind mount pinning the
    // container's namespace survives, and with it the veth and the tap.)
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", ns.name))
        .arg(bin("capsid"))
        .arg("--config")
        .arg(c.config())
        .args([
            "run",
            "--publish",
            "18093:80",
            "--",
            "sh",
            "-c",
            "echo READY; read x",
        ]);
    let mut run = Running::spawn(cmd);
    run.wait_for("READY");
    let (pid, ip) = (run.pid(), leases(&c).pop().unwrap());
    assert!(!sandbox_processes(&c, pid).is_empty());
    assert_eq!(run_records(&c), [format!("run-{pid}.json")]);
    run.signal("KILL");
    let _ = run.child.wait();
    wait_until("the VM's processes are gone", || {
        sandbox_processes(&c, pid).is_empty()
    });
    // Left behind: the namespace file, the lease, the port's DNAT, the
    // masquerade and isolation rules, the run directory, the record.
    assert!(capsid_netns().contains(&format!("capsid-run-{pid}")));
    let links = sh(&format!("ip -n capsid-run-{pid} -o link show"));
    assert!(
        links.contains("eth0@") && links.contains("tap0_"),
        "{links}"
    );
    assert_eq!(leases(&c), std::slice::from_ref(&ip));
    let rules = ns.sh("iptables-save").1;
    assert!(
        rules.contains("18093") && rules.contains("CAPSID-"),
        "{rules}"
    );
    assert!(rules.contains(&format!("{ip}/32")), "{rules}");
    assert!(c.dir.path().join(format!("run/run-{pid}")).exists());
    assert_eq!(run_records(&c), [format!("run-{pid}.json")]);
    // The jail's cgroups, whose processes are gone.
    let cgroups = capsid_tests::cli::jail_cgroups(&format!("run-{pid}"));
    assert!(!cgroups.is_empty());

    // The next run removes all of it before it starts. (Entered with
    // nsenter too: under `ip netns exec`, which mounts a sysfs of its own,
    // the cgroup filesystems the killed run used are out of sight.)
    let o = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name))
        .arg(bin("capsid"))
        .arg("--config")
        .arg(c.config())
        .args(["run", "--", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let left = capsid_tests::cli::jail_cgroups(&format!("run-{pid}"));
    assert!(left.is_empty(), "cgroups left: {left:?}");
    // Nothing but the notice that TCG is no security boundary, where the
    // host runs guests under TCG.
    let err = stderr(&o);
    let other: Vec<&str> = err
        .lines()
        .filter(|l| !l.contains("not a security boundary"))
        .collect();
    assert!(other.is_empty(), "{err}");
    assert!(run_records(&c).is_empty(), "{:?}", run_records(&c));
    assert_clean(&c, &ns, &before, pid, &ip);

    // SIGKILL in the middle of the set-up (the namespace exists; ADD, the
    // filter, the tap, the VM may or may not): `capsid gc` removes
    // whatever there is.
    let mut run = Running::spawn(ns.capsid_run(
        &c,
        &[
            "--publish",
            "18094:80",
            "--",
            "sh",
            "-c",
            "echo READY; read x",
        ],
    ));
    let pid = run.pid();
    let netns = PathBuf::from(format!("/run/netns/capsid-run-{pid}"));
    wait_until("the namespace exists", || {
        assert!(
            run.child.try_wait().unwrap().is_none(),
            "capsid ended before making its network"
        );
        netns.exists()
    });
    run.signal("KILL");
    let _ = run.child.wait();
    let ip = leases(&c).pop().unwrap_or_default();
    wait_until("the VM's processes are gone", || {
        sandbox_processes(&c, pid).is_empty()
    });
    assert_eq!(run_records(&c), [format!("run-{pid}.json")]);
    let o = ns
        .cmd(&[bin("capsid").to_str().unwrap(), "--config"])
        .arg(c.config())
        .arg("gc")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .collect::<Vec<_>>(),
        [format!("run-{pid}: removed (killed 0 processes)")]
    );
    assert_clean(&c, &ns, &before, pid, &ip);
    // Nothing more to do: gc says nothing.
    let o = ns
        .cmd(&[bin("capsid").to_str().unwrap(), "--config"])
        .arg(c.config())
        .arg("gc")
        .output()
        .unwrap();
    assert_eq!((o.status.code(), o.stdout.len()), (Some(0), 0));
}

/// A pooled sandbox on the run's network: `capsid-poold` booted the VM
/// before the run, whose CNI namespace then takes the VM's tap. Published
/// port, outbound traffic and `--dns` as for a cold run, and the same
/// clean-up.
#[test]
fn a_pooled_run_joins_its_network() {
    let c = Capsid::new();
    let mut config = capsid_sandbox::config::Config::read(c.config()).unwrap();
    config.pool.enabled = true;
    config.pool.shapes = vec![capsid_sandbox::config::PoolShapeConfig {
        vcpus: 1,
        memory_mib: 256,
        size: 1,
        max_memory_mib: 0,
    }];
    std::fs::write(c.config(), toml::to_string(&config).unwrap()).unwrap();
    let daemon = capsid_tests::pool::PoolDaemon::start(c.config());
    daemon.wait_ready(1, BOOT);

    let ns = Netns::new("pool");
    let srv = Netns::new("psrv");
    let www = tempfile::tempdir().unwrap();
    outside_server(&ns, &srv, www.path(), "OUTSIDE\n");
    let before = ns.snapshot();
    let script = "mkdir -p /w && echo PAGE > /w/index.html && httpd -p 80 -h /w && \
                  wget -q -O- http://10.250.0.2:8000/; \
                  grep nameserver /etc/resolv.conf; echo READY; read x; echo BYE";
    let mut cmd = ns.capsid_run(
        &c,
        &[
            "--publish",
            "18080:80",
            "--dns",
            "10.250.0.53",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    cmd.env("CAPSID_LOG", "info");
    let mut run = Running::spawn(cmd);
    run.wait_for("READY");
    assert!(run.seen.contains(&"OUTSIDE".to_owned()), "{:?}", run.seen);
    assert!(
        run.seen.contains(&"nameserver 10.250.0.53".to_owned()),
        "{:?}",
        run.seen
    );
    let lease = leases(&c);
    assert_eq!(lease.len(), 1, "{lease:?}");
    let ip = lease[0].clone();
    assert_eq!(
        fetch(&ns, "http://127.0.0.1:18080/").as_deref(),
        Some("PAGE\n")
    );
    let pid = run.pid();
    let (code, err, seen) = run.finish();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("the run takes a pooled sandbox"), "{err}");
    assert_eq!(seen.last().map(String::as_str), Some("BYE"), "{seen:?}");
    drop(daemon);
    assert_clean(&c, &ns, &before, pid, &ip);
}
