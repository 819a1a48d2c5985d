//! capsid-vhost device processes for tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `capsid-vhost` serving one device on a socket.
#[derive(Debug)]
pub struct VhostDevice {
    child: Child,
    socket: PathBuf,
}

impl VhostDevice {
    /// Starts `capsid-vhost <args…> --socket <socket>` and waits for the socket.
    pub fn spawn(args: &[&str], socket: &Path) -> Self {
        Self::start(Command::new(crate::bin("capsid-vhost")), args, socket)
    }

    /// Like [`Self::spawn`], inside the network namespace `netns` (through
    /// `ip netns exec`, which execs, so the child is capsid-vhost itself):
    /// for devices whose host side (a tap) lives there.
    pub fn spawn_in_netns(netns: &str, args: &[&str], socket: &Path) -> Self {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns])
            .arg(crate::bin("capsid-vhost"));
        Self::start(cmd, args, socket)
    }

    fn start(mut cmd: Command, args: &[&str], socket: &Path) -> Self {
        let child = cmd
            .args(args)
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start capsid-vhost");
        let mut me = Self {
            child,
            socket: socket.to_path_buf(),
        };
        let start = Instant::now();
        while !socket.exists() {
            if let Ok(Some(status)) = me.child.try_wait() {
                panic!(
                    "capsid-vhost {args:?} exited early: {status}: {}",
                    me.stderr()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "capsid-vhost socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        me
    }

    /// The vhost-user socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Waits (up to `timeout`) for the process to exit on its own, as it
    /// must once its frontend disconnected; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the process wrote to stderr (after it exited).
    pub fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut text = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = err.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for VhostDevice {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
