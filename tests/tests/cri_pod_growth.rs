//! A pod's VM grows as containers are added, through Kubernetes' CRI (a
//! private containerd with its CRI plugin, capsid_tests::cri, driven by
//! CRI calls only, as in cri_pods.rs).
//!
//! The pod's VM is given `[pod] max_memory_mib` (1024 MiB by default) and
//! boots with only the pod's size in whole 128 MiB blocks (`mem=`, memory
//! hotplug), the balloon holding the rest of those blocks. Containers
//! whose memory limits sum past the pod's size, and an
//! UpdateContainerResources that raises a limit, have the guest add blocks
//! and deflate the balloon: the guest's MemTotal and available memory,
//! read with ExecSync `cat /proc/meminfo`, grow by as much. A container whose
//! limit would take the pod past its maximum is refused with an error
//! naming `[pod] max_memory_mib`, and the pod's other containers keep
//! running. The test also prints what the idle pod's VM holds on the host,
//! booted at the maximum and (with `max_memory_mib = 0`) at its size.
//!
//! capsid only: with runc a pod has no VM, its containers share the host's
//! memory and nothing grows or has a maximum, so there is no reference run.

use std::time::{Duration, Instant};

use capsid_sandbox::balloon::host;
use capsid_tests::cri::{busybox_container, descendants, CriHarness, HostProcess, CAPSID};
use k8s_cri::v1::*;

/// Time allowed for a container to reach a state (a VM boots under
/// QEMU-TCG with capsid).
const LONG: Duration = Duration::from_secs(90);
/// Time allowed for the balloon to reach its target.
const BALLOON: Duration = Duration::from_secs(90);
/// How long an idle pod sits before its host memory is measured.
const SETTLE: Duration = Duration::from_secs(15);
/// The pod's size as kubelet passes it: 128 MiB, a VM of 192 usable.
const POD_MEMORY: i64 = 128 << 20;
const MIB: i64 = 1 << 20;

fn pod_resources(memory: i64) -> Option<LinuxContainerResources> {
    Some(LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 100_000,
        cpu_shares: 1024,
        memory_limit_in_bytes: memory,
        ..Default::default()
    })
}

