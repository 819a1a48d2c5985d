//! Containment on the bundled network (`capsid run --network bridge`,
//! `--publish`): a guest controls its own kernel, so what it sends is
//! checked outside it. Two guests on `capsid0`: neither opens a connection
//! to the host (the bridge's IPv4 and IPv6 link-local addresses, another
//! host address) nor to the other's unpublished ports; published ports and
//! outbound NAT keep working; a guest that takes another MAC or IPv4
//! address (and ARPs with it) gets nothing out with them.
//!
//! The prober is the hostile guest: its container holds CAP_NET_ADMIN and
//! CAP_NET_RAW (all a guest kernel under the attacker's control needs to
//! send what it likes; `capsid run` grants neither), so it is put on the
//! network the way `capsid run --network bridge` does it, through the same
//! library calls (`CniNetwork::setup`, `Sandbox::start` with its NIC), with
//! a spec of the test's. The target is a plain `capsid run --publish`.
//!
//! As in `net_cli`, everything runs in a network namespace of the test,
//! which plays the host: the bridge, capsid's nftables table, the test's
//! listeners and counters all live there and go with it. Root and the
//! build's assets are needed.
//!
//! Guests are kept apart twice: the `CAPSID-` chains in iptables FORWARD,
//! which see bridged traffic only where `br_netfilter` is loaded, and the
//! isolation of each sandbox's bridge port, which holds without it. The
//! scenario runs once with `br_netfilter` out of the way (its
//! `bridge-nf-call-iptables` turned off in the test's namespace, which is
//! what a host without the module amounts to) and once with it.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, SocketAddrV6, TcpListener};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use capsid_sandbox::cni::CniNetwork;
use capsid_sandbox::config::Config;
use capsid_sandbox::container::ContainerSpec;
use capsid_sandbox::sandbox::{backend_for, Sandbox, SandboxOptions};
use capsid_sandbox::stdio::StreamsWanted;
use capsid_tests::cli::{stderr, Capsid};
use capsid_tests::sandbox::{busybox_layer, erofs_from_layout, oci_spec};
use capsid_tests::{artifact, bin};
use oci_spec::runtime::Capability;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// How long a TCG guest may take to boot or to run one phase of its script.
const BOOT: Duration = Duration::from_secs(240);
/// The port the test's host listeners use.
const HOST_PORT: u16 = 9100;
/// An address of the bundled subnet that no sandbox is given.
const FOREIGN_IP: &str = "10.213.0.200";
/// A MAC that no sandbox has.
const FOREIGN_MAC: &str = "02:00:00:00:00:99";

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

    fn capsid_run(&self, c: &Capsid, args: &[&str]) -> Command {
        let mut cmd = self.cmd(&[bin("capsid").to_str().unwrap(), "--config"]);
        cmd.arg(c.config()).arg("run").args(args);
        cmd
    }

    /// What capsid or the plugins could leave in the namespace.
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

    /// Waits for the line `want`; the lines before it (since the last
    /// marker). Panics with what was seen and stderr if it never comes.
    fn wait_for(&mut self, want: &str) -> Vec<String> {
        let mut phase = Vec::new();
        loop {
            match self.lines.recv_timeout(BOOT) {
                Ok(line) if line == want => {
                    self.seen.push(line);
                    return phase;
                }
                Ok(line) => {
                    self.seen.push(line.clone());
                    phase.push(line);
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    let mut err = String::new();
                    if let Some(mut e) = self.child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut err);
                    }
                    panic!("no {want:?} line; stdout {:?}; stderr {err}", self.seen);
                }
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes stdin and waits: (status, stderr).
    fn finish(mut self) -> (Option<i32>, String) {
        drop(self.stdin.take());
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        (status.code(), err)
    }
}

