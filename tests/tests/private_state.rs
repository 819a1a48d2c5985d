//! capsid's host state is private: under a permissive umask, another user
//! (nobody) reaches none of a running sandbox's run directory, sockets,
//! logs, records, volume share, or the cached disks; an unsafe state
//! directory is refused; sandboxes whose `namespace-id` spell the same run
//! side by side, and deleting one leaves the other intact.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use capsid_tests::cli::{stderr, Capsid};
use capsid_tests::run;
use capsid_tests::shim::{ShimHarness, BUSYBOX};

/// Every path under `root`, `root` included (as root sees them).
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let p = out[i].clone();
        i += 1;
        let is_dir = std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir());
        if is_dir {
            for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                out.push(e.path());
            }
        }
    }
    out
}

/// As uid/gid 65534: stat, then open (files), list (directories) or
/// connect (sockets) each path; the errno of the first step that failed,
/// 0 where everything succeeded.
fn as_nobody(paths: &[PathBuf]) -> Vec<(PathBuf, i32)> {
    let script = r#"
import os, socket, stat, sys
for p in sys.argv[1:]:
    err = 0
    try:
        st = os.lstat(p)
        if stat.S_ISDIR(st.st_mode):
            os.listdir(p)
        elif stat.S_ISSOCK(st.st_mode):
            s = socket.socket(socket.AF_UNIX); s.connect(p); s.close()
        elif stat.S_ISREG(st.st_mode):
            open(p, 'rb').close()
    except OSError as e:
        err = e.errno
    print(err)
"#;
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            script,
        ])
        .args(paths)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let codes: Vec<i32> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(codes.len(), paths.len());
    paths.iter().cloned().zip(codes).collect()
}

#[test]
fn another_user_reaches_nothing_of_a_running_sandbox_under_umask_000() {
    let c = Capsid::new();
    let data = c.dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    // The test's own directory must be enterable for the check to mean
    // anything: only capsid's modes may stop nobody.
    std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("umask 000; exec \"$@\"")
        .arg("sh")
        .arg(capsid_tests::bin("capsid"))
        .arg("--config")
        .arg(c.config())
        .args(["run", "-v"])
        .arg(format!("{}:/data", data.display()))
        .args([
            "busybox",
            "--",
            "sh",
            "-c",
            "trap 'exit 0' TERM; echo up; sleep 60 & wait",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "up");

    let state = c.dir.path().join("run");
    let cache = c.dir.path().join("cache");
    let mut paths = walk(&state);
    paths.extend(walk(&cache));
    let sockets = paths
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "sock"))
        .count();
    assert!(sockets >= 3, "the sandbox's sockets are there: {paths:?}");
    assert!(
        paths
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "erofs")),
        "{paths:?}"
    );
    for root in [&state, &cache, &cache.join("images")] {
        let mode = std::fs::metadata(root).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", root.display());
    }
    for (path, errno) in as_nobody(&paths) {
        assert_eq!(
            errno,
            13,
            "nobody reached {} (errno {errno})",
            path.display()
        );
    }
    // Every file capsid made is private by its own mode too.
    for p in &paths {
        let Ok(m) = std::fs::symlink_metadata(p) else {
            continue;
        };
        if m.is_file() {
            assert_eq!(m.mode() & 0o077, 0, "{} is {:o}", p.display(), m.mode());
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = child.wait();
    c.assert_no_leftovers();
}

#[test]
fn an_unsafe_state_directory_is_refused() {
    let c = Capsid::new();
    let state = c.dir.path().join("run");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let o = c.run(&["busybox", "--", "true"], None);
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("writable by other users"),
        "{}",
        stderr(&o)
    );
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&state, Some(65534), None).unwrap();
    let o = c.run(&["busybox", "--", "true"], None);
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("belongs to uid 65534"),
        "{}",
        stderr(&o)
    );
    std::os::unix::fs::chown(&state, Some(0), None).unwrap();
    let o = c.run(&["busybox", "--", "true"], None);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    c.assert_no_leftovers();
}

#[test]
fn namespace_and_id_that_spell_the_same_run_side_by_side() {
    let h = ShimHarness::start();
    let tar = capsid_tests::artifact("images/busybox.tar");
    let ctr_in = |ns: &str, args: &[&str]| {
        let mut cmd = h.ctrd.ctr();
        cmd.args(["-n", ns]).args(args);
        cmd
    };
    for ns in ["a-b", "a"] {
        let (code, out, err) = run(ctr_in(ns, &["images", "import"]).arg(&tar));
        assert_eq!(code, 0, "{out}{err}");
    }
    let image = BUSYBOX;
    for (ns, id) in [("a-b", "c"), ("a", "b-c")] {
        let (code, out, err) = run(&mut ctr_in(
            ns,
            &[
                "run",
                "-d",
                "--runtime",
                &h.shim().display().to_string(),
                "--runtime-config-path",
                &h.config().display().to_string(),
                image,
                id,
                "sh",
                "-c",
                &format!("echo {ns}/{id} > /tmp/who; sleep 1000"),
            ],
        ));
        assert_eq!(code, 0, "{ns}/{id}: {out}{err}\n{}", h.log_tail());
    }
    let task_running = |ns: &str, id: &str| {
        let (_, out, _) = run(&mut ctr_in(ns, &["task", "ls"]));
        out.lines()
            .any(|l| l.split_whitespace().next() == Some(id) && l.contains("RUNNING"))
    };
    let wait = std::time::Instant::now();
    while !(task_running("a-b", "c") && task_running("a", "b-c")) {
        assert!(wait.elapsed() < Duration::from_secs(60), "{}", h.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    let runs: Vec<_> = std::fs::read_dir(h.state_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(runs.len(), 2, "two run directories: {runs:?}");
    // Deleting a-b/c leaves a/b-c running, and still answering.
    for args in [
        &["task", "kill", "-s", "KILL", "c"][..],
        &["task", "delete", "-f", "c"],
        &["container", "delete", "c"],
    ] {
        let _ = run(&mut ctr_in("a-b", args));
    }
    assert!(task_running("a", "b-c"));
    let (code, out, err) = run(&mut ctr_in(
        "a",
        &["task", "exec", "--exec-id", "e1", "b-c", "cat", "/tmp/who"],
    ));
    assert_eq!((code, out.as_str()), (0, "a/b-c\n"), "{err}");
    for args in [
        &["task", "kill", "-s", "KILL", "b-c"][..],
        &["task", "delete", "-f", "b-c"],
        &["container", "delete", "b-c"],
    ] {
        let _ = run(&mut ctr_in("a", args));
    }
    let wait = std::time::Instant::now();
    loop {
        let left: Vec<_> = std::fs::read_dir(h.state_dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(wait.elapsed() < Duration::from_secs(30), "left: {left:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
