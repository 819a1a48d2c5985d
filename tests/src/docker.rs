//! A private Docker Engine for tests: Debian 13's dockerd 26.1, docker CLI
//! and containerd 1.7 (unpacked by contrib/clients/fetch.sh, never
//! installed), started in a network namespace of their own — so that
//! docker0, its iptables rules and published ports are the test's alone
//! and tests can run side by side — with capsid's shim configured as the
//! `capsid` runtime and runc (Debian 12's) as the reference. The test
//! images are loaded with `docker load`.
//!
//! Every test drives the real `docker` CLI, once per runtime in
//! [`RUNTIMES`]; a test that fails with runc is a broken test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::containerd::{Containerd, ContainerdSetup, TestNetns};
use crate::shim::{cmdline, processes_with, state_leftovers, write_capsid_config};
use crate::{artifact, bin, repo_root, run};

/// The reference runtime (Docker's own default).
pub const RUNC: &str = "runc";
/// capsid, as configured in daemon.json.
pub const CAPSID: &str = "capsid";
/// The runtimes every Docker test runs with, reference first.
pub const RUNTIMES: [&str; 2] = [RUNC, CAPSID];
/// The busybox test image as Docker names it.
pub const BUSYBOX: &str = "capsid/busybox:latest";
/// The upstream DNS server dockerd is given (`--dns`): a responder of the
/// harness on the loopback of the daemons' namespace, so that name
/// lookups that leave Docker's embedded DNS have an answer on any machine.
pub const UPSTREAM_DNS: &str = "10.99.0.53";
/// The name [`UPSTREAM_DNS`] knows, and its address.
pub const UPSTREAM_NAME: (&str, [u8; 4]) = ("upstream.capsid.test", [192, 0, 2, 7]);

/// busybox with capsid-guest-tool in /bin ([`DockerHarness::load_tools_image`]).
pub const TOOLS: &str = "capsid/busybox-tools:latest";

/// The unpacked Debian 13 clients (fetched on first use, then cached).
pub fn clients_root() -> PathBuf {
    let script = repo_root().join("contrib/clients/fetch.sh");
    let (code, out, err) = run(Command::new("bash").arg(&script).arg("trixie"));
    assert_eq!(code, 0, "{} trixie failed: {err}", script.display());
    PathBuf::from(out.trim())
}

/// Answers A queries for [`UPSTREAM_NAME`] (NXDOMAIN otherwise) on
/// [`UPSTREAM_DNS`]:53/udp inside `netns`, until the namespace goes.
fn start_upstream_dns(netns: &Path) {
    let name = netns.file_name().unwrap().to_str().unwrap().to_owned();
    // On loopback: local to the whole namespace, reached from containers
    // through docker0 (no dummy device needed).
    let address = format!("{UPSTREAM_DNS}/32");
    let args = ["-n", &name, "addr", "add", &address, "dev", "lo"];
    let (code, _, err) = run(Command::new("ip").args(args));
    assert_eq!(code, 0, "ip {args:?}: {err}");
    let netns = std::fs::File::open(netns).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::os::fd::AsFd;
        nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let socket = std::net::UdpSocket::bind((UPSTREAM_DNS, 53)).unwrap();
        tx.send(()).unwrap();
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            if let Some(answer) = dns_answer(&buf[..n]) {
                let _ = socket.send_to(&answer, peer);
            }
        }
    });
    rx.recv().unwrap();
}

/// The answer to one query: [`UPSTREAM_NAME`]'s A record, or NXDOMAIN.
fn dns_answer(query: &[u8]) -> Option<Vec<u8>> {
    // The question's name starts after the 12-byte header.
    let mut at = 12;
    let mut labels = Vec::new();
    while *query.get(at)? != 0 {
        let len = usize::from(query[at]);
        labels.push(String::from_utf8_lossy(query.get(at + 1..at + 1 + len)?).to_lowercase());
        at += len + 1;
    }
    let question_end = at + 5;
    let qtype = u16::from_be_bytes([*query.get(at + 1)?, *query.get(at + 2)?]);
    let known = labels.join(".") == UPSTREAM_NAME.0 && qtype == 1;
    let mut answer = query.get(..question_end)?.to_vec();
    // QR, RD copied, RA; rcode 0 or 3 (NXDOMAIN); one answer or none.
    answer[2] = 0x80 | (query[2] & 0x01);
    answer[3] = if known { 0x80 } else { 0x83 };
    answer[6..12].copy_from_slice(&[0, u8::from(known), 0, 0, 0, 0]);
    if known {
        answer.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        answer.extend_from_slice(&UPSTREAM_NAME.1);
    }
    Some(answer)
}

