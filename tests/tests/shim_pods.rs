//! Pod tasks through `ctr`, where the CRI plugin's own checks do not stand
//! in front of the shim: a pod container (the CRI's annotations, set with
//! `ctr run --annotation`) whose pod is not running, or whose pod is
//! stopping, is refused with one clear error and leaves nothing.
//!
//! runc has no counterpart to compare with: its shim starts a new group
//! for an unknown sandbox id and runs the container on its own, and it has
//! no pod VM to refuse a container to. These are capsid's refusals.

use std::time::Duration;

use capsid_tests::shim::ShimHarness;

const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

fn annotations(kind: &str, sandbox: &str) -> [String; 4] {
    [
        "--annotation".into(),
        format!("{CONTAINER_TYPE}={kind}"),
        "--annotation".into(),
        format!("{SANDBOX_ID}={sandbox}"),
    ]
}

fn flags(list: &[String]) -> Vec<&str> {
    list.iter().map(String::as_str).collect()
}

#[test]
fn a_pod_container_without_its_pod_is_refused() {
    let h = ShimHarness::start();
    let member = annotations("container", "no-such-pod");
    let mut f = flags(&member);
    f.push("--rm");
    let (code, out, err) = h.run_with(&f, "orphan", &["echo", "ran"]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(!out.contains("ran"), "{out}");
    assert!(
        err.contains("belongs to pod sandbox no-such-pod, which is not running"),
        "{err}\n{}",
        h.log_tail()
    );
    let _ = h.ctr(&["container", "delete", "orphan"]);
    h.assert_clean(&["orphan"]);
}

#[test]
fn a_stopping_pod_takes_no_container_and_its_pod_runs_them_until_then() {
    let h = ShimHarness::start();
    let sandbox = annotations("sandbox", "pod1");
    let mut f = flags(&sandbox);
    f.push("-d");
    let (code, out, err) = h.run_with(&f, "pod1", &["sleep", "3600"]);
    assert_eq!(code, 0, "{out}{err}\n{}", h.log_tail());
    h.wait_status("pod1", "RUNNING", Duration::from_secs(60));

    // While the pod runs, a container joins its VM: one VM (the task pid
    // is the VM's main process), one shim.
    let member = annotations("container", "pod1");
    let mut f = flags(&member);
    f.push("--rm");
    let (code, out, err) = h.run_with(&f, "c1", &["sh", "-c", "echo in the pod"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "in the pod\n"),
        "{err}\n{}",
        h.log_tail()
    );
    let mut d = flags(&member);
    d.push("-d");
    let (code, out, err) = h.run_with(&d, "c3", &["sleep", "3600"]);
    assert_eq!(code, 0, "{out}{err}\n{}", h.log_tail());
    h.wait_status("c3", "RUNNING", Duration::from_secs(60));
    let pid = |id: &str| {
        let (_, out, _) = h.ctr(&["task", "ls"]);
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
            .unwrap_or_default()
    };
    assert!(!pid("pod1").is_empty());
    assert_eq!(pid("c3"), pid("pod1"), "not in the pod's VM");
    // The pod's shim serves both (started for the pod, `-id pod1`), and
    // no other shim runs.
    let shims: Vec<u32> =
        capsid_tests::shim::processes_with(&h.ctrd.socket().display().to_string())
            .into_iter()
            .filter(|p| {
                let args = capsid_tests::shim::cmdline(*p);
                args.iter()
                    .any(|a| a.ends_with("containerd-shim-capsid-v2"))
                    && !args.iter().any(|a| a == "start" || a == "delete")
            })
            .collect();
    assert_eq!(shims.len(), 1, "{shims:?}");
    assert_eq!(h.shim_pid("pod1"), shims.first().copied());
    let (code, _, err) = h.ctr(&["task", "kill", "-s", "SIGKILL", "c3"]);
    assert_eq!(code, 0, "{err}");
    h.wait_status("c3", "STOPPED", Duration::from_secs(30));
    for args in [["task", "delete", "c3"], ["container", "delete", "c3"]] {
        let (code, _, err) = h.ctr(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
    }

    // The pause container ends: the pod is stopping.
    let (code, _, err) = h.ctr(&["task", "kill", "-s", "SIGKILL", "pod1"]);
    assert_eq!(code, 0, "{err}");
    h.wait_status("pod1", "STOPPED", Duration::from_secs(30));
    let (code, out, err) = h.run_with(&f, "c2", &["echo", "ran"]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("pod sandbox pod1 is stopping"),
        "{err}\n{}",
        h.log_tail()
    );
    let _ = h.ctr(&["container", "delete", "c2"]);
    let (code, _, err) = h.ctr(&["task", "delete", "pod1"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = h.ctr(&["container", "delete", "pod1"]);
    assert_eq!(code, 0, "{err}");
    h.assert_clean(&["pod1", "c1", "c2", "c3"]);
}
