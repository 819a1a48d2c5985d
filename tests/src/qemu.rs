//! Booting a guest under QEMU microvm (TCG on hosts whose KVM cannot run a
//! standard kernel), with the serial console captured to a file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A finished guest run.
#[derive(Debug)]
pub struct GuestRun {
    /// Everything the guest wrote to its serial console.
    pub serial: String,
    /// QEMU's exit code; None when the test had to kill it.
    pub exit_code: Option<i32>,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
    /// What QEMU itself printed on stderr.
    pub qemu_stderr: String,
}

/// One QEMU microvm guest.
#[derive(Debug)]
pub struct Guest {
    kernel: PathBuf,
    initramfs: PathBuf,
    cmdline: String,
    memory_mib: u32,
    extra: Vec<String>,
}

impl Guest {
    /// A guest booting `kernel` (bzImage, or vmlinux through PVH) with `initramfs`.
    pub fn new(kernel: &Path, initramfs: &Path) -> Self {
        Self {
            kernel: kernel.to_path_buf(),
            initramfs: initramfs.to_path_buf(),
            cmdline: "console=ttyS0 reboot=t panic=-1 quiet".into(),
            memory_mib: 256,
            extra: Vec::new(),
        }
    }

    /// Appends to the kernel command line.
    pub fn cmdline(mut self, extra: &str) -> Self {
        self.cmdline.push(' ');
        self.cmdline.push_str(extra);
        self
    }

    /// Extra QEMU arguments (devices).
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.extra.extend(args.into_iter().map(Into::into));
        self
    }

    /// Starts QEMU; the serial console goes to `serial`, QEMU's own
    /// messages to `qemu.err` beside it.
    pub fn spawn(&self, serial: &Path) -> Child {
        let err_path = serial.with_file_name("qemu.err");
        let stderr = std::fs::File::create(&err_path).expect("create qemu.err");
        let mem = format!("{}M", self.memory_mib);
        Command::new("qemu-system-x86_64")
            .args([
                "-M",
                "microvm,acpi=off,memory-backend=mem",
                "-accel",
                "tcg",
                "-m",
                &mem,
            ])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            ])
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args(["-serial", &format!("file:{}", serial.display())])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initramfs)
            .args(["-append", &self.cmdline])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("qemu-system-x86_64 must be installed (make deps)")
    }

    /// Boots and waits for QEMU to exit on its own (guest reboot), killing
    /// it after `timeout`.
    pub fn run_to_exit(&self, timeout: Duration) -> GuestRun {
        let dir = tempfile::tempdir().expect("temp dir");
        let serial = dir.path().join("serial.log");
        let start = Instant::now();
        let mut child = self.spawn(&serial);
        let exit_code = loop {
            if let Some(status) = child.try_wait().expect("wait for qemu") {
                break status.code();
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let elapsed = start.elapsed();
        let qemu_stderr = std::fs::read_to_string(dir.path().join("qemu.err")).unwrap_or_default();
        let mut serial = std::fs::read_to_string(&serial).unwrap_or_default();
        if !qemu_stderr.is_empty() {
            // Failure messages print the serial log: let them show QEMU's word too.
            serial.push_str("\n--- qemu stderr ---\n");
            serial.push_str(&qemu_stderr);
        }
        GuestRun {
            serial,
            exit_code,
            elapsed,
            qemu_stderr,
        }
    }
}