/// The guest's MemTotal and MemAvailable, MiB, as container `id` reads them.
fn meminfo(h: &CriHarness, id: &str) -> (u64, u64) {
    let (code, out, err) = h.exec(id, &["cat", "/proc/meminfo"]);
    assert_eq!(code, 0, "cat /proc/meminfo: {out}{err}");
    let field = |name: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in {out}"))
            / 1024
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// Waits until the guest's MemAvailable satisfies `ok`; the last reading.
fn wait_available(h: &CriHarness, id: &str, what: &str, ok: impl Fn(u64) -> bool) -> (u64, u64) {
    let deadline = Instant::now() + BALLOON;
    loop {
        let (total, available) = meminfo(h, id);
        if ok(available) {
            return (total, available);
        }
        assert!(
            Instant::now() < deadline,
            "{what}: MemAvailable {available} MiB (MemTotal {total}) after {BALLOON:?}\n{}",
            h.log_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Host memory the pod's VM process holds (its footprint and its guest RAM
/// resident on the host), MiB.
fn vm_host_memory(h: &CriHarness, pod: &str) -> (u64, u64) {
    let task = h.task_pid(pod).expect("the pod's VM pid");
    let mut pids = descendants(&[task]);
    pids.push(task);
    let pid = pids
        .into_iter()
        .filter_map(HostProcess::of)
        .find(|p| p.name.starts_with("qemu"))
        .map(|p| p.pid)
        .expect("the pod's QEMU");
    (
        host::vm_footprint_mib(pid).unwrap_or(0),
        host::guest_resident_mib(pid).unwrap_or(0),
    )
}

fn update(h: &CriHarness, id: &str, limit: i64) -> Result<(), tonic::Status> {
    h.cri()
        .update_container_resources(UpdateContainerResourcesRequest {
            container_id: id.into(),
            linux: Some(LinuxContainerResources {
                memory_limit_in_bytes: limit,
                ..Default::default()
            }),
            ..Default::default()
        })
        .map(|_| ())
}

/// Creates and starts `config`, expecting a refusal (at CreateContainer or
/// at StartContainer, where its task is created); the container that
/// failed to start is removed, as kubelet does.
fn refused(
    h: &CriHarness,
    pod: &str,
    sandbox: &PodSandboxConfig,
    config: ContainerConfig,
) -> tonic::Status {
    match h.cri().create_container(CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(config),
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
                .expect_err("a container past its pod's maximum was started");
            h.cri()
                .remove_container(RemoveContainerRequest { container_id: id })
                .unwrap_or_else(|e| panic!("RemoveContainer: {e}\n{}", h.log_tail()));
            e
        }
    }
}

#[test]
fn a_pod_grows_as_containers_are_added_capsid() {
    let h = CriHarness::start();
    let sandbox = h.pod_config("growing", pod_resources(POD_MEMORY));
    let pod = h.run_pod(&sandbox, CAPSID);
    let a = h.create_and_start(
        &pod,
        &sandbox,
        busybox_container(&sandbox, "a", "exec sleep 3600", 64 * MIB),
    );
    h.wait_container_state(&a, ContainerState::ContainerRunning, LONG);

    // The balloon holds the reserve: the guest has about the pod's 192 MiB.
    let (total, small) = wait_available(&h, &a, "the reserve inflated", |av| av < 192);
    println!("pod of 192 MiB in a VM of 1024: MemTotal {total} MiB, MemAvailable {small} MiB");
    // It booted with two blocks, not the whole 1024 MiB.
    assert!(
        total <= 256,
        "the guest booted with {total} MiB, more than the pod's two blocks"
    );
    std::thread::sleep(SETTLE);
    let (footprint_max, resident_max) = vm_host_memory(&h, &pod);
    println!("idle pod that may grow to 1024: VMM holds {footprint_max} MiB, guest RAM resident {resident_max} MiB");
    let (_, small) = meminfo(&h, &a);

    // b. 64 + 256 MiB of limits and 64 for the guest: the VM grows to 384.
    let b = h.create_and_start(
        &pod,
        &sandbox,
        busybox_container(&sandbox, "b", "exec sleep 3600", 256 * MIB),
    );
    h.wait_container_state(&b, ContainerState::ContainerRunning, LONG);
    assert_eq!(h.memory_limit_inside(&b), (256 * MIB).to_string());
    let (total, grown) = wait_available(&h, &a, "grown by 192 MiB", |av| av >= small + 160);
    assert!(
        (256..=384).contains(&total),
        "the guest has {total} MiB after growing to 384"
    );
    println!("after b (256 MiB): MemAvailable {small} -> {grown} MiB (VM 192 -> 384 MiB)");
    assert!(
        grown <= small + 230,
        "grew by more than asked: {small} -> {grown}"
    );

    // An update of a to 512 MiB: 768 MiB of limits, a VM of 832.
    update(&h, &a, 512 * MIB)
        .unwrap_or_else(|e| panic!("update a to 512 MiB: {e}\n{}", h.log_tail()));
    assert_eq!(h.memory_limit_inside(&a), (512 * MIB).to_string());
    let (total, updated) = wait_available(&h, &b, "grown by 448 MiB", |av| av >= grown + 400);
    assert!(
        (768..=896).contains(&total),
        "the guest has {total} MiB after growing to 832"
    );
    println!(
        "after a's update to 512 MiB: MemAvailable {grown} -> {updated} MiB (VM 384 -> 832 MiB)"
    );
    assert!(
        updated <= grown + 490,
        "grew by more than asked: {grown} -> {updated}"
    );

    // c. 2 GiB more: 2816 MiB of limits, past the pod's 1024. Refused,
    // nothing grows, a and b keep running.
    let e = refused(
        &h,
        &pod,
        &sandbox,
        busybox_container(&sandbox, "c", "exec sleep 3600", 2048 * MIB),
    );
    println!("a container of 2048 MiB: {:?}: {}", e.code(), e.message());
    assert!(
        e.message()
            .contains("a memory limit of 2048 MiB does not fit in the pod's VM")
            && e.message().contains("[pod] max_memory_mib = 1024"),
        "{e:?}"
    );
    let e = update(&h, &b, 4096 * MIB).expect_err("an update past the pod's maximum was made");
    println!(
        "an update of b to 4096 MiB: {:?}: {}",
        e.code(),
        e.message()
    );
    assert!(e.message().contains("[pod] max_memory_mib = 1024"), "{e:?}");
    assert_eq!(h.memory_limit_inside(&b), (256 * MIB).to_string());
    for id in [&a, &b] {
        h.wait_container_state(id, ContainerState::ContainerRunning, LONG);
    }
    let (_, after) = meminfo(&h, &b);
    assert!(
        after <= updated + 32,
        "the refused requests grew the pod: {updated} -> {after}"
    );
    h.stop_and_remove_pod(&pod);
    h.assert_clean();

    // The same idle pod in a VM of its own size, for the host's cost of
    // booting at the maximum.
    let config = h.dir().join("capsid").join("capsid.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[pod]\nmax_memory_mib = 0\n");
    std::fs::write(&config, text).unwrap();
    let sandbox = h.pod_config("fixed", pod_resources(POD_MEMORY));
    let pod = h.run_pod(&sandbox, CAPSID);
    let a = h.create_and_start(
        &pod,
        &sandbox,
        busybox_container(&sandbox, "a", "exec sleep 3600", 64 * MIB),
    );
    h.wait_container_state(&a, ContainerState::ContainerRunning, LONG);
    let (total, available) = meminfo(&h, &a);
    println!("pod of 192 MiB in a VM of 192: MemTotal {total} MiB, MemAvailable {available} MiB");
    std::thread::sleep(SETTLE);
    let (footprint, resident) = vm_host_memory(&h, &pod);
    println!(
        "idle pod booted at its size: VMM holds {footprint} MiB, guest RAM resident {resident} MiB"
    );
    let e = refused(
        &h,
        &pod,
        &sandbox,
        busybox_container(&sandbox, "b", "exec sleep 3600", 256 * MIB),
    );
    assert!(e.message().contains("pods do not grow"), "{e:?}");
    h.stop_and_remove_pod(&pod);
    h.assert_clean();
}
