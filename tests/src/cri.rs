//! Kubernetes' CRI for tests: a private containerd with its CRI plugin on,
//! driven the way kubelet drives it — typed gRPC calls over its Unix
//! socket ([`CriClient`]), no kubelet and no network access.
//!
//! [`CriHarness::start`] runs containerd (Debian 12's 1.6, or the one in
//! `$CAPSID_TEST_CONTAINERD_DIR`) in a network namespace of its own, so the
//! CNI bridge, pod veths and the stream server are the test's alone, with:
//! * the runtime handlers [`RUNC`] (the reference) and [`CAPSID`] (this
//!   build's shim, first on containerd's PATH because 1.6 ignores
//!   `runtime_path`, with a capsid config as tests/src/shim.rs writes it);
//! * a CNI bridge + host-local network, bridge name and /24 of its own
//!   ([`CriHarness::pod_subnet`]), its IPAM state in the harness's temp dir;
//! * pod network namespaces under containerd's state dir
//!   (`netns_mounts_under_state_dir`), `restrict_oom_score_adj` (the tests
//!   run without CAP_SYS_RESOURCE);
//! * the images [`PAUSE`] (the sandbox image) and [`BUSYBOX`] imported into
//!   the `k8s.io` namespace, so nothing is ever pulled;
//! * a cgroup parent of its own ([`CriHarness::cgroup_parent`]) for pods.
//!
//! Dropping the harness removes what is left of the pods (through the CRI
//! first, then by force), kills containerd, and deletes the network
//! namespace, the cgroup directories and the temp dirs.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::containerd::{rand_suffix, Containerd, ContainerdSetup, TestNetns};
use crate::shim::{cmdline, processes_with, state_leftovers, write_capsid_config};
use crate::{artifact, bin, run};

/// The reference runtime handler (runc through containerd-shim-runc-v2).
pub const RUNC: &str = "runc";
/// capsid's runtime handler (`io.containerd.capsid.v2`).
pub const CAPSID: &str = "capsid";
/// The sandbox image, imported from build/images/pause.tar.
pub const PAUSE: &str = "registry.k8s.io/pause:3.9";
/// The busybox test image, imported from build/images/busybox.tar.
pub const BUSYBOX: &str = "docker.io/capsid/busybox:latest";
/// containerd's CRI namespace.
pub const K8S_NAMESPACE: &str = "k8s.io";
/// The longest a single CRI call may take before the test fails (capsid
/// boots a VM under QEMU-TCG in RunPodSandbox and StartContainer).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A typed CRI client (RuntimeService and ImageService) on one connection,
/// with blocking calls for `#[test]` functions.
#[derive(Debug)]
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    image: ImageServiceClient<Channel>,
}

/// Blocking wrappers, one per CRI call: `fn call(&self, request) ->
/// Result<response, tonic::Status>`, failing with `DeadlineExceeded` after
/// [`CALL_TIMEOUT`].
macro_rules! calls {
    ($service:ident: $($call:ident($request:ident) -> $response:ident;)*) => {
        $(
            #[doc = concat!("`", stringify!($call), "`, blocking.")]
            pub fn $call(&self, request: $request) -> Result<$response, tonic::Status> {
                let mut client = self.$service.clone();
                self.block_on(async move { client.$call(request).await })
            }
        )*
    };
}

