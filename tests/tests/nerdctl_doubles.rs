//! What nerdctl sends, reproduced (nerdctl itself cannot be installed
//! here): every container gets a `createRuntime` hook that puts it on a
//! CNI network from the namespace of the state's pid, and a `poststop` hook
//! that takes it off again; detached output goes to a `binary://` logger.
//! The doubles are a small CNI hook (Python, Debian's CNI plugins) and a
//! logger script, driven through `ctr run --config SPEC --log-uri
//! binary://…`, with runc first as the reference, then capsid. The CNI
//! bridge lives in a network namespace playing the host.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capsid_tests::shim::ShimHarness;
use capsid_tests::{artifact, run};

const SUBNET: &str = "10.232.0.0/24";
const GATEWAY: &str = "10.232.0.1";

/// The CNI hook double: `hook.py createRuntime|poststop`, the OCI state on
/// stdin, ADD (bridge, then portmap) or DEL (reverse) through the plugins.
const HOOK: &str = r#"
import json, os, subprocess, sys
stage = sys.argv[1]
state = json.load(sys.stdin)
conf = json.load(open(os.environ["NETCONF"]))
results = os.path.join(os.environ["HOOK_STATE"], state["id"] + ".json")
log = open(os.path.join(os.environ["HOOK_STATE"], "hook.log"), "a")
log.write(f"{stage} pid={state.get('pid', 0)} status={state['status']}\n")
def plugin(cmd, p, prev, netns):
    c = dict(p, name=conf["name"], cniVersion=conf["cniVersion"])
    if prev is not None:
        c["prevResult"] = prev
    env = dict(os.environ, CNI_COMMAND=cmd, CNI_CONTAINERID=state["id"], CNI_NETNS=netns,
               CNI_IFNAME="eth0", CNI_PATH="/usr/lib/cni")
    out = subprocess.run(["/usr/lib/cni/" + p["type"]], input=json.dumps(c).encode(),
                         env=env, capture_output=True)
    if out.returncode != 0:
        sys.exit(f"{p['type']} {cmd}: {out.stdout.decode()} {out.stderr.decode()}")
    return json.loads(out.stdout) if out.stdout.strip() else prev
if stage == "createRuntime":
    prev = None
    for p in conf["plugins"]:
        prev = plugin("ADD", p, prev, f"/proc/{state['pid']}/ns/net")
    json.dump(prev, open(results, "w"))
else:
    prev = json.load(open(results)) if os.path.exists(results) else None
    for p in reversed(conf["plugins"]):
        plugin("DEL", p, prev, "")
    if os.path.exists(results):
        os.remove(results)
"#;

/// The logger double: closes fd 5 once ready, copies fd 3 and fd 4 into
/// `$1.out` and `$1.err` until the process's output ends, finishing its
/// copy when asked to stop (SIGTERM), then says whose output it was.
const LOGGER: &str = "#!/bin/sh\nout=\"$1\"\ntrap '' TERM\nexec 5>&-\ncat <&3 > \"$out.out\" &\ncat <&4 > \"$out.err\"\nwait\necho \"$CONTAINER_NAMESPACE/$CONTAINER_ID\" > \"$out.env\"\n";

/// A network namespace playing the host (CNI bridge, portmap rules).
struct HostNs(String);

impl HostNs {
    fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("capsid-nerdctl-{}-{n}", std::process::id());
        let (code, _, err) = run(Command::new("ip").args(["netns", "add", &name]));
        assert_eq!(code, 0, "{err}");
        run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        Self(name)
    }

    fn exec(&self, args: &[&str]) -> (i32, String, String) {
        run(Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .stdin(Stdio::null()))
    }
}

impl Drop for HostNs {
    fn drop(&mut self) {
        run(Command::new("ip").args(["netns", "del", &self.0]));
    }
}

struct Doubles {
    dir: tempfile::TempDir,
    host: HostNs,
    rootfs: PathBuf,
}

