//! The sandbox's capsid-vmm backend, driven through the same `Backend` and
//! `Vm` traits as the QEMU backend, with tiny guests as "kernels": start,
//! the guest ending by itself, a stop through the control socket, a VMM
//! that fails to start, a tap in the sandbox's network namespace; and the
//! run directory gone every time.

use std::path::Path;
use std::time::Duration;

use capsid_sandbox::backend::capsid_vmm::CapsidVmmBackend;
use capsid_sandbox::backend::{Backend, BackendError, VmExit, VmSpec};
use capsid_sandbox::config::BackendKind;
use capsid_tests::asm::{self, LIB64};
use capsid_tests::bin;

fn spec(kernel: &Path, initramfs: &Path, run_dir: &Path) -> VmSpec {
    VmSpec {
        name: "tiny".into(),
        vcpus: 1,
        memory_mib: 64,
        kernel: kernel.to_path_buf(),
        initramfs: initramfs.to_path_buf(),
        kernel_args: vec!["capsid.test=backend".into()],
        disks: vec![],
        net: None,
        fs: None,
        guest_cid: 3,
        run_dir: run_dir.to_path_buf(),
        cgroup: None,
    }
}

fn guest(dir: &Path, body: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let kernel = asm::elf(
        &format!(".text\n.global _start\n_start:\n{body}\n{LIB64}"),
        dir,
        "guest",
    );
    let initramfs = dir.join("initramfs");
    std::fs::write(&initramfs, b"070701").unwrap();
    (kernel, initramfs)
}

fn wait_for(path: &Path, text: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(text)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no {text:?} in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn guest_reset_is_a_guest_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, initramfs) = guest(dir.path(), " call reset");
    let backend = CapsidVmmBackend::new(&bin("capsid-vmm")).unwrap();
    assert_eq!(backend.kind(), BackendKind::CapsidVmm);
    let run_dir = dir.path().join("run");
    let mut vm = backend.start(&spec(&kernel, &initramfs, &run_dir)).unwrap();
    assert_eq!(vm.pids().len(), 1);
    let exit = vm.wait_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(exit, Some(VmExit::GuestShutdown));
    assert!(!run_dir.exists());
}

#[test]
fn stop_goes_through_the_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    // Prints, then waits for a key and resets (what Ctrl-Alt-Del asks).
    let (kernel, initramfs) = guest(
        dir.path(),
        r#" lea rdi, [rip + m]
    call puts
1:  pause
    in al, 0x64
    test al, 1
    jz 1b
    call reset
m:  .asciz "UP\n""#,
    );
    let backend = CapsidVmmBackend::new(&bin("capsid-vmm")).unwrap();
    let run_dir = dir.path().join("run");
    let mut vm = backend.start(&spec(&kernel, &initramfs, &run_dir)).unwrap();
    wait_for(vm.serial_log(), "UP\n");
    assert!(vm.vsock_path().exists());
    assert_eq!(vm.try_wait().unwrap(), None);
    let t = std::time::Instant::now();
    assert_eq!(vm.stop(Duration::from_secs(4)).unwrap(), VmExit::Stopped);
    // The guest reset on the keys: well before the grace period ran out.
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(!run_dir.exists());
}

#[test]
fn a_guest_that_ignores_the_keyboard_is_stopped_anyway() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, initramfs) = guest(dir.path(), "1: hlt\n jmp 1b");
    let backend = CapsidVmmBackend::new(&bin("capsid-vmm")).unwrap();
    let run_dir = dir.path().join("run");
    let mut vm = backend.start(&spec(&kernel, &initramfs, &run_dir)).unwrap();
    assert_eq!(
        vm.stop(Duration::from_millis(600)).unwrap(),
        VmExit::Stopped
    );
    assert!(!run_dir.exists());
}

#[test]
fn a_vmm_that_cannot_start_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"not a kernel").unwrap();
    let backend = CapsidVmmBackend::new(&bin("capsid-vmm")).unwrap();
    let run_dir = dir.path().join("run");
    let e = backend
        .start(&spec(&junk, &junk, &run_dir))
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(e, BackendError::StartFailed { .. }), "{e}");
    assert!(e.to_string().contains("neither an x86-64 ELF"), "{e}");
    assert!(!run_dir.exists());
}

/// A network namespace holding one tap, removed (with the tap) on drop.
struct TapNetns {
    name: String,
}

impl TapNetns {
    fn new(tag: &str) -> Self {
        let name = format!("capsid-t-{tag}-{}", std::process::id());
        let ip = |args: &[&str]| {
            let (code, _, err) = capsid_tests::run(std::process::Command::new("ip").args(args));
            assert_eq!(code, 0, "ip {args:?}: {err}");
        };
        ip(&["netns", "add", &name]);
        let me = Self { name };
        ip(&[
            "-n", &me.name, "tuntap", "add", "dev", "tap0", "mode", "tap",
        ]);
        ip(&["-n", &me.name, "link", "set", "tap0", "up"]);
        me
    }

    fn path(&self) -> std::path::PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// Whether a process holds the tap open (the kernel reports no carrier
    /// on an up tap nobody has attached to).
    fn tap_attached(&self) -> bool {
        let (code, out, err) = capsid_tests::run(
            std::process::Command::new("ip").args(["-n", &self.name, "link", "show", "tap0"]),
        );
        assert_eq!(code, 0, "ip link show: {err}");
        !out.contains("NO-CARRIER")
    }
}

impl Drop for TapNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn the_vmm_opens_its_tap_inside_the_sandboxs_network_namespace() {
    use capsid_sandbox::backend::NetSpec;
    use std::os::unix::fs::MetadataExt;

    let ns = TapNetns::new("vmmnet");
    assert!(!ns.tap_attached());
    let dir = tempfile::tempdir().unwrap();
    let (kernel, initramfs) = guest(dir.path(), "1: hlt\n jmp 1b");
    let backend = CapsidVmmBackend::new(&bin("capsid-vmm")).unwrap();
    let run_dir = dir.path().join("run");
    let mut with_net = spec(&kernel, &initramfs, &run_dir);
    with_net.net = Some(NetSpec {
        tap: "tap0".into(),
        mac: "52:54:00:12:34:56".into(),
        netns: Some(ns.path()),
    });
    let mut vm = backend.start(&with_net).unwrap();
    let vmm = vm.pids()[0];
    let vmm_ns = std::fs::metadata(format!("/proc/{vmm}/ns/net")).unwrap();
    let want = std::fs::metadata(ns.path()).unwrap();
    assert_eq!(
        (vmm_ns.dev(), vmm_ns.ino()),
        (want.dev(), want.ino()),
        "the VMM runs in the sandbox's network namespace"
    );
    assert!(ns.tap_attached(), "the VMM holds the tap");
    assert_eq!(
        vm.stop(Duration::from_millis(600)).unwrap(),
        VmExit::Stopped
    );
    assert!(!ns.tap_attached(), "the tap is let go with the VMM");
    assert!(!run_dir.exists());

    // A tap that is not there fails the start, naming it.
    with_net.net.as_mut().unwrap().tap = "nosuchtap".into();
    let e = backend.start(&with_net).map(|_| ()).unwrap_err();
    assert!(matches!(e, BackendError::StartFailed { .. }), "{e}");
    assert!(e.to_string().contains("nosuchtap"), "{e}");
    assert!(!run_dir.exists());
}