impl CriClient {
    /// Connects to the CRI socket at `socket` (it must exist).
    pub fn connect(socket: &Path) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(async move {
                // The URI is required by tonic and unused: the connector
                // dials the socket.
                Endpoint::from_static("http://[::1]:50051")
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                        }
                    }))
                    .await
            })
            .map_err(|e| format!("cannot connect to the CRI at {}: {e:?}", socket.display()))?;
        Ok(Self {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            image: ImageServiceClient::new(channel),
        })
    }

    /// Runs one call to completion, within [`CALL_TIMEOUT`].
    pub fn block_on<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        self.rt.block_on(async {
            match tokio::time::timeout(CALL_TIMEOUT, call).await {
                Ok(response) => response.map(tonic::Response::into_inner),
                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {CALL_TIMEOUT:?}"
                ))),
            }
        })
    }

    /// The RuntimeService client itself, for calls run with
    /// [`CriClient::block_on`].
    pub fn runtime_service(&self) -> RuntimeServiceClient<Channel> {
        self.runtime.clone()
    }

    /// The ImageService client itself.
    pub fn image_service(&self) -> ImageServiceClient<Channel> {
        self.image.clone()
    }

    calls! {runtime:
        version(VersionRequest) -> VersionResponse;
        status(StatusRequest) -> StatusResponse;
        run_pod_sandbox(RunPodSandboxRequest) -> RunPodSandboxResponse;
        stop_pod_sandbox(StopPodSandboxRequest) -> StopPodSandboxResponse;
        remove_pod_sandbox(RemovePodSandboxRequest) -> RemovePodSandboxResponse;
        pod_sandbox_status(PodSandboxStatusRequest) -> PodSandboxStatusResponse;
        list_pod_sandbox(ListPodSandboxRequest) -> ListPodSandboxResponse;
        create_container(CreateContainerRequest) -> CreateContainerResponse;
        start_container(StartContainerRequest) -> StartContainerResponse;
        stop_container(StopContainerRequest) -> StopContainerResponse;
        remove_container(RemoveContainerRequest) -> RemoveContainerResponse;
        list_containers(ListContainersRequest) -> ListContainersResponse;
        container_status(ContainerStatusRequest) -> ContainerStatusResponse;
        exec_sync(ExecSyncRequest) -> ExecSyncResponse;
        container_stats(ContainerStatsRequest) -> ContainerStatsResponse;
        list_container_stats(ListContainerStatsRequest) -> ListContainerStatsResponse;
        pod_sandbox_stats(PodSandboxStatsRequest) -> PodSandboxStatsResponse;
        list_pod_sandbox_stats(ListPodSandboxStatsRequest) -> ListPodSandboxStatsResponse;
        update_container_resources(UpdateContainerResourcesRequest) -> UpdateContainerResourcesResponse;
        reopen_container_log(ReopenContainerLogRequest) -> ReopenContainerLogResponse;
    }

    calls! {image:
        image_status(ImageStatusRequest) -> ImageStatusResponse;
        list_images(ListImagesRequest) -> ListImagesResponse;
    }
}

/// A private containerd serving the CRI, with the test images imported.
#[derive(Debug)]
pub struct CriHarness {
    client: Option<CriClient>,
    ctrd: Option<Containerd>,
    netns: Option<TestNetns>,
    dir: tempfile::TempDir,
    cgroup_parent: String,
    subnet: [u8; 3],
}

impl CriHarness {
    /// Starts containerd with the CRI plugin, waits until its runtime and
    /// network are ready, and imports [`PAUSE`] and [`BUSYBOX`].
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("capsid-cri")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        let suffix = rand_suffix();
        let netns = TestNetns::create("capsid-cri");

        let conf_dir = d.join("cni/net.d");
        std::fs::create_dir_all(&conf_dir).expect("CNI conf dir");
        // The bridge lives in the harness's namespace: its name only needs
        // to be unique there, but carries the instance's suffix anyway so
        // that a leftover is easy to trace (at most 15 characters).
        let bridge = format!("cri{:06x}", suffix & 0xff_ffff);
        // 10.200.0.0–10.249.255.0/24: test-only, one per instance.
        let subnet = [10, 200 + (suffix % 50) as u8, (suffix >> 8) as u8];
        let conflist = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "capsid-cri-test",
            "plugins": [{
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "dataDir": d.join("cni/ipam"),
                    "ranges": [[{"subnet": format!("{}.{}.{}.0/24", subnet[0], subnet[1], subnet[2])}]],
                    "routes": [{"dst": "0.0.0.0/0"}]
                }
            }]
        });
        std::fs::write(
            conf_dir.join("10-capsid-cri-test.conflist"),
            serde_json::to_vec_pretty(&conflist).expect("conflist"),
        )
        .expect("write CNI conflist");

        // containerd 1.6 finds shims on its PATH only.
        let shims = d.join("shims");
        std::fs::create_dir_all(&shims).expect("shims dir");
        let shim = bin("containerd-shim-capsid-v2");
        std::os::unix::fs::symlink(&shim, shims.join("containerd-shim-capsid-v2"))
            .expect("shim link");
        let capsid_dir = d.join("capsid");
        std::fs::create_dir_all(&capsid_dir).expect("capsid dir");
        let capsid_config = write_capsid_config(&capsid_dir);

        let cri = format!(
            r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "{RUNC}"
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{RUNC}]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{RUNC}.options]
        SystemdCgroup = false
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{CAPSID}]
      runtime_type = "io.containerd.capsid.v2"
      runtime_path = {shim:?}
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{CAPSID}.options]
        ConfigPath = {capsid_config:?}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = {conf_dir:?}
    max_conf_num = 1
