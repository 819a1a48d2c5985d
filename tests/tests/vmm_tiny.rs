//! capsid-vmm with tiny purpose-built guests: real KVM, a few bytes of code.

use std::process::Command;

use capsid_tests::{bin, run};

/// Real mode at 0:0x1000 — prints "OK\n" on COM1, then pulses the i8042
/// reset line:
/// ```text
///   mov dx, 0x3f8      ba f8 03
///   mov al, 'O'        b0 4f
///   out dx, al         ee
///   mov al, 'K'        b0 4b
///   out dx, al         ee
///   mov al, 0x0a       b0 0a
///   out dx, al         ee
///   mov al, 0xfe       b0 fe
///   out 0x64, al       e6 64
///   hlt                f4
/// ```
const HELLO_AND_RESET: &[u8] = &[
    0xba, 0xf8, 0x03, 0xb0, b'O', 0xee, 0xb0, b'K', 0xee, 0xb0, 0x0a, 0xee, 0xb0, 0xfe, 0xe6, 0x64,
    0xf4,
];

fn vmm_with_guest(guest: &[u8], extra_config: &str) -> (i32, String, String) {
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

#[test]
fn real_mode_guest_prints_and_resets() {
    let (code, serial, stderr) = vmm_with_guest(HELLO_AND_RESET, "");
    assert_eq!(serial, "OK\n", "{stderr}");
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn triple_fault_is_a_guest_crash() {
    // `int3` with an empty real-mode IVT at 0 jumps to 0:0 (zeroed memory:
    // `add [bx+si], al` forever)... so instead load a bogus IDT and fault:
    //   lidt [0x1010]      0f 01 1e 10 10
    //   int3               cc
    // with a zero-limit IDT descriptor at 0x1010: every exception escalates
    // to a triple fault.
    let mut guest = vec![0x0f, 0x01, 0x1e, 0x10, 0x10, 0xcc];
    guest.resize(0x10, 0x90);
    guest.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let (code, _, stderr) = vmm_with_guest(&guest, "");
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("guest crashed"), "{stderr}");
}

#[test]
fn bad_config_is_one_clear_error() {
    let (code, _, stderr) = vmm_with_guest(HELLO_AND_RESET, r#""cpus":2,"#);
    assert_eq!(code, 1);
    assert!(stderr.contains("unknown field `cpus`"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn missing_image_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vm.json");
    std::fs::write(
        &config,
        r#"{"vcpus":1,"memory_mib":16,"boot":{"real_mode":{"image":"/nonexistent/g.bin","load_addr":4096}}}"#,
    )
    .unwrap();
    let (code, _, stderr) = run(Command::new(bin("capsid-vmm")).arg("--config").arg(&config));
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent/g.bin"), "{stderr}");
}
