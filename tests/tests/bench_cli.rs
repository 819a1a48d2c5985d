//! `capsid bench`: bad input is refused before anything runs, with one
//! message naming what was wrong; `--compare` without containerd runs what
//! it can and says what it skipped and why. (The benchmark's numbers are
//! not judged here.)

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

use capsid_tests::cli::Capsid;
use capsid_tests::{bin, run};

fn bench(capsid: &Capsid, args: &[&str]) -> (i32, String, String) {
    run(Command::new(bin("capsid"))
        .arg("--config")
        .arg(capsid.config())
        .arg("bench")
        .args(args))
}

#[test]
fn zero_runs_is_refused() {
    let c = Capsid::new();
    let (code, _, err) = bench(&c, &["startup", "--runs", "0"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--runs") && err.contains("at least 1"),
        "{err}"
    );
    let (code, _, err) = bench(&c, &["density", "--count", "0"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--count") && err.contains("at least 1"),
        "{err}"
    );
    assert_clean(&c);
}

#[test]
fn unknown_backend_is_refused() {
    let c = Capsid::new();
    for what in ["startup", "density"] {
        let (code, _, err) = bench(&c, &[what, "--backend", "firecracker"]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("unknown backend \"firecracker\""), "{err}");
        assert!(err.contains("capsid-vmm, qemu-kvm or qemu-tcg"), "{err}");
    }
}

#[test]
fn backend_this_host_cannot_run_is_refused_with_the_reason() {
    // On a PVM host (where CI runs) capsid-vmm cannot boot Linux: the host
    // check's reason is the error. Elsewhere capsid-vmm may well run.
    if !Path::new("/sys/module/kvm_pvm").exists() {
        return;
    }
    let c = Capsid::new();
    let (code, out, err) = bench(&c, &["startup", "--runs", "1", "--backend", "capsid-vmm"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("--backend capsid-vmm cannot run on this host"),
        "{err}"
    );
    assert!(err.contains("PVM"), "{err}");
    assert_clean(&c);
}

#[test]
fn bad_output_paths_are_refused_before_any_run() {
    let c = Capsid::new();
    let (code, _, err) = bench(&c, &["startup", "--plot", "out.jpg"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--plot out.jpg") && err.contains(".svg or .png"),
        "{err}"
    );
    let (code, _, err) = bench(&c, &["startup", "--json", "/nonexistent-capsid/out.json"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nonexistent-capsid does not exist"), "{err}");
    let (code, _, err) = bench(&c, &["density", "--plot", "/nonexistent-capsid/d.svg"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nonexistent-capsid does not exist"), "{err}");
    assert_clean(&c);
}

/// No sandbox run directory (hidden entries such as the balloon policy's
/// registry are not sandboxes) and no process naming the test's directory.
fn assert_clean(c: &Capsid) {
    let run = c.dir.path().join("run");
    let left: Vec<_> = std::fs::read_dir(&run)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left in the state dir: {left:?}");
    let marker = c.dir.path().display().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains(&marker),
            "process left running: {cmdline}"
        );
    }
}

/// A PATH with every program of the system's except containerd and ctr.
fn path_without_containerd(dir: &Path) -> String {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for sys in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        for entry in std::fs::read_dir(sys).into_iter().flatten().flatten() {
            let name = entry.file_name();
            if name == "containerd" || name == "ctr" || bin.join(&name).exists() {
                continue;
            }
            symlink(entry.path(), bin.join(&name)).unwrap();
        }
    }
    bin.display().to_string()
}

#[test]
fn compare_without_containerd_runs_what_it_can() {
    let c = Capsid::new();
    let tools = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("out.json");
    let (code, stdout, stderr) = run(Command::new(bin("capsid"))
        .env("PATH", path_without_containerd(tools.path()))
        .arg("--config")
        .arg(c.config())
        .args([
            "bench",
            "startup",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--compare",
            "--json",
        ])
        .arg(&json));
    assert_eq!(code, 0, "{stdout}{stderr}");
    for runner in ["ctr_runc", "ctr_capsid"] {
        assert!(
            stdout.contains(&format!(
                "skipped {runner}: containerd and ctr not installed"
            )),
            "{stdout}"
        );
    }
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(
        report["runners"],
        serde_json::json!(["capsid_run", "bare_boot"])
    );
    assert_eq!(report["skipped"].as_array().unwrap().len(), 2);
    let it = &report["iterations"][0];
    for (phase, ms) in it["capsid_run"]["phases_ms"].as_object().unwrap() {
        assert!(ms.is_f64(), "phase {phase} missing: {it}");
    }
    assert!(it["bare_boot"]["kernel_at_init_ms"].is_f64(), "{it}");
    assert!(it["ctr_runc"].is_null());
    assert_clean(&c);
}
