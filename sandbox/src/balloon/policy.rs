//! The reclaim policy, as pure decisions: given the host's memory and
//! every sandbox's balloon and guest statistics, which balloons to inflate
//! or deflate, and why. No I/O here, so every rule is unit-tested,
//! including against guests that report absurd figures.
//!
//! * Host short (available below the low watermark, or PSI memory stall
//!   above the threshold): inflate the balloons of the sandboxes whose
//!   inflation frees the most *host* memory first, until the shortfall
//!   (minus host memory that inflation still under way will free) is
//!   covered. A guest's free memory is mostly not resident on the host
//!   (never touched, or already returned by free page reporting): the
//!   balloon takes such pages first and gains nothing for them, so a
//!   guest is ranked and sized by what the host measures it holds, not by
//!   what the guest reports free. A balloon whose growth stopped lowering
//!   the host's footprint settles where it is.
//! * Never below a sandbox's floor: guest-usable memory stays at least
//!   `max(floor_mib, working set + headroom_mib)`; a guest whose report is
//!   unusable is not inflated at all.
//! * Host comfortable (available above the high watermark): deflate
//!   gradually, `deflate_step_mib` per sandbox per round, within what the
//!   host can spare above the high watermark.
//! * A guest whose working set grew past its floor gets its balloon
//!   shrunk at once, whatever the host's state.

use super::host::HostMemory;
use super::stats::GuestMemStats;

/// The policy's knobs (from `[memory]` of the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyParams {
    /// Guest-usable memory never goes below this, MiB.
    pub floor_mib: u64,
    /// Kept free above the guest's working set, MiB.
    pub headroom_mib: u64,
    /// Reclaim when the host has less available than this, MiB.
    pub low_watermark_mib: u64,
    /// Give back when the host has more available than this, MiB.
    pub high_watermark_mib: u64,
    /// PSI `some avg10` above which the host counts as short, percent.
    pub psi_threshold: f64,
    /// MiB given back per sandbox per round.
    pub deflate_step_mib: u64,
    /// A guest report older than this many seconds is stale: the guest
    /// may be too squeezed to answer.
    pub stale_stats_s: u64,
}

/// One sandbox as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxView {
    /// Sandbox id.
    pub id: String,
    /// Memory assigned to the VM, MiB.
    pub assigned_mib: u64,
    /// Balloon size last asked for, MiB.
    pub target_mib: u64,
    /// Balloon size the guest reached, MiB.
    pub actual_mib: u64,
    /// The guest's sanitized statistics.
    pub stats: GuestMemStats,
    /// The largest working set seen lately, MiB. Guest statistics lag the
    /// balloon by a polling interval: while a balloon grows, a stale
    /// report makes the working set look smaller than it is, so the floor
    /// rests on the recent maximum instead.
    pub recent_working_set_mib: u64,
    /// The balloon has not moved towards its target for a few rounds: the
    /// guest gave what it could.
    pub stalled: bool,
    /// Guest RAM resident on the host, MiB, as the host measures it (the
    /// guest cannot lie about it); `None` when it cannot be measured.
    pub host_resident_mib: Option<u64>,
    /// The balloon grew lately while the host's footprint did not fall
    /// ([`GainTracker`]): growing it further would gain nothing.
    pub unproductive: bool,
    /// Of `assigned_mib`, MiB held in the balloon as a pod's room to grow
    /// (its maximum minus its size): the policy never deflates the balloon
    /// below it nor counts it as reclaimable. 0 for other sandboxes.
    pub reserve_mib: u64,
}

impl SandboxView {
    /// Guest-usable memory that must stay, MiB (the whole VM when the
    /// guest's report is unusable).
    pub fn floor_mib(&self, p: &PolicyParams) -> u64 {
        let size = self.size_mib();
        match self.stats.working_set_mib(self.actual_mib) {
            Some(ws) => ws
                .max(self.recent_working_set_mib)
                .saturating_add(p.headroom_mib)
                .max(p.floor_mib)
                .min(size),
            None => size,
        }
    }

    /// The guest's memory without the pod's reserve, MiB: what it may use.
    pub fn size_mib(&self) -> u64 {
        self.assigned_mib.saturating_sub(self.reserve_mib)
    }

    /// The smallest balloon the policy may set: the pod's reserve.
    fn min_balloon_mib(&self) -> u64 {
        self.reserve_mib.min(self.assigned_mib)
    }

