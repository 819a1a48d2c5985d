//! containerd puts a capsid container on a CNI network: a test network made
//! of private network namespaces (one playing the host, with the CNI
//! bridge; one per container), Debian's CNI plugins, `ctr run --with-ns
//! network:PATH` with capsid's shim. The host side reaches a web server in
//! the guest, the guest reaches a server in another namespace, and after
//! delete no tap, qdisc or filter is left; CNI DEL and the namespaces go
//! last. The shim's tap drops what a guest sends from another MAC or
//! address (runc, the reference, lets it through). No traffic leaves the
//! test's namespaces.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capsid_sandbox::network;
use capsid_tests::run;
use capsid_tests::shim::{Background, ShimHarness, BUSYBOX};

const LONG: Duration = Duration::from_secs(120);
const CNI_DIR: &str = "/usr/lib/cni";
const HOST_BUSYBOX: &str = "/bin/busybox";
/// The test network (inside the test's own namespaces only).
const SUBNET: &str = "10.231.0.0/24";
const GATEWAY: &str = "10.231.0.1";
const SUBNET6: &str = "fd23:231::/64";
const GATEWAY6: &str = "fd23:231::1";
const MTU: u32 = 1400;

/// A network namespace of this test, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(role: &str) -> Self {
        let name = format!("capsid-t-{role}-{}", std::process::id());
        let (code, _, err) = run(Command::new("ip").args(["netns", "add", &name]));
        assert_eq!(code, 0, "ip netns add {name}: {err}");
        Self { name }
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// `ip netns exec NS PROGRAM`.
    fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program])
            .stdin(Stdio::null());
        cmd
    }

    /// `ip -n NS ARGS…` output (must succeed).
    fn ip(&self, args: &[&str]) -> String {
        let (code, out, err) = run(Command::new("ip").args(["-n", &self.name]).args(args));
        assert_eq!(code, 0, "ip -n {} {args:?}: {err}", self.name);
        out
    }

    /// `tc -n NS ARGS…` output (must succeed).
    fn tc(&self, args: &[&str]) -> String {
        let (code, out, err) = run(Command::new("tc").args(["-n", &self.name]).args(args));
        assert_eq!(code, 0, "tc -n {} {args:?}: {err}", self.name);
        out
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A CNI bridge network whose bridge lives in the `root` namespace.
struct Cni {
    root: Netns,
    conf: String,
    _state: tempfile::TempDir,
    attached: Vec<(String, PathBuf)>,
}

impl Cni {
    /// `tag` keeps the namespaces of tests running at once apart.
    fn new(tag: &str) -> Self {
        assert!(
            Path::new(CNI_DIR).join("bridge").exists(),
            "{CNI_DIR}/bridge is missing: apt-get install containernetworking-plugins"
        );
        let state = tempfile::Builder::new()
            .prefix("capsid-cni")
            .tempdir()
            .unwrap();
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "capsid-test",
            "type": "bridge",
            "bridge": "capsidt0",
            "isGateway": true,
            "ipMasq": false,
            "mtu": MTU,
            "ipam": {
                "type": "host-local",
                "ranges": [
                    [{"subnet": SUBNET, "gateway": GATEWAY}],
                    [{"subnet": SUBNET6, "gateway": GATEWAY6}]
                ],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
                "dataDir": state.path().join("ipam"),
            }
        })
        .to_string();
        Self {
            root: Netns::new(&format!("root{tag}")),
            conf,
            _state: state,
            attached: Vec::new(),
        }
    }

    /// Runs the bridge plugin in the root namespace.
    fn plugin(&self, command: &str, id: &str, netns: &Path) -> (i32, String, String) {
        let mut child = self
            .root
            .exec("env")
            .args([
                &format!("CNI_COMMAND={command}"),
                &format!("CNI_CONTAINERID={id}"),
                &format!("CNI_NETNS={}", netns.display()),
                "CNI_IFNAME=eth0",
                &format!("CNI_PATH={CNI_DIR}"),
                &format!("{CNI_DIR}/bridge"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), self.conf.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// CNI ADD for `ns`: its eth0 on the bridge. Returns its IPv4 and
    /// IPv6 addresses.
    fn add(&mut self, id: &str, ns: &Netns) -> (String, String) {
        let (code, out, err) = self.plugin("ADD", id, &ns.path());
        assert_eq!(code, 0, "CNI ADD {id}: {out}{err}");
        self.attached.push((id.to_string(), ns.path()));
        let result: serde_json::Value = serde_json::from_str(&out).unwrap();
        let ips: Vec<String> = result["ips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|ip| {
                ip["address"]
                    .as_str()
                    .unwrap()
                    .split('/')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let v4 = ips.iter().find(|a| !a.contains(':')).unwrap().clone();
        let v6 = ips.iter().find(|a| a.contains(':')).unwrap().clone();
        (v4, v6)
    }

    /// CNI DEL of everything added, in reverse.
    fn del_all(&mut self) {
        while let Some((id, path)) = self.attached.pop() {
            let (code, out, err) = self.plugin("DEL", &id, &path);
            assert_eq!(code, 0, "CNI DEL {id}: {out}{err}");
        }
    }
}

impl Drop for Cni {
    fn drop(&mut self) {
        while let Some((id, path)) = self.attached.pop() {
            let _ = self.plugin("DEL", &id, &path);
        }
    }
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `busybox wget -qO- URL` from `ns`, retried until it answers (the guest
/// may still be starting its server); `why` describes the wiring if not.
/// (busybox 1.35's `wget -T` crashes: `timeout` bounds each try instead.)
fn fetch_from(ns: &Netns, url: &str, why: impl Fn() -> String) -> String {
    let start = Instant::now();
    loop {
        let (code, out, err) =
            run(ns
                .exec("timeout")
                .args(["20", HOST_BUSYBOX, "wget", "-q", "-O", "-", url]));
        if code == 0 {
            return out;
        }
        assert!(
            start.elapsed() < LONG,
            "{url} from {}: no answer: {err}\n{}",
            ns.name,
            why()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Counters of the namespace's interfaces and filters, for failures.
fn wiring_state(ns: &Netns) -> String {
    let mut text = ns.ip(&["-s", "link", "show"]);
    text.push_str(&ns.tc(&["-s", "filter", "show", "dev", "eth0", "ingress"]));
    text
}

/// `ctr task exec` in the container, to its end: (code, stdout, stderr).
fn exec_in(h: &ShimHarness, id: &str, exec_id: &str, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["task", "exec", "--exec-id", exec_id, id];
    all.extend_from_slice(args);
    h.ctr(&all)
}

/// Asserts the namespace holds no tap and its eth0 no ingress qdisc or
/// filter: what attach made is gone.
fn assert_no_wiring(ns: &Netns) {
    let links: serde_json::Value =
        serde_json::from_str(&ns.ip(&["-j", "-d", "link", "show"])).unwrap();
    for link in links.as_array().unwrap() {
        assert_ne!(
            link["linkinfo"]["info_kind"].as_str(),
            Some("tun"),
            "a tap is left in {}: {link}",
            ns.name
        );
    }
    let qdiscs = ns.tc(&["qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "qdisc left on eth0: {qdiscs}");
    let filters = ns.tc(&["filter", "show", "dev", "eth0", "ingress"]);
    assert!(filters.trim().is_empty(), "filters left on eth0: {filters}");
}

/// Kinds of the links in `ns`.
fn link_kinds(ns: &Netns) -> Vec<(String, String)> {
    let links: serde_json::Value =
        serde_json::from_str(&ns.ip(&["-j", "-d", "link", "show"])).unwrap();
    links
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["ifname"].as_str().unwrap_or("").to_string(),
                l["linkinfo"]["info_kind"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect()
}

#[test]
fn attach_reads_the_veth_joins_a_tap_and_undoes_everything() {
    let a = Netns::new("a");
    let b = Netns::new("b");
    a.ip(&[
        "link", "add", "eth0", "mtu", "1450", "type", "veth", "peer", "name", "peer0", "netns",
        &b.name,
    ]);
    a.ip(&["addr", "add", "10.77.0.5/24", "dev", "eth0"]);
    a.ip(&["addr", "add", "fd77::5/64", "dev", "eth0", "nodad"]);
    a.ip(&["link", "set", "eth0", "up"]);
    a.ip(&["route", "add", "default", "via", "10.77.0.1"]);
    a.ip(&["route", "add", "10.78.0.0/16", "via", "10.77.0.1"]);
    let mac = {
        let l: serde_json::Value =
            serde_json::from_str(&a.ip(&["-j", "link", "show", "eth0"])).unwrap();
        l[0]["address"].as_str().unwrap().to_string()
    };

    let started = Instant::now();
    let att = network::attach(&a.path(), "tap0_t").unwrap();
    eprintln!("attach took {:?}", started.elapsed());
    assert_eq!(att.veth, "eth0");
    let g = &att.guest;
    assert_eq!(g.interfaces.len(), 1);
    assert_eq!(g.interfaces[0].mac, mac);
    assert_eq!(g.interfaces[0].mtu, 1450);
    let addrs: Vec<String> = g.interfaces[0]
        .addresses
        .iter()
        .map(|a| a.to_string())
        .collect();
    assert_eq!(addrs, ["10.77.0.5/24", "fd77::5/64"]);
    let routes: Vec<(Option<String>, Option<String>)> = g
        .routes
        .iter()
        .map(|r| {
            (
                r.destination.map(|d| d.to_string()),
                r.gateway.map(|g| g.to_string()),
            )
        })
        .collect();
    assert_eq!(
        routes,
        [
            (None, Some("10.77.0.1".to_string())),
            (
                Some("10.78.0.0/16".to_string()),
                Some("10.77.0.1".to_string())
            ),
        ]
    );
    let spec = att.net_spec();
    assert_eq!(
        (spec.tap.as_str(), spec.mac.as_str()),
        ("tap0_t", mac.as_str())
    );
    assert_eq!(spec.netns, Some(a.path()));
    let tap = a.ip(&["link", "show", "tap0_t"]);
    assert!(tap.contains("mtu 1450") && tap.contains(",UP"), "{tap}");
    for dev in ["eth0", "tap0_t"] {
        let f = a.tc(&["filter", "show", "dev", dev, "ingress"]);
        assert!(
            f.contains("mirred (Egress Redirect to device"),
            "{dev}: {f}"
        );
    }
    // The tap's side is guarded against spoofing, ahead of its redirect.
    assert_guarded(&a, "tap0_t");

    // A second tap on the same veth is refused, and leaves nothing.
    let err = network::attach(&a.path(), "tap1_t")
        .unwrap_err()
        .to_string();
    assert!(err.contains("already joined to another tap"), "{err}");
    assert!(!a.ip(&["link", "show"]).contains("tap1_t"));
    assert!(a
        .tc(&["filter", "show", "dev", "eth0", "ingress"])
        .contains("tap0_t"));
    // The name of an existing interface is refused before anything.
    let err = network::attach(&a.path(), "eth0").unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");

    let started = Instant::now();
    att.detach().unwrap();
    eprintln!("detach took {:?}", started.elapsed());
    assert_no_wiring(&a);

    // After a crash: only the names are known.
    let _att = network::attach_to(&a.path(), "tap0_t", Some("eth0")).unwrap();
    network::detach_leftovers(&a.path(), "tap0_t").unwrap();
    assert_no_wiring(&a);
    network::detach_leftovers(&a.path(), "tap0_t").unwrap();

    // Namespaces with nothing, or too much, to attach to.
    let empty = Netns::new("e");
    let err = network::attach(&empty.path(), "tap0_t")
        .unwrap_err()
        .to_string();
    assert!(err.contains("no Ethernet interface"), "{err}");
    assert_eq!(link_kinds(&empty), [("lo".to_string(), String::new())]);
    b.ip(&["link", "add", "x0", "type", "veth", "peer", "name", "x1"]);
    let err = network::attach(&b.path(), "tap0_t")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("several interfaces") && err.contains("peer0"),
        "{err}"
    );
    assert!(link_kinds(&b).iter().all(|(_, k)| k != "tun"));
    let err = network::attach_to(&b.path(), "tap0_t", Some("nope"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no interface named nope"), "{err}");

    // Not a namespace at all; a bad tap name.
    let file = tempfile::NamedTempFile::new().unwrap();
    let err = network::attach(file.path(), "tap0_t")
        .unwrap_err()
        .to_string();
    assert!(err.contains(&file.path().display().to_string()), "{err}");
    let err = network::attach(&a.path(), "this-name-is-too-long")
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid tap name"), "{err}");
}

#[test]
fn a_container_on_a_cni_bridge_serves_and_reaches_the_network() {
    let mut cni = Cni::new("w");
    let ctr_ns = Netns::new("c");
    let peer_ns = Netns::new("p");
    let (guest_ip, guest_ip6) = cni.add("capsid-t-c", &ctr_ns);
    let (peer_ip, _) = cni.add("capsid-t-p", &peer_ns);
    let links: serde_json::Value =
        serde_json::from_str(&ctr_ns.ip(&["-j", "link", "show", "eth0"])).unwrap();
    let veth_mac = links[0]["address"].as_str().unwrap().to_string();

    // A server in the peer namespace, for the guest to reach.
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("index.html"), "hello from the peer\n").unwrap();
    let _peer_httpd = Killed(
        peer_ns
            .exec(HOST_BUSYBOX)
            .args(["httpd", "-f", "-p", "8080", "-h"])
            .arg(www.path())
            .spawn()
            .unwrap(),
    );

    // Resolver settings the way the CRI plugin and nerdctl pass them: a
    // host file bound on /etc/resolv.conf.
    let resolv = www.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 10.231.0.53\nsearch test.internal\noptions ndots:2\n",
    )
    .unwrap();
    let resolv_mount = format!(
        "type=bind,src={},dst=/etc/resolv.conf,options=rbind:ro",
        resolv.display()
    );

    let h = ShimHarness::start();
    let with_ns = format!("network:{}", ctr_ns.path().display());
    let (code, out, err) = run(&mut h.run_cmd(
        &["-d", "--with-ns", &with_ns, "--mount", &resolv_mount],
        BUSYBOX,
        "web",
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo hello from the guest > /www/index.html \
             && exec httpd -f -p 80 -h /www",
        ],
    ));
    assert_eq!(code, 0, "ctr run: {out}{err}\n{}", h.log_tail());
    h.wait_status("web", "RUNNING", LONG);

    // The tap is joined to the veth both ways.
    let taps = ctr_ns.ip(&["-d", "link", "show", "type", "tun"]);
    assert!(taps.contains("tap0_"), "no tap in the namespace: {taps}");
    let filters = ctr_ns.tc(&["filter", "show", "dev", "eth0", "ingress"]);
    assert!(filters.contains("mirred"), "{filters}");

    // The guest took over the veth's MAC, address, MTU and default route.
    let (code, out, err) = exec_in(
        &h,
        "web",
        "cfg",
        &[
            "sh",
            "-c",
            "cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu; \
             ip -o addr show dev eth0; ip route; ip -6 route; cat /etc/resolv.conf",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with(&format!("{veth_mac}\n{MTU}\n")), "{out}");
    assert!(out.contains(&format!("inet {guest_ip}/24")), "{out}");
    assert!(out.contains(&format!("default via {GATEWAY}")), "{out}");
    assert!(out.contains(&format!("inet6 {guest_ip6}/64")), "{out}");
    assert!(out.contains(&format!("default via {GATEWAY6}")), "{out}");
    assert!(
        out.ends_with("nameserver 10.231.0.53\nsearch test.internal\noptions ndots:2\n"),
        "{out}"
    );

    // The host side of the network reaches the guest's server.
    let page = fetch_from(&cni.root, &format!("http://{guest_ip}/"), || {
        wiring_state(&ctr_ns)
    });
    assert_eq!(page, "hello from the guest\n");
    let page = fetch_from(&cni.root, &format!("http://[{guest_ip6}]/"), || {
        wiring_state(&ctr_ns)
    });
    assert_eq!(page, "hello from the guest\n");

    // The guest reaches a server in another namespace of the network.
    let (code, out, err) = exec_in(
        &h,
        "web",
        "get",
        &[
            "timeout",
            "60",
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{peer_ip}:8080/"),
        ],
    );
    assert_eq!((code, out.as_str()), (0, "hello from the peer\n"), "{err}");

    // Delete: the wiring goes with the task, before CNI DEL.
    let (code, _, err) = h.ctr(&["task", "kill", "-s", "SIGKILL", "web"]);
    assert_eq!(code, 0, "{err}");
    h.wait_status("web", "STOPPED", LONG);
    let (code, _, err) = h.ctr(&["task", "delete", "web"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = h.ctr(&["container", "delete", "web"]);
    assert_eq!(code, 0, "{err}");
    assert_no_wiring(&ctr_ns);
    h.assert_clean(&["web"]);

    cni.del_all();
    let names = [
        cni.root.name.clone(),
        ctr_ns.name.clone(),
        peer_ns.name.clone(),
    ];
    drop(ctr_ns);
    drop(peer_ns);
    drop(cni);
    let (_, list, _) = run(Command::new("ip").args(["netns", "list"]));
    for name in &names {
        assert!(!list.contains(name.as_str()), "{name} is left: {list}");
        assert!(!Path::new("/var/run/netns").join(name).exists());
    }
}

/// Asserts `tap`'s ingress in `ns` runs the anti-spoofing filter (classic
/// BPF, direct action, priority 1) before its redirect to the veth (the
/// kernel's first automatic priority, 49152).
fn assert_guarded(ns: &Netns, tap: &str) {
    let f = ns.tc(&["filter", "show", "dev", tap, "ingress"]);
    let prefs: Vec<&str> = f
        .lines()
        .filter(|l| l.contains(" pref "))
        .map(|l| l.split(" pref ").nth(1).unwrap_or(""))
        .collect();
    let bpf = prefs.iter().position(|p| p.starts_with("1 bpf"));
    let redirect = prefs.iter().position(|p| p.starts_with("49152 u32"));
    assert!(
        matches!((bpf, redirect), (Some(b), Some(r)) if b < r),
        "no anti-spoofing filter ahead of the redirect on {tap}:\n{f}"
    );
    assert!(f.contains("direct-action"), "{f}");
    assert!(f.contains("mirred (Egress Redirect to device"), "{f}");
}

/// The probe of a container holding CAP_NET_ADMIN and CAP_NET_RAW (`ctr
/// run --privileged`; a hostile guest kernel has both anyway): its own
/// address and MAC get answers, then it sends from an address and a MAC
/// that are not its own.
const SPOOFER: &str = "\
ping -c 1 -W 10 $GW >/dev/null 2>&1 && echo OWN_OK
ip addr add $FOREIGN_IP/24 dev eth0 && echo ADDED_FOREIGN_IP
ping -c 2 -W 3 -I $FOREIGN_IP $GW >/dev/null 2>&1 && echo FOREIGN_IP_OK
ip addr del $FOREIGN_IP/24 dev eth0
ip link set dev eth0 address $FOREIGN_MAC && echo NEWMAC $(cat /sys/class/net/eth0/address)
arping -c 2 -w 4 -I eth0 $GW >/dev/null 2>&1 && echo FOREIGN_MAC_OK
ip link set dev eth0 address $OWN_MAC
echo DONE
";

/// Whether the namespace still holds a tap.
fn has_tap(ns: &Netns) -> bool {
    link_kinds(ns).iter().any(|(_, kind)| kind == "tun")
}

/// The tap the shim joins to a CNI-made veth carries the anti-spoofing
/// filter, built from the veth's MAC and addresses: a privileged container
/// that takes another address or MAC gets nothing out with them, while
/// with runc (the reference: no VM, no tap, the plain CNI bridge checks
/// nothing) the same probe goes through.
#[test]
fn the_shims_tap_drops_what_a_privileged_guest_spoofs() {
    const FOREIGN_IP: &str = "10.231.0.200";
    const FOREIGN_MAC: &str = "02:00:00:00:00:99";
    let mut cni = Cni::new("s");
    let ctr_ns = Netns::new("s");
    let _ = cni.add("capsid-t-s", &ctr_ns);
    let links: serde_json::Value =
        serde_json::from_str(&ctr_ns.ip(&["-j", "link", "show", "eth0"])).unwrap();
    let veth_mac = links[0]["address"].as_str().unwrap().to_string();
    let h = ShimHarness::start();
    let with_ns = format!("network:{}", ctr_ns.path().display());
    let script = format!(
        "GW={GATEWAY} FOREIGN_IP={FOREIGN_IP} FOREIGN_MAC={FOREIGN_MAC} OWN_MAC={veth_mac}\n{SPOOFER}"
    );
    // capsid first: what runc's container sends is learnt by the bridge and
    // the host side, which must know nothing of the foreign MAC and
    // address while capsid's is checked.
    for runtime in ["capsid", "runc"] {
        let id = format!("spoof-{runtime}");
        let mut cmd = if runtime == "runc" {
            let mut c = h.ctrd.ctr();
            c.args(["run", "--runtime", "io.containerd.runc.v2"])
                .args(["-d", "--privileged", "--with-ns", &with_ns])
                .args([BUSYBOX, &id, "sleep", "100000"]);
            c
        } else {
            h.run_cmd(
                &["-d", "--privileged", "--with-ns", &with_ns],
                BUSYBOX,
                &id,
                &["sleep", "100000"],
            )
        };
        let (code, out, err) = run(&mut cmd);
        assert_eq!(code, 0, "[{runtime}] ctr run: {out}{err}\n{}", h.log_tail());
        h.wait_status(&id, "RUNNING", LONG);
        let tap = if runtime == "capsid" {
            let taps = link_kinds(&ctr_ns);
            let (tap, _) = taps
                .iter()
                .find(|(_, kind)| kind == "tun")
                .unwrap_or_else(|| panic!("no tap in the namespace: {taps:?}"));
            assert_guarded(&ctr_ns, tap);
            Some(tap.clone())
        } else {
            None
        };

        let (code, out, err) = exec_in(&h, &id, "spoof", &["sh", "-c", &script]);
        assert_eq!(code, 0, "[{runtime}] {out}{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines.contains(&"OWN_OK"), "[{runtime}] {out}");
        assert!(lines.contains(&"ADDED_FOREIGN_IP"), "[{runtime}] {out}");
        assert!(
            lines.contains(&format!("NEWMAC {FOREIGN_MAC}").as_str()),
            "[{runtime}] {out}"
        );
        assert_eq!(lines.last(), Some(&"DONE"), "[{runtime}] {out}");
        let fdb = cni
            .root
            .exec("bridge")
            .args(["fdb", "show", "br", "capsidt0"])
            .output()
            .unwrap();
        let fdb = String::from_utf8_lossy(&fdb.stdout).into_owned();
        let neigh = cni.root.ip(&["neigh", "show", FOREIGN_IP]);
        match tap {
            // The reference: nothing checks the sources, both get through.
            None => {
                assert!(lines.contains(&"FOREIGN_IP_OK"), "[{runtime}] {out}");
                assert!(lines.contains(&"FOREIGN_MAC_OK"), "[{runtime}] {out}");
                assert!(fdb.contains(FOREIGN_MAC), "[{runtime}] {fdb}");
            }
            Some(tap) => {
                assert!(!lines.contains(&"FOREIGN_IP_OK"), "[{runtime}] {out}");
                assert!(!lines.contains(&"FOREIGN_MAC_OK"), "[{runtime}] {out}");
                assert!(
                    !fdb.contains(FOREIGN_MAC),
                    "the bridge learnt the MAC: {fdb}"
                );
                assert!(
                    !neigh.contains("lladdr"),
                    "the host side learnt the foreign address: {neigh}"
                );
                // Where: the tap's ingress, before the redirect.
                let qdisc = ctr_ns.tc(&["-s", "qdisc", "show", "dev", &tap, "ingress"]);
                let dropped: u64 = qdisc
                    .split("dropped ")
                    .nth(1)
                    .and_then(|rest| rest.split(',').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("no drop count in {qdisc}"));
                assert!(dropped > 0, "{qdisc}");
            }
        }

        let (code, _, err) = h.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
        assert_eq!(code, 0, "{err}");
        h.wait_status(&id, "STOPPED", LONG);
        let (code, _, err) = h.ctr(&["task", "delete", &id]);
        assert_eq!(code, 0, "{err}");
        let (code, _, err) = h.ctr(&["container", "delete", &id]);
        assert_eq!(code, 0, "{err}");
        assert_no_wiring(&ctr_ns);
    }
    h.assert_clean(&["spoof-capsid"]);
    cni.del_all();
}

#[test]
fn killing_the_shim_still_removes_the_tap() {
    let mut cni = Cni::new("k");
    let ctr_ns = Netns::new("k");
    let _ = cni.add("capsid-t-k", &ctr_ns);
    let h = ShimHarness::start();
    let with_ns = format!("network:{}", ctr_ns.path().display());
    let (code, out, err) = run(&mut h.run_cmd(
        &["-d", "--with-ns", &with_ns],
        BUSYBOX,
        "crash",
        &["sleep", "100000"],
    ));
    assert_eq!(code, 0, "ctr run: {out}{err}\n{}", h.log_tail());
    h.wait_status("crash", "RUNNING", LONG);
    assert!(has_tap(&ctr_ns));
    let shim = h.shim_pid("crash").expect("the shim of crash");
    let (code, _, err) = run(Command::new("kill").args(["-9", &shim.to_string()]));
    assert_eq!(code, 0, "{err}");
    // containerd runs the shim's `delete` in the bundle: it kills the VM
    // and removes the tap it finds in the state file.
    let start = Instant::now();
    while has_tap(&ctr_ns) || !h.status("crash").is_empty() {
        assert!(
            start.elapsed() < LONG,
            "tap or task left after the shim died\n{}",
            h.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_no_wiring(&ctr_ns);
    let (code, _, err) = h.ctr(&["container", "delete", "crash"]);
    assert_eq!(code, 0, "{err}");
    h.assert_clean(&["crash"]);
    cni.del_all();
}

#[test]
fn a_missing_network_namespace_fails_the_create_and_leaves_nothing() {
    let h = ShimHarness::start();
    let missing = format!("/var/run/netns/capsid-t-missing-{}", std::process::id());
    let with_ns = format!("network:{missing}");
    let (code, out, err) = run(&mut h.run_cmd(
        &["--rm", "--with-ns", &with_ns],
        BUSYBOX,
        "nonet",
        &["true"],
    ));
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains(&format!("network namespace {missing} does not exist")),
        "{err}"
    );
    let _ = h.ctr(&["container", "delete", "nonet"]);
    h.assert_clean(&["nonet"]);
}

/// Throughput over the tap path (veth ⇄ tc mirred ⇄ tap ⇄ capsid-vhost ⇄
/// virtio-net), TCP both ways between the root test namespace and the
/// guest, with busybox nc and dd. A benchmark, not a test:
/// `cargo test -p capsid-tests --test net_containerd -- --ignored --nocapture`.
#[test]
#[ignore]
fn tcp_throughput_over_the_tap() {
    const MIB: u64 = 16;
    let mut cni = Cni::new("b");
    let ctr_ns = Netns::new("bench");
    let (guest_ip, _) = cni.add("capsid-t-c", &ctr_ns);
    let h = ShimHarness::start();
    let with_ns = format!("network:{}", ctr_ns.path().display());
    let (code, out, err) = run(&mut h.run_cmd(
        &["-d", "--with-ns", &with_ns],
        BUSYBOX,
        "bench",
        &["sleep", "100000"],
    ));
    assert_eq!(code, 0, "ctr run: {out}{err}\n{}", h.log_tail());
    h.wait_status("bench", "RUNNING", LONG);
    // The bridge address in the root namespace is the host side.
    let (code, _, err) =
        run(Command::new("ip").args(["-n", &cni.root.name, "link", "set", "lo", "up"]));
    assert_eq!(code, 0, "{err}");

    // guest → host: a listener in the root namespace counts bytes and
    // times from the first to the last.
    let mut listener = Killed(
        cni.root
            .exec(HOST_BUSYBOX)
            .args(["nc", "-l", "-p", "5001"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let _keep_stdin = listener.0.stdin.take();
    let mut stdout = listener.0.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let (mut total, mut first) = (0u64, None);
        loop {
            let n = stdout.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            total += n as u64;
        }
        (total, first.map(|f| f.elapsed()))
    });
    std::thread::sleep(Duration::from_millis(300));
    // From a file in the guest's tmpfs, as the device benchmark does (a
    // pipe from dd would cost the TCG guest a second copy).
    let make = format!("head -c {} /dev/zero > /tmp/blob", MIB << 20);
    let (code, out, err) = exec_in(&h, "bench", "blob", &["sh", "-c", &make]);
    assert_eq!(code, 0, "{out}{err}");
    let send = format!("nc {GATEWAY} 5001 < /tmp/blob; rm /tmp/blob");
    let (code, out, err) = exec_in(&h, "bench", "up", &["sh", "-c", &send]);
    assert_eq!(code, 0, "{out}{err}");
    let (total, took) = reader.join().unwrap();
    assert_eq!(total, MIB << 20);
    let up = took.unwrap();

    // host → guest: the guest counts, the host sends (retried until the
    // guest's listener is up); timed until the guest reports the count.
    let bg = Background::spawn({
        let mut c = h.ctrd.ctr();
        c.args([
            "task",
            "exec",
            "--exec-id",
            "down",
            "bench",
            "sh",
            "-c",
            "nc -l -p 5002 > /tmp/down; wc -c < /tmp/down; rm /tmp/down",
        ]);
        c
    });
    let blob = tempfile::NamedTempFile::new().unwrap();
    blob.as_file().set_len(MIB << 20).unwrap();
    let down = loop {
        let start = Instant::now();
        let (code, _, _) = run(cni
            .root
            .exec(HOST_BUSYBOX)
            .args(["nc", &guest_ip, "5002"])
            .stdin(std::fs::File::open(blob.path()).unwrap()));
        if code == 0 {
            // Until the sender is done, as the device benchmark times it;
            // and until the guest has counted every byte.
            let sent = start.elapsed();
            let count = bg.line(LONG);
            assert_eq!(count.trim(), (MIB << 20).to_string());
            eprintln!(
                "host → guest, until the guest counted: {:.1} MiB/s",
                MIB as f64 / start.elapsed().as_secs_f64()
            );
            break sent;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = bg.wait(LONG);
    for (way, t) in [("guest → host", up), ("host → guest", down)] {
        eprintln!(
            "{way} TCP over the tap: {MIB} MiB in {:.2} s = {:.1} MiB/s",
            t.as_secs_f64(),
            MIB as f64 / t.as_secs_f64()
        );
    }
    let _ = h.ctr(&["task", "kill", "-s", "SIGKILL", "bench"]);
    h.wait_status("bench", "STOPPED", LONG);
    let _ = h.ctr(&["task", "delete", "bench"]);
    let _ = h.ctr(&["container", "delete", "bench"]);
    assert_no_wiring(&ctr_ns);
    cni.del_all();
}
