//! The runners of `capsid bench startup`, each run once per iteration:
//! `capsid run` (timed phase by phase through its timings record), `ctr run
//! --rm` with runc and with capsid's shim (a private containerd), and the
//! bare VM boot; and setting up what `--compare` needs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use capsid_sandbox::backend::{Backend, VmSpec};
use capsid_sandbox::sandbox as sb;
use serde::Serialize;

use super::report::Skipped;
use super::sample::{CapsidRunSample, Iteration, WallSample};
use crate::bench::bare;
use crate::bench::compare::{self, PrivateContainerd, CAPSID_RUNTIME, RUNC_RUNTIME};
use crate::bench::timings::{monotonic_ns, RunTimings, TIMINGS_ENV};
use crate::bench::BenchSetup;

/// Who is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Runner {
    CapsidRun,
    CtrCapsid,
    CtrCapsidPool,
    CtrRunc,
    BareBoot,
}

impl Runner {
    /// The runner's key in the JSON report.
    pub fn name(self) -> &'static str {
        match self {
            Self::CapsidRun => "capsid_run",
            Self::CtrCapsid => "ctr_capsid",
            Self::CtrCapsidPool => "ctr_capsid_pool",
            Self::CtrRunc => "ctr_runc",
            Self::BareBoot => "bare_boot",
        }
    }

    /// The runner as the report names it.
    pub fn label(self) -> &'static str {
        match self {
            Self::CapsidRun => "capsid run",
            Self::CtrCapsid => "ctr run (capsid shim)",
            Self::CtrCapsidPool => "ctr run (capsid shim, pooled)",
            Self::CtrRunc => "ctr run (runc)",
            Self::BareBoot => "bare VM boot",
        }
    }
}

/// Everything the runners share.
pub struct Bench {
    pub setup: BenchSetup,
    dir: tempfile::TempDir,
    capsid: PathBuf,
    run_config: PathBuf,
    pub command: Vec<String>,
    pub image: String,
    /// The private containerd of `--compare` (gone when dropped).
    pub ctrd: Option<PrivateContainerd>,
    bare: Option<(Arc<dyn Backend>, VmSpec)>,
    /// `--pool`: the pool daemon, its config and shape key.
    pub pool: Option<crate::bench::pool::BenchPool>,
}

