//! Running the `capsid` CLI in tests, with a private config (state and
//! cache under a temp dir) so leftovers can be checked.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::bin;

/// A private capsid installation for one test.
#[derive(Debug)]
pub struct Capsid {
    /// Holds the state and cache dirs.
    pub dir: tempfile::TempDir,
    config: PathBuf,
}

impl Capsid {
    /// Writes a config pointing at this build's artifacts.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("capsid-cli")
            .tempdir()
            .unwrap();
        let config = crate::sandbox::test_config(dir.path());
        let path = dir.path().join("config.toml");
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
        Self { dir, config: path }
    }

    /// The config file.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// `capsid --config … run ARGS`.
    pub fn run_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("capsid"));
        cmd.arg("--config").arg(&self.config).arg("run").args(args);
        cmd
    }

    /// `capsid run RUN_ARGS` (a shell-quoted string) under a pseudo-terminal
    /// (`script`), with `env` (`NAME=VALUE …`) before it: its output, with
    /// the terminal's carriage returns removed, and its exit status.
    pub fn run_under_pty(&self, env: &str, run_args: &str) -> (String, Option<i32>) {
        let cmd = format!(
            "{env} {} --config {} run {run_args}",
            bin("capsid").display(),
            self.config.display()
        );
        let o = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (stdout(&o).replace('\r', ""), o.status.code())
    }

    /// Runs `capsid run ARGS` with `stdin` as its standard input file.
    pub fn run(&self, args: &[&str], stdin: Option<&Path>) -> Output {
        let mut cmd = self.run_cmd(args);
        match stdin {
            Some(p) => cmd.stdin(std::fs::File::open(p).unwrap()),
            None => cmd.stdin(Stdio::null()),
        };
        cmd.output().unwrap()
    }

    /// Asserts nothing of a sandbox is left: no run directories, no
    /// processes that mention this test's directory.
    pub fn assert_no_leftovers(&self) {
        let run = self.dir.path().join("run");
        let left: Vec<_> = std::fs::read_dir(&run)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        // `.cni` keeps the bundled network's IPAM state across runs: allowed
        // as long as it holds no lease. `.runs` keeps the records of running
        // `capsid run`s and their lock: allowed without a record.
        let left: Vec<_> = left
            .into_iter()
            .filter(|p| p.file_name() != Some(".cni".as_ref()) || cni_leases(p) > 0)
            .filter(|p| p.file_name() != Some(".runs".as_ref()) || !run_records(p).is_empty())
            .filter(|p| p.file_name() != Some(".shares".as_ref()) || !is_empty_dir(p))
            .filter(|p| p.file_name() != Some(".jail".as_ref()) || !is_empty_dir(&p.join("root")))
            // Pooled sandboxes' network namespaces are pinned here, and
            // the pool's directories stay (docs/pool.md).
            .filter(|p| p.file_name() != Some(".netns".as_ref()) || !is_empty_dir(p))
            .filter(|p| {
                p.file_name() != Some(".pool".as_ref())
                    || !crate::shim::pool_leftovers(p).is_empty()
            })
            .collect();
        assert!(left.is_empty(), "left in the state dir: {left:?}");
        let marker = self.dir.path().display().to_string();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            assert!(
                !cmdline.contains(&marker),
                "process left running: {cmdline}"
            );
        }
        // No volume bind or share is left mounted.
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let state = run.display().to_string();
        let mounted: Vec<&str> = mountinfo
            .lines()
            .filter(|l| l.split(' ').nth(4).is_some_and(|p| p.starts_with(&state)))
            .collect();
        assert!(mounted.is_empty(), "left mounted: {mounted:?}");
        // Only the image cache remains (disks, no temp files or locks).
        let cache = self.dir.path().join("cache/images");
        for entry in std::fs::read_dir(&cache).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(
                name.ends_with(".erofs") || name.ends_with(".ext4"),
                "cache leftover {name}"
            );
        }
    }
}

impl Default for Capsid {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether `p` is missing or an empty directory.
pub fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

/// The run records (`*.json`) in a `.runs` dir.
pub fn run_records(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".json"))
                .collect()
        })
        .unwrap_or_default()
}

/// Host-local leases (files named by an address) under a `.cni` dir.
fn cni_leases(dir: &Path) -> usize {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            count += cni_leases(&path);
        } else if entry
            .file_name()
            .to_string_lossy()
            .parse::<std::net::IpAddr>()
            .is_ok()
        {
            count += 1;
        }
    }
    count
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The cgroup directories capsid's jail made for sandbox `name` (a VM's
/// run directory name) under this process's own cgroups, that exist now.
pub fn jail_cgroups(name: &str) -> Vec<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut found = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let mount = match controllers {
            "" => "/sys/fs/cgroup/unified".to_string(),
            "memory" | "pids" => format!("/sys/fs/cgroup/{controllers}"),
            _ => continue,
        };
        let dir = Path::new(&mount)
            .join(path.trim_start_matches('/'))
            .join("capsid")
            .join(name);
        if dir.exists() {
            found.push(dir);
        }
    }
    found
}
