//! The cache of rootfs disk images: `<cache_dir>/images/<key>.erofs` (or
//! `.ext4`), one per layer chain, built once and shared by every sandbox.
//!
//! Locking: building a key holds an exclusive flock on `<key>.lock` (removed
//! when the build ends), so two `capsid run`s of one image build it once; a
//! disk in use is held with a shared flock on the disk file itself, and
//! eviction removes only disks it can lock exclusively without waiting.
//! Disks appear by rename, whole; staging directories and temporary files
//! are removed on every error path.

use std::fs::{self, File, FileTimes};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};

use super::mkfs::{FsType, Mkfs};
use super::{layout, unpack, Image, ImageError, Result};

/// Distinguishes temporary names made by threads of one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The directory of cached rootfs disks.
#[derive(Debug, Clone)]
pub struct RootfsCache {
    dir: PathBuf,
    fs_type: Option<FsType>,
}

/// A cached disk ready for a VM. It stays in the cache (eviction skips it)
/// until this is dropped.
#[derive(Debug)]
pub struct PreparedRootfs {
    /// The disk image, to attach read-only.
    pub path: PathBuf,
    /// Its filesystem, as `mount -t` names it.
    pub fs_type: FsType,
    /// True when the disk was already cached.
    pub cache_hit: bool,
    /// The image's layer-chain key.
    pub key: String,
    lease: Flock<File>,
}

/// What [`RootfsCache::evict_to`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EvictionReport {
    /// Disks removed, least recently used first.
    pub removed: Vec<PathBuf>,
    /// Disks over the limit that were kept because a sandbox uses them.
    pub in_use: Vec<PathBuf>,
    /// Disk space freed, in bytes.
    pub freed_bytes: u64,
    /// Disk space the cached disks still take.
    pub remaining_bytes: u64,
    /// Leftovers of interrupted builds removed.
    pub stale_removed: usize,
}

impl RootfsCache {
    /// The cache under `cache_dir` (`config.paths.cache_dir`): disks live in
    /// its `images/` subdirectory, made on first use.
    pub fn new(cache_dir: &Path) -> Self {
        Self {
            dir: cache_dir.join("images"),
            fs_type: None,
        }
    }

    /// Builds only `fs_type` disks (and reuses only those), instead of
    /// erofs where mkfs.erofs is installed and ext4 elsewhere.
    pub fn with_fs_type(self, fs_type: FsType) -> Self {
        Self {
            fs_type: Some(fs_type),
            ..self
        }
    }

    /// Where the disks are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image's rootfs disk: from the cache, or converted from its layers
    /// (reported through `progress`) and cached.
    ///
    /// A cached disk is returned only once the image's layer blobs hash to
    /// the digests its key was made from (a stream through sha256, nothing
    /// unpacked): the key comes from the image's own manifest and config,
    /// which could name another image's layers without holding them. On a
    /// mismatch the error names the layer and the cache is left as it was.
    pub fn prepare(&self, image: &Image, progress: &dyn Fn(&str)) -> Result<PreparedRootfs> {
        let key = image.chain_key();
        let verify_hit = || layout::verify_layer_blobs(image);
        self.prepare_key(&key, &image.name, &verify_hit, &|mkfs, unique, out| {
            let staging = RemoveOnDrop::new(self.dir.join(format!("{key}.staging-{unique}")));
            fs::create_dir(&staging.0)
                .map_err(|source| cache_error("create", &staging.0, source))?;
            unpack::unpack_layers(image, &staging.0, progress)?;
            let message = match (mkfs.fs_type, self.fs_type) {
                (FsType::Ext4, None) => {
                    "building ext4 image (mkfs.erofs is not installed)".to_string()
                }
                (fs_type, _) => format!("building {fs_type} image"),
            };
            tracing::info!(image = %image.name, key, "{message}");
            progress(&message);
            mkfs.build(&staging.0, out)
        })
    }

