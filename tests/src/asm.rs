//! Tiny test guests from assembly source, assembled when the test runs
//! with GNU as and ld (binutils, part of build-essential): the source in
//! the test file is the guest, no hand-kept byte arrays.
//!
//! Sources use Intel syntax. [`elf`] links an x86-64 ELF "kernel" that
//! capsid-vmm loads like a vmlinux (its `.text` at 1 MiB, a `.low`
//! section at 64 KiB for real-mode code such as an AP trampoline, and
//! `.note.Xen` kept for a PVH entry note); [`flat`] makes a flat binary.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Subroutines every guest may call (64-bit code): `putc` (AL), `puts`
/// (RDI: NUL-terminated), `puthex` (RAX: as 16 hex digits), `putnl`,
/// `reset` (i8042 reset pulse). They clobber RAX, RCX, RDX, RDI only.
pub const LIB64: &str = r#"
    .code64
putc:
    push rdx
    mov dx, 0x3f8
    out dx, al
    pop rdx
    ret
puts:
    mov al, [rdi]
    test al, al
    jz 1f
    call putc
    inc rdi
    jmp puts
1:  ret
puthex:
    mov rdx, rax
    mov ecx, 16
2:  rol rdx, 4
    mov al, dl
    and al, 0xf
    add al, '0'
    cmp al, '9'
    jbe 3f
    add al, 'a' - '9' - 1
3:  call putc
    dec ecx
    jnz 2b
    ret
putsp:
    mov al, ' '
    jmp putc
putnl:
    mov al, 10
    jmp putc
reset:
    mov al, 0xfe
    out 0x64, al
4:  hlt
    jmp 4b
"#;

const LINKER_SCRIPT: &str = r#"
ENTRY(_start)
SECTIONS {
    .low 0x10000 : { *(.low) }
    .text 0x100000 : { *(.text*) *(.rodata*) *(.data*) }
    .bss : { *(.bss*) }
    .note.Xen : { *(.note.Xen) }
    /DISCARD/ : { *(.comment) *(.note.gnu*) *(.eh_frame*) }
}
"#;

fn tool(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (binutils is needed: make deps): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assemble(source: &str, dir: &Path, name: &str) -> PathBuf {
    let src = dir.join(format!("{name}.s"));
    let obj = dir.join(format!("{name}.o"));
    std::fs::write(&src, format!(".intel_syntax noprefix\n{source}\n")).expect("write source");
    tool(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src));
    obj
}

/// Assembles `source` into an ELF image in `dir`; returns its path.
pub fn elf(source: &str, dir: &Path, name: &str) -> PathBuf {
    let obj = assemble(source, dir, name);
    let script = dir.join(format!("{name}.ld"));
    std::fs::write(&script, LINKER_SCRIPT).expect("write linker script");
    let out = dir.join(format!("{name}.elf"));
    tool(
        Command::new("ld")
            .args([
                "-m",
                "elf_x86_64",
                "-nostdlib",
                "-static",
                "--build-id=none",
            ])
            .arg("-T")
            .arg(&script)
            .arg("-o")
            .arg(&out)
            .arg(&obj),
    );
    out
}

/// Assembles `source` into a flat binary whose first byte sits at
/// `origin`.
pub fn flat(source: &str, dir: &Path, name: &str, origin: u64) -> Vec<u8> {
    let obj = assemble(source, dir, name);
    let out = dir.join(format!("{name}.bin"));
    tool(
        Command::new("ld")
            .args([
                "-m",
                "elf_x86_64",
                "-nostdlib",
                "-static",
                "--build-id=none",
            ])
            .arg(format!("-Ttext={origin:#x}"))
            .args(["--oformat", "binary", "-e", "0"])
            .arg("-o")
            .arg(&out)
            .arg(&obj),
    );
    std::fs::read(&out).expect("read flat binary")
}

