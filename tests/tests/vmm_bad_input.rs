//! capsid-vmm given bad input: a missing kernel, a file that is not a
//! kernel, memory below the kernel's needs, too many vCPUs, an unwritable
//! serial path, an unknown field. Each gives one clear error line, exit
//! status 1, and leaves no file behind.

use std::path::Path;
use std::process::Command;

use capsid_tests::asm::{self, LIB64};
use capsid_tests::{bin, run};
use serde_json::{json, Value};

/// Runs capsid-vmm on `config` in `dir` (serial log and control socket
/// there too) and returns (exit code, stderr).
fn vmm(dir: &Path, mut config: Value) -> (i32, String) {
    if config.get("serial").is_none() {
        config["serial"] = json!(dir.join("serial.log"));
    }
    config["control_socket"] = json!(dir.join("api.sock"));
    let path = dir.join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let (code, _, stderr) = run(Command::new(bin("capsid-vmm")).arg("--config").arg(&path));
    (code, stderr)
}

/// Asserts one error line naming `what`, status 1, and that `dir` holds
/// only the files the test put there.
fn refused(dir: &Path, config: Value, what: &str, keep: &[&str]) {
    let (code, stderr) = vmm(dir, config);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("capsid-vmm: "), "{stderr}");
    assert!(stderr.contains(what), "{stderr} (expected {what:?})");
    let mut left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "vm.json" && !keep.contains(&n.as_str()))
        .collect();
    left.sort();
    assert!(left.is_empty(), "left behind: {left:?} after: {stderr}");
}

fn kernel(dir: &Path) -> std::path::PathBuf {
    asm::elf(
        &format!(".text\n.global _start\n_start:\n call reset\n{LIB64}"),
        dir,
        "k",
    )
}

fn linux(kernel: &Path, memory_mib: u32, vcpus: u32) -> Value {
    json!({"vcpus": vcpus, "memory_mib": memory_mib, "boot": {"linux": {"kernel": kernel}}})
}

const ASM_FILES: &[&str] = &["k.s", "k.o", "k.ld", "k.elf"];

#[test]
fn missing_kernel() {
    let dir = tempfile::tempdir().unwrap();
    refused(
        dir.path(),
        linux(Path::new("/nonexistent/vmlinux"), 64, 1),
        "cannot read kernel /nonexistent/vmlinux",
        &[],
    );
}

#[test]
fn kernel_that_is_not_a_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"#!/bin/sh\necho not a kernel\n").unwrap();
    refused(
        dir.path(),
        linux(&junk, 64, 1),
        "is neither an x86-64 ELF vmlinux nor a bzImage",
        &["junk"],
    );
}

#[test]
fn memory_below_the_kernels_needs() {
    let dir = tempfile::tempdir().unwrap();
    // A kernel whose image reaches 40 MiB.
    let big = asm::elf(
        &format!(".text\n.global _start\n_start:\n call reset\n.skip 40 << 20\n{LIB64}"),
        dir.path(),
        "k",
    );
    refused(
        dir.path(),
        linux(&big, 16, 1),
        "the kernel needs at least 42 MiB of guest memory; the VM has 16 MiB",
        ASM_FILES,
    );
}

#[test]
fn initramfs_that_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let k = kernel(dir.path());
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, vec![0u8; 20 << 20]).unwrap();
    let mut config = linux(&k, 16, 1);
    config["boot"]["linux"]["initramfs"] = json!(initrd);
    let mut keep = ASM_FILES.to_vec();
    keep.push("initrd");
    refused(
        dir.path(),
        config,
        "with its initramfs needs at least",
        &keep,
    );
}

#[test]
fn too_many_vcpus() {
    let dir = tempfile::tempdir().unwrap();
    let k = kernel(dir.path());
    refused(
        dir.path(),
        linux(&k, 64, 33),
        "vcpus = 33 is not between 1 and 32",
        ASM_FILES,
    );
}

#[test]
fn unwritable_serial_path() {
    let dir = tempfile::tempdir().unwrap();
    let k = kernel(dir.path());
    let mut config = linux(&k, 64, 1);
    config["serial"] = json!("/nonexistent/dir/serial.log");
    refused(
        dir.path(),
        config,
        "cannot open serial console file /nonexistent/dir/serial.log",
        ASM_FILES,
    );
}

#[test]
fn unknown_field() {
    let dir = tempfile::tempdir().unwrap();
    let k = kernel(dir.path());
    let mut config = linux(&k, 64, 1);
    config["cpus"] = json!(2);
    refused(dir.path(), config, "unknown field `cpus`", ASM_FILES);
}

#[test]
fn missing_drive_image() {
    let dir = tempfile::tempdir().unwrap();
    let k = kernel(dir.path());
    let mut config = linux(&k, 64, 1);
    config["drives"] = json!([{"path": "/nonexistent/rootfs.img"}]);
    refused(dir.path(), config, "/nonexistent/rootfs.img", ASM_FILES);
}