impl Doubles {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("capsid-nerdctl")
            .tempdir()
            .unwrap();
        let d = dir.path();
        std::fs::write(d.join("hook.py"), HOOK).unwrap();
        executable(&d.join("logger"), LOGGER);
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "nerdctl-double",
            "plugins": [
                {"type": "bridge", "bridge": "cni-nd0", "isGateway": true, "ipMasq": false,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]],
                          "dataDir": d.join("ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": true},
                 "runtimeConfig": {"portMappings": [{"hostPort": 18090, "containerPort": 80, "protocol": "tcp"}]}}
            ]
        });
        std::fs::write(d.join("net.conflist"), conf.to_string()).unwrap();
        std::fs::create_dir(d.join("state")).unwrap();
        // The image's files as a plain directory (nerdctl's rootfs comes
        // from containerd's snapshot; a directory keeps the spec simple).
        let rootfs = d.join("rootfs");
        std::fs::create_dir(&rootfs).unwrap();
        let layout = artifact("images/busybox");
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        let blob = |digest: &str| {
            layout
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:"))
        };
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
        )
        .unwrap();
        for layer in manifest["layers"].as_array().unwrap() {
            let (code, _, err) = run(Command::new("tar")
                .arg("-xzf")
                .arg(blob(layer["digest"].as_str().unwrap()))
                .arg("-C")
                .arg(&rootfs));
            assert_eq!(code, 0, "{err}");
        }
        Self {
            host: HostNs::new(),
            dir,
            rootfs,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The spec nerdctl would give: `ctr oci spec` plus the hooks.
    fn spec(&self, h: &ShimHarness, id: &str, script: &str, hook_timeout: Option<u32>) -> PathBuf {
        let (code, out, err) = h.ctr(&["oci", "spec"]);
        assert_eq!(code, 0, "{err}");
        let mut spec: serde_json::Value = serde_json::from_str(&out).unwrap();
        spec["root"] = serde_json::json!({"path": self.rootfs});
        spec["process"]["args"] = serde_json::json!(["/bin/sh", "-c", script]);
        spec["process"]["env"] = serde_json::json!(["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]);
        let hook = |stage: &str| {
            let mut h = serde_json::json!({
                "path": "/usr/bin/nsenter",
                "args": ["nsenter", format!("--net=/run/netns/{}", self.host.0),
                         "python3", self.path("hook.py"), stage],
                "env": [format!("NETCONF={}", self.path("net.conflist").display()),
                        format!("HOOK_STATE={}", self.path("state").display()),
                        "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
            });
            if let Some(t) = hook_timeout {
                h["timeout"] = serde_json::json!(t);
            }
            h
        };
        spec["hooks"] = serde_json::json!({
            "createRuntime": [hook("createRuntime")],
            "poststop": [hook("poststop")]
        });
        let path = self.path(&format!("{id}.json"));
        std::fs::write(&path, spec.to_string()).unwrap();
        path
    }

    /// [`Doubles::spec`] without nerdctl's hooks.
    fn spec_without_hooks(&self, h: &ShimHarness, id: &str, script: &str) -> PathBuf {
        let path = self.spec(h, id, script, None);
        let mut spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        spec.as_object_mut().unwrap().remove("hooks");
        std::fs::write(&path, spec.to_string()).unwrap();
        path
    }

    fn hook_log(&self) -> String {
        std::fs::read_to_string(self.path("state/hook.log")).unwrap_or_default()
    }

    fn leases(&self) -> Vec<String> {
        std::fs::read_dir(self.path("ipam/nerdctl-double"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("10."))
            .collect()
    }
}

/// `ctr run` with `runtime` (runc's name, or capsid's shim by path).
fn ctr_run(h: &ShimHarness, runtime: &str, flags: &[&str]) -> Command {
    let mut cmd = h.ctrd.ctr();
    cmd.arg("run").arg("--runtime");
    if runtime == "capsid" {
        cmd.arg(h.shim())
            .arg("--runtime-config-path")
            .arg(h.config());
    } else {
        cmd.arg("io.containerd.runc.v2");
    }
    cmd.args(flags);
    cmd
}

#[test]
fn cni_hooks_and_a_binary_logger_work_as_nerdctl_uses_them() {
    let h = ShimHarness::start();
    let nd = Doubles::new();
    let ids: Vec<String> = ["runc", "capsid"]
        .iter()
        .map(|rt| format!("nd-{rt}-{}", std::process::id()))
        .collect();
    for (rt, id) in ["runc", "capsid"].into_iter().zip(&ids) {
        let _gone = Removed { h: &h, id };
        let id = id.as_str();
        let script = "echo line-1; echo to-stderr >&2; ip -o -4 addr show eth0; \
                      mkdir -p /tmp/www && echo served > /tmp/www/index.html; \
                      httpd -p 80 -h /tmp/www; \
                      i=2; while [ $i -le 200 ]; do echo line-$i; i=$((i+1)); done; sleep 1000";
        let spec = nd.spec(&h, id, script, None);
        let log = nd.path(&format!("log-{rt}"));
        let uri = format!("binary://{}?{}", nd.path("logger").display(), log.display());
        let (code, out, err) = run(&mut ctr_run(
            &h,
            rt,
            &[
                "-d",
                "--config",
                spec.to_str().unwrap(),
                "--log-uri",
                &uri,
                id,
            ],
        ));
        assert_eq!(code, 0, "[{rt}] {out}{err}\n{}", h.log_tail());
        h.wait_status(id, "RUNNING", Duration::from_secs(60));

        // The hook saw the task's pid, on the host, and CNI gave it an
        // address the container has.
        let hook_log = nd.hook_log();
        let pid: u32 = hook_log
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("createRuntime pid="))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("[{rt}] {hook_log}"));
        assert!(pid > 0, "[{rt}] {hook_log}");
        if rt == "capsid" {
            // The task's pid is the VM's main host process.
            let cmdline =
                std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            assert!(
                cmdline.contains("qemu-system") || cmdline.contains("capsid-vmm"),
                "[{rt}] pid {pid}: {cmdline:?}"
            );
        }
        let leases = nd.leases();
        assert_eq!(leases.len(), 1, "[{rt}] {leases:?}");
        let ip = leases[0].clone();

        // Reachable on its published port from the host.
        let url = format!("http://{GATEWAY}:18090/index.html");
        let start = Instant::now();
        let served = loop {
            let (code, out, _) = nd.host.exec(&["curl", "-sS", "-m", "3", &url]);
            if code == 0 || start.elapsed() > Duration::from_secs(60) {
                break out;
            }
            std::thread::sleep(Duration::from_millis(300));
        };
        if served.trim() != "served" {
            let direct =
                nd.host
                    .exec(&["curl", "-sS", "-m", "3", &format!("http://{ip}/index.html")]);
            let nat = nd.host.exec(&["iptables", "-t", "nat", "-S"]);
            let addr = nd.host.exec(&["ip", "-o", "addr"]);
            panic!("[{rt}] {url}: {served:?}\ndirect: {direct:?}\nnat: {nat:?}\naddr: {addr:?}");
        }

        // Output reaches the logger complete and in order.
        let out_file = PathBuf::from(format!("{}.out", log.display()));
        let start = Instant::now();
        while !std::fs::read_to_string(&out_file)
            .unwrap_or_default()
            .contains("line-200")
        {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "[{rt}] no line-200 in the log"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let text = std::fs::read_to_string(&out_file).unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("line-")).collect();
        let want: Vec<String> = (1..=200).map(|i| format!("line-{i}")).collect();
        assert_eq!(lines, want, "[{rt}]");
        assert!(
            text.contains(&format!("inet {ip}/")),
            "[{rt}] {ip} not in {text}"
        );

        let (code, _, err) = h.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        assert_eq!(code, 0, "[{rt}] {err}");
        h.wait_status(id, "STOPPED", Duration::from_secs(30));
        let (code, _, err) = h.ctr(&["task", "delete", id]);
        assert_eq!(code, 0, "[{rt}] {err}");
        let (code, _, err) = h.ctr(&["container", "delete", id]);
        assert_eq!(code, 0, "[{rt}] {err}");

        // poststop ran: the lease is released, and the logger finished.
        assert!(
            nd.hook_log().contains("poststop"),
            "[{rt}] {}",
            nd.hook_log()
        );
        assert!(nd.leases().is_empty(), "[{rt}] {:?}", nd.leases());
        let err_text =
            std::fs::read_to_string(format!("{}.err", log.display())).unwrap_or_default();
        assert_eq!(err_text.trim(), "to-stderr", "[{rt}]");
        let start = Instant::now();
        while !Path::new(&format!("{}.env", log.display())).exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "[{rt}] the logger never finished"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let env = std::fs::read_to_string(format!("{}.env", log.display())).unwrap();
        assert_eq!(env.trim(), format!("default/{id}"), "[{rt}]");
        std::fs::write(nd.path("state/hook.log"), "").unwrap();
    }
    h.assert_clean(&[ids[1].as_str()]);
}

/// The `ctr: …` error lines of a failed ctr command.
fn ctr_errors(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.starts_with("ctr: ")).collect()
}

/// Writes an executable script.
fn executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// Removes a task and its container whatever happened (a failed assertion
/// must not leave a runc container or a VM running).
struct Removed<'a> {
    h: &'a ShimHarness,
    id: &'a str,
}

