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

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use capsid_tests::asm::VIRTIO64;
use capsid_tests::vmm::{self, Ended, Launch, Virtiofsd, Vmm};
use capsid_tests::{bin, run};
use capsid_vmm_api::control::TEST_CONTROL_ENV;
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(30);
const SIGSYS: i32 = nix::sys::signal::Signal::SIGSYS as i32;

/// Prints UP, then a dot now and then until a key arrives on the i8042
/// (Ctrl-Alt-Del from a `shutdown` request), then resets.
const KEYBOARD: &str = r#"
    .text
    .global _start
_start:
    report m_up
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
    report m_key
    call reset
m_up:  .asciz "UP"
m_key: .asciz "KEY"
"#;

/// `irq_driver`, for a driver of the virtio-mmio device at MMIO that
/// takes its interrupts (GSI 5, at vector 0x30: the byte `got_irq` set):
/// VIRTIO_F_VERSION_1 negotiated, RBX = MMIO.
const IRQ_DRIVER: &str = r#"
    .macro irq_driver
    irq_route irq_handler, 5, 0x30, 0x12000
    mov rbx, MMIO
    virtio_modern
    .pushsection .text.irq
irq_handler:
    virtio_irq_handler MMIO, got_irq
    .section .data
got_irq: .byte 0
    .popsection
    .endm
"#;

/// Drives virtio-rng (the first virtio-mmio device) as a driver does:
/// features, queue 0, DRIVER_OK (the device is activated on this vCPU),
/// one buffer posted and kicked (KVM's ioeventfd, the event loop), and the
/// interrupt waited for (the irqfd, GSI 5, vector 0x30).
const RNG_DRIVER: &str = r#"
    .equ MMIO, 0xd0000000
    .equ DESC, 0x30000
    .equ AVAIL, 0x31000
    .equ USED, 0x32000
    .equ BUF, 0x40000

    .text
    .global _start
_start:
    irq_driver
    virtio_queue 0, 8, DESC, AVAIL, USED
    virtio_status 0xf
    mov eax, [rbx + 0x070]
    call puthex
    call putnl

    # One 16-byte device-writable buffer.
    virtio_desc DESC, 0, BUF, 16, 2
    virtio_kick 0, AVAIL
    wait_flag got_irq
    report m_used, [USED+8]
    call reset

m_used: .asciz "USED"
"#;

/// Touches 16 MiB, drives the balloon's inflate and deflate queues (page
/// frame arrays) following the target the test sets, and ends at a
/// target of 1 MiB.
const BALLOON_DRIVER: &str = r#"
    .equ MMIO, 0xd0000000
    .equ TOUCH, 0x2000000
    .equ TOUCH_LEN, 0x1000000
    .equ NPAGES, 4096
    .equ IQ, 0x30000
    .equ DQ, 0x34000

    # Waits until the target (pages, config offset 0) is no longer
    # unlike `pages` by `jcc`.
    # Writes to every byte of the touched range.
    .macro touch
    mov rdi, TOUCH
    mov rcx, TOUCH_LEN / 8
    mov rax, 0x0101010101010101
    rep stosq
    .endm

    .macro wait_target jcc, pages
target\@:
    pause
    cmp dword ptr [rbx + 0x100], \pages
    \jcc target\@
    .endm

    # Posts the frame array on `queue` (rings one page apart from
    # `rings`), waits until the device has used it and reports `actual`.
    .macro post_pfns queue, rings, actual
    virtio_desc \rings, 0, pfns, NPAGES*4, 0
    virtio_kick \queue, \rings+0x1000
used\@:
    pause
    cmp word ptr [\rings + 0x2002], 1
    jne used\@
    mov dword ptr [rbx + 0x104], \actual
    .endm

    .text
    .global _start
_start:
    touch
    report m_touched
    mov rbx, MMIO
    virtio_modern
    virtio_queue 0, 4, IQ, IQ+0x1000, IQ+0x2000
    virtio_queue 1, 4, DQ, DQ+0x1000, DQ+0x2000
    virtio_status 0xf
    # A target: inflate.
    wait_target je, 0
    post_pfns 0, IQ, NPAGES
    report m_inflated
    # The target back at 0: deflate, touch again.
    wait_target jne, 0
    post_pfns 1, DQ, 0
    touch
    report m_deflated
    # A target of 1 MiB (256 pages) is the signal to end.
    wait_target jne, 256
    call reset