    /// The guest has stopped reporting.
    pub fn stale(&self, p: &PolicyParams) -> bool {
        self.stats.age_s.is_some_and(|age| age > p.stale_stats_s)
    }

    /// The largest balloon the floor allows, MiB.
    pub fn max_balloon_mib(&self, p: &PolicyParams) -> u64 {
        self.assigned_mib.saturating_sub(self.floor_mib(p))
    }

    /// MiB more the balloon could take now: free + caches, within the
    /// floor, and leaving the guest its headroom of available memory (so
    /// that inflating never makes it "squeezed" next round).
    pub fn reclaimable_mib(&self, p: &PolicyParams) -> u64 {
        if self.stale(p) {
            return 0;
        }
        let room = self.max_balloon_mib(p).saturating_sub(self.target_mib);
        room.min(self.stats.reclaimable_mib())
            .min(self.stats.available_mib.saturating_sub(p.headroom_mib))
    }

    /// Guest-usable memory not resident on the host once the balloon has
    /// reached its target, MiB: pages never touched or already returned.
    /// The balloon takes free pages first, so its next `non_resident_mib`
    /// MiB of growth gain the host nothing. `None` when not measured.
    pub fn non_resident_mib(&self) -> Option<u64> {
        let resident = self.host_resident_mib?;
        let usable_now = self.assigned_mib.saturating_sub(self.actual_mib);
        let in_flight = self.target_mib.saturating_sub(self.actual_mib);
        Some(
            usable_now
                .saturating_sub(resident)
                .saturating_sub(in_flight),
        )
    }

    /// Host memory that inflation already asked for (target above actual)
    /// will still free, MiB: the part beyond the non-resident pages it
    /// takes first.
    pub fn in_flight_gain_mib(&self) -> u64 {
        if self.stalled || self.unproductive {
            return 0;
        }
        let Some(resident) = self.host_resident_mib else {
            return 0;
        };
        let usable_now = self.assigned_mib.saturating_sub(self.actual_mib);
        self.target_mib
            .saturating_sub(self.actual_mib)
            .saturating_sub(usable_now.saturating_sub(resident))
    }

    /// Host memory, MiB, that growing the balloon as far as
    /// [`Self::reclaimable_mib`] allows would free: that growth minus the
    /// non-resident pages it takes first. 0 when the host's footprint
    /// cannot be measured, or did not fall the last time the balloon grew.
    /// Never more than the resident memory above the floor.
    ///
    /// Below [`MIN_HOST_GAIN_MIB`] it counts as 0: a balloon hundreds of
    /// MiB large for a handful of MiB is not worth the memory it takes
    /// from the guest.
    pub fn host_gain_mib(&self, p: &PolicyParams) -> u64 {
        if self.unproductive {
            return 0;
        }
        let gain = match self.non_resident_mib() {
            Some(non_resident) => self.reclaimable_mib(p).saturating_sub(non_resident),
            None => 0,
        };
        if gain < MIN_HOST_GAIN_MIB {
            0
        } else {
            gain
        }
    }
}

/// Watches, round by round, whether a growing balloon lowers the host
/// memory its VM holds. The growth expected to pay is what exceeds the
/// non-resident guest memory at the time; once that reaches
/// [`GainTracker::JUDGE_MIB`] and less than a quarter of it came back
/// as a lower footprint, the balloon is *unproductive* for
/// [`GainTracker::HOLD_ROUNDS`] rounds (or until it deflates).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GainTracker {
    /// Balloon and resident guest memory at the last round, MiB.
    last: Option<(u64, u64)>,
    /// Host gain expected since the window opened, MiB.
    expected_mib: u64,
    /// Host memory actually freed since the window opened, MiB (negative
    /// when the footprint grew).
    gained_mib: i64,
    /// Rounds left in an unproductive verdict.
    unproductive_rounds: u32,
}

impl GainTracker {
    /// Expected gain after which the balloon's effect is judged, MiB.
    pub const JUDGE_MIB: u64 = 32;
    /// Rounds an unproductive verdict holds.
    pub const HOLD_ROUNDS: u32 = 30;