    /// The disk of a directory tree that never changes while `key` names it
    /// (`key`: 64 hex digits the caller derives from the tree's identity,
    /// e.g. containerd's committed layer snapshots): from the cache, or
    /// built from `dir` as it is and cached. `name` is for logs.
    pub fn prepare_dir(&self, key: &str, name: &str, dir: &Path) -> Result<PreparedRootfs> {
        if !is_key(key) {
            return Err(ImageError::Invalid(format!(
                "cache key {key:?} is not 64 hex digits"
            )));
        }
        // The key is the caller's account of the tree's identity (for the
        // shim, the inodes of containerd's snapshots), not a claim read
        // from an image: there is nothing more to check on a hit.
        self.prepare_key(key, name, &|| Ok(()), &|mkfs, _, out| {
            tracing::info!(name, key, dir = %dir.display(), "building {} image", mkfs.fs_type);
            mkfs.build(dir, out)
        })
    }

    /// The disk for `key`: a leased cache hit that `verify_hit` accepts,
    /// or `produce(mkfs, unique, out)` builds it at the temporary path `out`
    /// under the key's build lock and it is published. A hit `verify_hit`
    /// refuses is an error (the disk stays: it is right for its key).
    fn prepare_key(
        &self,
        key: &str,
        name: &str,
        verify_hit: &dyn Fn() -> Result<()>,
        produce: &dyn Fn(&Mkfs, &str, &Path) -> Result<()>,
    ) -> Result<PreparedRootfs> {
        if let Some(hit) = self.lookup(key)? {
            verify_hit()?;
            // Marked as used only once accepted: a refused image does not
            // keep another image's disk from eviction.
            touch(&hit.lease, &hit.path);
            tracing::debug!(name, path = %hit.path.display(), "rootfs cache hit");
            return Ok(hit);
        }
        // Private, so no other user walks into an image being unpacked
        // (its setuid files, its device nodes) or reads a disk.
        if let Some(root) = self.dir.parent() {
            crate::private_dir::ensure_root(root)?;
        }
        crate::private_dir::ensure_root(&self.dir)?;
        let _build_lock = BuildLock::acquire(&self.dir.join(format!("{key}.lock")))?;
        // Another process may have built it while this one waited.
        if let Some(hit) = self.lookup(key)? {
            verify_hit()?;
            touch(&hit.lease, &hit.path);
            return Ok(hit);
        }
        self.build(name, key, produce)
    }

