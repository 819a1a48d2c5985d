//! OCI images as read-only rootfs disks: finding an image (a bundled name,
//! an OCI image layout directory or an OCI archive), reading its index,
//! manifest and config with every blob verified against its digest, and
//! turning its layers into one cached erofs (or ext4) disk image.
//!
//! ```text
//! resolve("busybox", images_dir) → ImageSource → open() → Image
//! RootfsCache::prepare(&image) → PreparedRootfs { path, fs_type, cache_hit }
//! prepare("busybox", images_dir, &cache) → PreparedImage   (all three steps)
//! ```
//!
//! The OCI image spec sections this follows: "Image Layout", "Image Index",
//! "Image Manifest", "Image Configuration" (rootfs.diff_ids) and
//! "Image Layer Filesystem Changeset" (whiteouts, opaque directories).

mod cache;
mod digest;
mod layout;
mod mkfs;
mod staging;
#[cfg(test)]
mod testing;
mod unpack;

use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration};

pub use cache::{EvictionReport, PreparedRootfs, RootfsCache};
pub use layout::open;
pub use mkfs::FsType;

use digest::Sha256Digest;
use layout::BlobStore;

/// Errors finding, reading or converting an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The cache directory is not private to capsid.
    #[error(transparent)]
    Private(#[from] crate::private_dir::PrivateDirError),
    /// A bare name that is not among the bundled images.
    #[error("unknown image {name}: no {name}.tar or {name}/ in {} ({available})", dir.display())]
    UnknownImage {
        /// The name asked for.
        name: String,
        /// Where bundled images are.
        dir: PathBuf,
        /// The bundled images that do exist, for the message.
        available: String,
    },
    /// A path that does not exist.
    #[error("no image at {}", .0.display())]
    NoSuchPath(PathBuf),
    /// A path that exists but holds no OCI image.
    #[error("{} is neither an OCI image layout directory nor an OCI archive: {reason}", path.display())]
    NotAnImage {
        /// The path.
        path: PathBuf,
        /// What is missing or wrong.
        reason: String,
    },
    /// Reading the image's files failed.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A descriptor names a blob the image does not hold.
    #[error("{what} {digest} is missing from the image")]
    MissingBlob {
        /// "layer", "config", "manifest" or "index".
        what: &'static str,
        /// The blob's digest.
        digest: String,
    },
    /// A blob's content does not hash to its digest.
    #[error("{what} {digest} does not match its digest")]
    DigestMismatch {
        /// "layer", "config", "manifest" or "index".
        what: &'static str,
        /// The digest its descriptor promises.
        digest: String,
    },
    /// A blob is not as long as its descriptor says.
    #[error("{what} {digest} has {actual} bytes where its descriptor says {expected}")]
    SizeMismatch {
        /// "layer", "config", "manifest" or "index".
        what: &'static str,
        /// The blob's digest.
        digest: String,
        /// The size in the descriptor.
        expected: u64,
        /// The size found (at most one byte past `expected`).
        actual: u64,
    },
    /// A layer's uncompressed content differs from the config's diff_id.
    #[error("layer {layer} does not match its diff_id {diff_id}")]
    DiffIdMismatch {
        /// The layer's position, from 1.
        layer: usize,
        /// The diff_id the config promises.
        diff_id: String,
    },
    /// A JSON document of the image does not parse.
    #[error("invalid {what} {name}")]
    Parse {
        /// "index", "manifest" or "config".
        what: &'static str,
        /// Its digest or file name.
        name: String,
        /// What the parser said.
        #[source]
        source: oci_spec::OciSpecError,
    },
    /// The image is well-formed JSON but not something capsid can run.
    #[error("invalid image: {0}")]
    Invalid(String),
    /// A layer compressed with something other than gzip.
    #[error("unsupported layer compression {0} (capsid reads tar and tar+gzip layers)")]
    UnsupportedCompression(String),
    /// A layer's tar or gzip stream is damaged.
    #[error("cannot read layer {layer}")]
    LayerRead {
        /// The layer's position, from 1.
        layer: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A layer entry that must not be unpacked (path traversal and the like).
    #[error("layer {layer}: entry {entry} {reason}")]
    BadEntry {
        /// The layer's position, from 1.
        layer: usize,
        /// The entry's path as stored.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Writing an entry into the staging directory failed.
    #[error("layer {layer}: cannot unpack {entry}")]
    Unpack {
        /// The layer's position, from 1.
        layer: usize,
        /// The entry's path as stored.
        entry: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No tool to build a filesystem image is installed.
    #[error("neither mkfs.erofs nor mke2fs is installed (apt-get install erofs-utils)")]
    NoMkfs,
    /// Building the filesystem image failed.
    #[error("{tool} failed ({status}): {output}")]
    Mkfs {
        /// The tool.
        tool: String,
        /// Its exit status.
        status: String,
        /// The last lines it printed.
        output: String,
    },
    /// Working in the cache directory failed.
    #[error("cannot {action} {}", path.display())]
    Cache {
        /// What was being done ("create", "lock", "remove", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Result of image operations.
pub type Result<T> = std::result::Result<T, ImageError>;

/// How an image is stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    /// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/`).
    Layout,
    /// The same layout as an uncompressed tar archive.
    Archive,
}

/// Where an image is: the result of [`resolve`], the input of [`open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSource {
    /// A short name for messages: the bundled name or the file's stem.
    pub name: String,
    /// The layout directory or archive.
    pub path: PathBuf,
    /// Which of the two it is.
    pub format: SourceFormat,
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar (`application/vnd.oci.image.layer.v1.tar`).
    None,
    /// gzip (`…tar+gzip`, and Docker's `…rootfs.diff.tar.gzip`).
    Gzip,
}

/// One layer of an image, in order from the base up.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The layer's descriptor from the manifest.
    pub descriptor: Descriptor,
    /// The digest of its uncompressed tar (the config's `rootfs.diff_ids`).
    pub diff_id: String,
    /// How the blob is compressed.
    pub compression: Compression,
    digest: Sha256Digest,
    diff: Sha256Digest,
}

impl Layer {
    /// The blob's size in bytes (compressed).
    pub fn size(&self) -> u64 {
        self.descriptor.size()
    }
}

/// An opened image: its configuration and layers, ready to be converted.
#[derive(Debug)]
pub struct Image {
    /// A short name for messages.
    pub name: String,
    /// The image's configuration: env, cmd, entrypoint, working dir, user.
    pub config: ImageConfiguration,
    /// The layers, base first.
    pub layers: Vec<Layer>,
    store: BlobStore,
}

impl Image {
    /// The cache key of this image's flattened rootfs: the sha256 of its
    /// ordered chain of layers, each named by its blob digest, its diff_id
    /// and its compression, so the same layers give the same disk whatever
    /// the image is called.
    ///
    /// The blob digests are in the key so that a cache hit can be checked
    /// cheaply: a disk is only ever built from blobs verified against both
    /// digests, so an image whose blobs hash to the key's blob digests holds
    /// exactly the bytes that disk was made from, and
    /// [`RootfsCache::prepare`] hashes them before it returns a hit (see
    /// `verify_layer_blobs`). With diff_ids alone, a hit would have to
    /// decompress every layer to prove the image holds it.
    pub fn chain_key(&self) -> String {
        chain_key(
            self.layers
                .iter()
                .map(|l| (l.digest, l.diff, l.compression)),
        )
    }
}

/// Bumped when the disk layout capsid builds or the key's text changes, so
/// old disks are not reused. v2: blob digests and compression joined the
/// diff_ids (v1 keyed by diff_ids alone, which a hit could not check
/// without decompressing the layers).
const CHAIN_KEY_VERSION: &str = "capsid-rootfs-v2";

fn chain_key(layers: impl Iterator<Item = (Sha256Digest, Sha256Digest, Compression)>) -> String {
    let mut text = String::from(CHAIN_KEY_VERSION);
    for (blob, diff, compression) in layers {
        let compression = match compression {
            Compression::None => "tar",
            Compression::Gzip => "tar+gzip",
        };
        text.push_str(&format!("\n{blob} {diff} {compression}"));
    }
    Sha256Digest::of(text.as_bytes()).hex()
}

/// An image ready for a sandbox: its configuration and its cached rootfs
/// disk (held in the cache until this is dropped).
#[derive(Debug)]
pub struct PreparedImage {
    /// The image's configuration: env, cmd, entrypoint, working dir, user.
    pub config: ImageConfiguration,
    /// The read-only disk of its flattened layers.
    pub rootfs: PreparedRootfs,
}

/// Finds `reference` (see [`resolve`]), opens it and converts it to a
/// cached disk, or finds that disk in `cache`. Blocks: call it from a
/// blocking task.
pub fn prepare(
    reference: &str,
    images_dir: &Path,
    cache: &RootfsCache,
    progress: &dyn Fn(&str),
) -> Result<PreparedImage> {
    let source = resolve(reference, images_dir)?;
    let image = open(&source)?;
    let rootfs = cache.prepare(&image, progress)?;
    Ok(PreparedImage {
        config: image.config,
        rootfs,
    })
}

/// Unpacks `image` into the empty directory `dir`, its layers applied in
/// order and verified as they are read: the image's rootfs as a tree, for
/// a sandbox that takes it over virtio-fs (a pooled one has no disk for
/// it). Not cached: each call unpacks.
pub fn unpack(image: &Image, dir: &Path, progress: &dyn Fn(&str)) -> Result<()> {
    unpack::unpack_layers(image, dir, progress)
}

/// Unpacks the layers of `image` into the empty directory `staging`, as
/// [`RootfsCache::prepare`] does before it builds the disk. Public only as
/// the entry point of the `oci_unpack` fuzz target (fuzz/), which needs the
/// unpacking without mkfs and the cache. Not part of the API.
#[doc(hidden)]
pub fn fuzz_unpack_layers(image: &Image, staging: &Path) -> Result<()> {
    unpack::unpack_layers(image, staging, &|_| {})
}

/// Finds an image: a bare name (`busybox`, or `busybox:latest`) is a bundled
/// image, `<images_dir>/<name>/` or `<images_dir>/<name>.tar`; anything with
/// a slash, or ending in `.tar`, is a path to a layout directory or archive.
pub fn resolve(reference: &str, images_dir: &Path) -> Result<ImageSource> {
    let is_path = reference.contains('/') || reference.ends_with(".tar") || reference == ".";
    if is_path {
        return source_at(Path::new(reference));
    }
    // Bundled images carry only the tag `latest`.
    let reference = reference.strip_suffix(":latest").unwrap_or(reference);
    let valid_name = !reference.is_empty()
        && !reference.starts_with('.')
        && reference
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    let dir = images_dir.join(reference);
    let archive = images_dir.join(format!("{reference}.tar"));
    if valid_name && dir.is_dir() {
        return source_at(&dir).map(|s| named(s, reference));
    }
    if valid_name && archive.is_file() {
        return source_at(&archive).map(|s| named(s, reference));
    }
    Err(ImageError::UnknownImage {
        name: reference.to_string(),
        dir: images_dir.to_path_buf(),
        available: bundled_names(images_dir),
    })
}

fn named(source: ImageSource, name: &str) -> ImageSource {
    ImageSource {
        name: name.to_string(),
        ..source
    }
}

fn source_at(path: &Path) -> Result<ImageSource> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ImageError::NoSuchPath(path.to_path_buf()))
        }
        Err(source) => {
            return Err(ImageError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let format = if meta.is_dir() {
        if !path.join("index.json").is_file() {
            return Err(ImageError::NotAnImage {
                path: path.to_path_buf(),
                reason: "the directory has no index.json".into(),
            });
        }
        SourceFormat::Layout
    } else if meta.is_file() {
        SourceFormat::Archive
    } else {
        return Err(ImageError::NotAnImage {
            path: path.to_path_buf(),
            reason: "not a directory or a regular file".into(),
        });
    };
    let stem = path
        .canonicalize()
        .ok()
        .as_deref()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().trim_end_matches(".tar").to_string())
        .unwrap_or_else(|| path.display().to_string());
    Ok(ImageSource {
        name: stem,
        path: path.to_path_buf(),
        format,
    })
}

