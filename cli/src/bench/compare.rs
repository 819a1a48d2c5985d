//! The comparisons of `capsid bench startup --compare` that go through
//! containerd: a private containerd (own root, state, sockets and PATH
//! under a temp dir, removed at the end with the shims it started), the
//! benchmark image imported, and `ctr run --rm` with runc or with capsid's
//! shim (`--runtime io.containerd.capsid.v2`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::procfs;

/// The runtime name containerd maps to `containerd-shim-capsid-v2`.
pub const CAPSID_RUNTIME: &str = "io.containerd.capsid.v2";
/// runc's shim v2.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";

/// A private containerd, stopped and removed on drop.
#[derive(Debug)]
pub struct PrivateContainerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// The image reference after import.
    pub image: String,
}

/// Finds a program in PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    capsid_sandbox::locate::binary(Path::new(program))
}

impl PrivateContainerd {
    /// Starts containerd with `shim` on its PATH (as
    /// `containerd-shim-capsid-v2`, when given) and `capsid_config` as the
    /// shim's configuration, then imports `image_archive`.
    pub fn start(
        shim: Option<&Path>,
        capsid_config: &Path,
        image_archive: &Path,
    ) -> anyhow::Result<Self> {
        let containerd =
            which("containerd").ok_or_else(|| anyhow!("containerd is not installed"))?;
        let dir = tempfile::Builder::new()
            .prefix("capsid-bench-containerd")
            .tempdir()
            .context("temp dir for containerd")?;
        let d = dir.path();
        let bin = d.join("bin");
        std::fs::create_dir_all(&bin).context("containerd's bin dir")?;
        if let Some(shim) = shim {
            std::os::unix::fs::symlink(shim, bin.join("containerd-shim-capsid-v2"))
                .context("linking the shim")?;
        }
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("containerd.sock").display(),
            opt = d.join("opt").display(),
        );
        std::fs::write(d.join("config.toml"), config).context("containerd config")?;
        let log = std::fs::File::create(d.join("containerd.log")).context("containerd log")?;
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        let child = Command::new(containerd)
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .env(capsid_sandbox::config::CONFIG_ENV, capsid_config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("containerd log")?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        let mut me = Self {
            dir,
            child: Some(child),
            image: String::new(),
        };
        let start = Instant::now();
        loop {
            if me.ctr(&["version"]).is_ok() {
                break;
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!(
                    "containerd did not answer within 20 s (log: {})",
                    me.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        me.ctr(&["images", "import", &image_archive.display().to_string()])
            .with_context(|| format!("importing {}", image_archive.display()))?;
        let listed = me.ctr(&["images", "ls", "-q"])?;
        me.image = listed
            .lines()
            .next()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{} holds no named image", image_archive.display()))?;
        Ok(me)
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// `ctr ARGS` to completion: its stdout, or an error with its stderr.
    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("ctr")
            .arg("-a")
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running ctr")?;
        if !out.status.success() {
            bail!(
                "ctr {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ctr run --rm --runtime RUNTIME FLAGS… IMAGE ID CMD…`, timed from
    /// spawn to exit, in ms; with capsid's shim, its phases as it logged
    /// them.
    pub fn timed_run(
        &self,
        runtime: &str,
        id: &str,
        command: &[String],
        flags: &[&str],
    ) -> anyhow::Result<(f64, Option<crate::bench::shim_phases::ShimPhases>)> {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a")
            .arg(self.socket())
            .args(["run", "--rm", "--runtime", runtime])
            .args(flags)
            .args([&self.image, id])
            .args(command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let launched = std::time::SystemTime::now();
        let t0 = Instant::now();
        let out = cmd.output().context("running ctr")?;
        let elapsed = t0.elapsed().as_secs_f64() * 1000.0;
        let exited = std::time::SystemTime::now();
        if !out.status.success() {
            bail!(
                "ctr run --runtime {runtime} {id}: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let phases = (runtime == CAPSID_RUNTIME).then(|| {
            let log =
                std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
            crate::bench::shim_phases::read(&log, id, launched, exited)
        });
        Ok((elapsed, phases))
    }

    fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }
}

impl Drop for PrivateContainerd {
    /// Stops containerd, then every process still naming our directory
    /// (shims, and VMs of a shim that did not finish), unmounts what is
    /// mounted below it, and removes it.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let marker = self.dir.path().display().to_string();
        for pid in procfs::processes_mentioning(&marker) {
            let _ = kill(
                Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX)),
                Signal::SIGKILL,
            );
        }
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| Path::new(m).starts_with(self.dir.path()))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
