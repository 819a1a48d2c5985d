//! Applying an image's layers, in order, into a staging directory (OCI image
//! spec, "Image Layer Filesystem Changeset"): `.wh.NAME` deletes NAME from
//! lower layers, `.wh..wh..opq` hides a directory's lower contents. Each
//! layer is read once, as a stream, and verified as it is read: the blob
//! against its descriptor, the uncompressed tar against its diff_id.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use tar::EntryType;

use super::digest::{Mismatch, VerifyingReader};
use super::layout::blob_mismatch;
use super::staging::{
    entry_components, whiteout, EntryError, Meta, NodeKind, StagingTree, Whiteout,
};
use super::{human_size, Compression, Image, ImageError, Layer, Result};

/// Read size for layer blobs.
pub(crate) const READ_BUFFER: usize = 256 << 10;

/// Unpacks all layers of `image` into the empty directory `staging`.
pub(crate) fn unpack_layers(image: &Image, staging: &Path, progress: &dyn Fn(&str)) -> Result<()> {
    let mut tree = StagingTree::new(staging);
    let mut dir_times = HashMap::new();
    let count = image.layers.len();
    for (i, layer) in image.layers.iter().enumerate() {
        let message = format!(
            "unpacking layer {}/{count} ({})",
            i + 1,
            human_size(layer.size())
        );
        tracing::info!(image = %image.name, layer = %layer.descriptor.digest(), "{message}");
        progress(&message);
        apply_layer(image, layer, i + 1, &mut tree, &mut dir_times)?;
    }
    tree.set_dir_times(&dir_times)
        .map_err(|source| ImageError::Cache {
            action: "set directory times in",
            path: staging.to_path_buf(),
            source,
        })
}

/// The decompressing stage of a layer stream.
enum Decoder<R: Read> {
    Plain(BufReader<R>),
    Gzip(MultiGzDecoder<R>),
}

impl<R: Read> Decoder<R> {
    fn into_inner(self) -> R {
        match self {
            Self::Plain(r) => r.into_inner(),
            Self::Gzip(r) => r.into_inner(),
        }
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(r) => r.read(buf),
            Self::Gzip(r) => r.read(buf),
        }
    }
}

/// Reads one layer blob → (gunzip) → tar entries, verifying both streams.
/// A damaged blob is reported as a digest mismatch even when the damage
/// first shows up as bad gzip or tar data.
fn apply_layer(
    image: &Image,
    layer: &Layer,
    number: usize,
    tree: &mut StagingTree,
    dir_times: &mut HashMap<PathBuf, (i64, u32)>,
) -> Result<()> {
    let file = image.store.open_blob("layer", layer.digest)?;
    let blob = VerifyingReader::new(
        BufReader::with_capacity(READ_BUFFER, file),
        layer.digest,
        Some(layer.size()),
    );
    let decoder = match layer.compression {
        Compression::None => Decoder::Plain(BufReader::with_capacity(READ_BUFFER, blob)),
        Compression::Gzip => Decoder::Gzip(MultiGzDecoder::new(blob)),
    };
    let mut archive = tar::Archive::new(VerifyingReader::new(decoder, layer.diff, None));
    let applied = apply_entries(&mut archive, number, tree, dir_times);

    let mut diff = archive.into_inner();
    let diff_check = match applied {
        Ok(()) => diff.finish(),
        Err(_) => Ok(()),
    };
    let mut blob = diff.into_inner().into_inner();
    blob.finish()
        .map_err(|m| blob_mismatch("layer", layer.digest, layer.size(), m))?;
    applied?;
    diff_check.map_err(|m| match m {
        Mismatch::Io(source) => ImageError::LayerRead {
            layer: number,
            source,
        },
        Mismatch::Digest | Mismatch::Size { .. } => ImageError::DiffIdMismatch {
            layer: number,
            diff_id: layer.diff_id.clone(),
        },
    })
}

/// What one layer has put in the tree so far: whiteouts do not hide it.
#[derive(Debug, Default)]
struct LayerPaths(HashSet<PathBuf>);