"#
        );
        let ctrd = Containerd::start_with(ContainerdSetup {
            bin_dir: None,
            netns: Some(netns.path()),
            path_prefix: vec![shims],
            cri_config: Some(cri),
        });
        let cgroup_parent = format!("/capsid-cri-{}-{suffix:x}", std::process::id());
        let mut me = Self {
            client: None,
            ctrd: Some(ctrd),
            netns: Some(netns),
            dir,
            cgroup_parent,
            subnet,
        };
        me.client = Some(me.connect());
        me.wait_ready();
        for (name, reference) in [("pause", PAUSE), ("busybox", BUSYBOX)] {
            let tar = artifact(&format!("images/{name}.tar"));
            let (code, out, err) = run(me
                .containerd()
                .ctr()
                .args(["-n", K8S_NAMESPACE, "images", "import"])
                .arg(&tar));
            assert_eq!(code, 0, "ctr images import {}: {out}{err}", tar.display());
            // containerd 2 takes the import into the CRI's image store a
            // moment later.
            let start = Instant::now();
            loop {
                let status = me
                    .cri()
                    .image_status(ImageStatusRequest {
                        image: Some(image_spec(reference)),
                        verbose: false,
                    })
                    .unwrap_or_else(|e| panic!("ImageStatus {reference}: {e}"));
                if status.image.is_some() {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "{reference} is not known to the CRI after import\n{}",
                    me.log_tail()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        me
    }

    fn connect(&self) -> CriClient {
        let socket = self.containerd().socket();
        let start = Instant::now();
        loop {
            match CriClient::connect(&socket) {
                Ok(client) => return client,
                Err(e) if start.elapsed() > Duration::from_secs(20) => {
                    panic!("{e}\n{}", self.log_tail())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Waits until the CRI reports RuntimeReady and NetworkReady (the CNI
    /// config is loaded).
    fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            let status = self.cri().status(StatusRequest { verbose: false });
            let conditions = status
                .as_ref()
                .map(|s| s.status.clone().unwrap_or_default().conditions)
                .unwrap_or_default();
            let ready = |kind: &str| conditions.iter().any(|c| c.r#type == kind && c.status);
            if ready("RuntimeReady") && ready("NetworkReady") {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the CRI is not ready: {status:?}\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The CRI client.
    pub fn cri(&self) -> &CriClient {
        self.client.as_ref().expect("CRI client")
    }

    /// The containerd behind the CRI (for `ctr`, its dirs and log).
    pub fn containerd(&self) -> &Containerd {
        self.ctrd.as_ref().expect("containerd")
    }

    /// The network namespace containerd runs in (the CNI bridge's).
    pub fn netns(&self) -> &TestNetns {
        self.netns.as_ref().expect("netns")
    }

    /// The harness's temp dir (CNI config and IPAM state, capsid's config,
    /// state and cache, and whatever tests put under it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cgroup parent for pods, in cgroupfs form (`/capsid-cri-…`):
    /// kubelet's pod cgroup, which the harness removes on drop.
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// The pods' CNI network, `10.X.Y.0/24` (inside the harness's network
    /// namespace only).
    pub fn pod_subnet(&self) -> String {
        let [a, b, c] = self.subnet;
        format!("{a}.{b}.{c}.0/24")
    }

    /// Whether `ip` is an address of [`CriHarness::pod_subnet`].
    pub fn in_pod_subnet(&self, ip: &str) -> bool {
        ip.parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.octets()[..3] == self.subnet)
    }

    /// capsid's state directory (sandbox run dirs).
    pub fn capsid_state_dir(&self) -> PathBuf {
        self.dir().join("capsid/run")
    }

    /// Where the CRI plugin pins pod network namespaces.
    pub fn netns_dir(&self) -> PathBuf {
        self.containerd()
            .state()
            .join("io.containerd.grpc.v1.cri/netns")
    }

    /// A pod's log directory as kubelet makes it
    /// (`…/pods/<namespace>_<name>_<uid>`), created.
    pub fn log_directory(&self, pod: &PodSandboxMetadata) -> PathBuf {
        let dir = self
            .dir()
            .join("pods")
            .join(format!("{}_{}_{}", pod.namespace, pod.name, pod.uid));
        std::fs::create_dir_all(&dir).expect("pod log directory");
        dir
    }

    /// A pod's emptyDir volume as kubelet makes it (a host directory,
    /// bind-mounted into the containers that use it), created.
    pub fn empty_dir(&self, pod: &PodSandboxMetadata, name: &str) -> PathBuf {
        let dir = self
            .dir()
            .join("kubelet/pods")
            .join(&pod.uid)
            .join("volumes/kubernetes.io~empty-dir")
            .join(name);
        std::fs::create_dir_all(&dir).expect("emptyDir volume");
        dir
    }

    /// A pod's sandbox config as kubelet writes it for pod `name` (its uid
    /// unique to this test process): its log directory (created), the
    /// harness's cgroup parent, kubelet's namespaces
    /// ([`kubelet_namespaces`]) and the pod's
    /// `resources` (kubelet's sum of its containers' limits).
    pub fn pod_config(
        &self,
        name: &str,
        resources: Option<LinuxContainerResources>,
    ) -> PodSandboxConfig {
        let metadata = PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}-{}", std::process::id()),
            namespace: "default".into(),
            attempt: 0,
        };
        let log_directory = self.log_directory(&metadata);
        PodSandboxConfig {
            metadata: Some(metadata),
            hostname: name.into(),
            log_directory: log_directory.display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent().into(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(kubelet_namespaces()),
                    ..Default::default()
                }),
                resources,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// RunPodSandbox of `config` with runtime handler `handler`: the pod's
    /// id.
    pub fn run_pod(&self, config: &PodSandboxConfig, handler: &str) -> String {
        self.cri()
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            })
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", self.log_tail()))
            .pod_sandbox_id
    }

    /// PodSandboxStatus of pod `id`.
    pub fn pod_status(&self, id: &str) -> PodSandboxStatus {
        self.cri()
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: false,
            })
            .unwrap_or_else(|e| panic!("PodSandboxStatus {id}: {e}\n{}", self.log_tail()))
            .status
            .unwrap_or_else(|| panic!("PodSandboxStatus {id}: no status"))
    }

    /// StopPodSandbox then RemovePodSandbox of pod `id`, as kubelet ends
    /// a pod.
    pub fn stop_and_remove_pod(&self, id: &str) {
        self.cri()
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .unwrap_or_else(|e| panic!("StopPodSandbox {id}: {e}\n{}", self.log_tail()));
        self.cri()
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .unwrap_or_else(|e| panic!("RemovePodSandbox {id}: {e}\n{}", self.log_tail()));
    }

    /// CreateContainer then StartContainer of `config` in pod `pod` (whose
    /// sandbox config is `sandbox`): the container's id.
    pub fn create_and_start(
        &self,
        pod: &str,
        sandbox: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> String {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let id = self
            .cri()
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config),
                sandbox_config: Some(sandbox.clone()),
            })
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}\n{}", self.log_tail()))
            .container_id;
        self.cri()
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .unwrap_or_else(|e| panic!("StartContainer {name}: {e}\n{}", self.log_tail()));
        id
    }

    /// ExecSync `cmd…` in container `id` (30 s at most): (exit code,
    /// stdout, stderr).
    pub fn exec(&self, id: &str, cmd: &[&str]) -> (i32, String, String) {
        let r = self
            .cri()
            .exec_sync(ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 30,
            })
            .unwrap_or_else(|e| panic!("ExecSync {cmd:?} in {id}: {e}\n{}", self.log_tail()));
        (
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        )
    }

    /// The pid containerd has for task `id` (a pod's sandbox or a
    /// container): for capsid, the VM's main host process.
    pub fn task_pid(&self, id: &str) -> Option<u32> {
        let (code, out, err) =
            run(self
                .containerd()
                .ctr()
                .args(["-n", K8S_NAMESPACE, "tasks", "ls"]));
        assert_eq!(code, 0, "ctr tasks ls: {out}{err}");
        out.lines().find_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.first() == Some(&id))
                .then(|| fields.get(1).and_then(|p| p.parse().ok()))
                .flatten()
        })
    }

    /// The memory limit of container `id` as its cgroup reads inside it
    /// (cgroup v2 in capsid's guest, with or without a cgroup namespace;
    /// v1 for runc on a v1 host): bytes, or `max`.
    pub fn memory_limit_inside(&self, id: &str) -> String {
        let (code, out, err) = self.exec(
            id,
            &[
                "sh",
                "-c",
                "p=$(sed -n 's/^0:://p' /proc/self/cgroup); \
                 cat /sys/fs/cgroup$p/memory.max 2>/dev/null || \
                 cat /sys/fs/cgroup/memory.max 2>/dev/null || \
                 cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
            ],
        );
        assert_eq!(code, 0, "reading the memory limit in {id}: {out}{err}");
        out.trim().to_string()
    }

    /// Waits until the container's CRI log at `path` has a full stdout
    /// line `want`; the log's lines.
    pub fn wait_log_line(
        &self,
        path: &Path,
        want: &str,
        timeout: Duration,
    ) -> Vec<(String, String)> {
        let start = Instant::now();
        loop {
            let lines = cri_log(path);
            if lines.iter().any(|(s, t)| s == "stdout" && t == want) {
                return lines;
            }
            assert!(
                start.elapsed() < timeout,
                "{} has no line {want:?}: {lines:?}\n{}",
                path.display(),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls ContainerStatus until the container is in `state`.
    pub fn wait_container_state(
        &self,
        id: &str,
        state: ContainerState,
        timeout: Duration,
    ) -> ContainerStatus {
        let start = Instant::now();
        loop {
            let status = self
                .cri()
                .container_status(ContainerStatusRequest {
                    container_id: id.into(),
                    verbose: false,
                })
                .unwrap_or_else(|e| panic!("ContainerStatus {id}: {e}\n{}", self.log_tail()))
                .status
                .unwrap_or_else(|| panic!("ContainerStatus {id}: no status"));
            if status.state == state as i32 {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "container {id} is {:?}, not {state:?}, after {timeout:?}: {status:?}\n{}",
                ContainerState::try_from(status.state),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// containerd's log (the shims log into it).
    pub fn log(&self) -> String {
        self.ctrd.as_ref().map(Containerd::log).unwrap_or_default()
    }

    /// The last lines of containerd's log, for assertion messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "--- containerd log (end) ---\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }

    /// Processes that belong to pods: anything in the harness's cgroup
    /// parent, containerd's shims, and processes naming the harness's dir
    /// (capsid's VMs and device backends).
    pub fn pod_processes(&self) -> Vec<String> {
        self.pod_pids()
            .into_iter()
            .map(|pid| format!("process {pid}: {}", cmdline(pid).join(" ")))
            .collect()
    }

    /// The pids of [`CriHarness::pod_processes`].
    pub fn pod_pids(&self) -> Vec<u32> {
        let ctrd = self.containerd();
        let mut pids: Vec<u32> = processes_in_cgroup(&self.cgroup_parent);
        pids.extend(processes_with(&ctrd.socket().display().to_string()));
        pids.extend(processes_with(&self.dir().display().to_string()));
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|pid| *pid != ctrd.pid());
        pids
    }

    /// The pods' processes and all their descendants (a VM's jailed
    /// processes name none of the harness's paths), each with its start
    /// time so that a pid reused later is not taken for it.
    pub fn pod_process_tree(&self) -> Vec<HostProcess> {
        let mut pids = self.pod_pids();
        pids.extend(descendants(&pids));
        pids.sort_unstable();
        pids.dedup();
        pids.into_iter().filter_map(HostProcess::of).collect()
    }

    /// The entries of the pods' VM shares (one per container in a pod's
    /// VM) and what is staged for them, as `share/entry` paths under
    /// capsid's state dir.
    pub fn share_entries(&self) -> Vec<String> {
        let shares = self.capsid_state_dir().join(".shares");
        let mut found = Vec::new();
        for share in std::fs::read_dir(&shares).into_iter().flatten().flatten() {
            for entry in std::fs::read_dir(share.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                found.push(format!(
                    "share entry {}",
                    entry
                        .path()
                        .strip_prefix(&shares)
                        .unwrap_or(&entry.path())
                        .display()
                ));
            }
        }
        found.sort();
        found
    }

    /// What pods left: sandboxes and containers the CRI still lists, pod
    /// network namespaces, mounts under the harness's or containerd's
    /// dirs, pod processes, and capsid's sandbox state. Empty once every
    /// pod is stopped and removed.
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        match self
            .cri()
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        {
            Ok(list) => found.extend(list.items.iter().map(|p| format!("pod sandbox {}", p.id))),
            Err(e) => found.push(format!("ListPodSandbox failed: {e}")),
        }
        match self
            .cri()
            .list_containers(ListContainersRequest { filter: None })
        {
            Ok(list) => found.extend(
                list.containers
                    .iter()
                    .map(|c| format!("container {}", c.id)),
            ),
            Err(e) => found.push(format!("ListContainers failed: {e}")),
        }
        for ns in std::fs::read_dir(self.netns_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            found.push(format!("network namespace {}", ns.path().display()));
        }
        for m in mounts_under(&[self.dir(), self.containerd().dir()]) {
            found.push(format!("mount {m}"));
        }
        found.extend(self.pod_processes());
        found.extend(state_leftovers(&self.capsid_state_dir()));
        found
    }

    /// Asserts that nothing of any pod is left, waiting a little for
    /// asynchronous cleanup.
    pub fn assert_clean(&self) {
        let start = Instant::now();
        loop {
            let left = self.leftovers();
            if left.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "left behind:\n{}\n{}",
                left.join("\n"),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops and removes every pod through the CRI (what a failed test
    /// left), errors ignored.
    fn remove_pods(&self) {
        let Some(cri) = &self.client else { return };
        let Ok(list) = cri.list_pod_sandbox(ListPodSandboxRequest { filter: None }) else {
            return;
        };
        for pod in list.items {
            let _ = cri.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            });
            let _ = cri.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.id,
            });
        }
    }
}

impl Drop for CriHarness {
    fn drop(&mut self) {
        // A test that failed half-way leaves pods: kubelet's way first.
        self.remove_pods();
        // Whatever survived: shims (their sockets too), container and VM
        // processes, killed before containerd goes.
        if let Some(ctrd) = &self.ctrd {
            let socket = ctrd.socket().display().to_string();
            for pid in processes_with(&socket) {
                if pid == ctrd.pid() {
                    continue;
                }
                let args = cmdline(pid);
                kill9(pid);
                if let Some(w) = args.windows(2).find(|w| w[0] == "-socket") {
                    let _ = std::fs::remove_file(w[1].trim_start_matches("unix://"));
                }
            }
            for pid in processes_with(&self.dir().display().to_string()) {
                if pid != ctrd.pid() {
                    kill9(pid);
                }
            }
        }
        for pid in processes_in_cgroup(&self.cgroup_parent) {
            kill9(pid);
        }
        drop(self.client.take());
        drop(self.ctrd.take());
        remove_cgroups(&self.cgroup_parent);
        for m in mounts_under(&[self.dir.path()]) {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        drop(self.netns.take());
    }
}

/// An image reference as the CRI takes it.
pub fn image_spec(reference: &str) -> ImageSpec {
    ImageSpec {
        image: reference.into(),
        ..Default::default()
    }
}

fn kill9(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// Mount points at or below any of `dirs`, deepest first.
pub fn mounts_under(dirs: &[&Path]) -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut found: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| dirs.iter().any(|d| Path::new(m).starts_with(d)))
        .map(str::to_owned)
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.len()));
    found
}

