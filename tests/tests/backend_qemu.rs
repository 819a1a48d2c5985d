//! The QEMU microvm backend of the sandbox crate: starts our kernel and
//! agent with capsid's vhost-user devices, and leaves nothing behind;
//! a device process that dies under the VM ends it as a failure.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsid_sandbox::backend::qemu::QemuBackend;
use capsid_sandbox::backend::{Backend, DiskSpec, FsCache, FsSpec, VmExit, VmSpec};
use capsid_sandbox::config::BackendKind;
use capsid_tests::{artifact, bin};

fn backend() -> QemuBackend {
    QemuBackend::new(
        BackendKind::QemuTcg,
        Path::new("qemu-system-x86_64"),
        &bin("capsid-vhost"),
    )
    .unwrap()
}

fn spec(run_dir: PathBuf) -> VmSpec {
    VmSpec {
        name: "test".into(),
        vcpus: 1,
        memory_mib: 256,
        kernel: artifact("kernel/vmlinux"),
        initramfs: artifact("initramfs.cpio.gz"),
        kernel_args: vec![],
        disks: vec![],
        net: None,
        fs: None,
        guest_cid: 3,
        run_dir,
        cgroup: None,
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn agent_reaches_the_host_and_stop_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("vm");
    std::fs::create_dir(&run).unwrap();
    // The agent connects out to host port 1024 when it is ready.
    let listener = UnixListener::bind(run.join("vsock.sock_1024")).unwrap();
    let mut vm = backend().start(&spec(run.clone())).unwrap();
    let pids = vm.pids();
    assert_eq!(pids.len(), 4, "qemu + console, vsock, rng backends");
    let (_agent, _) = listener.accept().unwrap();

    assert_eq!(vm.stop(Duration::from_secs(2)).unwrap(), VmExit::Stopped);
    for pid in pids {
        assert!(!alive(pid), "process {pid} survived stop");
    }
    assert!(!run.exists(), "run directory left behind");
}

#[test]
fn guest_that_cannot_reach_the_host_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("vm");
    let mut vm = backend().start(&spec(run.clone())).unwrap();
    let exit = vm.wait_timeout(Duration::from_secs(90)).unwrap();
    assert_eq!(exit, Some(VmExit::GuestShutdown));
    assert!(!run.exists(), "run directory left behind");
}

#[test]
fn missing_kernel_is_named_and_nothing_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("vm");
    let mut s = spec(run.clone());
    s.kernel = "/nonexistent/vmlinux".into();
    let e = backend().start(&s).unwrap_err().to_string();
    assert!(
        e.contains("kernel /nonexistent/vmlinux does not exist"),
        "{e}"
    );
    assert!(!run.exists());
}

#[test]
fn failing_device_fails_the_start_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("vm");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let mut s = spec(run.clone());
    s.disks.push(capsid_sandbox::backend::DiskSpec {
        path: disk.clone(),
        readonly: true,
        serial: "x".repeat(20),
    });
    // A tap that does not exist: the net backend dies, and says why.
    s.net = Some(capsid_sandbox::backend::NetSpec {
        tap: "capsid-notap0".into(),
        mac: "52:54:00:00:00:01".into(),
        netns: None,
    });
    let e = backend().start(&s).unwrap_err().to_string();
    assert!(
        e.contains("capsid-vhost net0") && e.contains("capsid-notap0"),
        "{e}"
    );
    assert!(!run.exists(), "run directory left behind");
}

#[test]
fn impossible_specs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(dir.path().join("vm"));
    s.memory_mib = 8;
    assert!(backend()
        .start(&s)
        .unwrap_err()
        .to_string()
        .contains("8 MiB"));
    let mut s = spec(dir.path().join("vm"));
    s.vcpus = 0;
    assert!(backend()
        .start(&s)
        .unwrap_err()
        .to_string()
        .contains("0 vCPUs"));
}

/// The process of `pids` whose command line names `needle`.
fn process_naming(pids: &[u32], needle: &str) -> u32 {
    pids.iter()
        .copied()
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .unwrap_or_else(|| panic!("no VM process names {needle}"))
}

#[test]
fn a_device_process_that_dies_fails_the_vm_and_takes_qemu_with_it() {
    // Each device in turn, in a VM of its own: vsock, rng, a disk, and
    // virtiofsd (not a capsid-vhost, but as much a part of the VM).
    for (device, needle) in [
        ("vsock", "vhost-vsock.sock"),
        ("console", "vhost-console.sock"),
        ("rng", "vhost-rng.sock"),
        ("blk0", "vhost-blk0.sock"),
        ("virtiofsd", "virtiofsd.sock"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("vm");
        std::fs::create_dir(&run).unwrap();
        // Keeps the agent from giving up on the host (and powering off)
        // while the test runs.
        let _listener = UnixListener::bind(run.join("vsock.sock_1024")).unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        let mut s = spec(run.clone());
        s.disks.push(DiskSpec {
            path: disk,
            readonly: true,
            serial: "disk".into(),
        });
        s.fs = Some(FsSpec {
            daemon: "virtiofsd".into(),
            shared_dir: share,
            tag: "capsid-test".into(),
            cache: FsCache::Auto,
        });
        let mut vm = backend().start(&s).unwrap();
        let pids = vm.pids();
        assert_eq!(
            pids.len(),
            6,
            "qemu + console, vsock, rng, blk0 and virtiofsd"
        );
        assert_eq!(vm.try_wait().unwrap(), None);
        let victim = process_naming(&pids[1..], needle);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(victim as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let killed = Instant::now();
        let exit = vm.wait_timeout(Duration::from_secs(5)).unwrap();
        eprintln!(
            "{device}: VM failed {:?} after its SIGKILL",
            killed.elapsed()
        );
        assert_eq!(exit, Some(VmExit::Failed(128 + 9)), "{device}");
        // Everything is reaped and the run directory gone, as for any end.
        for pid in &pids {
            assert!(!alive(*pid), "{device}: process {pid} survived");
        }
        assert!(!run.exists(), "{device}: run directory left behind");
        // The end is kept: a later stop reports it, and does nothing else.
        assert_eq!(
            vm.stop(Duration::from_secs(2)).unwrap(),
            VmExit::Failed(128 + 9)
        );
    }
}
