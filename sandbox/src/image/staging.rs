//! The staging directory layers are unpacked into: every path is resolved
//! inside its root (symlinks are followed as the image sees them, never out
//! of the root), and entries are created with the owner, mode, times and
//! xattrs they carry.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{self, FileTimes, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

/// Symlinks followed while resolving one path before giving up (as Linux).
const MAX_SYMLINK_HOPS: usize = 40;

/// Why an entry could not be unpacked.
#[derive(Debug)]
pub(crate) enum EntryError {
    /// The entry must not be unpacked; the text completes "entry X …".
    Refused(String),
    /// The file system said no.
    Io(io::Error),
}

impl From<io::Error> for EntryError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

type EntryResult<T> = std::result::Result<T, EntryError>;

/// Owner, mode, time and xattrs of an entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Meta {
    /// Permission bits, with setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds and nanoseconds since the epoch.
    pub mtime: (i64, u32),
    /// Extended attributes, name and value.
    pub xattrs: Vec<(OsString, Vec<u8>)>,
}

/// The kind of special file a device entry makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeKind {
    Char,
    Block,
    Fifo,
}

/// Splits an entry's path into its names, refusing `..` and absolute paths.
pub(crate) fn entry_components(path: &Path) -> EntryResult<Vec<OsString>> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(Ok(name.to_os_string())),
            Component::CurDir => None,
            Component::ParentDir => Some(Err(EntryError::Refused(
                "climbs out of the image root with ..".into(),
            ))),
            Component::RootDir | Component::Prefix(_) => {
                Some(Err(EntryError::Refused("is an absolute path".into())))
            }
        })
        .collect()
}

/// The staging directory of one image conversion.
#[derive(Debug)]
pub(crate) struct StagingTree {
    root: PathBuf,
    /// Whether chown failing for lack of privilege was reported already.
    warned_chown: bool,
}