impl LayerPaths {
    /// Records `rel` and its parents.
    fn add(&mut self, rel: &Path) {
        for ancestor in rel.ancestors() {
            if ancestor.as_os_str().is_empty() || !self.0.insert(ancestor.to_path_buf()) {
                break;
            }
        }
    }
}

fn apply_entries<R: Read>(
    archive: &mut tar::Archive<R>,
    number: usize,
    tree: &mut StagingTree,
    dir_times: &mut HashMap<PathBuf, (i64, u32)>,
) -> Result<()> {
    let read_error = |source| ImageError::LayerRead {
        layer: number,
        source,
    };
    let mut added = LayerPaths::default();
    for entry in archive.entries().map_err(read_error)? {
        let mut entry = entry.map_err(read_error)?;
        let path = entry.path().map_err(read_error)?.into_owned();
        let entry_error = |e: EntryError| match e {
            EntryError::Refused(reason) => ImageError::BadEntry {
                layer: number,
                entry: path.display().to_string(),
                reason,
            },
            EntryError::Io(source) => ImageError::Unpack {
                layer: number,
                entry: path.display().to_string(),
                source,
            },
        };
        apply_entry(&mut entry, &path, tree, &mut added, dir_times).map_err(|e| match e {
            ApplyError::Entry(e) => entry_error(e),
            ApplyError::Read(source) => read_error(source),
        })?;
    }
    Ok(())
}

/// An entry failed either in the tree or while reading the layer stream.
enum ApplyError {
    Entry(EntryError),
    Read(io::Error),
}

impl From<EntryError> for ApplyError {
    fn from(e: EntryError) -> Self {
        Self::Entry(e)
    }
}

impl From<io::Error> for ApplyError {
    fn from(e: io::Error) -> Self {
        Self::Entry(EntryError::Io(e))
    }
}

fn apply_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    path: &Path,
    tree: &mut StagingTree,
    added: &mut LayerPaths,
    dir_times: &mut HashMap<PathBuf, (i64, u32)>,
) -> std::result::Result<(), ApplyError> {
    let mut components = entry_components(path)?;
    let kind = entry.header().entry_type();
    let Some(name) = components.pop() else {
        // The root itself ("./"): only its metadata matters.
        if kind.is_dir() {
            let meta = entry_meta(entry).map_err(ApplyError::Read)?;
            tree.create_dir(Path::new(""), &meta)?;
            dir_times.insert(PathBuf::new(), meta.mtime);
        }
        return Ok(());
    };

    if let Some(wh) = whiteout(&name) {
        let Some(parent) = tree.resolve_dir(&components, false)? else {
            return Ok(());
        };
        match wh {
            Whiteout::Opaque => tree.make_opaque(&parent, &added.0)?,
            Whiteout::Remove(hidden) => {
                if hidden.is_empty() || hidden == "." || hidden == ".." {
                    return Err(EntryError::Refused("is not a valid whiteout".into()).into());
                }
                let target = parent.join(hidden);
                if !added.0.contains(&target) {
                    tree.remove(&target)?;
                }
            }
            Whiteout::Other => {
                tracing::debug!(entry = %path.display(), "ignoring whiteout metadata")
            }
        }
        return Ok(());
    }

    let parent = tree
        .resolve_dir(&components, true)?
        .ok_or_else(|| EntryError::Refused("has no parent directory".into()))?;
    let rel = parent.join(&name);
    match kind {
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
            let meta = entry_meta(entry).map_err(ApplyError::Read)?;
            tree.create_file(&rel, entry, &meta).map_err(|e| {
                // A failure reading the stream is the layer's fault, not the tree's.
                if e.kind() == io::ErrorKind::InvalidData
                    || e.kind() == io::ErrorKind::UnexpectedEof
                {
                    ApplyError::Read(e)
                } else {
                    ApplyError::Entry(EntryError::Io(e))
                }
            })?;
        }
        EntryType::Directory => {
            let meta = entry_meta(entry).map_err(ApplyError::Read)?;
            tree.create_dir(&rel, &meta)?;
            dir_times.insert(rel.clone(), meta.mtime);
        }
        EntryType::Symlink => {
            let meta = entry_meta(entry).map_err(ApplyError::Read)?;
            let target = link_name(entry)?;
            tree.create_symlink(&rel, &target, &meta)?;
        }
        EntryType::Link => {
            let target = link_name(entry)?;
            let mut target_components = entry_components(&target)?;
            let target_name = target_components
                .pop()
                .ok_or_else(|| EntryError::Refused("is a hard link to the root".into()))?;
            let target_parent = tree
                .resolve_dir(&target_components, false)?
                .ok_or_else(|| {
                    EntryError::Refused(format!(
                        "is a hard link to {}, which does not exist",
                        target.display()
                    ))
                })?;
            tree.create_hardlink(&rel, &target_parent.join(target_name))?;
        }
        EntryType::Char | EntryType::Block | EntryType::Fifo => {
            let meta = entry_meta(entry).map_err(ApplyError::Read)?;
            let node = match kind {
                EntryType::Char => NodeKind::Char,
                EntryType::Block => NodeKind::Block,
                _ => NodeKind::Fifo,
            };
            let header = entry.header();
            let device = (
                header.device_major().ok().flatten().unwrap_or(0),
                header.device_minor().ok().flatten().unwrap_or(0),
            );
            if !tree.create_node(&rel, node, device, &meta)? {
                return Ok(());
            }
        }
        other => {
            tracing::warn!(entry = %path.display(), kind = ?other, "skipping unsupported tar entry");
            return Ok(());
        }
    }
    added.add(&rel);
    Ok(())
}

