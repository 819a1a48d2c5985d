//! capsid-vmm's per-thread seccomp filters, on the real binary with tiny
//! guests under this machine's KVM (assembled when the test runs, with
//! GNU as and ld): with `--seccomp kill` (the default) a guest runs to its
//! end while every thread of the VMM is confined (`Seccomp: 2` in each
//! `/proc/<pid>/task/<tid>/status`), through control requests, pause, a
//! second vCPU kicked out of KVM_RUN, a virtio device driven to an
//! interrupt and the balloon giving memory back; the test-only
//! `test_forbidden_syscall` request gets the VMM killed with SIGSYS;
//! `--seccomp log` and `off` let it live, `off` with no filter at all.
//!
//! With `CAPSID_VMM_STRACE_DIR` set, every VMM runs under
//! `strace -f -qq -e trace=all -o <dir>/<test>`, and
//! `CAPSID_VMM_TEST_SECCOMP=log` makes `log` the default mode: how the
//! lists were checked (docs/security.md).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use capsid_vmm_api::control::TEST_CONTROL_ENV;
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(30);
const SIGSYS: i32 = 31;

/// Serial output helpers (64-bit code): `putc` (AL), `puts` (RDI),
/// `puthex` (RAX), `putsp`, `putnl`, `reset` (i8042 reset pulse).
const LIB64: &str = r#"
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
    .text 0x100000 : { *(.text*) *(.rodata*) *(.data*) }
    .bss : { *(.bss*) }
    /DISCARD/ : { *(.comment) *(.note.gnu*) *(.eh_frame*) }
}
"#;

/// Prints UP, then a dot now and then until a key arrives on the i8042
/// (Ctrl-Alt-Del from a `shutdown` request), then resets.
const KEYBOARD: &str = r#"
    .text
    .global _start
_start:
    lea rdi, [rip + m_up]
    call puts
1:  mov ecx, 100000
2:  pause
    dec ecx
    jnz 2b
    in al, 0x64
    test al, 1
    jnz 3f
    mov al, '.'
    call putc
    jmp 1b
3:  in al, 0x60
    lea rdi, [rip + m_key]
    call puts
    call reset
m_up:  .asciz "UP\n"
m_key: .asciz "KEY\n"
"#;

/// Drives virtio-rng (the first virtio-mmio device) as a driver does:
/// features, queue 0, DRIVER_OK (the device is activated on this vCPU),
/// one buffer posted and kicked (KVM's ioeventfd, the event loop), and the
/// interrupt waited for (the irqfd, GSI 5, vector 0x30).
const RNG_DRIVER: &str = r#"
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
    mov dword ptr [rbx + 0x070], 0
    mov dword ptr [rbx + 0x070], 1
    mov dword ptr [rbx + 0x070], 3
    mov dword ptr [rbx + 0x024], 1
    mov dword ptr [rbx + 0x020], 1
    mov dword ptr [rbx + 0x024], 0
    mov dword ptr [rbx + 0x020], 0
    mov dword ptr [rbx + 0x070], 0xb
    mov dword ptr [rbx + 0x030], 0
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
1:  cli
    cmp byte ptr [rip + got_irq], 1
    je 2f
    sti
    hlt
    jmp 1b
2:
    lea rdi, [rip + m_used]
    call puts
    mov eax, [USED + 8]
    call puthex
    call putnl
    call reset

handler:
    push rax
    push rcx
    push rdx
    push rdi
    mov rdi, MMIO
    mov eax, [rdi + 0x060]
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
m_used:   .asciz "USED "
    .data
got_irq: .byte 0
"#;

/// Touches 16 MiB, drives the balloon's inflate and deflate queues (page
/// frame arrays) following the target the test sets, and ends at a
/// target of 1 MiB.
const BALLOON_DRIVER: &str = r#"
    .equ MMIO, 0xd0000000
    .equ TOUCH, 0x2000000
    .equ TOUCH_LEN, 0x1000000
    .equ PFNS, 0x200000
    .equ NPAGES, 4096
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
    xor esi, esi
    mov edi, IQ
    call setup_queue
    mov esi, 1
    mov edi, DQ
    call setup_queue
    mov dword ptr [rbx + 0x070], 0xf
    mov rdi, PFNS
    mov eax, TOUCH >> 12
    mov ecx, NPAGES
1:  stosd
    inc eax
    dec ecx
    jnz 1b
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
4:  pause
    cmp dword ptr [rbx + 0x100], 256
    jne 4b
    call reset

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

