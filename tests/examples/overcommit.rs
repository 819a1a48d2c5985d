//! Over-assignment demo (a benchmark, not a test): N QEMU-TCG sandboxes
//! whose assigned memory sums to twice a pretend host's size take turns
//! being busy. In its phase a sandbox reads a 200 MiB file into its page
//! cache (kept by an idle container) and fills 150 MiB of tmpfs for a few
//! seconds; the others idle. The balloon coordinator runs in-process
//! against the pretend host. Every round's per-sandbox host memory,
//! balloon and guest figures go to a CSV; a summary (peak total host
//! memory, OOM kills, survivors) goes to stdout as JSON, and each balloon
//! change with its reason to stderr.
//!
//! ```text
//! cargo run -p capsid-tests --example overcommit -- [--sandboxes 4] \
//!     [--memory-mib 512] [--host-mib 1024] [--no-policy] [--csv out.csv]
//!     (default --csv: target/overcommit.csv)
//! benches/overcommit-plot.py out.csv docs/memory-overcommit.svg
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsid_sandbox::backend::qemu::QemuBackend;
use capsid_sandbox::backend::DiskSpec;
use capsid_sandbox::balloon::coordinator::{Coordinator, HostSource};
use capsid_sandbox::balloon::registry::Registry;
use capsid_sandbox::config::BackendKind;
use capsid_sandbox::sandbox::{Sandbox, SandboxOptions};
use capsid_tests::artifact;
use capsid_tests::cachefill::{random_file_erofs, start_detached, CACHE_SERIAL};
use capsid_tests::sandbox::{busybox_layer, erofs_from_layout, run_container, sh, test_config};

const CACHE_MIB: usize = 200;
const WORK_MIB: usize = 150;