/// GNU as macros for guests that drive a virtio-mmio device: put it
/// before the source (it emits nothing by itself). RBX holds the device's
/// register base wherever a macro touches a register.
///
/// - `virtio_status value`: writes the status register.
/// - `virtio_modern`: reset, ACKNOWLEDGE, DRIVER, VIRTIO_F_VERSION_1 as
///   the only feature, FEATURES_OK (status 0xb).
/// - `virtio_queue index, size, desc, avail, used`: sets queue `index` up
///   (its rings at those addresses) and marks it ready.
/// - `virtio_desc table, index, addr, len, flags, next=0`: fills
///   descriptor `index` of the table at `table` (`addr` a constant or a
///   label).
/// - `virtio_kick queue, avail, head=0`: puts descriptor `head` as the
///   first entry of the available ring at `avail` and notifies `queue`.
/// - `irq_route handler, gsi, vector, idt`: masks the legacy PIC, puts
///   `handler` at `vector` of an IDT at `idt`, enables the LAPIC and
///   routes IOAPIC pin `gsi` to `vector` (edge, to APIC 0).
/// - `virtio_irq_handler mmio, flag`: the body of an interrupt handler
///   that acknowledges the interrupt of the device at `mmio`, sets the
///   byte at `flag` to 1 and signals the LAPIC's end of interrupt.
/// - `wait_flag flag`: `hlt`s until the byte at `flag` is 1 (`sti; hlt`
///   cannot lose the interrupt: STI's shadow).
/// - `report message, values…`: prints the string at `message`, then
///   each 32-bit value (`[USED+8]`, `eax`) as a space and 16 hex digits,
///   then a newline (with [`LIB64`]).
///
/// They clobber RAX and RDI only (`report`: as LIB64's subroutines). An argument that is an expression must
/// have no spaces (`Q+0x1000`): as splits macro arguments at spaces.
pub const VIRTIO64: &str = r#"
    .macro virtio_status value
    mov dword ptr [rbx + 0x070], \value
    .endm

    .macro virtio_modern
    virtio_status 0
    virtio_status 1
    virtio_status 3
    mov dword ptr [rbx + 0x024], 1
    mov dword ptr [rbx + 0x020], 1
    mov dword ptr [rbx + 0x024], 0
    mov dword ptr [rbx + 0x020], 0
    virtio_status 0xb
    .endm

    .macro virtio_queue index, size, desc, avail, used
    mov dword ptr [rbx + 0x030], \index
    mov dword ptr [rbx + 0x038], \size
    mov dword ptr [rbx + 0x080], \desc
    mov dword ptr [rbx + 0x084], 0
    mov dword ptr [rbx + 0x090], \avail
    mov dword ptr [rbx + 0x094], 0
    mov dword ptr [rbx + 0x0a0], \used
    mov dword ptr [rbx + 0x0a4], 0
    mov dword ptr [rbx + 0x044], 1
    .endm

    .macro virtio_desc table, index, addr, len, flags, next=0
    mov rdi, \table + 16 * \index
    lea rax, [\addr]
    mov qword ptr [rdi], rax
    mov dword ptr [rdi + 8], \len
    mov word ptr [rdi + 12], \flags
    mov word ptr [rdi + 14], \next
    .endm

    .macro virtio_kick queue, avail, head=0
    mov rdi, \avail
    mov word ptr [rdi], 0
    mov word ptr [rdi + 4], \head
    mov word ptr [rdi + 2], 1
    mov dword ptr [rbx + 0x050], \queue
    .endm

    .macro irq_route handler, gsi, vector, idt
    mov al, 0xff
    out 0x21, al
    out 0xa1, al
    lea rax, [rip + \handler]
    mov rdi, \idt + \vector * 16
    mov word ptr [rdi], ax
    mov word ptr [rdi + 2], 0x10
    mov word ptr [rdi + 4], 0x8e00
    shr rax, 16
    mov word ptr [rdi + 6], ax
    shr rax, 16
    mov dword ptr [rdi + 8], eax
    mov dword ptr [rdi + 12], 0
    lidt [rip + idtr\@]
    mov rdi, 0xfee00000
    mov dword ptr [rdi + 0xf0], 0x1ff
    mov rdi, 0xfec00000
    mov dword ptr [rdi], 0x10 + 2 * \gsi + 1
    mov dword ptr [rdi + 0x10], 0
    mov dword ptr [rdi], 0x10 + 2 * \gsi
    mov dword ptr [rdi + 0x10], \vector
    .pushsection .rodata
idtr\@: .word 256 * 16 - 1
    .quad \idt
    .popsection
    .endm

    .macro virtio_irq_handler mmio, flag
    push rax
    push rdi
    mov rdi, \mmio
    mov eax, [rdi + 0x060]
    mov dword ptr [rdi + 0x064], eax
    mov byte ptr [rip + \flag], 1
    mov rdi, 0xfee00000
    mov dword ptr [rdi + 0xb0], 0
    pop rdi
    pop rax
    iretq
    .endm

    .macro report message, values:vararg
    lea rdi, [rip + \message]
    call puts
    .ifnb \values
    .irp value, \values
    call putsp
    mov eax, \value
    call puthex
    .endr
    .endif
    call putnl
    .endm

    .macro wait_flag flag
wait\@:
    cli
    cmp byte ptr [rip + \flag], 1
    je done\@
    sti
    hlt
    jmp wait\@
done\@:
    .endm
"#;