/// The hostile prober: a sandbox on the bundled network whose container
/// may change its interface and send raw packets, driven like [`Running`].
/// Everything of it (CNI, the VM, its teardown) happens in a thread that
/// entered the test's host namespace, as `capsid run` would there.
struct Hostile {
    /// Its sandbox id.
    id: String,
    input: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hostile {
    fn spawn(c: &Capsid, ns: &Netns, scratch: &Path, script: &str) -> Self {
        let config: Config = toml::from_str(&std::fs::read_to_string(c.config()).unwrap()).unwrap();
        let netns = format!("/run/netns/{}", ns.name);
        // Unique per prober: the tests of this file run in parallel in one
        // process.
        static PROBERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = PROBERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("hostile-{}-{n}", std::process::id());
        let sandbox_id = id.clone();
        let rootfs = erofs_from_layout(&artifact("images/busybox"), &scratch.join("busybox.erofs"));
        let script = script.to_owned();
        let (input, mut input_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let (lines_tx, lines) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let file = std::fs::File::open(&netns).unwrap();
            // This thread, the runtime's threads and every process they
            // start live in the test's host namespace.
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let net = CniNetwork::setup(&config, &id, &[]).unwrap();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let layer = busybox_layer();
                let sandbox = Sandbox::start(
                    &config,
                    backend_for(&config).unwrap(),
                    SandboxOptions {
                        id: id.clone(),
                        vcpus: 1,
                        memory_mib: 256,
                        disks: vec![layer.disk_spec(rootfs)],
                        net: net.net_spec(),
                        kernel_args: vec![],
                        network: net.guest_network(),
                        balloon_opt_out: true,
                        share_dir: None,
                        cgroup: None,
                    },
                )
                .await
                .unwrap();
                let mut oci = oci_spec(&capsid_tests::sandbox::sh(&script));
                let mut process = oci.process().clone().unwrap();
                let mut caps = process.capabilities().clone().unwrap();
                let mut set = caps.bounding().clone().unwrap_or_default();
                set.extend([Capability::NetAdmin, Capability::NetRaw]);
                caps.set_bounding(Some(set.clone()));
                caps.set_effective(Some(set.clone()));
                caps.set_permitted(Some(set));
                process.set_capabilities(Some(caps));
                oci.set_process(Some(process));
                let created = sandbox
                    .create_container(ContainerSpec {
                        id: sandbox.id(),
                        oci: &oci,
                        layers: std::slice::from_ref(&layer),
                        dns: None,
                        hosts: None,
                        rootfs_in_share: None,
                        streams: StreamsWanted {
                            stdin: true,
                            stdout: true,
                            stderr: true,
                            terminal: false,
                        },
                    })
                    .await
                    .unwrap();
                sandbox.start_init(sandbox.id()).await.unwrap();
                let mut stdin = created.streams.stdin.unwrap();
                for (stream, prefix) in [
                    (created.streams.stdout.unwrap(), ""),
                    (created.streams.stderr.unwrap(), "stderr: "),
                ] {
                    let tx = lines_tx.clone();
                    tokio::spawn(async move {
                        let mut reader = tokio::io::BufReader::new(stream).lines();
                        while let Ok(Some(line)) = reader.next_line().await {
                            let _ = tx.send(format!("{prefix}{line}"));
                        }
                    });
                }
                let feeder = tokio::spawn(async move {
                    while let Some(line) = input_rx.recv().await {
                        if stdin.write_all(line.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                    let _ = stdin.shutdown().await;
                });
                let waited = sandbox.agent().wait_process(sandbox.id(), "").await;
                feeder.abort();
                sandbox.stop().await;
                let status = waited.map(|w| w.exit_status);
                let _ = lines_tx.send(format!("EXIT {status:?}"));
            });
            drop(runtime);
            net.teardown().unwrap();
        });
        Self {
            id: sandbox_id,
            input: Some(input),
            lines,
            seen: Vec::new(),
            thread: Some(thread),
        }
    }

