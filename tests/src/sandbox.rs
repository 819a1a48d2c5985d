//! Containers in sandboxes for tests: a rootfs disk made straight from the
//! bundled busybox image, the QEMU-TCG backend, and helpers to run a
//! command and collect its output.

use std::path::{Path, PathBuf};
use std::process::Command;

use capsid_sandbox::config::{BackendKind, Config};
use capsid_sandbox::container::{ContainerError, ContainerSpec, Created, LayerDisk};
use capsid_sandbox::sandbox::{Sandbox, SandboxOptions};
use capsid_sandbox::spec::{self, ImageDefaults, RunOptions};
use capsid_sandbox::stdio::StreamsWanted;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{artifact, bin};

/// An erofs image of an OCI image layout's layers (applied in order with
/// plain tar: fine for the single-layer busybox image).
pub fn erofs_from_layout(layout: &Path, out: &Path) -> PathBuf {
    let staging = out.with_extension("d");
    std::fs::create_dir_all(&staging).unwrap();
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
            .arg(&staging)
            .status()
            .unwrap();
        assert!(st.success());
    }
    let st = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(out)
        .arg(&staging)
        .status()
        .unwrap();
    assert!(st.success(), "mkfs.erofs failed");
    std::fs::remove_dir_all(&staging).unwrap();
    out.to_path_buf()
}

/// A host config pointing at this build's artifacts, with state under `dir`.
pub fn test_config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.paths.kernel = artifact("kernel/vmlinux");
    c.paths.bzimage = artifact("kernel/bzImage");
    c.paths.initramfs = artifact("initramfs.cpio.gz");
    c.paths.images_dir = artifact("images");
    c.paths.cache_dir = dir.join("cache");
    c.paths.state_dir = dir.join("run");
    c.paths.vhost = bin("capsid-vhost");
    c.paths.vmm = bin("capsid-vmm");
    c.paths.jailer = bin("capsid-jail");
    c.backend.kind = Some(BackendKind::QemuTcg);
    c
}

/// A started sandbox with the busybox rootfs attached.
pub async fn busybox_sandbox(dir: &Path, id: &str) -> Sandbox {
    busybox_sandbox_with(dir, id, |_| {}).await
}

/// [`busybox_sandbox`] with its options (1 vCPU, 256 MiB, the busybox
/// disk) changed by `adjust` first.
pub async fn busybox_sandbox_with(
    dir: &Path,
    id: &str,
    adjust: impl FnOnce(&mut SandboxOptions),
) -> Sandbox {
    let rootfs = erofs_from_layout(&artifact("images/busybox"), &dir.join("busybox.erofs"));
    let config = test_config(dir);
    // Jailed, as the config says by default.
    let backend = capsid_sandbox::sandbox::backend_for(&config).unwrap();
    let mut opts = SandboxOptions {
        id: id.into(),
        vcpus: 1,
        memory_mib: 256,
        disks: vec![busybox_layer().disk_spec(rootfs)],
        ..Default::default()
    };
    adjust(&mut opts);
    Sandbox::start(&config, backend, opts).await.unwrap()
}

/// What a finished container process produced.
#[derive(Debug)]
pub struct Output {
    /// Exit status (128+N after signal N).
    pub status: i32,
    /// Killed by the OOM killer.
    pub oom_killed: bool,
    /// Its stdout.
    pub stdout: Vec<u8>,
    /// Its stderr.
    pub stderr: Vec<u8>,
}

/// The busybox rootfs layer the tests attach (see [`erofs_from_layout`]).
pub fn busybox_layer() -> LayerDisk {
    LayerDisk::primary("erofs")
}

/// The OCI spec running `opts` with the busybox image's defaults.
pub fn oci_spec(opts: &RunOptions) -> oci_spec::runtime::Spec {
    let image = ImageDefaults {
        cmd: vec!["/bin/sh".into()],
        ..Default::default()
    };
    spec::build(&image, opts).unwrap()
}

/// `spec` made an observer of the guest itself: in the agent's (guest
/// PID 1's) PID namespace, with `caps` added to its bounding, effective
/// and permitted sets.
pub fn in_the_agents_pid_namespace(
    spec: &mut oci_spec::runtime::Spec,
    caps: &[oci_spec::runtime::Capability],
) {
    use oci_spec::runtime::LinuxNamespaceType;
    let mut linux = spec.linux().clone().unwrap();
    let ns: Vec<_> = linux
        .namespaces()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.typ() != LinuxNamespaceType::Pid)
        .collect();
    linux.set_namespaces(Some(ns));
    spec.set_linux(Some(linux));
    let mut process = spec.process().clone().unwrap();
    let mut all = process.capabilities().clone().unwrap_or_default();
    let add = |set: Option<std::collections::HashSet<oci_spec::runtime::Capability>>| {
        let mut set = set.unwrap_or_default();
        set.extend(caps.iter().copied());
        Some(set)
    };
    all.set_bounding(add(all.bounding().clone()));
    all.set_effective(add(all.effective().clone()));
    all.set_permitted(add(all.permitted().clone()));
    process.set_capabilities(Some(all));
    spec.set_process(Some(process));
}

/// Every stream, with a terminal if `opts` asks for one.
pub fn all_streams(opts: &RunOptions) -> StreamsWanted {
    StreamsWanted {
        stdin: true,
        stdout: true,
        stderr: true,
        terminal: opts.tty,
    }
}

/// Creates container `id` running `opts` on `layers` (lowest first); its
/// init waits to be started.
pub async fn create_on(
    sb: &Sandbox,
    id: &str,
    opts: &RunOptions,
    layers: &[LayerDisk],
    streams: StreamsWanted,
) -> Result<Created, ContainerError> {
    let oci = oci_spec(opts);
    sb.create_container(ContainerSpec {
        id,
        oci: &oci,
        layers,
        dns: None,
        hosts: None,
        rootfs_in_share: None,
        streams,
    })
    .await
}

/// Creates container `id` running `opts` on the busybox rootfs.
pub async fn create(
    sb: &Sandbox,
    id: &str,
    opts: &RunOptions,
    streams: StreamsWanted,
) -> Result<Created, ContainerError> {
    create_on(sb, id, opts, &[busybox_layer()], streams).await
}

/// Creates and starts container `id` in `sb`, feeds it `stdin`, and
/// collects its output until it exits.
pub async fn run_container(sb: &Sandbox, id: &str, opts: &RunOptions, stdin: &[u8]) -> Output {
    let streams = create(sb, id, opts, all_streams(opts))
        .await
        .unwrap()
        .streams;
    sb.start_init(id).await.unwrap();
    let input = stdin.to_vec();
    let mut stdin_stream = streams.stdin.unwrap();
    let feeder = tokio::spawn(async move {
        let _ = stdin_stream.write_all(&input).await;
        let _ = stdin_stream.shutdown().await;
    });
    let read_all = |s: Option<tokio::net::UnixStream>| async move {
        let mut buf = Vec::new();
        if let Some(mut s) = s {
            let _ = s.read_to_end(&mut buf).await;
        }
        buf
    };
    let (out, err, waited) = tokio::join!(
        read_all(streams.stdout),
        read_all(streams.stderr),
        sb.agent().wait_process(id, "")
    );
    let _ = feeder.await;
    let waited = waited.unwrap();
    Output {
        status: waited.exit_status,
        oom_killed: waited.oom_killed,
        stdout: out,
        stderr: err,
    }
}

/// Options running `script` with `sh -c`.
pub fn sh(script: &str) -> RunOptions {
    RunOptions {
        command: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}
