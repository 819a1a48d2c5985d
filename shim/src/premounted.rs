//! A rootfs the caller mounted itself: Docker Engine (overlay2 graphdriver)
//! calls Create with no rootfs mounts and `root.path` naming the merged
//! directory of an overlay it mounted. Reading the merged view would give
//! every container a disk of its own; instead the overlay's lower
//! directories are found in the mount table, and they are the image's
//! immutable layers, so the disk is cached by their identity exactly as for
//! containerd's snapshots.
//!
//! Docker puts one lower of its own on top of the image's: the container's
//! `<id>-init` layer, holding empty placeholders for /etc/hosts,
//! /etc/hostname, /etc/resolv.conf and a few mount points. The guest agent
//! writes those files itself, so that layer is left out; otherwise every
//! container would be a cache miss.

use std::path::{Path, PathBuf};

use crate::rootfs::{RootfsError, RootfsSource};

/// Directories whose contents are the host's own: a root path in (or of)
/// them is refused, since the disk built from it would copy host state
/// into a tenant's VM.
const REFUSED_ROOTS: &[&str] = &["/", "/proc", "/sys", "/dev", "/boot", "/etc"];

/// The suffix of Docker's per-container init layer's directory.
const DOCKER_INIT_LAYER: &str = "-init/diff";

/// Where the rootfs at `root` comes from: the image layers under its
/// overlay when it is the mount point of one, the directory itself
/// otherwise.
pub fn source(root: &Path) -> Result<RootfsSource, RootfsError> {
    let canonical = std::fs::canonicalize(root).map_err(|source| RootfsError::Stat {
        path: root.to_path_buf(),
        source,
    })?;
    check_allowed(&canonical)?;
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| RootfsError::Stat {
            path: PathBuf::from("/proc/self/mountinfo"),
            source,
        })?;
    match overlay_lowers(&mountinfo, &canonical) {
        Some(lowers) => {
            let lowers = resolve(&canonical, lowers)?;
            if lowers.is_empty() {
                return Ok(RootfsSource::Dir(canonical));
            }
            Ok(RootfsSource::Overlay { lowers })
        }
        None => Ok(RootfsSource::Dir(canonical)),
    }
}

/// Refuses the host's root and its system directories.
fn check_allowed(root: &Path) -> Result<(), RootfsError> {
    let top: PathBuf = root.components().take(2).collect();
    let refused = REFUSED_ROOTS.iter().any(|r| {
        let r = Path::new(r);
        root == r || (r != Path::new("/") && top == r)
    });
    if refused {
        return Err(RootfsError::Unsupported(format!(
            "root path {} is part of the host's own file system",
            root.display()
        )));
    }
    Ok(())
}

/// The `lowerdir=` entries (top first) of the overlay mounted at `point`,
/// the last such mount in the table; `None` if `point` is not an overlay.
fn overlay_lowers(mountinfo: &str, point: &Path) -> Option<Vec<String>> {
    mountinfo.lines().rev().find_map(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL…] - TYPE SOURCE SUPER_OPTIONS
        let (left, right) = line.split_once(" - ")?;
        let mount_point = unescape(left.split(' ').nth(4)?);
        let mut right = right.split(' ');
        let fs_type = right.next()?;
        let _source = right.next()?;
        let super_options = right.next().unwrap_or("");
        (Path::new(&mount_point) == point && fs_type == "overlay").then(|| {
            split_options(super_options)
                .into_iter()
                .filter_map(|o| o.strip_prefix("lowerdir=").map(str::to_owned))
                .flat_map(|l| split_lowerdir(&l))
                .collect::<Vec<_>>()
        })
    })
}

/// Splits a mount's option string at commas not escaped by a backslash.
fn split_options(options: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let bytes = options.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b',' && (i == 0 || bytes[i - 1] != b'\\') {
            parts.push(&options[start..i]);
            start = i + 1;
        }
    }
    parts.push(&options[start..]);
    parts
}

