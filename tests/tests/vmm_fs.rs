//! virtio-fs under capsid-vmm, served by the real virtiofsd: a tiny 64-bit
//! guest drives the device's virtio-mmio registers as the Linux driver
//! does (identification, config space with the tag, feature negotiation,
//! hiprio and request queue, DRIVER_OK), posts one FUSE_INIT request on
//! the request queue and kicks it. The kick goes from KVM's ioeventfd
//! straight to virtiofsd, which answers through its own mapping of guest
//! RAM (a shared memfd) and signals its call eventfd; capsid-vmm's event
//! loop sets the VRING bit and raises GSI 5, which the guest takes at
//! vector 0x30. Then the sandbox's capsid-vmm backend with a share:
//! virtiofsd started first, in `pids()` after the VMM, reaped at stop,
//! and a virtiofsd that dies during start fails it with its words.
//!
//! Fails where /usr/local/bin/virtiofsd is absent (`make deps` installs it). (A real
//! Linux guest mounting the share cannot boot under this host's KVM, which
//! is PVM; the QEMU backend's tests cover the guest side.)

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsid_sandbox::backend::capsid_vmm::CapsidVmmBackend;
use capsid_sandbox::backend::{Backend, BackendError, FsCache, FsSpec, VmExit, VmSpec};
use capsid_tests::asm::{self, LIB64};
use capsid_tests::bin;
use capsid_tests::vmm::Vmm;
use serde_json::json;

const VIRTIOFSD: &str = capsid_tests::vmm::Virtiofsd::PATH;

/// virtiofsd is part of capsid's dependencies (`make deps`): a test that
/// needs it fails without it rather than passing vacuously.
fn have_virtiofsd() -> bool {
    assert!(
        Path::new(VIRTIOFSD).exists(),
        "{VIRTIOFSD} is not installed: run `make deps`"
    );
    true
}

const DRIVER: &str = r#"
    .equ MMIO, 0xd0000000
    .equ IOAPIC, 0xfec00000
    .equ LAPIC, 0xfee00000
    .equ IDT, 0x12000
    .equ DESC0, 0x30000
    .equ AVAIL0, 0x31000
    .equ USED0, 0x32000
    .equ DESC1, 0x34000
    .equ AVAIL1, 0x35000
    .equ USED1, 0x36000
    .equ REQ, 0x40000
    .equ REPLY, 0x41000

    .text
    .global _start
_start:
    mov al, 0xff
    out 0x21, al
    out 0xa1, al
    lea rax, [rip + handler]
    mov rdi, IDT + 0x30 * 16
    mov word ptr [rdi], ax
    mov word ptr [rdi + 2], 0x10
    mov word ptr [rdi + 4], 0x8e00
    shr rax, 16
    mov word ptr [rdi + 6], ax
    shr rax, 16
    mov dword ptr [rdi + 8], eax
    mov dword ptr [rdi + 12], 0
    lidt [rip + idtr]
    mov rdi, LAPIC
    mov dword ptr [rdi + 0xf0], 0x1ff
    mov rdi, IOAPIC
    mov dword ptr [rdi], 0x10 + 2 * 5 + 1
    mov dword ptr [rdi + 0x10], 0
    mov dword ptr [rdi], 0x10 + 2 * 5
    mov dword ptr [rdi + 0x10], 0x30

    mov rbx, MMIO
    lea rdi, [rip + m_id]
    call puts
    mov eax, [rbx + 0x008]
    call puthex
    call putnl
    # Config space: the tag's first 8 bytes, num_request_queues.
    lea rdi, [rip + m_config]
    call puts
    mov rax, [rbx + 0x100]
    call puthex
    call putsp
    mov eax, [rbx + 0x124]
    call puthex
    call putnl

    # VIRTIO_F_VERSION_1 only.
    mov dword ptr [rbx + 0x070], 0
    mov dword ptr [rbx + 0x070], 1
    mov dword ptr [rbx + 0x070], 3
    mov dword ptr [rbx + 0x024], 1
    mov dword ptr [rbx + 0x020], 1
    mov dword ptr [rbx + 0x024], 0
    mov dword ptr [rbx + 0x020], 0
    mov dword ptr [rbx + 0x070], 0xb
    lea rdi, [rip + m_status]
    call puts
    mov eax, [rbx + 0x070]
    call puthex
    call putsp
    # hiprio (0) and the request queue (1), 8 entries each.
    mov dword ptr [rbx + 0x030], 0
    mov dword ptr [rbx + 0x038], 8
    mov dword ptr [rbx + 0x080], DESC0
    mov dword ptr [rbx + 0x090], AVAIL0
    mov dword ptr [rbx + 0x0a0], USED0
    mov dword ptr [rbx + 0x044], 1
    mov dword ptr [rbx + 0x030], 1
    mov dword ptr [rbx + 0x038], 8
    mov dword ptr [rbx + 0x080], DESC1
    mov dword ptr [rbx + 0x090], AVAIL1
    mov dword ptr [rbx + 0x0a0], USED1
    mov dword ptr [rbx + 0x044], 1
    mov dword ptr [rbx + 0x070], 0xf
    mov eax, [rbx + 0x070]
    call puthex
    call putnl

    # FUSE_INIT (7.31): in header, then fuse_init_in; RAM starts zeroed.
    mov rdi, REQ
    mov dword ptr [rdi], 104
    mov dword ptr [rdi + 4], 26
    mov qword ptr [rdi + 8], 0x1234
    mov dword ptr [rdi + 40], 7
    mov dword ptr [rdi + 44], 31
    mov dword ptr [rdi + 48], 0x20000
    # Descriptor 0: the request (readable, next 1); 1: the reply (writable).
    mov rdi, DESC1
    mov qword ptr [rdi], REQ
    mov dword ptr [rdi + 8], 104
    mov word ptr [rdi + 12], 1
    mov word ptr [rdi + 14], 1
    mov qword ptr [rdi + 16], REPLY
    mov dword ptr [rdi + 24], 4096
    mov word ptr [rdi + 28], 2
    mov word ptr [rdi + 30], 0
    mov rdi, AVAIL1
    mov word ptr [rdi + 4], 0
    mov word ptr [rdi + 2], 1
    mov dword ptr [rbx + 0x050], 1

