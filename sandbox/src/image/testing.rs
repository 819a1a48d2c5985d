//! Small OCI images made in memory for the image module's unit tests.

use std::io::Write;
use std::path::Path;

use flate2::write::GzEncoder;
use serde_json::json;

use super::digest::Sha256Digest;
use super::{ImageSource, SourceFormat};

/// Builds one layer's uncompressed tar.
pub(crate) struct LayerBuilder(tar::Builder<Vec<u8>>);

impl LayerBuilder {
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_mtime(1_600_000_000);
        header.set_uid(0);
        header.set_gid(0);
        header
    }

    pub(crate) fn dir(&mut self, path: &str) {
        let mut h = Self::header(tar::EntryType::Directory, 0o755, 0);
        self.0.append_data(&mut h, path, &[][..]).unwrap();
    }

    pub(crate) fn file(&mut self, path: &str, data: &str) {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, data.len() as u64);
        self.0.append_data(&mut h, path, data.as_bytes()).unwrap();
    }

    pub(crate) fn symlink(&mut self, path: &str, target: &str) {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.0.append_link(&mut h, path, target).unwrap();
    }

    pub(crate) fn hardlink(&mut self, path: &str, target: &str) {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
        self.0.append_link(&mut h, path, target).unwrap();
    }

    /// A character device (`Some((major, minor))`) or a FIFO (`None`).
    pub(crate) fn node(&mut self, path: &str, device: Option<(u32, u32)>) {
        let kind = if device.is_some() {
            tar::EntryType::Char
        } else {
            tar::EntryType::Fifo
        };
        let mut h = Self::header(kind, 0o620, 0);
        let (major, minor) = device.unwrap_or((0, 0));
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, path, &[][..]).unwrap();
    }

    /// A file preceded by PAX records (`SCHILY.xattr.*`, `uid`, ...).
    pub(crate) fn file_with_pax(&mut self, path: &str, data: &str, pax: &[(&str, &[u8])]) {
        self.0.append_pax_extensions(pax.iter().copied()).unwrap();
        self.file(path, data);
    }

    pub(crate) fn whiteout(&mut self, path: &str) {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let whiteout = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&whiteout, "");
    }

    pub(crate) fn opaque(&mut self, dir: &str) {
        self.file(&format!("{dir}/.wh..wh..opq"), "");
    }
}

/// A layer built with [`LayerBuilder`].
pub(crate) fn layer(build: impl FnOnce(&mut LayerBuilder)) -> Vec<u8> {
    let mut builder = LayerBuilder(tar::Builder::new(Vec::new()));
    build(&mut builder);
    builder.0.into_inner().unwrap()
}

/// A layer of raw entries (path, type flag, link name, data), written
/// without the checks `tar::Builder` makes, so it can hold hostile paths.
pub(crate) fn raw_layer(entries: &[(&str, u8, &str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for &(path, kind, link, data) in entries {
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(tar::EntryType::new(kind));
        header.set_mode(0o755);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(data.len() as u64);
        header.set_cksum();
        builder.append(&header, data.as_bytes()).unwrap();
    }
    builder.into_inner().unwrap()
}

/// An image made of uncompressed layer tars.
pub(crate) struct TestImage {
    /// The layers' uncompressed tars.
    pub layers: Vec<Vec<u8>>,
    /// The config's diff_ids (the layers' digests unless changed).
    pub diff_ids: Vec<String>,
    /// Whether layer blobs are gzip'd.
    pub gzip: bool,
    /// The layers' media type.
    pub layer_media_type: String,
    /// Bytes to flip in compressed layer blobs: (layer, offset).
    corruptions: Vec<(usize, usize)>,
}

impl TestImage {
    pub(crate) fn new(layers: Vec<Vec<u8>>) -> Self {
        let diff_ids = layers
            .iter()
            .map(|l| Sha256Digest::of(l).to_string())
            .collect();
        Self {
            layers,
            diff_ids,
            gzip: true,
            layer_media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            corruptions: Vec::new(),
        }
    }

    /// Flips one byte of layer `index`'s blob once it is compressed; the
    /// manifest keeps the undamaged digest.
    pub(crate) fn corrupt_layer(&mut self, index: usize, offset: usize) {
        self.corruptions.push((index, offset));
    }

    fn blob(&self, index: usize) -> Vec<u8> {
        let raw = &self.layers[index];
        if !self.gzip {
            return raw.clone();
        }
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(raw).unwrap();
        gz.finish().unwrap()
    }

    /// The size of layer `index`'s blob.
    pub(crate) fn blob_len(&self, index: usize) -> usize {
        self.blob(index).len()
    }

    /// The digests of the layer blobs, as the manifest lists them.
    pub(crate) fn layer_digests(&self) -> Vec<Sha256Digest> {
        (0..self.layers.len())
            .map(|i| Sha256Digest::of(&self.blob(i)))
            .collect()
    }

    fn media_type(&self) -> String {
        if self.gzip {
            self.layer_media_type.clone()
        } else {
            "application/vnd.oci.image.layer.v1.tar".into()
        }
    }

    fn config(&self) -> Vec<u8> {
        json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": self.diff_ids},
        })
        .to_string()
        .into_bytes()
    }

    pub(crate) fn config_digest(&self) -> Sha256Digest {
        Sha256Digest::of(&self.config())
    }

    /// The layout's files: (path in the layout, content).
    fn files(&self) -> Vec<(String, Vec<u8>)> {
        let mut blobs = Vec::new();
        let mut layer_descs = Vec::new();
        for i in 0..self.layers.len() {
            let mut blob = self.blob(i);
            let digest = Sha256Digest::of(&blob);
            layer_descs.push(json!({
                "mediaType": self.media_type(),
                "digest": digest.to_string(),
                "size": blob.len(),
            }));
            for &(_, offset) in self.corruptions.iter().filter(|(l, _)| *l == i) {
                blob[offset] ^= 0x55;
            }
            blobs.push((digest, blob));
        }
        let config = self.config();
        let config_digest = Sha256Digest::of(&config);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest.to_string(),
                "size": config.len(),
            },
            "layers": layer_descs,
        })
        .to_string()
        .into_bytes();
        let manifest_digest = Sha256Digest::of(&manifest);
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest.to_string(),
                "size": manifest.len(),
                "platform": {"architecture": "amd64", "os": "linux"},
            }],
        });
        blobs.push((config_digest, config));
        blobs.push((manifest_digest, manifest));
        let mut files = vec![
            (
                "oci-layout".to_string(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            ("index.json".to_string(), index.to_string().into_bytes()),
        ];
        for (digest, data) in blobs {
            files.push((format!("blobs/sha256/{}", digest.hex()), data));
        }
        files
    }

    /// Writes the image as the layout directory `dir/img`.
    pub(crate) fn write_dir(&self, dir: &Path) -> ImageSource {
        let root = dir.join("img");
        for (path, data) in self.files() {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, data).unwrap();
        }
        ImageSource {
            name: "img".into(),
            path: root,
            format: SourceFormat::Layout,
        }
    }

    /// Writes the image as the OCI archive `dir/img.tar`.
    pub(crate) fn write_archive(&self, dir: &Path) -> ImageSource {
        let path = dir.join("img.tar");
        let mut builder = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for (name, data) in self.files() {
            let mut header = tar::Header::new_ustar();
            header.set_mode(0o644);
            header.set_size(data.len() as u64);
            builder.append_data(&mut header, name, &data[..]).unwrap();
        }
        builder.into_inner().unwrap();
        ImageSource {
            name: "img".into(),
            path,
            format: SourceFormat::Archive,
        }
    }
}