fn link_name<R: Read>(entry: &tar::Entry<'_, R>) -> std::result::Result<PathBuf, ApplyError> {
    match entry.link_name().map_err(ApplyError::Read)? {
        Some(name) if !name.as_os_str().is_empty() => Ok(name.into_owned()),
        _ => Err(EntryError::Refused("is a link without a target".into()).into()),
    }
}

/// The entry's owner, mode, time and xattrs; PAX records override the
/// header's fields.
fn entry_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Meta> {
    let header = entry.header();
    let invalid = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("entry has an invalid {what}"),
        )
    };
    let mut uid = header.uid()?;
    let mut gid = header.gid()?;
    let mut mtime = (
        i64::try_from(header.mtime()?).map_err(|_| invalid("mtime"))?,
        0u32,
    );
    let mode = header.mode()?;
    let mut xattrs = Vec::new();
    if let Some(extensions) = entry.pax_extensions()? {
        for extension in extensions {
            let extension = extension?;
            let Ok(key) = extension.key() else { continue };
            let value = extension.value().unwrap_or("");
            match key {
                "uid" => uid = value.parse().map_err(|_| invalid("uid"))?,
                "gid" => gid = value.parse().map_err(|_| invalid("gid"))?,
                "mtime" => mtime = parse_pax_time(value).ok_or_else(|| invalid("mtime"))?,
                _ => {
                    if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                        xattrs.push((OsString::from(name), extension.value_bytes().to_vec()));
                    }
                }
            }
        }
    }
    Ok(Meta {
        mode,
        uid: u32::try_from(uid).map_err(|_| invalid("uid"))?,
        gid: u32::try_from(gid).map_err(|_| invalid("gid"))?,
        mtime,
        xattrs,
    })
}