1:  cli
    cmp byte ptr [rip + got_irq], 1
    je 2f
    sti
    hlt
    jmp 1b
2:
    lea rdi, [rip + m_used]
    call puts
    movzx rax, word ptr [USED1 + 2]
    call puthex
    call putsp
    mov eax, [USED1 + 8]
    call puthex
    call putnl
    # fuse_out_header.error, fuse_init_out.major.
    lea rdi, [rip + m_reply]
    call puts
    mov eax, [REPLY + 4]
    call puthex
    call putsp
    mov eax, [REPLY + 16]
    call puthex
    call putnl
    call reset

handler:
    push rax
    push rcx
    push rdx
    push rdi
    lea rdi, [rip + m_irq]
    call puts
    mov rdi, MMIO
    mov eax, [rdi + 0x060]
    push rax
    call puthex
    call putnl
    pop rax
    mov rdi, MMIO
    mov dword ptr [rdi + 0x064], eax
    mov byte ptr [rip + got_irq], 1
    mov rdi, LAPIC
    mov dword ptr [rdi + 0xb0], 0
    pop rdi
    pop rdx
    pop rcx
    pop rax
    iretq

idtr:     .word 256 * 16 - 1
          .quad IDT
m_id:     .asciz "ID "
m_config: .asciz "CONFIG "
m_status: .asciz "STATUS "
m_used:   .asciz "USED "
m_reply:  .asciz "REPLY "
m_irq:    .asciz "IRQ "
    .data
got_irq: .byte 0
"#;

fn hex(v: u64) -> String {
    format!("{v:016x}")
}