/// A running private dockerd on a private containerd 1.7.
#[derive(Debug)]
pub struct DockerHarness {
    dockerd: Child,
    ctrd: Option<Containerd>,
    netns: Option<TestNetns>,
    dir: tempfile::TempDir,
    docker: PathBuf,
}

impl DockerHarness {
    /// Starts containerd and dockerd in a namespace of their own and loads
    /// the test images.
    pub fn start() -> Self {
        let root = clients_root();
        let dir = tempfile::Builder::new()
            .prefix("capsid-docker")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        let netns = TestNetns::create("capsid-dockerd");
        start_upstream_dns(&netns.path());
        let shims = d.join("shims");
        std::fs::create_dir_all(&shims).expect("shims dir");
        std::os::unix::fs::symlink(
            bin("containerd-shim-capsid-v2"),
            shims.join("containerd-shim-capsid-v2"),
        )
        .expect("shim link");
        let ctrd = Containerd::start_with(ContainerdSetup {
            bin_dir: Some(root.join("usr/bin")),
            netns: Some(netns.path()),
            path_prefix: vec![shims],
            cri_config: None,
        });
        let capsid_config = write_capsid_config(d);
        let daemon_json = serde_json::json!({
            "runtimes": {
                CAPSID: {
                    "runtimeType": "io.containerd.capsid.v2",
                    "options": {"ConfigPath": capsid_config}
                },
                "capsid-missing-config": {
                    "runtimeType": "io.containerd.capsid.v2",
                    "options": {"ConfigPath": d.join("no-such-config.toml")}
                }
            }
        });
        let daemon_json_path = d.join("daemon.json");
        std::fs::write(&daemon_json_path, daemon_json.to_string()).expect("daemon.json");
        let log = std::fs::File::create(d.join("dockerd.log")).expect("dockerd log");
        let path = std::env::join_paths(
            [root.join("usr/bin"), root.join("usr/sbin")]
                .into_iter()
                .chain(std::env::split_paths(
                    &std::env::var_os("PATH").unwrap_or_default(),
                )),
        )
        .expect("PATH");
        let dockerd = Command::new("nsenter")
            .arg(format!("--net={}", netns.path().display()))
            .arg(root.join("usr/sbin/dockerd"))
            .arg("--config-file")
            .arg(&daemon_json_path)
            .arg("--containerd")
            .arg(ctrd.socket())
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("--dns")
            .arg(UPSTREAM_DNS)
            .arg("-H")
            .arg(format!("unix://{}", d.join("docker.sock").display()))
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        let me = Self {
            dockerd,
            ctrd: Some(ctrd),
            netns: Some(netns),
            dir,
            docker: root.join("usr/bin/docker"),
        };
        let start = Instant::now();
        while me.docker(&["version"]).0 != 0 {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "dockerd did not come up:\n{}",
                me.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let (code, out, err) = me.docker(&[
            "load",
            "-i",
            artifact("images/busybox.tar").to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "docker load: {out}{err}");
        me
    }

    /// Makes [`TOOLS`]: busybox plus this build's static capsid-guest-tool
    /// (`resolve NAME` asks the container's nameserver directly, which
    /// static busybox cannot), by `docker cp` into a created container and
    /// `docker commit`.
    pub fn load_tools_image(&self) {
        let tool = repo_root().join("target/x86_64-unknown-linux-gnu/release/capsid-guest-tool");
        assert!(
            tool.exists(),
            "{} is missing: run `make guest-tool`",
            tool.display()
        );
        let steps: [Vec<String>; 4] = [
            vec![
                "create".into(),
                "--name".into(),
                "tools-base".into(),
                BUSYBOX.into(),
                "true".into(),
            ],
            vec![
                "cp".into(),
                tool.display().to_string(),
                "tools-base:/bin/capsid-guest-tool".into(),
            ],
            vec!["commit".into(), "tools-base".into(), TOOLS.into()],
            vec!["rm".into(), "tools-base".into()],
        ];
        for step in steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            let (code, out, err) = self.docker(&args);
            assert_eq!(code, 0, "docker {args:?}: {out}{err}");
        }
    }

    /// A `docker` command talking to this dockerd, stdin from /dev/null.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.docker);
        cmd.env("DOCKER_HOST", format!("unix://{}", self.socket().display()))
            .env("DOCKER_CONFIG", self.dir.path().join("client"))
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// `docker ARGS…`: (exit code, stdout, stderr).
    pub fn docker(&self, args: &[&str]) -> (i32, String, String) {
        run(&mut self.cmd(args))
    }

    /// `docker run --runtime RUNTIME ARGS…`.
    pub fn run(&self, runtime: &str, args: &[&str]) -> (i32, String, String) {
        let mut full = vec!["run", "--runtime", runtime];
        full.extend_from_slice(args);
        self.docker(&full)
    }

    /// `docker run --rm --runtime RUNTIME ARGS…`, asserting success; its stdout.
    pub fn run_ok(&self, runtime: &str, args: &[&str]) -> String {
        let mut full = vec!["--rm"];
        full.extend_from_slice(args);
        let (code, out, err) = self.run(runtime, &full);
        assert_eq!(
            code,
            0,
            "[{runtime}] docker run {args:?}: {out}{err}\n{}",
            self.log_tail()
        );
        out
    }

    /// `docker inspect -f FORMAT NAME`.
    pub fn inspect(&self, name: &str, format: &str) -> String {
        let (code, out, err) = self.docker(&["inspect", "-f", format, name]);
        assert_eq!(code, 0, "docker inspect {name}: {err}");
        out.trim().to_string()
    }

    /// Waits until `docker inspect -f FORMAT NAME` prints `want`.
    pub fn wait_for(&self, name: &str, format: &str, want: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            let now = self.inspect(name, format);
            if now == want {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "{name}: {format} is {now:?}, not {want:?}, after {timeout:?}\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A command run in the daemons' network namespace (where docker0 and
    /// published ports are).
    pub fn in_netns(&self, program: &str, args: &[&str]) -> (i32, String, String) {
        let netns = self.netns.as_ref().expect("netns").path();
        run(Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .arg(program)
            .args(args)
            .stdin(Stdio::null()))
    }

    /// The docker socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    /// capsid's state directory (sandbox run dirs, own network namespaces).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// dockerd's and containerd's logs (the shims log into containerd's).
    pub fn log(&self) -> String {
        let dockerd =
            std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default();
        let ctrd = self.ctrd.as_ref().map(Containerd::log).unwrap_or_default();
        format!("--- dockerd ---\n{dockerd}\n--- containerd ---\n{ctrd}")
    }

    /// The last lines of both logs, for assertion messages.
    pub fn log_tail(&self) -> String {
        let tail = |text: String| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(25)..].join("\n")
        };
        let dockerd =
            std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default();
        let ctrd = self.ctrd.as_ref().map(Containerd::log).unwrap_or_default();
        format!(
            "--- dockerd ---\n{}\n--- containerd ---\n{}",
            tail(dockerd),
            tail(ctrd)
        )
    }

    /// What capsid left: VM and device processes, shims, mounts, sandbox
    /// run directories and network namespaces. Call after every container
    /// is removed.
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        let dir = self.dir.path().display().to_string();
        for pid in processes_with(&dir) {
            let args = cmdline(pid);
            let daemon = args
                .first()
                .is_some_and(|a| a.ends_with("/dockerd") || a.ends_with("/containerd"));
            if !daemon {
                found.push(format!("process {pid}: {}", args.join(" ")));
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let state = self.state_dir().display().to_string();
        for m in mounts.lines() {
            if m.contains(&format!("{}/run", dir))
                || m.contains("capsid-lowers")
                || m.contains(&state)
            {
                found.push(format!("mount {m}"));
            }
        }
        found.extend(state_leftovers(&self.state_dir()));
        found
    }

    /// Removes every container (`docker rm -f`), then asserts nothing of
    /// capsid's is left.
    pub fn assert_clean(&self) {
        let (_, out, _) = self.docker(&["ps", "-aq"]);
        let ids: Vec<&str> = out.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids);
            let (code, out, err) = self.docker(&args);
            assert_eq!(code, 0, "docker rm -f: {out}{err}");
        }
        let start = Instant::now();
        loop {
            let left = self.leftovers();
            if left.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "left behind:\n{}\n{}",
                left.join("\n"),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The harness's directory (daemon state, capsid's config and state).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for DockerHarness {
    fn drop(&mut self) {
        // Containers first (their shims and VMs), then the daemons.
        let (_, out, _) = self.docker(&["ps", "-aq"]);
        for id in out.split_whitespace() {
            let _ = self.docker(&["rm", "-f", id]);
        }
        let _ = Command::new("kill")
            .arg(self.dockerd.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline && matches!(self.dockerd.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.dockerd.kill();
        let _ = self.dockerd.wait();
        drop(self.ctrd.take());
        // dockerd's own mounts (overlay2, netns files) under our dir.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let dir = self.dir.path();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| Path::new(m).starts_with(dir))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        drop(self.netns.take());
    }
}
