//! The balloon, end to end under KVM: a tiny 64-bit guest touches 64 MiB,
//! drives the balloon's inflate and deflate queues the way the Linux
//! driver does (page frame arrays, 4 KiB frames), and follows the target
//! the test sets through capsid-vmm's control socket. The VMM's resident
//! memory (VmRSS) must drop by the inflated 64 MiB, and rise again when the
//! guest deflates and touches the pages anew.

use std::time::Duration;

use capsid_tests::asm::{self, LIB64};
use capsid_tests::vmm::Vmm;
use serde_json::json;

const DRIVER: &str = r#"
    .equ MMIO, 0xd0000000
    .equ TOUCH, 0x4000000
    .equ TOUCH_LEN, 0x4000000
    .equ PFNS, 0x200000
    .equ NPAGES, 16384
    .equ IQ, 0x30000
    .equ DQ, 0x34000

    .text
    .global _start
_start:
    call touch
    lea rdi, [rip + m_touched]
    call puts

    mov rbx, MMIO
    mov dword ptr [rbx + 0x070], 0
    mov dword ptr [rbx + 0x070], 1
    mov dword ptr [rbx + 0x070], 3
    mov dword ptr [rbx + 0x024], 1
    mov dword ptr [rbx + 0x020], 1
    mov dword ptr [rbx + 0x024], 0
    mov dword ptr [rbx + 0x020], 0
    mov dword ptr [rbx + 0x070], 0xb
    # Queue 0 (inflate) and 1 (deflate): descriptors, available and used
    # rings one page apart.
    xor esi, esi
    mov edi, IQ
    call setup_queue
    mov esi, 1
    mov edi, DQ
    call setup_queue
    mov dword ptr [rbx + 0x070], 0xf

    # The frame numbers of the touched range.
    mov rdi, PFNS
    mov eax, TOUCH >> 12
    mov ecx, NPAGES
1:  stosd
    inc eax
    dec ecx
    jnz 1b

    # Wait for a target, then give the pages back.
2:  pause
    mov eax, [rbx + 0x100]
    test eax, eax
    jz 2b
    mov edi, IQ
    xor esi, esi
    call post_pfns
    mov dword ptr [rbx + 0x104], NPAGES
    lea rdi, [rip + m_inflated]
    call puts

    # Wait for the target to go back to 0, take the pages, touch them.
3:  pause
    mov eax, [rbx + 0x100]
    test eax, eax
    jnz 3b
    mov edi, DQ
    mov esi, 1
    call post_pfns
    mov dword ptr [rbx + 0x104], 0
    call touch
    lea rdi, [rip + m_deflated]
    call puts

    # A target of 1 MiB (256 pages) is the signal to end.
4:  pause
    cmp dword ptr [rbx + 0x100], 256
    jne 4b
    call reset

# esi = queue index, edi = base of its rings (desc, +0x1000 avail, +0x2000 used)
setup_queue:
    mov dword ptr [rbx + 0x030], esi
    mov dword ptr [rbx + 0x038], 4
    mov dword ptr [rbx + 0x080], edi
    mov dword ptr [rbx + 0x084], 0
    lea eax, [rdi + 0x1000]
    mov dword ptr [rbx + 0x090], eax
    mov dword ptr [rbx + 0x094], 0
    lea eax, [rdi + 0x2000]
    mov dword ptr [rbx + 0x0a0], eax
    mov dword ptr [rbx + 0x0a4], 0
    mov dword ptr [rbx + 0x044], 1
    ret

# Posts the frame array on queue esi (rings at edi) and waits until the
# device has used it.
post_pfns:
    mov qword ptr [rdi], PFNS
    mov dword ptr [rdi + 8], NPAGES * 4
    mov dword ptr [rdi + 12], 0
    mov word ptr [rdi + 0x1000], 0
    mov word ptr [rdi + 0x1004], 0
    mov word ptr [rdi + 0x1002], 1
    mov dword ptr [rbx + 0x050], esi
5:  pause
    cmp word ptr [rdi + 0x2002], 1
    jne 5b
    ret

touch:
    mov rdi, TOUCH
    mov rcx, TOUCH_LEN / 8
    mov rax, 0x0101010101010101
    rep stosq
    ret

m_touched:  .asciz "TOUCHED\n"
m_inflated: .asciz "INFLATED\n"
m_deflated: .asciz "DEFLATED\n"
"#;

const MIB_KIB: u64 = 1024;

