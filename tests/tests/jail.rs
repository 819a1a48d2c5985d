//! Every VM-side process runs jailed (docs/security.md): on each backend,
//! each process the VM is made of is read from /proc and must show a uid
//! of its own, no capabilities, a seccomp filter, `no_new_privs`, a root
//! and mount/pid namespaces that are not the host's, and the sandbox's
//! cgroup. A forbidden system call in capsid-vmm (a test-only control
//! request) kills it with SIGSYS and the VM reports the failure. Nothing is
//! left once the VM is gone.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use capsid_sandbox::backend::capsid_vmm::CapsidVmmBackend;
use capsid_sandbox::backend::jail::Jailer;
use capsid_sandbox::backend::{Backend, VmExit, VmSpec};
use capsid_sandbox::config::JailConfig;
use capsid_tests::asm::{self, LIB64};
use capsid_tests::bin;

fn field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
        .to_string()
}

fn ns(pid: &str, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .display()
        .to_string()
}

/// Checks one process; `jailed_root`: its root must be the jail's.
fn assert_confined(pid: &str, what: &str, cgroup: &str, jailed_root: bool) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let name = field(&status, "Name");
    let ctx = format!("{what} (pid {pid}, {name})");
    let uids: Vec<u32> = field(&status, "Uid")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(
        uids.iter().all(|u| *u >= 2_000_000_000),
        "{ctx}: Uid {uids:?}"
    );
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(&status, caps), "0000000000000000", "{ctx}: {caps}");
    }
    assert_eq!(field(&status, "NoNewPrivs"), "1", "{ctx}");
    assert_eq!(field(&status, "Seccomp"), "2", "{ctx}");
    assert_ne!(
        ns(pid, "mnt"),
        ns("self", "mnt"),
        "{ctx}: host mount namespace"
    );
    if jailed_root {
        assert_ne!(
            ns(pid, "pid"),
            ns("self", "pid"),
            "{ctx}: host pid namespace"
        );
        let root = std::fs::metadata(format!("/proc/{pid}/root/")).unwrap();
        let host = std::fs::metadata("/").unwrap();
        assert_ne!(
            (root.dev(), root.ino()),
            (host.dev(), host.ino()),
            "{ctx}: host root"
        );
        // Nothing of the host but what it was given.
        assert!(
            !Path::new(&format!("/proc/{pid}/root/etc/passwd")).exists(),
            "{ctx}: sees /etc/passwd"
        );
    }
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in cgroups.lines() {
        let controllers = line.split(':').nth(1).unwrap_or("");
        if [
            "memory",
            "pids",
            "cpu,cpuacct",
            "cpu",
            "cpuacct",
            "blkio",
            "",
        ]
        .iter()
        .any(|c| controllers == *c || controllers.split(',').any(|x| x == *c && !c.is_empty()))
        {
            assert!(
                line.ends_with(&format!("/capsid/{cgroup}")),
                "{ctx}: cgroup {line}"
            );
        }
    }
}

/// The jailer parent (what the backend supervises) and the program under
/// it, both confined.
fn assert_jailed(pid: u32, what: &str, cgroup: &str) {
    let pid = pid.to_string();
    assert_confined(&pid, &format!("{what}'s jailer"), cgroup, false);
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let children: Vec<&str> = children.split_whitespace().collect();
    assert_eq!(children.len(), 1, "{what}: {children:?}");
    assert_confined(children[0], what, cgroup, true);
}

fn jailer() -> Option<Jailer> {
    let j = Jailer::from_config(&bin("capsid-jail"), &JailConfig::default()).unwrap();
    assert!(j.is_some());
    j
}

