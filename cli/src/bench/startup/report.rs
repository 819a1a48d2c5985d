//! The result of `capsid bench startup`, as `--json` writes it: every
//! iteration, the summaries (min, median, p90, max) of every phase and
//! total, and the per-run ratios A_i/B_i between runners.

use std::collections::BTreeMap;

use serde::Serialize;

use super::sample::{CapsidRunSample, Iteration, WallSample, MILESTONES, PHASES};
use crate::bench::stats::{self, paired_ratios, summarize_some, Summary};

/// A runner `--compare` could not run, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// The runner's name.
    pub runner: &'static str,
    /// Why it was skipped.
    pub reason: String,
}

/// A measured run that failed.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// The runner's name.
    pub runner: &'static str,
    /// The measured iteration (from 0).
    pub run: u32,
    /// The error, with its causes.
    pub error: String,
}

/// Per-run ratios A_i/B_i of one pair of runners, summarized.
#[derive(Debug, Clone, Serialize)]
pub struct PairRatio {
    /// "A / B".
    pub pair: String,
    /// `None` when no iteration had both.
    pub summary: Option<Summary>,
}

/// The whole result, as written by `--json`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub backend: String,
    pub image: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub command: Vec<String>,
    pub runs: u32,
    pub warmup: u32,
    pub runners: Vec<&'static str>,
    pub skipped: Vec<Skipped>,
    pub failures: Vec<Failure>,
    pub iterations: Vec<Iteration>,
    pub summary: BTreeMap<String, Option<Summary>>,
    pub ratios: Vec<PairRatio>,
    /// `--pool`: what a waiting pooled sandbox costs the host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_idle: Option<crate::bench::pool::PoolIdle>,
}

/// One value per iteration.
pub fn series<F: Fn(&Iteration) -> Option<f64>>(its: &[Iteration], f: F) -> Vec<Option<f64>> {
    its.iter().map(f).collect()
}

/// The wall time of the iteration's `capsid run`.
fn capsid_total(it: &Iteration) -> Option<f64> {
    it.capsid_run.as_ref().map(|s| s.total_ms)
}

/// The summary of every phase, milestone and total, keyed as in the
/// JSON report (`capsid_run.phases.exec_ms`, `ctr_runc.total_ms`, …).
pub fn summaries(its: &[Iteration]) -> BTreeMap<String, Option<Summary>> {
    let mut out = capsid_run_summaries(its);
    out.extend(comparison_summaries(its));
    out
}

/// The summaries of `capsid run`: phases, milestones and totals.
fn capsid_run_summaries(its: &[Iteration]) -> BTreeMap<String, Option<Summary>> {
    let mut out = BTreeMap::new();
    for (name, _) in PHASES {
        let v = series(its, |it| {
            it.capsid_run.as_ref().and_then(|s| s.phases_ms[name])
        });
        out.insert(format!("capsid_run.phases.{name}_ms"), summarize_some(&v));
    }
    for m in MILESTONES {
        let v = series(its, |it| {
            it.capsid_run.as_ref().and_then(|s| s.milestones_ms[m])
        });
        out.insert(format!("capsid_run.milestones.{m}_ms"), summarize_some(&v));
    }
    let cap = |f: fn(&CapsidRunSample) -> Option<f64>| {
        summarize_some(&series(its, |it| it.capsid_run.as_ref().and_then(f)))
    };
    out.insert("capsid_run.total_ms".into(), cap(|s| Some(s.total_ms)));
    out.insert(
        "capsid_run.guest_boot_to_agent_ms".into(),
        cap(|s| s.guest_boot_to_agent_ms),
    );
    out.insert(
        "capsid_run.host_overhead_ms".into(),
        cap(|s| s.host_overhead_ms),
    );
    out.insert(
        "capsid_run.health_rtt_ms".into(),
        cap(|s| s.guest.health_rtt_ms),
    );
    out.insert("capsid_run.capsid_cpu_ms".into(), cap(|s| s.capsid_cpu_ms));
    out
}

/// The summaries of the runners of `--compare`.
fn comparison_summaries(its: &[Iteration]) -> BTreeMap<String, Option<Summary>> {
    let mut out = BTreeMap::new();
    out.insert(
        "ctr_runc.total_ms".into(),
        summarize_some(&series(its, |it| it.ctr_runc.as_ref().map(|s| s.total_ms))),
    );
    out.insert(
        "ctr_capsid.total_ms".into(),
        summarize_some(&series(its, |it| {
            it.ctr_capsid.as_ref().map(|s| s.total_ms)
        })),
    );
    out.insert(
        "ctr_capsid_pool.total_ms".into(),
        summarize_some(&series(its, |it| {
            it.ctr_capsid_pool.as_ref().map(|s| s.total_ms)
        })),
    );
    for (runner, pick) in [
        (
            "ctr_capsid",
            (|it: &Iteration| it.ctr_capsid.as_ref()) as fn(&Iteration) -> Option<&WallSample>,
        ),
        ("ctr_capsid_pool", |it: &Iteration| {
            it.ctr_capsid_pool.as_ref()
        }),
    ] {
        for (phase, value) in SHIM_PHASES {
            out.insert(
                format!("{runner}.phases.{phase}"),
                summarize_some(&series(its, |it| {
                    pick(it).and_then(|s| s.phases.as_ref()).and_then(value)
                })),
            );
        }
    }
    out.insert(
        "bare_boot.kernel_at_init_ms".into(),
        summarize_some(&series(its, |it| {
            it.bare_boot.as_ref().and_then(|b| b.kernel_at_init_ms)
        })),
    );
    out.insert(
        "bare_boot.total_ms".into(),
        summarize_some(&series(its, |it| {
            it.bare_boot.as_ref().map(|b| b.vm_gone_ms)
        })),
    );
    out
}

