//! The container's root filesystem inside the guest: read-only image
//! layers from virtio-blk disks (found by serial), a writable upper layer,
//! joined by overlayfs; plus the files a container expects to find
//! (/etc/hostname, /etc/hosts, /etc/resolv.conf).

use std::fs;
use std::path::{Path, PathBuf};

use capsid_protocol::agent::Rootfs;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Where per-container bundles live in the guest.
pub const BUNDLES: &str = "/run/capsid/bundles";

/// Errors assembling a rootfs.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The host named a disk the guest does not have.
    #[error("no disk with serial {0:?} is attached")]
    NoSuchDisk(String),
    /// The rootfs description is unusable.
    #[error("invalid rootfs: {0}")]
    Invalid(String),
    /// A directory or file could not be made.
    #[error("cannot write {path}")]
    Write {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// mount(2) failed.
    #[error("cannot mount {what} on {target}")]
    Mount {
        /// What was mounted.
        what: String,
        /// Where.
        target: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
}

/// Result of rootfs operations.
pub type Result<T> = std::result::Result<T, RootfsError>;

/// The directories of one container's bundle.
#[derive(Debug, Clone)]
pub struct BundleDirs {
    /// The bundle (config.json goes here).
    pub bundle: PathBuf,
    /// The assembled root filesystem.
    pub rootfs: PathBuf,
}

impl BundleDirs {
    /// The bundle of container `id`.
    pub fn new(id: &str) -> Self {
        let bundle = Path::new(BUNDLES).join(id);
        Self {
            rootfs: bundle.join("rootfs"),
            bundle,
        }
    }

    fn layer(&self, i: usize) -> PathBuf {
        self.bundle.join(format!("layer{i}"))
    }

    fn rw(&self) -> PathBuf {
        self.bundle.join("rw")
    }
}

/// Container ids become directory names: keep them to a safe alphabet.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.')
}

/// The block device whose virtio serial is `serial`, found in /sys/block.
pub fn find_disk(sys_block: &Path, serial: &str) -> Option<PathBuf> {
    let entries = fs::read_dir(sys_block).ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let found = fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
        if found.trim_end_matches(['\n', '\0']) == serial {
            return Some(Path::new("/dev").join(name));
        }
    }
    None
}

fn mkdir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|source| RootfsError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn do_mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    mount(Some(source), target, Some(fstype), flags, data).map_err(|e| RootfsError::Mount {
        what: format!("{fstype} {source}"),
        target: target.to_path_buf(),
        source: e,
    })
}

/// Mounts the layers and the overlay for container `id`.
pub fn assemble(id: &str, spec: &Rootfs) -> Result<BundleDirs> {
    if !valid_id(id) {
        return Err(RootfsError::Invalid(format!("container id {id:?}")));
    }
    if spec.layers.is_empty() {
        return Err(RootfsError::Invalid("no image layers".into()));
    }
    let dirs = BundleDirs::new(id);
    mkdir(&dirs.rootfs)?;
    let mut lowers = Vec::with_capacity(spec.layers.len());
    for (i, layer) in spec.layers.iter().enumerate() {
        if !matches!(layer.fs_type.as_str(), "erofs" | "ext4") {
            teardown(id);
            return Err(RootfsError::Invalid(format!(
                "layer filesystem {:?}",
                layer.fs_type
            )));
        }
        let disk = find_disk(Path::new("/sys/block"), &layer.disk_serial)
            .ok_or_else(|| RootfsError::NoSuchDisk(layer.disk_serial.clone()));
        let target = dirs.layer(i);
        let mounted = disk.and_then(|disk| {
            mkdir(&target)?;
            do_mount(
                &disk.display().to_string(),
                &target,
                &layer.fs_type,
                MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
                None,
            )
        });
        if let Err(e) = mounted {
            teardown(id);
            return Err(e);
        }
        lowers.push(target);
    }
    let result = (|| {
        let rw = dirs.rw();
        mkdir(&rw)?;
        if spec.upper_disk_serial.is_empty() {
            do_mount("tmpfs", &rw, "tmpfs", MsFlags::MS_NODEV, Some("mode=0755"))?;
        } else {
            let disk = find_disk(Path::new("/sys/block"), &spec.upper_disk_serial)
                .ok_or_else(|| RootfsError::NoSuchDisk(spec.upper_disk_serial.clone()))?;
            do_mount(
                &disk.display().to_string(),
                &rw,
                "ext4",
                MsFlags::MS_NODEV,
                None,
            )?;
        }
        let (upper, work) = (rw.join("upper"), rw.join("work"));
        mkdir(&upper)?;
        mkdir(&work)?;
        // overlayfs lists lower layers top first.
        let lowerdir = lowers
            .iter()
            .rev()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let data = format!(
            "lowerdir={lowerdir},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        do_mount(
            "overlay",
            &dirs.rootfs,
            "overlay",
            MsFlags::empty(),
            Some(&data),
        )
    })();
    match result {
        Ok(()) => Ok(dirs),
        Err(e) => {
            teardown(id);
            Err(e)
        }
    }
}