/// A PAX time: seconds, optionally with a fraction (`1700000000.123`).
fn parse_pax_time(value: &str) -> Option<(i64, u32)> {
    let (secs, fraction) = value.split_once('.').unwrap_or((value, ""));
    let secs: i64 = secs.parse().ok()?;
    let digits: String = fraction.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let nanos = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    // A negative time with a fraction counts the fraction towards zero.
    Some((secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::super::testing::{self, TestImage};
    use super::super::{open, ImageError};
    use super::*;
    use crate::image::staging::read;

    fn unpack(img: &TestImage) -> (tempfile::TempDir, Result<()>) {
        let tmp = tempfile::tempdir().unwrap();
        let source = img.write_dir(tmp.path());
        let image = open(&source).unwrap();
        let staging = tmp.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        let result = unpack_layers(&image, &staging, &|_| {});
        (tmp, result)
    }

    #[test]
    fn whiteouts_delete_from_lower_layers_only() {
        let img = TestImage::new(vec![
            testing::layer(|l| {
                l.dir("data");
                l.file("data/keep.txt", "keep");
                l.file("data/gone.txt", "gone");
                l.dir("data/sub");
                l.file("data/sub/deep.txt", "deep");
            }),
            testing::layer(|l| {
                l.whiteout("data/gone.txt");
                l.whiteout("data/sub");
                // Same-layer content is not hidden by its own whiteout.
                l.file("data/fresh.txt", "fresh");
                l.whiteout("data/fresh.txt");
            }),
        ]);
        let (tmp, result) = unpack(&img);
        result.unwrap();
        let root = tmp.path().join("staging");
        assert_eq!(read(&root, "data/keep.txt").as_deref(), Some("keep"));
        assert_eq!(read(&root, "data/fresh.txt").as_deref(), Some("fresh"));
        assert!(!root.join("data/gone.txt").exists());
        assert!(!root.join("data/sub").exists());
        assert!(!root.join("data/.wh.gone.txt").exists());
    }

    #[test]
    fn opaque_directories_hide_lower_contents_and_keep_their_own() {
        let img = TestImage::new(vec![
            testing::layer(|l| {
                l.dir("opaque");
                l.file("opaque/old1.txt", "old1");
                l.dir("opaque/sub");
                l.file("opaque/sub/old2.txt", "old2");
            }),
            testing::layer(|l| {
                l.dir("opaque");
                // Before the marker: kept, and so is the directory it is in.
                l.file("opaque/sub/new1.txt", "new1");
                l.opaque("opaque");
                l.file("opaque/new2.txt", "new2");
            }),
        ]);
        let (tmp, result) = unpack(&img);
        result.unwrap();
        let root = tmp.path().join("staging");
        let mut names: Vec<String> = walk(&root.join("opaque"));
        names.sort();
        assert_eq!(names, ["new2.txt", "sub", "sub/new1.txt"]);
    }

    fn walk(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().unwrap().is_dir() {
                out.extend(
                    walk(&entry.path())
                        .into_iter()
                        .map(|n| format!("{name}/{n}")),
                );
            }
            out.push(name);
        }
        out
    }

    #[test]
    fn links_and_replacements() {
        let img = TestImage::new(vec![
            testing::layer(|l| {
                l.file("bin/busybox", "bb");
                l.symlink("bin/sh", "busybox");
                l.hardlink("bin/ls", "bin/busybox");
                l.dir("was-dir");
                l.file("was-dir/x", "x");
                l.file("was-file", "f");
            }),
            testing::layer(|l| {
                l.file("was-dir", "now a file");
                l.dir("was-file");
            }),
        ]);
        let (tmp, result) = unpack(&img);
        result.unwrap();
        let root = tmp.path().join("staging");
        assert_eq!(
            std::fs::read_link(root.join("bin/sh")).unwrap(),
            PathBuf::from("busybox")
        );
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &str| std::fs::metadata(root.join(p)).unwrap().ino();
        assert_eq!(ino("bin/ls"), ino("bin/busybox"));
        assert_eq!(read(&root, "was-dir").as_deref(), Some("now a file"));
        assert!(root.join("was-file").is_dir());
    }

    #[test]
    fn traversal_is_refused() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                testing::raw_layer(&[("../escape.txt", b'0', "", "x")]),
                "layer 1: entry ../escape.txt climbs out of the image root with ..",
            ),
            (
                testing::raw_layer(&[("/etc/evil", b'0', "", "x")]),
                "layer 1: entry /etc/evil is an absolute path",
            ),
            (
                testing::raw_layer(&[("up", b'2', "../../..", ""), ("up/tmp/evil", b'0', "", "x")]),
                "layer 1: entry up/tmp/evil goes through a symlink that points outside the image root",
            ),
            (
                testing::raw_layer(&[("hl", b'1', "../outside", "")]),
                "layer 1: entry hl climbs out of the image root with ..",
            ),
        ];
        for (layer, expected) in cases {
            let img = TestImage::new(vec![layer]);
            let (tmp, result) = unpack(&img);
            let err = result.unwrap_err();
            assert!(matches!(err, ImageError::BadEntry { .. }), "{err}");
            assert_eq!(err.to_string(), expected);
            assert!(!tmp.path().join("escape.txt").exists());
        }
    }

    #[test]
    fn absolute_symlinks_resolve_inside_the_root() {
        let img = TestImage::new(vec![testing::raw_layer(&[
            ("etc", b'2', "/real-etc", ""),
            ("real-etc/", b'5', "", ""),
            ("etc/passwd", b'0', "", "image passwd"),
        ])]);
        let (tmp, result) = unpack(&img);
        result.unwrap();
        let root = tmp.path().join("staging");
        assert_eq!(
            read(&root, "real-etc/passwd").as_deref(),
            Some("image passwd")
        );
    }

    #[test]
    fn corrupt_layer_is_a_digest_mismatch() {
        let mut img = TestImage::new(vec![testing::layer(|l| {
            l.file("a", &"some content ".repeat(1000));
        })]);
        let digest = img.layer_digests()[0];
        let middle = img.blob_len(0) / 2;
        img.corrupt_layer(0, middle);
        let (tmp, result) = unpack(&img);
        assert_eq!(
            result.unwrap_err().to_string(),
            format!("layer {digest} does not match its digest")
        );
        drop(tmp);
    }

    #[test]
    fn wrong_diff_id_is_named() {
        let mut img = TestImage::new(vec![testing::layer(|l| l.file("a", "1"))]);
        img.diff_ids[0] = format!("sha256:{}", "1".repeat(64));
        let (_tmp, result) = unpack(&img);
        assert_eq!(
            result.unwrap_err().to_string(),
            format!(
                "layer 1 does not match its diff_id sha256:{}",
                "1".repeat(64)
            )
        );
    }

    #[test]
    fn uncompressed_layers_unpack() {
        let mut img = TestImage::new(vec![testing::layer(|l| l.file("plain", "p"))]);
        img.gzip = false;
        let (tmp, result) = unpack(&img);
        result.unwrap();
        assert_eq!(
            read(&tmp.path().join("staging"), "plain").as_deref(),
            Some("p")
        );
    }

    #[test]
    fn devices_fifos_and_pax_records() {
        let img = TestImage::new(vec![testing::layer(|l| {
            l.dir("dev");
            l.node("dev/null", Some((1, 3)));
            l.node("fifo", None);
            l.file_with_pax(
                "owned",
                "x",
                &[
                    ("uid", b"4000000"),
                    ("gid", b"7"),
                    ("mtime", b"1700000000.25"),
                    ("SCHILY.xattr.user.capsid", b"yes"),
                ],
            );
        })]);
        let (tmp, result) = unpack(&img);
        result.unwrap();
        let root = tmp.path().join("staging");
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap();
        assert!(meta("fifo").file_type().is_fifo());
        assert_eq!(meta("fifo").mode() & 0o777, 0o620);
        let owned = meta("owned");
        assert_eq!(
            (owned.mtime(), owned.mtime_nsec()),
            (1_700_000_000, 250_000_000)
        );
        if nix::unistd::geteuid().is_root() {
            let null = meta("dev/null");
            assert!(null.file_type().is_char_device());
            assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
            assert_eq!((owned.uid(), owned.gid()), (4_000_000, 7));
        }
        // A file system without user xattrs answers with an error.
        if let Ok(value) = xattr::get(root.join("owned"), "user.capsid") {
            assert_eq!(value.as_deref(), Some(&b"yes"[..]));
        }
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time("12"), Some((12, 0)));
        assert_eq!(parse_pax_time("12.5"), Some((12, 500_000_000)));
        assert_eq!(parse_pax_time("12.x"), None);
    }
}
