//! A pod's containers in its VM's share: each container added to a
//! running pod VM gets an entry `<share>/<name>` holding its root
//! filesystem (`rootfs`, mounted by the caller) and its volumes (`v0`,
//! `v1`, ...), seen by the guest under the share's mount point.
//!
//! The share's root is read-only, and mount flags do not travel with
//! propagation after the fact, so an entry is built aside first: a
//! private staging mount (`<shares>/.staging/<share>/<name>`) gets the
//! rootfs and the volume binds, turns read-only (the guest may write in
//! the rootfs and in read-write volumes, never next to them), and is then
//! bound recursively through the share's writable peer
//! ([`crate::volumes::live_peer`]): the copy, flags and all, propagates
//! to the share and to virtiofsd's view of it. Taking an entry down is a
//! lazy unmount of it and of its staging, then `rmdir` of placeholders,
//! never a recursive removal.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

use crate::volumes::{self, Result, Volume, VolumeError};

/// The directory of an entry where the caller mounts the root filesystem.
pub const ROOTFS: &str = "rootfs";

/// Where the entries of share `share` are staged: a directory of its
/// own (`<shares>/.staging/<share>`; no sandbox name starts with a dot).
fn staging_root(share: &Path) -> PathBuf {
    share
        .parent()
        .unwrap_or(Path::new("/"))
        .join(".staging")
        .join(share.file_name().unwrap_or_default())
}

/// The staging directory of entry `name` of share `share`.
fn staging_dir(share: &Path, name: &str) -> PathBuf {
    staging_root(share).join(name)
}

/// Checks an entry name: one plain path component that is not a volume
/// entry name of the share's own.
fn check_name(name: &str) -> Result<()> {
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !name.starts_with('-');
    if plain {
        Ok(())
    } else {
        Err(VolumeError::Host {
            what: "use as a share entry name",
            path: PathBuf::from(name),
            source: std::io::Error::from_raw_os_error(nix::libc::EINVAL),
        })
    }
}

/// An entry being built; dropping it before [`PodEntry::publish`] undoes
/// what was made.
#[derive(Debug)]
pub struct PodEntry {
    share: PathBuf,
    name: String,
    staging: PathBuf,
    armed: bool,
}

impl PodEntry {
    /// Starts entry `name` of live share `share` (made by
    /// [`volumes::Share::prepare_live`]).
    pub fn begin(share: &Path, name: &str) -> Result<Self> {
        check_name(name)?;
        let peer = volumes::live_peer(share);
        if !peer.is_dir() {
            return Err(volumes::host("add an entry to (not a live share)", share)(
                std::io::Error::from_raw_os_error(nix::libc::ENOENT),
            ));
        }
        let staging = staging_dir(share, name);
        // A leftover of a shim that died part-way goes first.
        undo_entry(share, name)?;
        let root = staging_root(share);
        for d in [root.parent(), Some(root.as_path())].into_iter().flatten() {
            match std::fs::DirBuilder::new().mode(0o700).create(d) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(volumes::host("create", d)(e))
                }
                _ => {}
            }
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(volumes::host("create", &staging))?;
        let entry = Self {
            share: share.to_path_buf(),
            name: name.to_string(),
            staging,
            armed: true,
        };
        volumes::bind(&entry.staging, &entry.staging, MsFlags::empty())
            .map_err(volumes::host("bind-mount the entry", &entry.staging))?;
        // Private: nothing mounted while staging is seen anywhere else.
        mount(
            None::<&str>,
            &entry.staging,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(|e| volumes::host("make private", &entry.staging)(e.into()))?;
        let rootfs = entry.rootfs_dir();
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&rootfs)
            .map_err(volumes::host("create", &rootfs))?;
        Ok(entry)
    }

    /// Where the caller mounts the container's root filesystem.
    pub fn rootfs_dir(&self) -> PathBuf {
        self.staging.join(ROOTFS)
    }

    /// Binds the container's volumes at `v0`, `v1`, ... of the entry,
    /// checked as a share's volumes are (never inside `protected`).
    pub fn add_volumes(&self, list: &[Volume], protected: &[&Path]) -> Result<()> {
        let protected = volumes::canonical(protected);
        for (index, volume) in list.iter().enumerate() {
            volume.check_destination()?;
            let at = self.staging.join(volumes::entry_name(index));
            volumes::add_volume(&at, volume, &protected)?;
        }
        Ok(())
    }

    /// Turns the entry read-only and puts it in the share; returns its
    /// path relative to the share's root (what the guest finds under the
    /// share's mount point).
    pub fn publish(mut self) -> Result<PathBuf> {
        // Only the entry's own mount: the rootfs and read-write volumes
        // under it keep their flags.
        volumes::bind(
            &self.staging,
            &self.staging,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
        )
        .map_err(volumes::host("make read-only the entry", &self.staging))?;
        let target = volumes::live_peer(&self.share).join(&self.name);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&target)
            .map_err(volumes::host("create", &target))?;
        volumes::bind(&self.staging, &target, MsFlags::MS_REC)
            .map_err(volumes::host("put the entry in the share at", &target))?;
        // The share holds the entry now; the staging mount is not needed
        // (its placeholders go when the entry is taken down).
        let _ = nix::mount::umount2(&self.staging, nix::mount::MntFlags::MNT_DETACH);
        self.armed = false;
        Ok(PathBuf::from(&self.name))
    }
}

impl Drop for PodEntry {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = undo_entry(&self.share, &self.name) {
                tracing::warn!(entry = %self.staging.display(), error = %crate::record::chain(&e), "cannot take a share entry down");
            }
        }
    }
}

