//! Memory lent, not given: real guests under QEMU-TCG give memory back to
//! the host. Free page reporting returns what a guest frees with no host
//! action; the balloon policy, under a pretend host that is short of
//! memory, takes an idle guest's page cache and gives it back once the
//! pressure passes; over-assignment beyond the configured ratio is refused
//! before anything starts; `capsid check` tells whether a coordinator runs.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsid_sandbox::backend::qemu::QemuBackend;
use capsid_sandbox::backend::DiskSpec;
use capsid_sandbox::balloon::coordinator::{Coordinator, HostSource};
use capsid_sandbox::balloon::registry::Registry;
use capsid_sandbox::balloon::{BalloonError, BalloonStatus};
use capsid_sandbox::config::{BackendKind, Config};
use capsid_sandbox::sandbox::{Sandbox, SandboxError, SandboxOptions};
use capsid_tests::cachefill::{random_file_erofs, start_detached, CACHE_SERIAL};
use capsid_tests::sandbox::{erofs_from_layout, run_container, sh, test_config};
use capsid_tests::{artifact, bin};

/// Starts a QEMU-TCG sandbox of `memory_mib` with the busybox rootfs and
/// `extra` disks.
async fn start(
    config: &Config,
    dir: &Path,
    id: &str,
    memory_mib: u32,
    extra: Vec<DiskSpec>,
) -> Sandbox {
    let rootfs = erofs_from_layout(&artifact("images/busybox"), &dir.join("busybox.erofs"));
    let backend = Arc::new(
        QemuBackend::new(
            BackendKind::QemuTcg,
            Path::new("qemu-system-x86_64"),
            &config.paths.vhost,
        )
        .unwrap(),
    );
    let mut disks = vec![capsid_tests::sandbox::busybox_layer().disk_spec(rootfs)];
    disks.extend(extra);
    let opts = SandboxOptions {
        id: id.into(),
        vcpus: 1,
        memory_mib,
        disks,
        ..Default::default()
    };
    Sandbox::start(config, backend, opts).await.unwrap()
}

/// Host memory QEMU holds for the VM: its own resident memory plus the
/// allocated part of the guest RAM memfd (which also holds pages only a
/// vhost-user device process wrote, such as disk reads).
fn qemu_memory_mib(sb: &Sandbox) -> u64 {
    let pid = sb.pids()[0];
    capsid_sandbox::balloon::host::vm_footprint_mib(pid).expect("QEMU is running")
}

fn balloon(sb: &Sandbox) -> BalloonStatus {
    sb.balloon().unwrap().status().unwrap()
}

