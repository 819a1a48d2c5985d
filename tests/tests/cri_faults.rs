//! Pods through Kubernetes' CRI when things go wrong, and many in a row: a
//! private containerd with its CRI plugin (capsid_tests::cri), driven by
//! CRI calls only, as in cri_pods.rs.
//!
//! * sizes capsid must refuse — a pod above the host's `[vm.policy]`, a
//!   container or an update beyond its pod's VM — with a clear error,
//!   nothing left of the refused request and the pod unharmed;
//! * a pod whose VM is killed: its containers exit with 255, the pod is
//!   not ready, and kubelet's teardown leaves nothing;
//! * ten pods made, used and removed one after the other (with runc too,
//!   as the reference), nothing left after them.

use std::time::{Duration, Instant};

use capsid_tests::cri::{busybox_container, descendants, CriHarness, HostProcess, CAPSID, RUNC};
use capsid_tests::run;
use k8s_cri::v1::*;

/// Time allowed for a container to reach a state (a VM boots under
/// QEMU-TCG with capsid).
const LONG: Duration = Duration::from_secs(90);
/// How long the containers of a pod whose VM was killed may take to be
/// seen exited.
const VM_DEATH: Duration = Duration::from_secs(60);
/// The pods' size (kubelet's sum of their containers' limits): a VM of
/// 256 + 64 MiB, 256 MiB of which containers may be given.
const POD_MEMORY: i64 = 256 << 20;
/// The memory limit of the pods' first container.
const MAIN_MEMORY: i64 = 64 << 20;
/// A container memory limit no pod's VM of the test config can hold: above
/// `[pod] max_memory_mib` (what a pod's VM may grow to), below
/// `[vm.policy] max_memory_mib`.
const TOO_BIG: i64 = 4 << 30;
/// The exit status of a process whose VM died under it.
const VM_FAULT_STATUS: i32 = 255;

/// A pod's resources as kubelet passes them: one CPU, `memory` bytes.
fn pod_resources(memory: i64) -> Option<LinuxContainerResources> {
    Some(LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 100_000,
        cpu_shares: 1024,
        memory_limit_in_bytes: memory,
        ..Default::default()
    })
}

/// Everything of the harness's pods on the host and in the CRI, one line
/// each, sorted: what [`CriHarness::leftovers`] sees (sandboxes and
/// containers, network namespaces, mounts, processes, capsid's state),
/// the entries of the pods' VM shares, and every process of the pods
/// with its descendants (by pid and start time).
fn footprint(h: &CriHarness) -> Vec<String> {
    let mut all = h.leftovers();
    all.extend(h.share_entries());
    all.extend(
        h.pod_process_tree()
            .iter()
            .map(|p| format!("process {} (started {}): {}", p.pid, p.start, p.name)),
    );
    all.sort();
    all.dedup();
    all
}

