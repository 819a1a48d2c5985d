//! What an idle pod costs the host, measured (not asserted): the PSS of
//! every host process of a pod run through the CRI — the pod's shim, its
//! VM's processes (QEMU or capsid-vmm, the device backends, virtiofsd)
//! and their jailers — for a one-container and a three-container pod.
//!
//! Run by `benches/pod-memory.sh` (it is ignored in `make test`: a
//! measurement, not a check). Prints one table per pod.

use std::collections::HashMap;
use std::time::Duration;

use capsid_tests::cri::{busybox_container, CriHarness, CAPSID};
use k8s_cri::v1::*;

/// How long a pod sits idle before it is measured (the guest's boot work
/// and the first page-cache fill are over by then).
const SETTLE: Duration = Duration::from_secs(20);

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Host processes whose command line names `needle`.
fn naming(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| *pid != std::process::id() && cmdline(*pid).contains(needle))
        .collect()
}

/// Allocated KiB of the distinct memfds the processes hold (QEMU's guest
/// RAM, which the device backends map too).
fn memfd_kib(pids: &[u32]) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut kib = 0;
    for pid in pids {
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let memfd = std::fs::read_link(fd.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:"));
            if let (true, Ok(meta)) = (memfd, std::fs::metadata(fd.path())) {
                if seen.insert((meta.dev(), meta.ino())) {
                    kib += meta.blocks() / 2;
                }
            }
        }
    }
    kib
}

/// The PSS of the pod's host processes, by program, and the guest RAM
/// they hold.
fn measure(h: &CriHarness) -> (u64, u64, Vec<(String, u64)>) {
    let mut pids = naming(&h.dir().display().to_string());
    pids.extend(naming(&h.containerd().socket().display().to_string()));
    pids.sort_unstable();
    pids.dedup();
    pids.retain(|p| *p != h.containerd().pid());
    let guest = memfd_kib(&pids);
    let mut by: HashMap<String, u64> = HashMap::new();
    let mut total = 0;
    for pid in pids {
        let kib = pss_kib(pid);
        let cmd = cmdline(pid);
        let exe = cmd.split_whitespace().next().unwrap_or("?").to_string();
        let mut name = exe.rsplit('/').next().unwrap_or("?").to_string();
        if name == "capsid-vhost" {
            name = format!(
                "capsid-vhost {}",
                cmd.split_whitespace().nth(1).unwrap_or("")
            );
        }
        *by.entry(name).or_default() += kib;
        total += kib;
    }
    let mut list: Vec<(String, u64)> = by.into_iter().collect();
    list.sort();
    (total, guest, list)
}

fn pod(h: &CriHarness, containers: usize) {
    let cri = h.cri();
    let sandbox = h.pod_config(&format!("idle-{containers}"), None);
    let pod = h.run_pod(&sandbox, CAPSID);
    for i in 0..containers {
        let c = busybox_container(&sandbox, &format!("c{i}"), "exec sleep 3600", 0);
        h.create_and_start(&pod, &sandbox, c);
    }
    std::thread::sleep(SETTLE);
    let (total, guest, list) = measure(h);
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "idle pod with {containers} container(s): {:.1} MiB PSS, of which guest RAM {:.1} MiB, host processes {:.1} MiB",
        mib(total),
        mib(guest),
        mib(total.saturating_sub(guest))
    );
    for (name, kib) in list {
        println!("  {name:<28} {:>8.1} MiB", mib(kib));
    }
    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .unwrap();
    cri.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .unwrap();
}

#[test]
#[ignore = "a measurement: run by benches/pod-memory.sh"]
fn idle_pod_memory() {
    let h = CriHarness::start();
    pod(&h, 1);
    pod(&h, 3);
    h.assert_clean();
}
