//! Pooled sandboxes through containerd: warm shims (as `capsid-poold`
//! starts them) boot VMs ahead of time; `ctr run` with capsid's shim
//! takes one per container, never twice, and a container the pool cannot
//! serve boots cold with the reason in the log. A private containerd,
//! QEMU-TCG sandboxes; runc runs the same containers as the reference.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capsid_sandbox::pool;
use capsid_tests::run;
use capsid_tests::shim::{processes_with, Background, ShimHarness, BUSYBOX};

const LONG: Duration = Duration::from_secs(180);

/// Turns the pool on in the harness's config, with one shape: the
/// default VM (1 vCPU, 256 MiB).
fn enable_pool(h: &ShimHarness) {
    enable_pool_with(h, 256);
}

/// [`enable_pool`], the VM booted with `max_memory_mib`.
fn enable_pool_with(h: &ShimHarness, max_memory_mib: u32) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(h.config())
        .unwrap();
    writeln!(
        f,
        "[pool]\nenabled = true\n[[pool.shapes]]\nvcpus = 1\nmemory_mib = 256\nsize = 2\n\
         max_memory_mib = {max_memory_mib}"
    )
    .unwrap();
}

/// A warm shim as the daemon starts one; SIGTERMed on drop if it still
/// runs.
struct Warm {
    bg: Option<Background>,
    pid: u32,
}

impl Warm {
    fn boot(h: &ShimHarness, name: &str) -> Self {
        Self::boot_with(h, name, 256)
    }

    /// A warm shim of 1 vCPU and 256 MiB in a VM of `max_memory_mib`.
    fn boot_with(h: &ShimHarness, name: &str, max_memory_mib: u32) -> Self {
        let shape = pool::Shape {
            vcpus: 1,
            memory_mib: 256,
            max_memory_mib,
        };
        let mut cmd = Command::new(h.shim());
        cmd.arg(pool::WARM_ACTION)
            .env("CAPSID_CONFIG", h.config())
            .env(pool::NAME_ENV, name)
            .envs(shape.env())
            .stdin(Stdio::null());
        let bg = Background::spawn(cmd);
        let pid = bg.pid();
        let line = bg.line(LONG);
        assert_eq!(line, pool::READY_LINE, "warm shim {name}\n{}", h.log_tail());
        Self { bg: Some(bg), pid }
    }

    fn alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
                .unwrap_or_default()
                .contains(") Z ")
    }

    /// Waits for the warm shim to end by itself: its (exit code, stderr).
    fn wait(mut self) -> (i32, String) {
        let bg = self.bg.take().unwrap();
        let (code, _, err) = bg.wait(LONG);
        (code, err)
    }
}

impl Drop for Warm {
    fn drop(&mut self) {
        if let Some(bg) = self.bg.take() {
            let _ = Command::new("kill").arg(self.pid.to_string()).status();
            let _ = bg.wait(Duration::from_secs(30));
        }
    }
}

/// The shape key whose directory holds ready sandbox `name`.
fn ready_key(config: &capsid_sandbox::config::Config, name: &str) -> String {
    std::fs::read_dir(pool::dir(config))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|key| pool::ready(config, key).iter().any(|n| n == name))
        .expect("the sandbox's shape directory")
}

fn ready(h: &ShimHarness) -> Vec<String> {
    let pool_dir = h.state_dir().join(".pool");
    let mut names = Vec::new();
    for dir in std::fs::read_dir(&pool_dir).into_iter().flatten().flatten() {
        if dir.file_name() == "claimed" || !dir.path().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let n = f.file_name().to_string_lossy().into_owned();
            if let Some(stem) = n.strip_suffix(".sock") {
                names.push(stem.to_string());
            }
        }
    }
    names.sort();
    names
}

/// What a container reports of its VM and its neighbours.
const PROBE: &str = "cat /proc/sys/kernel/random/boot_id; ls /dev/shm | tr '\\n' ' '; echo; \
                     ps -o comm | grep -c sleep; echo secret > /dev/shm/mark-$0; \
                     (sleep 1000 &) ; echo done";