/// Splits `lowerdir=` at colons not escaped by a backslash.
fn split_lowerdir(value: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            ':' => parts.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    parts.push(current);
    parts.into_iter().filter(|p| !p.is_empty()).collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space and so on).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'\\' && i + 4 <= bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 4]).ok())
            .flatten()
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        match escaped {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Makes the lowers absolute and canonical, and drops Docker's init layer.
/// A relative lower is relative to the directory the mount was made from:
/// overlay2 mounts `<home>/<id>/merged` from `<home>`.
fn resolve(root: &Path, lowers: Vec<String>) -> Result<Vec<PathBuf>, RootfsError> {
    let home = root.parent().and_then(Path::parent).unwrap_or(root);
    let mut resolved = Vec::with_capacity(lowers.len());
    for lower in lowers {
        let path = Path::new(&lower);
        let path = if path.is_absolute() {
            path.to_path_buf()
        } else {
            home.join(path)
        };
        let canonical = std::fs::canonicalize(&path).map_err(|source| RootfsError::Stat {
            path: path.clone(),
            source,
        })?;
        if canonical.to_string_lossy().ends_with(DOCKER_INIT_LAYER) {
            tracing::debug!(layer = %canonical.display(), "Docker's init layer left to the guest");
            continue;
        }
        resolved.push(canonical);
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_own_directories_are_refused() {
        for p in ["/", "/proc", "/proc/1/root", "/sys/fs", "/etc", "/dev"] {
            let e = check_allowed(Path::new(p)).unwrap_err().to_string();
            assert!(e.contains(p), "{e}");
        }
        for p in ["/var/lib/docker/overlay2/x/merged", "/tmp/r", "/srv/rootfs"] {
            assert!(check_allowed(Path::new(p)).is_ok(), "{p}");
        }
        let e = source(Path::new("/")).unwrap_err().to_string();
        assert!(e.contains("host's own file system"), "{e}");
    }

    #[test]
    fn the_overlay_at_the_root_path_gives_its_lowers() {
        let table = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
90 22 0:50 / /d/overlay2/abc/merged rw,relatime - overlay overlay rw,lowerdir=/d/overlay2/l/INIT:/d/overlay2/l/A\\:B:l/C,upperdir=/d/overlay2/abc/diff,workdir=/d/overlay2/abc/work
91 22 0:51 / /other\\040dir rw - overlay overlay rw,lowerdir=/x
";
        assert_eq!(
            overlay_lowers(table, Path::new("/d/overlay2/abc/merged")).unwrap(),
            ["/d/overlay2/l/INIT", "/d/overlay2/l/A:B", "l/C"]
        );
        assert_eq!(
            overlay_lowers(table, Path::new("/other dir")).unwrap(),
            ["/x"]
        );
        assert_eq!(overlay_lowers(table, Path::new("/proc")), None);
        assert_eq!(overlay_lowers(table, Path::new("/nowhere")), None);
    }

    #[test]
    fn lowers_resolve_through_links_and_skip_the_init_layer() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("overlay2");
        for d in ["img/diff", "c1-init/diff", "c1/merged", "l"] {
            std::fs::create_dir_all(home.join(d)).unwrap();
        }
        std::os::unix::fs::symlink("../img/diff", home.join("l/IMG")).unwrap();
        std::os::unix::fs::symlink("../c1-init/diff", home.join("l/INIT")).unwrap();
        let root = home.join("c1/merged");
        let lowers = resolve(&root, vec!["l/INIT".into(), "l/IMG".into()]).unwrap();
        assert_eq!(
            lowers,
            [std::fs::canonicalize(home.join("img/diff")).unwrap()]
        );
        let e = resolve(&root, vec!["l/GONE".into()]).unwrap_err();
        assert!(matches!(e, RootfsError::Stat { .. }), "{e}");
    }

    #[test]
    fn a_plain_directory_is_itself() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            source(tmp.path()).unwrap(),
            RootfsSource::Dir(std::fs::canonicalize(tmp.path()).unwrap())
        );
    }
}