/// Polls `f` every 200 ms until it returns `Some`, or panics with `what`
/// after `limit` (a guard against hanging, not a speed requirement).
async fn poll<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_page_reporting_returns_freed_memory_without_any_policy() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let sb = start(&config, dir.path(), "fpr", 512, Vec::new()).await;
    let before = qemu_memory_mib(&sb);

    // The container fills 200 MiB of its tmpfs upper layer, holds it a
    // moment, and frees it; a sampler records QEMU's peak meanwhile.
    let peak = Arc::new(AtomicU64::new(before));
    let done = Arc::new(AtomicBool::new(false));
    let pid = sb.pids()[0];
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                if let Some(rss) = capsid_sandbox::balloon::host::vm_footprint_mib(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let out = run_container(
        &sb,
        "filler",
        &sh("dd if=/dev/zero of=/fill bs=1M count=200 2>/dev/null && sync && sleep 3 && rm /fill && echo freed"),
        b"",
    )
    .await;
    done.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "freed\n", "{out:?}");
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        peak >= before + 180,
        "the guest's 200 MiB never showed on the host: {before} -> {peak} MiB"
    );

    // No balloon target was ever set: what comes back is reported free pages.
    let t0 = Instant::now();
    let after = poll(
        "QEMU's RSS to drop by 150 MiB",
        Duration::from_secs(120),
        || {
            let rss = qemu_memory_mib(&sb);
            (peak.saturating_sub(rss) >= 150).then_some(rss)
        },
    )
    .await;
    eprintln!(
        "free page reporting: QEMU memory {before} MiB at boot, {peak} MiB peak, {after} MiB {:.1} s after the free",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(balloon(&sb).actual_mib, 0, "no balloon was involved");
    sb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reclaims_an_idle_guests_cache_and_gives_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    // Small floors so the test's guest can give most of its cache; fast
    // rounds and big deflate steps so the test does not drag on.
    config.memory.floor_mib = 48;
    config.memory.headroom_mib = 16;
    config.memory.interval_ms = 500;
    config.memory.deflate_step_mib = 128;
    let cache_disk = random_file_erofs(dir.path(), 240);
    let sb = start(
        &config,
        dir.path(),
        "idle",
        512,
        vec![DiskSpec {
            path: cache_disk,
            readonly: true,
            serial: CACHE_SERIAL.into(),
        }],
    )
    .await;
    let registry = Registry::new(&config.paths.state_dir);
    let entries = registry.entries().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].assigned_mib, 512);
    assert!(entries[0].balloon.is_some());

    // The guest reads 240 MiB of files into its page cache, then idles.
    let _reader = start_detached(
        &sb,
        "reader",
        "cat /cachefill > /dev/null && echo ready && exec sleep 100000",
        "ready",
    )
    .await;
    let cached = poll(
        "the guest to report 200 MiB of cache",
        Duration::from_secs(180),
        || {
            let s = balloon(&sb).stats;
            (s.valid && s.caches_mib >= 200).then_some(s)
        },
    )
    .await;
    // Let the reader settle into its sleep.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = qemu_memory_mib(&sb);

    // A pretend host 200 MiB smaller than what the VM holds: short.
    let host_mib = Arc::new(AtomicU64::new(before.saturating_sub(200)));
    let stop = Arc::new(AtomicBool::new(false));
    let coordinator = {
        let mut c = Coordinator::new(
            config.memory.clone(),
            registry.clone(),
            HostSource::Pretend(host_mib.clone()),
        );
        let stop = stop.clone();
        std::thread::spawn(move || c.run(&stop, false))
    };
    let t0 = Instant::now();
    let reclaimed = poll(
        "QEMU's RSS to fall by 150 MiB",
        Duration::from_secs(120),
        || {
            let rss = qemu_memory_mib(&sb);
            (before.saturating_sub(rss) >= 150).then_some(rss)
        },
    )
    .await;
    let took = t0.elapsed();
    let status = balloon(&sb);
    eprintln!(
        "policy: guest cache {} MiB; QEMU memory {before} -> {reclaimed} MiB in {:.1} s; balloon {} MiB",
        cached.caches_mib,
        took.as_secs_f64(),
        status.actual_mib
    );
    assert!(status.actual_mib > 0, "the balloon did the work");
    // Bad input: a balloon larger than the VM is refused, nothing changes.
    let e = sb.balloon().unwrap().set_target(513).unwrap_err();
    assert!(matches!(e, BalloonError::TargetTooLarge { .. }), "{e}");
    // Never past the floor: the guest keeps at least floor_mib usable.
    assert!(u64::from(512 - status.actual_mib) >= config.memory.floor_mib);

    // The guest keeps running: its idle container is still there.
    let procs = sb.agent().list_processes("reader").await.unwrap();
    assert!(!procs.is_empty(), "the idle container still runs");

    // Pressure passes: the balloon deflates all the way, step by step.
    host_mib.store(1 << 20, Ordering::Relaxed);
    poll("the balloon to deflate", Duration::from_secs(120), || {
        let b = balloon(&sb);
        (b.actual_mib == 0).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    coordinator.join().unwrap();

    // And the guest can use its memory again: a container allocates 200 MiB.
    let out = run_container(
        &sb,
        "again",
        &sh("dd if=/dev/zero of=/fill bs=1M count=200 2>/dev/null && ls -l /fill | awk '{print $5}'"),
        b"",
    )
    .await;
    assert_eq!(out.status, 0, "{out:?}");
    assert!(!out.oom_killed);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "209715200");

    // `capsid stats` shows the sandbox (when the CLI is built alongside).
    let config_file = dir.path().join("config.toml");
    std::fs::write(&config_file, toml::to_string(&config).unwrap()).unwrap();
    let stats = std::process::Command::new(bin("capsid"))
        .arg("--config")
        .arg(&config_file)
        .args(["stats", "--json"])
        .output()
        .unwrap();
    assert!(stats.status.success(), "{stats:?}");
    let list: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(list[0]["id"], "idle");
    assert_eq!(list[0]["assigned_mib"], 512);
    assert!(list[0]["touched_mib"].as_u64().unwrap() > 100);
    assert_eq!(list[0]["balloon_mib"], 0);

    sb.stop().await;
    assert!(
        registry.entries().unwrap().is_empty(),
        "deregistered on stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overassignment_beyond_the_ratio_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.memory.pretend_host_mib = Some(1024);
    config.memory.overcommit_ratio = 1.5;
    let backend = Arc::new(
        QemuBackend::new(
            BackendKind::QemuTcg,
            Path::new("qemu-system-x86_64"),
            &config.paths.vhost,
        )
        .unwrap(),
    );
    let opts = SandboxOptions {
        id: "toobig".into(),
        vcpus: 1,
        memory_mib: 2048,
        ..Default::default()
    };
    let e = Sandbox::start(&config, backend, opts).await.unwrap_err();
    assert!(
        matches!(e, SandboxError::Balloon(BalloonError::Overcommitted { .. })),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.contains("2048 MiB") && text.contains("1536 MiB"),
        "{text}"
    );
    assert!(
        !config.paths.state_dir.join("toobig").exists(),
        "no run directory"
    );
    assert!(Registry::new(&config.paths.state_dir)
        .entries()
        .unwrap()
        .is_empty());
}

/// Kills and reaps a child process when dropped, so a failing assertion
/// leaves no coordinator behind.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capsid_check_reports_whether_the_coordinator_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.memory.pretend_host_mib = Some(1024);
    let config_file = dir.path().join("config.toml");
    std::fs::write(&config_file, toml::to_string(&config).unwrap()).unwrap();
    let check = || {
        let out = std::process::Command::new(bin("capsid"))
            .arg("--config")
            .arg(&config_file)
            .args(["check", "--json"])
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        report["balloon_coordinator"]["running"].as_bool()
    };
    assert_eq!(check(), Some(false));
    let mut daemon = Reaped(
        std::process::Command::new(bin("capsid-balloond"))
            .arg("--config")
            .arg(&config_file)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    poll(
        "capsid check to see the coordinator",
        Duration::from_secs(30),
        || (check() == Some(true)).then_some(()),
    )
    .await;
    // Probes never block or take the role, however many there are, and a
    // second coordinator still steps aside.
    let registry = Registry::new(&config.paths.state_dir);
    for _ in 0..500 {
        assert!(registry.coordinator_running().unwrap());
    }
    assert_eq!(check(), Some(true));
    let second = std::process::Command::new(bin("capsid-balloond"))
        .arg("--config")
        .arg(&config_file)
        .output()
        .unwrap();
    assert!(second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another coordinator runs"),
        "{second:?}"
    );
    // SIGTERM ends it cleanly, and the role is free again.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(daemon.0.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = daemon.0.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(check(), Some(false));
    // Without the memory policy there is nothing to report.
    config.memory.enabled = false;
    std::fs::write(&config_file, toml::to_string(&config).unwrap()).unwrap();
    assert_eq!(check(), None);
    // ... and the daemon refuses to start with the status a service
    // manager is told not to restart on (EX_CONFIG).
    let disabled = std::process::Command::new(bin("capsid-balloond"))
        .arg("--config")
        .arg(&config_file)
        .output()
        .unwrap();
    assert_eq!(disabled.status.code(), Some(78), "{disabled:?}");
    assert!(
        String::from_utf8_lossy(&disabled.stderr).contains("memory.enabled is false"),
        "{disabled:?}"
    );
}
