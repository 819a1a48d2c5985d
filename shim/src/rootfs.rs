//! The container's rootfs from containerd's snapshot mounts: the overlay's
//! immutable lower dirs (committed layer snapshots) become one cached,
//! read-only erofs disk keyed by their identity and shared by every later
//! container of the image; a plain bind rootfs (other snapshotters) becomes
//! a disk of its own. The writable upper lives in the guest.
//!
//! Two or more lower dirs are merged by the kernel itself: a read-only
//! overlay of them is mounted for the time `mkfs.erofs` reads it, so the
//! snapshots' overlay whiteouts (0:0 character devices) and opaque
//! directories (`trusted.overlay.opaque`) mean exactly what they mean to
//! overlayfs.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use capsid_sandbox::image::{ImageError, PreparedRootfs, RootfsCache};
use containerd_shim_protos::api::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use sha2::{Digest, Sha256};

/// Bumped when the way disks are made from snapshots changes.
const KEY_VERSION: &str = "capsid-snapshot-v1";

/// Errors turning mounts into a disk.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The mounts are not something capsid can use.
    #[error("unsupported rootfs: {0}")]
    Unsupported(String),
    /// A lower or bind directory cannot be examined.
    #[error("cannot read rootfs directory {}", path.display())]
    Stat {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Mounting the merged view of the lower dirs failed.
    #[error("cannot mount the image layers at {}", path.display())]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// The mount point cannot be made.
    #[error("cannot make mount point {}", path.display())]
    MountPoint {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Building or finding the disk failed.
    #[error("cannot build the rootfs disk")]
    Disk(#[from] ImageError),
}

/// Result of rootfs operations.
pub type Result<T> = std::result::Result<T, RootfsError>;

/// Where the container's files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootfsSource {
    /// An overlay snapshot: read-only lower dirs, top first (as in
    /// `lowerdir=`), and a writable upper.
    Overlay {
        /// Layer snapshot directories, top first.
        lowers: Vec<PathBuf>,
    },
    /// One directory holding the whole rootfs.
    Dir(PathBuf),
}

impl RootfsSource {
    /// Reads containerd's rootfs mounts; with none the rootfs is what the
    /// caller mounted at `default_dir` (the spec's `root.path`: Docker's
    /// overlay2, `ctr run --rootfs`), see [`crate::premounted`].
    pub fn from_mounts(mounts: &[Mount], default_dir: &Path) -> Result<Self> {
        match mounts {
            [] => crate::premounted::source(default_dir),
            [m] if m.type_ == "overlay" => {
                let lowers: Vec<PathBuf> = m
                    .options
                    .iter()
                    .filter_map(|o| o.strip_prefix("lowerdir="))
                    .flat_map(|l| l.split(':'))
                    .filter(|l| !l.is_empty())
                    .map(PathBuf::from)
                    .collect();
                if lowers.is_empty() {
                    return Err(RootfsError::Unsupported(
                        "overlay mount without lowerdir=".into(),
                    ));
                }
                if let Some(rel) = lowers.iter().find(|l| l.is_relative()) {
                    return Err(RootfsError::Unsupported(format!(
                        "relative lowerdir {}",
                        rel.display()
                    )));
                }
                Ok(Self::Overlay { lowers })
            }
            [m] if m.type_ == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind") => {
                Ok(Self::Dir(PathBuf::from(&m.source)))
            }
            [m] => Err(RootfsError::Unsupported(format!(
                "{} mount of {} (capsid takes overlay snapshots and bind directories)",
                m.type_, m.source
            ))),
            more => Err(RootfsError::Unsupported(format!(
                "{} rootfs mounts (capsid takes one)",
                more.len()
            ))),
        }
    }
}

/// The cache key of a list of immutable directories: their paths and
/// inode identities (a re-created containerd root re-uses snapshot numbers,
/// never inodes and change times).
pub fn snapshot_key(dirs: &[PathBuf]) -> Result<String> {
    let mut text = String::from(KEY_VERSION);
    for dir in dirs {
        let meta = std::fs::metadata(dir).map_err(|source| RootfsError::Stat {
            path: dir.clone(),
            source,
        })?;
        text.push_str(&format!(
            "\n{}\0{}:{}:{}.{}",
            dir.display(),
            meta.dev(),
            meta.ino(),
            meta.ctime(),
            meta.ctime_nsec()
        ));
    }
    Ok(format!("{:x}", Sha256::digest(text.as_bytes())))
}

/// A per-container key for a directory that may change (bind rootfs).
fn unique_key(dir: &Path, sandbox: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let text = format!("capsid-bind-v1\n{}\n{sandbox}\n{now}", dir.display());
    format!("{:x}", Sha256::digest(text.as_bytes()))
}

/// A disk ready to attach, and whether only this container uses it.
#[derive(Debug)]
pub struct RootfsDisk {
    /// The cached disk (held: eviction skips it while this lives).
    pub prepared: PreparedRootfs,
    /// The disk was made for this container alone: remove it afterwards.
    pub scratch: bool,
    /// How long finding or building it took.
    pub elapsed: std::time::Duration,
}

