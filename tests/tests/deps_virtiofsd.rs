//! `make virtiofsd` into an empty prefix, as `make deps` does on a fresh
//! machine (the installed copy the other tests use never takes this path):
//! virtiofsd is built from crates.io with `cargo install --locked` and
//! runs; a second call finds it and builds nothing.

use std::process::Command;

use capsid_tests::{repo_root, run};

#[test]
fn virtiofsd_is_installed_into_an_empty_prefix_and_then_found() {
    let prefix = tempfile::tempdir().unwrap();
    let make = || {
        run(Command::new("make")
            .arg("-C")
            .arg(repo_root())
            .arg("--no-print-directory")
            .arg("virtiofsd")
            .arg(format!("PREFIX={}", prefix.path().display())))
    };
    let (code, out, err) = make();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("building virtiofsd"), "{out}");
    let binary = prefix.path().join("bin/virtiofsd");
    let (code, version, err) = run(Command::new(&binary).arg("--version"));
    assert_eq!(code, 0, "{err}");
    assert!(version.starts_with("virtiofsd 1.14."), "{version}");
    let (code, _, err) = run(Command::new(&binary).arg("--print-capabilities"));
    assert_eq!(code, 0, "{err}");

    let (code, out, err) = make();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("present"), "{out}");
}