    /// A cached disk for `key`, leased (not yet marked as used); `None` if
    /// there is none.
    fn lookup(&self, key: &str) -> Result<Option<PreparedRootfs>> {
        let candidates: &[FsType] = match &self.fs_type {
            Some(fs_type) => std::slice::from_ref(fs_type),
            None => &FsType::ALL,
        };
        for &fs_type in candidates {
            let path = self.disk_path(key, fs_type);
            let file = match File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(cache_error("open", &path, source)),
            };
            let lease = Flock::lock(file, FlockArg::LockShared)
                .map_err(|(_, errno)| cache_error("lock", &path, errno.into()))?;
            // Eviction may have removed it between open and lock.
            if !same_file(&lease, &path) {
                continue;
            }
            return Ok(Some(PreparedRootfs {
                path,
                fs_type,
                cache_hit: true,
                key: key.to_string(),
                lease,
            }));
        }
        Ok(None)
    }

    fn disk_path(&self, key: &str, fs_type: FsType) -> PathBuf {
        self.dir.join(format!("{key}.{fs_type}"))
    }

    /// Builds (through `produce`) and publishes the disk; called with the
    /// build lock.
    fn build(
        &self,
        name: &str,
        key: &str,
        produce: &dyn Fn(&Mkfs, &str, &Path) -> Result<()>,
    ) -> Result<PreparedRootfs> {
        let mkfs = Mkfs::detect(self.fs_type)?;
        let unique = format!(
            "{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let temp = RemoveOnDrop::new(self.dir.join(format!("{key}.tmp-{unique}")));
        produce(&mkfs, &unique, &temp.0)?;

        let file = File::open(&temp.0).map_err(|source| cache_error("open", &temp.0, source))?;
        file.sync_all()
            .map_err(|source| cache_error("sync", &temp.0, source))?;
        // Leased before it is published, so eviction cannot take it away.
        let lease = Flock::lock(file, FlockArg::LockShared)
            .map_err(|(_, errno)| cache_error("lock", &temp.0, errno.into()))?;
        let path = self.disk_path(key, mkfs.fs_type);
        fs::rename(&temp.0, &path).map_err(|source| cache_error("publish", &path, source))?;
        temp.disarm();
        if let Ok(dir) = File::open(&self.dir) {
            // Best effort: the rename survives a crash.
            let _ = dir.sync_all();
        }
        let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        tracing::info!(
            image = %name,
            path = %path.display(),
            size = %super::human_size(size),
            "cached rootfs disk"
        );
        Ok(PreparedRootfs {
            path,
            fs_type: mkfs.fs_type,
            cache_hit: false,
            key: key.to_string(),
            lease,
        })
    }

    /// Removes least recently used disks until the cached disks take at
    /// most `limit_bytes`, skipping disks in use, and removes leftovers of
    /// interrupted builds.
    pub fn evict_to(&self, limit_bytes: u64) -> Result<EvictionReport> {
        let mut report = EvictionReport::default();
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(report),
            Err(source) => return Err(cache_error("list", &self.dir, source)),
        };
        let mut disks = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| cache_error("list", &self.dir, source))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((key, rest)) = name.split_once('.') else {
                continue;
            };
            if !is_key(key) {
                continue;
            }
            if rest.starts_with("staging-") || rest.starts_with("tmp-") {
                if self.remove_stale(key, &entry.path())? {
                    report.stale_removed += 1;
                }
                continue;
            }
            if !FsType::ALL.iter().any(|t| t.as_str() == rest) {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            disks.push((used, entry.path(), meta.blocks() * 512));
        }
        disks.sort();
        report.remaining_bytes = disks.iter().map(|(_, _, size)| size).sum();
        for (_, path, size) in disks {
            if report.remaining_bytes <= limit_bytes {
                break;
            }
            if self.remove_unused(&path)? {
                tracing::info!(path = %path.display(), "evicted rootfs disk");
                report.remaining_bytes -= size;
                report.freed_bytes += size;
                report.removed.push(path);
            } else {
                report.in_use.push(path);
            }
        }
        Ok(report)
    }

    /// Removes a disk unless a sandbox holds it. Returns whether it did.
    fn remove_unused(&self, path: &Path) -> Result<bool> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(source) => return Err(cache_error("open", path, source)),
        };
        let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            return Ok(false);
        };
        if !same_file(&lock, path) {
            return Ok(false);
        }
        fs::remove_file(path).map_err(|source| cache_error("remove", path, source))?;
        Ok(true)
    }

    /// Removes a staging directory or temporary disk whose build is no
    /// longer running (its key's build lock is free).
    fn remove_stale(&self, key: &str, path: &Path) -> Result<bool> {
        let Some(_lock) = BuildLock::try_acquire(&self.dir.join(format!("{key}.lock")))? else {
            return Ok(false);
        };
        remove_path(path).map_err(|source| cache_error("remove", path, source))?;
        tracing::info!(path = %path.display(), "removed leftover of an interrupted build");
        Ok(true)
    }
}

/// The right to build one key: an exclusive flock on `<key>.lock`. The lock
/// file is removed, still locked, when the build is over, so a finished
/// cache holds only disks; whoever waited on the removed file sees that it
/// is gone and locks the path anew.
#[derive(Debug)]
struct BuildLock {
    path: PathBuf,
    _lock: Flock<File>,
}

