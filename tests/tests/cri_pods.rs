//! Pods through Kubernetes' CRI, as kubelet runs them: a private containerd
//! with its CRI plugin (capsid_tests::cri), driven by CRI calls only.
//!
//! [`two_container_pod`] is the scenario, run once per runtime handler:
//! `two_container_pod_runc` runs it with runc, the reference (a scenario
//! that fails with runc is a broken test), and capsid's handler runs the
//! very same scenario in `two_container_pod_capsid`. What capsid refuses
//! and survives (sizes beyond the pod's VM or the host's policy, a VM
//! killed under its pod, pods made and removed in a row) is in
//! cri_faults.rs.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use capsid_tests::cri::{cri_log, image_spec, kubelet_namespaces, CriHarness, BUSYBOX};
use k8s_cri::v1::*;

/// Time allowed for a container to reach a state (a VM boots under
/// QEMU-TCG with capsid).
const LONG: Duration = Duration::from_secs(90);
/// What the web server of the pod serves, written by itself into the
/// shared emptyDir.
const PAGE: &str = "hello from web-pod";
/// The server container's memory limit (what kubelet passes from
/// `resources.limits.memory`).
const SERVER_MEMORY: i64 = 64 << 20;

/// Prints the time of each step (`--nocapture` shows them).
struct Steps {
    handler: String,
    start: Instant,
    last: Instant,
}

impl Steps {
    fn new(handler: &str) -> Self {
        let now = Instant::now();
        Self {
            handler: handler.into(),
            start: now,
            last: now,
        }
    }

    fn done(&mut self, step: &str) {
        let now = Instant::now();
        println!(
            "[{}] {step:<38} {:>6} ms (total {:>6} ms)",
            self.handler,
            (now - self.last).as_millis(),
            (now - self.start).as_millis()
        );
        self.last = now;
    }
}