/// Unmounts and removes everything [`assemble`] made (best effort, and
/// safe to call more than once).
pub fn teardown(id: &str) {
    if !valid_id(id) {
        return;
    }
    let dirs = BundleDirs::new(id);
    let _ = umount2(&dirs.rootfs, MntFlags::MNT_DETACH);
    let _ = umount2(&dirs.rw(), MntFlags::MNT_DETACH);
    for i in 0.. {
        let layer = dirs.layer(i);
        if !layer.exists() {
            break;
        }
        let _ = umount2(&layer, MntFlags::MNT_DETACH);
    }
    let _ = fs::remove_dir_all(&dirs.bundle);
}

/// Writes /etc/hostname, /etc/hosts and (when servers are given)
/// /etc/resolv.conf into the assembled rootfs, as runtimes do.
pub fn write_etc(
    rootfs: &Path,
    hostname: &str,
    dns_servers: &[String],
    dns_search: &[String],
) -> Result<()> {
    let etc = rootfs.join("etc");
    mkdir(&etc)?;
    let write = |name: &str, text: String| {
        let path = etc.join(name);
        // A symlink here (resolv.conf often is one) must not redirect the
        // write outside the rootfs: replace it.
        if path
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            let _ = fs::remove_file(&path);
        }
        fs::write(&path, text).map_err(|source| RootfsError::Write { path, source })
    };
    if !hostname.is_empty() {
        write("hostname", format!("{hostname}\n"))?;
    }
    write(
        "hosts",
        format!(
            "127.0.0.1\tlocalhost{0}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            if hostname.is_empty() {
                String::new()
            } else {
                format!(" {hostname}")
            }
        ),
    )?;
    if !dns_servers.is_empty() {
        let mut text: String = dns_servers
            .iter()
            .map(|s| format!("nameserver {s}\n"))
            .collect();
        if !dns_search.is_empty() {
            text.push_str(&format!("search {}\n", dns_search.join(" ")));
        }
        write("resolv.conf", text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(valid_id("abc-1_2.3"));
        for bad in ["", "../x", "a/b", ".hidden", &"x".repeat(200)] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn disks_are_found_by_serial() {
        let dir = tempfile::tempdir().unwrap();
        for (name, serial) in [("vda", "capsid-root\0\0"), ("vdb", "scratch")] {
            fs::create_dir(dir.path().join(name)).unwrap();
            fs::write(dir.path().join(name).join("serial"), serial).unwrap();
        }
        assert_eq!(
            find_disk(dir.path(), "capsid-root"),
            Some(PathBuf::from("/dev/vda"))
        );
        assert_eq!(
            find_disk(dir.path(), "scratch"),
            Some(PathBuf::from("/dev/vdb"))
        );
        assert_eq!(find_disk(dir.path(), "nope"), None);
    }

    #[test]
    fn etc_files_are_written_and_symlinks_replaced() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("etc")).unwrap();
        let outside = dir.path().join("outside");
        std::os::unix::fs::symlink(&outside, dir.path().join("etc/resolv.conf")).unwrap();
        write_etc(
            dir.path(),
            "box",
            &["10.0.0.1".into()],
            &["example.org".into()],
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("etc/hostname")).unwrap(),
            "box\n"
        );
        assert!(fs::read_to_string(dir.path().join("etc/hosts"))
            .unwrap()
            .contains("localhost box"));
        assert_eq!(
            fs::read_to_string(dir.path().join("etc/resolv.conf")).unwrap(),
            "nameserver 10.0.0.1\nsearch example.org\n"
        );
        assert!(!outside.exists(), "write followed the symlink");
    }
}