#[test]
fn capsid_vmm_runs_jailed_and_a_forbidden_syscall_fails_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = asm::elf(
        &format!(
            ".text\n.global _start\n_start:\n{}\n{LIB64}",
            r#" lea rdi, [rip + m]
    call puts
1:  pause
    jmp 1b
m:  .asciz "UP\n""#
        ),
        dir.path(),
        "guest",
    );
    let initramfs = dir.path().join("initramfs");
    std::fs::write(&initramfs, b"070701").unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let run_dir = state.join("jailed-vmm");
    let spec = VmSpec {
        name: "jailed".into(),
        vcpus: 1,
        memory_mib: 64,
        kernel,
        initramfs,
        kernel_args: vec![],
        disks: vec![capsid_sandbox::backend::DiskSpec {
            path: disk,
            readonly: false,
            serial: "d".into(),
        }],
        net: None,
        fs: None,
        guest_cid: 3,
        run_dir: run_dir.clone(),
        cgroup: None,
    };
    // Honoured only with this variable, which the VMM inherits.
    std::env::set_var(capsid_vmm_api::control::TEST_CONTROL_ENV, "1");
    let backend = CapsidVmmBackend::new(&bin("capsid-vmm"))
        .unwrap()
        .with_jailer(jailer());
    let mut vm = backend.start(&spec).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&std::fs::read(vm.serial_log()).unwrap_or_default())
        .contains("UP")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never printed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let pids = vm.pids();
    assert_eq!(pids.len(), 1);
    assert_jailed(pids[0], "capsid-vmm", "jailed-vmm");
    // The run directory is the jail uid's; the disk is not reachable by
    // path in the jail, only as the descriptor it was given.
    let owner = std::fs::metadata(&run_dir).unwrap().uid();
    assert!(owner >= 2_000_000_000, "run dir owned by {owner}");
    let reply = capsid_sandbox::vmm_control::exchange(
        &run_dir.join("vmm-api.sock"),
        &capsid_vmm_api::control::Request::TestForbiddenSyscall,
    );
    // The VMM dies while answering, or before.
    drop(reply);
    let exit = vm.wait_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(exit, Some(VmExit::Failed(128 + 31)), "killed by SIGSYS");
    assert!(!run_dir.exists(), "run dir left");
    drop(vm);
    let left = capsid_tests::cli::jail_cgroups("jailed-vmm");
    assert!(left.is_empty(), "cgroups left: {left:?}");
    assert!(capsid_tests::cli::is_empty_dir(&state.join(".jail/root")));
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_and_its_devices_run_jailed() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = capsid_tests::sandbox::busybox_sandbox(dir.path(), "jailed-qemu").await;
    let pids = sandbox.pids();
    // QEMU, then vsock, console, rng and the disk's capsid-vhost.
    assert_eq!(pids.len(), 5, "{pids:?}");
    let name = std::fs::read_dir(dir.path().join("run"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| !n.starts_with('.'))
        .unwrap();
    for (i, pid) in pids.iter().enumerate() {
        assert_jailed(*pid, &format!("VM process {i}"), &name);
    }
    let uids: std::collections::BTreeSet<String> = pids
        .iter()
        .map(|p| {
            let s = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap();
            field(&s, "Uid")
        })
        .collect();
    assert_eq!(uids.len(), 1, "one uid per sandbox: {uids:?}");
    // The guest works through the jailed devices.
    let out = capsid_tests::sandbox::run_container(
        &sandbox,
        "c1",
        &capsid_tests::sandbox::sh("echo jailed; ls /"),
        b"",
    )
    .await;
    assert_eq!(out.status, 0, "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("jailed"));
    sandbox.stop().await;
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} left"
        );
    }
    let left = capsid_tests::cli::jail_cgroups(&name);
    assert!(left.is_empty(), "cgroups left: {left:?}");
}