fn probe(h: &ShimHarness, id: &str) -> Vec<String> {
    let (code, out, err) = h.run(id, BUSYBOX, &["sh", "-c", PROBE, id]);
    assert_eq!(code, 0, "{id}: {out}{err}\n{}", h.log_tail());
    let lines: Vec<String> = out.lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 4, "{id}: {out}");
    assert_eq!(lines[3], "done");
    lines
}

#[test]
fn each_container_takes_its_own_pooled_sandbox_and_sees_nothing_of_the_last() {
    let h = ShimHarness::start();
    enable_pool(&h);
    let first = Warm::boot(&h, "w1");
    let second = Warm::boot(&h, "w2");
    assert_eq!(ready(&h), ["w1", "w2"]);
    let w1_dir = h.state_dir().join("w1").display().to_string();
    assert!(!processes_with(&w1_dir).is_empty(), "the warm VM runs");

    let a = probe(&h, "p1");
    assert!(
        h.log().contains("the task takes a pooled sandbox"),
        "{}",
        h.log_tail()
    );
    // The oldest was taken; it served p1 and ended with it.
    assert_eq!(ready(&h), ["w2"]);
    let (code, err) = first.wait();
    assert_eq!(
        code,
        0,
        "the warm shim: {err}\ncontainerd's log:\n{}",
        h.log_tail()
    );
    // Nothing of the VM runs on once its shim is gone (a dead process's
    // entry may linger until whoever inherited it reaps it).
    let left = processes_with(&w1_dir);
    assert!(left.is_empty(), "VM processes {left:?} of w1 are left");

    let b = probe(&h, "p2");
    assert_eq!(ready(&h), Vec::<String>::new());
    let (code, err) = second.wait();
    assert_eq!(
        code,
        0,
        "the warm shim: {err}\ncontainerd's log:\n{}",
        h.log_tail()
    );
    // Another boot of another kernel, with nothing of p1's.
    assert_ne!(a[0], b[0], "boot ids");
    assert_eq!(a[1].trim(), "", "a fresh sandbox's /dev/shm is empty");
    assert_eq!(b[1].trim(), "", "p1's mark is not in p2's /dev/shm");
    assert_eq!(
        (a[2].as_str(), b[2].as_str()),
        ("0", "0"),
        "no sleep of p1 in p2"
    );

    // The pool is empty now: cold, and the log says why.
    let (code, out, err) = h.run("p3", BUSYBOX, &["echo", "cold"]);
    assert_eq!((code, out.as_str()), (0, "cold\n"), "{err}");
    assert!(
        h.log().contains("capsid-poold is not running"),
        "{}",
        h.log_tail()
    );
    h.assert_clean(&["p1", "p2", "p3"]);
}

#[test]
fn a_shape_the_pool_does_not_hold_boots_cold() {
    let h = ShimHarness::start();
    enable_pool(&h);
    let warm = Warm::boot(&h, "w3");
    // 512 MiB: not the pooled shape.
    let (code, out, err) = h.run_with(
        &["--rm", "--memory-limit", "536870912"],
        "s1",
        &["sh", "-c", "echo big"],
    );
    assert_eq!((code, out.as_str()), (0, "big\n"), "{err}");
    assert!(
        h.log()
            .contains("no [[pool.shapes]] entry fits 1 vCPUs and"),
        "{}",
        h.log_tail()
    );
    assert_eq!(ready(&h), ["w3"], "the pooled sandbox is still there");
    assert!(warm.alive());
    drop(warm);
    h.assert_clean(&["s1"]);
}

/// Two network namespaces joined by a veth pair: the container's and a
/// peer's, deleted on drop.
struct Wire {
    names: [String; 2],
}

