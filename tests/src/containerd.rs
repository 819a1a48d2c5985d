//! A private containerd for tests: its own root, state and sockets under a
//! temp dir, killed and cleaned up on drop; its CRI plugin disabled unless
//! a test asks for it (capsid_tests::cri), and network namespaces for
//! daemons that must not touch the host's network.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::run;

/// A running private containerd.
#[derive(Debug)]
pub struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
    ctr: PathBuf,
}

/// Where containerd and ctr come from, and where containerd runs.
#[derive(Debug, Default, Clone)]
pub struct ContainerdSetup {
    /// Directory holding `containerd` and `ctr` (and containerd's own
    /// shims); `None`: `$CAPSID_TEST_CONTAINERD_DIR`, else the system's.
    pub bin_dir: Option<PathBuf>,
    /// Network namespace (file) containerd runs in; `None`: the host's.
    pub netns: Option<PathBuf>,
    /// Directories put first on containerd's PATH (where it finds shims).
    pub path_prefix: Vec<PathBuf>,
    /// TOML appended to the config that enables the CRI plugin (its
    /// `[plugins."io.containerd.grpc.v1.cri"]` tables); `None`: the CRI
    /// plugin is disabled.
    pub cri_config: Option<String>,
}

impl ContainerdSetup {
    fn bin_dir(&self) -> Option<PathBuf> {
        self.bin_dir.clone().or_else(|| {
            std::env::var_os("CAPSID_TEST_CONTAINERD_DIR")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
        })
    }

    fn program(&self, name: &str) -> PathBuf {
        self.bin_dir()
            .map(|d| d.join(name))
            .unwrap_or_else(|| PathBuf::from(name))
    }
}

impl Containerd {
    /// Starts containerd with a config that keeps it away from any system
    /// instance, and waits until its socket answers.
    pub fn start() -> Self {
        Self::start_with(ContainerdSetup::default())
    }

    /// [`Containerd::start`] with the binaries and namespace of `setup`.
    pub fn start_with(setup: ContainerdSetup) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("capsid-ctrd")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        let disabled = if setup.cri_config.is_some() {
            ""
        } else {
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"
        };
        let mut config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
{disabled}[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("containerd.sock").display(),
            opt = d.join("opt").display(),
        );
        if let Some(cri) = &setup.cri_config {
            config.push_str(cri);
        }
        let cfg = d.join("config.toml");
        std::fs::write(&cfg, config).expect("write containerd config");
        let log = std::fs::File::create(d.join("containerd.log")).expect("containerd log");
        let mut path: Vec<PathBuf> = setup.path_prefix.clone();
        path.extend(setup.bin_dir());
        path.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        let mut cmd = match &setup.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .arg(setup.program("containerd"));
                c
            }
            None => Command::new(setup.program("containerd")),
        };
        let child = cmd
            .env("PATH", std::env::join_paths(path).expect("PATH"))
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("containerd must be installed (make deps)");
        // (With a bin_dir, containerd comes from contrib/clients/fetch.sh.)
        let me = Self {
            child,
            dir,
            ctr: setup.program("ctr"),
        };
        let start = Instant::now();
        while !me
            .ctr()
            .args(["version"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "containerd did not come up:\n{}",
                me.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        me
    }

    /// The gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// The private root (for checking leftovers).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The private state directory (task bundles live under it).
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A `ctr` command talking to this containerd.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new(&self.ctr);
        cmd.arg("-a").arg(self.socket()).stdin(Stdio::null());
        cmd
    }

    /// The temp dir holding containerd's config, root, state and sockets.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's pid (for telling it from what it started).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Snapshots may still be mounted: unmount everything below our dir
        // (deepest first) before the temp dir is removed.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| Path::new(m).starts_with(self.dir.path()))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

/// A network namespace made with `ip netns add` (`/run/netns/NAME`), its
/// loopback up, deleted on drop.
#[derive(Debug)]
pub struct TestNetns {
    name: String,
}

impl TestNetns {
    /// `PREFIX-<pid>-<random hex>`: unique among parallel tests.
    pub fn create(prefix: &str) -> Self {
        let name = format!("{prefix}-{}", std::process::id()) + &format!("-{:x}", rand_suffix());
        let (code, _, err) = run(Command::new("ip").args(["netns", "add", &name]));
        assert_eq!(code, 0, "ip netns add {name}: {err}");
        // Daemons bind 127.0.0.1 in it (the CRI stream server, a DNS stub).
        let (code, _, err) = run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        assert_eq!(code, 0, "ip -n {name} link set lo up: {err}");
        Self { name }
    }

    /// The namespace's name for `ip -n`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file (for `nsenter --net=`).
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = run(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

/// 32 random-enough bits (clock and std's hash seed) for unique names.
pub fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() & 0xffff_ffff
}
