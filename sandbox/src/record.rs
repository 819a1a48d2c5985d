//! One record of what a sandbox made on the host, and one way to undo it.
//!
//! The record lists the VM's processes, its run directory, mounts, files
//! made for this sandbox alone, the tap made in a foreign network namespace
//! and the CNI network capsid set up itself. It is written (atomically)
//! before each of those is made, so that another process can undo all of it
//! after the one that made it died: the shim keeps it in the bundle, where
//! containerd's `delete` finds it; `capsid run` under the state directory,
//! where the next run and `capsid gc` find it. A failed create undoes what
//! it made with the same [`undo`].

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::cni::record::NetworkRecord;
use crate::network::TapRecord;
use crate::process::{kill_all, processes_naming, ProcessRef};

/// How long killed VM processes get to disappear.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Errors reading or writing a record file.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file cannot be written.
    #[error("cannot write the sandbox record {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file exists but cannot be read.
    #[error("cannot read the sandbox record {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file does not parse.
    #[error("the sandbox record {} is corrupt", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// Result of record operations.
pub type Result<T> = std::result::Result<T, RecordError>;

/// Everything one sandbox made on the host, as far as it got.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    /// The sandbox's name (its run directory's name).
    pub sandbox: String,
    /// The VM's run directory (sockets, logs); processes whose command line
    /// names it belong to this sandbox.
    pub run_dir: PathBuf,
    /// The VM's host processes, once started.
    #[serde(default)]
    pub vm_processes: Vec<ProcessRef>,
    /// Mount points made on the host (unmounted and removed).
    #[serde(default)]
    pub mounts: Vec<PathBuf>,
    /// Files made for this sandbox alone (removed).
    #[serde(default)]
    pub scratch_files: Vec<PathBuf>,
    /// The tap made in a network namespace someone else owns.
    #[serde(default)]
    pub tap: Option<TapRecord>,
    /// The CNI network capsid set up itself (namespace, plugins' state).
    #[serde(default)]
    pub cni: Option<NetworkRecord>,
    /// The network namespace made for this sandbox alone (a spec asking
    /// for a new one without a path), deleted last.
    #[serde(default)]
    pub own_netns: Option<PathBuf>,
    /// The volume share ([`crate::volumes`]): unmounted, its placeholders
    /// removed, never anything inside a volume.
    #[serde(default)]
    pub share: Option<PathBuf>,
    /// A pod container's entry in its pod's share
    /// ([`crate::pod_share`]): taken down, never anything inside it.
    #[serde(default)]
    pub pod_entry: Option<PodEntryRecord>,
    /// The cgroup the VM's processes were put in, when the spec named one
    /// (`crate::backend::VmSpec::cgroup`); `None`: one under the caller's.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
}

/// Where a pod container's files are in its pod's share.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodEntryRecord {
    /// The pod's share directory.
    pub share: PathBuf,
    /// The entry's name in it.
    pub name: String,
}

impl HostRecord {
    /// The record of sandbox `sandbox` with run directory `run_dir`, before
    /// anything of it exists.
    pub fn new(sandbox: impl Into<String>, run_dir: impl Into<PathBuf>) -> Self {
        Self {
            sandbox: sandbox.into(),
            run_dir: run_dir.into(),
            ..Self::default()
        }
    }

    /// Records the VM's host processes (those already gone are skipped).
    pub fn set_vm_processes(&mut self, pids: &[u32]) {
        self.vm_processes = pids.iter().filter_map(|p| ProcessRef::of(*p)).collect();
    }
}

/// A record kept in a file, rewritten atomically on every change.
#[derive(Debug)]
pub struct RecordFile<T> {
    path: PathBuf,
    record: T,
}

impl<T: Serialize + DeserializeOwned> RecordFile<T> {
    /// Writes `record` to `path` (replacing what was there).
    pub fn create(path: PathBuf, record: T) -> Result<Self> {
        let file = Self { path, record };
        file.save()?;
        Ok(file)
    }

