//! The coordinator: every `interval` it lists the registered sandboxes,
//! reads their balloons and the host's memory, lets the policy decide and
//! applies the decisions, logging each with its reason. `capsid-balloond`
//! runs one; tests and demos run one in-process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::host::{self, HostMemory};
use super::policy::{self, Decision, GainTracker, PolicyParams, SandboxView};
use super::registry::{Entry, Registry};
use super::{BalloonStatus, Result};
use crate::config::MemoryConfig;

/// Where the host's memory figures come from.
#[derive(Debug, Clone)]
pub enum HostSource {
    /// `/proc/meminfo` and PSI.
    Proc,
    /// A host of this many MiB (changeable while running), whose used
    /// memory is what the registered VMM processes hold.
    Pretend(Arc<AtomicU64>),
}

impl HostSource {
    /// The source a config asks for.
    pub fn from_config(c: &MemoryConfig) -> Self {
        match c.pretend_host_mib {
            Some(mib) => Self::Pretend(Arc::new(AtomicU64::new(mib))),
            None => Self::Proc,
        }
    }

    /// The host's total memory, MiB.
    pub fn total_mib(&self) -> Option<u64> {
        match self {
            Self::Proc => host::meminfo().map(|(total, _)| total),
            Self::Pretend(mib) => Some(mib.load(Ordering::Relaxed)),
        }
    }

    fn read(&self, vmm_rss_mib: u64) -> Option<HostMemory> {
        match self {
            Self::Proc => host::meminfo().map(|(total_mib, available_mib)| HostMemory {
                total_mib,
                available_mib,
                overdrawn_mib: 0,
                psi_some_avg10: host::psi_memory(),
            }),
            Self::Pretend(mib) => {
                let total_mib = mib.load(Ordering::Relaxed);
                Some(HostMemory {
                    total_mib,
                    available_mib: total_mib.saturating_sub(vmm_rss_mib),
                    overdrawn_mib: vmm_rss_mib.saturating_sub(total_mib),
                    psi_some_avg10: None,
                })
            }
        }
    }
}

/// One sandbox as last seen.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Its registry entry.
    pub entry: Entry,
    /// Host memory its VMM holds for it, MiB ([`host::vm_footprint_mib`]).
    pub rss_mib: Option<u64>,
    /// Its guest RAM resident on the host, MiB
    /// ([`host::guest_resident_mib`]).
    pub guest_resident_mib: Option<u64>,
    /// Its balloon, when it answered.
    pub balloon: Option<BalloonStatus>,
}

/// What one round saw and did.
#[derive(Debug, Clone)]
pub struct Round {
    /// The host.
    pub host: Option<HostMemory>,
    /// Every registered sandbox.
    pub sandboxes: Vec<Observed>,
    /// The changes made.
    pub decisions: Vec<Decision>,
}

/// Runs the policy over the registry.
#[derive(Debug)]
pub struct Coordinator {
    config: MemoryConfig,
    registry: Registry,
    host: HostSource,
    /// Balloon sizes this coordinator asked for (QEMU only reports where
    /// the balloon is, not where it is going).
    targets: HashMap<String, u64>,
    /// Per sandbox, the largest working set seen lately and when.
    working_sets: HashMap<String, (u64, Instant)>,
    /// Per sandbox, the balloon's last actual size and for how many rounds
    /// it has not moved.
    progress: HashMap<String, (u32, u32)>,
    /// Per sandbox, whether its balloon's growth still lowers the host's
    /// footprint.
    gains: HashMap<String, GainTracker>,
    /// Per sandbox, the pod reserve its entry had last round: when a pod
    /// grows (its shim deflated the balloon), the target remembered from
    /// before is forgotten.
    reserves: HashMap<String, u32>,
}

/// Rounds a balloon short of its target may stand still before it counts
/// as stalled.
const STALL_ROUNDS: u32 = 4;

/// Seconds without a guest report (QEMU polls every second) after which
/// the report is stale.
const STALE_STATS_S: u64 = 5;
/// How long a working set figure holds up the floor.
const WORKING_SET_MEMORY: Duration = Duration::from_secs(30);

impl Coordinator {
    /// A coordinator for the sandboxes of `registry`.
    pub fn new(config: MemoryConfig, registry: Registry, host: HostSource) -> Self {
        Self {
            config,
            registry,
            host,
            targets: HashMap::new(),
            working_sets: HashMap::new(),
            progress: HashMap::new(),
            gains: HashMap::new(),
            reserves: HashMap::new(),
        }
    }