/// Makes (or finds) the disk for `source`; `mount_point` is where the
/// merged lower dirs are mounted while a disk is built (it is unmounted
/// and removed before this returns, on every path).
pub fn prepare(
    cache: &RootfsCache,
    source: &RootfsSource,
    sandbox: &str,
    mount_point: &Path,
) -> Result<RootfsDisk> {
    let started = Instant::now();
    let (prepared, scratch) = match source {
        RootfsSource::Overlay { lowers } if lowers.len() == 1 => {
            let key = snapshot_key(lowers)?;
            (cache.prepare_dir(&key, sandbox, &lowers[0])?, false)
        }
        RootfsSource::Overlay { lowers } => {
            let key = snapshot_key(lowers)?;
            let merged = MergedLowers::mount(lowers, mount_point)?;
            let prepared = cache.prepare_dir(&key, sandbox, merged.path());
            drop(merged);
            (prepared?, false)
        }
        RootfsSource::Dir(dir) => {
            std::fs::metadata(dir).map_err(|source| RootfsError::Stat {
                path: dir.clone(),
                source,
            })?;
            let key = unique_key(dir, sandbox);
            (cache.prepare_dir(&key, sandbox, dir)?, true)
        }
    };
    let elapsed = started.elapsed();
    tracing::info!(
        sandbox,
        cache_hit = prepared.cache_hit,
        disk = %prepared.path.display(),
        elapsed_ms = elapsed.as_millis(),
        "{}",
        if prepared.cache_hit { "rootfs cache hit" } else { "rootfs disk built" }
    );
    Ok(RootfsDisk {
        prepared,
        scratch,
        elapsed,
    })
}

/// A read-only overlay of lower dirs, unmounted on drop.
#[derive(Debug)]
struct MergedLowers {
    path: PathBuf,
}

impl MergedLowers {
    fn mount(lowers: &[PathBuf], at: &Path) -> Result<Self> {
        let mount_err = |source| RootfsError::Mount {
            path: at.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(at).map_err(|source| RootfsError::MountPoint {
            path: at.to_path_buf(),
            source,
        })?;
        let lowerdir = lowers
            .iter()
            .map(|l| l.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        mount(
            Some("overlay"),
            at,
            Some("overlay"),
            MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
            Some(format!("lowerdir={lowerdir}").as_str()),
        )
        .map_err(|e| {
            let _ = std::fs::remove_dir(at);
            mount_err(e)
        })?;
        Ok(Self {
            path: at.to_path_buf(),
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for MergedLowers {
    fn drop(&mut self) {
        unmount(&self.path);
    }
}

/// Unmounts (lazily) and removes a mount point; absent is fine.
pub fn unmount(path: &Path) {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot unmount"),
    }
    if let Err(e) = std::fs::remove_dir(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove mount point");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(options: &[&str]) -> Mount {
        Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: options.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn overlay_lowers_keep_their_order() {
        let m = overlay(&[
            "index=off",
            "workdir=/s/3/work",
            "upperdir=/s/3/fs",
            "lowerdir=/s/2/fs:/s/1/fs",
        ]);
        assert_eq!(
            RootfsSource::from_mounts(&[m], Path::new("/b/rootfs")).unwrap(),
            RootfsSource::Overlay {
                lowers: vec!["/s/2/fs".into(), "/s/1/fs".into()]
            }
        );
    }

    #[test]
    fn bind_and_empty_mounts_are_directories() {
        let bind = Mount {
            type_: "bind".into(),
            source: "/snap/7/fs".into(),
            options: vec!["rbind".into(), "rw".into()],
            ..Default::default()
        };
        assert_eq!(
            RootfsSource::from_mounts(&[bind], Path::new("/b/rootfs")).unwrap(),
            RootfsSource::Dir("/snap/7/fs".into())
        );
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            RootfsSource::from_mounts(&[], tmp.path()).unwrap(),
            RootfsSource::Dir(std::fs::canonicalize(tmp.path()).unwrap())
        );
    }

    #[test]
    fn other_mounts_are_refused_by_name() {
        let m = Mount {
            type_: "ext4".into(),
            source: "/dev/sdb".into(),
            ..Default::default()
        };
        let e = RootfsSource::from_mounts(std::slice::from_ref(&m), Path::new("/r")).unwrap_err();
        assert!(e.to_string().contains("ext4 mount of /dev/sdb"), "{e}");
        let e = RootfsSource::from_mounts(&[m.clone(), m], Path::new("/r")).unwrap_err();
        assert!(e.to_string().contains("2 rootfs mounts"), "{e}");
        let e =
            RootfsSource::from_mounts(&[overlay(&["upperdir=/u"])], Path::new("/r")).unwrap_err();
        assert!(e.to_string().contains("lowerdir"), "{e}");
    }

    #[test]
    fn keys_follow_identity_not_just_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        let ab = snapshot_key(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(ab, snapshot_key(&[a.clone(), b.clone()]).unwrap());
        assert_ne!(ab, snapshot_key(&[b.clone(), a.clone()]).unwrap());
        assert_eq!(ab.len(), 64);
        // The same path re-created is another snapshot.
        std::fs::remove_dir(&b).unwrap();
        std::fs::create_dir(&b).unwrap();
        assert_ne!(ab, snapshot_key(&[a, b.clone()]).unwrap());
        std::fs::remove_dir(&b).unwrap();
        assert!(matches!(snapshot_key(&[b]), Err(RootfsError::Stat { .. })));
    }

    #[test]
    fn bind_keys_are_unique() {
        let k1 = unique_key(Path::new("/d"), "s");
        let k2 = unique_key(Path::new("/d"), "s");
        assert_ne!(k1, k2);
    }
}