    /// The record as last written.
    pub fn record(&self) -> &T {
        &self.record
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Changes the record and writes it before returning: call it before
    /// making what the change records.
    pub fn update(&mut self, change: impl FnOnce(&mut T)) -> Result<()> {
        change(&mut self.record);
        self.save()
    }

    /// Reads the record at `path`; `None` if there is none.
    pub fn load(path: &Path) -> Result<Option<T>> {
        let text = match fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(RecordError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| RecordError::Parse {
                path: path.to_owned(),
                source,
            })
    }

    /// Removes the file at `path` (absent is fine).
    pub fn remove(path: &Path) -> Result<()> {
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RecordError::Write {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Writes the record atomically: temp file, rename. No fsync: the
    /// record has to outlive the process that wrote it (SIGKILL, a crash),
    /// which the page cache does; after a host crash every VM it names is
    /// gone anyway, and the state directories live on tmpfs by default. An
    /// fsync here cost ~5 ms per write on the start-up path.
    fn save(&self) -> Result<()> {
        let write_err = |source| RecordError::Write {
            path: self.path.clone(),
            source,
        };
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = self.path.with_file_name(format!(".{name}.tmp"));
        let text = serde_json::to_vec_pretty(&self.record).map_err(|e| write_err(e.into()))?;
        fs::write(&temp, &text).map_err(write_err)?;
        fs::rename(&temp, &self.path).map_err(write_err)
    }
}

/// A sandbox being made: its record file, undone (and removed) on drop
/// unless [`Rollback::commit`] is called. Declare it before the live
/// objects it records (VM, tap, disk leases), so that on an early return
/// those are dropped first and the undo finds them released.
#[derive(Debug)]
pub struct Rollback {
    file: Option<RecordFile<HostRecord>>,
}

impl Rollback {
    /// Starts recording at `path`, before anything is made.
    pub fn begin(path: PathBuf, record: HostRecord) -> Result<Self> {
        Ok(Self {
            file: Some(RecordFile::create(path, record)?),
        })
    }

    /// Goes on recording in `file`, written already (a pooled sandbox's,
    /// taken by a container): undone on drop unless committed, like one
    /// begun here.
    pub fn resume(file: RecordFile<HostRecord>) -> Self {
        Self { file: Some(file) }
    }

    /// Changes the record and writes it: call before making what the change
    /// records.
    pub fn update(&mut self, change: impl FnOnce(&mut HostRecord)) -> Result<()> {
        match self.file.as_mut() {
            Some(file) => file.update(change),
            None => Ok(()),
        }
    }

    /// The record as last written.
    pub fn record(&self) -> Option<&HostRecord> {
        self.file.as_ref().map(RecordFile::record)
    }

    /// Everything was made: keep the record (for a later teardown) and
    /// undo nothing.
    pub fn commit(mut self) -> Option<RecordFile<HostRecord>> {
        self.file.take()
    }
}

impl Drop for Rollback {
    fn drop(&mut self) {
        let Some(file) = self.file.take() else {
            return;
        };
        let report = undo(file.record());
        if report.errors.is_empty() {
            if let Err(e) = RecordFile::<HostRecord>::remove(file.path()) {
                tracing::warn!(error = %chain(&e), "cannot remove the sandbox record");
            }
        }
    }
}

/// What [`undo`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UndoReport {
    /// Host processes killed.
    pub killed: Vec<u32>,
    /// Files and directories removed.
    pub removed: Vec<PathBuf>,
    /// What could not be undone (each step is tried regardless).
    pub errors: Vec<String>,
}

impl UndoReport {
    /// The first error, if any.
    pub fn first_error(&self) -> Option<&str> {
        self.errors.first().map(String::as_str)
    }
}

/// Undoes what `record` says was (or may have been) made, in the order a
/// clean teardown takes: the VM's processes first (they hold the tap and
/// the disks), then mounts, the network, the run directory and the
/// sandbox's own files. What is already gone is no error; running it twice
/// is harmless. Blocks.
pub fn undo(record: &HostRecord) -> UndoReport {
    let mut report = UndoReport::default();
    let mut victims: Vec<ProcessRef> = record
        .vm_processes
        .iter()
        .copied()
        .filter(ProcessRef::is_alive)
        .collect();
    if !record.run_dir.as_os_str().is_empty() {
        for p in processes_naming(&record.run_dir)
            .into_iter()
            .filter_map(ProcessRef::of)
        {
            if !victims.contains(&p) {
                victims.push(p);
            }
        }
    }
    report.killed = kill_all(&victims, KILL_WAIT);
    for pid in &report.killed {
        tracing::info!(sandbox = %record.sandbox, pid, "killed sandbox process");
    }
    for mount in &record.mounts {
        if let Err(e) = unmount(mount) {
            report.errors.push(e);
        }
    }
    if let Some(entry) = &record.pod_entry {
        if let Err(e) = crate::pod_share::undo_entry(&entry.share, &entry.name) {
            report.errors.push(format!(
                "taking down share entry {}: {}",
                entry.name,
                chain(&e)
            ));
        }
    }
    if let Some(share) = &record.share {
        match crate::volumes::undo(share) {
            Ok(()) => {}
            Err(e) => report
                .errors
                .push(format!("taking down the volume share: {}", chain(&e))),
        }
    }
    if let Some(tap) = &record.tap {
        if let Err(e) = crate::network::detach_leftovers(&tap.netns, &tap.tap) {
            report
                .errors
                .push(format!("removing tap {}: {}", tap.tap, chain(&e)));
        }
    }
    if let Some(net) = &record.cni {
        if let Err(e) = crate::cni::record::recover(net) {
            report
                .errors
                .push(format!("removing the CNI network: {}", chain(&e)));
        }
    }
    if let Some(netns) = record.own_netns.as_ref().filter(|n| n.exists()) {
        match crate::netns::NamedNetns::adopt(netns.clone()).delete() {
            Ok(()) => report.removed.push(netns.clone()),
            Err(e) => report.errors.push(format!(
                "removing network namespace {}: {}",
                netns.display(),
                chain(&e)
            )),
        }
    }
    for path in std::iter::once(&record.run_dir).chain(&record.scratch_files) {
        match remove(path) {
            Ok(true) => report.removed.push(path.clone()),
            Ok(false) => {}
            Err(e) => report.errors.push(e),
        }
    }
    if !record.run_dir.as_os_str().is_empty() {
        report
            .removed
            .extend(crate::backend::jail::remove_leftover_cgroups(
                &record.run_dir,
                record.cgroup.as_deref(),
            ));
    }
    if report.errors.is_empty() {
        tracing::info!(sandbox = %record.sandbox, killed = ?report.killed, removed = ?report.removed, "sandbox leftovers removed");
    } else {
        tracing::warn!(sandbox = %record.sandbox, errors = ?report.errors, "not every leftover of the sandbox could be removed");
    }
    report
}

/// An error with its sources, for a report line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Detaches the mount at `path` (if any) and removes the mount point.
fn unmount(path: &Path) -> std::result::Result<(), String> {
    use nix::mount::{umount2, MntFlags};
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => return Err(format!("unmounting {}: {e}", path.display())),
    }
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("removing mount point {}: {e}", path.display())),
    }
}

