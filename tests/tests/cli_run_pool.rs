//! `capsid run` with a pool (docs/pool.md): it takes a sandbox that
//! `capsid-poold` booted ahead of time, drives its warm shim through the
//! Task API, and leaves nothing; without a fitting sandbox it boots cold
//! and says why. QEMU-TCG sandboxes.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use capsid_sandbox::config::{Config, PoolShapeConfig};
use capsid_tests::cli::{stderr, stdout, Capsid};
use capsid_tests::pool::PoolDaemon;

const LONG: Duration = Duration::from_secs(180);

/// Turns the pool on in `c`'s config: one shape, the default VM (1 vCPU,
/// 256 MiB), one sandbox kept.
fn enable_pool(c: &Capsid) {
    let mut config = Config::read(c.config()).unwrap();
    config.pool.enabled = true;
    config.pool.shapes = vec![PoolShapeConfig {
        vcpus: 1,
        memory_mib: 256,
        size: 1,
        max_memory_mib: 0,
    }];
    std::fs::write(c.config(), toml::to_string(&config).unwrap()).unwrap();
}

/// `capsid run ARGS` logging at info level (where the pool's choice is
/// said), `stdin` as its standard input.
fn run(c: &Capsid, args: &[&str], stdin: Option<&Path>) -> Output {
    let mut cmd = c.run_cmd(args);
    cmd.env("CAPSID_LOG", "info");
    match stdin {
        Some(p) => cmd.stdin(std::fs::File::open(p).unwrap()),
        None => cmd.stdin(Stdio::null()),
    };
    cmd.output().unwrap()
}

#[test]
fn a_run_takes_a_pooled_sandbox_and_leaves_nothing() {
    let c = Capsid::new();
    enable_pool(&c);
    let daemon = PoolDaemon::start(c.config());
    daemon.wait_ready(1, LONG);

    let input = c.dir.path().join("input");
    std::fs::write(&input, "from stdin\n").unwrap();
    // A volume, as for a cold run (apart from capsid's own directories).
    let vol = tempfile::tempdir().unwrap();
    std::fs::write(vol.path().join("f"), "from the host\n").unwrap();
    let bind = format!("{}:/data", vol.path().display());
    let o = run(
        &c,
        &[
            "-v",
            &bind,
            "busybox",
            "--",
            "sh",
            "-c",
            "cat; cat /data/f; echo out; echo err >&2; echo written > /data/g; exit 3",
        ],
        Some(&input),
    );
    let err = stderr(&o);
    assert_eq!(stdout(&o), "from stdin\nfrom the host\nout\n", "{err}");
    assert_eq!(
        std::fs::read_to_string(vol.path().join("g")).unwrap(),
        "written\n"
    );
    assert!(err.contains("err\n"), "{err}");
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("the run takes a pooled sandbox"),
        "not pooled:\n{err}"
    );

    // The one sandbox was taken; the next run boots cold while the daemon
    // refills, or takes the refilled one: either way it runs.
    let o = run(&c, &["--", "echo", "again"], None);
    assert_eq!(stdout(&o), "again\n", "{}", stderr(&o));
    drop(daemon);
    c.assert_no_leftovers();
}

#[test]
fn without_the_daemon_a_run_boots_cold_and_says_why() {
    let c = Capsid::new();
    enable_pool(&c);
    let o = run(&c, &["--", "echo", "cold"], None);
    let err = stderr(&o);
    assert_eq!(stdout(&o), "cold\n", "{err}");
    assert!(err.contains("capsid-poold is not running"), "{err}");
    // A size no shape holds.
    let o = run(&c, &["--memory", "512", "--", "echo", "cold"], None);
    let err = stderr(&o);
    assert_eq!(stdout(&o), "cold\n", "{err}");
    assert!(
        err.contains("no [[pool.shapes]] entry fits 1 vCPUs and 512 MiB"),
        "{err}"
    );
    c.assert_no_leftovers();
}

#[test]
fn a_killed_pooled_run_takes_its_sandbox_down_with_it() {
    let c = Capsid::new();
    enable_pool(&c);
    let daemon = PoolDaemon::start(c.config());
    daemon.wait_ready(1, LONG);
    let mut cmd = c.run_cmd(&["--", "sleep", "1000"]);
    cmd.env("CAPSID_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut running = cmd.spawn().unwrap();
    // Running once the claimed sandbox's directory holds a task socket.
    let state = Config::read(c.config()).unwrap().paths.state_dir;
    let dir = state.join(format!("run-{}.pooled", running.id()));
    let deadline = std::time::Instant::now() + LONG;
    while !dir.join("bundle/rootfs/bin").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        dir.join("task.sock").exists(),
        "the run did not take the pooled sandbox"
    );
    std::thread::sleep(Duration::from_secs(2));
    running.kill().unwrap();
    running.wait().unwrap();
    // The warm shim sees its claimant gone, and takes the task and the VM
    // down; its socket goes last.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while dir.join("task.sock").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !dir.join("task.sock").exists(),
        "the claimed shim still serves"
    );
    drop(daemon);
    // The next run removes the dead run's directory.
    let o = run(&c, &["--no-pool", "--", "true"], None);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!dir.exists(), "{} is left", dir.display());
    c.assert_no_leftovers();
}

#[test]
fn a_pooled_run_with_a_terminal() {
    let c = Capsid::new();
    enable_pool(&c);
    let daemon = PoolDaemon::start(c.config());
    daemon.wait_ready(1, LONG);
    let (text, code) = c.run_under_pty(
        "CAPSID_LOG=info",
        "--tty -- sh -c 'tty; stty size; echo hello-tty; exit 4'",
    );
    assert!(text.contains("the run takes a pooled sandbox"), "{text}");
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("hello-tty"), "{text}");
    assert_eq!(code, Some(4), "{text}");
    drop(daemon);
    c.assert_no_leftovers();
}
