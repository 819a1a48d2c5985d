//! Reading OCI image layouts (OCI image spec, "Image Layout"), as a
//! directory or as an uncompressed tar of one (an OCI archive): index →
//! manifest (linux/amd64) → config and layers, every blob checked against
//! its descriptor's digest and size.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};

use super::digest::{Mismatch, Sha256Digest, VerifyingReader};
use super::{Compression, Image, ImageError, ImageSource, Layer, Result, SourceFormat};

/// JSON documents (index, manifest, config) larger than this are refused.
const MAX_JSON_SIZE: u64 = 4 << 20;

const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The platform capsid's guests run.
const OS: &str = "linux";
const ARCH: &str = "amd64";

/// Where an image's blobs are.
#[derive(Debug)]
pub(crate) enum BlobStore {
    /// A layout directory.
    Dir(PathBuf),
    /// An OCI archive: each member's (data offset, size), by path.
    Archive {
        /// The tar file.
        path: PathBuf,
        /// Regular files in it, by normalized path.
        files: HashMap<String, (u64, u64)>,
    },
}

impl BlobStore {
    fn open(source: &ImageSource) -> Result<Self> {
        match source.format {
            SourceFormat::Layout => Ok(Self::Dir(source.path.clone())),
            SourceFormat::Archive => Self::index_archive(&source.path),
        }
    }

