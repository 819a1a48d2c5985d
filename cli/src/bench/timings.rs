//! The machine-readable phase timings of one `capsid run`: written as JSON
//! to the file named by `CAPSID_TIMINGS`, read by `capsid bench startup`.
//!
//! Every host time is CLOCK_MONOTONIC, so records of different processes
//! compare directly. Guest times (the guest's own CLOCK_MONOTONIC, reported
//! by the agent) are mapped to host time with the Health round trip: the
//! guest read its clock (`now`) about halfway between the host's send and
//! receive, so guest time g happened at host time
//! `midpoint − (now − g)`. Under TCG the guest clock runs at host speed
//! (the emulated TSC follows the host's), so the error is about half the
//! round trip, which the record keeps.

use std::path::Path;
use std::time::{Duration, Instant};

use capsid_sandbox::sandbox::StartTimings;
use serde::{Deserialize, Serialize};

/// Environment variable naming the file `capsid run` writes its timings to.
pub const TIMINGS_ENV: &str = "CAPSID_TIMINGS";
/// Identifies the record's layout.
pub const RUN_SCHEMA: &str = "capsid-run-timings/1";

/// The timings of one `capsid run`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunTimings {
    /// [`RUN_SCHEMA`].
    pub schema: String,
    /// CLOCK_MONOTONIC (ns) when `capsid run` began its work (after exec
    /// and runtime start-up): the origin of every `*_ms` below.
    pub origin_monotonic_ns: u64,
    /// The backend that ran the VM.
    pub backend: String,
    /// When each phase ended, in ms since the origin (`null`: not reached
    /// or not observable).
    pub phases: RunPhases,
    /// What the guest reported about its own clock.
    pub guest: GuestClock,
    /// CPU time `capsid run` itself used (all its threads; not the VMM's
    /// or the device back ends'), in ms: its host-side work.
    pub cpu_ms: Option<f64>,
    /// The container's exit status, when it ran to its end.
    pub exit_status: Option<i32>,
    /// Why the run failed, if it did.
    pub error: Option<String>,
}

/// Phase ends of one run, in ms since [`RunTimings::origin_monotonic_ns`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunPhases {
    /// Image resolved and its cached rootfs disk leased.
    pub rootfs_ready_ms: Option<f64>,
    /// The backend's processes (VMM, device back ends) spawned.
    pub backend_spawned_ms: Option<f64>,
    /// The guest's clock read zero (mapped to host time): the kernel's
    /// timekeeping started, a few ms after its first instruction.
    pub guest_clock_zero_ms: Option<f64>,
    /// The kernel started `/init` (the agent), mapped to host time.
    pub kernel_at_init_ms: Option<f64>,
    /// The agent dialed in over vsock.
    pub agent_connected_ms: Option<f64>,
    /// The container was created and its stdio connected.
    pub container_created_ms: Option<f64>,
    /// The container's process was exec'd (StartProcess answered).
    pub process_started_ms: Option<f64>,
    /// The first byte of the container's output arrived.
    pub first_output_ms: Option<f64>,
    /// The agent reported the exit.
    pub exit_reported_ms: Option<f64>,
    /// The VM's processes are gone and its run directory removed.
    pub vm_gone_ms: Option<f64>,
}

/// The guest's view of its boot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestClock {
    /// Guest kernel uptime when the agent started (guest clock).
    pub boot_to_agent_ms: Option<f64>,
    /// Guest CLOCK_MONOTONIC when the agent started.
    pub agent_started_ms: Option<f64>,
    /// The Health round trip used to map guest times to host times (their
    /// error is at most half of it).
    pub health_rtt_ms: Option<f64>,
}

/// Collects phase times against one origin.
#[derive(Debug)]
pub struct Recorder {
    origin: Instant,
    record: RunTimings,
}