/// Waits until the harness's footprint is `before` again (a refused
/// request's shim and mounts may take a moment to go).
fn assert_footprint(h: &CriHarness, before: &[String], after: &str) {
    let start = Instant::now();
    loop {
        let now = footprint(h);
        if now == before {
            return;
        }
        if start.elapsed() > Duration::from_secs(15) {
            let added: Vec<&String> = now.iter().filter(|l| !before.contains(l)).collect();
            let gone: Vec<&String> = before.iter().filter(|l| !now.contains(l)).collect();
            panic!(
                "after {after}, left behind: {added:#?}\ngone: {gone:#?}\n{}",
                h.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The pod is ready and its container `id` runs and answers ExecSync.
fn assert_unharmed(h: &CriHarness, pod: &str, id: &str) {
    let status = h.pod_status(pod);
    assert_eq!(
        status.state,
        PodSandboxState::SandboxReady as i32,
        "{status:?}"
    );
    h.wait_container_state(id, ContainerState::ContainerRunning, Duration::ZERO);
    assert_eq!(
        h.exec(id, &["sh", "-c", "echo alive"]),
        (0, "alive\n".into(), String::new())
    );
}

/// Sizes capsid refuses, next to a running pod: a pod above the host's
/// `[vm.policy] max_memory_mib` (RunPodSandbox), a container whose memory
/// limit does not fit in its pod's VM, however far it may grow
/// (StartContainer, where its task is created), and an update beyond it
/// (UpdateContainerResources). Each
/// fails with an error naming the limit, leaves nothing behind, and the
/// running pod's container is untouched.
///
/// capsid only: with runc a pod has no VM whose size a container or an
/// update could exceed, and no host policy bounds a pod's size, so the
/// same requests succeed and there is no reference run.
#[test]
fn bad_sizes_are_refused_capsid() {
    let h = CriHarness::start();
    let sandbox = h.pod_config("sized", pod_resources(POD_MEMORY));
    let pod = h.run_pod(&sandbox, CAPSID);
    let main = h.create_and_start(
        &pod,
        &sandbox,
        busybox_container(&sandbox, "main", "exec sleep 3600", MAIN_MEMORY),
    );
    h.wait_container_state(&main, ContainerState::ContainerRunning, LONG);
    assert_unharmed(&h, &pod, &main);
    let before = footprint(&h);
    assert!(
        before.iter().any(|l| l.contains("qemu-system")),
        "the pod's VM is not among its processes: {before:#?}"
    );

    // a. A pod of 16 GiB: above the test config's max_memory_mib (the
    // default, 8192 MiB).
    let greedy = h.pod_config("greedy", pod_resources(16 << 30));
    let e = h
        .cri()
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(greedy),
            runtime_handler: CAPSID.into(),
        })
        .expect_err("a pod above the host's max_memory_mib was run");
    println!("RunPodSandbox of 16 GiB: {:?}: {}", e.code(), e.message());
    assert!(
        e.message().contains("16448 MiB")
            && e.message().contains("[vm.policy] max_memory_mib = 8192"),
        "{e:?}"
    );
    assert_footprint(&h, &before, "the refused pod");
    assert_unharmed(&h, &pod, &main);

    // b. A container of 4 GiB in the pod's VM of 320 MiB: more than the
    // VM has, and more than it may grow to (the test config's [pod]
    // max_memory_mib, the default, 1024 MiB), though under the policy's
    // largest VM.
    let big = busybox_container(&sandbox, "big", "exec sleep 3600", TOO_BIG);
    let refused = match h.cri().create_container(CreateContainerRequest {
        pod_sandbox_id: pod.clone(),
        config: Some(big),
        sandbox_config: Some(sandbox.clone()),
    }) {
        Err(e) => e,
        Ok(created) => {
            let id = created.container_id;
            let e = h
                .cri()
                .start_container(StartContainerRequest {
                    container_id: id.clone(),
                })
                .expect_err("a container larger than its pod's VM was started");
            let status = h
                .cri()
                .container_status(ContainerStatusRequest {
                    container_id: id.clone(),
                    verbose: false,
                })
                .unwrap()
                .status
                .unwrap();
            assert_ne!(
                status.state,
                ContainerState::ContainerRunning as i32,
                "{status:?}"
            );
            // kubelet removes the container that failed to start.
            h.cri()
                .remove_container(RemoveContainerRequest { container_id: id })
                .unwrap_or_else(|e| panic!("RemoveContainer: {e}\n{}", h.log_tail()));
            e
        }
    };
    println!(
        "a container of 4 GiB: {:?}: {}",
        refused.code(),
        refused.message()
    );
    assert!(
        refused
            .message()
            .contains("a memory limit of 4096 MiB does not fit in the"),
        "{refused:?}"
    );
    assert_footprint(&h, &before, "the refused container");
    assert_unharmed(&h, &pod, &main);

    // c. An update of the running container to 4 GiB.
    let update = |limit: i64| {
        h.cri()
            .update_container_resources(UpdateContainerResourcesRequest {
                container_id: main.clone(),
                linux: Some(LinuxContainerResources {
                    memory_limit_in_bytes: limit,
                    ..Default::default()
                }),
                ..Default::default()
            })
    };
    let e = update(TOO_BIG).expect_err("an update beyond the pod's VM was made");
    println!("an update to 4 GiB: {:?}: {}", e.code(), e.message());
    assert!(
        e.message()
            .contains("a memory limit of 4096 MiB does not fit in the"),
        "{e:?}"
    );
    assert_eq!(h.memory_limit_inside(&main), MAIN_MEMORY.to_string());
    assert_footprint(&h, &before, "the refused update");
    assert_unharmed(&h, &pod, &main);
    // The container still takes an update that fits.
    update(POD_MEMORY).unwrap_or_else(|e| panic!("an update that fits: {e}\n{}", h.log_tail()));
    assert_eq!(h.memory_limit_inside(&main), POD_MEMORY.to_string());

    h.stop_and_remove_pod(&pod);
    h.assert_clean();
}

/// The VM's main host process (QEMU) of pod `pod`: the pod's sandbox task's
/// pid (capsid's jailer, or the VMM itself) or its descendant.
fn vm_process(h: &CriHarness, pod: &str) -> HostProcess {
    let task = h
        .task_pid(pod)
        .unwrap_or_else(|| panic!("no task for pod {pod}"));
    let mut tree = vec![task];
    tree.extend(descendants(&[task]));
    tree.into_iter()
        .filter_map(HostProcess::of)
        .find(|p| p.name.starts_with("qemu-system") || p.name == "capsid-vmm")
        .unwrap_or_else(|| panic!("no VMM process under the pod's task {task}"))
}

/// A pod of two containers whose VM is killed (SIGKILL to QEMU, as the
/// OOM killer or an operator would): both containers are seen exited with
/// status 255, the pod is not ready, and StopPodSandbox and
/// RemovePodSandbox leave nothing of it.
///
/// capsid only: with runc there is no VM to kill (killing the pause
/// process leaves the containers running).
#[test]
fn vm_death_capsid() {
    let h = CriHarness::start();
    let sandbox = h.pod_config("doomed", pod_resources(POD_MEMORY));
    let pod = h.run_pod(&sandbox, CAPSID);
    let ids: Vec<String> = ["first", "second"]
        .iter()
        .map(|name| {
            h.create_and_start(
                &pod,
                &sandbox,
                busybox_container(&sandbox, name, "exec sleep 3600", MAIN_MEMORY),
            )
        })
        .collect();
    for id in &ids {
        h.wait_container_state(id, ContainerState::ContainerRunning, LONG);
        assert_eq!(h.exec(id, &["true"]).0, 0);
    }
    let processes = h.pod_process_tree();
    let vm = vm_process(&h, &pod);
    println!("killing the pod's VM: {} {}", vm.pid, vm.name);
    let (code, _, err) = run(std::process::Command::new("kill").args(["-9", &vm.pid.to_string()]));
    assert_eq!(code, 0, "kill -9 {}: {err}", vm.pid);
    let killed = Instant::now();

    for id in &ids {
        let status = h.wait_container_state(id, ContainerState::ContainerExited, VM_DEATH);
        assert_eq!(status.exit_code, VM_FAULT_STATUS, "{status:?}");
        assert_eq!(status.reason, "Error", "{status:?}");
    }
    println!(
        "containers exited {} ms after the kill",
        killed.elapsed().as_millis()
    );
    let start = Instant::now();
    loop {
        let status = h.pod_status(&pod);
        if status.state == PodSandboxState::SandboxNotready as i32 {
            break;
        }
        assert!(
            start.elapsed() < VM_DEATH,
            "the pod is still ready after its VM was killed: {status:?}\n{}",
            h.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    h.stop_and_remove_pod(&pod);
    h.assert_clean();
    let alive: Vec<&HostProcess> = processes.iter().filter(|p| p.alive()).collect();
    assert!(alive.is_empty(), "still alive: {alive:#?}");
}

/// Tap devices in the network namespace file `netns`.
fn taps_in(netns: &std::path::Path) -> Vec<String> {
    let (code, out, err) = run(std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["ip", "-o", "-d", "link"]));
    assert_eq!(code, 0, "ip link in {}: {err}", netns.display());
    links(&out)
        .into_iter()
        .filter(|(_, line)| line.contains(" tun type tap "))
        .map(|(name, _)| name)
        .collect()
}

/// `ip -o link` output as (name, line).
fn links(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| {
            let name = l.split(": ").nth(1)?.split('@').next()?.to_string();
            Some((name, l.to_string()))
        })
        .collect()
}

/// Ten pods of one busybox container each, one after the other: made,
/// checked running (ExecSync), stopped and removed. After them nothing is
/// left: no pod, container, network namespace or mount, none of the
/// processes the pods had (shims; with capsid the jailers, QEMU,
/// capsid-vhost and virtiofsd too), and with capsid no tap and nothing in
/// capsid's state dir. Prints the time each pod took.
fn pods_in_a_row(handler: &str) {
    const PODS: usize = 10;
    let h = CriHarness::start();
    let mut processes: Vec<HostProcess> = Vec::new();
    let mut taps: Vec<String> = Vec::new();
    let mut times = Vec::new();
    for i in 0..PODS {
        let start = Instant::now();
        let sandbox = h.pod_config(&format!("row-{i}"), None);
        let pod = h.run_pod(&sandbox, handler);
        let id = h.create_and_start(
            &pod,
            &sandbox,
            busybox_container(&sandbox, "sleeper", "exec sleep 3600", 0),
        );
        h.wait_container_state(&id, ContainerState::ContainerRunning, LONG);
        assert_eq!(h.exec(&id, &["true"]), (0, String::new(), String::new()));
        let running = start.elapsed();
        processes.extend(h.pod_process_tree());
        if handler == CAPSID {
            for ns in std::fs::read_dir(h.netns_dir()).unwrap().flatten() {
                taps.extend(taps_in(&ns.path()));
            }
        }
        h.stop_and_remove_pod(&pod);
        let took = start.elapsed();
        println!(
            "[{handler}] pod {i}: running after {:>5} ms, removed after {:>5} ms",
            running.as_millis(),
            took.as_millis()
        );
        times.push(took);
    }
    let total: Duration = times.iter().sum();
    println!(
        "[{handler}] {PODS} pods in {} ms: {} ms per pod",
        total.as_millis(),
        total.as_millis() / PODS as u128
    );

    h.assert_clean();
    let alive: Vec<&HostProcess> = processes.iter().filter(|p| p.alive()).collect();
    assert!(alive.is_empty(), "still alive: {alive:#?}");
    let names: Vec<&str> = processes.iter().map(|p| p.name.as_str()).collect();
    let expected: &[&str] = if handler == CAPSID {
        &[
            "containerd-shim",
            "capsid-jail",
            "qemu-system-x86",
            "capsid-vhost",
            "virtiofsd",
        ]
    } else {
        &["containerd-shim", "pause", "sleep"]
    };
    for name in expected {
        assert!(
            names.iter().any(|n| n.starts_with(name)),
            "no {name} among the pods' processes (the check looks in the wrong place): {names:?}"
        );
    }
    if handler == CAPSID {
        assert_eq!(taps.len(), PODS, "one tap per pod: {taps:?}");
        let (code, out, err) =
            run(std::process::Command::new("ip").args(["-n", h.netns().name(), "-o", "link"]));
        assert_eq!(code, 0, "{err}");
        let harness_links = links(&out);
        let (_, host, _) = run(std::process::Command::new("ip").args(["-o", "link"]));
        for tap in &taps {
            assert!(
                !links(&host).iter().any(|(n, _)| n == tap)
                    && !harness_links.iter().any(|(n, _)| n == tap),
                "tap {tap} is left"
            );
        }
        // The CNI bridge and loopback stay; every pod's veth went.
        assert_eq!(harness_links.len(), 2, "{out}");
        let state: Vec<String> = std::fs::read_dir(h.capsid_state_dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        println!("[{handler}] capsid's state dir after the pods: {state:?}");
    }
}

#[test]
fn pods_in_a_row_capsid() {
    pods_in_a_row(CAPSID);
}

#[test]
fn pods_in_a_row_runc() {
    pods_in_a_row(RUNC);
}

/// A pod sharing one PID namespace (`shareProcessNamespace`): a container
/// whose init is stopped takes its children with it (they are not PID 1's
/// to reap when the init is not PID 1 of a namespace of its own), as
/// runc's shim kills them, and its exit is reported.
fn shared_pid_namespace(handler: &str) {
    let h = CriHarness::start();
    let mut sandbox = h.pod_config("shared-pid", pod_resources(POD_MEMORY));
    let shared = NamespaceOption {
        pid: NamespaceMode::Pod as i32,
        ..capsid_tests::cri::kubelet_namespaces()
    };
    let set_shared = |c: &mut Option<LinuxContainerSecurityContext>| {
        if let Some(sc) = c.as_mut() {
            sc.namespace_options = Some(shared.clone());
        }
    };
    if let Some(linux) = sandbox.linux.as_mut() {
        if let Some(sc) = linux.security_context.as_mut() {
            sc.namespace_options = Some(shared.clone());
        }
    }
    let pod = h.run_pod(&sandbox, handler);
    let mut ids = Vec::new();
    for (name, script) in [
        ("parent", "sleep 3601 & wait"),
        ("watcher", "exec sleep 3600"),
    ] {
        let mut c = busybox_container(&sandbox, name, script, MAIN_MEMORY);
        if let Some(linux) = c.linux.as_mut() {
            set_shared(&mut linux.security_context);
        }
        ids.push(h.create_and_start(&pod, &sandbox, c));
    }
    let (parent, watcher) = (&ids[0], &ids[1]);
    h.wait_container_state(parent, ContainerState::ContainerRunning, LONG);
    h.wait_container_state(watcher, ContainerState::ContainerRunning, LONG);
    let ps = |id: &str| h.exec(id, &["ps", "-o", "args"]).1;
    assert!(ps(watcher).contains("sleep 3601"), "{}", ps(watcher));

    h.cri()
        .stop_container(StopContainerRequest {
            container_id: parent.clone(),
            timeout: 0,
        })
        .unwrap_or_else(|e| panic!("StopContainer: {e}\n{}", h.log_tail()));
    let status = h.wait_container_state(parent, ContainerState::ContainerExited, LONG);
    assert_eq!(status.exit_code, 137, "{status:?}");
    let left = ps(watcher);
    assert!(
        !left.contains("sleep 3601"),
        "the init's child outlived it:\n{left}"
    );
    assert!(left.contains("sleep 3600"), "{left}");

    h.stop_and_remove_pod(&pod);
    h.assert_clean();
}

#[test]
fn shared_pid_namespace_runc() {
    shared_pid_namespace(RUNC);
}

#[test]
fn shared_pid_namespace_capsid() {
    shared_pid_namespace(CAPSID);
}
