//! The bare backend boot: the same VM capsid starts (backend, kernel,
//! devices), but with a trivial initramfs whose `/init` prints a marker on
//! the console and reboots at once, so the VM's own cost is measured
//! without the agent or a container.
//!
//! `/init` is a static x86-64 ELF of under 200 bytes written here (no
//! toolchain or busybox needed): `write(1, "capsid-bench: init\n")`, then
//! `reboot(LINUX_REBOOT_CMD_RESTART)`, which the backend turns into the VM
//! ending (`reboot=t`, QEMU `-no-reboot`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use capsid_sandbox::backend::{Backend, VmSpec};
use serde::Serialize;

/// What `/init` prints.
pub const INIT_MARKER: &str = "capsid-bench: init";
/// A bare boot that takes longer than this is stopped and counted failed.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// One bare boot, in ms since the backend was asked to start the VM.
#[derive(Debug, Clone, Serialize)]
pub struct BareSample {
    /// The backend's processes spawned.
    pub backend_spawned_ms: f64,
    /// `/init`'s marker seen on the console (kernel booted to `/init`).
    pub kernel_at_init_ms: Option<f64>,
    /// The VM ended (guest reboot) and its processes are reaped.
    pub vm_gone_ms: f64,
}

/// The `/init` program.
fn init_elf() -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const CODE_OFFSET: u64 = 64 + 56;
    let msg = format!("{INIT_MARKER}\n");
    let msg_len = u8::try_from(msg.len()).unwrap_or(u8::MAX);
    #[rustfmt::skip]
    let mut code: Vec<u8> = vec![
        0xb8, 0x01, 0x00, 0x00, 0x00,             // mov eax, 1 (write)
        0xbf, 0x01, 0x00, 0x00, 0x00,             // mov edi, 1
        0x48, 0x8d, 0x35, 0x1f, 0x00, 0x00, 0x00, // lea rsi, [rip + 31] (msg)
        0xba, msg_len, 0x00, 0x00, 0x00,          // mov edx, len
        0x0f, 0x05,                               // syscall
        0xb8, 0xa9, 0x00, 0x00, 0x00,             // mov eax, 169 (reboot)
        0xbf, 0xad, 0xde, 0xe1, 0xfe,             // mov edi, LINUX_REBOOT_MAGIC1
        0xbe, 0x69, 0x19, 0x12, 0x28,             // mov esi, LINUX_REBOOT_MAGIC2
        0xba, 0x67, 0x45, 0x23, 0x01,             // mov edx, LINUX_REBOOT_CMD_RESTART
        0x0f, 0x05,                               // syscall
        0xeb, 0xfe,                               // jmp $ (not reached)
    ];
    code.extend_from_slice(msg.as_bytes());
    let size = CODE_OFFSET + code.len() as u64;
    let mut elf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    // ELF header: 64-bit, little endian, SysV, executable, x86-64.
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    elf.extend_from_slice(&(BASE + CODE_OFFSET).to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
                                    // One PT_LOAD segment, R+X, mapping the whole file at BASE.
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&5u32.to_le_bytes());
    elf.extend_from_slice(&0u64.to_le_bytes());
    elf.extend_from_slice(&BASE.to_le_bytes());
    elf.extend_from_slice(&BASE.to_le_bytes());
    elf.extend_from_slice(&size.to_le_bytes());
    elf.extend_from_slice(&size.to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    elf.extend_from_slice(&code);
    elf
}

/// A newc cpio (uncompressed; the kernel takes it as it is) with /dev,
/// /dev/console (so `/init` has a console) and `/init`.
pub fn trivial_initramfs() -> Vec<u8> {
    let mut out = Vec::new();
    let mut ino = 1u32;
    let mut entry = |name: &str, mode: u32, data: &[u8], rdev: (u32, u32)| {
        let name_z = format!("{name}\0");
        let fields = [
            ino,
            mode,
            0,
            0,
            1,
            0,
            u32::try_from(data.len()).unwrap_or(0),
            0,
            0,
            rdev.0,
            rdev.1,
            u32::try_from(name_z.len()).unwrap_or(0),
            0,
        ];
        ino += 1;
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        out.extend_from_slice(name_z.as_bytes());
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
    };
    entry("dev", 0o040_755, &[], (0, 0));
    entry("dev/console", 0o020_600, &[], (5, 1));
    entry("init", 0o100_755, &init_elf(), (0, 0));
    entry("TRAILER!!!", 0, &[], (0, 0));
    out
}

/// Boots the backend's VM with `initramfs` (no disks) until it ends.
pub fn boot(backend: &Arc<dyn Backend>, base: &VmSpec, name: &str) -> anyhow::Result<BareSample> {
    let spec = VmSpec {
        name: name.into(),
        run_dir: base.run_dir.join(name),
        cgroup: None,
        ..base.clone()
    };
    let t0 = Instant::now();
    let ms = |at: Instant| at.saturating_duration_since(t0).as_secs_f64() * 1000.0;
    let mut vm = backend.start(&spec).context("bare boot")?;
    let spawned = ms(Instant::now());
    let console = spec.serial_log();
    let mut at_init = None;
    loop {
        if at_init.is_none() && console_has_marker(&console) {
            at_init = Some(ms(Instant::now()));
        }
        if vm.try_wait()?.is_some() {
            let gone = ms(Instant::now());
            return Ok(BareSample {
                backend_spawned_ms: spawned,
                kernel_at_init_ms: at_init,
                vm_gone_ms: gone,
            });
        }
        if t0.elapsed() > BOOT_TIMEOUT {
            let _ = vm.stop(Duration::from_secs(1));
            bail!("the bare VM did not end within {BOOT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn console_has_marker(path: &Path) -> bool {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).contains(INIT_MARKER))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_a_loadable_elf() {
        let elf = init_elf();
        assert_eq!(&elf[..4], b"\x7fELF");
        // e_entry points at the code right after the headers.
        let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
        assert_eq!(entry, 0x40_0000 + 120);
        // p_filesz covers the whole file.
        let filesz = u64::from_le_bytes(elf[64 + 32..64 + 40].try_into().unwrap());
        assert_eq!(filesz, elf.len() as u64);
        // The lea's displacement reaches the message.
        let code = &elf[120..];
        let disp = u32::from_le_bytes(code[13..17].try_into().unwrap()) as usize;
        assert!(code[17 + disp..].starts_with(INIT_MARKER.as_bytes()));
        assert_eq!(usize::from(code[18]), INIT_MARKER.len() + 1);
    }

    #[test]
    fn cpio_has_console_and_init() {
        let cpio = trivial_initramfs();
        assert!(cpio.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&cpio);
        assert!(text.contains("dev/console\0"));
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!\0"));
        assert_eq!(cpio.len() % 4, 0);
    }
}