/// CLOCK_MONOTONIC now, in ns.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0)
        })
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Recorder {
    /// Starts the clock now.
    pub fn new() -> Self {
        let origin = Instant::now();
        Self {
            origin,
            record: RunTimings {
                schema: RUN_SCHEMA.into(),
                origin_monotonic_ns: monotonic_ns(),
                ..RunTimings::default()
            },
        }
    }

    /// The origin.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// ms from the origin to `at`.
    pub fn since_origin(&self, at: Instant) -> f64 {
        ms(at.saturating_duration_since(self.origin))
    }

    /// ms from the origin to now.
    pub fn now(&self) -> f64 {
        self.since_origin(Instant::now())
    }

    /// The phases, to fill in.
    pub fn phases(&mut self) -> &mut RunPhases {
        &mut self.record.phases
    }

    /// Takes the sandbox's start-up timings (from its start at `called`,
    /// when the sandbox gives no origin of its own), mapping guest times to
    /// host times when the agent reports its clock.
    pub fn sandbox_started(&mut self, backend: &str, called: Instant, t: &StartTimings) {
        let base = self.since_origin(t.started_at.unwrap_or(called));
        self.record.backend = backend.into();
        let p = &mut self.record.phases;
        p.backend_spawned_ms = Some(base + ms(t.vm_spawned));
        p.agent_connected_ms = Some(base + ms(t.agent_connected));
        let g = &mut self.record.guest;
        g.boot_to_agent_ms = Some(ms(t.guest_boot_to_agent));
        g.agent_started_ms = Some(ms(t.guest_agent_started));
        g.health_rtt_ms = Some(ms(t.health_received.saturating_sub(t.health_sent)));
        if let Some(now) = t.guest_now_at_health {
            let midpoint = base + (ms(t.health_sent) + ms(t.health_received)) / 2.0;
            let zero = midpoint - ms(now);
            p.guest_clock_zero_ms = Some(zero);
            p.kernel_at_init_ms = Some(zero + ms(t.guest_agent_started));
        }
    }

    /// Records how the run ended, and the CPU time used so far.
    pub fn finish(&mut self, outcome: &anyhow::Result<i32>) {
        self.record.cpu_ms = nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID)
            .ok()
            .map(|t| ms(Duration::from(t)));
        match outcome {
            Ok(code) => self.record.exit_status = Some(*code),
            Err(e) => self.record.error = Some(format!("{e:#}")),
        }
    }

    /// Writes the record as JSON to `path`.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_vec_pretty(&self.record)?;
        std::fs::write(path, text)
            .map_err(|e| anyhow::anyhow!("cannot write timings to {}: {e}", path.display()))
    }

    /// The record so far.
    #[cfg(test)]
    pub fn record(&self) -> &RunTimings {
        &self.record
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_times_map_through_the_health_midpoint() {
        let mut r = Recorder::new();
        let t = StartTimings {
            vm_spawned: Duration::from_millis(5),
            agent_connected: Duration::from_millis(1500),
            guest_boot_to_agent: Duration::from_millis(900),
            started_at: Some(r.origin() + Duration::from_millis(10)),
            health_sent: Duration::from_millis(1500),
            health_received: Duration::from_millis(1510),
            guest_agent_started: Duration::from_millis(950),
            guest_now_at_health: Some(Duration::from_millis(1200)),
        };
        r.sandbox_started("qemu-tcg", r.origin(), &t);
        let p = &r.record().phases;
        let near = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() < 1e-6;
        assert!(near(p.backend_spawned_ms, 15.0));
        assert!(near(p.agent_connected_ms, 1510.0));
        // midpoint 10 + 1505 = 1515 host ms ↔ guest 1200 ms
        assert!(near(p.guest_clock_zero_ms, 315.0));
        assert!(near(p.kernel_at_init_ms, 1265.0));
        assert!(near(r.record().guest.health_rtt_ms, 10.0));
    }

    #[test]
    fn old_agent_leaves_guest_phases_empty() {
        let mut r = Recorder::new();
        let t = StartTimings::default();
        r.sandbox_started("qemu-tcg", r.origin(), &t);
        assert!(r.record().phases.guest_clock_zero_ms.is_none());
        assert!(r.record().phases.kernel_at_init_ms.is_none());
    }

    #[test]
    fn json_schema() {
        let record = RunTimings {
            schema: RUN_SCHEMA.into(),
            origin_monotonic_ns: 42,
            backend: "qemu-tcg".into(),
            phases: RunPhases {
                rootfs_ready_ms: Some(1.5),
                ..RunPhases::default()
            },
            guest: GuestClock::default(),
            cpu_ms: Some(12.5),
            exit_status: Some(0),
            error: None,
        };
        let v: serde_json::Value = serde_json::to_value(&record).unwrap();
        assert_eq!(v["schema"], "capsid-run-timings/1");
        assert_eq!(v["origin_monotonic_ns"], 42);
        assert_eq!(v["phases"]["rootfs_ready_ms"], 1.5);
        for key in [
            "backend_spawned_ms",
            "guest_clock_zero_ms",
            "kernel_at_init_ms",
            "agent_connected_ms",
            "container_created_ms",
            "process_started_ms",
            "first_output_ms",
            "exit_reported_ms",
            "vm_gone_ms",
        ] {
            assert!(v["phases"][key].is_null(), "{key}");
        }
        for key in ["boot_to_agent_ms", "agent_started_ms", "health_rtt_ms"] {
            assert!(v["guest"].get(key).is_some(), "{key}");
        }
        assert_eq!(v["exit_status"], 0);
        assert_eq!(v["cpu_ms"], 12.5);
        let back: RunTimings = serde_json::from_value(v).unwrap();
        assert_eq!(back, record);
    }
}