m_touched:  .asciz "TOUCHED"
m_inflated: .asciz "INFLATED"
m_deflated: .asciz "DEFLATED"

# The frame numbers of the touched range.
    .p2align 2
pfns:
    .set pfn, TOUCH >> 12
    .rept NPAGES
    .long pfn
    .set pfn, pfn + 1
    .endr
"#;

/// Drives virtio-fs (served by virtiofsd over vhost-user): DRIVER_OK
/// hands the rings to virtiofsd from this vCPU (with a watchdog thread),
/// one FUSE_INIT is kicked straight to virtiofsd, its answer comes back as
/// an interrupt through the event loop; then a device reset takes the
/// rings back (from this vCPU again) before the guest resets.
const FS_DRIVER: &str = r#"
    .equ MMIO, 0xd0000000
    .equ Q0, 0x30000
    .equ Q1, 0x34000
    .equ REPLY, 0x41000

    .text
    .global _start
_start:
    irq_driver
    # hiprio (0) and the request queue (1): rings one page apart.
    virtio_queue 0, 8, Q0, Q0+0x1000, Q0+0x2000
    virtio_queue 1, 8, Q1, Q1+0x1000, Q1+0x2000
    virtio_status 0xf
    report m_status, [rbx+0x070]

    # FUSE_INIT on the request queue: the request readable, the reply
    # writable.
    virtio_desc Q1, 0, fuse_init, 104, 1, 1
    virtio_desc Q1, 1, REPLY, 4096, 2
    virtio_kick 1, Q1+0x1000
    wait_flag got_irq
    report m_reply, [REPLY+4], [REPLY+16]
    # Device reset: the rings go back from virtiofsd.
    virtio_status 0
    mov eax, [rbx + 0x070]
    report m_reset
    call reset

m_status: .asciz "STATUS"
m_reply:  .asciz "REPLY"
m_reset:  .asciz "RESET"

# FUSE_INIT 7.31: fuse_in_header (len, opcode, unique, nodeid, uid,
# gid, pid, padding), fuse_init_in (major, minor, max_readahead, flags,
# the rest zero): 104 bytes.
fuse_init:
    .long 104, 26
    .quad 0x1234, 0
    .long 0, 0, 0, 0
    .long 7, 31, 0x20000, 0
    .fill 48, 1, 0
"#;

/// How a test's VMM runs.
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

/// Starts capsid-vmm on `o.source` (with the virtio macros), under strace
/// when `CAPSID_VMM_STRACE_DIR` is set, without the test-control variable
/// unless `o.env` sets it.
fn start(o: Options<'_>) -> Vmm {
    let mut config = json!({"vcpus": o.vcpus, "memory_mib": o.memory_mib});
    for (k, v) in o.extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    let mut launch = Launch {
        env_remove: vec![TEST_CONTROL_ENV.into()],
        env: o
            .env
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        ..Launch::default()
    };
    if let Some(dir) = std::env::var_os("CAPSID_VMM_STRACE_DIR") {
        let trace = Path::new(&dir).join(o.trace_name);
        let strace = ["strace", "-f", "-qq", "-e", "trace=all", "-o"];
        launch.wrapper = strace.iter().map(Into::into).collect();
        launch.wrapper.push(trace.into());
    }
    // CAPSID_VMM_TEST_SECCOMP (e.g. `log`, to make lists under strace)
    // replaces the default mode, not one a test asks for.
    let default_mode = std::env::var("CAPSID_VMM_TEST_SECCOMP").ok();
    if let Some(mode) = o.seccomp.or(default_mode.as_deref()) {
        launch.args = vec!["--seccomp".into(), mode.into()];
    }
    let source = format!("{VIRTIO64}{IRQ_DRIVER}{}", o.source);
    Vmm::start_tiny(&source, config, &launch)
}

/// Starts `o`'s guest (KEYBOARD by default) and waits for its UP.
fn start_up(o: Options<'_>) -> Vmm {
    let mut vm = start(o);
    vm.wait_serial("UP\n", TIMEOUT);
    vm
}

/// The KEYBOARD guest in `seccomp` mode (the default: `None`), allowed
/// the test-only `test_forbidden_syscall` request.
fn forbidding<'a>(seccomp: Option<&'a str>, trace_name: &'a str) -> Options<'a> {
    Options {
        seccomp,
        env: &[(TEST_CONTROL_ENV, "1")],
        trace_name,
        ..Options::default()
    }
}

