//! Operations on a running container as a whole, through its cgroup:
//! freezing, new resource limits, statistics and the process list.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use libcontainer::container::Container as LcContainer;

use super::{ContainerError, Containers, Result};
use crate::lock::LockExt as _;
use crate::runtime::STATE_ROOT;
use crate::stats;

impl Containers {
    /// The container's processes (pid, exec id, command line).
    pub fn list(&self, id: &str) -> Result<Vec<(u32, String, String)>> {
        let container = self.container(id)?;
        let by_pid: HashMap<i32, String> = container
            .processes
            .lock_or_recover()
            .values()
            .filter_map(|p| p.pid().map(|pid| (pid, p.exec_id.clone())))
            .collect();
        Ok(container
            .cgroup_pids()
            .into_iter()
            .map(|pid| {
                let cmd = fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|b| {
                        String::from_utf8_lossy(&b)
                            .replace('\0', " ")
                            .trim()
                            .to_string()
                    })
                    .unwrap_or_default();
                (
                    u32::try_from(pid).unwrap_or(0),
                    by_pid.get(&pid).cloned().unwrap_or_default(),
                    cmd,
                )
            })
            .collect())
    }

    /// cgroup and guest memory statistics.
    pub fn stats(&self, id: &str) -> Result<capsid_protocol::agent::StatsResponse> {
        Ok(stats::collect(&self.container(id)?.cgroup))
    }

    /// Freezes or thaws the container.
    pub async fn pause(&self, id: &str, paused: bool) -> Result<()> {
        self.container(id)?;
        let state = Path::new(STATE_ROOT).join(id);
        tokio::task::spawn_blocking(move || {
            LcContainer::load(state).and_then(|mut c| if paused { c.pause() } else { c.resume() })
        })
        .await
        .map_err(ContainerError::task("pause task"))?
        .map_err(ContainerError::Freeze)
    }

    /// Applies new cgroup limits (memory, pids, cpu) from OCI `linux.resources`.
    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let container = self.container(id)?;
        let res: oci_spec::runtime::LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|source| ContainerError::Json {
                what: "OCI resources",
                source,
            })?;
        let write = |file: &'static str, value: String| {
            fs::write(container.cgroup.join(file), value).map_err(ContainerError::io(file))
        };
        if let Some(mem) = res.memory() {
            if let Some(limit) = mem.limit() {
                write(
                    "memory.max",
                    if limit < 0 {
                        "max".into()
                    } else {
                        limit.to_string()
                    },
                )?;
            }
        }
        if let Some(pids) = res.pids() {
            let limit = pids.limit();
            write(
                "pids.max",
                if limit <= 0 {
                    "max".into()
                } else {
                    limit.to_string()
                },
            )?;
        }
        if let Some(cpu) = res.cpu() {
            if let Some(quota) = cpu.quota() {
                let period = cpu.period().unwrap_or(100_000);
                let q = if quota <= 0 {
                    "max".to_string()
                } else {
                    quota.to_string()
                };
                write("cpu.max", format!("{q} {period}"))?;
            }
            if let Some(shares) = cpu.shares() {
                // The cgroup v1 → v2 conversion runc and crun use.
                let weight = 1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142;
                write("cpu.weight", weight.to_string())?;
            }
        }
        Ok(())
    }
}
