//! A pod's containers in one VM, as the shim will run them: a container
//! whose rootfs is a directory of the sandbox's virtio-fs share, containers
//! joining the IPC, UTS and PID namespaces of the pod's first container by
//! `/proc/<guest pid>/ns/*`, and containers removed while the VM runs on
//! (RemoveContainer). A real guest under QEMU-TCG, with virtiofsd.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use capsid_sandbox::container::{ContainerError, ContainerSpec, Created};
use capsid_sandbox::sandbox::Sandbox;
use capsid_sandbox::spec::RunOptions;
use capsid_sandbox::stdio::StreamsWanted;
use capsid_tests::artifact;
use capsid_tests::sandbox::{
    busybox_layer, busybox_sandbox_with, in_the_agents_pid_namespace, oci_spec, sh,
};
use oci_spec::runtime::{
    Capability, LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType, Spec,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

const NO_STREAMS: StreamsWanted = StreamsWanted {
    stdin: false,
    stdout: false,
    stderr: false,
    terminal: false,
};

const OUTPUTS: StreamsWanted = StreamsWanted {
    stdin: false,
    stdout: true,
    stderr: true,
    terminal: false,
};

/// The busybox image's layers unpacked into `dest` (as the host's overlay
/// of a pod's container would present them).
fn unpack_busybox(dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    let layout = artifact("images/busybox");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let blob = |digest: &str| {
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let st = Command::new("tar")
            .arg("-xzf")
            .arg(blob(layer["digest"].as_str().unwrap()))
            .arg("-C")
            .arg(dest)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

/// A sandbox with the busybox disk and `share` served over virtio-fs.
async fn pod_sandbox(dir: &Path, id: &str, share: &Path) -> Sandbox {
    busybox_sandbox_with(dir, id, |o| o.share_dir = Some(share.to_path_buf())).await
}

async fn create_spec(
    sb: &Sandbox,
    id: &str,
    oci: &Spec,
    in_share: Option<&str>,
    streams: StreamsWanted,
) -> Result<Created, ContainerError> {
    let layers = [busybox_layer()];
    sb.create_container(ContainerSpec {
        id,
        oci,
        layers: if in_share.is_some() { &[] } else { &layers },
        dns: None,
        hosts: None,
        rootfs_in_share: in_share.map(Path::new),
        streams,
    })
    .await
}

/// `spec` with the namespaces of `kinds` joined: those of guest pid `pid`.
fn joining(mut spec: Spec, pid: u32, kinds: &[(LinuxNamespaceType, &str)]) -> Spec {
    let mut linux = spec.linux().clone().unwrap();
    let mut ns: Vec<LinuxNamespace> = linux.namespaces().clone().unwrap_or_default();
    for (typ, name) in kinds {
        ns.retain(|n| n.typ() != *typ);
        ns.push(
            LinuxNamespaceBuilder::default()
                .typ(*typ)
                .path(format!("/proc/{pid}/ns/{name}"))
                .build()
                .unwrap(),
        );
    }
    linux.set_namespaces(Some(ns));
    spec.set_linux(Some(linux));
    spec
}

/// The observer: in the guest's own PID namespace, able to read the
/// agent's (guest PID 1's) mount table.
fn observer_spec() -> Spec {
    let mut spec = oci_spec(&RunOptions {
        command: vec!["sleep".into(), "100001".into()],
        ..Default::default()
    });
    in_the_agents_pid_namespace(&mut spec, &[Capability::SysPtrace]);
    spec
}

/// Runs `script` as exec `exec_id` in `container` (with the process
/// settings of `spec`, its capabilities included); its stdout.
async fn exec_out(
    sb: &Sandbox,
    container: &str,
    spec: &Spec,
    exec_id: &str,
    script: &str,
) -> String {
    let mut process = spec.process().clone().unwrap();
    process.set_args(Some(vec!["sh".into(), "-c".into(), script.into()]));
    process.set_terminal(Some(false));
    let prepared = sb
        .prepare_exec(
            container,
            exec_id,
            &serde_json::to_vec(&process).unwrap(),
            OUTPUTS,
        )
        .await
        .unwrap();
    let (_pid, streams) = sb.start_exec(container, prepared).await.unwrap();
    let (out, err) = read_both(streams.stdout, streams.stderr).await;
    let exit = sb.agent().wait_process(container, exec_id).await.unwrap();
    assert_eq!(exit.exit_status, 0, "{script}: {out}{err}");
    out
}

/// Everything written on two streams.
async fn read_both(
    a: Option<tokio::net::UnixStream>,
    b: Option<tokio::net::UnixStream>,
) -> (String, String) {
    let read = |s: Option<tokio::net::UnixStream>| async move {
        let mut text = String::new();
        s.unwrap().read_to_string(&mut text).await.unwrap();
        text
    };
    tokio::join!(read(a), read(b))
}

/// Creates, starts and waits for container `id`; its stdout and status.
async fn run_spec(
    sb: &Sandbox,
    id: &str,
    oci: &Spec,
    in_share: Option<&str>,
) -> (String, String, i32) {
    let created = create_spec(sb, id, oci, in_share, OUTPUTS).await.unwrap();
    sb.start_init(id).await.unwrap();
    let (out, err) = read_both(created.streams.stdout, created.streams.stderr).await;
    let exit = sb.agent().wait_process(id, "").await.unwrap();
    (out, err, exit.exit_status)
}

/// `MemAvailable` and `Shmem` of the guest, in KiB.
async fn meminfo(sb: &Sandbox, obs: &Spec, exec_id: &str) -> (u64, u64) {
    let text = exec_out(sb, "obs", obs, exec_id, "cat /proc/meminfo").await;
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {text}"))
    };
    (field("MemAvailable:"), field("Shmem:"))
}

/// The mount points of the agent's (guest PID 1's) mount table.
async fn guest_mounts(sb: &Sandbox, obs: &Spec, exec_id: &str) -> Vec<(String, String)> {
    exec_out(sb, "obs", obs, exec_id, "cat /proc/1/mountinfo")
        .await
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some((f.get(4)?.to_string(), f.get(5)?.to_string()))
        })
        .collect()
}