    /// As [`Running::wait_for`].
    fn wait_for(&mut self, want: &str) -> Vec<String> {
        let mut phase = Vec::new();
        loop {
            match self.lines.recv_timeout(BOOT) {
                Ok(line) if line == want => {
                    self.seen.push(line);
                    return phase;
                }
                Ok(line) => {
                    self.seen.push(line.clone());
                    phase.push(line);
                }
                Err(_) => panic!("no {want:?} line from the prober; seen {:?}", self.seen),
            }
        }
    }

    /// Sends `line` to the script and waits for `marker`: the lines
    /// between.
    fn phase(&mut self, line: &str, marker: &str) -> Vec<String> {
        let _ = self.input.as_ref().unwrap().send(format!("{line}\n"));
        self.wait_for(marker)
    }

    /// Closes stdin, waits for the sandbox to stop and its network to go:
    /// the `EXIT` line.
    fn finish(mut self) -> String {
        drop(self.input.take());
        let exit = self
            .wait_for_prefix("EXIT ")
            .unwrap_or_else(|| panic!("the prober did not exit: {:?}", self.seen));
        self.thread.take().unwrap().join().unwrap();
        exit
    }

    fn wait_for_prefix(&mut self, prefix: &str) -> Option<String> {
        while let Ok(line) = self.lines.recv_timeout(BOOT) {
            if line.starts_with(prefix) {
                return Some(line);
            }
            self.seen.push(line);
        }
        None
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        // After a failed assertion: the script runs to its end without
        // input, then the thread stops the VM and tears the network down.
        drop(self.input.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// TCP listeners inside a namespace (a thread that entered it), recording
/// every connection they accept.
struct Listeners {
    stop: Arc<AtomicBool>,
    accepted: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listeners {
    fn start(ns: &Netns, addrs: Vec<SocketAddr>) -> Self {
        let path = format!("/run/netns/{}", ns.name);
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready) = mpsc::channel();
        let (s, a) = (stop.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            let netns = std::fs::File::open(&path).unwrap();
            // Only this thread moves: its sockets are the namespace's.
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let listeners: Vec<TcpListener> = addrs
                .iter()
                .map(|addr| {
                    let l = TcpListener::bind(addr)
                        .unwrap_or_else(|e| panic!("listening on {addr}: {e}"));
                    l.set_nonblocking(true).unwrap();
                    l
                })
                .collect();
            ready_tx.send(()).unwrap();
            while !s.load(Ordering::Relaxed) {
                for l in &listeners {
                    if let Ok((_, peer)) = l.accept() {
                        a.lock()
                            .unwrap()
                            .push(format!("{} from {peer}", l.local_addr().unwrap()));
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        ready.recv_timeout(Duration::from_secs(10)).unwrap();
        Self {
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    /// The connections accepted so far (and forgets them).
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.accepted.lock().unwrap())
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves `text` from `srv`, joined to `ns` by a veth (10.250.0.1 in `ns`,
/// 10.250.0.2 in `srv`): the guests' outbound target, off the bundled
/// subnet.
fn outside_server(ns: &Netns, srv: &Netns, dir: &Path, text: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("index.html"), text).unwrap();
    sh(&format!(
        "ip -n {ns} link add vh0 type veth peer name vs0 netns {srv} && \
         ip -n {ns} addr add 10.250.0.1/24 dev vh0 && ip -n {ns} link set vh0 up && \
         ip -n {srv} addr add 10.250.0.2/24 dev vs0 && ip -n {srv} link set vs0 up && \
         ip -n {srv} route add default via 10.250.0.1",
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

/// Host-local leases of the bundled network in this capsid's state dir.
fn leases(c: &Capsid) -> Vec<String> {
    let dir = c.dir.path().join("run/.cni/ipam/capsid");
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The value after `key ` in the script's output.
fn value<'a>(lines: &'a [String], key: &str) -> Option<&'a str> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
}

/// The packet count of the counter rule whose text contains `rule` in the
/// test's `bridge ctest` table.
fn counted(ns: &Netns, rule: &str) -> u64 {
    let (_, out) = ns.sh("nft list table bridge ctest");
    let line = out
        .lines()
        .find(|l| l.contains(rule) && l.contains("counter"))
        .unwrap_or_else(|| panic!("no counter for {rule:?} in\n{out}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "packets").unwrap();
    words[at + 1].parse().unwrap()
}

/// The guest that tries everything. It prints its MAC, then, given the
/// other guest's address and the bridge's IPv6 link-local address, tries
/// to reach what it must not (phase 1), then sends from a foreign IPv4
/// address, the other guest's address and a foreign MAC (phase 2).
const PROBER: &str = r#"
echo MAC $(cat /sys/class/net/eth0/address)
ip -6 addr show dev eth0 | grep -q 'inet6 fe80' && echo HAS_IPV6
echo READY
read BIP GW6
timeout 30 wget -q -O- http://10.250.0.2:8000/ && echo OUTBOUND_OK
timeout 10 wget -q -O- http://$BIP:81/ && echo PEER_81
timeout 10 wget -q -O- http://$BIP:80/ && echo PEER_80
timeout 20 wget -q -O- http://10.250.0.1:18100/ | sed 's/^/VIA_HOST /'
echo HI | nc -w 5 10.213.0.1 9100 && echo HOST_BRIDGE_TCP
echo HI | nc -w 5 10.250.0.1 9100 && echo HOST_OTHER_TCP
ping -c 1 -W 3 10.213.0.1 >/dev/null 2>&1 && echo HOST_PING
if [ -n "$GW6" ]; then
  # (Once duplicate address detection is over: a tentative address
  # cannot be a source.)
  for i in 1 2 3 4 5 6 7 8 9 10; do
    ip -6 addr show dev eth0 | grep -q tentative || break; sleep 1
  done
  ip -6 addr show dev eth0 | grep inet6
  ping -6 -c 1 -W 3 -I eth0 $GW6 >/dev/null && echo HOST_PING6
  echo HI | nc -w 5 $GW6%eth0 9100 && echo HOST_LL_TCP
fi
echo PHASE1
read x
ip addr add 10.213.0.200/24 dev eth0 && echo ADDED_FOREIGN_IP
ping -c 3 -W 2 -I 10.213.0.200 10.250.0.2 >/dev/null 2>&1 && echo FOREIGN_IP_PING
arping -c 2 -w 3 -I eth0 -s 10.213.0.200 10.213.0.1 >/dev/null 2>&1 && echo FOREIGN_ARP
ip addr del 10.213.0.200/24 dev eth0
ip addr add $BIP/32 dev eth0 && echo ADDED_PEER_IP
ping -c 3 -W 2 -I $BIP 10.250.0.2 >/dev/null 2>&1 && echo PEER_IP_PING
ip addr del $BIP/32 dev eth0
ip link set dev eth0 address 02:00:00:00:00:99
echo NEWMAC $(cat /sys/class/net/eth0/address)
ping -c 3 -W 2 10.250.0.2 >/dev/null 2>&1 && echo FOREIGN_MAC_PING
arping -c 2 -w 3 -I eth0 10.213.0.1 >/dev/null 2>&1 && echo FOREIGN_MAC_ARP
echo PHASE2
read x
echo BYE
"#;

/// Whether bridged traffic passes through iptables in the test's host
/// namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BrNetfilter {
    /// Not loaded, or its `bridge-nf-call-iptables` off in the namespace.
    Off,
    /// Loaded and on (the default once loaded).
    On,
}

/// Sets `bridge-nf-call-iptables` in `ns` (per namespace since Linux 5.3)
/// to what `mode` says; `false` when `On` cannot be had (no br_netfilter).
fn set_br_netfilter(ns: &Netns, mode: BrNetfilter) -> bool {
    const KNOB: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    let loaded = |ns: &Netns| ns.sh(&format!("test -e {KNOB}")).0 == 0;
    match mode {
        // Not loaded at all is "off" already.
        BrNetfilter::Off => {
            if loaded(ns) {
                assert_eq!(ns.sh(&format!("echo 0 > {KNOB}")).0, 0);
            }
            true
        }
        BrNetfilter::On => {
            if !loaded(ns) {
                let _ = Command::new("modprobe").arg("br_netfilter").status();
            }
            loaded(ns) && ns.sh(&format!("echo 1 > {KNOB}")).0 == 0
        }
    }
}

/// The bridge ports of `capsid0` in `ns` and their isolation flags, read
/// from sysfs (`brport/isolated`) and as `bridge -d link` shows them.
fn bridge_ports(ns: &Netns) -> Vec<(String, String, bool)> {
    let (_, out) = ns.sh("for p in $(ls /sys/class/net/capsid0/brif); do \
         echo \"$p $(cat /sys/class/net/$p/brport/isolated) \
         $(bridge -d link show dev $p | grep -c 'isolated on')\"; done");
    out.lines()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w[0].to_owned(), w[1].to_owned(), w[2] == "1")
        })
        .collect()
}

#[test]
fn guests_reach_neither_the_host_nor_each_other_and_cannot_spoof() {
    scenario(BrNetfilter::Off);
}

#[test]
fn guests_stay_apart_where_br_netfilter_is_loaded() {
    scenario(BrNetfilter::On);
}

fn scenario(br_netfilter: BrNetfilter) {
    let c = Capsid::new();
    let (tag, srv_tag) = match br_netfilter {
        BrNetfilter::Off => ("cont", "csrv"),
        BrNetfilter::On => ("cnf", "cnfsrv"),
    };
    let host = Netns::new(tag);
    if !set_br_netfilter(&host, br_netfilter) {
        eprintln!("br_netfilter cannot be loaded on this host: nothing to test");
        return;
    }
    let srv = Netns::new(srv_tag);
    let www = tempfile::tempdir().unwrap();
    outside_server(&host, &srv, www.path(), "OUTSIDE\n");
    let before = host.snapshot();

    // The target: serves pages on 80 (published as 18100) and 81 (not).
    let target_script = "mkdir -p /w && echo PAGE > /w/index.html && \
                         httpd -p 80 -h /w && httpd -p 81 -h /w && echo READY; read x; echo BYE";
    let mut target = Running::spawn(host.capsid_run(
        &c,
        &["--publish", "18100:80", "--", "sh", "-c", target_script],
    ));
    target.wait_for("READY");
    let target_ip = leases(&c).pop().unwrap();

    let scratch = tempfile::tempdir().unwrap();
    let mut prober = Hostile::spawn(&c, &host, scratch.path(), PROBER);
    let start = prober.wait_for("READY");
    let prober_ip = leases(&c).into_iter().find(|ip| *ip != target_ip).unwrap();
    let prober_mac = value(&start, "MAC").unwrap().to_owned();
    let has_ipv6 = start.iter().any(|l| l == "HAS_IPV6");

    // capsid's table is there while its sandboxes are.
    let (_, tables) = host.sh("nft list tables");
    assert!(tables.contains("table inet capsid-capsid0"), "{tables}");
    // Both sandboxes' bridge ports are isolated.
    let ports = bridge_ports(&host);
    assert_eq!(ports.len(), 2, "{ports:?}");
    for (port, sysfs, shown) in &ports {
        assert_eq!((sysfs.as_str(), *shown), ("1", true), "{port}: {ports:?}");
    }

    // The host's listeners: on the bridge's address, on another address
    // of the host, and on the bridge's IPv6 link-local address.
    let (_, ll) = host.sh("ip -6 -o addr show dev capsid0 scope link");
    let gw6 = ll
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .map(|a| a.split('/').next().unwrap_or_default().to_owned())
        .unwrap_or_default();
    let (_, index) = host.sh("cat /sys/class/net/capsid0/ifindex 2>/dev/null || ip -o link show dev capsid0 | cut -d: -f1");
    let mut addrs: Vec<SocketAddr> = vec![
        format!("10.213.0.1:{HOST_PORT}").parse().unwrap(),
        format!("10.250.0.1:{HOST_PORT}").parse().unwrap(),
    ];
    if !gw6.is_empty() {
        addrs.push(SocketAddr::V6(SocketAddrV6::new(
            gw6.parse().unwrap(),
            HOST_PORT,
            0,
            index.trim().parse().unwrap(),
        )));
    }
    let listeners = Listeners::start(&host, addrs);
    // They do listen: the host itself connects.
    assert_eq!(
        host.sh(&format!("echo x | busybox nc -w 5 10.213.0.1 {HOST_PORT}"))
            .0,
        0
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(listeners.take().len(), 1);

    // Counters of what reaches the bridge from the prober's port.
    let counters = format!(
        "table bridge ctest {{\n chain pre {{\n type filter hook prerouting priority -300\n \
         ether saddr {FOREIGN_MAC} counter\n \
         ip saddr {FOREIGN_IP} counter\n \
         arp saddr ip {FOREIGN_IP} counter\n \
         ether saddr {prober_mac} ip saddr {target_ip} counter\n \
         ether saddr {prober_mac} ip saddr {prober_ip} counter\n \
         ether saddr {prober_mac} ip6 saddr fe80::/10 icmpv6 type echo-request counter\n \
         ether saddr {prober_mac} ip6 saddr fe80::/10 tcp dport {HOST_PORT} counter\n }}\n}}\n"
    );
    let (code, _) = host.sh(&format!("nft '{counters}'"));
    assert_eq!(code, 0, "{counters}");

    // Phase 1: reach.
    let seen = prober.phase(&format!("{target_ip} {gw6}"), "PHASE1");
    assert!(seen.contains(&"OUTSIDE".to_owned()), "{seen:?}");
    assert!(seen.contains(&"OUTBOUND_OK".to_owned()), "{seen:?}");
    // The target's published port, through an address of the host: DNATed
    // and forwarded (and masqueraded, so that the replies come back through
    // the host), not traffic to the host. With br_netfilter the bridge
    // itself forwards a DNATed frame whose new destination is on the same
    // bridge, from port to port, which isolation forbids: documented.
    match br_netfilter {
        BrNetfilter::Off => assert!(seen.contains(&"VIA_HOST PAGE".to_owned()), "{seen:?}"),
        BrNetfilter::On => assert!(!seen.contains(&"VIA_HOST PAGE".to_owned()), "{seen:?}"),
    }
    for bad in [
        "PEER_81",
        "PEER_80",
        "HOST_BRIDGE_TCP",
        "HOST_OTHER_TCP",
        "HOST_PING",
        "HOST_PING6",
        "HOST_LL_TCP",
    ] {
        assert!(!seen.contains(&bad.to_owned()), "{bad}: {seen:?}");
    }
    let accepted = listeners.take();
    assert!(
        accepted.is_empty(),
        "the guest reached the host: {accepted:?}"
    );
    if !has_ipv6 || gw6.is_empty() {
        eprintln!("no IPv6 link-local address in the guest or on the bridge: not probed");
    }
    // The published port serves the host (on loopback and on its own
    // addresses, also from a namespace it routes for), and replies flow;
    // the unpublished one does not.
    assert_eq!(
        fetch(&host, "http://127.0.0.1:18100/").as_deref(),
        Some("PAGE\n")
    );
    assert_eq!(
        fetch(&srv, "http://10.250.0.1:18100/").as_deref(),
        Some("PAGE\n")
    );
    assert_eq!(fetch(&host, &format!("http://{target_ip}:81/")), None);

    // Phase 2: spoof.
    let seen = prober.phase("", "PHASE2");
    // (The guest did take them.)
    assert!(seen.contains(&"ADDED_FOREIGN_IP".to_owned()), "{seen:?}");
    assert!(seen.contains(&"ADDED_PEER_IP".to_owned()), "{seen:?}");
    assert_eq!(value(&seen, "NEWMAC"), Some(FOREIGN_MAC), "{seen:?}");
    for bad in [
        "FOREIGN_IP_PING",
        "FOREIGN_ARP",
        "PEER_IP_PING",
        "FOREIGN_MAC_PING",
        "FOREIGN_MAC_ARP",
    ] {
        assert!(!seen.contains(&bad.to_owned()), "{bad}: {seen:?}");
    }
    assert!(
        counted(&host, &format!("ip saddr {prober_ip}")) > 0,
        "the counters count nothing:\n{}",
        host.sh("nft list table bridge ctest").1
    );
    for rule in [
        format!("ether saddr {FOREIGN_MAC}"),
        format!("ip saddr {FOREIGN_IP}"),
        format!("arp saddr ip {FOREIGN_IP}"),
        format!("ip saddr {target_ip}"),
        "icmpv6 type echo-request".to_owned(),
        format!("tcp dport {HOST_PORT}"),
    ] {
        assert_eq!(
            counted(&host, &rule),
            0,
            "{rule}:\n{}",
            host.sh("nft list table bridge ctest").1
        );
    }
    // Where they were dropped: the tap's ingress, in the prober's namespace.
    let tap = capsid_sandbox::network::tap_name_for(&prober.id);
    let qdisc = sh(&format!(
        "ip netns exec capsid-{} tc -s qdisc show dev {tap} ingress",
        prober.id
    ));
    let dropped: u64 = qdisc
        .split("dropped ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no drop count in {qdisc}"));
    assert!(dropped > 0, "{qdisc}");
    let (_, fdb) = host.sh("bridge fdb show br capsid0");
    assert!(!fdb.contains(FOREIGN_MAC), "{fdb}");
    let (_, neigh) = host.sh(&format!("ip neigh show {FOREIGN_IP}"));
    assert!(
        !neigh.contains("lladdr"),
        "the host learnt the foreign address: {neigh}"
    );
    host.sh("nft delete table bridge ctest");
    drop(listeners);

    // The prober leaves; the network's rules stay for the target.
    let exit = prober.finish();
    assert_eq!(exit, "EXIT Ok(0)");
    let (_, tables) = host.sh("nft list tables");
    assert!(tables.contains("table inet capsid-capsid0"), "{tables}");
    assert_eq!(
        fetch(&host, "http://127.0.0.1:18100/").as_deref(),
        Some("PAGE\n")
    );

    // The target leaves: nothing is left.
    let target_pid = target.pid();
    let (code, err) = target.finish();
    assert_eq!(code, Some(0), "{err}");
    assert_clean(&c, &host, &before, &[target_pid]);
}

/// The iptables chains the CNI plugins share between all their containers
/// (created once, never removed by DEL): the only new lines allowed.
const SHARED_CHAINS: [&str; 6] = [
    "CNI-HOSTPORT-DNAT",
    "CNI-HOSTPORT-SNAT",
    "CNI-HOSTPORT-MASQ",
    "CNI-HOSTPORT-SETMARK",
    "CNI-FORWARD",
    "CNI-ADMIN",
];

/// After the runs `pids` ended: no lease, no interface, no capsid table
/// or rule; nothing new in `ns` but the plugins' shared (empty) chains.
fn assert_clean(c: &Capsid, ns: &Netns, before: &str, pids: &[u32]) {
    assert!(leases(c).is_empty(), "IPAM leases left: {:?}", leases(c));
    let after = ns.snapshot();
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
        assert!(
            !line.to_lowercase().contains("capsid")
                && !line.contains("10.213.0.")
                && !pids.iter().any(|p| line.contains(&format!("run-{p}"))),
            "left in the test namespace: {line}\n--- after:\n{after}"
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