    /// Lists an archive's members without reading their data.
    fn index_archive(path: &Path) -> Result<Self> {
        let not_an_image = |reason: String| ImageError::NotAnImage {
            path: path.to_path_buf(),
            reason,
        };
        let mut file = File::open(path).map_err(|source| ImageError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut magic = [0u8; 2];
        if file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b] {
            return Err(not_an_image(
                "it is gzip-compressed (decompress it first)".into(),
            ));
        }
        file.rewind().map_err(|source| ImageError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut archive = tar::Archive::new(file);
        let mut files = HashMap::new();
        let entries = archive
            .entries_with_seek()
            .map_err(|e| not_a_tar(path, &e))?;
        for entry in entries {
            let entry = entry.map_err(|e| not_a_tar(path, &e))?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = entry.path().map_err(|e| not_a_tar(path, &e))?;
            let name = normalize_member(&name);
            files.insert(name, (entry.raw_file_position(), entry.size()));
        }
        if !files.contains_key("index.json") {
            return Err(not_an_image("the archive has no index.json".into()));
        }
        Ok(Self::Archive {
            path: path.to_path_buf(),
            files,
        })
    }

    fn location(&self) -> &Path {
        match self {
            Self::Dir(path) | Self::Archive { path, .. } => path,
        }
    }

    /// Opens a file of the layout by its path in the layout; `None` if absent.
    fn open_member(&self, member: &str) -> io::Result<Option<io::Take<File>>> {
        match self {
            Self::Dir(dir) => match File::open(dir.join(member)) {
                Ok(file) => Ok(Some(file.take(u64::MAX))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
            Self::Archive { path, files } => {
                let Some(&(offset, size)) = files.get(member) else {
                    return Ok(None);
                };
                let mut file = File::open(path)?;
                file.seek(SeekFrom::Start(offset))?;
                Ok(Some(file.take(size)))
            }
        }
    }

    /// Opens a blob by digest, unverified; the caller wraps it in a
    /// [`VerifyingReader`].
    pub(crate) fn open_blob(
        &self,
        what: &'static str,
        digest: Sha256Digest,
    ) -> Result<io::Take<File>> {
        let member = format!("blobs/sha256/{}", digest.hex());
        match self.open_member(&member) {
            Ok(Some(reader)) => Ok(reader),
            Ok(None) => Err(ImageError::MissingBlob {
                what,
                digest: digest.to_string(),
            }),
            Err(source) => Err(ImageError::Read {
                path: self.location().join(member),
                source,
            }),
        }
    }

    /// Reads a small JSON blob whole, verified.
    fn read_json_blob(&self, what: &'static str, descriptor: &Descriptor) -> Result<Vec<u8>> {
        let digest = descriptor_digest(what, descriptor)?;
        let size = descriptor.size();
        if size > MAX_JSON_SIZE {
            return Err(ImageError::Invalid(format!(
                "{what} {digest} is {size} bytes, more than the {MAX_JSON_SIZE} capsid reads"
            )));
        }
        let mut reader = VerifyingReader::new(self.open_blob(what, digest)?, digest, Some(size));
        let mut data = Vec::new();
        let read = reader.read_to_end(&mut data);
        match (reader.finish(), read) {
            (Err(mismatch), _) => Err(blob_mismatch(what, digest, size, mismatch)),
            (Ok(()), Err(source)) => Err(ImageError::Read {
                path: self.location().to_path_buf(),
                source,
            }),
            (Ok(()), Ok(_)) => Ok(data),
        }
    }

    fn read_index(&self) -> Result<ImageIndex> {
        let reader = match self.open_member("index.json") {
            Ok(Some(reader)) => reader,
            Ok(None) => {
                return Err(ImageError::NotAnImage {
                    path: self.location().to_path_buf(),
                    reason: "no index.json".into(),
                })
            }
            Err(source) => {
                return Err(ImageError::Read {
                    path: self.location().join("index.json"),
                    source,
                })
            }
        };
        let mut data = Vec::new();
        reader
            .take(MAX_JSON_SIZE)
            .read_to_end(&mut data)
            .map_err(|source| ImageError::Read {
                path: self.location().join("index.json"),
                source,
            })?;
        ImageIndex::from_reader(&data[..]).map_err(|source| ImageError::Parse {
            what: "index",
            name: "index.json".into(),
            source,
        })
    }
}

/// Opens an image: reads its index, manifest and config (not its layers).
pub fn open(source: &ImageSource) -> Result<Image> {
    let store = BlobStore::open(source)?;
    let index = store.read_index()?;
    let manifest_desc = select_manifest(&store, &index)?;
    let manifest_data = store.read_json_blob("manifest", &manifest_desc)?;
    let manifest =
        ImageManifest::from_reader(&manifest_data[..]).map_err(|source| ImageError::Parse {
            what: "manifest",
            name: manifest_desc.digest().to_string(),
            source,
        })?;
    let config_data = store.read_json_blob("config", manifest.config())?;
    let config =
        ImageConfiguration::from_reader(&config_data[..]).map_err(|source| ImageError::Parse {
            what: "config",
            name: manifest.config().digest().to_string(),
            source,
        })?;
    let platform = format!("{}/{}", config.os(), config.architecture());
    if platform != format!("{OS}/{ARCH}") {
        return Err(ImageError::Invalid(format!(
            "the image is for {platform}, not {OS}/{ARCH}"
        )));
    }
    let layers = layers(&manifest, &config)?;
    tracing::debug!(
        image = %source.name,
        manifest = %manifest_desc.digest(),
        layers = layers.len(),
        "opened image"
    );
    Ok(Image {
        name: source.name.clone(),
        config,
        layers,
        store,
    })
}

/// Reads every layer blob of `image` through once, checking it against its
/// descriptor's sha256 and size, without decompressing or unpacking it:
/// what a cache hit rests on. The cache key holds each layer's blob digest
/// beside its diff_id ([`Image::chain_key`]), and a disk is only built from
/// blobs verified against both, so blobs that hash to the key's digests
/// are the very bytes the disk was made from.
///
/// The errors are those a conversion gives for the same blob (`layer
/// sha256:… is missing from the image`, `… does not match its digest`),
/// so an image that names layers it does not hold fails alike whether or
/// not their disk is cached.
pub(crate) fn verify_layer_blobs(image: &Image) -> Result<()> {
    let start = std::time::Instant::now();
    let mut bytes = 0;
    for layer in &image.layers {
        let file = image.store.open_blob("layer", layer.digest)?;
        let mut blob = VerifyingReader::new(
            io::BufReader::with_capacity(super::unpack::READ_BUFFER, file),
            layer.digest,
            Some(layer.size()),
        );
        blob.finish()
            .map_err(|m| blob_mismatch("layer", layer.digest, layer.size(), m))?;
        bytes += layer.size();
    }
    tracing::debug!(
        image = %image.name,
        layers = image.layers.len(),
        bytes,
        elapsed_us = start.elapsed().as_micros(),
        "verified layer blobs"
    );
    Ok(())
}

/// The linux/amd64 manifest of an index, following one nested index.
fn select_manifest(store: &BlobStore, index: &ImageIndex) -> Result<Descriptor> {
    let mut chosen = choose_platform(index.manifests())?;
    if is_index(&chosen) {
        let data = store.read_json_blob("index", &chosen)?;
        let nested = ImageIndex::from_reader(&data[..]).map_err(|source| ImageError::Parse {
            what: "index",
            name: chosen.digest().to_string(),
            source,
        })?;
        chosen = choose_platform(nested.manifests())?;
        if is_index(&chosen) {
            return Err(ImageError::Invalid(
                "the index nests image indexes more than one level deep".into(),
            ));
        }
    }
    let media_type = chosen.media_type().to_string();
    if media_type != MT_OCI_MANIFEST && media_type != MT_DOCKER_MANIFEST {
        return Err(ImageError::Invalid(format!(
            "unsupported manifest media type {media_type}"
        )));
    }
    Ok(chosen)
}

fn is_index(descriptor: &Descriptor) -> bool {
    let media_type = descriptor.media_type().to_string();
    media_type == MT_OCI_INDEX || media_type == MT_DOCKER_LIST
}

/// One manifest is taken as it is; among several, the linux/amd64 one.
fn choose_platform(manifests: &[Descriptor]) -> Result<Descriptor> {
    match manifests {
        [] => Err(ImageError::Invalid("the index lists no manifests".into())),
        [only] => Ok(only.clone()),
        many => {
            let platform_of = |d: &Descriptor| {
                d.platform()
                    .as_ref()
                    .map(|p| format!("{}/{}", p.os(), p.architecture()))
            };
            let wanted = format!("{OS}/{ARCH}");
            many.iter()
                .find(|d| platform_of(d).as_deref() == Some(wanted.as_str()))
                .cloned()
                .ok_or_else(|| {
                    let found: Vec<String> = many
                        .iter()
                        .map(|d| platform_of(d).unwrap_or_else(|| "unknown".into()))
                        .collect();
                    ImageError::Invalid(format!(
                        "the index has no {wanted} manifest (it has {})",
                        found.join(", ")
                    ))
                })
        }
    }
}

fn layers(manifest: &ImageManifest, config: &ImageConfiguration) -> Result<Vec<Layer>> {
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers().len() {
        return Err(ImageError::Invalid(format!(
            "the manifest has {} layers but the config lists {} diff_ids",
            manifest.layers().len(),
            diff_ids.len()
        )));
    }
    manifest
        .layers()
        .iter()
        .zip(diff_ids)
        .map(|(descriptor, diff_id)| {
            let diff = Sha256Digest::parse(diff_id).ok_or_else(|| {
                ImageError::Invalid(format!("diff_id {diff_id} is not a sha256 digest"))
            })?;
            Ok(Layer {
                compression: compression(descriptor)?,
                digest: descriptor_digest("layer", descriptor)?,
                diff,
                diff_id: diff_id.clone(),
                descriptor: descriptor.clone(),
            })
        })
        .collect()
}

fn compression(descriptor: &Descriptor) -> Result<Compression> {
    let media_type = descriptor.media_type().to_string();
    let base = media_type
        .strip_prefix("application/vnd.oci.image.layer.")
        .map(|rest| {
            rest.strip_prefix("nondistributable.")
                .unwrap_or(rest)
                .to_string()
        });
    match (base.as_deref(), media_type.as_str()) {
        (Some("v1.tar"), _) | (_, "application/vnd.docker.image.rootfs.diff.tar") => {
            Ok(Compression::None)
        }
        (Some("v1.tar+gzip"), _) | (_, "application/vnd.docker.image.rootfs.diff.tar.gzip") => {
            Ok(Compression::Gzip)
        }
        (Some(other), _) if other.starts_with("v1.tar+") => {
            Err(ImageError::UnsupportedCompression(media_type))
        }
        _ => Err(ImageError::Invalid(format!(
            "unsupported layer media type {media_type}"
        ))),
    }
}

fn descriptor_digest(what: &'static str, descriptor: &Descriptor) -> Result<Sha256Digest> {
    Sha256Digest::parse(descriptor.digest().as_ref()).ok_or_else(|| {
        ImageError::Invalid(format!(
            "{what} digest {} is not a sha256 digest",
            descriptor.digest()
        ))
    })
}

/// The error for a blob that failed verification.
pub(crate) fn blob_mismatch(
    what: &'static str,
    digest: Sha256Digest,
    expected: u64,
    mismatch: Mismatch,
) -> ImageError {
    match mismatch {
        Mismatch::Digest => ImageError::DigestMismatch {
            what,
            digest: digest.to_string(),
        },
        Mismatch::Size { actual } => ImageError::SizeMismatch {
            what,
            digest: digest.to_string(),
            expected,
            actual,
        },
        Mismatch::Io(source) => ImageError::Read {
            path: PathBuf::from(format!("{what} {digest}")),
            source,
        },
    }
}

/// The error for a file tar cannot read; what tar said goes to the debug
/// log (it may quote the file's bytes).
fn not_a_tar(path: &Path, error: &io::Error) -> ImageError {
    tracing::debug!(path = %path.display(), %error, "not a tar archive");
    ImageError::NotAnImage {
        path: path.to_path_buf(),
        reason: "it is not a tar archive".into(),
    }
}

/// `./blobs/sha256/x` and `blobs/sha256/x` are the same member.
fn normalize_member(path: &Path) -> String {
    path.components()
        .filter_map(|c| match c {
            std::path::Component::Normal(part) => Some(part.to_string_lossy()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::super::testing::{self, TestImage};
    use super::*;

    #[test]
    fn opens_a_layout_directory_and_its_archive() {
        let tmp = tempfile::tempdir().unwrap();
        let img = TestImage::new(vec![testing::layer(|l| l.file("a", "1"))]);
        for source in [img.write_dir(tmp.path()), img.write_archive(tmp.path())] {
            let image = open(&source).unwrap();
            assert_eq!(image.layers.len(), 1);
            assert_eq!(image.layers[0].compression, Compression::Gzip);
            assert_eq!(
                image.config.config().as_ref().unwrap().cmd().as_deref(),
                Some(&["/bin/sh".to_string()][..])
            );
        }
    }

    #[test]
    fn missing_and_corrupt_blobs_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let img = TestImage::new(vec![testing::layer(|l| l.file("a", "1"))]);
        let source = img.write_dir(tmp.path());
        let config = img.config_digest();
        let blob = tmp.path().join("img/blobs/sha256").join(config.hex());

        let mut data = std::fs::read(&blob).unwrap();
        data[10] ^= 1;
        std::fs::write(&blob, &data).unwrap();
        let err = open(&source).unwrap_err().to_string();
        assert_eq!(err, format!("config {config} does not match its digest"));

        std::fs::remove_file(&blob).unwrap();
        let err = open(&source).unwrap_err().to_string();
        assert_eq!(err, format!("config {config} is missing from the image"));
    }

    #[test]
    fn picks_linux_amd64_from_a_multi_platform_index() {
        let tmp = tempfile::tempdir().unwrap();
        let img = TestImage::new(vec![testing::layer(|l| l.file("a", "1"))]);
        let source = img.write_dir(tmp.path());
        let index_path = source.path.join("index.json");
        let mut index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
        let amd64 = index["manifests"][0].clone();
        let mut arm64 = amd64.clone();
        arm64["platform"]["architecture"] = "arm64".into();
        arm64["digest"] = format!("sha256:{}", "0".repeat(64)).into();
        index["manifests"] = serde_json::json!([arm64, amd64]);
        std::fs::write(&index_path, index.to_string()).unwrap();
        assert_eq!(open(&source).unwrap().layers.len(), 1);

        index["manifests"] = serde_json::json!([arm64, arm64]);
        std::fs::write(&index_path, index.to_string()).unwrap();
        let err = open(&source).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid image: the index has no linux/amd64 manifest (it has linux/arm64, linux/arm64)"
        );
    }

    #[test]
    fn zstd_layers_are_refused_clearly() {
        let tmp = tempfile::tempdir().unwrap();
        let mut img = TestImage::new(vec![testing::layer(|l| l.file("a", "1"))]);
        img.layer_media_type = "application/vnd.oci.image.layer.v1.tar+zstd".into();
        let err = open(&img.write_dir(tmp.path())).unwrap_err().to_string();
        assert_eq!(
            err,
            "unsupported layer compression application/vnd.oci.image.layer.v1.tar+zstd \
             (capsid reads tar and tar+gzip layers)"
        );
    }

    #[test]
    fn a_file_that_is_not_an_archive_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("junk.tar");
        std::fs::write(&path, vec![b'x'; 2048]).unwrap();
        let source = super::super::resolve(path.to_str().unwrap(), tmp.path()).unwrap();
        let err = open(&source).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "{} is neither an OCI image layout directory nor an OCI archive: ",
                path.display()
            )),
            "{err}"
        );
    }
}
