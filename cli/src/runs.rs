//! Records of `capsid run`s, so that what one killed by SIGKILL (or lost in
//! a crash) left on the host is removed later: its VM processes and run
//! directory, and on a network its namespace, tap, iptables rules and IPAM
//! lease.
//!
//! Each run writes `STATE_DIR/.runs/ID.json` before it makes anything and
//! updates it as it goes (the CNI ADD result, the VM's processes); a clean
//! exit removes it. Every `capsid run`, and `capsid gc`, first takes the
//! lock of that directory and undoes the record of every run whose process
//! is gone (the pid *and* its start time, so a reused pid is not mistaken
//! for the owner), with the same teardown a clean exit does.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use capsid_sandbox::cni::record::NetworkRecord;
use capsid_sandbox::config::Config;
use capsid_sandbox::process::ProcessRef;
use capsid_sandbox::record::{self, HostRecord, RecordFile};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// The records' directory, in the state dir.
pub const RUNS_DIR: &str = ".runs";
/// The lock serializing recoveries, in [`RUNS_DIR`].
const LOCK_FILE: &str = "lock";

/// What one `capsid run` made, as far as it got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The `capsid run` process: while it lives, the record is its own.
    pub owner: ProcessRef,
    /// The network namespace it ran in (inode of `/proc/self/ns/net`):
    /// its iptables rules are there, so only a run in the same namespace
    /// recovers it.
    pub host_netns: u64,
    /// What its sandbox made (the sandbox id is `run-PID`).
    pub host: HostRecord,
}

/// The record of this run, kept up to date; removed on drop unless
/// [`RunJournal::keep`] was called (something could not be removed: the
/// next run retries).
#[derive(Debug)]
pub struct RunJournal {
    file: RecordFile<RunRecord>,
    keep: bool,
    /// The volume share, taken down when the journal goes (after the VM,
    /// which is dropped first); if it cannot be, the record stays.
    share: Option<capsid_sandbox::volumes::Share>,
}

impl RunJournal {
    /// Writes the record of sandbox `id` (run directory `run_dir`).
    pub fn begin(config: &Config, id: &str, run_dir: PathBuf) -> anyhow::Result<Self> {
        let dir = config.paths.state_dir.join(RUNS_DIR);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let owner = ProcessRef::this().context("reading this process's start time")?;
        let record = RunRecord {
            owner,
            host_netns: netns_inode().context("reading this process's network namespace")?,
            host: HostRecord::new(id, run_dir),
        };
        Ok(Self {
            file: RecordFile::create(dir.join(format!("{id}.json")), record)?,
            keep: false,
            share: None,
        })
    }

    /// Records the network's state (before each step that makes something).
    pub fn set_network(&mut self, network: &NetworkRecord) -> anyhow::Result<()> {
        Ok(self.file.update(|r| r.host.cni = Some(network.clone()))?)
    }

    /// Records the volume share at `dir` before it is made.
    pub fn set_share(&mut self, dir: &Path) -> anyhow::Result<()> {
        Ok(self
            .file
            .update(|r| r.host.share = Some(dir.to_path_buf()))?)
    }

    /// Takes over the share made at the recorded place: it is taken down
    /// when the journal is dropped, and the record kept if that fails.
    pub fn adopt_share(&mut self, share: capsid_sandbox::volumes::Share) {
        self.share = Some(share);
    }

    /// Records the VM's processes.
    pub fn set_vm_processes(&mut self, pids: &[u32]) -> anyhow::Result<()> {
        Ok(self.file.update(|r| r.host.set_vm_processes(pids))?)
    }

    /// Leaves the record for the next run to finish the clean-up.
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for RunJournal {
    fn drop(&mut self) {
        if let Some(share) = self.share.take() {
            let dir = share.keep();
            if let Err(e) = capsid_sandbox::volumes::undo(&dir) {
                eprintln!(
                    "capsid: taking down the volume share: {:#}",
                    anyhow::Error::from(e)
                );
                self.keep = true;
            }
        }
        if !self.keep {
            if let Err(e) = RecordFile::<RunRecord>::remove(self.file.path()) {
                tracing::warn!(error = %format!("{:#}", anyhow::Error::from(e)), "cannot remove the run record");
            }
        }
    }
}

/// What recovering one dead run did.
#[derive(Debug)]
pub struct Recovered {
    /// The dead run's sandbox id.
    pub id: String,
    /// Its host processes killed.
    pub killed: Vec<u32>,
    /// The first error, if something could not be removed (the record is
    /// kept for another try).
    pub error: Option<String>,
}

/// Undoes the records of dead runs in `config`'s state dir, under the
/// records' lock, with the teardown every sandbox record gets
/// ([`record::undo`]). Records of live runs, of runs in another network
/// namespace, and unreadable ones are left alone. Blocks.
pub fn recover_dead(config: &Config) -> anyhow::Result<Vec<Recovered>> {
    let dir = config.paths.state_dir.join(RUNS_DIR);
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let _lock = lock(&dir)?;
    let here = netns_inode().context("reading this process's network namespace")?;
    let mut done = Vec::new();
    let entries = std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        let record = match RecordFile::<RunRecord>::load(&path) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %format!("{:#}", anyhow::Error::from(e)), "unreadable run record left alone");
                continue;
            }
        };
        if record.owner.is_alive() || record.host_netns != here {
            continue;
        }
        let undone = record::undo(&record.host);
        let recovered = Recovered {
            id: record.host.sandbox.clone(),
            killed: undone.killed.clone(),
            error: undone.first_error().map(str::to_owned),
        };
        if recovered.error.is_none() {
            if let Err(e) = RecordFile::<RunRecord>::remove(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a run record");
            }
        }
        done.push(recovered);
    }
    Ok(done)
}

