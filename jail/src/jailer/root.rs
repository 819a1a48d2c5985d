//! The jail's root: a small tmpfs holding bind mounts of exactly what the
//! program needs (at their host paths, so its arguments need no rewriting),
//! a handful of device nodes and a procfs of the jail's own pid namespace.
//! The program's shared libraries come from a read-only, nosuid, nodev
//! bind of `/usr`; nothing else of the host's filesystem is reachable.

use std::ffi::OsStr;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use capsid_jail::{BindMount, JailSpec};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chdir, chown, pivot_root, Gid, Uid};

use super::{sys, JailError};

/// Host paths every dynamically linked program needs, bound read-only.
const SYSTEM: [&str; 2] = ["/usr", "/etc/ld.so.cache"];
/// Top-level directories that merged-/usr systems make symlinks into /usr.
const USR_LINKS: [&str; 4] = ["/bin", "/sbin", "/lib", "/lib64"];
/// Device nodes every process may have: (name, major, minor).
const NODES: [(&str, u64, u64); 5] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
];

fn path_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> JailError + 'a {
    move |source| JailError::Path {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn nix_path_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(nix::Error) -> JailError + 'a {
    move |e| JailError::Path {
        what,
        path: path.to_path_buf(),
        source: std::io::Error::from(e),
    }
}

/// Where host path `path` lives under the new root `root`.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Builds the root and pivots into it.
pub fn build(spec: &JailSpec) -> Result<(), JailError> {
    let root = &spec.root;
    // The jail's directories are for its uid to walk; what the program
    // makes afterwards is private again.
    // SAFETY: umask only sets this process's file mode creation mask.
    unsafe { libc::umask(0o022) };
    let built = build_in(spec, root);
    // SAFETY: as above.
    unsafe { libc::umask(0o077) };
    built
}

fn build_in(spec: &JailSpec, root: &Path) -> Result<(), JailError> {
    // Nothing mounted from here on reaches the host's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("make the jail's mounts private"))?;
    mount(
        Some("capsid-jail"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755,size=1m,nr_inodes=4096"),
    )
    .map_err(nix_path_err("mount the jail's root on", root))?;

    // Read-only trees bound whole: whatever lies inside them is already
    // in the jail at its own path.
    let mut trees: Vec<&Path> = Vec::new();
    for path in USR_LINKS.iter().map(Path::new) {
        match std::fs::read_link(path) {
            Ok(target) => {
                symlink(&target, inside(root, path)).map_err(path_err("link in the jail", path))?
            }
            // A real directory (no merged /usr): bound like /usr.
            Err(_) if path.is_dir() => {
                bind(
                    root,
                    &BindMount {
                        path: path.to_path_buf(),
                        writable: false,
                    },
                    true,
                )?;
                trees.push(path);
            }
            Err(_) => {}
        }
    }
    for path in SYSTEM.iter().map(Path::new).filter(|p| p.exists()) {
        bind(
            root,
            &BindMount {
                path: path.to_path_buf(),
                writable: false,
            },
            true,
        )?;
        if path.is_dir() {
            trees.push(path);
        }
    }
    let visible = |path: &Path| trees.iter().any(|t| path.starts_with(t));
    // A program outside /usr (a build tree's binary) is bound on its own.
    if !visible(&spec.program) {
        bind(
            root,
            &BindMount {
                path: spec.program.clone(),
                writable: false,
            },
            true,
        )?;
    }
    for b in &spec.binds {
        // An installed kernel (/usr/local/share/capsid/vmlinux) is in the
        // jail already, read-only with /usr, whose read-only bind also
        // leaves no room for a mount point of its own.
        if !b.writable && visible(&b.path) {
            continue;
        }
        bind(root, b, false)?;
    }
    devices(spec)?;
    let proc = root.join("proc");
    std::fs::create_dir(&proc).map_err(path_err("make", &proc))?;
    // The jail's own pid namespace: the program sees itself as pid 1.
    mount(
        Some("proc"),
        &proc,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(nix_path_err("mount procfs on", &proc))?;

    // pivot_root(".", ".") stacks the old root under the new one; detaching
    // it leaves the new root alone (no directory for the old one needed).
    chdir(root).map_err(nix_path_err("enter", root))?;
    pivot_root(".", ".").map_err(sys("pivot_root into the jail"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detach the host's root"))?;
    chdir("/").map_err(sys("enter the jail's root"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
        None::<&str>,
    )
    .map_err(sys("make the jail's root read-only"))?;
    Ok(())
}

/// Binds `b` at its own path under `root`: nosuid and nodev always,
/// read-only unless writable, noexec unless `exec` (the program and the
/// system's libraries).
fn bind(root: &Path, b: &BindMount, exec: bool) -> Result<(), JailError> {
    let target = inside(root, &b.path);
    let meta = std::fs::metadata(&b.path).map_err(path_err("find", &b.path))?;
    if meta.is_dir() {
        std::fs::create_dir_all(&target).map_err(path_err("make", &target))?;
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(path_err("make", parent))?;
        }
        std::fs::File::create(&target).map_err(path_err("make", &target))?;
    }
    mount(
        Some(&b.path),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(nix_path_err("bind into the jail", &b.path))?;
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if !b.writable {
        flags |= MsFlags::MS_RDONLY;
    }
    if !exec {
        flags |= MsFlags::MS_NOEXEC;
    }
    mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
        .map_err(nix_path_err("restrict the bind of", &b.path))
}

/// The jail's /dev: the harmless nodes for everyone, the spec's devices
/// (`/dev/kvm`) for the jail's uid only, `/dev/net/tun` when it has taps
/// (the tap's owner check is what guards them).
fn devices(spec: &JailSpec) -> Result<(), JailError> {
    let dev = spec.root.join("dev");
    std::fs::create_dir(&dev).map_err(path_err("make", &dev))?;
    let everyone = Mode::from_bits_truncate(0o666);
    for (name, major, minor) in NODES {
        node(&dev.join(name), makedev(major, minor), everyone, None)?;
    }
    if !spec.taps.is_empty() {
        let net = dev.join("net");
        std::fs::create_dir(&net).map_err(path_err("make", &net))?;
        node(&net.join("tun"), makedev(10, 200), everyone, None)?;
    }
    for host in &spec.devices {
        let meta = std::fs::metadata(host).map_err(path_err("find", host))?;
        if !meta.file_type().is_char_device() {
            return Err(JailError::Path {
                what: "pass the device",
                path: host.clone(),
                source: std::io::Error::from_raw_os_error(libc::ENODEV),
            });
        }
        let name = host.file_name().unwrap_or(OsStr::new("device"));
        node(
            &dev.join(name),
            meta.rdev(),
            Mode::from_bits_truncate(0o600),
            Some((spec.uid, spec.gid)),
        )?;
    }
    Ok(())
}

fn node(path: &Path, dev: u64, mode: Mode, owner: Option<(u32, u32)>) -> Result<(), JailError> {
    mknod(path, SFlag::S_IFCHR, mode, dev).map_err(nix_path_err("make the device node", path))?;
    // mknod's mode is cut by the umask.
    std::fs::set_permissions(
        path,
        std::os::unix::fs::PermissionsExt::from_mode(mode.bits()),
    )
    .map_err(path_err("set the mode of", path))?;
    if let Some((uid, gid)) = owner {
        chown(path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
            .map_err(nix_path_err("give the device to the jail's uid", path))?;
    }
    Ok(())
}
