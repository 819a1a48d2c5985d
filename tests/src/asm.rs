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
