//! OCI images built by images/build-oci.py become cached read-only rootfs
//! disks: the layer semantics survive (checked by mounting the disk on the
//! host), the cache is reused, shared safely and evicted without touching
//! disks in use, and bad input gives one clear error.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::Command;

use capsid_sandbox::image::{self, FsType, ImageError, RootfsCache};
use capsid_tests::{artifact, run};

/// A read-only loop mount, unmounted when dropped.
struct Mount {
    dir: tempfile::TempDir,
}

impl Mount {
    fn new(disk: &Path, fs_type: FsType) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (code, out, err) = run(Command::new("mount")
            .args(["-t", fs_type.as_str(), "-o", "loop,ro"])
            .arg(disk)
            .arg(dir.path()));
        assert_eq!(code, 0, "mount {}: {out}{err}", disk.display());
        Self { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let (code, _, _) = run(Command::new("umount").arg(self.dir.path()));
        if code != 0 {
            run(Command::new("umount").arg("-l").arg(self.dir.path()));
        }
    }
}

fn open_archive(name: &str) -> image::Image {
    let tar = artifact(&format!("images/{name}.tar"));
    let source = image::resolve(tar.to_str().unwrap(), Path::new("/nonexistent")).unwrap();
    image::open(&source).unwrap()
}

/// The names in a directory, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn check_layered_tree(mount: &Mount) {
    use std::os::unix::fs::MetadataExt;
    assert_eq!(mount.read("data/keep.txt"), "keep\n");
    assert!(!mount.path("data/gone.txt").exists());
    assert_eq!(names(&mount.path("data")), ["keep.txt"]);
    assert_eq!(names(&mount.path("opaque")), ["new.txt"]);
    assert_eq!(mount.read("etc/layer"), "3\n");
    let busybox = std::fs::metadata(mount.path("bin/busybox")).unwrap();
    assert_eq!(busybox.mode() & 0o777, 0o755);
    assert_eq!(
        std::fs::read_link(mount.path("bin/sh")).unwrap(),
        PathBuf::from("busybox")
    );
    let home = std::fs::metadata(mount.path("home/user")).unwrap();
    assert_eq!((home.uid(), home.gid()), (1000, 1000));
    let tmp = std::fs::metadata(mount.path("tmp")).unwrap();
    assert_eq!(tmp.mode() & 0o7777, 0o1777);
    assert_eq!(busybox.mtime(), 0);
}

#[test]
fn layered_image_becomes_an_erofs_disk_with_its_layer_semantics() {
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = RootfsCache::new(cache_dir.path()).with_fs_type(FsType::Erofs);
    let image = open_archive("layered");
    assert_eq!(image.layers.len(), 3);

    let messages = RefCell::new(Vec::new());
    let prepared = cache
        .prepare(&image, &|m| messages.borrow_mut().push(m.to_string()))
        .unwrap();
    assert!(!prepared.cache_hit);
    assert_eq!(prepared.fs_type, FsType::Erofs);
    assert_eq!(
        prepared.path,
        cache_dir
            .path()
            .join(format!("images/{}.erofs", image.chain_key()))
    );
    let messages = messages.into_inner();
    assert!(
        messages[0].starts_with("unpacking layer 1/3 ("),
        "{messages:?}"
    );
    assert!(
        messages[2].starts_with("unpacking layer 3/3 ("),
        "{messages:?}"
    );
    assert_eq!(messages[3], "building erofs image");

    {
        let mount = Mount::new(&prepared.path, FsType::Erofs);
        check_layered_tree(&mount);
    }

    // The same layers by their bundled name (the layout directory): a hit.
    let by_name = image::resolve("layered", &artifact("images")).unwrap();
    assert_eq!(by_name.format, image::SourceFormat::Layout);
    let again = image::open(&by_name).unwrap();
    let hit = cache
        .prepare(&again, &|m| panic!("a hit reports {m}"))
        .unwrap();
    assert!(hit.cache_hit);
    assert_eq!(hit.path, prepared.path);
    // Nothing but the disk is left in the cache.
    assert_eq!(names(cache.dir()), [format!("{}.erofs", image.chain_key())]);
}