struct Args {
    sandboxes: usize,
    memory_mib: u32,
    host_mib: u64,
    policy: bool,
    csv: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        sandboxes: 4,
        memory_mib: 512,
        host_mib: 1024,
        policy: true,
        // Generated output goes under target/, never into the checkout.
        csv: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/overcommit.csv"
        )),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().expect("a value after the option");
        match arg.as_str() {
            "--sandboxes" => a.sandboxes = value().parse().expect("a count"),
            "--memory-mib" => a.memory_mib = value().parse().expect("MiB"),
            "--host-mib" => a.host_mib = value().parse().expect("MiB"),
            "--csv" => a.csv = PathBuf::from(value()),
            "--no-policy" => a.policy = false,
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// One sample row.
#[derive(Clone)]
struct Sample {
    t: f64,
    phase: i64,
    /// The pretend host's size.
    limit: u64,
    /// Per sandbox: host MiB, balloon MiB, guest cache MiB.
    per: Vec<(u64, u64, u64)>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.memory.pretend_host_mib = Some(a.host_mib);
    config.memory.interval_ms = 500;
    // A phase's burst (200 MiB of cache + 150 MiB of work) arrives
    // within a round or two: the low watermark keeps that much spare.
    config.memory.low_watermark_percent = 35;
    config.memory.high_watermark_percent = 45;
    config.memory.floor_mib = 96;
    config.memory.headroom_mib = 64;
    config.memory.overcommit_ratio = 2.0;
    let rootfs = erofs_from_layout(
        &artifact("images/busybox"),
        &dir.path().join("busybox.erofs"),
    );
    let cache_disk = random_file_erofs(dir.path(), CACHE_MIB);
    let backend = Arc::new(
        QemuBackend::new(
            BackendKind::QemuTcg,
            Path::new("qemu-system-x86_64"),
            &config.paths.vhost,
        )
        .unwrap(),
    );

    // The coordinator watches from the start: it sees the sandboxes as
    // they register.
    let registry = Registry::new(&config.paths.state_dir);
    let host = Arc::new(AtomicU64::new(if a.policy { a.host_mib } else { 1 << 30 }));
    let mut coordinator = Coordinator::new(
        config.memory.clone(),
        registry.clone(),
        HostSource::Pretend(host.clone()),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let phase = Arc::new(std::sync::atomic::AtomicI64::new(-1));
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let decisions = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let ids: Vec<String> = (0..a.sandboxes).map(|i| format!("sb{i}")).collect();
    let watcher = {
        let host_for_samples = host.clone();
        let (stop, phase, samples, decisions, ids) = (
            stop.clone(),
            phase.clone(),
            samples.clone(),
            decisions.clone(),
            ids.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                if let Ok(round) = coordinator.round() {
                    decisions.fetch_add(round.decisions.len() as u64, Ordering::Relaxed);
                    // Each change with its reason, as capsid-balloond logs it.
                    for d in &round.decisions {
                        eprintln!(
                            "{:6.1} s {}: balloon {} -> {} MiB: {}",
                            t0.elapsed().as_secs_f64(),
                            d.id,
                            d.from_mib,
                            d.to_mib,
                            d.reason
                        );
                    }
                    let per = ids
                        .iter()
                        .map(|id| {
                            round.sandboxes.iter().find(|s| &s.entry.id == id).map_or(
                                (0, 0, 0),
                                |s| {
                                    let b = s.balloon.unwrap_or_default();
                                    (
                                        s.rss_mib.unwrap_or(0),
                                        u64::from(b.actual_mib),
                                        if b.stats.valid { b.stats.caches_mib } else { 0 },
                                    )
                                },
                            )
                        })
                        .collect();
                    samples.lock().unwrap().push(Sample {
                        t: t0.elapsed().as_secs_f64(),
                        phase: phase.load(Ordering::Relaxed),
                        limit: host_for_samples.load(Ordering::Relaxed),
                        per,
                    });
                }
                std::thread::sleep(Duration::from_millis(500).saturating_sub(started.elapsed()));
            }
        })
    };

    let mut sandboxes = Vec::new();
    for id in &ids {
        let opts = SandboxOptions {
            id: id.clone(),
            vcpus: 1,
            memory_mib: a.memory_mib,
            disks: vec![
                busybox_layer().disk_spec(rootfs.clone()),
                DiskSpec {
                    path: cache_disk.clone(),
                    readonly: true,
                    serial: CACHE_SERIAL.into(),
                },
            ],
            ..Default::default()
        };
        sandboxes.push(
            Sandbox::start(&config, backend.clone(), opts)
                .await
                .unwrap(),
        );
    }
    eprintln!(
        "{} sandboxes up at {:.1} s",
        sandboxes.len(),
        t0.elapsed().as_secs_f64()
    );

    let mut oom_kills = 0;
    // The idle containers' stdout, kept open while they run.
    let mut cache_streams = Vec::new();
    let mut failures = 0;
    for (i, sb) in sandboxes.iter().enumerate() {
        phase.store(i as i64, Ordering::Relaxed);
        eprintln!("phase {i} at {:.1} s", t0.elapsed().as_secs_f64());
        // An idle container keeps the read file's pages cached; it says
        // when the read is done.
        let stdout = start_detached(
            sb,
            "cache",
            "cat /cachefill > /dev/null; echo cached; exec sleep 100000",
            "cached",
        )
        .await;
        cache_streams.push(stdout);
        // Working memory: 150 MiB of tmpfs, held a few seconds, freed.
        let out = run_container(
            sb,
            "work",
            &sh(&format!(
                "dd if=/dev/zero of=/work bs=1M count={WORK_MIB} 2>/dev/null && sleep 5 && rm /work"
            )),
            b"",
        )
        .await;
        if out.oom_killed {
            oom_kills += 1;
        }
        if out.status != 0 {
            failures += 1;
            eprintln!(
                "phase {i}: work exited {} {:?}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    phase.store(a.sandboxes as i64, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(10)).await;
    // Relief: the host doubles (other work ended); the balloons deflate.
    let peak_before_relief = samples
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.per.iter().map(|p| p.0).sum::<u64>())
        .max()
        .unwrap_or(0);
    if a.policy {
        host.store(a.host_mib * 2, Ordering::Relaxed);
    }
    phase.store(a.sandboxes as i64 + 1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(15)).await;

    // Survivors: every agent still answers.
    let mut alive = 0;
    for sb in &sandboxes {
        if sb.agent().health().await.is_ok() {
            alive += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    drop(cache_streams);
    for sb in sandboxes {
        sb.stop().await;
    }

    let samples = samples.lock().unwrap().clone();
    let mut csv = String::from("t,phase,limit_mib,total_mib");
    for id in &ids {
        csv.push_str(&format!(",{id}_host_mib,{id}_balloon_mib,{id}_cache_mib"));
    }
    csv.push('\n');
    let mut peak = 0;
    for s in &samples {
        let total: u64 = s.per.iter().map(|p| p.0).sum();
        peak = peak.max(total);
        csv.push_str(&format!("{:.2},{},{},{total}", s.t, s.phase, s.limit));
        for p in &s.per {
            csv.push_str(&format!(",{},{},{}", p.0, p.1, p.2));
        }
        csv.push('\n');
    }
    std::fs::write(&a.csv, csv).unwrap();
    let summary = serde_json::json!({
        "sandboxes": a.sandboxes,
        "assigned_mib_each": a.memory_mib,
        "assigned_mib_total": u64::from(a.memory_mib) * a.sandboxes as u64,
        "pretend_host_mib": a.host_mib,
        "policy": a.policy,
        "peak_total_host_mib": peak,
        "peak_total_host_mib_under_the_limit": peak_before_relief,
        "balloons_at_end_mib": samples.last().map(|s| s.per.iter().map(|p| p.1).collect::<Vec<_>>()),
        "balloon_changes": decisions.load(Ordering::Relaxed),
        "oom_kills": oom_kills,
        "failed_phases": failures,
        "alive_at_end": alive,
        "duration_s": t0.elapsed().as_secs_f64(),
        "csv": a.csv,
    });
    println!("{}", serde_json::to_string_pretty(&summary).unwrap());
}