impl StagingTree {
    pub(crate) fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            warned_chown: false,
        }
    }

    fn abs(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    /// Resolves a directory path inside the root, following symlinks as the
    /// image sees them (absolute targets start at the root) and refusing any
    /// that climbs above it. Missing directories are created when `create`,
    /// else the answer is `None`. Returns the path relative to the root with
    /// no symlinks in it.
    pub(crate) fn resolve_dir(
        &self,
        components: &[OsString],
        create: bool,
    ) -> EntryResult<Option<PathBuf>> {
        let mut real: Vec<OsString> = Vec::new();
        let mut pending: VecDeque<OsString> = components.iter().cloned().collect();
        let mut hops = 0;
        while let Some(name) = pending.pop_front() {
            if name == ".." {
                if real.pop().is_none() {
                    return Err(EntryError::Refused(
                        "goes through a symlink that points outside the image root".into(),
                    ));
                }
                continue;
            }
            let abs = self.root.join(real.iter().collect::<PathBuf>()).join(&name);
            match fs::symlink_metadata(&abs) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(EntryError::Refused("goes through a symlink loop".into()));
                    }
                    let target = fs::read_link(&abs)?;
                    if target.has_root() {
                        real.clear();
                    }
                    let parts = target.components().filter_map(|c| match c {
                        Component::Normal(part) => Some(part.to_os_string()),
                        Component::ParentDir => Some(OsString::from("..")),
                        _ => None,
                    });
                    for part in parts.collect::<Vec<_>>().into_iter().rev() {
                        pending.push_front(part);
                    }
                }
                Ok(meta) if meta.is_dir() => real.push(name),
                Ok(_) => {
                    return Err(EntryError::Refused(
                        "has a parent that is not a directory".into(),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    fs::DirBuilder::new().mode(0o755).create(&abs)?;
                    real.push(name);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Some(real.iter().collect()))
    }

    /// Removes whatever is at `rel` (not following a symlink there); keeps a
    /// directory if `keep_dir`. Returns whether a directory is left there.
    fn clear(&self, rel: &Path, keep_dir: bool) -> io::Result<bool> {
        let abs = self.abs(rel);
        match fs::symlink_metadata(&abs) {
            Ok(meta) if meta.is_dir() => {
                if keep_dir {
                    return Ok(true);
                }
                fs::remove_dir_all(&abs)?;
            }
            Ok(_) => fs::remove_file(&abs)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(false)
    }

    /// Removes `rel` and everything under it (a whiteout).
    pub(crate) fn remove(&self, rel: &Path) -> io::Result<()> {
        self.clear(rel, false).map(drop)
    }

    /// Hides what lower layers put in the directory `rel` (an opaque
    /// whiteout): removes every entry under it that `keep` does not hold.
    pub(crate) fn make_opaque(&self, rel: &Path, keep: &HashSet<PathBuf>) -> io::Result<()> {
        for entry in fs::read_dir(self.abs(rel))? {
            let entry = entry?;
            let child = rel.join(entry.file_name());
            if !keep.contains(&child) {
                self.clear(&child, false)?;
            } else if entry.file_type()?.is_dir() {
                self.make_opaque(&child, keep)?;
            }
        }
        Ok(())
    }

    pub(crate) fn create_file(
        &mut self,
        rel: &Path,
        data: &mut impl Read,
        meta: &Meta,
    ) -> io::Result<()> {
        self.clear(rel, false)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc_o_nofollow())
            .open(self.abs(rel))?;
        io::copy(data, &mut file)?;
        self.chown(|| std::os::unix::fs::fchown(&file, Some(meta.uid), Some(meta.gid)))?;
        file.set_permissions(fs::Permissions::from_mode(meta.mode & 0o7777))?;
        self.set_xattrs(rel, meta);
        let time = system_time(meta.mtime);
        file.set_times(FileTimes::new().set_accessed(time).set_modified(time))
    }

    /// Creates (or keeps, if one is there) the directory `rel`. Its time is
    /// set by [`Self::set_dir_times`] once everything is unpacked.
    pub(crate) fn create_dir(&mut self, rel: &Path, meta: &Meta) -> io::Result<()> {
        if !self.clear(rel, true)? {
            fs::DirBuilder::new().mode(0o700).create(self.abs(rel))?;
        }
        let abs = self.abs(rel);
        self.chown(|| std::os::unix::fs::lchown(&abs, Some(meta.uid), Some(meta.gid)))?;
        fs::set_permissions(&abs, fs::Permissions::from_mode(meta.mode & 0o7777))?;
        self.set_xattrs(rel, meta);
        Ok(())
    }

    pub(crate) fn create_symlink(
        &mut self,
        rel: &Path,
        target: &Path,
        meta: &Meta,
    ) -> io::Result<()> {
        self.clear(rel, false)?;
        let abs = self.abs(rel);
        std::os::unix::fs::symlink(target, &abs)?;
        self.chown(|| std::os::unix::fs::lchown(&abs, Some(meta.uid), Some(meta.gid)))?;
        self.set_xattrs(rel, meta);
        set_times_nofollow(&abs, meta.mtime)
    }

    /// Links `rel` to the existing non-directory `target` (both resolved).
    pub(crate) fn create_hardlink(&mut self, rel: &Path, target: &Path) -> EntryResult<()> {
        match fs::symlink_metadata(self.abs(target)) {
            Ok(meta) if meta.is_dir() => {
                return Err(EntryError::Refused("is a hard link to a directory".into()))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(EntryError::Refused(format!(
                    "is a hard link to {}, which does not exist",
                    target.display()
                )))
            }
            Err(e) => return Err(e.into()),
        }
        if rel == target {
            return Ok(());
        }
        self.clear(rel, false)?;
        fs::hard_link(self.abs(target), self.abs(rel))?;
        Ok(())
    }

    /// Makes a device node or FIFO. Returns `false` (and leaves nothing) if
    /// the host does not allow it, as when not running as root.
    pub(crate) fn create_node(
        &mut self,
        rel: &Path,
        kind: NodeKind,
        device: (u32, u32),
        meta: &Meta,
    ) -> io::Result<bool> {
        self.clear(rel, false)?;
        let abs = self.abs(rel);
        let sflag = match kind {
            NodeKind::Char => SFlag::S_IFCHR,
            NodeKind::Block => SFlag::S_IFBLK,
            NodeKind::Fifo => SFlag::S_IFIFO,
        };
        let dev = nix::sys::stat::makedev(u64::from(device.0), u64::from(device.1));
        if let Err(errno) = nix::sys::stat::mknod(&abs, sflag, Mode::from_bits_truncate(0o600), dev)
        {
            tracing::warn!(path = %rel.display(), error = %errno, "skipping device node: cannot create it");
            return Ok(false);
        }
        self.chown(|| std::os::unix::fs::lchown(&abs, Some(meta.uid), Some(meta.gid)))?;
        fs::set_permissions(&abs, fs::Permissions::from_mode(meta.mode & 0o7777))?;
        self.set_xattrs(rel, meta);
        set_times_nofollow(&abs, meta.mtime)?;
        Ok(true)
    }

    /// Sets the times of the directories unpacked, deepest first, now that
    /// nothing more is created in them. Paths no longer directories are
    /// skipped, and so are paths through a symlink: a later entry may have
    /// replaced a parent with one, which can point outside the root.
    pub(crate) fn set_dir_times(&self, times: &HashMap<PathBuf, (i64, u32)>) -> io::Result<()> {
        let mut dirs: Vec<(&PathBuf, &(i64, u32))> = times.iter().collect();
        dirs.sort_by_key(|(path, _)| std::cmp::Reverse(path.components().count()));
        for (rel, &mtime) in dirs {
            if self.is_real_dir(rel)? {
                set_times_nofollow(&self.abs(rel), mtime)?;
            }
        }
        Ok(())
    }

    /// Whether `rel` and each of its parents is a directory, not a symlink.
    fn is_real_dir(&self, rel: &Path) -> io::Result<bool> {
        let mut abs = self.root.clone();
        for component in rel.components() {
            abs.push(component);
            match fs::symlink_metadata(&abs) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Runs a chown; without the privilege to give files away it warns once
    /// and goes on (the disk then records the caller's ownership).
    fn chown(&mut self, op: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                if !self.warned_chown {
                    self.warned_chown = true;
                    tracing::warn!(
                        "cannot set file ownership (not root): files keep the caller's owner"
                    );
                }
                Ok(())
            }
            other => other,
        }
    }

    /// xattrs the host refuses (a `trusted.` name without privilege, a file
    /// system without user xattrs) are skipped with a warning.
    fn set_xattrs(&self, rel: &Path, meta: &Meta) {
        for (name, value) in &meta.xattrs {
            if let Err(e) = xattr::set(self.abs(rel), name, value) {
                tracing::warn!(
                    path = %rel.display(),
                    xattr = %name.to_string_lossy(),
                    error = %e,
                    "skipping extended attribute"
                );
            }
        }
    }
}

fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

fn system_time((secs, nanos): (i64, u32)) -> SystemTime {
    let since = Duration::new(secs.unsigned_abs(), nanos);
    if secs >= 0 {
        UNIX_EPOCH + since
    } else {
        UNIX_EPOCH - since
    }
}

fn set_times_nofollow(abs: &Path, (secs, nanos): (i64, u32)) -> io::Result<()> {
    let time = TimeSpec::new(secs, i64::from(nanos));
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        abs,
        &time,
        &time,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

/// The name of a whiteout entry (`.wh.NAME`), with what it means.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Whiteout<'a> {
    /// `.wh..wh..opq`: the directory is opaque.
    Opaque,
    /// `.wh.NAME`: NAME is deleted.
    Remove(&'a OsStr),
    /// Another `.wh..wh.` name: metadata of other tools, ignored.
    Other,
}

/// Classifies an entry's last path name; `None` for ordinary names.
pub(crate) fn whiteout(name: &OsStr) -> Option<Whiteout<'_>> {
    use std::os::unix::ffi::OsStrExt;
    let rest = name.as_bytes().strip_prefix(b".wh.")?;
    Some(if rest == b".wh..opq" {
        Whiteout::Opaque
    } else if rest.starts_with(b".wh.") {
        Whiteout::Other
    } else {
        Whiteout::Remove(OsStr::from_bytes(rest))
    })
}

/// Reads a whole file under `root` (for tests and checks).
#[cfg(test)]
pub(crate) fn read(root: &Path, rel: &str) -> Option<String> {
    fs::read_to_string(root.join(rel)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comps(path: &str) -> Vec<OsString> {
        entry_components(Path::new(path)).unwrap()
    }

    #[test]
    fn entry_paths_must_stay_inside() {
        assert_eq!(
            comps("./a/./b/"),
            vec![OsString::from("a"), OsString::from("b")]
        );
        for bad in ["../x", "a/../../x", "a/../b", "/etc/passwd"] {
            assert!(
                matches!(
                    entry_components(Path::new(bad)),
                    Err(EntryError::Refused(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = StagingTree::new(tmp.path());
        fs::create_dir_all(tmp.path().join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("usr/lib", tmp.path().join("lib")).unwrap();
        std::os::unix::fs::symlink("/usr", tmp.path().join("abs")).unwrap();
        std::os::unix::fs::symlink("../../..", tmp.path().join("usr/up")).unwrap();
        std::os::unix::fs::symlink("loop", tmp.path().join("loop")).unwrap();

        let got = tree.resolve_dir(&comps("lib/x86"), true).unwrap().unwrap();
        assert_eq!(got, PathBuf::from("usr/lib/x86"));
        assert!(tmp.path().join("usr/lib/x86").is_dir());
        let got = tree.resolve_dir(&comps("abs/lib"), false).unwrap().unwrap();
        assert_eq!(got, PathBuf::from("usr/lib"));
        assert_eq!(tree.resolve_dir(&comps("nope/x"), false).unwrap(), None);
        assert!(!tmp.path().join("nope").exists());

        for (path, reason) in [
            (
                "usr/up/etc",
                "goes through a symlink that points outside the image root",
            ),
            ("loop/x", "goes through a symlink loop"),
        ] {
            match tree.resolve_dir(&comps(path), true) {
                Err(EntryError::Refused(r)) => assert_eq!(r, reason),
                other => panic!("{path}: {other:?}"),
            }
        }
    }

    #[test]
    fn whiteout_names() {
        assert_eq!(whiteout(OsStr::new(".wh..wh..opq")), Some(Whiteout::Opaque));
        assert_eq!(
            whiteout(OsStr::new(".wh.gone")),
            Some(Whiteout::Remove(OsStr::new("gone")))
        );
        assert_eq!(whiteout(OsStr::new(".wh..wh.plnk")), Some(Whiteout::Other));
        assert_eq!(whiteout(OsStr::new("plain.wh.")), None);
    }

    #[test]
    fn dir_times_do_not_follow_a_replaced_parent_out_of_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("staging");
        let outside = tmp.path().join("outside");
        fs::create_dir_all(root.join("a/x")).unwrap();
        fs::create_dir_all(outside.join("x")).unwrap();
        let old = (1_000_000, 0);
        set_times_nofollow(&outside.join("x"), old).unwrap();
        // A layer made a/ and a/x/, then replaced a with a symlink that
        // climbs out of the root on the host.
        fs::remove_dir_all(root.join("a")).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("a")).unwrap();
        let times = HashMap::from([
            (PathBuf::from("a"), (2_000_000, 0)),
            (PathBuf::from("a/x"), (2_000_000, 0)),
            (PathBuf::new(), (2_000_000, 0)),
        ]);
        StagingTree::new(&root).set_dir_times(&times).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(outside.join("x")).unwrap().mtime(), 1_000_000);
        assert_eq!(fs::metadata(&root).unwrap().mtime(), 2_000_000);
    }

    #[test]
    fn files_get_their_metadata() {
        let tmp = tempfile::tempdir().unwrap();
        let mut tree = StagingTree::new(tmp.path());
        let meta = Meta {
            mode: 0o4755,
            uid: 1000,
            gid: 1000,
            mtime: (1_000_000, 0),
            xattrs: vec![(OsString::from("user.capsid"), b"yes".to_vec())],
        };
        tree.create_file(Path::new("f"), &mut &b"data"[..], &meta)
            .unwrap();
        let st = fs::symlink_metadata(tmp.path().join("f")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(st.mtime(), 1_000_000);
        if nix::unistd::geteuid().is_root() {
            assert_eq!((st.uid(), st.gid()), (1000, 1000));
            assert_eq!(st.mode() & 0o7777, 0o4755);
        }
        assert_eq!(read(tmp.path(), "f").as_deref(), Some("data"));
    }
}
