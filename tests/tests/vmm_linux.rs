//! A real Linux boot under capsid-vmm: the guest kernel from
//! kernel-config/ with capsid's initramfs, whose agent starts, finds no
//! host on vsock and reboots, which ends the VMM with status 0.
//!
//! It runs wherever `capsid check` finds hardware-assisted KVM. Elsewhere
//! (a PVM host, as on capsid's CI machines, where no VMM can boot a
//! standard kernel) it says so on stderr, uncaptured, and checks what can
//! be checked: that capsid-vmm loads this kernel and enters it.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use capsid_sandbox::check::probe_kvm;
use capsid_tests::artifact;
use capsid_tests::vmm::Vmm;
use serde_json::json;

fn config(kernel: &str, vsock_dir: &Path) -> serde_json::Value {
    json!({
        "vcpus": 2,
        "memory_mib": 256,
        "boot": {"linux": {
            "kernel": artifact(kernel),
            "initramfs": artifact("initramfs.cpio.gz"),
            "cmdline": "quiet",
        }},
        "vsock": {"guest_cid": 3, "uds_path": vsock_dir.join("vsock.sock")},
        "rng": true,
        "balloon": {"deflate_on_oom": true, "free_page_reporting": true},
    })
}

/// Says `text` on the real stderr, past the test harness's capture.
fn say(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

fn boots_to_agent(kernel: &str) {
    let dir = tempfile::tempdir().unwrap();
    let kvm = probe_kvm(Path::new("/dev/kvm"));
    if !kvm.runs_standard_guests() {
        say(&format!(
            "vmm_linux ({kernel}): this host cannot run standard guests under KVM \
             (flavor {:?}{}); the real Linux boot under capsid-vmm is not attempted here. \
             Checking that capsid-vmm loads and enters the kernel instead.",
            kvm.flavor,
            kvm.error
                .as_deref()
                .map(|e| format!(", {e}"))
                .unwrap_or_default()
        ));
        let vm = Vmm::start(config(kernel, dir.path()));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let m = vm.control(json!({"op": "metrics"}));
            if m["first_kvm_run_monotonic_ns"].as_u64().is_some() {
                assert_eq!(m["devices"].as_array().unwrap().len(), 3, "{m}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no KVM_RUN: {m}");
            std::thread::sleep(Duration::from_millis(10));
        }
        let r = vm.control(json!({"op": "shutdown", "timeout_ms": 100}));
        assert_eq!(r["ok"], true, "{r}");
        let end = vm.wait(Duration::from_secs(20));
        // The kernel has no keyboard driver: the VMM ends it.
        assert!(matches!(end.code, 0 | 3 | 4), "{}", end.stderr);
        return;
    }
    let vm = Vmm::start(config(kernel, dir.path()));
    let end = vm.wait(Duration::from_secs(60));
    assert!(
        end.serial.contains("capsid-agent: ready version="),
        "no agent marker on the console of {kernel}:\n{}\n{}",
        end.serial,
        end.stderr
    );
    assert!(!end.serial.contains("Kernel panic"), "{}", end.serial);
    assert_eq!(
        end.code, 0,
        "the guest did not end by reboot:\n{}\n{}",
        end.serial, end.stderr
    );
}

#[test]
fn vmlinux_boots_to_the_agent_through_pvh() {
    boots_to_agent("kernel/vmlinux");
}

#[test]
fn bzimage_boots_to_the_agent() {
    boots_to_agent("kernel/bzImage");
}