/// Takes entry `name` of share `share` down (its mounts in the share and
/// in staging, then the placeholders). What is gone already is no error.
pub fn undo_entry(share: &Path, name: &str) -> Result<()> {
    check_name(name)?;
    let published = volumes::live_peer(share).join(name);
    if published.exists() {
        volumes::undo(&published)?;
    }
    let staging = staging_dir(share, name);
    volumes::undo(&staging)
}

/// Takes down every entry staged for share `share` (part of taking the
/// share down: their placeholders are not in the share itself).
pub fn undo_staging(share: &Path) -> Result<()> {
    let root = staging_root(share);
    let Ok(list) = std::fs::read_dir(&root) else {
        return Ok(());
    };
    for entry in list.flatten() {
        volumes::undo(&entry.path())?;
    }
    match std::fs::remove_dir(&root) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(volumes::host("remove", &root)(e))
        }
        _ => {}
    }
    // The staging directory goes with the last share that used it.
    if let Some(parent) = root.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_are_plain() {
        for good in ["c1", "p-3", "a_b"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "..", "a/b", "-x", ".rw", "a b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn staging_is_beside_the_shares() {
        let share = Path::new("/s/.shares/default-p-1234");
        assert_eq!(
            staging_dir(share, "c2"),
            Path::new("/s/.shares/.staging/default-p-1234/c2")
        );
        assert_eq!(
            volumes::live_peer(share),
            Path::new("/s/.shares/.rw/default-p-1234")
        );
    }
}

#[cfg(test)]
mod live_tests {
    use std::process::Command;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::volumes::Share;

    fn wait_for(path: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !path.exists() {
            assert!(Instant::now() < deadline, "{} never came", path.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A process holding a slave copy of the share, as virtiofsd does,
    /// sees entries added after it took its copy, with their flags.
    #[test]
    fn entries_reach_a_copy_taken_before_them() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root for mounts");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let share_dir = state.join(".shares").join("default-p1-0000");
        let share = Share::prepare_live(&share_dir, &[], &[&state]).unwrap();
        let image = tmp.path().join("image");
        std::fs::create_dir(&image).unwrap();
        std::fs::write(image.join("hello"), "from the image").unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let (view, ready, go, out) = (
            tmp.path().join("view"),
            tmp.path().join("ready"),
            tmp.path().join("go"),
            tmp.path().join("out"),
        );
        std::fs::create_dir(&view).unwrap();
        let script = format!(
            "mount --make-rslave / && mount --rbind {share} {view} && touch {ready} && \
             while [ ! -e {go} ]; do sleep 0.02; done; \
             {{ cat {view}/c1/rootfs/hello; echo; \
                touch {view}/c1/stray 2>/dev/null && echo entry-writable || echo entry-read-only; \
                echo written > {view}/c1/rootfs/new && echo rootfs-writable; \
                echo vol > {view}/c1/v0/f && echo volume-writable; }} > {out}",
            share = share_dir.display(),
            view = view.display(),
            ready = ready.display(),
            go = go.display(),
            out = out.display(),
        );
        let mut child = Command::new("unshare")
            .args(["--mount", "--propagation", "unchanged", "sh", "-c", &script])
            .spawn()
            .unwrap();
        wait_for(&ready);
        let entry = PodEntry::begin(&share_dir, "c1").unwrap();
        volumes::bind(&image, &entry.rootfs_dir(), MsFlags::empty()).unwrap();
        let vol = Volume {
            source: data.clone(),
            destination: PathBuf::from("/data"),
            readonly: false,
            recursive: true,
        };
        entry.add_volumes(&[vol], &[&state]).unwrap();
        assert_eq!(entry.publish().unwrap(), PathBuf::from("c1"));
        std::fs::write(&go, "").unwrap();
        assert!(child.wait().unwrap().success());
        let said = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            said,
            "from the image\nentry-read-only\nrootfs-writable\nvolume-writable\n"
        );
        assert_eq!(
            std::fs::read_to_string(image.join("new")).unwrap(),
            "written\n"
        );
        assert_eq!(std::fs::read_to_string(data.join("f")).unwrap(), "vol\n");
        // Taken down: contents kept, nothing mounted, no placeholder left.
        undo_entry(&share_dir, "c1").unwrap();
        assert!(!share_dir.join("c1").exists());
        assert!(!staging_dir(&share_dir, "c1").exists());
        assert!(image.join("hello").exists() && data.join("f").exists());
        let kept = share.keep();
        volumes::undo(&kept).unwrap();
        assert!(!kept.exists());
        assert!(!volumes::live_peer(&kept).exists());
        assert!(!staging_root(&kept).exists());
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(&tmp.path().display().to_string()),
            "{mounts}"
        );
    }

    #[test]
    fn an_entry_needs_a_live_share_and_an_unpublished_one_is_undone() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root for mounts");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let plain = tmp.path().join(".shares").join("s");
        let share = Share::prepare(&plain, &[], &[]).unwrap();
        let e = PodEntry::begin(&plain, "c1").unwrap_err();
        assert!(e.to_string().contains("not a live share"), "{e}");
        drop(share);
        let live = tmp.path().join(".shares").join("l");
        let share = Share::prepare_live(&live, &[], &[]).unwrap();
        let entry = PodEntry::begin(&live, "c1").unwrap();
        let staged = staging_dir(&live, "c1");
        assert!(staged.join(ROOTFS).is_dir());
        drop(entry);
        assert!(!staged.exists());
        drop(share);
        assert!(!live.exists() && !volumes::live_peer(&live).exists());
    }
}
