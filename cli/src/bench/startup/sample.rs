//! What one iteration of `capsid bench startup` measured: the milestones
//! and phases of a `capsid run` (from the timings record it writes), the
//! wall time of the other runners.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::bench::bare::BareSample;
use crate::bench::timings::{GuestClock, RunTimings};

/// The points in time of one `capsid run`, in order.
pub const MILESTONES: [&str; 13] = [
    "launch",
    "run_entered",
    "rootfs_ready",
    "backend_spawned",
    "guest_clock_zero",
    "kernel_at_init",
    "agent_connected",
    "container_created",
    "process_started",
    "first_output",
    "exit_reported",
    "vm_gone",
    "process_exited",
];

/// The phases: each ends at the milestone of the same index + 1, and
/// begins at the last milestone before it that was observed.
pub const PHASES: [(&str, &str); 12] = [
    ("exec", "exec, runtime start-up, argument parsing (host)"),
    ("rootfs", "config, image lookup, cached rootfs disk (host)"),
    ("backend_spawn", "device back ends and VMM spawned (host)"),
    (
        "vmm_to_guest_clock",
        "VMM set-up, kernel load, early boot (host + guest)",
    ),
    ("kernel_boot", "guest kernel boot to /init (guest)"),
    (
        "agent_init",
        "agent set-up and vsock dial-in (guest + host relay)",
    ),
    ("create", "Health, CreateContainer, stdio (RPC; guest work)"),
    (
        "start",
        "StartProcess: the process exec'd (RPC; guest work)",
    ),
    ("first_output", "first byte of output reaches the host"),
    ("exit", "process runs and exits, exit reported"),
    ("stop", "guest power-off, VMM exit, reaping, clean-up"),
    ("teardown", "capsid run exits (host)"),
];

/// One `capsid run`, in ms since its launch.
#[derive(Debug, Clone, Serialize)]
pub struct CapsidRunSample {
    /// Launch to process exit.
    pub total_ms: f64,
    /// When each milestone was reached (`MILESTONES`).
    pub milestones_ms: BTreeMap<&'static str, Option<f64>>,
    /// How long each phase took (`PHASES`).
    pub phases_ms: BTreeMap<&'static str, Option<f64>>,
    /// Guest clock zero → agent connected: the guest booting (under TCG,
    /// emulated instruction by instruction).
    pub guest_boot_to_agent_ms: Option<f64>,
    /// total − guest boot-to-agent.
    pub host_overhead_ms: Option<f64>,
    /// CPU time of the `capsid run` process itself.
    pub capsid_cpu_ms: Option<f64>,
    /// What the guest said about its clock.
    pub guest: GuestClock,
}

impl CapsidRunSample {
    /// Turns a `capsid run` timings record into the sample, given when the
    /// process was spawned and when it was seen to exit (monotonic ns).
    pub fn from_record(rec: &RunTimings, spawn_ns: u64, exit_ns: u64) -> Self {
        let ms = |ns: u64| ns as f64 / 1e6;
        let offset = ms(rec.origin_monotonic_ns.saturating_sub(spawn_ns));
        let total = ms(exit_ns.saturating_sub(spawn_ns));
        let p = &rec.phases;
        let rel = |v: Option<f64>| v.map(|v| offset + v);
        let points: [Option<f64>; 13] = [
            Some(0.0),
            Some(offset),
            rel(p.rootfs_ready_ms),
            rel(p.backend_spawned_ms),
            rel(p.guest_clock_zero_ms),
            rel(p.kernel_at_init_ms),
            rel(p.agent_connected_ms),
            rel(p.container_created_ms),
            rel(p.process_started_ms),
            rel(p.first_output_ms),
            rel(p.exit_reported_ms),
            rel(p.vm_gone_ms),
            Some(total),
        ];
        let mut phases = BTreeMap::new();
        let mut last = 0.0;
        for (i, (name, _)) in PHASES.iter().enumerate() {
            let end = points[i + 1];
            phases.insert(*name, end.map(|e| e - last));
            if let Some(e) = end {
                last = e;
            }
        }
        let guest_boot = match (points[4], points[6]) {
            (Some(zero), Some(connected)) => Some(connected - zero),
            _ => None,
        };
        Self {
            total_ms: total,
            milestones_ms: MILESTONES.iter().copied().zip(points).collect(),
            phases_ms: phases,
            guest_boot_to_agent_ms: guest_boot,
            host_overhead_ms: guest_boot.map(|g| total - g),
            capsid_cpu_ms: rec.cpu_ms,
            guest: rec.guest.clone(),
        }
    }
}