/// Live processes in cgroup `parent` or below it, in any hierarchy.
pub fn processes_in_cgroup(parent: &str) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| *pid != me)
        .filter(|pid| {
            let cgroups =
                std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            cgroups.lines().any(|l| {
                l.splitn(3, ':')
                    .nth(2)
                    .is_some_and(|path| path == parent || path.starts_with(&format!("{parent}/")))
            })
        })
        .collect()
}

/// Removes cgroup `parent` (and what runc left below it) from every
/// mounted hierarchy (v1 controllers, or the v2 unified tree), deepest
/// first, retrying while killed processes are still leaving.
fn remove_cgroups(parent: &str) {
    let relative = parent.trim_start_matches('/');
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    roots.extend(
        std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path()),
    );
    let mut dirs: Vec<PathBuf> = Vec::new();
    for root in roots {
        let top = root.join(relative);
        if top.is_dir() {
            collect_dirs(&top, &mut dirs);
        }
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    let deadline = Instant::now() + Duration::from_secs(5);
    for dir in dirs {
        while std::fs::remove_dir(&dir).is_err() && dir.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&entry.path(), out);
        }
    }
}

/// A live host process, told from a later one with the same pid by its
/// start time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostProcess {
    /// Its pid.
    pub pid: u32,
    /// Its start time (clock ticks since boot, /proc/PID/stat field 22).
    pub start: u64,
    /// Its name (`comm`).
    pub name: String,
    /// Its command line.
    pub cmdline: String,
}