#[test]
fn ext4_disks_hold_the_same_tree() {
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = RootfsCache::new(cache_dir.path()).with_fs_type(FsType::Ext4);
    let image = open_archive("layered");
    let messages = RefCell::new(Vec::new());
    let prepared = cache
        .prepare(&image, &|m| messages.borrow_mut().push(m.to_string()))
        .unwrap();
    assert_eq!(prepared.fs_type, FsType::Ext4);
    assert!(prepared.path.extension().is_some_and(|e| e == "ext4"));
    assert!(messages
        .borrow()
        .contains(&"building ext4 image".to_string()));
    let mount = Mount::new(&prepared.path, FsType::Ext4);
    check_layered_tree(&mount);
}

#[test]
fn concurrent_prepares_build_once() {
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = RootfsCache::new(cache_dir.path());
    let image = open_archive("busybox");
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| cache.prepare(&image, &|_| {}).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let built = results.iter().filter(|p| !p.cache_hit).count();
    assert_eq!(built, 1);
    assert!(results.iter().all(|p| p.path == results[0].path));
    assert_eq!(names(cache.dir()).len(), 1, "{:?}", names(cache.dir()));
}

/// The layered archive with one byte of its top layer's blob flipped.
fn corrupted_layered(dir: &Path) -> (PathBuf, String) {
    let layout = artifact("images/layered");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let blob = |digest: &str| {
        let hex = digest.strip_prefix("sha256:").unwrap();
        std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap()
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let digest = manifest["layers"][2]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let layer = blob(&digest);

    let mut archive = std::fs::read(artifact("images/layered.tar")).unwrap();
    let at = archive
        .windows(layer.len())
        .position(|w| w == layer.as_slice())
        .unwrap();
    archive[at + layer.len() / 2] ^= 0xff;
    let path = dir.join("corrupt.tar");
    std::fs::write(&path, archive).unwrap();
    (path, digest)
}

#[test]
fn corrupted_layer_is_refused_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let (archive, digest) = corrupted_layered(tmp.path());
    let cache_dir = tmp.path().join("cache");
    let cache = RootfsCache::new(&cache_dir);
    let source = image::resolve(archive.to_str().unwrap(), tmp.path()).unwrap();
    let image = image::open(&source).unwrap();
    let err = cache.prepare(&image, &|_| {}).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("layer {digest} does not match its digest")
    );
    assert_eq!(names(cache.dir()), Vec::<String>::new());
}

#[test]
fn eviction_keeps_the_disk_in_use() {
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = RootfsCache::new(cache_dir.path());
    let in_use = cache.prepare(&open_archive("layered"), &|_| {}).unwrap();
    let idle = cache.prepare(&open_archive("busybox"), &|_| {}).unwrap();
    let idle_path = idle.path.clone();
    drop(idle);

    let report = cache.evict_to(0).unwrap();
    assert_eq!(report.removed, vec![idle_path.clone()]);
    assert_eq!(report.in_use, vec![in_use.path.clone()]);
    assert!(!idle_path.exists());
    assert!(in_use.path.exists());
    assert!(report.remaining_bytes > 0);

    let path = in_use.path.clone();
    drop(in_use);
    let report = cache.evict_to(0).unwrap();
    assert_eq!(report.removed, vec![path]);
    assert_eq!(report.remaining_bytes, 0);
}

