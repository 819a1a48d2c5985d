//! Test initramfs images: busybox, a shell script as /init, and any extra
//! static tools, so a test can say what the guest does in a few lines.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Printed by the test /init after the script, with its exit status.
pub const END_MARKER: &str = "CAPSID-TEST-END rc=";

/// Builds an initramfs in `dir` whose /init runs `script` under busybox sh
/// (after mounting proc, sys, dev), prints `CAPSID-TEST-END rc=N` and
/// reboots. `tools` are (host path, guest path) pairs to install.
pub fn build(dir: &Path, script: &str, tools: &[(&Path, &str)]) -> PathBuf {
    let init = dir.join("init");
    let text = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         (\n{script}\n)\n\
         echo \"{END_MARKER}$?\"\n\
         reboot -f\n"
    );
    std::fs::write(&init, text).expect("write test /init");
    let out = dir.join("initramfs.cpio.gz");
    let mut cmd = Command::new("python3");
    cmd.arg(crate::repo_root().join("images/mkinitramfs.py"))
        .arg("--init")
        .arg(&init)
        .args(["--busybox", "/bin/busybox", "--out"])
        .arg(&out);
    for (src, dest) in tools {
        cmd.arg("--file").arg(format!("{}:{dest}", src.display()));
    }
    let (code, stdout, stderr) = crate::run(&mut cmd);
    assert_eq!(code, 0, "mkinitramfs failed: {stdout}{stderr}");
    out
}

/// The exit status the test script reported on the console, if it finished.
pub fn script_status(serial: &str) -> Option<i32> {
    serial
        .lines()
        .find_map(|l| l.trim().strip_prefix(END_MARKER))
        .and_then(|rc| rc.trim().parse().ok())
}