fn traced() -> bool {
    std::env::var_os("CAPSID_VMM_STRACE_DIR").is_some()
}

/// Asserts a control answer says `ok` and returns it.
fn ok(answer: Value) -> Value {
    assert_eq!(answer["ok"], true, "{answer}");
    answer
}

/// Asserts a control answer refuses the request and returns its error.
fn refused(answer: &Value) -> &str {
    assert_eq!(answer["ok"], false, "{answer}");
    answer["error"].as_str().unwrap_or_default()
}

/// One request on an open connection; it must be answered.
fn ask(client: &UnixStream, request: Value) -> Value {
    vmm::ask(client, &request).unwrap_or_else(|| panic!("no answer to {request}"))
}

/// Waits for the VMM to end; asserts it ended with `code`.
fn ends_with(vm: Vmm, code: i32) -> Ended {
    let end = vm.wait(TIMEOUT);
    assert_eq!(end.code, code, "{end:?}");
    end
}

/// Ends the KEYBOARD guest: Ctrl-Alt-Del, the guest resets.
fn shut_down(vm: Vmm) {
    ok(vm.control(json!({"op": "shutdown", "timeout_ms": 10000})));
    let end = ends_with(vm, 0);
    assert!(end.serial.contains("KEY\n"), "{}", end.serial);
}

/// The `Seccomp:` mode of a /proc status (0 none, 2 filter).
fn seccomp_mode(value: Option<String>) -> Option<u32> {
    value?.parse().ok()
}

