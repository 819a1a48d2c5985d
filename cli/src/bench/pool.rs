//! `capsid bench startup --pool`: a `capsid-poold` of the benchmark's own
//! (its configuration and state directory are the benchmark's shim's),
//! keeping sandboxes of the benchmarked shape booted; and what those cost
//! the host while they wait.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use capsid_sandbox::config::{Config, PoolConfig, PoolShapeConfig};
use capsid_sandbox::pool::{self, Shape};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::bench::procfs;

/// How long a pool may take to fill (TCG boots one sandbox in seconds).
const FILL_TIMEOUT: Duration = Duration::from_secs(300);

/// The benchmark's pool daemon; stopped (and its sandboxes with it) on
/// drop.
pub struct BenchPool {
    child: Option<Child>,
    config_path: PathBuf,
    config: Config,
    key: String,
    size: u32,
    log: PathBuf,
}

/// What the pool's waiting sandboxes cost the host.
#[derive(Debug, Clone, Serialize)]
pub struct PoolIdle {
    /// Sandboxes measured.
    pub sandboxes: usize,
    /// PSS per sandbox: its warm shim, VMM, device processes and
    /// virtiofsd, MiB.
    pub pss_mib_per_sandbox: f64,
    /// Of it, the warm shim's, MiB.
    pub shim_pss_mib_per_sandbox: f64,
}

impl BenchPool {
    /// Writes `config_path` (the shim's config plus a pool of `size`
    /// sandboxes of `vcpus` and `memory_mib`) and starts the daemon on it.
    pub fn start(
        shim_config: &Path,
        config_path: &Path,
        vcpus: u32,
        memory_mib: u32,
        size: u32,
    ) -> anyhow::Result<Self> {
        let mut config = Config::read(shim_config)?;
        config.pool = PoolConfig {
            enabled: true,
            shapes: vec![PoolShapeConfig {
                vcpus,
                memory_mib,
                size,
                max_memory_mib: 0,
            }],
        };
        std::fs::write(config_path, toml::to_string(&config)?)
            .context("writing the pool config")?;
        let daemon = crate::bench::compare::which("capsid-poold")
            .ok_or_else(|| anyhow!("capsid-poold not found beside capsid or in PATH"))?;
        let log = config_path.with_extension("log");
        let log_file = std::fs::File::create(&log).context("pool daemon log")?;
        let child = Command::new(daemon)
            .arg("--config")
            .arg(config_path)
            .env_remove("CAPSID_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting capsid-poold")?;
        let file = pool::config_file(Some(config_path));
        let key = pool::shape_key(
            &config,
            file.as_deref(),
            config.backend.kind,
            Shape {
                vcpus,
                memory_mib,
                max_memory_mib: memory_mib,
            },
        );
        Ok(Self {
            child: Some(child),
            config_path: config_path.to_path_buf(),
            config,
            key,
            size,
            log,
        })
    }

    /// The configuration the pooled runs give the shim.
    pub fn config(&self) -> &Path {
        &self.config_path
    }

    /// Waits until every sandbox of the pool is booted; their names.
    pub fn wait_full(&self) -> anyhow::Result<Vec<String>> {
        let start = Instant::now();
        loop {
            let ready = pool::ready(&self.config, &self.key);
            if ready.len() >= self.size as usize {
                return Ok(ready);
            }
            if let Some(child) = &self.child {
                if !procfs::alive(child.id()) {
                    bail!("capsid-poold ended: {}", self.log_tail());
                }
            }
            if start.elapsed() > FILL_TIMEOUT {
                bail!(
                    "the pool did not fill within {FILL_TIMEOUT:?}: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fails unless the oldest of `before` was taken (a run that booted
    /// cold is not a pooled run).
    pub fn check_taken(&self, before: &[String]) -> anyhow::Result<()> {
        let ready = pool::ready(&self.config, &self.key);
        match before.first() {
            Some(oldest) if ready.contains(oldest) => {
                bail!("the run booted cold: pooled sandbox {oldest} is still there")
            }
            _ => Ok(()),
        }
    }

    /// PSS of the waiting sandboxes: each warm shim (a child of the
    /// daemon naming the sandbox in its environment) and the processes
    /// naming the sandbox's run directory.
    pub fn idle_memory(&self) -> anyhow::Result<PoolIdle> {
        let ready = self.wait_full()?;
        // Idle: what the boot touched and let go has settled.
        std::thread::sleep(Duration::from_secs(10));
        let daemon = self.child.as_ref().map(Child::id).unwrap_or(0);
        let shims = children_by_sandbox(daemon);
        let (mut total, mut shim_total, mut n) = (0u64, 0u64, 0usize);
        for name in &ready {
            let Some(shim) = shims.iter().find(|(_, s)| s == name).map(|(p, _)| *p) else {
                continue;
            };
            let run_dir = self.config.paths.state_dir.join(name);
            let vm: u64 = procfs::processes_mentioning(&run_dir.display().to_string())
                .into_iter()
                .filter_map(procfs::pss_kib)
                .sum();
            let shim_pss = procfs::pss_kib(shim).unwrap_or(0);
            shim_total += shim_pss;
            total += shim_pss + vm;
            n += 1;
        }
        if n == 0 {
            bail!("no waiting sandbox could be measured");
        }
        #[allow(clippy::cast_precision_loss)]
        let per = |kib: u64| kib as f64 / 1024.0 / n as f64;
        Ok(PoolIdle {
            sandboxes: n,
            pss_mib_per_sandbox: per(total),
            shim_pss_mib_per_sandbox: per(shim_total),
        })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }
}

/// The daemon's children and the sandbox each names
/// (`$CAPSID_POOL_NAME`).
fn children_by_sandbox(daemon: u32) -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let prefix = format!("{}=", pool::NAME_ENV);
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| parent(*pid) == Some(daemon))
        .filter_map(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let name = env
                .split(|b| *b == 0)
                .filter_map(|v| std::str::from_utf8(v).ok())
                .find_map(|v| v.strip_prefix(&prefix))?
                .to_string();
            Some((pid, name))
        })
        .collect()
}

fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may hold spaces and parentheses: fields follow the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

impl Drop for BenchPool {
    /// SIGTERM: the daemon discards its waiting sandboxes and exits.
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_parent_is_read_past_its_name() {
        assert_eq!(
            parent(std::process::id()),
            Some(std::os::unix::process::parent_id())
        );
    }
}
