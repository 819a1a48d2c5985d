//! capsid-vmm with tiny purpose-built guests under this machine's KVM: a
//! few hundred bytes of code each, exercising what capsid-vmm does for a
//! real kernel. Guests are assembled from the source below when the test
//! runs (`capsid_tests::asm`).

use std::process::Command;
use std::time::Duration;

use capsid_tests::asm::{self, LIB64};
use capsid_tests::vmm::Vmm;
use capsid_tests::{bin, run};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(20);

/// Real mode at 0:0x1000: prints "OK\n" on COM1, then pulses the i8042
/// reset line.
const HELLO_AND_RESET: &str = r#"
    .code16
    mov dx, 0x3f8
    mov al, 'O'
    out dx, al
    mov al, 'K'
    out dx, al
    mov al, 10
    out dx, al
    mov al, 0xfe
    out 0x64, al
    hlt
"#;

fn real_mode(guest: &[u8], extra_config: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("guest.bin");
    let serial = dir.path().join("serial.log");
    std::fs::write(&image, guest).unwrap();
    let config = dir.path().join("vm.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"vcpus":1,"memory_mib":16,{extra_config}
               "boot":{{"real_mode":{{"image":"{}","load_addr":4096}}}},
               "serial":"{}"}}"#,
            image.display(),
            serial.display()
        ),
    )
    .unwrap();
    let (code, _, stderr) = run(Command::new(bin("capsid-vmm")).arg("--config").arg(&config));
    (
        code,
        std::fs::read_to_string(&serial).unwrap_or_default(),
        stderr,
    )
}

fn flat16(source: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    asm::flat(source, dir.path(), "guest", 0x1000)
}

/// (a) real mode → serial → the host sees the text; (d) the i8042 reset
/// ends the VMM with the reset status, 0.
#[test]
fn real_mode_guest_prints_and_resets() {
    let (code, serial, stderr) = real_mode(&flat16(HELLO_AND_RESET), "");
    assert_eq!(serial, "OK\n", "{stderr}");
    assert_eq!(code, 0, "{stderr}");
}

/// (d) The other i8042 reset path: output port bit 0 cleared through
/// command 0xD1 (what Linux's `reboot=k` falls back to on some boards).
#[test]
fn i8042_output_port_reset_ends_the_vm() {
    let guest = flat16(
        r#"
        .code16
        mov al, 0xd1
        out 0x64, al
        mov al, 0xfe
        out 0x60, al
        hlt
    "#,
    );
    let (code, _, stderr) = real_mode(&guest, "");
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn triple_fault_is_a_guest_crash() {
    // A zero-limit IDT, then int3: every exception escalates to a triple
    // fault.
    let guest = flat16(
        r#"
        .code16
        lidt [0x1010]
        int3
        .org 0x10
        .word 0
        .long 0
    "#,
    );
    let (code, _, stderr) = real_mode(&guest, "");
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("guest crashed"), "{stderr}");
}

/// (b) A 64-bit guest entered by capsid-vmm's own page tables and GDT
/// through the 64-bit boot protocol: it reads the zero page (RSI) and
/// prints the e820 map, the command line and the loader fields; they must
/// match the config. It also prints the segment selectors and control
/// registers it was entered with.
const ZERO_PAGE_REPORTER: &str = r#"
    .text
    .global _start
_start:
    mov rbx, rsi
    lea rdi, [rip + m_sel]
    call puts
    mov ax, cs
    movzx rax, ax
    call puthex
    call putsp
    mov ax, ds
    movzx rax, ax
    call puthex
    call putsp
    mov ax, ss
    movzx rax, ax
    call puthex
    call putsp
    mov rax, cr0
    call puthex
    call putsp
    mov rax, cr4
    call puthex
    call putnl
    lea rdi, [rip + m_hdr]
    call puts
    movzx rax, word ptr [rbx + 0x1fe]
    call puthex
    call putsp
    mov eax, dword ptr [rbx + 0x202]
    call puthex
    call putsp
    movzx rax, byte ptr [rbx + 0x210]
    call puthex
    call putnl
    lea rdi, [rip + m_e820]
    call puts
    movzx r12, byte ptr [rbx + 0x1e8]
    mov rax, r12
    call puthex
    call putnl
    lea r13, [rbx + 0x2d0]