    /// Records one round (VM of `assigned_mib`, balloon at `actual_mib`,
    /// `resident_mib` of guest RAM on the host) and says whether the
    /// balloon is unproductive.
    pub fn observe(&mut self, assigned_mib: u64, actual_mib: u64, resident_mib: u64) -> bool {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        if let Some((balloon_before, resident_before)) = self.last {
            if actual_mib < balloon_before {
                // Deflating: a fresh start when it grows again.
                *self = Self::default();
            } else {
                let non_resident = assigned_mib
                    .saturating_sub(balloon_before)
                    .saturating_sub(resident_before);
                let expected = (actual_mib - balloon_before).saturating_sub(non_resident);
                if expected > 0 || self.expected_mib > 0 {
                    self.expected_mib = self.expected_mib.saturating_add(expected);
                    self.gained_mib = self
                        .gained_mib
                        .saturating_add(clamp(resident_before) - clamp(resident_mib));
                }
                if self.expected_mib >= Self::JUDGE_MIB {
                    if self.gained_mib < clamp(self.expected_mib / 4) {
                        self.unproductive_rounds = Self::HOLD_ROUNDS;
                    }
                    self.expected_mib = 0;
                    self.gained_mib = 0;
                }
            }
        }
        self.last = Some((actual_mib, resident_mib));
        if self.unproductive_rounds > 0 {
            self.unproductive_rounds -= 1;
            true
        } else {
            false
        }
    }
}

/// The least host memory worth inflating a guest's balloon for, MiB.
pub const MIN_HOST_GAIN_MIB: u64 = 16;

/// A balloon to resize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Sandbox id.
    pub id: String,
    /// Balloon size before, MiB.
    pub from_mib: u64,
    /// Balloon size to set, MiB.
    pub to_mib: u64,
    /// Why, for the log.
    pub reason: String,
}

/// The host's state, as the policy classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pressure {
    /// Short by this many MiB.
    Short(u64),
    /// Between the watermarks: hold.
    Steady,
    /// This many MiB above the high watermark to give back.
    Comfortable(u64),
}

/// Classifies the host.
pub fn pressure(p: &PolicyParams, host: &HostMemory) -> Pressure {
    let stalled = host.psi_some_avg10.is_some_and(|v| v > p.psi_threshold);
    if host.available_mib < p.low_watermark_mib || host.overdrawn_mib > 0 {
        Pressure::Short(
            (p.low_watermark_mib - host.available_mib).saturating_add(host.overdrawn_mib),
        )
    } else if stalled {
        // Enough looks available, yet tasks stall: reclaim a step's worth.
        Pressure::Short(p.deflate_step_mib.max(1))
    } else if host.available_mib > p.high_watermark_mib {
        Pressure::Comfortable(host.available_mib - p.high_watermark_mib)
    } else {
        Pressure::Steady
    }
}