#[test]
fn a_guest_sends_fuse_init_to_virtiofsd_through_capsid_vmm() {
    if !have_virtiofsd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("share");
    std::fs::create_dir(&shared).unwrap();
    let socket = dir.path().join("virtiofsd.sock");
    let mut daemon = capsid_tests::vmm::Virtiofsd::start(&shared, &socket);
    let kernel = asm::elf(&format!("{DRIVER}{LIB64}"), dir.path(), "fs");
    let vm = Vmm::start(json!({
        "vcpus": 1,
        "memory_mib": 32,
        "boot": {"linux": {"kernel": kernel}},
        "fs": {"socket": socket, "tag": "capsid"},
    }));
    let end = vm.wait(Duration::from_secs(20));
    assert_eq!(
        end.code, 0,
        "serial:\n{}\nstderr:\n{}",
        end.serial, end.stderr
    );
    let s = &end.serial;
    assert!(s.contains(&format!("ID {}\n", hex(26))), "{s}");
    // "capsid" and two NULs, little-endian; one request queue.
    let tag = u64::from_le_bytes(*b"capsid\0\0");
    assert!(
        s.contains(&format!("CONFIG {} {}\n", hex(tag), hex(1))),
        "{s}"
    );
    assert!(
        s.contains(&format!("STATUS {} {}\n", hex(0xb), hex(0xf))),
        "{s}"
    );
    assert!(s.contains(&format!("IRQ {}\n", hex(1))), "{s}");
    // One used buffer: the reply, error 0, FUSE major 7.
    assert!(s.contains(&format!("USED {} ", hex(1))), "{s}");
    assert!(s.contains(&format!("REPLY {} {}\n", hex(0), hex(7))), "{s}");
    // virtiofsd ends with its only client.
    let deadline = Instant::now() + Duration::from_secs(5);
    while daemon.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "virtiofsd outlived the VMM");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn spec(dir: &Path, fs: FsSpec) -> (VmSpec, PathBuf) {
    let kernel = asm::elf(
        ".text\n.global _start\n_start:\n1: hlt\n jmp 1b\n",
        dir,
        "guest",
    );
    let initramfs = dir.join("initramfs");
    std::fs::write(&initramfs, b"070701").unwrap();
    let run_dir = dir.join("run");
    (
        VmSpec {
            name: "fs".into(),
            vcpus: 1,
            memory_mib: 64,
            kernel,
            initramfs,
            kernel_args: vec![],
            disks: vec![],
            net: None,
            fs: Some(fs),
            guest_cid: 3,
            run_dir: run_dir.clone(),
            cgroup: None,
        },
        run_dir,
    )
}

#[test]
fn the_backend_runs_virtiofsd_beside_the_vmm() {
    if !have_virtiofsd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("share");
    std::fs::create_dir(&shared).unwrap();
    let (spec, run_dir) = spec(
        dir.path(),
        FsSpec {
            daemon: VIRTIOFSD.into(),
            shared_dir: shared,
            tag: "capsid".into(),
            cache: FsCache::Auto,
        },
    );
    let backend = CapsidVmmBackend::new(&bin("capsid-vmm")).unwrap();
    let mut vm = backend.start(&spec).unwrap();
    let pids = vm.pids();
    assert_eq!(pids.len(), 2, "{pids:?}");
    let comm = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm(pids[0]).trim(), "capsid-vmm");
    assert_eq!(comm(pids[1]).trim(), "virtiofsd");
    // The VMM is connected to it: metrics name the device.
    let m = capsid_tests::vmm::control(&run_dir.join("vmm-api.sock"), json!({"op": "metrics"}));
    let names: Vec<&str> = m["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(names, ["vsock", "rng", "balloon", "fs"], "{m}");
    assert_eq!(
        vm.stop(Duration::from_millis(600)).unwrap(),
        VmExit::Stopped
    );
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "{pid} still runs"
        );
    }
    assert!(!run_dir.exists());
}

#[test]
fn a_virtiofsd_that_dies_under_the_vm_ends_it_as_a_failure() {
    if !have_virtiofsd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("share");
    std::fs::create_dir(&shared).unwrap();
    let (spec, run_dir) = spec(
        dir.path(),
        FsSpec {
            daemon: VIRTIOFSD.into(),
            shared_dir: shared,
            tag: "capsid".into(),
            cache: FsCache::Auto,
        },
    );
    let backend = CapsidVmmBackend::new(&bin("capsid-vmm")).unwrap();
    let mut vm = backend.start(&spec).unwrap();
    let pids = vm.pids();
    assert_eq!(vm.try_wait().unwrap(), None);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[1] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    let exit = vm.wait_timeout(Duration::from_secs(5)).unwrap();
    eprintln!(
        "virtiofsd: VM failed {:?} after its SIGKILL",
        killed.elapsed()
    );
    assert_eq!(exit, Some(VmExit::Failed(128 + 9)));
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "{pid} still runs"
        );
    }
    assert!(!run_dir.exists());
}

#[test]
fn a_virtiofsd_that_dies_fails_the_start_with_its_words() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("share");
    std::fs::create_dir(&shared).unwrap();
    let fake = dir.path().join("virtiofsd");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'virtiofsd: cannot open the shared directory' >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (spec, run_dir) = spec(
        dir.path(),
        FsSpec {
            daemon: fake,
            shared_dir: shared,
            tag: "capsid".into(),
            cache: FsCache::Auto,
        },
    );
    let backend = CapsidVmmBackend::new(&bin("capsid-vmm")).unwrap();
    let e = backend.start(&spec).map(|_| ()).unwrap_err();
    assert!(matches!(e, BackendError::StartFailed { .. }), "{e}");
    let text = e.to_string();
    assert!(text.contains("virtiofsd"), "{text}");
    assert!(text.contains("cannot open the shared directory"), "{text}");
    assert!(!run_dir.exists());
}
