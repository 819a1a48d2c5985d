//! The `delete` action: containerd runs it in the bundle when a shim died
//! or a Create failed. It undoes what the bundle's sandbox record says was
//! made (the same [`record::undo`] a failed Create and `capsid gc` use):
//! the VM's processes (recognised by start time, and any process whose
//! command line names the sandbox's run directory), the layer mount, the
//! tap in the container's network namespace, the run directory with its
//! sockets, per-container disks; then the shim's own socket. Running it
//! twice is harmless.

use std::path::{Path, PathBuf};

use capsid_sandbox::record::{self, HostRecord, RecordFile};

/// The sandbox record's name in the bundle.
pub const STATE_FILE: &str = "capsid-state.json";
/// The file in the bundle holding the shim's socket address.
pub const ADDRESS_FILE: &str = "address";

/// The sandbox record of `bundle`.
pub fn state_path(bundle: &Path) -> PathBuf {
    bundle.join(STATE_FILE)
}

/// What a cleanup did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// Host processes killed.
    pub killed: Vec<u32>,
    /// Files and directories removed.
    pub removed: Vec<PathBuf>,
}

/// Cleans up after the shim of `bundle`.
pub fn clean_up(bundle: &Path) -> CleanupReport {
    let mut report = CleanupReport::default();
    let state = state_path(bundle);
    let mut complete = true;
    match RecordFile::<HostRecord>::load(&state) {
        Ok(Some(host)) => {
            let pid = host.vm_processes.first().map_or(0, |p| p.pid);
            let undone = record::undo(&host);
            // The shim that made the sandbox died: its poststop hooks are
            // run here, once the VM is gone, as runc's delete does.
            if let Some(id) = bundle.file_name().and_then(|n| n.to_str()) {
                crate::hooks::poststop_from_bundle(bundle, id, pid);
            }
            complete = undone.errors.is_empty();
            report.killed = undone.killed;
            report.removed = undone.removed;
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %crate::describe(&e), "unreadable sandbox record; cleaning what can be found");
        }
    }
    if let Some(socket) = shim_socket(bundle) {
        if std::os::unix::net::UnixStream::connect(&socket).is_err() && remove(&socket) {
            report.removed.push(socket);
        }
    }
    // A record whose undo failed stays for the next delete to retry.
    if complete {
        if let Err(e) = RecordFile::<HostRecord>::remove(&state) {
            tracing::warn!(error = %crate::describe(&e), "cannot remove the sandbox record");
        }
    }
    tracing::info!(killed = ?report.killed, removed = ?report.removed, "cleaned up");
    report
}

/// The shim's socket path, from the bundle's `address` file.
fn shim_socket(bundle: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(bundle.join(ADDRESS_FILE)).ok()?;
    let path = text.trim().strip_prefix("unix://").unwrap_or(text.trim());
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// Removes a file or directory tree; whether something was there.
fn remove(path: &Path) -> bool {
    if path.as_os_str().is_empty() {
        return false;
    }
    let result = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => return false,
    };
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsid_sandbox::process::ProcessRef;
    use std::process::Command;
    use std::time::Duration;

    #[test]
    fn a_dead_shims_leftovers_go_and_twice_is_fine() {
        let tmp = tempfile::tempdir().unwrap();
        let bundle = tmp.path().join("bundle");
        let run_dir = tmp.path().join("run/default-t1");
        let sibling = tmp.path().join("run/default-t10");
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::create_dir_all(&run_dir).unwrap();
        std::fs::create_dir_all(&sibling).unwrap();
        std::fs::write(run_dir.join("vsock.sock"), b"").unwrap();
        let scratch = tmp.path().join("disk.erofs");
        std::fs::write(&scratch, b"disk").unwrap();
        // A "VM process" found by its command line (cat waits on its
        // stdin before it looks at its file argument), and one of a
        // sandbox whose name merely starts the same way.
        let cat = |arg: PathBuf| {
            let child = Command::new("cat")
                .arg("-")
                .arg(&arg)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            // Until it has exec'd, its command line is still ours.
            let named = arg.display().to_string();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !std::fs::read(format!("/proc/{}/cmdline", child.id()))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&named))
            {
                assert!(std::time::Instant::now() < deadline, "cat never ran");
                std::thread::sleep(Duration::from_millis(2));
            }
            child
        };
        let mut ours = cat(run_dir.join("x"));
        let mut theirs = cat(sibling.join("x"));
        let recorded = Command::new("sleep").arg("1000").spawn().unwrap();
        let state = HostRecord {
            vm_processes: vec![ProcessRef::of(recorded.id()).unwrap()],
            mounts: vec![bundle.join("capsid-lowers")],
            scratch_files: vec![scratch.clone()],
            ..HostRecord::new("default-t1", &run_dir)
        };
        RecordFile::create(state_path(&bundle), state).unwrap();
        std::thread::sleep(Duration::from_millis(50));

        let report = clean_up(&bundle);
        let mut recorded = recorded;
        assert!(recorded.wait().is_ok());
        assert!(report.killed.contains(&recorded.id()), "{report:?}");
        assert!(ours.wait().is_ok());
        assert!(report.killed.contains(&ours.id()), "{report:?}");
        assert!(!report.killed.contains(&theirs.id()), "{report:?}");
        assert!(
            theirs.try_wait().unwrap().is_none(),
            "a sibling sandbox was hit"
        );
        assert!(!run_dir.exists() && !scratch.exists());
        assert!(sibling.exists());
        assert!(!state_path(&bundle).exists());

        assert_eq!(clean_up(&bundle), CleanupReport::default());
        theirs.kill().unwrap();
        theirs.wait().unwrap();
    }

    #[test]
    fn the_address_file_names_the_socket() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(shim_socket(tmp.path()), None);
        std::fs::write(
            tmp.path().join(ADDRESS_FILE),
            "unix:///run/containerd/s/ab\n",
        )
        .unwrap();
        assert_eq!(
            shim_socket(tmp.path()),
            Some(PathBuf::from("/run/containerd/s/ab"))
        );
    }
}