impl HostProcess {
    /// Process `pid`, if it is alive and not a zombie.
    pub fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let name = stat[open + 1..close].to_string();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // Fields from the 3rd (state) on: the start time is the 22nd.
        if fields.first() == Some(&"Z") {
            return None;
        }
        let start = fields.get(19)?.parse().ok()?;
        Some(Self {
            pid,
            start,
            name,
            cmdline: cmdline(pid).join(" "),
        })
    }

    /// Whether this very process is still alive.
    pub fn alive(&self) -> bool {
        Self::of(self.pid).is_some_and(|p| p.start == self.start)
    }
}

/// Every live descendant of `pids`.
pub fn descendants(pids: &[u32]) -> Vec<u32> {
    let mut children: std::collections::HashMap<u32, Vec<u32>> = Default::default();
    for pid in std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
    {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut found = Vec::new();
    let mut todo: Vec<u32> = pids.to_vec();
    while let Some(pid) = todo.pop() {
        for child in children.get(&pid).into_iter().flatten() {
            if !found.contains(child) && !pids.contains(child) {
                found.push(*child);
                todo.push(*child);
            }
        }
    }
    found
}

/// A CRI log file's lines (`<RFC 3339 time> <stream> <P|F> <text>`) as
/// (stream, text), checking the format of each; none if there is no file.
pub fn cri_log(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| {
            let fields: Vec<&str> = line.splitn(4, ' ').collect();
            assert_eq!(fields.len(), 4, "not a CRI log line: {line:?}");
            let time = fields[0].as_bytes();
            assert!(
                time.len() >= 20 && time[4] == b'-' && time[10] == b'T' && time[13] == b':',
                "no RFC 3339 time in {line:?}"
            );
            assert!(
                ["stdout", "stderr"].contains(&fields[1]),
                "no stream in {line:?}"
            );
            assert!(["P", "F"].contains(&fields[2]), "no tag in {line:?}");
            (fields[1].to_string(), fields[3].to_string())
        })
        .collect()
}