#[test]
fn bad_input_gives_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let images = artifact("images");

    let err = image::resolve("no-such-image", &images)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("unknown image no-such-image: no no-such-image.tar or no-such-image/ in "),
        "{err}"
    );
    assert!(err.contains("busybox") && err.contains("layered"), "{err}");

    let text = tmp.path().join("notes.txt");
    std::fs::write(&text, "not an image\n".repeat(100)).unwrap();
    let source = image::resolve(text.to_str().unwrap(), &images).unwrap();
    let err = image::open(&source).unwrap_err().to_string();
    assert!(
        err.contains("is neither an OCI image layout directory nor an OCI archive"),
        "{err}"
    );

    // A layout directory missing a layer blob opens (layers are read only
    // on conversion) and fails to convert naming the blob.
    let layout = tmp.path().join("layered");
    let (code, out, err) = run(Command::new("cp")
        .arg("-r")
        .arg(artifact("images/layered"))
        .arg(&layout));
    assert_eq!(code, 0, "{out}{err}");
    let image = image::open(&image::resolve(layout.to_str().unwrap(), &images).unwrap()).unwrap();
    let digest = image.layers[1].descriptor.digest().to_string();
    std::fs::remove_file(
        layout
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").unwrap()),
    )
    .unwrap();
    let cache = RootfsCache::new(&tmp.path().join("cache"));
    let err = cache.prepare(&image, &|_| {}).unwrap_err().to_string();
    assert_eq!(err, format!("layer {digest} is missing from the image"));
    assert_eq!(names(cache.dir()), Vec::<String>::new());
}

/// An image whose index, manifest and config are busybox's (so it names
/// busybox's layers and has its cache key) but whose layer blob is other
/// bytes, damaged or absent gets nothing from the cache, even with
/// busybox's disk cached; the real busybox still hits.
#[test]
fn a_cache_hit_needs_the_layers_themselves() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = RootfsCache::new(&tmp.path().join("cache"));
    let busybox = open_archive("busybox");
    let built = cache.prepare(&busybox, &|_| {}).unwrap();
    let disk = built.path.clone();
    drop(built);
    let cached = names(cache.dir());

    assert_eq!(busybox.layers.len(), 1);
    let digest = busybox.layers[0].descriptor.digest().to_string();
    let size = busybox.layers[0].size();
    let hex = digest.strip_prefix("sha256:").unwrap().to_string();
    let other = open_archive("layered").layers[2].descriptor.clone();
    let other_blob = artifact("images/layered/blobs/sha256")
        .join(other.digest().to_string().strip_prefix("sha256:").unwrap());
    // (name, damage done to the layer blob, the error it gives)
    type Case<'a> = (&'a str, &'a dyn Fn(&Path), String);
    let cases: [Case<'_>; 3] = [
        (
            "other",
            &|blob| {
                std::fs::copy(&other_blob, blob).unwrap();
            },
            format!(
                "layer {digest} has {} bytes where its descriptor says {size}",
                other.size()
            ),
        ),
        (
            "flipped",
            &|blob| {
                let mut data = std::fs::read(blob).unwrap();
                let middle = data.len() / 2;
                data[middle] ^= 0xff;
                std::fs::write(blob, data).unwrap();
            },
            format!("layer {digest} does not match its digest"),
        ),
        (
            "missing",
            &|blob| std::fs::remove_file(blob).unwrap(),
            format!("layer {digest} is missing from the image"),
        ),
    ];
    for (case, damage, expected) in cases {
        let layout = tmp.path().join(case);
        let (code, out, err) = run(Command::new("cp")
            .arg("-r")
            .arg(artifact("images/busybox"))
            .arg(&layout));
        assert_eq!(code, 0, "{out}{err}");
        damage(&layout.join("blobs/sha256").join(&hex));
        let image =
            image::open(&image::resolve(layout.to_str().unwrap(), tmp.path()).unwrap()).unwrap();
        assert_eq!(image.chain_key(), busybox.chain_key(), "{case}");
        let err = cache
            .prepare(&image, &|m| panic!("{case}: a refused hit reports {m}"))
            .unwrap_err();
        assert_eq!(err.to_string(), expected, "{case}");
        assert_eq!(names(cache.dir()), cached, "{case}");
    }

    for source in [
        image::resolve("busybox", &artifact("images")).unwrap(),
        image::resolve(artifact("images/busybox.tar").to_str().unwrap(), tmp.path()).unwrap(),
    ] {
        let image = image::open(&source).unwrap();
        let start = std::time::Instant::now();
        let hit = cache
            .prepare(&image, &|m| panic!("a hit reports {m}"))
            .unwrap();
        eprintln!(
            "busybox {:?} hit, layer blobs verified: {:?}",
            source.format,
            start.elapsed()
        );
        assert!(hit.cache_hit);
        assert_eq!(hit.path, disk);
    }
}