    fn params(&self, host_total_mib: u64) -> PolicyParams {
        let pct = |p: u32| host_total_mib * u64::from(p) / 100;
        PolicyParams {
            floor_mib: self.config.floor_mib,
            headroom_mib: self.config.headroom_mib,
            low_watermark_mib: pct(self.config.low_watermark_percent),
            high_watermark_mib: pct(self.config.high_watermark_percent),
            psi_threshold: f64::from(self.config.psi_threshold),
            deflate_step_mib: self.config.deflate_step_mib,
            stale_stats_s: STALE_STATS_S,
        }
    }

    /// Observes everything, decides, applies.
    pub fn round(&mut self) -> Result<Round> {
        let sandboxes = observe(self.registry.entries()?);
        let unproductive = self.track(&sandboxes, Instant::now());
        let vmm_rss: u64 = sandboxes.iter().filter_map(|s| s.rss_mib).sum();
        let Some(host) = self.host.read(vmm_rss) else {
            tracing::warn!("host memory figures unavailable; no balloon changes");
            return Ok(Round {
                host: None,
                sandboxes,
                decisions: Vec::new(),
            });
        };
        let views = self.views(&sandboxes, &unproductive);
        let decisions = policy::decide(&self.params(host.total_mib), &host, &views);
        let decisions = self.apply(&sandboxes, decisions);
        Ok(Round {
            host: Some(host),
            sandboxes,
            decisions,
        })
    }

    /// Brings what the coordinator remembers per sandbox up to date with
    /// this round's observations, made at `now`: forgets sandboxes that
    /// left, feeds the gain trackers, counts the rounds each balloon stood
    /// still and keeps each guest's recent largest working set. Returns
    /// the gain trackers' verdicts: per sandbox whose guest RAM the host
    /// could measure, whether growing its balloon has stopped paying.
    fn track(&mut self, sandboxes: &[Observed], now: Instant) -> HashMap<String, bool> {
        let present = |id: &String| sandboxes.iter().any(|s| &s.entry.id == id);
        self.targets.retain(|id, _| present(id));
        self.working_sets.retain(|id, _| present(id));
        self.progress.retain(|id, _| present(id));
        self.gains.retain(|id, _| present(id));
        self.reserves.retain(|id, _| present(id));
        for s in sandboxes {
            let before = self
                .reserves
                .insert(s.entry.id.clone(), s.entry.reserve_mib);
            if before.is_some_and(|r| r != s.entry.reserve_mib) {
                // The pod's shim resized its balloon: what this coordinator
                // asked for before no longer stands.
                self.targets.remove(&s.entry.id);
                self.progress.remove(&s.entry.id);
                self.gains.remove(&s.entry.id);
            }
        }
        let mut unproductive = HashMap::new();
        for s in sandboxes {
            if let (Some(b), Some(resident)) = (s.balloon, s.guest_resident_mib) {
                let verdict = self.gains.entry(s.entry.id.clone()).or_default().observe(
                    u64::from(b.assigned_mib),
                    u64::from(b.actual_mib),
                    resident,
                );
                unproductive.insert(s.entry.id.clone(), verdict);
            }
        }
        for s in sandboxes {
            if let Some(b) = s.balloon {
                let slot = self
                    .progress
                    .entry(s.entry.id.clone())
                    .or_insert((b.actual_mib, 0));
                if slot.0 == b.actual_mib {
                    slot.1 = slot.1.saturating_add(1);
                } else {
                    *slot = (b.actual_mib, 0);
                }
            }
        }
        for s in sandboxes {
            let Some(ws) = s
                .balloon
                .and_then(|b| b.stats.working_set_mib(u64::from(b.actual_mib)))
            else {
                continue;
            };
            let slot = self
                .working_sets
                .entry(s.entry.id.clone())
                .or_insert((ws, now));
            if ws >= slot.0 || now.duration_since(slot.1) > WORKING_SET_MEMORY {
                *slot = (ws, now);
            }
        }
        unproductive
    }

    /// What the policy decides on: every policy-managed sandbox whose
    /// balloon answered, with what this coordinator remembers of it.
    fn views(
        &self,
        sandboxes: &[Observed],
        unproductive: &HashMap<String, bool>,
    ) -> Vec<SandboxView> {
        sandboxes
            .iter()
            .filter(|s| s.entry.policy)
            .filter_map(|s| {
                let b = s.balloon?;
                let actual = u64::from(b.actual_mib);
                let target = self
                    .targets
                    .get(&s.entry.id)
                    .copied()
                    .unwrap_or(u64::from(b.target_mib.max(b.actual_mib)));
                Some(SandboxView {
                    id: s.entry.id.clone(),
                    assigned_mib: u64::from(b.assigned_mib),
                    target_mib: target,
                    actual_mib: actual,
                    stats: b.stats,
                    recent_working_set_mib: self.working_sets.get(&s.entry.id).map_or(0, |w| w.0),
                    stalled: self
                        .progress
                        .get(&s.entry.id)
                        .is_some_and(|p| p.1 >= STALL_ROUNDS),
                    host_resident_mib: s.guest_resident_mib,
                    unproductive: unproductive.get(&s.entry.id).copied().unwrap_or(false),
                    reserve_mib: u64::from(s.entry.reserve_mib).min(u64::from(b.assigned_mib)),
                })
            })
            .collect()
    }