/// Waits until every thread of `pid` (and the process) has mode `mode`
/// and the threads `names` exist; returns the threads seen.
fn wait_all_threads(pid: u32, mode: u32, names: &[&str]) -> Vec<(String, Option<u32>)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen: Vec<_> = vmm::thread_fields(pid, "Seccomp")
            .into_iter()
            .map(|(name, value)| (name, seccomp_mode(value)))
            .collect();
        let status = format!("/proc/{pid}/status");
        let process = seccomp_mode(vmm::status_field(Path::new(&status), "Seccomp"));
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
    let mut vm = start(Options {
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
    vm.wait_serial("UP\n.", TIMEOUT);
    // A client connected keeps its control-client thread alive.
    let client = vm.connect();
    ok(ask(&client, json!({"op": "metrics"})));
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
    ok(ask(&client, json!({"op": "pause"})));
    let paused = vm.serial().len();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(vm.serial().len(), paused, "the guest ran while paused");
    ok(ask(&client, json!({"op": "resume"})));
    ok(ask(&client, json!({"op": "balloon_set", "target_mib": 8})));
    let r = ask(&client, json!({"op": "balloon_stats"}));
    assert_eq!(r["target_mib"], 8, "{r}");
    // A host connection to vsock's socket (the device is not active: the
    // guest has no driver; the listener is there all the same).
    let _host = UnixStream::connect(sockets.path().join("v.sock")).unwrap();
    // Bad requests, a line too long.
    refused(&ask(&client, json!({"op": "explode"})));
    drop(client);
    wait_all_threads(vm.pid(), 2, &[]);
    shut_down(vm);
    // Both sockets removed by the main thread under its filter.
    assert_eq!(std::fs::read_dir(sockets.path()).unwrap().count(), 0);
}

#[test]
fn sigterm_ends_a_confined_vmm() {
    let vm = start_up(Options {
        trace_name: "sigterm",
        ..Options::default()
    });
    wait_all_threads(vm.pid(), 2, &["signals"]);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(vm.pid()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let end = ends_with(vm, 4);
    assert!(end.stderr.contains("stopped: signal 15"), "{}", end.stderr);
}

#[test]
fn a_virtio_device_works_under_the_filters() {
    let mut vm = start(Options {
        source: RNG_DRIVER,
        extra: json!({"rng": true}),
        trace_name: "rng",
        ..Options::default()
    });
    vm.wait_serial("USED ", TIMEOUT);
    let serial = ends_with(vm, 0).serial;
    // DRIVER_OK stuck, and the device wrote its 16 random bytes.
    assert!(serial.starts_with("000000000000000f\n"), "{serial}");
    assert!(serial.contains("USED 0000000000000010\n"), "{serial}");
}

#[test]
fn the_balloon_gives_memory_back_under_the_filters() {
    let mut vm = start(Options {
        source: BALLOON_DRIVER,
        memory_mib: 64,
        extra: json!({"balloon": {"deflate_on_oom": true, "free_page_reporting": true}}),
        trace_name: "balloon",
        ..Options::default()
    });
    vm.wait_serial("TOUCHED\n", TIMEOUT);
    ok(vm.control(json!({"op": "balloon_set", "target_mib": 16})));
    vm.wait_serial("INFLATED\n", TIMEOUT);
    let r = vm.control(json!({"op": "balloon_stats"}));
    assert_eq!(r["counters"]["inflated_pages"], 4096, "{r}");
    ok(vm.control(json!({"op": "balloon_set", "target_mib": 0})));
    vm.wait_serial("DEFLATED\n", TIMEOUT);
    ok(vm.control(json!({"op": "balloon_set", "target_mib": 1})));
    ends_with(vm, 0);
}

#[test]
fn virtio_fs_works_under_the_filters() {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, socket) = Virtiofsd::share_new_dir(dir.path());
    let vm = start(Options {
        source: FS_DRIVER,
        memory_mib: 32,
        extra: json!({"fs": {"socket": socket, "tag": "capsid"}}),
        trace_name: "fs",
        ..Options::default()
    });
    let Ended { serial, stderr, .. } = ends_with(vm, 0);
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
    assert!(
        daemon.ends_within(Duration::from_secs(5)),
        "virtiofsd outlived the VMM"
    );
}

#[test]
fn a_forbidden_syscall_kills_the_vmm_with_sigsys() {
    let vm = start_up(forbidding(None, "forbidden"));
    wait_all_threads(vm.pid(), 2, &["control"]);
    let answer = vm.ask(&json!({"op": "test_forbidden_syscall"}));
    assert_eq!(answer, None, "the VMM answered instead of dying");
    let end = vm.wait(TIMEOUT);
    if traced() {
        // strace reports its tracee's death as its own: an exit status,
        // or, as strace 6.1 does, the same signal raised on itself.
        let strace_died = end.code == 128 + SIGSYS || end.signal == Some(SIGSYS);
        assert!(strace_died, "{end:?}");
    } else {
        assert_eq!(end.signal, Some(SIGSYS), "{end:?}");
    }
}

#[test]
fn the_forbidden_syscall_request_needs_the_test_variable() {
    let mut vm = start_up(Options {
        trace_name: "refused",
        ..Options::default()
    });
    let r = vm.control(json!({"op": "test_forbidden_syscall"}));
    assert!(refused(&r).contains(TEST_CONTROL_ENV), "{r}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(vm.child.try_wait().unwrap().is_none(), "the VMM ended");
    ok(vm.control(json!({"op": "metrics"})));
    shut_down(vm);
}

#[test]
fn seccomp_log_lets_the_forbidden_syscall_through() {
    let vm = start_up(forbidding(Some("log"), "log"));
    wait_all_threads(vm.pid(), 2, &["vcpu0", "devices", "control", "signals"]);
    let r = vm.control(json!({"op": "test_forbidden_syscall"}));
    assert!(
        refused(&r).contains("not stopped by a seccomp filter"),
        "{r}"
    );
    shut_down(vm);
}

#[test]
fn seccomp_off_installs_no_filter() {
    let vm = start_up(forbidding(Some("off"), "off"));
    let client = vm.connect();
    ok(ask(&client, json!({"op": "metrics"})));
    let seen = wait_all_threads(
        vm.pid(),
        0,
        &["vcpu0", "devices", "control", "control-client", "signals"],
    );
    assert!(seen.iter().all(|(_, m)| *m == Some(0)), "{seen:?}");
    refused(&ask(&client, json!({"op": "test_forbidden_syscall"})));
    drop(client);
    let stderr = vm.stderr();
    assert_eq!(stderr.matches("seccomp is off").count(), 1, "{stderr}");
    shut_down(vm);
}

#[test]
fn an_unknown_mode_is_refused() {
    let mut vmm = Command::new(bin("capsid-vmm"));
    vmm.args(["--config", "/nonexistent.json"])
        .args(["--seccomp", "sometimes"]);
    let (code, _, stderr) = run(&mut vmm);
    assert_eq!(code, 2);
    assert!(stderr.contains("--seccomp"), "{stderr}");
}
