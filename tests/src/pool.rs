//! `capsid-poold` in tests: the pool turned on in a capsid config, the
//! daemon started on it (this build's shim as its warm shims), its ready
//! sandboxes counted, and the daemon stopped (SIGTERM: the unclaimed
//! sandboxes are discarded) when dropped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capsid_sandbox::config::Config;
use capsid_sandbox::pool;

use crate::bin;

/// Appends `[pool]` with one shape (1 vCPU, `memory_mib`, kept `size`)
/// to the capsid config at `config`.
pub fn enable(config: &Path, memory_mib: u32, size: u32) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(config)
        .expect("open the capsid config");
    writeln!(
        f,
        "[pool]\nenabled = true\n[[pool.shapes]]\nvcpus = 1\nmemory_mib = {memory_mib}\nsize = {size}"
    )
    .expect("write the pool config");
}

/// A running `capsid-poold`.
#[derive(Debug)]
pub struct PoolDaemon {
    child: Option<Child>,
    config: Config,
    log: PathBuf,
}

impl PoolDaemon {
    /// Starts the daemon on `config_path` (which [`enable`] turned the
    /// pool on in); its log goes next to the config.
    pub fn start(config_path: &Path) -> Self {
        let config = Config::read(config_path).expect("read the capsid config");
        let log = config_path.with_extension("poold.log");
        let log_file = std::fs::File::create(&log).expect("poold log");
        let child = Command::new(bin("capsid-poold"))
            .arg("--config")
            .arg(config_path)
            .arg("--shim")
            .arg(bin("containerd-shim-capsid-v2"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start capsid-poold");
        Self {
            child: Some(child),
            config,
            log,
        }
    }

    /// Names of the ready sandboxes of every shape.
    pub fn ready(&self) -> Vec<String> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(pool::dir(&self.config))
            .into_iter()
            .flatten()
            .flatten()
        {
            let key = entry.file_name().to_string_lossy().into_owned();
            if key != "claimed" && entry.path().is_dir() {
                names.extend(pool::ready(&self.config, &key));
            }
        }
        names.sort();
        names
    }

    /// Waits until `n` sandboxes are ready; their names.
    pub fn wait_ready(&self, n: usize, timeout: Duration) -> Vec<String> {
        let start = Instant::now();
        loop {
            let ready = self.ready();
            if ready.len() >= n {
                return ready;
            }
            assert!(
                start.elapsed() < timeout,
                "{} of {n} pooled sandboxes ready after {timeout:?}; poold log:\n{}",
                ready.len(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The log of warm shim `name`, while the daemon keeps it.
    pub fn log_of(&self, name: &str) -> Option<String> {
        std::fs::read_dir(pool::dir(&self.config))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| pool::log_path(&e.path(), name))
            .find_map(|p| std::fs::read_to_string(p).ok())
    }

    /// The daemon's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the daemon (SIGTERM) and waits for it: its exit code.
    pub fn stop(&mut self) -> i32 {
        let Some(mut child) = self.child.take() else {
            return 0;
        };
        let _ = Command::new("kill").arg(child.id().to_string()).status();
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code().unwrap_or(-1);
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("capsid-poold did not stop within 60 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PoolDaemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}
