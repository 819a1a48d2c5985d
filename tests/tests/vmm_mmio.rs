//! (c) A tiny 64-bit guest drives capsid-vmm's virtio-mmio transport the
//! way a virtio driver does: identification registers, feature
//! negotiation (a legacy driver is refused, a modern one accepted), queue
//! set-up, DRIVER_OK. It posts one buffer on the entropy device's queue,
//! kicks it (the write is caught by an ioeventfd), and waits with `hlt`
//! for the device's interrupt, which arrives through the irqfd on GSI 5,
//! the IOAPIC (programmed by the guest) and its LAPIC, at vector 0x30.

use std::time::Duration;

use capsid_tests::asm::{self, LIB64};
use capsid_tests::vmm::Vmm;
use serde_json::json;

const DRIVER: &str = r#"
    .equ MMIO, 0xd0000000
    .equ IOAPIC, 0xfec00000
    .equ LAPIC, 0xfee00000
    .equ DESC, 0x30000
    .equ AVAIL, 0x31000
    .equ USED, 0x32000
    .equ BUF, 0x40000
    .equ IDT, 0x12000

    .text
    .global _start
_start:
    # The legacy PIC would deliver GSI 5 too, to an empty vector: mask it.
    mov al, 0xff
    out 0x21, al
    out 0xa1, al
    # IDT with a handler at vector 0x30.
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
    # LAPIC on; IOAPIC pin 5 -> vector 0x30, edge, to APIC 0.
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
    mov eax, [rbx + 0x000]
    call puthex
    call putsp
    mov eax, [rbx + 0x004]
    call puthex
    call putsp
    mov eax, [rbx + 0x008]
    call puthex
    call putsp
    mov eax, [rbx + 0x00c]
    call puthex
    call putnl
    lea rdi, [rip + m_feat]
    call puts
    mov dword ptr [rbx + 0x014], 1
    mov eax, [rbx + 0x010]
    call puthex
    call putsp
    mov dword ptr [rbx + 0x014], 0
    mov eax, [rbx + 0x010]
    call puthex
    call putnl

    # A legacy driver (no VIRTIO_F_VERSION_1): FEATURES_OK must not stick.
    lea rdi, [rip + m_legacy]
    call puts
    mov dword ptr [rbx + 0x070], 0
    mov dword ptr [rbx + 0x070], 1
    mov dword ptr [rbx + 0x070], 3
    mov dword ptr [rbx + 0x024], 1
    mov dword ptr [rbx + 0x020], 0
    mov dword ptr [rbx + 0x024], 0
    mov dword ptr [rbx + 0x020], 0
    mov dword ptr [rbx + 0x070], 0xb
    mov eax, [rbx + 0x070]
    call puthex
    call putnl

    # A modern driver.
    lea rdi, [rip + m_modern]
    call puts
    mov dword ptr [rbx + 0x070], 0
    mov dword ptr [rbx + 0x070], 1
    mov dword ptr [rbx + 0x070], 3
    mov dword ptr [rbx + 0x024], 1
    mov dword ptr [rbx + 0x020], 1
    mov dword ptr [rbx + 0x024], 0
    mov dword ptr [rbx + 0x020], 0
    mov dword ptr [rbx + 0x070], 0xb
    mov eax, [rbx + 0x070]
    call puthex
    call putsp
    # Queue 0: not ready yet, its maximum, then 8 entries.
    mov dword ptr [rbx + 0x030], 0
    mov eax, [rbx + 0x044]
    call puthex
    call putsp
    mov eax, [rbx + 0x034]
    call puthex
    call putsp
    mov dword ptr [rbx + 0x038], 8
    mov dword ptr [rbx + 0x080], DESC
    mov dword ptr [rbx + 0x084], 0
    mov dword ptr [rbx + 0x090], AVAIL
    mov dword ptr [rbx + 0x094], 0
    mov dword ptr [rbx + 0x0a0], USED
    mov dword ptr [rbx + 0x0a4], 0
    mov dword ptr [rbx + 0x044], 1
    mov dword ptr [rbx + 0x070], 0xf
    mov eax, [rbx + 0x070]
    call puthex
    call putnl

    # One 16-byte device-writable buffer.
    mov rdi, DESC
    mov qword ptr [rdi], BUF
    mov dword ptr [rdi + 8], 16
    mov word ptr [rdi + 12], 2
    mov word ptr [rdi + 14], 0
    mov rdi, AVAIL
    mov word ptr [rdi], 0
    mov word ptr [rdi + 4], 0
    mov word ptr [rdi + 2], 1
    mov dword ptr [rbx + 0x050], 0
    # Wait for the interrupt; `sti; hlt` cannot lose it (STI shadow).
1:  cli
    cmp byte ptr [rip + got_irq], 1
    je 2f
    sti
    hlt
    jmp 1b