1:  test r12, r12
    jz 2f
    mov rax, [r13]
    call puthex
    call putsp
    mov rax, [r13 + 8]
    call puthex
    call putsp
    mov eax, [r13 + 16]
    call puthex
    call putnl
    add r13, 20
    dec r12
    jmp 1b
2:  lea rdi, [rip + m_cmd]
    call puts
    mov edi, dword ptr [rbx + 0x228]
    call puts
    call putnl
    lea rdi, [rip + m_end]
    call puts
    call reset
m_sel:  .asciz "SEL "
m_hdr:  .asciz "HDR "
m_e820: .asciz "E820 "
m_cmd:  .asciz "CMDLINE "
m_end:  .asciz "END\n"
"#;

fn hex(v: u64) -> String {
    format!("{v:016x}")
}

fn linux_config(
    kernel: &std::path::Path,
    vcpus: u8,
    memory_mib: u32,
    cmdline: &str,
) -> serde_json::Value {
    json!({
        "vcpus": vcpus,
        "memory_mib": memory_mib,
        "boot": {"linux": {"kernel": kernel, "cmdline": cmdline}},
    })
}

#[test]
fn long_mode_guest_reads_the_zero_page() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = asm::elf(&format!("{ZERO_PAGE_REPORTER}{LIB64}"), dir.path(), "zp");
    let vm = Vmm::start(linux_config(&kernel, 1, 64, "capsid.test=zero-page"));
    let end = vm.wait(TIMEOUT);
    assert_eq!(
        end.code, 0,
        "serial:\n{}\nstderr:\n{}",
        end.serial, end.stderr
    );
    let s = &end.serial;
    // __BOOT_CS, __BOOT_DS, __BOOT_DS; CR0 = PE|ET|PG; CR4 = PAE.
    assert!(
        s.contains(&format!(
            "SEL {} {} {} {} {}",
            hex(0x10),
            hex(0x18),
            hex(0x18),
            hex(0x8000_0011),
            hex(0x20)
        )),
        "{s}"
    );
    // boot_flag, "HdrS", type_of_loader.
    assert!(
        s.contains(&format!(
            "HDR {} {} {}",
            hex(0xaa55),
            hex(0x5372_6448),
            hex(0xff)
        )),
        "{s}"
    );
    let e820 = format!(
        "E820 {}\n{} {} {}\n{} {} {}\n{} {} {}\n",
        hex(3),
        hex(0),
        hex(0x9_fc00),
        hex(1),
        hex(0x9_fc00),
        hex(0x400),
        hex(2),
        hex(0x10_0000),
        hex((64 << 20) - 0x10_0000),
        hex(1),
    );
    assert!(s.contains(&e820), "{s}");
    assert!(
        s.contains("CMDLINE console=ttyS0 reboot=k panic=1 capsid.test=zero-page\n"),
        "{s}"
    );
    assert!(s.ends_with("END\n"), "{s}");
}

/// 32-bit output routines for the PVH guest: `putc32` (AL), `puts32`
/// (ESI), `puthex32` (EAX as 8 hex digits).
const LIB32: &str = r#"
    .code32
putc32:
    push edx
    mov dx, 0x3f8
    out dx, al
    pop edx
    ret
puts32:
    mov al, [esi]
    test al, al
    jz 1f
    call putc32
    inc esi
    jmp puts32
1:  ret
puthex32:
    mov edx, eax
    mov ecx, 8
2:  rol edx, 4
    mov al, dl
    and al, 0xf
    add al, '0'
    cmp al, '9'
    jbe 3f
    add al, 'a' - '9' - 1
3:  call putc32
    dec ecx
    jnz 2b
    ret
sp32:
    mov al, ' '
    jmp putc32
nl32:
    mov al, 10
    jmp putc32
"#;

/// A PVH guest: the ELF note names a 32-bit entry, which capsid-vmm must
/// use, in protected mode without paging, with EBX at `hvm_start_info`.
/// It prints the start info, its module, its memory map and command line.
const PVH_REPORTER: &str = r#"
    .section .note.Xen, "a", @note
    .align 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .long pvh_start

    .text
    .code64
    .global _start
_start:
    # The 64-bit entry must not be taken.
    mov al, 'X'
    out 0x80, al
    mov al, 0xfe
    out 0x64, al

    .code32
