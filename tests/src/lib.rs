//! Helpers for capsid's end-to-end tests: where the built binaries and guest
//! assets are, running QEMU microvm guests, and a private containerd.

pub mod asm;
pub mod cachefill;
pub mod cli;
pub mod containerd;
pub mod cri;
pub mod docker;
pub mod initramfs;
pub mod oci;
pub mod pool;
pub mod qemu;
pub mod sandbox;
pub mod shim;
pub mod vhost;
pub mod vmm;
pub mod vsock;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// Where `make` puts the kernel, initramfs and images (`CAPSID_BUILD_DIR`
/// overrides).
pub fn build_dir() -> PathBuf {
    std::env::var_os("CAPSID_BUILD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("build"))
}

/// A build artifact that must exist: panics with the make target that
/// builds it otherwise (tests are run by `make test`, which builds them).
pub fn artifact(relative: &str) -> PathBuf {
    let path = build_dir().join(relative);
    assert!(
        path.exists(),
        "{} is missing: run `make test` (or `make assets`) to build it",
        path.display()
    );
    path
}

/// A binary of this workspace, from the same cargo profile as the test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile> dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace`",
        path.display()
    );
    path
}

/// Runs a command to completion, returning (exit code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