2:
    lea rdi, [rip + m_used]
    call puts
    movzx rax, word ptr [USED + 2]
    call puthex
    call putsp
    mov eax, [USED + 8]
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
    # Addresses above 2 GiB need a register: displacements sign-extend.
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
m_feat:   .asciz "FEATURES "
m_legacy: .asciz "LEGACY "
m_modern: .asciz "MODERN "
m_used:   .asciz "USED "
m_irq:    .asciz "IRQ "
    .data
got_irq: .byte 0
"#;

fn hex(v: u64) -> String {
    format!("{v:016x}")
}

#[test]
fn guest_drives_the_transport_and_gets_an_interrupt() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = asm::elf(&format!("{DRIVER}{LIB64}"), dir.path(), "mmio");
    let vm = Vmm::start(json!({
        "vcpus": 1,
        "memory_mib": 32,
        "boot": {"linux": {"kernel": kernel}},
        "rng": true,
    }));
    let end = vm.wait(Duration::from_secs(20));
    assert_eq!(
        end.code, 0,
        "serial:\n{}\nstderr:\n{}",
        end.serial, end.stderr
    );
    let s = &end.serial;
    // "virt", version 2, entropy device (4), vendor "CPSD".
    let vendor = u64::from(u32::from_le_bytes(*b"CPSD"));
    assert!(
        s.contains(&format!(
            "ID {} {} {} {}\n",
            hex(0x7472_6976),
            hex(2),
            hex(4),
            hex(vendor)
        )),
        "{s}"
    );
    // VERSION_1 (bit 32), EVENT_IDX (29) and INDIRECT_DESC (28).
    assert!(
        s.contains(&format!("FEATURES {} {}\n", hex(1), hex(0x3000_0000))),
        "{s}"
    );
    // ACKNOWLEDGE|DRIVER without FEATURES_OK.
    assert!(s.contains(&format!("LEGACY {}\n", hex(3))), "{s}");
    // FEATURES_OK kept; queue not ready, 1024 entries max; DRIVER_OK.
    assert!(
        s.contains(&format!(
            "MODERN {} {} {} {}\n",
            hex(0xb),
            hex(0),
            hex(1024),
            hex(0xf)
        )),
        "{s}"
    );
    // The interrupt: InterruptStatus says "used buffer".
    assert!(s.contains(&format!("IRQ {}\n", hex(1))), "{s}");
    // The buffer came back filled: used index 1, 16 bytes.
    assert!(s.contains(&format!("USED {} {}\n", hex(1), hex(16))), "{s}");
    // The kick never left the guest as an MMIO exit: the ioeventfd took it.
    assert!(!end.stderr.contains("refused"), "{}", end.stderr);
}

#[test]
fn metrics_count_the_device_work() {
    let dir = tempfile::tempdir().unwrap();
    // The same driver, but it stops before resetting so the test can ask.
    let source = DRIVER.replace(
        "    call reset\n\nhandler:",
        "    lea rdi, [rip + m_done]\n    call puts\n9:  hlt\n    jmp 9b\nm_done: .asciz \"DONE\\n\"\n\nhandler:",
    );
    let kernel = asm::elf(&format!("{source}{LIB64}"), dir.path(), "mmio");
    let mut vm = Vmm::start(json!({
        "vcpus": 1,
        "memory_mib": 32,
        "boot": {"linux": {"kernel": kernel}},
        "rng": true,
    }));
    vm.wait_serial("DONE\n", Duration::from_secs(20));
    let m = vm.control(json!({"op": "metrics"}));
    assert_eq!(m["ok"], true, "{m}");
    let dev = &m["devices"][0];
    assert_eq!(dev["name"], "rng", "{m}");
    assert_eq!(dev["base"], 0xd000_0000u64, "{m}");
    assert_eq!(dev["gsi"], 5, "{m}");
    assert_eq!(dev["activated"], true, "{m}");
    assert_eq!(dev["events"], 1, "{m}");
    assert_eq!(dev["interrupts"], 1, "{m}");
    let exits = &m["vcpus"][0]["exits"];
    assert!(exits["mmio_read"].as_u64().unwrap() >= 10, "{m}");
    assert!(exits["io_out"].as_u64().unwrap() > 50, "{m}");
    assert!(m["first_kvm_run_monotonic_ns"].as_u64().is_some(), "{m}");
    assert_eq!(m["guest_memory"][0]["size"], 32u64 << 20, "{m}");
    let r = vm.control(json!({"op": "shutdown", "timeout_ms": 200}));
    assert_eq!(r["ok"], true, "{r}");
    let end = vm.wait(Duration::from_secs(10));
    // The guest ignores the keyboard: the VMM ends it as stopped.
    assert_eq!(end.code, 4, "{}", end.stderr);
    assert!(
        end.stderr.contains("did not shut down in time"),
        "{}",
        end.stderr
    );
}