/// The namespaces kubelet gives a pod and each of its containers (without
/// `shareProcessNamespace`): network and IPC are the pod's, each container
/// has a PID namespace of its own.
pub fn kubelet_namespaces() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// A busybox container running `sh -c script`, configured as kubelet does:
/// log path `NAME/0.log` under the pod's log directory (created), the
/// `io.kubernetes.container.name` label, kubelet's namespaces, and
/// `memory_limit` (bytes, 0: none) as its `resources.limits.memory`.
pub fn busybox_container(
    sandbox: &PodSandboxConfig,
    name: &str,
    script: &str,
    memory_limit: i64,
) -> ContainerConfig {
    std::fs::create_dir_all(Path::new(&sandbox.log_directory).join(name))
        .expect("container log directory");
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(image_spec(BUSYBOX)),
        command: vec!["sh".into(), "-c".into(), script.into()],
        labels: std::collections::HashMap::from([(
            "io.kubernetes.container.name".into(),
            name.into(),
        )]),
        log_path: format!("{name}/0.log"),
        linux: Some(LinuxContainerConfig {
            resources: (memory_limit > 0).then(|| LinuxContainerResources {
                memory_limit_in_bytes: memory_limit,
                ..Default::default()
            }),
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(kubelet_namespaces()),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}