pvh_start:
    mov ebp, ebx
    mov esp, 0x8000
    mov eax, cr0
    call puthex32
    call sp32
    mov eax, [ebp]
    call puthex32
    call sp32
    mov eax, [ebp + 4]
    call puthex32
    call sp32
    mov eax, [ebp + 12]
    call puthex32
    call nl32
    # Module 0: address and size.
    mov edi, [ebp + 16]
    mov eax, [edi]
    call puthex32
    call sp32
    mov eax, [edi + 8]
    call puthex32
    call nl32
    # Memory map.
    mov edi, [ebp + 40]
    mov ebx, [ebp + 48]
    mov eax, ebx
    call puthex32
    call nl32
4:  test ebx, ebx
    jz 5f
    mov eax, [edi]
    call puthex32
    call sp32
    mov eax, [edi + 8]
    call puthex32
    call sp32
    mov eax, [edi + 16]
    call puthex32
    call nl32
    add edi, 24
    dec ebx
    jmp 4b
5:  mov esi, [ebp + 24]
    call puts32
    call nl32
    mov al, 0xfe
    out 0x64, al
6:  hlt
    jmp 6b
"#;

#[test]
fn pvh_guest_gets_start_info() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = asm::elf(&format!("{PVH_REPORTER}{LIB32}"), dir.path(), "pvh");
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, vec![0x5au8; 10_000]).unwrap();
    let mut config = linux_config(&kernel, 1, 32, "capsid.test=pvh");
    config["boot"]["linux"]["initramfs"] = json!(initrd);
    let end = Vmm::start(config).wait(TIMEOUT);
    assert_eq!(
        end.code, 0,
        "serial:\n{}\nstderr:\n{}",
        end.serial, end.stderr
    );
    let lines: Vec<&str> = end.serial.lines().collect();
    // CR0 = PE|ET, magic, version 1, one module.
    assert_eq!(
        lines[0], "00000011 336ec578 00000001 00000001",
        "{}",
        end.serial
    );
    let module: Vec<u32> = lines[1]
        .split(' ')
        .map(|h| u32::from_str_radix(h, 16).unwrap())
        .collect();
    assert_eq!(module[1], 10_000);
    // Page-aligned, as high as possible in 32 MiB.
    assert_eq!(module[0], ((32u32 << 20) - 10_000) & !0xfff);
    assert_eq!(lines[2], "00000003");
    assert_eq!(lines[3], "00000000 0009fc00 00000001");
    assert_eq!(lines[4], "0009fc00 00000400 00000002");
    assert_eq!(
        lines[5],
        format!("00100000 {:08x} 00000001", (32 << 20) - 0x10_0000)
    );
    assert_eq!(lines[6], "console=ttyS0 reboot=k panic=1 capsid.test=pvh");
}

/// A bzImage guest: a real setup header in front of 64-bit code at +0x200
/// (where the 64-bit boot protocol enters). The guest checks that the
/// zero page carries the image's own header fields and the initramfs.
#[test]
fn bzimage_guest_gets_its_header_and_initramfs() {
    let dir = tempfile::tempdir().unwrap();
    let code = asm::flat(
        &format!(
            r#"
            .code64
            .skip 0x200
            mov rbx, rsi
            movzx rax, byte ptr [rbx + 0x1f1]
            call puthex
            call putsp
            movzx rax, word ptr [rbx + 0x206]
            call puthex
            call putsp
            mov eax, [rbx + 0x260]
            call puthex
            call putsp
            mov eax, [rbx + 0x218]
            call puthex
            call putsp
            mov eax, [rbx + 0x21c]
            call puthex
            call putsp
            mov eax, [rbx + 0x218]
            mov rax, [rax]
            call puthex
            call putnl
            call reset
            {LIB64}"#
        ),
        dir.path(),
        "bz",
        0x10_0000,
    );
    // Boot sector and one setup sector; header per Documentation/x86/boot.rst.
    let mut img = vec![0u8; 2 * 512];
    img[0x1f1] = 1; // setup_sects
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 1; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
    img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
    img[0x260..0x264].copy_from_slice(&0x80_0000u32.to_le_bytes()); // init_size
    img.extend_from_slice(&code);
    let kernel = dir.path().join("bzImage");
    std::fs::write(&kernel, &img).unwrap();
    let initrd = dir.path().join("initrd");
    let mut initrd_bytes = 0x0123_4567_89ab_cdefu64.to_le_bytes().to_vec();
    initrd_bytes.resize(3000, 0);
    std::fs::write(&initrd, &initrd_bytes).unwrap();
    let mut config = linux_config(&kernel, 1, 64, "");
    config["boot"]["linux"]["initramfs"] = json!(initrd);
    let end = Vmm::start(config).wait(TIMEOUT);
    assert_eq!(
        end.code, 0,
        "serial:\n{}\nstderr:\n{}",
        end.serial, end.stderr
    );
    let f: Vec<u64> = end
        .serial
        .trim()
        .split(' ')
        .map(|h| u64::from_str_radix(h, 16).unwrap())
        .collect();
    assert_eq!(&f[..3], &[1, 0x020f, 0x80_0000], "{}", end.serial);
    assert_eq!(f[3], ((64 << 20) - 3000) & !0xfff);
    assert_eq!(f[4], 3000);
    assert_eq!(f[5], 0x0123_4567_89ab_cdef);
}