/// A container of the pod, configured as kubelet does: log path
/// `NAME/ATTEMPT.log` under the pod's log directory (kubelet creates the
/// container's log directory), kubelet's namespaces (a PID namespace of
/// its own), the emptyDir `www` at /www.
fn container(
    log_directory: &Path,
    www: &Path,
    name: &str,
    attempt: u32,
    script: &str,
    resources: Option<LinuxContainerResources>,
) -> ContainerConfig {
    std::fs::create_dir_all(log_directory.join(name)).unwrap();
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt,
        }),
        image: Some(image_spec(BUSYBOX)),
        command: vec!["sh".into(), "-c".into(), script.into()],
        mounts: vec![Mount {
            container_path: "/www".into(),
            host_path: www.display().to_string(),
            ..Default::default()
        }],
        labels: HashMap::from([("io.kubernetes.container.name".into(), name.into())]),
        log_path: format!("{name}/{attempt}.log"),
        linux: Some(LinuxContainerConfig {
            resources,
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(kubelet_namespaces()),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// Checks a container's CPU and memory figures: present, stamped, and
/// plausible for a small busybox process.
fn check_container_stats(stats: &ContainerStats, id: &str, memory_limit: Option<i64>) {
    let attributes = stats.attributes.as_ref().expect("stats attributes");
    assert_eq!(attributes.id, id, "{stats:?}");
    let cpu = stats.cpu.as_ref().expect("cpu stats");
    assert!(cpu.timestamp > 0, "{stats:?}");
    let used = cpu.usage_core_nano_seconds.as_ref().map_or(0, |v| v.value);
    assert!(used > 0, "no CPU time used: {stats:?}");
    let memory = stats.memory.as_ref().expect("memory stats");
    assert!(memory.timestamp > 0, "{stats:?}");
    let working_set = memory.working_set_bytes.as_ref().map_or(0, |v| v.value);
    assert!(working_set > 0, "no working set: {stats:?}");
    if let Some(limit) = memory_limit {
        assert!(working_set <= limit as u64, "over its limit: {stats:?}");
    }
}

/// One pod with a web server and a client sidecar sharing its network
/// namespace and an emptyDir, run through the CRI with runtime handler
/// `handler`, the way kubelet runs it: sandbox with a CNI network,
/// resources and a cgroup parent; containers with logs, exec and stats;
/// a container's memory limit raised and lowered while it runs
/// (UpdateContainerResources); a log rotated (ReopenContainerLog); a
/// crashing container replaced by a new attempt; then teardown, after
/// which nothing of the pod may be left.
fn two_container_pod(handler: &str) {
    let mut steps = Steps::new(handler);
    let h = CriHarness::start();
    let cri = h.cri();
    let version = cri
        .version(VersionRequest {
            version: "v1".into(),
        })
        .unwrap();
    steps.done(&format!("containerd {} up", version.runtime_version));

    let metadata = PodSandboxMetadata {
        name: format!("web-{handler}"),
        uid: format!("uid-{handler}-{}", std::process::id()),
        namespace: "default".into(),
        attempt: 0,
    };
    let log_directory = h.log_directory(&metadata);
    let www = h.empty_dir(&metadata, "www");
    let sandbox = PodSandboxConfig {
        metadata: Some(metadata),
        hostname: "web-pod".into(),
        log_directory: log_directory.display().to_string(),
        labels: HashMap::from([("app".into(), "web".into())]),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: h.cgroup_parent().into(),
            security_context: Some(LinuxSandboxSecurityContext {
                // kubelet's defaults: the pod shares network and IPC, each
                // container has its own PID namespace.
                namespace_options: Some(kubelet_namespaces()),
                ..Default::default()
            }),
            // The sum of the containers' limits, as kubelet passes it.
            resources: Some(LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 100_000,
                cpu_shares: 1024,
                memory_limit_in_bytes: 256 << 20,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };

    // The sandbox, on the CNI network.
    let pod = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox.clone()),
            runtime_handler: handler.into(),
        })
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", h.log_tail()))
        .pod_sandbox_id;
    steps.done("RunPodSandbox");
    let status = cri
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .unwrap()
        .status
        .expect("sandbox status");
    assert_eq!(
        status.state,
        PodSandboxState::SandboxReady as i32,
        "{status:?}"
    );
    let ip = status
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    assert!(
        h.in_pod_subnet(&ip),
        "no pod IP in {}: {status:?}",
        h.pod_subnet()
    );
    assert_eq!(status.runtime_handler, handler, "{status:?}");

    // The server writes its page into the emptyDir and serves it on the
    // pod's loopback only; the sidecar fetches it through the pod's shared
    // network namespace, logs it and leaves a note in the emptyDir.
    let server = h.create_and_start(
        &pod,
        &sandbox,
        container(
            &log_directory,
            &www,
            "server",
            0,
            "echo \"hello from $(hostname)\" > /www/index.html && \
             exec httpd -f -v -p 127.0.0.1:8080 -h /www",
            Some(LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 50_000,
                cpu_shares: 512,
                memory_limit_in_bytes: SERVER_MEMORY,
                ..Default::default()
            }),
        ),
    );
    let client = h.create_and_start(
        &pod,
        &sandbox,
        container(
            &log_directory,
            &www,
            "client",
            0,
            "until page=$(wget -q -O - http://localhost:8080/index.html); do sleep 0.2; done; \
             echo \"client got: $page\"; echo \"$page\" > /www/fetched; exec sleep 3600",
            None,
        ),
    );
    h.wait_container_state(&server, ContainerState::ContainerRunning, LONG);
    h.wait_container_state(&client, ContainerState::ContainerRunning, LONG);
    steps.done("server and client running");
    let client_log = log_directory.join("client/0.log");
    let lines = h.wait_log_line(&client_log, &format!("client got: {PAGE}"), LONG);
    assert_eq!(lines.len(), 1, "{lines:?}");
    steps.done("client fetched the page (CRI log)");
    assert_eq!(
        std::fs::read_to_string(www.join("index.html")).unwrap(),
        format!("{PAGE}\n")
    );
    // The shell creates the file, then writes it: wait for the whole note.
    let start = Instant::now();
    let note = || std::fs::read_to_string(www.join("fetched")).unwrap_or_default();
    while note() != format!("{PAGE}\n") {
        assert!(
            start.elapsed() < LONG,
            "the client's note never reached the emptyDir: {:?}",
            note()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // ExecSync: output, exit code, the pod's network and limits.
    assert_eq!(
        h.exec(&server, &["sh", "-c", "echo hi; echo oops >&2; exit 3"]),
        (3, "hi\n".into(), "oops\n".into())
    );
    let (code, out, err) = h.exec(
        &client,
        &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"],
    );
    assert_eq!(
        (code, out.as_str()),
        (0, format!("{PAGE}\n").as_str()),
        "{err}"
    );
    let (code, out, err) = h.exec(&client, &["ip", "-4", "-o", "addr", "show", "eth0"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(" {ip}/")),
        "pod IP {ip} not on eth0: {out}"
    );
    assert_eq!(h.memory_limit_inside(&server), SERVER_MEMORY.to_string());
    steps.done("ExecSync ×4");

    // Stats of the running containers and of the pod.
    let stats = cri
        .container_stats(ContainerStatsRequest {
            container_id: server.clone(),
        })
        .unwrap_or_else(|e| panic!("ContainerStats: {e}\n{}", h.log_tail()))
        .stats
        .expect("server stats");
    check_container_stats(&stats, &server, Some(SERVER_MEMORY));
    let listed = cri
        .list_container_stats(ListContainerStatsRequest {
            filter: Some(ContainerStatsFilter {
                pod_sandbox_id: pod.clone(),
                ..Default::default()
            }),
        })
        .unwrap_or_else(|e| panic!("ListContainerStats: {e}\n{}", h.log_tail()))
        .stats;
    let mut ids: Vec<&str> = listed
        .iter()
        .map(|s| s.attributes.as_ref().map_or("", |a| a.id.as_str()))
        .collect();
    ids.sort_unstable();
    let mut want = vec![server.as_str(), client.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want, "{listed:?}");
    for s in &listed {
        let id = s.attributes.as_ref().unwrap().id.clone();
        check_container_stats(s, &id, None);
    }
    let pod_stats = cri
        .pod_sandbox_stats(PodSandboxStatsRequest {
            pod_sandbox_id: pod.clone(),
        })
        .unwrap_or_else(|e| panic!("PodSandboxStats: {e}\n{}", h.log_tail()))
        .stats
        .expect("pod stats");
    assert_eq!(
        pod_stats.attributes.as_ref().map(|a| a.id.as_str()),
        Some(pod.as_str())
    );
    let linux = pod_stats.linux.as_ref().expect("linux pod stats");
    let pod_cpu = linux
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .map_or(0, |v| v.value);
    let pod_memory = linux
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref())
        .map_or(0, |v| v.value);
    assert!(pod_cpu > 0 && pod_memory > 0, "{pod_stats:?}");
    assert_eq!(linux.containers.len(), 2, "{pod_stats:?}");
    steps.done("ContainerStats, ListContainerStats, PodSandboxStats");

    // UpdateContainerResources: the server's memory limit raised, then
    // lowered below where it started, within the pod's size; the
    // container's cgroup has each at once, and the server keeps serving.
    for limit in [SERVER_MEMORY * 2, SERVER_MEMORY * 3 / 4] {
        cri.update_container_resources(UpdateContainerResourcesRequest {
            container_id: server.clone(),
            linux: Some(LinuxContainerResources {
                memory_limit_in_bytes: limit,
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("UpdateContainerResources to {limit}: {e}\n{}", h.log_tail()));
        assert_eq!(h.memory_limit_inside(&server), limit.to_string());
    }
    assert_eq!(
        h.exec(
            &client,
            &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"]
        ),
        (0, format!("{PAGE}\n"), String::new())
    );
    steps.done("UpdateContainerResources ×2");

    // ReopenContainerLog, as kubelet rotates a log: the file is moved
    // aside, the runtime reopens the log path, and what the container
    // writes next lands in a new file there. The logger prints what is
    // written into its FIFO (by ExecSync, whose own output is not logged).
    let logger = h.create_and_start(
        &pod,
        &sandbox,
        container(
            &log_directory,
            &www,
            "logger",
            0,
            "mkfifo /tmp/say && while :; do cat /tmp/say; done",
            None,
        ),
    );
    h.wait_container_state(&logger, ContainerState::ContainerRunning, LONG);
    // Its PID namespace is its own (kubelet's default): its init is pid 1.
    let (code, out, err) = h.exec(&logger, &["cat", "/proc/1/cmdline"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("sh\0-c\0mkfifo"), "pid 1 is {out:?}");
    let say = |text: &str| {
        let (code, out, err) = h.exec(&logger, &["sh", "-c", &format!("echo {text} > /tmp/say")]);
        assert_eq!(code, 0, "{out}{err}");
    };
    let log = log_directory.join("logger/0.log");
    say("before rotation");
    h.wait_log_line(&log, "before rotation", LONG);
    let rotated = log_directory.join("logger/0.log.20240101-000000");
    std::fs::rename(&log, &rotated).unwrap();
    cri.reopen_container_log(ReopenContainerLogRequest {
        container_id: logger.clone(),
    })
    .unwrap_or_else(|e| panic!("ReopenContainerLog: {e}\n{}", h.log_tail()));
    assert!(
        log.exists(),
        "ReopenContainerLog made no new {}",
        log.display()
    );
    say("after rotation");
    let lines = h.wait_log_line(&log, "after rotation", LONG);
    assert_eq!(
        lines,
        [("stdout".to_string(), "after rotation".to_string())]
    );
    assert_eq!(
        cri_log(&rotated),
        [("stdout".to_string(), "before rotation".to_string())]
    );
    steps.done("ReopenContainerLog");

    // A container that crashes: seen exited with its code, removed, and
    // replaced by the next attempt, which works in the same pod.
    let crasher = h.create_and_start(
        &pod,
        &sandbox,
        container(
            &log_directory,
            &www,
            "crasher",
            0,
            "echo going down; exit 1",
            None,
        ),
    );
    let exited = h.wait_container_state(&crasher, ContainerState::ContainerExited, LONG);
    assert_eq!(exited.exit_code, 1, "{exited:?}");
    assert_eq!(exited.reason, "Error", "{exited:?}");
    // (containerd stamps started_at after the start returns: a quick
    // crash may finish "before" it started.)
    assert!(exited.finished_at >= exited.created_at, "{exited:?}");
    h.wait_log_line(&log_directory.join("crasher/0.log"), "going down", LONG);
    cri.remove_container(RemoveContainerRequest {
        container_id: crasher.clone(),
    })
    .unwrap_or_else(|e| panic!("RemoveContainer: {e}\n{}", h.log_tail()));
    let gone = cri.container_status(ContainerStatusRequest {
        container_id: crasher.clone(),
        verbose: false,
    });
    assert_eq!(
        gone.map_err(|e| e.code()).err(),
        Some(tonic::Code::NotFound)
    );
    let replacement = h.create_and_start(
        &pod,
        &sandbox,
        container(
            &log_directory,
            &www,
            "crasher",
            1,
            "wget -q -O - http://localhost:8080/index.html && exec sleep 3600",
            None,
        ),
    );
    h.wait_container_state(&replacement, ContainerState::ContainerRunning, LONG);
    h.wait_log_line(&log_directory.join("crasher/1.log"), PAGE, LONG);
    assert_eq!(
        h.exec(&replacement, &["cat", "/www/fetched"]),
        (0, format!("{PAGE}\n"), String::new())
    );
    steps.done("crash seen, replacement running");

    // Teardown: StopPodSandbox stops every container, RemovePodSandbox
    // removes them with the sandbox.
    assert!(!h.pod_processes().is_empty(), "no process of the pod found");
    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", h.log_tail()));
    steps.done("StopPodSandbox");
    let status = cri
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .unwrap()
        .status
        .expect("sandbox status");
    assert_eq!(
        status.state,
        PodSandboxState::SandboxNotready as i32,
        "{status:?}"
    );
    for id in [&server, &client, &replacement, &logger] {
        h.wait_container_state(id, ContainerState::ContainerExited, LONG);
    }
    cri.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", h.log_tail()));
    steps.done("RemovePodSandbox");
    let listed = cri
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .unwrap()
        .items;
    assert!(listed.is_empty(), "{listed:?}");
    h.assert_clean();
    steps.done("nothing left");
}

#[test]
fn two_container_pod_runc() {
    two_container_pod("runc");
}

#[test]
fn two_container_pod_capsid() {
    two_container_pod("capsid");
}
