//! capsid's shim under stress and failure: bad input refused with one
//! clear error and nothing left, concurrent containers, the VM, one of its
//! device processes or the shim killed with SIGKILL, and a batch of run/delete cycles that must leave no
//! processes, mounts, files or containerd fds behind.

use std::time::{Duration, Instant};

use capsid_tests::shim::{Background, ShimHarness, BUSYBOX};

const LONG: Duration = Duration::from_secs(120);
/// Run/delete cycles of the leak check (`CAPSID_SHIM_CYCLES` overrides: 100
/// by hand takes about four minutes under TCG).
const CYCLES: usize = 10;

#[test]
fn bad_input_fails_create_with_one_clear_error() {
    let h = ShimHarness::start();
    let bad_kernel = h.config().with_file_name("missing-kernel.toml");
    let text = std::fs::read_to_string(h.config()).unwrap();
    let text = text.replace("vmlinux\"", "vmlinux-missing\"");
    std::fs::write(&bad_kernel, text).unwrap();
    let bad_kernel = bad_kernel.display().to_string();
    // The test's own network namespace is the host's.
    let host_netns = format!("network:/proc/{}/ns/net", std::process::id());
    let cases: [(&str, Vec<&str>, &str); 7] = [
        (
            "b1",
            vec!["--annotation", "io.capsid.vcpus=lots"],
            "annotation io.capsid.vcpus=\"lots\": not a whole number",
        ),
        (
            "b2",
            vec!["--annotation", "io.capsid.memory_mib=8"],
            "annotation io.capsid.memory_mib=\"8\": must be between 64",
        ),
        (
            "b3",
            vec!["--mount", "type=bind,src=/tmp,dst=/host,options=rbind:rw"],
            "/tmp is in or holds capsid's own directory",
        ),
        (
            "b4",
            vec!["--runtime-config-path", &bad_kernel],
            "vmlinux-missing does not exist",
        ),
        (
            "b5",
            vec!["--annotation", "io.capsid.vcpus=99"],
            "annotation io.capsid.vcpus=\"99\": must be between 1 and 32",
        ),
        (
            "b6",
            vec!["--with-ns", &host_netns],
            "this is the host's own network namespace",
        ),
        (
            "b7",
            vec!["--net-host"],
            "asks for the host's network namespace",
        ),
    ];
    for (id, flags, expected) in &cases {
        let mut all = vec!["--rm"];
        all.extend(flags);
        let (code, out, err) = capsid_tests::run(&mut h.run_cmd(&all, BUSYBOX, id, &["true"]));
        assert_ne!(code, 0, "{id} ran: {out}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("ctr: ")).collect();
        assert_eq!(errors.len(), 1, "{id}: {err}");
        assert!(errors[0].contains(expected), "{id}: {err}");
    }
    // A rootfs that is the host's own root (`ctr run --rootfs /`).
    let (code, out, err) =
        capsid_tests::run(&mut h.run_cmd(&["--rm", "--rootfs"], "/", "b8", &["true"]));
    assert_ne!(code, 0, "b8 ran: {out}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("ctr: ")).collect();
    assert_eq!(errors.len(), 1, "b8: {err}");
    assert!(
        errors[0].contains("root path / is part of the host's own file system"),
        "b8: {err}"
    );
    let mut ids: Vec<&str> = cases.iter().map(|c| c.0).collect();
    ids.push("b8");
    h.assert_clean(&ids);
    let (_, out, _) = h.ctr(&["container", "ls", "-q"]);
    assert_eq!(out.trim(), "", "containers left: {out}");
}

#[test]
fn ten_concurrent_containers_succeed_and_clean_up() {
    let h = ShimHarness::start();
    let ids: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    let runs: Vec<Background> = ids
        .iter()
        .map(|id| {
            Background::spawn(h.run_cmd(
                &["--rm"],
                BUSYBOX,
                id,
                &["sh", "-c", &format!("echo ok-{id}")],
            ))
        })
        .collect();
    for (id, bg) in ids.iter().zip(runs) {
        let (code, out, err) = bg.wait(Duration::from_secs(300));
        assert_eq!(code, 0, "{id}: {err}\n{}", h.log_tail());
        assert_eq!(out, format!("ok-{id}\n"));
    }
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    h.assert_clean(&ids);
}

#[test]
fn killing_the_vm_ends_the_task_with_a_fault() {
    let h = ShimHarness::start();
    h.run_detached("v1", &["sleep", "1000"]);
    let pids = h.vm_pids("v1");
    let qemu = pids
        .iter()
        .copied()
        .find(|p| {
            capsid_tests::shim::cmdline(*p)
                .first()
                .is_some_and(|a| a.contains("qemu"))
        })
        .expect("the VM's QEMU process");
    kill9(qemu);
    h.wait_status("v1", "STOPPED", LONG);
    let (code, _, err) = h.ctr(&["task", "delete", "v1"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("exit code 255"), "{err}");
    let (code, _, err) = h.ctr(&["container", "delete", "v1"]);
    assert_eq!(code, 0, "{err}");
    h.assert_clean(&["v1"]);
}

/// How soon a task must be seen stopped after one of its VM's device
/// processes died.
const DEVICE_DEATH_DETECTION: Duration = Duration::from_secs(5);

#[test]
fn killing_any_device_process_ends_the_task_with_a_fault() {
    let h = ShimHarness::start();
    let vol = h.state_dir().with_file_name("vol");
    std::fs::create_dir_all(&vol).unwrap();
    let mount = format!("type=bind,src={},dst=/data,options=rbind:rw", vol.display());
    let start = |id: &str, flags: &[&str]| {
        let mut all = vec!["-d"];
        all.extend(flags);
        let (code, out, err) =
            capsid_tests::run(&mut h.run_cmd(&all, BUSYBOX, id, &["sleep", "1000"]));
        assert_eq!(code, 0, "{id}: {out}{err}\n{}", h.log_tail());
        h.wait_status(id, "RUNNING", Duration::from_secs(60));
    };
    // A plain sandbox shows which capsid-vhost devices there are (vsock,
    // rng, a disk per image disk, net0 with a network); each is killed in
    // a sandbox of its own, then virtiofsd in one with a volume.
    start("dev0", &[]);
    let mut devices: Vec<String> = device_processes(&h, "dev0")
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| name != "virtiofsd")
        .collect();
    for wanted in ["console", "vsock", "rng", "blk0"] {
        assert!(
            devices.iter().any(|d| d == wanted),
            "no {wanted} in {devices:?}"
        );
    }
    devices.push("virtiofsd".into());
    let mut report = Vec::new();
    for (n, device) in devices.iter().enumerate() {
        let id = format!("dev{n}");
        if device == "virtiofsd" {
            start(&id, &["--mount", &mount]);
        } else if n > 0 {
            start(&id, &[]);
        }
        let pid = device_processes(&h, &id)
            .into_iter()
            .find(|(name, _)| name == device)
            .map(|(_, pid)| pid)
            .unwrap_or_else(|| panic!("no {device} process in {id}"));
        kill9(pid);
        let killed = Instant::now();
        while h.status(&id) != "STOPPED" {
            assert!(
                killed.elapsed() < DEVICE_DEATH_DETECTION,
                "{id}: task still {:?} {:?} after {device} died\n{}",
                h.status(&id),
                killed.elapsed(),
                h.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let detected = killed.elapsed();
        assert!(
            detected < DEVICE_DEATH_DETECTION,
            "{id}: stopped only {detected:?} after {device} died"
        );
        eprintln!("{device}: task stopped {detected:?} after its SIGKILL");
        report.push((device.clone(), detected));
        let (code, _, err) = h.ctr(&["task", "delete", &id]);
        assert_eq!(code, 0, "{id}: {err}");
        assert!(err.contains("exit code 255"), "{id} ({device}): {err}");
        let (code, _, err) = h.ctr(&["container", "delete", &id]);
        assert_eq!(code, 0, "{id}: {err}");
        h.assert_clean(&[&id]);
        // The shim's log names the dead process, once per sandbox.
        let said = h
            .log()
            .matches("a device process of the VM exited while the VM ran")
            .count();
        assert_eq!(
            said,
            n + 1,
            "{id}: {device}'s death not logged once\n{}",
            h.log_tail()
        );
    }
    eprintln!("detection times: {report:?}");
}

/// The device processes the shim of task `id` runs beside its VM, by
/// device ("vsock", "blk0", ..., from their vhost-user socket; or
/// "virtiofsd"): the shim's own children, so not virtiofsd's sandboxed
/// child; for a jailed device, the device process under its jailer.
fn device_processes(h: &ShimHarness, id: &str) -> Vec<(String, u32)> {
    let shim = h.shim_pid(id).expect("the task's shim");
    h.vm_pids(id)
        .into_iter()
        .filter(|pid| parent(*pid) == Some(shim))
        .filter_map(|pid| {
            let mut args = capsid_tests::shim::cmdline(pid);
            let mut pid = pid;
            if args.first()?.ends_with("capsid-jail") {
                let children =
                    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
                pid = children.split_whitespace().next()?.parse().ok()?;
                args = capsid_tests::shim::cmdline(pid);
            }
            let program = args.first()?;
            if program.ends_with("virtiofsd") {
                return Some(("virtiofsd".to_string(), pid));
            }
            if !program.ends_with("capsid-vhost") {
                return None;
            }
            let socket = args.windows(2).find(|w| w[0] == "--socket")?[1].clone();
            let name = std::path::Path::new(&socket)
                .file_name()?
                .to_str()?
                .strip_prefix("vhost-")?
                .strip_suffix(".sock")?
                .to_string();
            Some((name, pid))
        })
        .collect()
}

/// A process's parent pid.
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn killing_the_shim_lets_containerd_clean_up() {
    let h = ShimHarness::start();
    // With a volume: its share must be taken down, its contents kept.
    let vol = h.state_dir().with_file_name("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("precious"), "keep me\n").unwrap();
    let mount = format!("type=bind,src={},dst=/data,options=rbind:rw", vol.display());
    let (code, out, err) = capsid_tests::run(&mut h.run_cmd(
        &["-d", "--mount", &mount],
        BUSYBOX,
        "s1",
        &["sh", "-c", "echo guest > /data/written; sleep 1000"],
    ));
    assert_eq!(code, 0, "{out}{err}\n{}", h.log_tail());
    h.wait_status("s1", "RUNNING", Duration::from_secs(10));
    // The guest's write reaches the host before the shim dies.
    let start = Instant::now();
    // (Its content, not just the file: the create and the write are two
    // requests to virtiofsd.)
    while std::fs::read_to_string(vol.join("written")).unwrap_or_default() != "guest\n" {
        assert!(start.elapsed() < LONG, "the guest's write never arrived");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!h.vm_pids("s1").is_empty());
    let shim = h.shim_pid("s1").expect("the shim of s1");
    kill9(shim);
    // containerd notices, runs `delete` in the bundle, and forgets the task.
    h.wait_dead_shim_cleaned_up("s1");
    let (code, _, err) = h.ctr(&["container", "delete", "s1"]);
    assert_eq!(code, 0, "{err}");
    h.assert_clean(&["s1"]);
    assert_eq!(
        std::fs::read_to_string(vol.join("precious")).unwrap(),
        "keep me\n"
    );
    assert_eq!(
        std::fs::read_to_string(vol.join("written")).unwrap(),
        "guest\n"
    );
}

#[test]
fn run_delete_cycles_leave_nothing_behind() {
    let cycles = std::env::var("CAPSID_SHIM_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CYCLES);
    let h = ShimHarness::start();
    // One cycle first: containerd opens what it keeps open for good.
    let (code, _, err) = h.run("warm", BUSYBOX, &["true"]);
    assert_eq!(code, 0, "{err}");
    h.assert_clean(&["warm"]);
    let fds_before = containerd_fds(&h);
    let start = Instant::now();
    for i in 0..cycles {
        let id = format!("cycle{i}");
        let (code, out, err) = h.run(&id, BUSYBOX, &["echo", &id]);
        assert_eq!(code, 0, "{id}: {err}\n{}", h.log_tail());
        assert_eq!(out, format!("{id}\n"));
    }
    let elapsed = start.elapsed();
    let ids: Vec<String> = (0..cycles).map(|i| format!("cycle{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    h.assert_clean(&ids);
    let fds_after = containerd_fds(&h);
    eprintln!(
        "{cycles} run/delete cycles in {elapsed:?}; containerd fds {fds_before} -> {fds_after}"
    );
    assert!(
        fds_after <= fds_before + 2,
        "containerd fds grew from {fds_before} to {fds_after}"
    );
}

fn kill9(pid: u32) {
    let st = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// containerd's open fds (its pid found by its config path).
fn containerd_fds(h: &ShimHarness) -> usize {
    let root = h.ctrd.root().parent().unwrap().display().to_string();
    let pid = capsid_tests::shim::processes_with(&root)
        .into_iter()
        .find(|p| {
            capsid_tests::shim::cmdline(*p)
                .first()
                .is_some_and(|a| a.ends_with("containerd"))
        })
        .expect("containerd's pid");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}