/// Reads one phase of the shim's.
pub type ShimPhasePick = fn(&crate::bench::shim_phases::ShimPhases) -> Option<f64>;

/// The shim's phases ([`crate::bench::shim_phases`]) by report key.
pub const SHIM_PHASES: [(&str, ShimPhasePick); 6] = [
    ("to_create_ms", |p| p.to_create_ms),
    ("vm_ms", |p| p.vm_ms),
    ("container_ms", |p| p.container_ms),
    ("run_ms", |p| p.run_ms),
    ("teardown_ms", |p| p.teardown_ms),
    ("ctr_exit_ms", |p| p.ctr_exit_ms),
];

/// Reads one runner's value of an iteration.
type Pick = fn(&Iteration) -> Option<f64>;

/// The pairs compared run by run.
fn ratio_pairs() -> Vec<(&'static str, Pick, Pick)> {
    let runc = |it: &Iteration| it.ctr_runc.as_ref().map(|s| s.total_ms);
    let shim = |it: &Iteration| it.ctr_capsid.as_ref().map(|s| s.total_ms);
    let bare = |it: &Iteration| it.bare_boot.as_ref().map(|s| s.vm_gone_ms);
    let pooled = |it: &Iteration| it.ctr_capsid_pool.as_ref().map(|s| s.total_ms);
    let overhead = |it: &Iteration| it.capsid_run.as_ref().and_then(|s| s.host_overhead_ms);
    vec![
        ("capsid run / ctr run (runc)", capsid_total, runc),
        ("ctr run (capsid shim) / ctr run (runc)", shim, runc),
        ("ctr run (capsid shim) / capsid run", shim, capsid_total),
        (
            "ctr run (capsid shim, pooled) / ctr run (capsid shim)",
            pooled,
            shim,
        ),
        (
            "ctr run (capsid shim, pooled) / ctr run (runc)",
            pooled,
            runc,
        ),
        ("capsid run / bare VM boot", capsid_total, bare),
        ("capsid host overhead / ctr run (runc)", overhead, runc),
    ]
}

/// The per-run ratios of every pair of [`ratio_pairs`], summarized.
pub fn ratios(its: &[Iteration]) -> Vec<PairRatio> {
    ratio_pairs()
        .into_iter()
        .map(|(pair, a, b)| PairRatio {
            pair: pair.into(),
            summary: stats::summarize(&paired_ratios(&series(its, a), &series(its, b))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::startup::sample::tests::record;
    use crate::bench::startup::sample::WallSample;

    #[test]
    fn report_json_has_every_phase_of_every_run() {
        let s = CapsidRunSample::from_record(&record(), 1_000_000_000, 2_720_000_000);
        let it = Iteration {
            index: 0,
            order: vec!["capsid_run", "ctr_runc"],
            capsid_run: Some(s),
            ctr_runc: Some(WallSample {
                total_ms: 110.0,
                phases: None,
            }),
            ..Iteration::default()
        };
        let its = vec![it];
        let v = serde_json::to_value(Report {
            schema: "capsid-bench-startup/1",
            backend: "qemu-tcg".into(),
            image: "busybox".into(),
            memory_mib: 256,
            vcpus: 1,
            command: vec!["echo".into()],
            runs: 1,
            warmup: 0,
            runners: vec!["capsid_run", "ctr_runc"],
            skipped: vec![],
            failures: vec![],
            summary: summaries(&its),
            ratios: ratios(&its),
            iterations: its,
            pool_idle: None,
        })
        .unwrap();
        let run = &v["iterations"][0]["capsid_run"];
        for (name, _) in PHASES {
            assert!(run["phases_ms"][name].is_f64(), "{name}");
        }
        for m in MILESTONES {
            assert!(run["milestones_ms"][m].is_f64(), "{m}");
        }
        assert_eq!(v["iterations"][0]["ctr_runc"]["total_ms"], 110.0);
        assert!(v["iterations"][0]["bare_boot"].is_null());
        assert_eq!(v["summary"]["ctr_runc.total_ms"]["median"], 110.0);
        let r = &v["ratios"][0];
        assert_eq!(r["pair"], "capsid run / ctr run (runc)");
        assert!((r["summary"]["median"].as_f64().unwrap() - 1720.0 / 110.0).abs() < 1e-9);
    }
}