    /// Resizes the balloons as decided, logging each change with its
    /// reason; returns the decisions that took effect.
    fn apply(&mut self, sandboxes: &[Observed], decisions: Vec<Decision>) -> Vec<Decision> {
        let mut applied = Vec::new();
        for d in decisions {
            let Some(handle) = sandboxes
                .iter()
                .find(|s| s.entry.id == d.id)
                .and_then(|s| s.entry.balloon.as_ref())
            else {
                continue;
            };
            match handle.set_target(d.to_mib) {
                Ok(()) => {
                    tracing::info!(
                        id = %d.id,
                        from_mib = d.from_mib,
                        to_mib = d.to_mib,
                        reason = %d.reason,
                        "{}",
                        if d.to_mib > d.from_mib { "inflating balloon" } else { "deflating balloon" }
                    );
                    self.targets.insert(d.id.clone(), d.to_mib);
                    // A new target: the balloon gets fresh rounds to move.
                    if let Some(p) = self.progress.get_mut(&d.id) {
                        p.1 = 0;
                    }
                    applied.push(d);
                }
                Err(e) => tracing::warn!(id = %d.id, error = %e, "cannot resize balloon"),
            }
        }
        applied
    }

    /// Runs rounds every `memory.interval_ms` until `stop` is set, or,
    /// with `exit_when_idle`, until no sandbox has been registered for
    /// three rounds in a row.
    pub fn run(&mut self, stop: &AtomicBool, exit_when_idle: bool) {
        let interval = Duration::from_millis(self.config.interval_ms);
        let mut idle_rounds = 0;
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            match self.round() {
                Ok(r) if r.sandboxes.is_empty() => idle_rounds += 1,
                Ok(_) => idle_rounds = 0,
                Err(e) => tracing::warn!(error = %e, "balloon round failed"),
            }
            if exit_when_idle && idle_rounds >= 3 {
                tracing::info!("no sandboxes left; exiting");
                return;
            }
            let rest = interval.saturating_sub(started.elapsed());
            // Sleep in slices so a stop request is seen promptly.
            let until = Instant::now() + rest;
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50).min(rest));
            }
        }
    }
}

