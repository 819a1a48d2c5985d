//! `capsid check` on this host: the report matches what the host is, and
//! the backend follows from it.

use std::path::Path;
use std::process::Command;

use capsid_tests::{artifact, bin, run};

fn config_file(dir: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    let text = format!(
        "[paths]\nkernel = \"{}\"\nbzimage = \"{}\"\ninitramfs = \"{}\"\nvmm = \"{}\"\nvhost = \"{}\"\n{extra}",
        artifact("kernel/vmlinux").display(),
        artifact("kernel/bzImage").display(),
        artifact("initramfs.cpio.gz").display(),
        bin("capsid-vmm").display(),
        bin("capsid-vhost").display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn check(config: &Path, json: bool) -> (i32, String, String) {
    let mut cmd = Command::new(bin("capsid"));
    cmd.arg("--config").arg(config).arg("check");
    if json {
        cmd.arg("--json");
    }
    run(&mut cmd)
}

#[test]
fn json_report_matches_this_host() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = check(&config_file(dir.path(), ""), true);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let kvm_dev = Path::new("/dev/kvm").exists();

    assert_eq!(report["kvm"]["present"], kvm_dev);
    if kvm_dev {
        assert_eq!(report["kvm"]["api_version"], 12, "{stdout}");
    }
    assert_eq!(report["kvm"]["flavor"] == "pvm", pvm, "{stdout}");
    assert_eq!(report["tun"], Path::new("/dev/net/tun").exists());
    assert_eq!(report["qemu"]["microvm"], true, "{stdout}");
    assert_eq!(report["assets"]["kernel"]["present"], true);
    assert_eq!(report["assets"]["initramfs"]["present"], true);
    if pvm {
        assert_eq!(report["selection"]["backend"], "qemu-tcg", "{stdout}");
        assert!(report["selection"]["reason"]
            .as_str()
            .unwrap()
            .contains("PVM"));
    } else if report["kvm"]["flavor"] == "hardware" {
        assert_eq!(report["selection"]["backend"], "capsid-vmm", "{stdout}");
    }
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn table_names_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, _) = check(&config_file(dir.path(), ""), false);
    assert_eq!(code, 0);
    let backend = stdout.lines().find(|l| l.starts_with("backend")).unwrap();
    assert!(
        ["capsid-vmm", "qemu-kvm", "qemu-tcg"]
            .iter()
            .any(|b| backend.contains(b)),
        "{stdout}"
    );
}

#[test]
fn impossible_forced_backend_fails_with_reason() {
    if !Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("host has no PVM; forcing capsid-vmm is possible here, nothing to refuse");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), "[backend]\nkind = \"capsid-vmm\"\n");
    let (code, _, stderr) = check(&config, false);
    assert_ne!(code, 0);
    assert!(stderr.contains("config forces capsid-vmm"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn missing_assets_fail_with_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[paths]\nkernel = \"/nonexistent/vmlinux\"\n").unwrap();
    let (code, _, stderr) = check(&path, true);
    assert_ne!(code, 0);
    assert!(stderr.contains("/nonexistent/vmlinux"), "{stderr}");
}

#[test]
fn bad_config_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[vm]\nvcpus = 0\n").unwrap();
    let (code, _, stderr) = check(&path, false);
    assert_ne!(code, 0);
    assert!(stderr.contains("vm.vcpus"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
