//! capsid-vmm's control socket and the ways a VM ends: pause/resume,
//! shutdown answered by the guest (Ctrl-Alt-Del on its keyboard), shutdown
//! ignored (the VMM ends it after the timeout), SIGTERM; and nothing left
//! behind afterwards.

use std::time::Duration;

use capsid_tests::asm::{self, LIB64};
use capsid_tests::vmm::Vmm;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(20);

/// Prints a dot every few million iterations, forever.
const TICKER: &str = r#"
    .text
    .global _start
_start:
    lea rdi, [rip + m_up]
    call puts
1:  mov ecx, 3000000
2:  pause
    dec ecx
    jnz 2b
    mov al, '.'
    call putc
    jmp 1b
m_up: .asciz "UP\n"
"#;

/// Waits for a key on the i8042 (status bit 0), reports it, then resets.
const KEYBOARD: &str = r#"
    .text
    .global _start
_start:
    lea rdi, [rip + m_up]
    call puts
1:  pause
    in al, 0x64
    test al, 1
    jz 1b
    in al, 0x60
    movzx rax, al
    push rax
    lea rdi, [rip + m_key]
    call puts
    pop rax
    call puthex
    call putnl
    call reset
m_up:  .asciz "UP\n"
m_key: .asciz "KEY "
"#;

fn start(source: &str, extra: serde_json::Value) -> Vmm {
    let dir = tempfile::tempdir().unwrap();
    let kernel = asm::elf(&format!("{source}{LIB64}"), dir.path(), "guest");
    let mut config = json!({
        "vcpus": 1,
        "memory_mib": 16,
        "boot": {"linux": {"kernel": kernel}},
    });
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    let mut vm = Vmm::start(config);
    vm.wait_serial("UP\n", TIMEOUT);
    // The kernel file may go now: the VMM has loaded it.
    drop(dir);
    vm
}

#[test]
fn pause_stops_the_guest_and_resume_lets_it_go_on() {
    let mut vm = start(TICKER, json!({}));
    vm.wait_serial("UP\n.", TIMEOUT);
    let r = vm.control(json!({"op": "pause"}));
    assert_eq!(r["ok"], true, "{r}");
    let paused = vm.serial().len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vm.serial().len(), paused, "the guest ran while paused");
    let r = vm.control(json!({"op": "resume"}));
    assert_eq!(r["ok"], true, "{r}");
    let deadline = std::time::Instant::now() + TIMEOUT;
    while vm.serial().len() <= paused {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest did not resume"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let m = vm.control(json!({"op": "metrics"}));
    assert!(
        m["vcpus"][0]["exits"]["interrupted"].as_u64().unwrap() >= 1,
        "{m}"
    );
}

#[test]
fn shutdown_presses_ctrl_alt_del() {
    let vm = start(KEYBOARD, json!({}));
    let r = vm.control(json!({"op": "shutdown", "timeout_ms": 5000}));
    assert_eq!(r["ok"], true, "{r}");
    let end = vm.wait(TIMEOUT);
    assert_eq!(end.code, 0, "{}", end.stderr);
    // Left Ctrl, make code, scancode set 1 (the controller translates).
    assert!(
        end.serial.contains("KEY 000000000000001d\n"),
        "{}",
        end.serial
    );
}

#[test]
fn shutdown_ignored_ends_the_vm_after_the_timeout() {
    let vm = start(TICKER, json!({}));
    let t = std::time::Instant::now();
    let r = vm.control(json!({"op": "shutdown", "timeout_ms": 300}));
    assert_eq!(r["ok"], true, "{r}");
    let end = vm.wait(TIMEOUT);
    assert_eq!(end.code, 4, "{}", end.stderr);
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(end.stderr.lines().count(), 1, "{}", end.stderr);
}

#[test]
fn sigterm_stops_the_vm_and_leaves_nothing_behind() {
    let sockets = tempfile::tempdir().unwrap();
    let uds = sockets.path().join("vsock.sock");
    let vm = start(
        TICKER,
        json!({"vsock": {"guest_cid": 3, "uds_path": uds}, "rng": true}),
    );
    let control = vm.control_path();
    assert!(uds.exists());
    assert!(control.exists());
    let status = std::process::Command::new("kill")
        .args(["-TERM", &vm.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let end = vm.wait(TIMEOUT);
    assert_eq!(end.code, 4, "{}", end.stderr);
    assert!(end.stderr.contains("stopped: signal 15"), "{}", end.stderr);
    let left: Vec<_> = std::fs::read_dir(sockets.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!control.exists());
}