/// A runner measured by wall time only.
#[derive(Debug, Clone, Serialize)]
pub struct WallSample {
    /// Launch to exit.
    pub total_ms: f64,
    /// capsid's shim: its phases, from its log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phases: Option<crate::bench::shim_phases::ShimPhases>,
}

/// One iteration: every runner once.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Iteration {
    /// Which measured iteration (from 0).
    pub index: u32,
    /// The runners, in the order they ran.
    pub order: Vec<&'static str>,
    /// `capsid run`, unless it failed (or the same for each runner below;
    /// absent too when not compared).
    pub capsid_run: Option<CapsidRunSample>,
    /// `ctr run --rm` with capsid's shim.
    pub ctr_capsid: Option<WallSample>,
    /// `ctr run --rm` with capsid's shim taking a pooled sandbox.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ctr_capsid_pool: Option<WallSample>,
    /// `ctr run --rm` with runc.
    pub ctr_runc: Option<WallSample>,
    /// The bare VM boot.
    pub bare_boot: Option<BareSample>,
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::bench::timings::{RunPhases, RUN_SCHEMA};

    /// A `capsid run` timings record: origin 10 ms after a spawn at 1 s.
    pub(in crate::bench::startup) fn record() -> RunTimings {
        RunTimings {
            schema: RUN_SCHEMA.into(),
            origin_monotonic_ns: 1_010_000_000,
            backend: "qemu-tcg".into(),
            phases: RunPhases {
                rootfs_ready_ms: Some(2.0),
                backend_spawned_ms: Some(7.0),
                guest_clock_zero_ms: Some(100.0),
                kernel_at_init_ms: Some(900.0),
                agent_connected_ms: Some(1000.0),
                container_created_ms: Some(1400.0),
                process_started_ms: Some(1500.0),
                first_output_ms: Some(1550.0),
                exit_reported_ms: Some(1600.0),
                vm_gone_ms: Some(1700.0),
            },
            guest: GuestClock::default(),
            cpu_ms: Some(20.0),
            exit_status: Some(0),
            error: None,
        }
    }

    #[test]
    fn sample_phases_add_up_to_the_total() {
        // Spawned 10 ms before the origin; exited 1720 ms after spawn.
        let s = CapsidRunSample::from_record(&record(), 1_000_000_000, 2_720_000_000);
        assert!((s.total_ms - 1720.0).abs() < 1e-6);
        let sum: f64 = s.phases_ms.values().map(|v| v.unwrap()).sum();
        assert!((sum - s.total_ms).abs() < 1e-6);
        assert!((s.phases_ms["exec"].unwrap() - 10.0).abs() < 1e-6);
        assert!((s.phases_ms["kernel_boot"].unwrap() - 800.0).abs() < 1e-6);
        assert!((s.phases_ms["teardown"].unwrap() - 10.0).abs() < 1e-6);
        assert!((s.guest_boot_to_agent_ms.unwrap() - 900.0).abs() < 1e-6);
        assert!((s.host_overhead_ms.unwrap() - 820.0).abs() < 1e-6);
        assert_eq!(s.milestones_ms.len(), MILESTONES.len());
        assert_eq!(s.phases_ms.len(), PHASES.len());
    }

    #[test]
    fn a_missing_milestone_folds_into_the_next_phase() {
        let mut rec = record();
        rec.phases.first_output_ms = None;
        let s = CapsidRunSample::from_record(&rec, 1_000_000_000, 2_720_000_000);
        assert!(s.phases_ms["first_output"].is_none());
        // exit now runs from process_started (1510) to exit_reported (1610).
        assert!((s.phases_ms["exit"].unwrap() - 100.0).abs() < 1e-6);
    }
}