/// Reads every registered sandbox: its VMM's footprint on the host and its
/// balloon (an unreachable balloon is logged and left out).
fn observe(entries: Vec<Entry>) -> Vec<Observed> {
    entries
        .into_iter()
        .map(|entry| {
            let rss_mib = entry.vmm_pid.and_then(host::vm_footprint_mib);
            let guest_resident_mib = entry.vmm_pid.and_then(host::guest_resident_mib);
            let balloon = entry.balloon.as_ref().and_then(|b| match b.status() {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::debug!(id = %entry.id, error = %e, "balloon unreachable");
                    None
                }
            });
            Observed {
                entry,
                rss_mib,
                guest_resident_mib,
                balloon,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balloon::{BalloonEndpoint, BalloonHandle, GuestMemStats};
    use crate::config::BackendKind;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    const ASSIGNED: u32 = 512;

    fn coordinator(dir: &std::path::Path) -> Coordinator {
        Coordinator::new(
            MemoryConfig::default(),
            Registry::new(dir),
            HostSource::Pretend(Arc::new(AtomicU64::new(4096))),
        )
    }

    /// A sandbox whose balloon answered: `actual_mib` taken, the guest
    /// reporting `available_mib` of its memory available.
    fn seen(id: &str, policy: bool, actual_mib: u32, available_mib: u64) -> Observed {
        let mut entry = Entry::new(id, BackendKind::CapsidVmm, ASSIGNED, policy);
        entry.balloon = Some(BalloonHandle::new(
            BalloonEndpoint::Qmp {
                socket: "/nonexistent/qmp.sock".into(),
            },
            ASSIGNED,
        ));
        Observed {
            entry,
            rss_mib: Some(300),
            guest_resident_mib: None,
            balloon: Some(BalloonStatus {
                assigned_mib: ASSIGNED,
                target_mib: actual_mib,
                actual_mib,
                stats: GuestMemStats {
                    valid: true,
                    total_mib: u64::from(ASSIGNED),
                    available_mib,
                    ..GuestMemStats::default()
                },
            }),
        }
    }

    fn decision(id: &str, to_mib: u64) -> Decision {
        Decision {
            id: id.into(),
            from_mib: 100,
            to_mib,
            reason: "test".into(),
        }
    }

    #[test]
    fn views_carry_what_the_coordinator_remembers() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = coordinator(dir.path());
        let mut silent = seen("silent", true, 0, 0);
        silent.balloon = None;
        let round = [
            seen("a", true, 100, 200),
            seen("unmanaged", false, 100, 200),
            silent,
        ];
        let now = Instant::now();
        for _ in 1..STALL_ROUNDS {
            c.track(&round, now);
        }
        let views = c.views(&round, &HashMap::new());
        assert_eq!(
            views.len(),
            1,
            "only managed sandboxes whose balloon answered"
        );
        let a = &views[0];
        assert_eq!(a.id, "a");
        assert_eq!(
            (a.assigned_mib, a.target_mib, a.actual_mib),
            (512, 100, 100)
        );
        // 512 total - 200 available - 100 in the balloon.
        assert_eq!(a.recent_working_set_mib, 212);
        assert!(!a.stalled);
        assert!(!a.unproductive);
        c.track(&round, now);
        assert!(c.views(&round, &HashMap::new())[0].stalled);
        // The target asked for wins over the one reported; a smaller
        // working set does not lower the remembered one at once.
        c.targets.insert("a".into(), 150);
        let later = [seen("a", true, 100, 300)];
        c.track(&later, now);
        let unproductive = HashMap::from([("a".to_string(), true)]);
        let a = &c.views(&later, &unproductive)[0];
        assert_eq!(a.target_mib, 150);
        assert_eq!(a.recent_working_set_mib, 212);
        assert!(a.unproductive);
    }

    #[test]
    fn a_moving_balloon_is_not_stalled_and_gone_sandboxes_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = coordinator(dir.path());
        let now = Instant::now();
        for round in 0..2 * STALL_ROUNDS {
            c.track(&[seen("a", true, 100 + round, 200)], now);
        }
        assert!(!c.views(&[seen("a", true, 107, 200)], &HashMap::new())[0].stalled);
        let mut measured = seen("a", true, 100, 200);
        measured.guest_resident_mib = Some(200);
        let verdicts = c.track(&[measured], now);
        assert_eq!(verdicts.keys().collect::<Vec<_>>(), ["a"]);
        c.targets.insert("a".into(), 150);
        // A pod that grew: its reserve changed, the old target is dropped.
        let mut grown = seen("a", true, 100, 200);
        grown.entry.reserve_mib = 64;
        c.track(std::slice::from_ref(&grown), now);
        assert!(c.targets.is_empty());
        assert_eq!(c.views(&[grown], &HashMap::new())[0].reserve_mib, 64);
        c.targets.insert("a".into(), 150);
        assert!(c.track(&[], now).is_empty());
        assert!(c.targets.is_empty() && c.progress.is_empty());
        assert!(c.working_sets.is_empty() && c.gains.is_empty());
    }

    #[test]
    fn only_decisions_that_took_effect_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vmm-api.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let vmm = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            writeln!(&s, r#"{{"ok":true}}"#).unwrap();
            line
        });
        let mut c = coordinator(dir.path());
        let mut ok = seen("ok", true, 100, 200);
        ok.entry.balloon = Some(BalloonHandle::new(
            BalloonEndpoint::CapsidVmm { socket },
            ASSIGNED,
        ));
        let unreachable = seen("unreachable", true, 100, 200);
        let sandboxes = [ok, unreachable];
        let now = Instant::now();
        for _ in 0..STALL_ROUNDS {
            c.track(&sandboxes, now);
        }
        let applied = c.apply(
            &sandboxes,
            vec![
                decision("gone", 10),
                decision("unreachable", 120),
                decision("ok", 130),
            ],
        );
        assert_eq!(applied, [decision("ok", 130)]);
        assert_eq!(
            vmm.join().unwrap(),
            "{\"op\":\"balloon_set\",\"target_mib\":130}\n"
        );
        assert_eq!(c.targets, HashMap::from([("ok".to_string(), 130)]));
        // The new target restarts the count of rounds standing still.
        assert_eq!(c.progress["ok"], (100, 0));
        assert_eq!(c.progress["unreachable"], (100, STALL_ROUNDS));
    }

    #[test]
    fn a_round_over_no_sandboxes_sees_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let r = coordinator(dir.path()).round().unwrap();
        assert!(r.sandboxes.is_empty() && r.decisions.is_empty());
        let host = r.host.unwrap();
        assert_eq!((host.total_mib, host.available_mib), (4096, 4096));
    }
}