/// Drives virtio-fs (served by virtiofsd over vhost-user): DRIVER_OK
/// hands the rings to virtiofsd from this vCPU (with a watchdog thread),
/// one FUSE_INIT is kicked straight to virtiofsd, its answer comes back as
/// an interrupt through the event loop; then a device reset takes the
/// rings back (from this vCPU again) before the guest resets.
const FS_DRIVER: &str = r#"
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
    mov dword ptr [rbx + 0x070], 0
    mov dword ptr [rbx + 0x070], 1
    mov dword ptr [rbx + 0x070], 3
    mov dword ptr [rbx + 0x024], 1
    mov dword ptr [rbx + 0x020], 1
    mov dword ptr [rbx + 0x024], 0
    mov dword ptr [rbx + 0x020], 0
    mov dword ptr [rbx + 0x070], 0xb
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
    lea rdi, [rip + m_status]
    call puts
    mov eax, [rbx + 0x070]
    call puthex
    call putnl

    mov rdi, REQ
    mov dword ptr [rdi], 104
    mov dword ptr [rdi + 4], 26
    mov qword ptr [rdi + 8], 0x1234
    mov dword ptr [rdi + 40], 7
    mov dword ptr [rdi + 44], 31
    mov dword ptr [rdi + 48], 0x20000
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
    lea rdi, [rip + m_reply]
    call puts
    mov eax, [REPLY + 4]
    call puthex
    call putsp
    mov eax, [REPLY + 16]
    call puthex
    call putnl
    # Device reset: the rings go back from virtiofsd.
    mov dword ptr [rbx + 0x070], 0
    mov eax, [rbx + 0x070]
    lea rdi, [rip + m_reset]
    call puts
    call reset

handler:
    push rax
    push rcx
    push rdx
    push rdi
    mov rdi, MMIO
    mov eax, [rdi + 0x060]
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
m_status: .asciz "STATUS "
m_reply:  .asciz "REPLY "
m_reset:  .asciz "RESET\n"
    .data
got_irq: .byte 0
"#;

fn tool(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (binutils is needed): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Assembles and links `source` (with [`LIB64`]) into an ELF "kernel".
fn guest(source: &str, dir: &Path) -> PathBuf {
    let src = dir.join("guest.s");
    let obj = dir.join("guest.o");
    let script = dir.join("guest.ld");
    let elf = dir.join("guest.elf");
    std::fs::write(&src, format!(".intel_syntax noprefix\n{source}\n{LIB64}\n")).unwrap();
    std::fs::write(&script, LINKER_SCRIPT).unwrap();
    tool(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src));
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
            .arg(&elf)
            .arg(&obj),
    );
    elf
}

/// A capsid-vmm process.
struct Vmm {
    child: Child,
    dir: tempfile::TempDir,
    /// Whether `child` is strace, capsid-vmm its child.
    traced: bool,
}

struct Options<'a> {
    source: &'a str,
    vcpus: u8,
    memory_mib: u32,
    extra: Value,
    seccomp: Option<&'a str>,
    env: &'a [(&'a str, &'a str)],
    trace_name: &'a str,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self {
            source: KEYBOARD,
            vcpus: 1,
            memory_mib: 16,
            extra: json!({}),
            seccomp: None,
            env: &[],
            trace_name: "vmm",
        }
    }
}