#[test]
fn a_kernel_the_jail_cannot_read_is_one_clear_error() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"not read").unwrap();
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o600)).unwrap();
    let initramfs = dir.path().join("initramfs");
    std::fs::write(&initramfs, b"070701").unwrap();
    std::fs::set_permissions(&initramfs, std::fs::Permissions::from_mode(0o644)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let run_dir = state.join("unreadable");
    let spec = VmSpec {
        name: "unreadable".into(),
        vcpus: 1,
        memory_mib: 64,
        kernel: kernel.clone(),
        initramfs,
        kernel_args: vec![],
        disks: vec![],
        net: None,
        fs: None,
        guest_cid: 3,
        run_dir: run_dir.clone(),
        cgroup: None,
    };
    let backend = CapsidVmmBackend::new(&bin("capsid-vmm"))
        .unwrap()
        .with_jailer(jailer());
    let e = backend.start(&spec).unwrap_err().to_string();
    assert!(
        e.contains(&kernel.display().to_string()) && e.contains("not readable by others"),
        "{e}"
    );
    assert!(!run_dir.exists(), "run dir left");
    let left = capsid_tests::cli::jail_cgroups("unreadable");
    assert!(left.is_empty(), "cgroups left: {left:?}");
}

/// Under containerd, the VM's host processes are where runc would put the
/// container's: in the spec's `linux.cgroupsPath` (ctr's `/<namespace>/<id>`),
/// in every hierarchy; the cgroup goes with the task.
#[test]
fn under_containerd_the_vm_is_in_the_containers_cgroup() {
    let h = capsid_tests::shim::ShimHarness::start();
    // The reference: runc puts the container's process there.
    let (code, _, err) = h.ctr(&[
        "run",
        "-d",
        "--runtime",
        "io.containerd.runc.v2",
        capsid_tests::shim::BUSYBOX,
        "cg0",
        "sleep",
        "1000",
    ]);
    assert_eq!(code, 0, "{err}");
    h.wait_status("cg0", "RUNNING", Duration::from_secs(20));
    let (_, tasks, _) = h.ctr(&["task", "ls"]);
    let runc_pid = tasks
        .lines()
        .find_map(|l| {
            l.strip_prefix("cg0")
                .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
        })
        .unwrap();
    let runc_cgroups = std::fs::read_to_string(format!("/proc/{runc_pid}/cgroup")).unwrap();
    assert!(
        runc_cgroups
            .lines()
            .any(|l| l.contains(":memory:") && l.ends_with("/cg0")),
        "{runc_cgroups}"
    );
    h.ctr(&["task", "kill", "-s", "KILL", "cg0"]);
    h.wait_status("cg0", "STOPPED", Duration::from_secs(20));
    h.ctr(&["task", "delete", "cg0"]);
    h.ctr(&["container", "delete", "cg0"]);

    h.run_detached("cg1", &["sleep", "1000"]);
    let pids = h.vm_pids("cg1");
    assert!(!pids.is_empty());
    let mut dirs = std::collections::BTreeSet::new();
    for pid in &pids {
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        for line in cgroups.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) =
                (parts.next(), parts.next().unwrap(), parts.next().unwrap());
            let mount = match controllers {
                "memory" | "pids" => format!("/sys/fs/cgroup/{controllers}"),
                "" => "/sys/fs/cgroup/unified".into(),
                _ => continue,
            };
            assert!(
                path.ends_with("/cg1") && !path.contains("/capsid/"),
                "pid {pid}: {line}"
            );
            dirs.insert(format!("{mount}{path}"));
        }
    }
    assert!(!dirs.is_empty());
    for d in &dirs {
        assert!(Path::new(d).is_dir(), "{d}");
    }
    let (code, _, err) = h.ctr(&["task", "kill", "-s", "KILL", "cg1"]);
    assert_eq!(code, 0, "{err}");
    h.wait_status("cg1", "STOPPED", Duration::from_secs(20));
    let (code, _, err) = h.ctr(&["task", "delete", "cg1"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = h.ctr(&["container", "delete", "cg1"]);
    assert_eq!(code, 0, "{err}");
    h.assert_clean(&["cg1"]);
    for d in &dirs {
        assert!(!Path::new(d).exists(), "cgroup {d} left");
    }
}