/// Removes a file or directory tree; whether something was there.
fn remove(path: &Path) -> std::result::Result<bool, String> {
    if path.as_os_str().is_empty() {
        return Ok(false);
    }
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(_) => return Ok(false),
    };
    match result {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("removing {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A stand-in VM process whose command line names `path` (cat waits on
    /// its stdin before it opens its file argument).
    fn process_naming(path: &Path) -> std::process::Child {
        let child = Command::new("cat")
            .arg("-")
            .arg(path)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Until it has exec'd, its command line is still ours.
        let named = path.display().to_string();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !fs::read(format!("/proc/{}/cmdline", child.id()))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&named))
        {
            assert!(std::time::Instant::now() < deadline, "cat never ran");
            std::thread::sleep(Duration::from_millis(2));
        }
        child
    }

    #[test]
    fn a_record_round_trips_and_goes_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record.json");
        assert_eq!(RecordFile::<HostRecord>::load(&path).unwrap(), None);
        let mut file =
            RecordFile::create(path.clone(), HostRecord::new("s1", "/run/capsid/s1")).unwrap();
        file.update(|r| {
            r.vm_processes = vec![ProcessRef {
                pid: 7,
                start_time: 9,
            }];
            r.mounts.push("/b/m".into());
            r.scratch_files.push("/c/d.erofs".into());
            r.tap = Some(TapRecord {
                netns: "/var/run/netns/x".into(),
                tap: "tap0_0123456789".into(),
            });
        })
        .unwrap();
        assert_eq!(
            RecordFile::<HostRecord>::load(&path).unwrap().as_ref(),
            Some(file.record())
        );
        RecordFile::<HostRecord>::remove(&path).unwrap();
        RecordFile::<HostRecord>::remove(&path).unwrap();
        assert_eq!(RecordFile::<HostRecord>::load(&path).unwrap(), None);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no temp file left"
        );
    }

    #[test]
    fn an_uncommitted_rollback_undoes_and_a_committed_one_keeps() {
        let tmp = tempfile::tempdir().unwrap();
        let run_dir = tmp.path().join("run/s1");
        let path = tmp.path().join("record.json");
        {
            let mut rollback =
                Rollback::begin(path.clone(), HostRecord::new("s1", &run_dir)).unwrap();
            fs::create_dir_all(&run_dir).unwrap();
            let scratch = tmp.path().join("scratch.erofs");
            rollback
                .update(|r| r.scratch_files.push(scratch.clone()))
                .unwrap();
            fs::write(&scratch, b"disk").unwrap();
            // An early return: dropped without commit.
        }
        assert!(!run_dir.exists());
        assert!(!tmp.path().join("scratch.erofs").exists());
        assert!(!path.exists(), "the record goes with what it recorded");

        let rollback = Rollback::begin(
            path.clone(),
            HostRecord::new("s2", tmp.path().join("run/s2")),
        )
        .unwrap();
        fs::create_dir_all(tmp.path().join("run/s2")).unwrap();
        let kept = rollback.commit().unwrap();
        assert!(tmp.path().join("run/s2").exists());
        assert_eq!(
            RecordFile::<HostRecord>::load(&path).unwrap().as_ref(),
            Some(kept.record())
        );
    }

    #[test]
    fn a_corrupt_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record.json");
        fs::write(&path, b"{").unwrap();
        let e = RecordFile::<HostRecord>::load(&path).unwrap_err();
        assert!(e.to_string().contains("record.json"), "{e}");
        assert!(matches!(e, RecordError::Parse { .. }));
    }

    #[test]
    fn undo_removes_what_was_made_and_spares_a_sibling() {
        let tmp = tempfile::tempdir().unwrap();
        let run_dir = tmp.path().join("run/default-t1");
        let sibling = tmp.path().join("run/default-t10");
        fs::create_dir_all(&run_dir).unwrap();
        fs::create_dir_all(&sibling).unwrap();
        fs::write(run_dir.join("vsock.sock"), b"").unwrap();
        let scratch = tmp.path().join("disk.erofs");
        fs::write(&scratch, b"disk").unwrap();
        let mount_point = tmp.path().join("lowers");
        fs::create_dir(&mount_point).unwrap();
        let mut ours = process_naming(&run_dir.join("x"));
        let mut theirs = process_naming(&sibling.join("x"));
        let mut recorded = Command::new("sleep").arg("1000").spawn().unwrap();
        let record = HostRecord {
            vm_processes: vec![ProcessRef::of(recorded.id()).unwrap()],
            mounts: vec![mount_point.clone()],
            scratch_files: vec![scratch.clone()],
            ..HostRecord::new("default-t1", &run_dir)
        };

        let report = undo(&record);
        assert!(report.errors.is_empty(), "{report:?}");
        assert!(recorded.wait().is_ok());
        assert!(report.killed.contains(&recorded.id()), "{report:?}");
        assert!(ours.wait().is_ok());
        assert!(report.killed.contains(&ours.id()), "{report:?}");
        assert!(!report.killed.contains(&theirs.id()), "{report:?}");
        assert!(
            theirs.try_wait().unwrap().is_none(),
            "a sibling sandbox was hit"
        );
        assert!(!run_dir.exists() && !scratch.exists() && !mount_point.exists());
        assert!(sibling.exists());
        assert_eq!(report.removed, [run_dir.clone(), scratch.clone()]);

        let again = undo(&record);
        assert_eq!(again, UndoReport::default(), "twice is harmless");
        theirs.kill().unwrap();
        theirs.wait().unwrap();
    }
}
