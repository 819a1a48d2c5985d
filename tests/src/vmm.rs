//! Running capsid-vmm from tests: a VM config in a temporary directory,
//! the serial console in a file, the control socket at hand.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::bin;

/// A capsid-vmm process started by a test.
#[derive(Debug)]
pub struct Vmm {
    /// The process.
    pub child: Child,
    /// Its directory (config, serial log, sockets).
    pub dir: tempfile::TempDir,
}

/// How a capsid-vmm run ended.
#[derive(Debug)]
pub struct Ended {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// The serial console.
    pub serial: String,
    /// capsid-vmm's stderr.
    pub stderr: String,
}

impl Vmm {
    /// Starts capsid-vmm on `config`, a JSON object without `serial` and
    /// `control_socket` (both are added, inside the temporary directory).
    pub fn start(config: Value) -> Self {
        Self::start_with_env(config, &[])
    }

    /// As [`Vmm::start`], with extra environment variables.
    pub fn start_with_env(mut config: Value, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let obj = config.as_object_mut().expect("config is an object");
        obj.insert(
            "serial".into(),
            dir.path().join("serial.log").display().to_string().into(),
        );
        obj.insert(
            "control_socket".into(),
            dir.path().join("api.sock").display().to_string().into(),
        );
        let path = dir.path().join("vm.json");
        std::fs::write(&path, config.to_string()).expect("write config");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr log");
        let child = Command::new(bin("capsid-vmm"))
            .arg("--config")
            .arg(&path)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start capsid-vmm");
        Self { child, dir }
    }

    /// The serial console so far.
    pub fn serial(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serial.log")).unwrap_or_default()
    }

    /// capsid-vmm's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// The control socket path.
    pub fn control_path(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    /// Waits until the serial console contains `text`; panics after
    /// `timeout` or if the VMM exits first.
    pub fn wait_serial(&mut self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let serial = self.serial();
            if serial.contains(text) {
                return serial;
            }
            if let Some(status) = self.child.try_wait().expect("wait") {
                panic!(
                    "capsid-vmm exited ({status}) before printing {text:?}\nserial:\n{serial}\nstderr:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} on the serial console within {timeout:?}\nserial:\n{serial}\nstderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends one control request and returns the answer.
    pub fn control(&self, request: Value) -> Value {
        control(&self.control_path(), request)
    }

    /// The VMM's resident set size in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }

    /// Waits for the VMM to exit; kills it and panics after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Ended {
        let deadline = Instant::now() + timeout;
        let code = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "capsid-vmm did not exit within {timeout:?}\nserial:\n{}\nstderr:\n{}",
                    self.serial(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Ended {
            code,
            serial: self.serial(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends one line-delimited JSON request to a capsid-vmm control socket,
/// waiting up to 5 s for the socket to appear.
pub fn control(path: &Path, request: Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    let stream = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("cannot connect to {}: {e}", path.display()),
        }
    };
    let mut line = request.to_string();
    line.push('\n');
    (&stream).write_all(line.as_bytes()).expect("send request");
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .expect("read answer");
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("bad answer {answer:?}: {e}"))
}

/// VmRSS of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}