impl Drop for Removed<'_> {
    fn drop(&mut self) {
        let _ = self.h.ctr(&["task", "kill", "-s", "SIGKILL", self.id]);
        let _ = self.h.ctr(&["task", "delete", "-f", self.id]);
        let _ = self.h.ctr(&["container", "delete", self.id]);
    }
}

#[test]
fn failing_hooks_and_loggers_fail_or_spare_the_container_as_runc_does() {
    let h = ShimHarness::start();
    let nd = Doubles::new();
    executable(&nd.path("early-logger"), "#!/bin/sh\nexec 5>&-\nexit 0\n");
    for rt in ["runc", "capsid"] {
        // A createRuntime hook that hangs past its timeout fails Create,
        // and the poststop hook still tears its network down.
        let id = format!("hang-{rt}-{}", std::process::id());
        let _gone = Removed { h: &h, id: &id };
        let spec = nd.spec(&h, &id, "true", Some(1));
        let mut spec_json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&spec).unwrap()).unwrap();
        spec_json["hooks"]["createRuntime"][0]["args"] =
            serde_json::json!(["sh", "-c", "exec sleep 30"]);
        spec_json["hooks"]["createRuntime"][0]["path"] = serde_json::json!("/bin/sh");
        std::fs::write(&spec, spec_json.to_string()).unwrap();
        let started = Instant::now();
        let (code, out, err) = run(&mut ctr_run(
            &h,
            rt,
            &["--rm", "--config", spec.to_str().unwrap(), &id],
        ));
        assert_ne!(code, 0, "[{rt}] {out}");
        assert!(
            started.elapsed() < Duration::from_secs(25),
            "[{rt}] the hook's timeout was not kept"
        );
        let errors = ctr_errors(&err);
        assert_eq!(errors.len(), 1, "[{rt}] {err}");
        assert!(
            nd.hook_log().contains("poststop"),
            "[{rt}] poststop did not run: {}",
            nd.hook_log()
        );
        std::fs::write(nd.path("state/hook.log"), "").unwrap();

        // A hook program that does not exist: one clear error.
        let id = format!("nohook-{rt}-{}", std::process::id());
        let _gone2 = Removed { h: &h, id: &id };
        let spec = nd.spec(&h, &id, "true", None);
        let mut spec_json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&spec).unwrap()).unwrap();
        spec_json["hooks"]["createRuntime"][0]["path"] = serde_json::json!("/nonexistent/hook");
        std::fs::write(&spec, spec_json.to_string()).unwrap();
        let (code, out, err) = run(&mut ctr_run(
            &h,
            rt,
            &["--rm", "--config", spec.to_str().unwrap(), &id],
        ));
        assert_ne!(code, 0, "[{rt}] {out}");
        let errors = ctr_errors(&err);
        assert_eq!(errors.len(), 1, "[{rt}] {err}");
        std::fs::write(nd.path("state/hook.log"), "").unwrap();

        // A logger that exits at once: the container runs to its end (its
        // output, more than a pipe holds, is dropped) and its exit status
        // is kept.
        let id = format!("early-{rt}-{}", std::process::id());
        let _gone3 = Removed { h: &h, id: &id };
        let spec = nd.spec_without_hooks(&h, &id, "head -c 1000000 /dev/zero; exit 3");
        let uri = format!("binary://{}", nd.path("early-logger").display());
        let (code, out, err) = run(&mut ctr_run(
            &h,
            rt,
            &[
                "--rm",
                "--config",
                spec.to_str().unwrap(),
                "--log-uri",
                &uri,
                &id,
            ],
        ));
        assert_eq!(code, 3, "[{rt}] {out}{err}\n{}", h.log_tail());
    }
    // A relative logger path is refused before anything is made.
    let id = format!("relative-{}", std::process::id());
    let _gone = Removed { h: &h, id: &id };
    let spec = nd.spec_without_hooks(&h, &id, "true");
    let (code, _, err) = run(&mut ctr_run(
        &h,
        "capsid",
        &[
            "--rm",
            "--config",
            spec.to_str().unwrap(),
            "--log-uri",
            "binary://logger",
            &id,
        ],
    ));
    assert_ne!(code, 0);
    assert!(err.contains("must be absolute"), "{err}");

    // A logger that never says it is ready fails Create (after its 10 s).
    // (containerd's runc shim waits for it without a limit: capsid only.)
    executable(&nd.path("mute-logger"), "#!/bin/sh\nexec sleep 60\n");
    let uri = format!("binary://{}", nd.path("mute-logger").display());
    let (code, _, err) = run(&mut ctr_run(
        &h,
        "capsid",
        &[
            "--rm",
            "--config",
            spec.to_str().unwrap(),
            "--log-uri",
            &uri,
            &id,
        ],
    ));
    assert_ne!(code, 0);
    let errors = ctr_errors(&err);
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("did not signal readiness"), "{err}");
    h.assert_clean(&[]);
}