impl BuildLock {
    /// Waits for the lock.
    fn acquire(path: &Path) -> Result<Self> {
        loop {
            if let Some(lock) = Self::lock(path, FlockArg::LockExclusive)? {
                return Ok(lock);
            }
        }
    }

    /// The lock if nobody holds it, else `None`.
    fn try_acquire(path: &Path) -> Result<Option<Self>> {
        Self::lock(path, FlockArg::LockExclusiveNonblock)
    }

    /// `None` if it is held (non-blocking) or its file was replaced while
    /// waiting (blocking: the caller tries again).
    fn lock(path: &Path, arg: FlockArg) -> Result<Option<Self>> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|source| cache_error("create", path, source))?;
        let lock = match Flock::lock(file, arg) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, errno)) => return Err(cache_error("lock", path, errno.into())),
        };
        Ok(same_file(&lock, path).then(|| Self {
            path: path.to_path_buf(),
            _lock: lock,
        }))
    }
}

impl Drop for BuildLock {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove lock file");
        }
    }
}

/// Whether the open file is still the one at `path`.
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Marks a disk as just used, for LRU eviction.
fn touch(file: &File, path: &Path) {
    let now = SystemTime::now();
    if let Err(e) = file.set_times(FileTimes::new().set_accessed(now).set_modified(now)) {
        tracing::debug!(path = %path.display(), error = %e, "cannot mark rootfs disk as used");
    }
}