impl Wire {
    fn new() -> Self {
        let pid = std::process::id();
        let names = [format!("capsid-pl-c-{pid}"), format!("capsid-pl-p-{pid}")];
        for n in &names {
            let (code, _, err) = run(Command::new("ip").args(["netns", "add", n]));
            assert_eq!(code, 0, "{err}");
        }
        let sh = format!(
            "ip -n {c} link add eth0 type veth peer name peer0 netns {p} && \
             ip -n {c} addr add 10.232.0.2/24 dev eth0 && ip -n {c} link set eth0 up && \
             ip -n {p} addr add 10.232.0.1/24 dev peer0 && ip -n {p} link set peer0 up && \
             ip -n {c} link set lo up && ip -n {p} link set lo up",
            c = names[0],
            p = names[1]
        );
        let (code, _, err) = run(Command::new("sh").args(["-c", &sh]));
        assert_eq!(code, 0, "{err}");
        Self { names }
    }

    fn container_ns(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.names[0])
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn reaches_peer(h: &ShimHarness, runtime: &[&str], id: &str, wire: &Wire) -> String {
    let ns = format!("network:{}", wire.container_ns().display());
    let mut cmd = h.ctrd.ctr();
    cmd.args(["run", "--rm"])
        .args(runtime)
        .args(["--with-ns", &ns, BUSYBOX, id])
        .args([
            "sh",
            "-c",
            "ip -4 -o addr show eth0 | grep -o '10.232.0.2/24'; ping -c 1 -W 10 10.232.0.1 >/dev/null && echo reached",
        ]);
    let (code, out, err) = run(&mut cmd);
    assert_eq!(code, 0, "{id}: {out}{err}\n{}", h.log_tail());
    out
}

#[test]
fn a_pooled_sandbox_joins_the_containers_network() {
    let h = ShimHarness::start();
    enable_pool(&h);
    let wire = Wire::new();
    let reference = reaches_peer(&h, &["--runtime", "io.containerd.runc.v2"], "n0", &wire);
    assert_eq!(reference, "10.232.0.2/24\nreached\n");

    let warm = Warm::boot(&h, "w4");
    let shim = h.shim().display().to_string();
    let config = h.config().display().to_string();
    let out = reaches_peer(
        &h,
        &["--runtime", &shim, "--runtime-config-path", &config],
        "n1",
        &wire,
    );
    assert_eq!(out, "10.232.0.2/24\nreached\n");
    assert!(
        h.log().contains("pooled VM's tap moved in and attached"),
        "{}",
        h.log_tail()
    );
    let (code, err) = warm.wait();
    assert_eq!(
        code,
        0,
        "the warm shim: {err}\ncontainerd's log:\n{}",
        h.log_tail()
    );
    // Only the veth is left in the container's namespace.
    let (_, links, _) = run(Command::new("ip").args(["-n", &wire.names[0], "-o", "link"]));
    assert_eq!(links.lines().count(), 2, "lo and eth0 only:\n{links}");
    h.assert_clean(&["n0", "n1"]);
}

#[test]
fn an_unclaimed_warm_shim_leaves_nothing_when_terminated() {
    let h = ShimHarness::start();
    enable_pool(&h);
    let warm = Warm::boot(&h, "w5");
    let vm = processes_with(&h.state_dir().join("w5").display().to_string());
    assert!(!vm.is_empty());
    let pid = warm.pid;
    drop(warm);
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && start.elapsed() < LONG {
        std::thread::sleep(Duration::from_millis(50));
    }
    h.assert_clean(&[]);
}

#[test]
fn a_pooled_sandboxs_processes_move_into_the_containers_cgroup() {
    let h = ShimHarness::start();
    enable_pool(&h);
    let warm = Warm::boot(&h, "w6");
    let vm = processes_with(&h.state_dir().join("w6").display().to_string());
    assert!(!vm.is_empty());
    h.run_detached("g1", &["sleep", "1000"]);
    for pid in &vm {
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let memory = cgroups
            .lines()
            .find(|l| {
                l.split(':')
                    .nth(1)
                    .is_some_and(|c| c.split(',').any(|c| c == "memory"))
            })
            .unwrap_or_else(|| cgroups.lines().last().unwrap());
        assert!(
            memory.ends_with("/default/g1"),
            "VM process {pid} is in {memory}, not ctr's /default/g1:\n{cgroups}\n{}",
            h.log_tail()
        );
    }
    let (code, _, err) = h.ctr(&["task", "kill", "-s", "SIGKILL", "g1"]);
    assert_eq!(code, 0, "{err}");
    h.wait_status("g1", "STOPPED", LONG);
    let (code, _, err) = h.ctr(&["task", "delete", "g1"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = h.ctr(&["container", "delete", "g1"]);
    assert_eq!(code, 0, "{err}");
    let (code, err) = warm.wait();
    assert_eq!(
        code,
        0,
        "the warm shim: {err}\ncontainerd's log:\n{}",
        h.log_tail()
    );
    h.assert_clean(&["g1"]);
    let memory_root = Path::new("/sys/fs/cgroup/memory/default/g1");
    assert!(!memory_root.exists(), "the container's cgroup is removed");
}

#[test]
fn a_pooled_container_has_its_volumes_and_a_killed_shim_is_cleaned_up_from_the_bundle() {
    let h = ShimHarness::start();
    enable_pool(&h);
    let vol = h.state_dir().with_file_name("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("precious"), "keep me\n").unwrap();
    let warm = Warm::boot(&h, "w7");
    let mount = format!("type=bind,src={},dst=/data,options=rbind:rw", vol.display());
    let (code, out, err) = run(&mut h.run_cmd(
        &["-d", "--mount", &mount],
        BUSYBOX,
        "k1",
        &["sh", "-c", "cat /data/precious > /data/copy; sleep 1000"],
    ));
    assert_eq!(code, 0, "{out}{err}\n{}", h.log_tail());
    h.wait_status("k1", "RUNNING", LONG);
    assert!(
        h.log().contains("the task takes a pooled sandbox"),
        "{}",
        h.log_tail()
    );
    let start = Instant::now();
    while std::fs::read_to_string(vol.join("copy")).unwrap_or_default() != "keep me\n" {
        assert!(start.elapsed() < LONG, "the guest's copy never arrived");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill")
        .args(["-9", &warm.pid.to_string()])
        .status();
    let (_, _) = warm.wait();
    // containerd notices, runs `delete` in the bundle, and forgets the task.
    h.wait_dead_shim_cleaned_up("k1");
    let (code, _, err) = h.ctr(&["container", "delete", "k1"]);
    assert_eq!(code, 0, "{err}");
    h.assert_clean(&["k1"]);
    assert_eq!(
        std::fs::read_to_string(vol.join("precious")).unwrap(),
        "keep me\n"
    );
}

/// MemAvailable inside a container of `flags`, MiB.
fn available_mib(h: &ShimHarness, id: &str, flags: &[&str]) -> u64 {
    let mut all = vec!["--rm"];
    all.extend_from_slice(flags);
    let (code, out, err) = h.run_with(
        &all,
        id,
        &["sh", "-c", "awk '/MemAvailable/ {print $2}' /proc/meminfo"],
    );
    assert_eq!(code, 0, "{id}: {err}\n{}", h.log_tail());
    out.trim().parse::<u64>().unwrap() / 1024
}

#[test]
fn a_larger_container_takes_a_sandbox_booted_larger_and_the_balloon_gives_it_its_size() {
    let h = ShimHarness::start();
    enable_pool_with(&h, 1024);
    // The reference: a cold VM for a 512 MiB limit (the limit and the
    // guest's own headroom).
    let cold = available_mib(&h, "m0", &["--memory-limit", "536870912"]);
    assert!(
        h.log().contains("capsid-poold is not running"),
        "{}",
        h.log_tail()
    );
    let warm = Warm::boot_with(&h, "w8", 1024);
    let pooled = available_mib(&h, "m1", &["--memory-limit", "536870912"]);
    assert!(
        h.log().contains("the task takes a pooled sandbox"),
        "{}",
        h.log_tail()
    );
    let (code, err) = warm.wait();
    assert_eq!(
        code,
        0,
        "the warm shim: {err}\ncontainerd's log:\n{}",
        h.log_tail()
    );
    // The balloon gave the guest the container's size of its 1024 MiB,
    // no more, no less: what the cold VM has, give or take the page
    // descriptors of the larger VM (1/64 of it) and the balloon driver.
    eprintln!(
        "MemAvailable: cold VM {cold} MiB, pooled (1024 MiB VM, the rest ballooned) {pooled} MiB"
    );
    assert!(
        pooled + 48 >= cold && pooled <= cold + 16,
        "cold {cold}, pooled {pooled}"
    );
    h.assert_clean(&["m0", "m1"]);
}

#[test]
fn the_daemon_keeps_the_pool_filled_and_containers_take_from_it_until_it_stops() {
    let h = ShimHarness::start();
    capsid_tests::pool::enable(h.config(), 256, 1);
    let mut daemon = capsid_tests::pool::PoolDaemon::start(h.config());
    let first = daemon.wait_ready(1, LONG);
    let (code, out, err) = run(Command::new(capsid_tests::bin("capsid"))
        .arg("--config")
        .arg(h.config())
        .arg("check"));
    assert!(
        out.contains("capsid-poold running") && out.contains("1 of 1 ready"),
        "capsid check ({code}): {out}{err}"
    );
    let mut taken = Vec::new();
    for i in 0..3 {
        let ready = daemon.wait_ready(1, LONG);
        let id = format!("d{i}");
        let (code, out, err) = h.run(&id, BUSYBOX, &["echo", &id]);
        assert_eq!(
            (code, out.trim()),
            (0, id.as_str()),
            "{err}\n{}",
            h.log_tail()
        );
        assert!(
            !daemon.ready().contains(&ready[0]),
            "{id} took {}",
            ready[0]
        );
        taken.push(ready[0].clone());
    }
    assert_eq!(taken[0], first[0]);
    taken.dedup();
    assert_eq!(
        taken.len(),
        3,
        "three sandboxes, each taken once: {taken:?}"
    );
    assert_eq!(
        h.log().matches("the task takes a pooled sandbox").count(),
        3
    );
    // An empty pool, its refill under way (a boot takes far longer than
    // a claim): cold, and the log says so.
    let ready = daemon.wait_ready(1, LONG);
    let config = capsid_sandbox::config::Config::read(h.config()).unwrap();
    let key = ready_key(&config, &ready[0]);
    let socket = pool::take(&config, &key).unwrap().expect("a ready sandbox");
    let (code, out, err) = h.run("d4", BUSYBOX, &["echo", "cold"]);
    assert_eq!((code, out.as_str()), (0, "cold\n"), "{err}");
    assert!(
        h.log()
            .contains("the pool has no sandbox for 1 vCPUs and 256 MiB ready (being refilled)"),
        "{}",
        h.log_tail()
    );
    // Taken without a claim: the daemon leaves it as claimed, and a
    // claimant that never connects would leave it waiting (it discards
    // itself after a grace period); stop it.
    let name = socket.file_stem().unwrap().to_string_lossy().into_owned();
    let warm = capsid_sandbox::pool_daemon::find_warm_shim(&name).expect("the taken warm shim");
    let _ = Command::new("kill").arg(warm.pid.to_string()).status();
    let start = Instant::now();
    while warm.is_alive() || daemon.log_of(&name).is_some() {
        assert!(start.elapsed() < LONG, "the taken warm shim did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(daemon.stop(), 0, "{}", daemon.log());
    // The daemon down: a container boots cold and the log says why.
    let (code, out, err) = h.run("d3", BUSYBOX, &["echo", "cold"]);
    assert_eq!((code, out.as_str()), (0, "cold\n"), "{err}");
    assert!(
        h.log().contains("capsid-poold is not running"),
        "{}",
        h.log_tail()
    );
    h.assert_clean(&["d0", "d1", "d2", "d3", "d4"]);
}

/// Whether the guest RAM of the QEMU whose command line names `run_dir`
/// holds `marker`: its memfd-backed memory read through /proc/PID/mem.
fn guest_ram_holds(run_dir: &Path, marker: &[u8]) -> bool {
    let qemu = processes_with(&run_dir.display().to_string())
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.starts_with("qemu"))
        })
        .expect("the VM's QEMU");
    let maps = std::fs::read_to_string(format!("/proc/{qemu}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{qemu}/mem")).unwrap();
    let mut found_ram = false;
    for line in maps.lines().filter(|l| l.contains("memfd:")) {
        found_ram = true;
        let range = line.split_whitespace().next().unwrap();
        let (start, end) = range.split_once('-').unwrap();
        let (start, end) = (
            u64::from_str_radix(start, 16).unwrap(),
            u64::from_str_radix(end, 16).unwrap(),
        );
        let mut at = start;
        let mut buf = vec![0u8; 4 << 20];
        while at < end {
            use std::io::{Read, Seek, SeekFrom};
            let len = buf.len().min((end - at) as usize);
            mem.seek(SeekFrom::Start(at)).unwrap();
            // Overlap chunks by the marker's length so none is split.
            let n = mem.read(&mut buf[..len]).unwrap_or(0);
            if buf[..n].windows(marker.len()).any(|w| w == marker) {
                return true;
            }
            if at + len as u64 >= end {
                break;
            }
            at += (len - marker.len()) as u64;
        }
    }
    assert!(found_ram, "no guest RAM mapping in QEMU {qemu}:\n{maps}");
    false
}

#[test]
fn a_pooled_sandbox_holds_nothing_of_the_last_containers_memory() {
    let h = ShimHarness::start();
    enable_pool(&h);
    let first = Warm::boot(&h, "w9");
    let second = Warm::boot(&h, "wa");
    // Written by the shell only: the marker exists nowhere but in the
    // guest's memory (its page cache, the shell's heap).
    let marker = format!("capsid-marker-{}", capsid_tests::containerd::rand_suffix());
    let script = format!("M={marker}; echo \"$M$M\" > /dev/shm/m; sleep 1000");
    h.run_detached("r1", &["sh", "-c", &script]);
    let twice = format!("{marker}{marker}");
    // The scan works: the first VM holds it.
    let start = Instant::now();
    while !guest_ram_holds(&h.state_dir().join("w9"), twice.as_bytes()) {
        assert!(
            start.elapsed() < LONG,
            "the marker never reached the first VM's RAM"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, _, err) = h.ctr(&["task", "kill", "-s", "SIGKILL", "r1"]);
    assert_eq!(code, 0, "{err}");
    h.wait_status("r1", "STOPPED", LONG);
    let (code, _, err) = h.ctr(&["task", "delete", "r1"]);
    assert_eq!(code, 0, "{err}");
    let (code, err) = first.wait();
    assert_eq!(
        code,
        0,
        "the warm shim: {err}\ncontainerd's log:\n{}",
        h.log_tail()
    );

    h.run_detached("r2", &["sleep", "1000"]);
    assert!(
        !guest_ram_holds(&h.state_dir().join("wa"), twice.as_bytes()),
        "the second sandbox's RAM holds the first container's marker"
    );
    let (code, _, err) = h.ctr(&["task", "kill", "-s", "SIGKILL", "r2"]);
    assert_eq!(code, 0, "{err}");
    h.wait_status("r2", "STOPPED", LONG);
    let (code, _, err) = h.ctr(&["task", "delete", "r2"]);
    assert_eq!(code, 0, "{err}");
    for id in ["r1", "r2"] {
        let (code, _, err) = h.ctr(&["container", "delete", id]);
        assert_eq!(code, 0, "{err}");
    }
    let (code, err) = second.wait();
    assert_eq!(
        code,
        0,
        "the warm shim: {err}\ncontainerd's log:\n{}",
        h.log_tail()
    );
    h.assert_clean(&["r1", "r2"]);
}