/// Holds the records' lock.
fn lock(dir: &Path) -> anyhow::Result<Flock<File>> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| anyhow::Error::from(errno))
        .with_context(|| format!("locking {}", path.display()))
}

fn netns_inode() -> std::io::Result<u64> {
    std::fs::metadata("/proc/self/ns/net").map(|m| m.ino())
}

/// Arguments of `capsid gc`.
#[derive(Debug, clap::Args)]
pub struct GcArgs {}

/// `capsid gc`: removes what dead `capsid run`s left, one line each.
pub fn gc(config_path: Option<&Path>, _args: &GcArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    crate::run_pooled::sweep(&config.paths.state_dir);
    let mut failed = false;
    for r in recover_dead(&config)? {
        match &r.error {
            None => println!("{}: removed (killed {} processes)", r.id, r.killed.len()),
            Some(e) => {
                failed = true;
                println!("{}: not everything could be removed: {e}", r.id);
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn config(dir: &Path) -> Config {
        let mut c = Config::default();
        c.paths.state_dir = dir.to_owned();
        c
    }

    #[test]
    fn a_dead_runs_leftovers_go_and_a_live_runs_stay() {
        let tmp = tempfile::tempdir().unwrap();
        let config = config(tmp.path());
        // Nothing recorded yet: nothing made, not even the directory.
        assert!(recover_dead(&config).unwrap().is_empty());
        assert!(!tmp.path().join(RUNS_DIR).exists());

        // A live run (this process): left alone.
        let live_dir = tmp.path().join("run-live");
        std::fs::create_dir_all(&live_dir).unwrap();
        let live = RunJournal::begin(&config, "run-live", live_dir.clone()).unwrap();
        let live_path = live.file.path().to_owned();

        // A dead run: its owner exited; a "VM process" naming its run
        // directory still runs (cat waits on stdin before opening it).
        let dead_dir = tmp.path().join("run-dead");
        std::fs::create_dir_all(&dead_dir).unwrap();
        let mut owner = Command::new("true").spawn().unwrap();
        let owner_ref = ProcessRef::of(owner.id()).unwrap_or(ProcessRef {
            pid: owner.id(),
            start_time: 1,
        });
        owner.wait().unwrap();
        let mut vm = Command::new("cat")
            .arg("-")
            .arg(dead_dir.join("x"))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Until it has exec'd, its command line is still ours.
        let named = dead_dir.join("x").display().to_string();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read(format!("/proc/{}/cmdline", vm.id()))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&named))
        {
            assert!(std::time::Instant::now() < deadline, "cat never ran");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let record = RunRecord {
            owner: owner_ref,
            host_netns: netns_inode().unwrap(),
            host: HostRecord::new("run-dead", &dead_dir),
        };
        let path = tmp.path().join(RUNS_DIR).join("run-dead.json");
        std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();

        let done = recover_dead(&config).unwrap();
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(done[0].id, "run-dead");
        assert_eq!(done[0].killed, [vm.id()]);
        assert!(done[0].error.is_none(), "{done:?}");
        assert!(vm.wait().is_ok());
        assert!(!dead_dir.exists() && !path.exists());
        assert!(live_dir.exists() && live_path.exists());

        // A clean end removes the record; twice is harmless.
        drop(live);
        assert!(!live_path.exists());
        assert!(recover_dead(&config).unwrap().is_empty());
    }

    #[test]
    fn a_record_of_another_namespace_is_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let config = config(tmp.path());
        std::fs::create_dir_all(tmp.path().join(RUNS_DIR)).unwrap();
        let record = RunRecord {
            owner: ProcessRef {
                pid: u32::MAX,
                start_time: 1,
            },
            host_netns: netns_inode().unwrap() + 1,
            host: HostRecord::new("run-1", tmp.path().join("run-1")),
        };
        let path = tmp.path().join(RUNS_DIR).join("run-1.json");
        std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
        std::fs::write(tmp.path().join(RUNS_DIR).join("junk.json"), b"{").unwrap();
        assert!(recover_dead(&config).unwrap().is_empty());
        assert!(path.exists());
    }
}