fn is_key(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

fn cache_error(action: &'static str, path: &Path, source: io::Error) -> ImageError {
    ImageError::Cache {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn remove_path(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// A file or directory removed when dropped, unless disarmed: temporary
/// names never outlive an error.
#[derive(Debug)]
struct RemoveOnDrop(PathBuf);

impl RemoveOnDrop {
    fn new(path: PathBuf) -> Self {
        Self(path)
    }

    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(e) = remove_path(&self.0) {
            tracing::warn!(path = %self.0.display(), error = %e, "cannot remove temporary file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_disk(cache: &RootfsCache, key_byte: char, size: usize, age_secs: u64) -> PathBuf {
        fs::create_dir_all(cache.dir()).unwrap();
        let path = cache
            .dir()
            .join(format!("{}.erofs", key_byte.to_string().repeat(64)));
        fs::write(&path, vec![1u8; size]).unwrap();
        let when = SystemTime::now() - std::time::Duration::from_secs(age_secs);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(when)
            .unwrap();
        path
    }

    #[test]
    fn eviction_removes_least_recently_used_first() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = RootfsCache::new(tmp.path());
        let old = fake_disk(&cache, 'a', 64 << 10, 300);
        let mid = fake_disk(&cache, 'b', 64 << 10, 200);
        let new = fake_disk(&cache, 'c', 64 << 10, 100);
        let report = cache.evict_to(130 << 10).unwrap();
        assert_eq!(report.removed, vec![old.clone()]);
        assert!(!old.exists() && mid.exists() && new.exists());
        assert_eq!(report.remaining_bytes, 128 << 10);
        let report = cache.evict_to(0).unwrap();
        assert_eq!(report.removed, vec![mid, new]);
        assert_eq!(report.remaining_bytes, 0);
    }

    #[test]
    fn eviction_skips_disks_in_use() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = RootfsCache::new(tmp.path());
        let used = fake_disk(&cache, 'a', 4096, 300);
        let unused = fake_disk(&cache, 'b', 4096, 100);
        let lease = Flock::lock(File::open(&used).unwrap(), FlockArg::LockShared).unwrap();
        let report = cache.evict_to(0).unwrap();
        assert_eq!(report.removed, vec![unused]);
        assert_eq!(report.in_use, vec![used.clone()]);
        assert!(used.exists());
        drop(lease);
        assert_eq!(cache.evict_to(0).unwrap().removed, vec![used]);
    }

    fn no_build(_: &Mkfs, _: &str, _: &Path) -> Result<()> {
        panic!("a hit builds nothing")
    }

    #[test]
    fn a_hit_leases_the_disk_and_marks_it_used() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = RootfsCache::new(tmp.path());
        let key = "d".repeat(64);
        assert!(cache.lookup(&key).unwrap().is_none());
        let disk = fake_disk(&cache, 'd', 4096, 1000);
        let before = fs::metadata(&disk).unwrap().modified().unwrap();
        let hit = cache.prepare_key(&key, "d", &|| Ok(()), &no_build).unwrap();
        assert!(hit.cache_hit);
        assert_eq!(
            (hit.path.as_path(), hit.fs_type),
            (disk.as_path(), FsType::Erofs)
        );
        assert!(fs::metadata(&disk).unwrap().modified().unwrap() > before);
        assert!(cache.evict_to(0).unwrap().removed.is_empty());
        drop(hit);
        assert_eq!(cache.evict_to(0).unwrap().removed, vec![disk]);
    }

    #[test]
    fn a_refused_hit_is_an_error_and_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = RootfsCache::new(tmp.path());
        let key = "d".repeat(64);
        let disk = fake_disk(&cache, 'd', 4096, 1000);
        let before = fs::metadata(&disk).unwrap().modified().unwrap();
        let refuse = || {
            Err(ImageError::MissingBlob {
                what: "layer",
                digest: "sha256:x".into(),
            })
        };
        let err = cache
            .prepare_key(&key, "d", &refuse, &no_build)
            .unwrap_err();
        assert!(matches!(err, ImageError::MissingBlob { .. }), "{err}");
        // The disk is still there, unused, not even marked as used.
        assert_eq!(fs::metadata(&disk).unwrap().modified().unwrap(), before);
        assert_eq!(cache.evict_to(0).unwrap().removed, vec![disk]);
    }

    #[test]
    fn leftovers_of_dead_builds_are_removed_but_not_running_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = RootfsCache::new(tmp.path());
        fs::create_dir_all(cache.dir()).unwrap();
        let (dead, live) = ("e".repeat(64), "f".repeat(64));
        let dead_staging = cache.dir().join(format!("{dead}.staging-1-0"));
        fs::create_dir_all(dead_staging.join("sub")).unwrap();
        fs::write(cache.dir().join(format!("{dead}.lock")), b"").unwrap();
        let live_temp = cache.dir().join(format!("{live}.tmp-2-0"));
        fs::write(&live_temp, b"partial").unwrap();
        let building = BuildLock::acquire(&cache.dir().join(format!("{live}.lock"))).unwrap();

        let report = cache.evict_to(u64::MAX).unwrap();
        assert_eq!(report.stale_removed, 1);
        assert!(!dead_staging.exists());
        assert!(!cache.dir().join(format!("{dead}.lock")).exists());
        assert!(live_temp.exists());
        drop(building);
        assert_eq!(fs::read_dir(cache.dir()).unwrap().count(), 1);
    }

    #[test]
    fn a_directory_is_built_once_then_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = RootfsCache::new(&tmp.path().join("cache")).with_fs_type(FsType::Ext4);
        if Mkfs::detect(Some(FsType::Ext4)).is_err() {
            return;
        }
        let tree = tmp.path().join("tree");
        fs::create_dir_all(tree.join("etc")).unwrap();
        fs::write(tree.join("etc/motd"), b"hi").unwrap();
        let key = "a1".repeat(32);
        let first = cache.prepare_dir(&key, "tree", &tree).unwrap();
        assert!(!first.cache_hit);
        assert_eq!(first.path, cache.dir().join(format!("{key}.ext4")));
        let second = cache.prepare_dir(&key, "tree", &tree).unwrap();
        assert!(second.cache_hit);
        // Only the disk remains: no lock, staging or temporary files.
        assert_eq!(fs::read_dir(cache.dir()).unwrap().count(), 1);
        let e = cache.prepare_dir("../x", "tree", &tree).unwrap_err();
        assert!(e.to_string().contains("64 hex digits"), "{e}");
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_hit_needs_the_blobs_its_key_names() {
        use super::super::open;
        use super::super::testing::{self, TestImage};
        if Mkfs::detect(None).is_err() {
            eprintln!("neither mkfs.erofs nor mke2fs: skipped");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let cache = RootfsCache::new(&tmp.path().join("cache"));
        let layers = || {
            vec![
                testing::layer(|l| l.file("base", &"base ".repeat(5000))),
                testing::layer(|l| {
                    let text: String = (0..20_000).map(|i| format!("{i} ")).collect();
                    l.file("top", &text);
                }),
            ]
        };
        let img = TestImage::new(layers());
        let real = img.write_dir(&tmp.path().join("real"));
        let built = cache.prepare(&open(&real).unwrap(), &|_| {}).unwrap();
        assert!(!built.cache_hit);
        let key = built.key.clone();
        drop(built);
        let cached = listing(cache.dir());

        // Layouts whose index, manifest and config are the real image's
        // (so they name its layers and have its key) but whose top blob is
        // damaged, another blob, or absent.
        let top = img.layer_digests()[1];
        let (top_len, base_len) = (img.blob_len(1), img.blob_len(0));
        let base = img.layer_digests()[0];
        // (name, damage done to the top blob, the error it gives)
        type Case<'a> = (&'a str, &'a dyn Fn(&Path), String);
        let cases: [Case<'_>; 3] = [
            (
                "flipped",
                &|blob| {
                    let mut data = fs::read(blob).unwrap();
                    data[top_len / 2] ^= 1;
                    fs::write(blob, data).unwrap();
                },
                format!("layer {top} does not match its digest"),
            ),
            (
                "other",
                &|blob| {
                    let other = blob.with_file_name(base.hex());
                    fs::copy(other, blob).unwrap();
                },
                format!("layer {top} has {base_len} bytes where its descriptor says {top_len}"),
            ),
            (
                "missing",
                &|blob| fs::remove_file(blob).unwrap(),
                format!("layer {top} is missing from the image"),
            ),
        ];
        for (name, damage, expected) in cases {
            let source = img.write_dir(&tmp.path().join(name));
            damage(&source.path.join("blobs/sha256").join(top.hex()));
            let image = open(&source).unwrap();
            assert_eq!(image.chain_key(), key, "{name}");
            let err = cache
                .prepare(&image, &|m| panic!("{name}: a refused hit reports {m}"))
                .unwrap_err();
            assert_eq!(err.to_string(), expected, "{name}");
            assert_eq!(listing(cache.dir()), cached, "{name}");
        }
        // The same through an archive.
        let mut damaged = TestImage::new(layers());
        damaged.corrupt_layer(1, top_len / 2);
        let archive = damaged.write_archive(&tmp.path().join("flipped"));
        let err = cache
            .prepare(&open(&archive).unwrap(), &|_| {})
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("layer {top} does not match its digest")
        );
        assert_eq!(listing(cache.dir()), cached);

        // The real image, as a layout or an archive, still hits.
        let archive = img.write_archive(&tmp.path().join("real"));
        for source in [real, archive] {
            let start = std::time::Instant::now();
            let hit = cache
                .prepare(&open(&source).unwrap(), &|m| panic!("a hit reports {m}"))
                .unwrap();
            eprintln!(
                "verified hit of {} B of layers: {:?}",
                top_len + base_len,
                start.elapsed()
            );
            assert!(hit.cache_hit);
            assert_eq!(hit.key, key);
        }
    }

    #[test]
    fn temporary_paths_go_away_unless_disarmed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        fs::create_dir_all(dir.join("x")).unwrap();
        drop(RemoveOnDrop::new(dir.clone()));
        assert!(!dir.exists());
        let file = tmp.path().join("f");
        fs::write(&file, b"").unwrap();
        RemoveOnDrop::new(file.clone()).disarm();
        assert!(file.exists());
    }
}