impl Vmm {
    fn start(o: Options<'_>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kernel = guest(o.source, dir.path());
        let mut config = json!({
            "vcpus": o.vcpus,
            "memory_mib": o.memory_mib,
            "boot": {"linux": {"kernel": kernel}},
            "serial": dir.path().join("serial.log"),
            "control_socket": dir.path().join("api.sock"),
        });
        for (k, v) in o.extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        let path = dir.path().join("vm.json");
        std::fs::write(&path, config.to_string()).unwrap();
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let vmm = env!("CARGO_BIN_EXE_capsid-vmm");
        let trace_dir = std::env::var_os("CAPSID_VMM_STRACE_DIR");
        let mut cmd = match &trace_dir {
            Some(trace_dir) => {
                let mut c = Command::new("strace");
                c.args(["-f", "-qq", "-e", "trace=all", "-o"])
                    .arg(Path::new(trace_dir).join(o.trace_name))
                    .arg(vmm);
                c
            }
            None => Command::new(vmm),
        };
        cmd.arg("--config").arg(&path);
        // CAPSID_VMM_TEST_SECCOMP (e.g. `log`, to make lists under
        // strace) replaces the default mode, not one a test asks for.
        let default_mode = std::env::var("CAPSID_VMM_TEST_SECCOMP").ok();
        if let Some(mode) = o.seccomp.or(default_mode.as_deref()) {
            cmd.args(["--seccomp", mode]);
        }
        let child = cmd
            .env_remove(TEST_CONTROL_ENV)
            .envs(o.env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Self {
            child,
            dir,
            traced: trace_dir.is_some(),
        }
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serial.log")).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    fn wait_serial(&mut self, text: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.serial().contains(text) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "capsid-vmm ended ({status}) before printing {text:?}\nserial:\n{}\nstderr:\n{}",
                    self.serial(),
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} within {TIMEOUT:?}\nserial:\n{}\nstderr:\n{}",
                self.serial(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// capsid-vmm's pid (strace's child when traced).
    fn pid(&self) -> u32 {
        let id = self.child.id();
        if !self.traced {
            return id;
        }
        let children = std::fs::read_to_string(format!("/proc/{id}/task/{id}/children")).unwrap();
        children.split_whitespace().next().unwrap().parse().unwrap()
    }

    fn connect(&self) -> UnixStream {
        UnixStream::connect(self.dir.path().join("api.sock")).unwrap()
    }

    /// One request; `None` when the connection closed without an answer.
    fn ask(&self, request: Value) -> Option<Value> {
        ask_on(&self.connect(), &request)
    }

    fn control(&self, request: Value) -> Value {
        self.ask(request.clone())
            .unwrap_or_else(|| panic!("no answer to {request}\nstderr:\n{}", self.stderr()))
    }

    fn wait(mut self) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.serial(), self.stderr());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "capsid-vmm did not end within {TIMEOUT:?}\nserial:\n{}\nstderr:\n{}",
                    self.serial(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Ends the KEYBOARD guest: Ctrl-Alt-Del, the guest resets.
    fn shut_down(self) {
        let r = self.control(json!({"op": "shutdown", "timeout_ms": 10000}));
        assert_eq!(r["ok"], true, "{r}");
        let (status, serial, stderr) = self.wait();
        assert_eq!(status.code(), Some(0), "{status}\n{stderr}");
        assert!(serial.contains("KEY\n"), "{serial}");
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn ask_on(stream: &UnixStream, request: &Value) -> Option<Value> {
    let mut line = request.to_string();
    line.push('\n');
    (&*stream).write_all(line.as_bytes()).ok()?;
    let mut answer = String::new();
    match BufReader::new(stream).read_line(&mut answer) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(serde_json::from_str(&answer).unwrap()),
    }
}

/// The `Seccomp:` mode of a task's status (0 none, 2 filter).
fn seccomp_mode(status_path: &Path) -> Option<u32> {
    let status = std::fs::read_to_string(status_path).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:\t"))
        .and_then(|v| v.trim().parse().ok())
}

/// Every thread of `pid`: (name, Seccomp mode).
fn threads(pid: u32) -> Vec<(String, Option<u32>)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        out.push((name.trim().to_string(), seccomp_mode(&task.join("status"))));
    }
    out.sort();
    out
}

/// Waits until every thread of `pid` (and the process) has mode `mode`
/// and the threads `names` exist; returns the threads seen.
fn wait_all_threads(pid: u32, mode: u32, names: &[&str]) -> Vec<(String, Option<u32>)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = threads(pid);
        let process = seccomp_mode(&PathBuf::from(format!("/proc/{pid}/status")));
        let all = seen.iter().all(|(_, m)| *m == Some(mode)) && process == Some(mode);
        let named = names.iter().all(|n| seen.iter().any(|(s, _)| s == n));
        if all && named {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "not every thread of {pid} has Seccomp {mode} (process: {process:?}), or a thread of \
             {names:?} is missing: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn every_thread_is_confined_and_the_guest_runs_to_its_end() {
    let sockets = tempfile::tempdir().unwrap();
    let mut vm = Vmm::start(Options {
        vcpus: 2,
        memory_mib: 64,
        extra: json!({
            "vsock": {"guest_cid": 3, "uds_path": sockets.path().join("v.sock")},
            "rng": true,
            "balloon": {"deflate_on_oom": true, "stats_polling_interval_s": 1},
        }),
        trace_name: "confined",
        ..Options::default()
    });
    vm.wait_serial("UP\n.");
    // A client connected keeps its control-client thread alive.
    let client = vm.connect();
    let m = ask_on(&client, &json!({"op": "metrics"})).unwrap();
    assert_eq!(m["ok"], true, "{m}");
    let seen = wait_all_threads(
        vm.pid(),
        2,
        &[
            "capsid-vmm",
            "vcpu0",
            "vcpu1",
            "devices",
            "control",
            "control-client",
            "signals",
        ],
    );
    eprintln!("threads: {seen:?}");

    // The main thread's work under its filter: pause (vCPUs kicked out
    // of KVM_RUN, the second one never started by the guest), resume,
    // the balloon (a config-change interrupt, a statistics request).
    let r = ask_on(&client, &json!({"op": "pause"})).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let paused = vm.serial().len();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(vm.serial().len(), paused, "the guest ran while paused");
    let r = ask_on(&client, &json!({"op": "resume"})).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let r = ask_on(&client, &json!({"op": "balloon_set", "target_mib": 8})).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let r = ask_on(&client, &json!({"op": "balloon_stats"})).unwrap();
    assert_eq!(r["target_mib"], 8, "{r}");
    // A host connection to vsock's socket (the device is not active: the
    // guest has no driver; the listener is there all the same).
    let _host = UnixStream::connect(sockets.path().join("v.sock")).unwrap();
    // Bad requests, a line too long.
    let r = ask_on(&client, &json!({"op": "explode"})).unwrap();
    assert_eq!(r["ok"], false, "{r}");
    drop(client);
    wait_all_threads(vm.pid(), 2, &[]);
    vm.shut_down();
    // Both sockets removed by the main thread under its filter.
    assert_eq!(std::fs::read_dir(sockets.path()).unwrap().count(), 0);
}

#[test]
fn sigterm_ends_a_confined_vmm() {
    let mut vm = Vmm::start(Options {
        trace_name: "sigterm",
        ..Options::default()
    });
    vm.wait_serial("UP\n");
    wait_all_threads(vm.pid(), 2, &["signals"]);
    // SAFETY: kill(2) on the VMM this test started; no memory involved.
    let rc = unsafe { libc::kill(vm.pid() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let (status, _, stderr) = vm.wait();
    assert_eq!(status.code(), Some(4), "{status}\n{stderr}");
    assert!(stderr.contains("stopped: signal 15"), "{stderr}");
}

#[test]
fn a_virtio_device_works_under_the_filters() {
    let mut vm = Vmm::start(Options {
        source: RNG_DRIVER,
        extra: json!({"rng": true}),
        trace_name: "rng",
        ..Options::default()
    });
    vm.wait_serial("USED ");
    let (status, serial, stderr) = vm.wait();
    assert_eq!(status.code(), Some(0), "{status}\n{stderr}");
    // DRIVER_OK stuck, and the device wrote its 16 random bytes.
    assert!(serial.starts_with("000000000000000f\n"), "{serial}");
    assert!(serial.contains("USED 0000000000000010\n"), "{serial}");
}

#[test]
fn the_balloon_gives_memory_back_under_the_filters() {
    let mut vm = Vmm::start(Options {
        source: BALLOON_DRIVER,
        memory_mib: 64,
        extra: json!({"balloon": {"deflate_on_oom": true, "free_page_reporting": true}}),
        trace_name: "balloon",
        ..Options::default()
    });
    vm.wait_serial("TOUCHED\n");
    let r = vm.control(json!({"op": "balloon_set", "target_mib": 16}));
    assert_eq!(r["ok"], true, "{r}");
    vm.wait_serial("INFLATED\n");
    let r = vm.control(json!({"op": "balloon_stats"}));
    assert_eq!(r["counters"]["inflated_pages"], 4096, "{r}");
    let r = vm.control(json!({"op": "balloon_set", "target_mib": 0}));
    assert_eq!(r["ok"], true, "{r}");
    vm.wait_serial("DEFLATED\n");
    let r = vm.control(json!({"op": "balloon_set", "target_mib": 1}));
    assert_eq!(r["ok"], true, "{r}");
    let (status, _, stderr) = vm.wait();
    assert_eq!(status.code(), Some(0), "{status}\n{stderr}");
}

/// virtiofsd (`make deps` installs it), started on `socket`, serving `shared`.
struct Virtiofsd(Child);

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn virtio_fs_works_under_the_filters() {
    const VIRTIOFSD: &str = "/usr/local/bin/virtiofsd";
    assert!(
        Path::new(VIRTIOFSD).exists(),
        "{VIRTIOFSD} is not installed: run `make deps`"
    );
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("share");
    std::fs::create_dir(&shared).unwrap();
    let socket = dir.path().join("virtiofsd.sock");
    let mut daemon = Virtiofsd(
        Command::new(VIRTIOFSD)
            .arg("--shared-dir")
            .arg(&shared)
            .arg("--socket-path")
            .arg(&socket)
            .args(["--sandbox", "namespace", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(daemon.0.try_wait().unwrap().is_none(), "virtiofsd died");
        assert!(Instant::now() < deadline, "no virtiofsd socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    let vm = Vmm::start(Options {
        source: FS_DRIVER,
        memory_mib: 32,
        extra: json!({"fs": {"socket": socket, "tag": "capsid"}}),
        trace_name: "fs",
        ..Options::default()
    });
    let (status, serial, stderr) = vm.wait();
    assert_eq!(status.code(), Some(0), "{status}\n{serial}\n{stderr}");
    assert!(
        serial.contains("STATUS 000000000000000f\n"),
        "{serial}\n{stderr}"
    );
    // FUSE_INIT answered: error 0, major 7; then the reset went through.
    assert!(
        serial.contains("REPLY 0000000000000000 0000000000000007\nRESET\n"),
        "{serial}\n{stderr}"
    );
    assert!(!stderr.contains("vhost-user"), "{stderr}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while daemon.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "virtiofsd outlived the VMM");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_forbidden_syscall_kills_the_vmm_with_sigsys() {
    let mut vm = Vmm::start(Options {
        env: &[(TEST_CONTROL_ENV, "1")],
        trace_name: "forbidden",
        ..Options::default()
    });
    vm.wait_serial("UP\n");
    wait_all_threads(vm.pid(), 2, &["control"]);
    let answer = vm.ask(json!({"op": "test_forbidden_syscall"}));
    assert_eq!(answer, None, "the VMM answered instead of dying");
    let (status, _, stderr) = vm.wait();
    if vm_traced() {
        // strace reports its tracee's death as its own exit status.
        assert_eq!(status.code(), Some(128 + SIGSYS), "{status}\n{stderr}");
    } else {
        assert_eq!(status.signal(), Some(SIGSYS), "{status}\n{stderr}");
    }
}

fn vm_traced() -> bool {
    std::env::var_os("CAPSID_VMM_STRACE_DIR").is_some()
}

#[test]
fn the_forbidden_syscall_request_needs_the_test_variable() {
    let mut vm = Vmm::start(Options {
        trace_name: "refused",
        ..Options::default()
    });
    vm.wait_serial("UP\n");
    let r = vm.control(json!({"op": "test_forbidden_syscall"}));
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains(TEST_CONTROL_ENV),
        "{r}"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(vm.child.try_wait().unwrap().is_none(), "the VMM ended");
    let r = vm.control(json!({"op": "metrics"}));
    assert_eq!(r["ok"], true, "{r}");
    vm.shut_down();
}

#[test]
fn seccomp_log_lets_the_forbidden_syscall_through() {
    let mut vm = Vmm::start(Options {
        seccomp: Some("log"),
        env: &[(TEST_CONTROL_ENV, "1")],
        trace_name: "log",
        ..Options::default()
    });
    vm.wait_serial("UP\n");
    wait_all_threads(vm.pid(), 2, &["vcpu0", "devices", "control", "signals"]);
    let r = vm.control(json!({"op": "test_forbidden_syscall"}));
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("not stopped by a seccomp filter"),
        "{r}"
    );
    vm.shut_down();
}

#[test]
fn seccomp_off_installs_no_filter() {
    let mut vm = Vmm::start(Options {
        seccomp: Some("off"),
        env: &[(TEST_CONTROL_ENV, "1")],
        trace_name: "off",
        ..Options::default()
    });
    vm.wait_serial("UP\n");
    let client = vm.connect();
    let m = ask_on(&client, &json!({"op": "metrics"})).unwrap();
    assert_eq!(m["ok"], true, "{m}");
    let seen = wait_all_threads(
        vm.pid(),
        0,
        &["vcpu0", "devices", "control", "control-client", "signals"],
    );
    assert!(seen.iter().all(|(_, m)| *m == Some(0)), "{seen:?}");
    let r = ask_on(&client, &json!({"op": "test_forbidden_syscall"})).unwrap();
    assert_eq!(r["ok"], false, "{r}");
    drop(client);
    let stderr = vm.stderr();
    assert_eq!(stderr.matches("seccomp is off").count(), 1, "{stderr}");
    vm.shut_down();
}

#[test]
fn an_unknown_mode_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_capsid-vmm"))
        .args(["--config", "/nonexistent.json", "--seccomp", "sometimes"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--seccomp"), "{stderr}");
}
