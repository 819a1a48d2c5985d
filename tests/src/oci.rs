//! Building OCI image layouts in tests: the bundled busybox image plus one
//! extra layer of the test's own files.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

fn sha(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// Copies the bundled busybox layout to `dir/name` and adds a layer holding
/// `files` (path in the image, contents, mode). Returns the layout path.
pub fn busybox_plus(dir: &Path, name: &str, files: &[(&str, &[u8], u32)]) -> PathBuf {
    let out = dir.join(name);
    let src = crate::artifact("images/busybox");
    assert!(std::process::Command::new("cp")
        .arg("-r")
        .arg(&src)
        .arg(&out)
        .status()
        .unwrap()
        .success());
    let blobs = out.join("blobs/sha256");
    let read_json = |digest: &str| -> serde_json::Value {
        serde_json::from_slice(
            &std::fs::read(blobs.join(digest.trim_start_matches("sha256:"))).unwrap(),
        )
        .unwrap()
    };
    let write_blob = |data: &[u8]| -> String {
        let d = sha(data);
        std::fs::write(blobs.join(&d), data).unwrap();
        format!("sha256:{d}")
    };

    let mut tar = tar::Builder::new(Vec::new());
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, path.trim_start_matches('/'), *data)
            .unwrap();
    }
    let layer_tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer_tar).unwrap();
    let layer_gz = gz.finish().unwrap();
    let diff_id = format!("sha256:{}", sha(&layer_tar));
    let layer_digest = write_blob(&layer_gz);

    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    let mut manifest = read_json(index["manifests"][0]["digest"].as_str().unwrap());
    let mut config = read_json(manifest["config"]["digest"].as_str().unwrap());
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .unwrap()
        .push(diff_id.into());
    let config_bytes = serde_json::to_vec(&config).unwrap();
    manifest["config"]["digest"] = write_blob(&config_bytes).into();
    manifest["config"]["size"] = config_bytes.len().into();
    manifest["layers"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest,
            "size": layer_gz.len(),
        }));
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    index["manifests"][0]["digest"] = write_blob(&manifest_bytes).into();
    index["manifests"][0]["size"] = manifest_bytes.len().into();
    std::fs::write(out.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    out
}