/// The bundled image names in `dir`, for "unknown image" messages.
fn bundled_names(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if let Some(stem) = name.strip_suffix(".tar") {
                path.is_file().then(|| stem.to_string())
            } else {
                path.join("index.json").is_file().then_some(name)
            }
        })
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        "it holds no images".into()
    } else {
        format!("bundled: {}", names.join(", "))
    }
}

/// `1.2 MiB`, `340 KiB`, `12 B`: sizes for progress lines.
pub(crate) fn human_size(bytes: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    const GIB: u64 = 1024 * MIB;
    // Precision does not matter here: these are progress messages.
    #[allow(clippy::cast_precision_loss)]
    let scaled = |unit: u64| bytes as f64 / unit as f64;
    if bytes >= GIB {
        format!("{:.1} GiB", scaled(GIB))
    } else if bytes >= MIB {
        format!("{:.1} MiB", scaled(MIB))
    } else if bytes >= KIB {
        format!("{:.0} KiB", scaled(KIB))
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout_dir(root: &Path, name: &str) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("index.json"), "{}").unwrap();
        dir
    }

    #[test]
    fn bundled_names_resolve_to_a_directory_or_an_archive() {
        let tmp = tempfile::tempdir().unwrap();
        layout_dir(tmp.path(), "dir-image");
        std::fs::write(tmp.path().join("tar-image.tar"), b"").unwrap();

        let s = resolve("dir-image", tmp.path()).unwrap();
        assert_eq!(s.format, SourceFormat::Layout);
        assert_eq!(s.name, "dir-image");
        let s = resolve("tar-image", tmp.path()).unwrap();
        assert_eq!(s.format, SourceFormat::Archive);
        assert_eq!(s.path, tmp.path().join("tar-image.tar"));
        let s = resolve("tar-image:latest", tmp.path()).unwrap();
        assert_eq!(
            (s.name.as_str(), s.format),
            ("tar-image", SourceFormat::Archive)
        );
    }

    #[test]
    fn unknown_name_lists_what_is_bundled() {
        let tmp = tempfile::tempdir().unwrap();
        layout_dir(tmp.path(), "busybox");
        std::fs::write(tmp.path().join("layered.tar"), b"").unwrap();
        let err = resolve("busybux", tmp.path()).unwrap_err().to_string();
        assert!(
            err.starts_with("unknown image busybux: no busybux.tar or busybux/ in"),
            "{err}"
        );
        assert!(err.ends_with("(bundled: busybox, layered)"), "{err}");
        // A name cannot reach outside the images directory.
        assert!(matches!(
            resolve("..", tmp.path()),
            Err(ImageError::UnknownImage { .. })
        ));
    }

    #[test]
    fn paths_are_used_directly() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = layout_dir(tmp.path(), "img");
        let s = resolve(dir.to_str().unwrap(), Path::new("/nonexistent")).unwrap();
        assert_eq!((s.format, s.name.as_str()), (SourceFormat::Layout, "img"));

        let missing = tmp.path().join("nope.tar");
        let err = resolve(missing.to_str().unwrap(), tmp.path()).unwrap_err();
        assert!(matches!(err, ImageError::NoSuchPath(_)), "{err}");

        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let err = resolve(empty.to_str().unwrap(), tmp.path()).unwrap_err();
        assert!(
            err.to_string().ends_with("the directory has no index.json"),
            "{err}"
        );
    }

    #[test]
    fn chain_key_is_stable() {
        let a = (
            Sha256Digest::of(b"blob a"),
            Sha256Digest::of(b"layer a"),
            Compression::Gzip,
        );
        let b = (
            Sha256Digest::of(b"blob b"),
            Sha256Digest::of(b"layer b"),
            Compression::Gzip,
        );
        let key = |layers: &[(Sha256Digest, Sha256Digest, Compression)]| {
            chain_key(layers.iter().copied())
        };
        // The key names cached disks: changing it orphans every cached disk.
        assert_eq!(
            key(&[a, b]),
            "826671632c2cb4c3c47f45b3e0c49d91358cb4a632d3b809aa4212daff9bb0bf"
        );
        assert_ne!(key(&[a, b]), key(&[b, a]));
        assert_ne!(key(&[a]), key(&[a, b]));
        // Every part of a layer counts: the same diff_id from another blob
        // is another disk, so a hit can be checked on the blobs alone.
        assert_ne!(key(&[a]), key(&[(b.0, a.1, a.2)]));
        assert_ne!(key(&[a]), key(&[(a.0, b.1, a.2)]));
        assert_ne!(key(&[a]), key(&[(a.0, a.1, Compression::None)]));
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_size(12), "12 B");
        assert_eq!(human_size(340 * 1024), "340 KiB");
        assert_eq!(human_size(1_258_291), "1.2 MiB");
    }
}