/// Decides this round's balloon changes for `sandboxes` (only those the
/// policy may act on).
pub fn decide(p: &PolicyParams, host: &HostMemory, sandboxes: &[SandboxView]) -> Vec<Decision> {
    let mut out = Vec::new();
    // Guests that need memory back get it first, whatever the host's
    // state: one whose working set grew past its floor, and one squeezed
    // by its balloon (less available than the headroom), which gets at
    // least a step back before its kernel has to deflate on OOM a page at
    // a time while the host keeps asking for the target.
    for s in sandboxes {
        if !s.stats.valid || s.target_mib <= s.min_balloon_mib() {
            continue;
        }
        let mut to = s.target_mib;
        let mut reasons = Vec::new();
        let max = s.max_balloon_mib(p);
        if max < to {
            to = max;
            reasons.push(format!(
                "working set grew: floor {} MiB of {} MiB",
                s.floor_mib(p),
                s.assigned_mib
            ));
        }
        // What the policy may give back: never the pod's reserve.
        let givable = s.target_mib - s.min_balloon_mib();
        if s.stale(p) {
            to = to.min(s.target_mib - p.deflate_step_mib.min(givable));
            reasons.push(format!(
                "no guest report for {} s",
                s.stats.age_s.unwrap_or_default()
            ));
        } else if s.stats.available_mib < p.headroom_mib {
            let give = p
                .deflate_step_mib
                .max(p.headroom_mib - s.stats.available_mib)
                .min(givable);
            to = to.min(s.target_mib - give);
            reasons.push(format!(
                "guest short: {} MiB available, below the {} MiB headroom",
                s.stats.available_mib, p.headroom_mib
            ));
        }
        if to < s.target_mib {
            out.push(Decision {
                id: s.id.clone(),
                from_mib: s.target_mib,
                to_mib: to,
                reason: reasons.join("; "),
            });
        }
    }
    let touched = |id: &str, out: &[Decision]| out.iter().any(|d| d.id == id);
    // A balloon stuck short of its target settles where it is: the guest
    // cannot give more, and an unreachable target would keep it trying.
    for s in sandboxes {
        // A pod's balloon still inflating to its reserve settles there at
        // the lowest.
        let settle = s.actual_mib.max(s.min_balloon_mib());
        if (s.stalled || s.unproductive) && s.target_mib > settle && !touched(&s.id, &out) {
            out.push(Decision {
                id: s.id.clone(),
                from_mib: s.target_mib,
                to_mib: settle,
                reason: if s.stalled {
                    format!(
                        "balloon stalled at {} MiB: the guest gave what it could",
                        s.actual_mib
                    )
                } else {
                    format!(
                        "balloon settles at {} MiB: growing it no longer lowers the host's footprint",
                        s.actual_mib
                    )
                },
            });
        }
    }
    match pressure(p, host) {
        Pressure::Short(short) => {
            // Inflation already asked for but not yet reached will free
            // host memory by itself: do not ask twice.
            let in_flight: u64 = sandboxes.iter().map(SandboxView::in_flight_gain_mib).sum();
            let mut need = short.saturating_sub(in_flight);
            let mut order: Vec<&SandboxView> =
                sandboxes.iter().filter(|s| !touched(&s.id, &out)).collect();
            order.sort_by_key(|s| std::cmp::Reverse(s.host_gain_mib(p)));
            for s in order {
                if need == 0 {
                    break;
                }
                let gain = s.host_gain_mib(p).min(need);
                if gain == 0 {
                    continue;
                }
                // The balloon first takes the non-resident pages (which
                // gain nothing), then the resident ones.
                let non_resident = s.non_resident_mib().unwrap_or(0);
                need -= gain;
                out.push(Decision {
                    id: s.id.clone(),
                    from_mib: s.target_mib,
                    to_mib: s.target_mib + non_resident + gain,
                    reason: format!(
                        "host short by {short} MiB (available {} MiB): guest has {} MiB free + {} MiB cache, {} MiB of its usable memory not resident on the host, floor {} MiB: frees about {gain} MiB",
                        host.available_mib,
                        s.stats.free_mib,
                        s.stats.caches_mib,
                        non_resident,
                        s.floor_mib(p)
                    ),
                });
            }
        }
        Pressure::Comfortable(spare) => {
            let mut budget = spare;
            // The guests with the least available memory get theirs first.
            let mut order: Vec<&SandboxView> = sandboxes
                .iter()
                .filter(|s| s.target_mib > s.min_balloon_mib() && !touched(&s.id, &out))
                .collect();
            order.sort_by_key(|s| s.stats.available_mib);
            for s in order {
                let give = (s.target_mib - s.min_balloon_mib())
                    .min(p.deflate_step_mib)
                    .min(budget);
                if give == 0 {
                    break;
                }
                budget -= give;
                out.push(Decision {
                    id: s.id.clone(),
                    from_mib: s.target_mib,
                    to_mib: s.target_mib - give,
                    reason: format!(
                        "host has {} MiB available, above the high watermark",
                        host.available_mib
                    ),
                });
            }
        }
        Pressure::Steady => {}
    }
    // Whatever a rule said, a pod's balloon never goes below its reserve.
    for d in &mut out {
        if let Some(s) = sandboxes.iter().find(|s| s.id == d.id) {
            d.to_mib = d.to_mib.max(s.min_balloon_mib());
        }
    }
    out.retain(|d| d.to_mib != d.from_mib);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: PolicyParams = PolicyParams {
        floor_mib: 128,
        headroom_mib: 64,
        low_watermark_mib: 100,
        high_watermark_mib: 300,
        psi_threshold: 10.0,
        deflate_step_mib: 64,
        stale_stats_s: 5,
    };

    fn host(available_mib: u64) -> HostMemory {
        HostMemory {
            total_mib: 1000,
            available_mib,
            overdrawn_mib: 0,
            psi_some_avg10: Some(0.0),
        }
    }

    fn stats(total: u64, free: u64, available: u64, caches: u64) -> GuestMemStats {
        GuestMemStats {
            valid: true,
            total_mib: total,
            free_mib: free,
            available_mib: available,
            caches_mib: caches,
            ..GuestMemStats::default()
        }
    }

    fn view(id: &str, target: u64, s: GuestMemStats) -> SandboxView {
        SandboxView {
            id: id.into(),
            assigned_mib: 512,
            target_mib: target,
            actual_mib: target,
            stats: s,
            recent_working_set_mib: 0,
            stalled: false,
            // Everything the guest may use is resident: the guest's
            // figures alone decide, as in the cases below.
            host_resident_mib: Some(512),
            unproductive: false,
            reserve_mib: 0,
        }
    }

    /// A pod of 192 MiB in a VM booted at 512: 320 MiB of reserve in the
    /// balloon, plus `extra` the policy took; the guest reports `s`.
    fn pod(extra: u64, s: GuestMemStats) -> SandboxView {
        let mut v = view("pod", 320 + extra, s);
        v.reserve_mib = 320;
        v
    }

    #[test]
    fn a_pods_reserve_is_never_given_back_nor_counted_as_reclaimable() {
        // The reserve alone: a guest with plenty free and available, a host
        // with plenty to spare. Nothing moves.
        let idle = pod(0, stats(500, 150, 170, 20));
        assert!(decide(&P, &host(10_000), std::slice::from_ref(&idle)).is_empty());
        // The floor is within the pod's size, not the VM's.
        assert_eq!(idle.size_mib(), 192);
        assert!(idle.floor_mib(&P) <= 192);
        assert!(idle.max_balloon_mib(&P) >= 320);
        // Squeezed, silent, stalled, unusable: the policy gives back only
        // what it took, down to the reserve.
        let mut squeezed = pod(40, stats(500, 5, 10, 5));
        let d = decide(&P, &host(0), std::slice::from_ref(&squeezed));
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].to_mib, 320);
        squeezed.stats.age_s = Some(30);
        assert_eq!(decide(&P, &host(0), &[squeezed])[0].to_mib, 320);
        let mut stalled = pod(100, stats(500, 5, 100, 0));
        stalled.actual_mib = 200;
        stalled.stalled = true;
        let d = decide(&P, &host(0), &[stalled]);
        assert_eq!(d[0].to_mib, 320, "{d:?}");
        // Comfortable: a step of what the policy took, never the reserve.
        let d = decide(&P, &host(10_000), &[pod(30, stats(500, 100, 120, 20))]);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].to_mib, 320);
        // Under pressure only free + cache of the pod's own memory counts:
        // the reserve is not reclaimable.
        let mut cached = pod(0, stats(500, 40, 140, 100));
        cached.host_resident_mib = Some(192);
        assert!(cached.reclaimable_mib(&P) <= 192 - P.floor_mib);
        for d in decide(&P, &host(0), &[cached]) {
            assert!(d.to_mib >= 320 && d.to_mib <= 512 - P.floor_mib, "{d:?}");
        }
    }

    #[test]
    fn no_rule_crosses_a_pods_reserve() {
        let hostile = [
            GuestMemStats::default(),
            stats(512, 512, 512, 512),
            stats(500, 0, 0, 0),
            stats(u64::MAX, u64::MAX, u64::MAX, u64::MAX),
        ];
        for s in hostile {
            for extra in [0, 1, 64, 200] {
                for (stalled, unproductive, age) in [
                    (false, false, None),
                    (true, false, None),
                    (false, true, Some(60)),
                ] {
                    let mut v = pod(extra, s);
                    v.actual_mib = 100 + extra;
                    v.stalled = stalled;
                    v.unproductive = unproductive;
                    v.stats.age_s = age;
                    for avail in [0, 200, 10_000] {
                        for d in decide(&P, &host(avail), std::slice::from_ref(&v)) {
                            assert!(d.to_mib >= 320, "{s:?} {d:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_most_reclaimable_guest_is_inflated_first() {
        let idle = view("idle", 0, stats(500, 50, 450, 350));
        let busy = view("busy", 0, stats(500, 20, 100, 60));
        let d = decide(&P, &host(0), &[busy, idle]);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].id, "idle");
        assert_eq!(d[0].to_mib, 100, "just the shortfall");
        assert!(
            d[0].reason.contains("host short by 100 MiB"),
            "{}",
            d[0].reason
        );
    }

    #[test]
    fn inflation_stops_at_the_floor_then_moves_on() {
        // Working set 50 MiB: floor 128 (the absolute minimum wins over
        // 50 + 64), so at most 384 MiB of balloon.
        let idle = view("idle", 0, stats(500, 50, 450, 400));
        let other = view("other", 0, stats(500, 100, 300, 300));
        assert_eq!(idle.floor_mib(&P), 128);
        // Short by 1000 MiB: idle gives all it can, then the next guest
        // gives what its floor allows (working set 200 + 64 headroom).
        let p = PolicyParams {
            low_watermark_mib: 1000,
            ..P
        };
        let d = decide(&p, &host(0), &[other, idle]);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(d[0].id, "idle");
        assert_eq!(d[0].to_mib, 384);
        assert_eq!(d[1].id, "other");
        // ... and leaving it its 64 MiB headroom of available memory.
        assert_eq!(d[1].to_mib, 300 - 64);
    }

    #[test]
    fn an_overdrawn_pretend_host_counts_the_overdraft() {
        let h = HostMemory {
            overdrawn_mib: 150,
            ..host(0)
        };
        assert_eq!(pressure(&P, &h), Pressure::Short(250));
    }

    #[test]
    fn a_squeezed_guest_gets_memory_back_even_under_pressure() {
        // Balloon 400, the guest has 10 MiB available: a step back, and
        // the host's shortfall goes to the other guest.
        let squeezed = view("squeezed", 400, stats(500, 5, 10, 5));
        let idle = view("idle", 0, stats(500, 50, 450, 350));
        let d = decide(&P, &host(0), &[squeezed, idle]);
        assert_eq!(d[0].id, "squeezed");
        assert_eq!(d[0].to_mib, 400 - 64);
        assert!(d[0].reason.contains("guest short"), "{}", d[0].reason);
        assert_eq!(d[1].id, "idle");
        assert!(d[1].to_mib > 0);
    }

    #[test]
    fn a_guest_that_stops_reporting_gets_a_step_back_and_is_not_inflated() {
        let mut silent = view("silent", 300, stats(500, 50, 450, 350));
        silent.stats.age_s = Some(30);
        let d = decide(&P, &host(0), std::slice::from_ref(&silent));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].to_mib, 300 - 64);
        assert!(d[0].reason.contains("no guest report for 30 s"));
        silent.target_mib = 0;
        silent.actual_mib = 0;
        assert!(decide(&P, &host(0), &[silent]).is_empty());
    }

    #[test]
    fn a_stalled_balloon_settles_and_others_are_asked() {
        let mut stuck = view("stuck", 300, stats(500, 5, 250, 0));
        stuck.actual_mib = 200;
        stuck.stalled = true;
        let other = view("other", 0, stats(500, 50, 450, 350));
        let d = decide(&P, &host(0), &[stuck, other]);
        assert_eq!(d[0].id, "stuck");
        assert_eq!(d[0].to_mib, 200);
        assert!(d[0].reason.contains("stalled"));
        // Its unreached 100 MiB are not counted as coming: other inflates.
        assert_eq!(d[1].id, "other");
        assert_eq!(d[1].to_mib, 100);
    }

    #[test]
    fn a_stale_report_cannot_lower_the_floor() {
        // The report predates a 300 MiB balloon: taken at face value the
        // working set would be 0; the recent maximum (200) holds the floor.
        let mut s = view("a", 300, stats(500, 250, 450, 200));
        s.recent_working_set_mib = 200;
        assert_eq!(s.floor_mib(&P), 264);
        assert_eq!(s.max_balloon_mib(&P), 248);
        let d = decide(&P, &host(0), &[s]);
        assert_eq!(d[0].to_mib, 248);
        assert!(d[0].reason.contains("working set grew"));
    }

    #[test]
    fn in_flight_inflation_is_not_asked_twice() {
        let mut s = view("a", 200, stats(500, 50, 450, 350));
        s.actual_mib = 50;
        let d = decide(&P, &host(0), &[s]);
        assert!(d.is_empty(), "{d:?}");
    }

    #[test]
    fn pressure_from_psi_alone_reclaims_a_step() {
        let h = HostMemory {
            total_mib: 1000,
            available_mib: 200,
            overdrawn_mib: 0,
            psi_some_avg10: Some(50.0),
        };
        let d = decide(&P, &h, &[view("a", 0, stats(500, 50, 450, 350))]);
        assert_eq!(d[0].to_mib, 64);
    }

    #[test]
    fn comfort_deflates_gradually_within_the_spare_memory() {
        let a = view("a", 300, stats(500, 10, 150, 10));
        let b = view("b", 30, stats(500, 10, 100, 10));
        let d = decide(&P, &host(400), &[a.clone(), b.clone()]);
        // 100 MiB spare: b (least available) first gets its 30, a 64.
        assert_eq!(d[0].id, "b");
        assert_eq!(d[0].to_mib, 0);
        assert_eq!(d[1].id, "a");
        assert_eq!(d[1].to_mib, 300 - 64);
        let d = decide(&P, &host(340), &[a, b]);
        assert_eq!(d.iter().map(|d| d.from_mib - d.to_mib).sum::<u64>(), 40);
        // Between the watermarks nothing moves.
        assert!(decide(&P, &host(200), &[view("a", 300, stats(500, 10, 150, 10))]).is_empty());
    }

    #[test]
    fn a_grown_working_set_gets_memory_back_even_under_pressure() {
        // Balloon 300, and lately a working set of 250 MiB: the floor
        // (250 + 64) allows at most 198 MiB.
        let mut s = view("a", 300, stats(500, 5, 100, 0));
        s.recent_working_set_mib = 250;
        let d = decide(&P, &host(0), &[s]);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].to_mib, 198);
        assert!(d[0].reason.contains("working set grew"));
        // Squeezed harder: a whole step back at least.
        let d = decide(&P, &host(0), &[view("a", 300, stats(500, 5, 5, 0))]);
        assert_eq!(d[0].to_mib, 300 - 64);
    }

    #[test]
    fn absurd_or_lying_stats_never_push_past_the_floor() {
        let hostile = [
            // Unusable reports (as sanitize marks them): never inflated.
            GuestMemStats::default(),
            GuestMemStats {
                valid: false,
                total_mib: u64::MAX,
                free_mib: u64::MAX,
                available_mib: u64::MAX,
                caches_mib: u64::MAX,
                ..GuestMemStats::default()
            },
            // Valid-looking lies: "all free", "free beyond everything".
            stats(512, 512, 512, 512),
            stats(u64::MAX, u64::MAX, u64::MAX, u64::MAX),
            stats(1, u64::MAX, 0, u64::MAX),
        ];
        for s in hostile {
            for target in [0, 100, 384, 512, u64::MAX / 2] {
                let mut v = view("h", target, s);
                v.actual_mib = target.min(512);
                for avail in [0, 200, 10_000] {
                    for d in decide(&P, &host(avail), std::slice::from_ref(&v)) {
                        // Never more than the floor allows, never growing a
                        // balloon on an unusable report.
                        if d.to_mib > d.from_mib {
                            assert!(s.valid, "{s:?} {d:?}");
                            assert!(d.to_mib <= 512 - P.floor_mib, "{s:?} {d:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_liar_cannot_make_others_reclaim_less_than_they_should_or_more() {
        // The liar claims everything is reclaimable: it is chosen first and
        // loses only down to its own floor; honest guests stay untouched
        // when that covers the shortfall.
        let liar = view("liar", 0, stats(512, 512, 512, 512));
        let honest = view("honest", 0, stats(500, 100, 300, 100));
        let d = decide(&P, &host(0), &[honest, liar]);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].id, "liar");
        assert!(d[0].to_mib <= 512 - 128);
    }

    #[test]
    fn resident_cache_wins_over_non_resident_free_memory() {
        // "lazy" reports 400 MiB free but holds only 100 MiB on the host:
        // its free memory was never touched. "cached" holds 300 MiB of
        // page cache, all resident. Only "cached" frees host memory.
        let mut lazy = view("lazy", 0, stats(500, 400, 420, 10));
        lazy.host_resident_mib = Some(100);
        let mut cached = view("cached", 0, stats(500, 50, 350, 300));
        cached.host_resident_mib = Some(400);
        assert_eq!(lazy.host_gain_mib(&P), 0);
        assert!(cached.host_gain_mib(&P) >= 100);
        let d = decide(&P, &host(0), &[lazy, cached]);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].id, "cached");
        // Its 112 non-resident MiB come first, then the 100 MiB shortfall.
        assert_eq!(d[0].to_mib, 112 + 100);
        assert!(
            d[0].reason
                .contains("112 MiB of its usable memory not resident"),
            "{}",
            d[0].reason
        );
    }

    #[test]
    fn a_guest_whose_memory_is_not_resident_is_not_inflated() {
        // A freshly booted guest: everything free, little touched.
        let mut fresh = view("fresh", 0, stats(500, 450, 440, 20));
        fresh.host_resident_mib = Some(120);
        assert!(decide(&P, &host(0), std::slice::from_ref(&fresh)).is_empty());
        // 10 MiB of gain behind 366 MiB of non-resident memory: not worth
        // a balloon that large.
        fresh.host_resident_mib = Some(146);
        assert_eq!(fresh.non_resident_mib(), Some(366));
        assert_eq!(fresh.reclaimable_mib(&P), 376);
        assert_eq!(fresh.host_gain_mib(&P), 0);
        assert!(decide(&P, &host(0), std::slice::from_ref(&fresh)).is_empty());
        // Unmeasurable footprint: no proof of a gain, no inflation.
        fresh.host_resident_mib = None;
        assert!(decide(&P, &host(0), &[fresh]).is_empty());
    }

    #[test]
    fn host_gain_never_exceeds_resident_memory_above_the_floor() {
        for resident in [0, 50, 128, 200, 400, 512, u64::MAX] {
            let mut v = view("a", 0, stats(512, 512, 512, 512));
            v.host_resident_mib = Some(resident);
            let gain = v.host_gain_mib(&P);
            assert!(
                gain <= resident.saturating_sub(P.floor_mib),
                "{resident} {gain}"
            );
            for d in decide(&P, &host(0), &[v]) {
                assert!(d.to_mib <= 512 - P.floor_mib, "{d:?}");
            }
        }
    }

    #[test]
    fn in_flight_inflation_over_non_resident_pages_is_not_counted_as_gain() {
        // Target 200, at 50 so far; of the 462 usable MiB only 312 are
        // resident: the remaining 150 MiB of inflation gain nothing, so
        // the shortfall is still asked for.
        let mut s = view("a", 200, stats(500, 300, 450, 150));
        s.actual_mib = 50;
        s.host_resident_mib = Some(312);
        assert_eq!(s.in_flight_gain_mib(), 0);
        let d = decide(&P, &host(0), &[s]);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].to_mib, 300);
    }

    #[test]
    fn an_unproductive_balloon_settles_and_is_not_inflated() {
        let mut s = view("a", 300, stats(500, 50, 300, 250));
        s.actual_mib = 200;
        s.unproductive = true;
        assert_eq!(s.host_gain_mib(&P), 0);
        let d = decide(&P, &host(0), &[s]);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].to_mib, 200);
        assert!(d[0].reason.contains("no longer lowers"), "{}", d[0].reason);
    }

    #[test]
    fn growth_without_host_gain_makes_a_balloon_unproductive() {
        let mut t = GainTracker::default();
        // 512 MiB VM, 400 resident: 112 MiB non-resident to go through.
        assert!(!t.observe(512, 0, 400));
        // Growing over the non-resident pages: nothing expected yet.
        assert!(!t.observe(512, 100, 400));
        // 60 MiB more, expected to pay, and the footprint did not move.
        assert!(t.observe(512, 172, 398));
        // The verdict holds...
        assert!(t.observe(512, 172, 398));
        // ... until the balloon deflates.
        assert!(!t.observe(512, 100, 398));
    }

    #[test]
    fn growth_that_lowers_the_footprint_stays_productive() {
        let mut t = GainTracker::default();
        assert!(!t.observe(512, 0, 512));
        for (balloon, resident) in [(20, 495), (50, 470), (100, 420), (200, 322)] {
            assert!(!t.observe(512, balloon, resident), "{balloon}");
        }
        // A verdict expires after its rounds.
        let mut t = GainTracker::default();
        t.observe(512, 0, 512);
        assert!(t.observe(512, 64, 512));
        let held = (0..100).take_while(|_| t.observe(512, 64, 512)).count();
        assert_eq!(held + 1, GainTracker::HOLD_ROUNDS as usize);
    }
}