fn under(mounts: &[(String, String)], prefix: &str) -> Vec<String> {
    mounts
        .iter()
        .filter(|(p, _)| p.starts_with(prefix))
        .map(|(p, o)| format!("{p} {o}"))
        .collect()
}

fn not_found(e: &ContainerError) -> bool {
    e.is_not_found()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_containers_share_namespaces_use_share_rootfs_and_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    let c2_root = share.join("c2/rootfs");
    unpack_busybox(&c2_root);
    std::fs::write(c2_root.join("marker"), "from-host\n").unwrap();
    // Ways out of the share, which the guest must refuse.
    std::os::unix::fs::symlink("/", share.join("evil")).unwrap();
    std::os::unix::fs::symlink("../..", share.join("c2/up")).unwrap();
    let sb = pod_sandbox(dir.path(), "agent-pod", &share).await;

    // The observer, then the pod's first container (its namespaces' holder).
    let obs = observer_spec();
    create_spec(&sb, "obs", &obs, None, NO_STREAMS)
        .await
        .unwrap();
    sb.start_init("obs").await.unwrap();
    let pause = oci_spec(&RunOptions {
        command: vec!["sleep".into(), "100000".into()],
        hostname: "pod-a".into(),
        ..Default::default()
    });
    let c1 = create_spec(&sb, "c1", &pause, None, NO_STREAMS)
        .await
        .unwrap();
    sb.start_init("c1").await.unwrap();

    // c2: its rootfs in the share; c1's IPC, UTS and PID namespaces.
    let c2_spec = joining(
        oci_spec(&RunOptions {
            hostname: "not-applied".into(),
            ..sh("hostname; ps -o pid,args; \
                  for n in ipc uts pid; do \
                    [ \"$(readlink /proc/self/ns/$n)\" = \"$(readlink /proc/1/ns/$n)\" ] && echo same-$n; \
                  done; \
                  cat /marker; echo written > /written && echo wrote; \
                  grep ' / ' /proc/self/mountinfo | head -1")
        }),
        c1.pid,
        &[
            (LinuxNamespaceType::Ipc, "ipc"),
            (LinuxNamespaceType::Uts, "uts"),
            (LinuxNamespaceType::Pid, "pid"),
        ],
    );
    let (out, err, status) = run_spec(&sb, "c2", &c2_spec, Some("c2/rootfs")).await;
    assert_eq!(status, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"pod-a"), "c1's hostname: {out}{err}");
    assert!(out.contains("sleep 100000"), "c1's process is seen: {out}");
    assert!(
        !out.contains("sleep 100001"),
        "the guest's other processes are not: {out}"
    );
    for n in ["ipc", "uts", "pid"] {
        assert!(out.contains(&format!("same-{n}")), "{n} shared: {out}");
    }
    assert!(out.contains("from-host\nwrote\n"), "{out}{err}");
    assert_eq!(
        std::fs::read_to_string(c2_root.join("written")).unwrap(),
        "written\n",
        "the write reached the host's directory"
    );
    // The observer sees the same: c2 was in c1's namespaces, its own mount one.
    let mounts = guest_mounts(&sb, &obs, "m1").await;
    assert_eq!(
        under(&mounts, "/run/capsid/bundles/c2/").len(),
        1,
        "the share bind: {mounts:?}"
    );

    // Removal: gone in the guest, the host's files untouched.
    sb.remove_container("c2").await.unwrap();
    let e = sb.agent().wait_process("c2", "").await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let mounts = guest_mounts(&sb, &obs, "m2").await;
    assert!(
        under(&mounts, "/run/capsid/bundles/c2").is_empty(),
        "{mounts:?}"
    );
    assert!(
        c2_root.join("bin/busybox").exists(),
        "the host's rootfs lost files"
    );
    assert_eq!(
        std::fs::read_to_string(c2_root.join("marker")).unwrap(),
        "from-host\n"
    );
    // The id again (the kubelet's restarted container): the rootfs kept its write.
    let (out, err, status) =
        run_spec(&sb, "c2", &oci_spec(&sh("cat /written")), Some("c2/rootfs")).await;
    assert_eq!((out.as_str(), status), ("written\n", 0), "{err}");
    sb.remove_container("c2").await.unwrap();

    // A read-only rootfs in the share: read-only in the container (the
    // runtime applies root.readonly once its mount points are made).
    let ro = oci_spec(&RunOptions {
        read_only: true,
        ..sh("touch /rofile 2>/dev/null && echo wrote || echo read-only; cat /marker")
    });
    let (out, err, status) = run_spec(&sb, "c5", &ro, Some("c2/rootfs")).await;
    assert_eq!(
        (out.as_str(), status),
        ("read-only\nfrom-host\n", 0),
        "{err}"
    );
    sb.remove_container("c5").await.unwrap();
    assert!(!c2_root.join("rofile").exists());

    // Share paths that leave the share are refused; nothing is left.
    for bad in [
        "../share/c2/rootfs",
        "c2/../c2/rootfs",
        "/c2/rootfs",
        "evil/etc",
        "c2/up/etc",
    ] {
        let e = create_spec(&sb, "bad", &oci_spec(&sh("true")), Some(bad), NO_STREAMS)
            .await
            .map(drop)
            .unwrap_err();
        assert!(
            matches!(&e, ContainerError::Agent(a) if a.is_invalid_argument()),
            "{bad}: {e}"
        );
        let e = sb.remove_container("bad").await.unwrap_err();
        assert!(not_found(&e), "{bad}: {e}");
    }
    let mounts = guest_mounts(&sb, &obs, "m4").await;
    assert!(
        under(&mounts, "/run/capsid/bundles/bad").is_empty(),
        "{mounts:?}"
    );

    // An unknown id.
    let e = sb.remove_container("no-such").await.unwrap_err();
    assert!(not_found(&e), "{e}");

    // A tmpfs upper layer that holds 20 MiB, with an exec waited for.
    let (avail_before, shmem_before) = meminfo(&sb, &obs, "mem1").await;
    let filler = oci_spec(&sh(
        "dd if=/dev/zero of=/big bs=1M count=20 2>/dev/null && echo filled; exec sleep 100002",
    ));
    let c3 = create_spec(&sb, "c3", &filler, None, OUTPUTS)
        .await
        .unwrap();
    sb.start_init("c3").await.unwrap();
    let mut line = String::new();
    BufReader::new(c3.streams.stdout.unwrap())
        .read_line(&mut line)
        .await
        .unwrap();
    assert_eq!(line, "filled\n");
    let (_, shmem_full) = meminfo(&sb, &obs, "mem2").await;
    assert!(
        shmem_full >= shmem_before + 18 * 1024,
        "Shmem {shmem_before} → {shmem_full} KiB"
    );
    let sleeper = oci_spec(&RunOptions {
        command: vec!["sleep".into(), "100003".into()],
        ..Default::default()
    });
    let mut process = sleeper.process().clone().unwrap();
    process.set_terminal(Some(false));
    let prepared = sb
        .prepare_exec(
            "c3",
            "e1",
            &serde_json::to_vec(&process).unwrap(),
            NO_STREAMS,
        )
        .await
        .unwrap();
    sb.start_exec("c3", prepared).await.unwrap();
    // And one prepared but never started: its wait must end as well.
    let prepared = sb
        .prepare_exec(
            "c3",
            "e2",
            &serde_json::to_vec(&process).unwrap(),
            NO_STREAMS,
        )
        .await
        .unwrap();
    drop(prepared);
    let agent = sb.agent().clone();
    let waits = tokio::spawn(async move {
        tokio::join!(
            agent.wait_process("c3", "e1"),
            agent.wait_process("c3", "e2")
        )
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    sb.remove_container("c3").await.unwrap();
    let (e1, e2) = tokio::time::timeout(Duration::from_secs(30), waits)
        .await
        .expect("waits pending on a removed container's processes returned")
        .unwrap();
    assert_eq!(e1.unwrap().exit_status, 137);
    assert_eq!(e2.unwrap().exit_status, 137);
    let e = sb.agent().stats("c3").await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let mounts = guest_mounts(&sb, &obs, "m5").await;
    assert!(
        under(&mounts, "/run/capsid/bundles/c3").is_empty(),
        "{mounts:?}"
    );
    // The tmpfs's pages come back (freed with its last reference).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    let (avail_after, shmem_after) = loop {
        n += 1;
        let (avail, shmem) = meminfo(&sb, &obs, &format!("mem-after{n}")).await;
        if (shmem <= shmem_before + 2048 && avail + 8 * 1024 >= avail_before)
            || Instant::now() > deadline
        {
            break (avail, shmem);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        shmem_after <= shmem_before + 2048,
        "Shmem {shmem_before} → {shmem_full} → {shmem_after} KiB"
    );
    assert!(
        avail_after + 8 * 1024 >= avail_before,
        "MemAvailable {avail_before} → {avail_after} KiB"
    );

    // A container created but never started, and a paused one.
    create_spec(&sb, "idle", &sleeper, None, NO_STREAMS)
        .await
        .unwrap();
    sb.remove_container("idle").await.unwrap();
    create_spec(&sb, "frozen", &sleeper, None, NO_STREAMS)
        .await
        .unwrap();
    sb.start_init("frozen").await.unwrap();
    sb.agent().pause_container("frozen", true).await.unwrap();
    sb.remove_container("frozen").await.unwrap();
    let e = sb.agent().wait_process("frozen", "").await.unwrap_err();
    assert!(e.is_not_found(), "{e}");

    // The pod's first container goes last; the VM is still there.
    sb.remove_container("c1").await.unwrap();
    let mounts = guest_mounts(&sb, &obs, "m6").await;
    assert!(
        under(&mounts, "/run/capsid/bundles/")
            .iter()
            .all(|m| m.starts_with("/run/capsid/bundles/obs/")),
        "{mounts:?}"
    );
    sb.stop().await;
}