impl Bench {
    /// Writes the configuration `capsid run` gets into a new temp dir.
    pub fn new(setup: BenchSetup, command: Vec<String>, image: String) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("capsid-bench")
            .tempdir()
            .context("temp dir")?;
        let run_config = dir.path().join("capsid.toml");
        std::fs::write(&run_config, toml::to_string(&setup.config)?)
            .context("writing the config")?;
        let capsid = std::env::current_exe().context("locating capsid")?;
        Ok(Self {
            setup,
            dir,
            capsid,
            run_config,
            command,
            image,
            ctrd: None,
            bare: None,
            pool: None,
        })
    }

    /// Sets up what `--compare` needs; what cannot run is skipped with
    /// the reason.
    pub fn prepare_comparisons(&mut self, runners: &mut Vec<Runner>, skipped: &mut Vec<Skipped>) {
        match self.prepare_bare() {
            Ok(b) => {
                self.bare = Some(b);
                runners.push(Runner::BareBoot);
            }
            Err(e) => skipped.push(Skipped {
                runner: Runner::BareBoot.name(),
                reason: format!("{e:#}"),
            }),
        }
        let skip_both = |skipped: &mut Vec<Skipped>, reason: String| {
            for r in [Runner::CtrRunc, Runner::CtrCapsid] {
                skipped.push(Skipped {
                    runner: r.name(),
                    reason: reason.clone(),
                });
            }
        };
        let missing: Vec<&str> = ["containerd", "ctr"]
            .into_iter()
            .filter(|p| compare::which(p).is_none())
            .collect();
        if !missing.is_empty() {
            skip_both(skipped, format!("{} not installed", missing.join(" and ")));
            return;
        }
        let archive = match self.image_archive() {
            Ok(a) => a,
            Err(e) => return skip_both(skipped, format!("{e:#}")),
        };
        let shim = compare::which("containerd-shim-capsid-v2");
        let shim_config = match self.shim_config() {
            Ok(c) => c,
            Err(e) => return skip_both(skipped, format!("{e:#}")),
        };
        match PrivateContainerd::start(shim.as_deref(), &shim_config, &archive) {
            Ok(c) => self.ctrd = Some(c),
            Err(e) => return skip_both(skipped, format!("private containerd: {e:#}")),
        }
        if compare::which("runc").is_some() && compare::which("containerd-shim-runc-v2").is_some() {
            runners.push(Runner::CtrRunc);
        } else {
            skipped.push(Skipped {
                runner: Runner::CtrRunc.name(),
                reason: "runc or containerd-shim-runc-v2 not installed".into(),
            });
        }
        if shim.is_some() {
            runners.push(Runner::CtrCapsid);
        } else {
            skipped.push(Skipped {
                runner: Runner::CtrCapsid.name(),
                reason: "containerd-shim-capsid-v2 not found beside capsid or in PATH".into(),
            });
        }
        runners.sort();
    }

    /// Starts `capsid-poold` for `--pool` with the shim's config plus a
    /// pool of `size` sandboxes of the benchmarked shape; the pooled
    /// runner joins when it runs.
    pub fn prepare_pool(
        &mut self,
        size: u32,
        runners: &mut Vec<Runner>,
        skipped: &mut Vec<Skipped>,
    ) {
        if !runners.contains(&Runner::CtrCapsid) {
            skipped.push(Skipped {
                runner: Runner::CtrCapsidPool.name(),
                reason: "ctr run with capsid's shim cannot run here".into(),
            });
            return;
        }
        let started = self.shim_config().and_then(|shim_config| {
            crate::bench::pool::BenchPool::start(
                &shim_config,
                &self.dir.path().join("pool.toml"),
                self.setup.vcpus,
                self.setup.memory_mib,
                size,
            )
        });
        match started {
            Ok(pool) => {
                self.pool = Some(pool);
                runners.push(Runner::CtrCapsidPool);
                runners.sort();
            }
            Err(e) => skipped.push(Skipped {
                runner: Runner::CtrCapsidPool.name(),
                reason: format!("{e:#}"),
            }),
        }
    }

    /// The backend and VM of the bare boot.
    fn prepare_bare(&self) -> anyhow::Result<(Arc<dyn Backend>, VmSpec)> {
        let backend = sb::backend_for(&self.setup.config)?;
        let initramfs = self.dir.path().join("bare-initramfs.cpio");
        std::fs::write(&initramfs, bare::trivial_initramfs()).context("bare initramfs")?;
        // Read by QEMU or capsid-vmm as the sandbox's uid (the jail).
        std::fs::set_permissions(&initramfs, std::fs::Permissions::from_mode(0o644))
            .context("bare initramfs")?;
        let spec = VmSpec {
            name: String::new(),
            vcpus: self.setup.vcpus,
            memory_mib: self.setup.memory_mib,
            kernel: self.setup.config.paths.kernel.clone(),
            initramfs,
            kernel_args: vec![],
            disks: vec![],
            net: None,
            fs: None,
            guest_cid: 3,
            run_dir: self.dir.path().join("bare"),
            cgroup: None,
        };
        Ok((backend, spec))
    }

    /// The OCI archive `ctr images import` takes for `--image`.
    fn image_archive(&self) -> anyhow::Result<PathBuf> {
        let as_path = Path::new(&self.image);
        if as_path.is_file() {
            return Ok(as_path.to_path_buf());
        }
        if as_path.is_dir() {
            bail!(
                "{} is an OCI layout directory; ctr imports archives only",
                self.image
            );
        }
        let bundled = self
            .setup
            .config
            .paths
            .images_dir
            .join(format!("{}.tar", self.image));
        if bundled.is_file() {
            Ok(bundled)
        } else {
            Err(anyhow!(
                "no OCI archive for image {} ({} does not exist)",
                self.image,
                bundled.display()
            ))
        }
    }

    /// The shim's config: ours, with its state and rootfs cache (keyed by
    /// the private containerd's snapshot paths) in the temp dir.
    fn shim_config(&self) -> anyhow::Result<PathBuf> {
        let mut config = self.setup.config.clone();
        config.paths.state_dir = self.dir.path().join("shim-run");
        config.paths.cache_dir = self.dir.path().join("shim-cache");
        config.vm.memory_mib = self.setup.memory_mib;
        config.vm.vcpus = self.setup.vcpus;
        // The size benchmarked is the admin's choice here: the policy's
        // maxima must not refuse it.
        let policy = &mut config.vm.policy;
        policy.max_memory_mib = policy.max_memory_mib.max(self.setup.memory_mib);
        policy.max_vcpus = policy.max_vcpus.max(self.setup.vcpus);
        let path = self.dir.path().join("shim.toml");
        std::fs::write(&path, toml::to_string(&config)?).context("writing the shim config")?;
        Ok(path)
    }

    /// Runs `runner` once (iteration `i`), into `it`.
    pub fn run_one(&self, runner: Runner, i: u32, it: &mut Iteration) -> anyhow::Result<()> {
        let id = format!("capsid-bench-{}-{i}", std::process::id());
        match runner {
            Runner::CapsidRun => it.capsid_run = Some(self.capsid_run(i)?),
            Runner::CtrRunc | Runner::CtrCapsid => {
                let ctrd = self.ctrd.as_ref().ok_or_else(|| anyhow!("no containerd"))?;
                let (runtime, id) = match runner {
                    Runner::CtrRunc => (RUNC_RUNTIME, format!("{id}-runc")),
                    _ => (CAPSID_RUNTIME, format!("{id}-capsid")),
                };
                let (total_ms, phases) = ctrd.timed_run(runtime, &id, &self.command, &[])?;
                let sample = Some(WallSample { total_ms, phases });
                if runner == Runner::CtrRunc {
                    it.ctr_runc = sample;
                } else {
                    it.ctr_capsid = sample;
                }
            }
            Runner::CtrCapsidPool => {
                let ctrd = self.ctrd.as_ref().ok_or_else(|| anyhow!("no containerd"))?;
                let pool = self.pool.as_ref().ok_or_else(|| anyhow!("no pool"))?;
                // A warm pool: the sandbox taken is one booted earlier,
                // not one booting now (not timed).
                let before = pool.wait_full()?;
                let config = pool.config().display().to_string();
                let (total_ms, phases) = ctrd.timed_run(
                    CAPSID_RUNTIME,
                    &format!("{id}-pool"),
                    &self.command,
                    &["--runtime-config-path", &config],
                )?;
                pool.check_taken(&before)?;
                it.ctr_capsid_pool = Some(WallSample { total_ms, phases });
            }
            Runner::BareBoot => {
                let (backend, spec) = self.bare.as_ref().ok_or_else(|| anyhow!("no backend"))?;
                it.bare_boot = Some(bare::boot(backend, spec, &format!("bare-{i}"))?);
            }
        }
        Ok(())
    }

    /// One `capsid run`, its timings record read back.
    fn capsid_run(&self, i: u32) -> anyhow::Result<CapsidRunSample> {
        let record_path = self.dir.path().join(format!("run-{i}.json"));
        let mut cmd = Command::new(&self.capsid);
        cmd.arg("--config")
            .arg(&self.run_config)
            // Cold: its phases are the boot's (`--pool` measures pooled
            // runs on their own).
            .args(["run", "--no-pool", "--image", &self.image])
            .args(["--memory", &self.setup.memory_mib.to_string()])
            .args(["--cpus", &self.setup.vcpus.to_string(), "--"])
            .args(&self.command)
            .env(TIMINGS_ENV, &record_path)
            .env_remove("CAPSID_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawn_ns = monotonic_ns();
        let out = cmd.output().context("running capsid run")?;
        let exit_ns = monotonic_ns();
        if !out.status.success() {
            bail!(
                "capsid run: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = std::fs::read(&record_path)
            .with_context(|| format!("capsid run wrote no timings to {}", record_path.display()))?;
        let record: RunTimings = serde_json::from_slice(&text).context("reading the timings")?;
        let _ = std::fs::remove_file(&record_path);
        Ok(CapsidRunSample::from_record(&record, spawn_ns, exit_ns))
    }
}