/// (e) Two vCPUs both run. The boot vCPU (long mode) checks its CPUID
/// (APIC id, hypervisor bit, KVM signature), then starts the second vCPU
/// with INIT/SIPI through its LAPIC, as Linux does with the MP table's
/// CPUs; the second one starts in real mode at the SIPI vector, reads its
/// own APIC id from CPUID and reports in.
const SMP: &str = r#"
    .section .low, "ax"
    .code16
ap:
    push cs
    pop ds
    mov eax, 1
    cpuid
    shr ebx, 24
    mov [0x1004], ebx
    mov dx, 0x3f8
    mov al, 'A'
    out dx, al
    mov al, 'P'
    out dx, al
    mov al, 10
    out dx, al
    mov dword ptr [0x1000], 0x600d
1:  cli
    hlt
    jmp 1b

    .text
    .code64
    .global _start
_start:
    mov eax, 1
    cpuid
    mov r12, rbx
    mov r13, rcx
    lea rdi, [rip + m_bsp]
    call puts
    mov rax, r12
    shr rax, 24
    call puthex
    call putsp
    mov rax, r12
    shr rax, 16
    and rax, 0xff
    call puthex
    call putsp
    mov rax, r13
    shr rax, 31
    call puthex
    call putsp
    mov eax, 0x40000000
    cpuid
    mov [rip + sig], ebx
    mov [rip + sig + 4], ecx
    mov [rip + sig + 8], edx
    lea rdi, [rip + sig]
    call puts
    call putnl
    mov rdi, 0xfee00000
    mov dword ptr [rdi + 0xf0], 0x1ff
    mov dword ptr [rdi + 0x310], 1 << 24
    mov dword ptr [rdi + 0x300], 0x4500
    mov dword ptr [rdi + 0x310], 1 << 24
    mov dword ptr [rdi + 0x300], 0x4610
    mov dword ptr [rdi + 0x310], 1 << 24
    mov dword ptr [rdi + 0x300], 0x4610
    mov rcx, 2000000000
2:  cmp dword ptr [0x11000], 0x600d
    je 3f
    pause
    dec rcx
    jnz 2b
    lea rdi, [rip + m_timeout]
    call puts
    call reset
3:  lea rdi, [rip + m_ap]
    call puts
    mov eax, [0x11004]
    call puthex
    call putnl
    call reset
m_bsp:     .asciz "BSP "
m_ap:      .asciz "AP RAN "
m_timeout: .asciz "AP TIMEOUT\n"
    .data
sig: .space 16
"#;

#[test]
fn two_vcpus_both_run() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = asm::elf(&format!("{SMP}{LIB64}"), dir.path(), "smp");
    let end = Vmm::start(linux_config(&kernel, 2, 64, "")).wait(TIMEOUT);
    assert_eq!(
        end.code, 0,
        "serial:\n{}\nstderr:\n{}",
        end.serial, end.stderr
    );
    let s = &end.serial;
    // BSP: APIC id 0, 2 logical processors, hypervisor bit, KVM signature.
    assert!(
        s.contains(&format!("BSP {} {} {} KVMKVMKVM\n", hex(0), hex(2), hex(1))),
        "{s}"
    );
    assert!(s.contains("AP\n"), "{s}");
    assert!(s.contains(&format!("AP RAN {}\n", hex(1))), "{s}");
}