#[test]
fn inflating_64_mib_gives_the_memory_back_to_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = asm::elf(&format!("{DRIVER}{LIB64}"), dir.path(), "balloon");
    let mut vm = Vmm::start(json!({
        "vcpus": 1,
        "memory_mib": 256,
        "boot": {"linux": {"kernel": kernel}},
        "balloon": {"deflate_on_oom": true},
    }));
    let timeout = Duration::from_secs(30);
    vm.wait_serial("TOUCHED\n", timeout);
    let touched = vm.rss_kib();
    assert!(
        touched > 64 * MIB_KIB,
        "RSS after touching 64 MiB: {touched} KiB"
    );

    let r = vm.control(json!({"op": "balloon_set", "target_mib": 64}));
    assert_eq!(r["ok"], true, "{r}");
    vm.wait_serial("INFLATED\n", timeout);
    let inflated = vm.rss_kib();
    let stats = vm.control(json!({"op": "balloon_stats"}));
    assert_eq!(stats["counters"]["inflated_pages"], 16384, "{stats}");
    assert_eq!(stats["actual_mib"], 64, "{stats}");
    assert_eq!(stats["target_mib"], 64, "{stats}");
    assert!(
        touched.saturating_sub(inflated) >= 60 * MIB_KIB,
        "RSS {touched} KiB -> {inflated} KiB after inflating 64 MiB"
    );

    let r = vm.control(json!({"op": "balloon_set", "target_mib": 0}));
    assert_eq!(r["ok"], true, "{r}");
    vm.wait_serial("DEFLATED\n", timeout);
    let deflated = vm.rss_kib();
    let stats = vm.control(json!({"op": "balloon_stats"}));
    assert_eq!(stats["counters"]["deflated_pages"], 16384, "{stats}");
    assert_eq!(stats["counters"]["invalid_pfns"], 0, "{stats}");
    assert!(
        deflated.saturating_sub(inflated) >= 60 * MIB_KIB,
        "RSS {inflated} KiB -> {deflated} KiB after deflating and touching 64 MiB"
    );
    eprintln!(
        "VMM RSS: touched {touched} KiB, inflated {inflated} KiB, deflated+touched {deflated} KiB"
    );

    // Out-of-range targets are refused; the VM lives on.
    let r = vm.control(json!({"op": "balloon_set", "target_mib": 1024}));
    assert_eq!(r["ok"], false, "{r}");
    let r = vm.control(json!({"op": "balloon_set", "target_mib": 1}));
    assert_eq!(r["ok"], true, "{r}");
    let end = vm.wait(timeout);
    assert_eq!(end.code, 0, "{}", end.stderr);
}

#[test]
fn balloon_requests_without_a_balloon_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = asm::elf(
        &format!(
            ".text\n.global _start\n_start:\n lea rdi, [rip + m]\n call puts\n1: hlt\n jmp 1b\nm: .asciz \"UP\\n\"\n{LIB64}"
        ),
        dir.path(),
        "idle",
    );
    let mut vm = Vmm::start(json!({
        "vcpus": 1,
        "memory_mib": 16,
        "boot": {"linux": {"kernel": kernel}},
    }));
    vm.wait_serial("UP\n", Duration::from_secs(20));
    let r = vm.control(json!({"op": "balloon_set", "target_mib": 1}));
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("no balloon"), "{r}");
    let r = vm.control(json!({"op": "balloon_stats"}));
    assert_eq!(r["ok"], false, "{r}");
}

#[test]
fn the_sandbox_balloon_handle_drives_capsid_vmm() {
    use capsid_sandbox::balloon::{BalloonEndpoint, BalloonError, BalloonHandle};

    let dir = tempfile::tempdir().unwrap();
    let kernel = asm::elf(&format!("{DRIVER}{LIB64}"), dir.path(), "balloon");
    let mut vm = Vmm::start(json!({
        "vcpus": 1,
        "memory_mib": 256,
        "boot": {"linux": {"kernel": kernel}},
        "balloon": {"deflate_on_oom": true, "free_page_reporting": true},
    }));
    let timeout = Duration::from_secs(30);
    vm.wait_serial("TOUCHED\n", timeout);
    // What the sandbox layer (and the balloon policy) uses for capsid-vmm.
    let handle = BalloonHandle::new(
        BalloonEndpoint::CapsidVmm {
            socket: vm.control_path(),
        },
        256,
    );
    let before = handle.status().unwrap();
    assert_eq!(
        (before.assigned_mib, before.target_mib, before.actual_mib),
        (256, 0, 0)
    );
    // This guest sends no statistics: they are unusable, never trusted.
    assert!(!before.stats.valid);
    let e = handle.set_target(257).unwrap_err();
    assert!(matches!(e, BalloonError::TargetTooLarge { .. }), "{e}");

    let touched = vm.rss_kib();
    handle.set_target(64).unwrap();
    vm.wait_serial("INFLATED\n", timeout);
    let s = handle.status().unwrap();
    assert_eq!((s.target_mib, s.actual_mib), (64, 64));
    let inflated = vm.rss_kib();
    assert!(
        touched.saturating_sub(inflated) >= 60 * MIB_KIB,
        "RSS {touched} KiB -> {inflated} KiB after inflating 64 MiB through the handle"
    );
    handle.set_target(0).unwrap();
    vm.wait_serial("DEFLATED\n", timeout);
    assert_eq!(handle.status().unwrap().actual_mib, 0);
    handle.set_target(1).unwrap();
    let end = vm.wait(timeout);
    assert_eq!(end.code, 0, "{}", end.stderr);
}
