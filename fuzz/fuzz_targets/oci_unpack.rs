//! Fuzzes reading OCI images and unpacking their layers into a staging
//! tree. The first input byte picks the form of the rest:
//!
//! - an OCI archive (a tar of an image layout: index, manifest, config and
//!   layer blobs, each checked against its digest), opened and, if it is an
//!   image, unpacked;
//! - or one to four layer blobs (each but the last preceded by its length,
//!   a little-endian u16), plain tar or gzip'd tar, which the fuzzer wraps
//!   in a valid image layout directory so that every run reaches the
//!   unpacking: paths, links, whiteouts, devices, PAX records.
//!
//! Each run gets a fresh directory holding the image, the staging tree and
//! an empty canary directory beside it. Nothing may panic, whatever the
//! image says, and nothing may be written outside the staging tree: the
//! canary stays empty and untouched and nothing new appears beside it.

#![no_main]

use std::fs::{self, File, FileTimes};
use std::path::{Path, PathBuf};
use std::sync::{Once, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capsid_sandbox::image::{fuzz_unpack_layers, open, ImageSource, SourceFormat};
use libfuzzer_sys::fuzz_target;
use serde_json::json;
use sha2::{Digest, Sha256};

/// Files the unpacking may write, at most: a GNU sparse entry describes
/// any size in a few bytes. Past this, writes fail (EFBIG) and the layer
/// is refused, so a run stays cheap.
const MAX_FILE_SIZE: u64 = 1 << 20;
/// Free space a tmpfs at /dev/shm needs for the runs to go there.
const MIN_SHM_FREE: u64 = 512 << 20;
/// The canary's time, checked after each run.
const CANARY_TIME: Duration = Duration::from_secs(1_000_000_000);

fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let limit = libc::rlimit {
            rlim_cur: MAX_FILE_SIZE,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit reads one rlimit struct that lives across the
        // call; ignoring SIGXFSZ changes no memory (writes past the limit
        // then fail with EFBIG instead of killing the process).
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0, "setrlimit");
        }
    });
}

/// Where each run's directory goes: /dev/shm when it is roomy enough (a
/// run is mostly file creation and removal, several times faster there
/// than on a disk), else the temporary directory.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let roomy = std::ffi::CString::new("/dev/shm").is_ok_and(|path| {
            // SAFETY: statvfs is a plain C struct of integers, for which
            // all-zero bytes are a valid value.
            let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
            // SAFETY: statvfs reads the NUL-terminated path and writes one
            // statvfs struct, both alive and exclusively ours for the call.
            let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
            rc == 0 && st.f_bavail.saturating_mul(st.f_frsize) >= MIN_SHM_FREE
        });
        if roomy && tempfile::tempdir_in(shm).is_ok() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    })
}

fn digest(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn write_blob(dir: &Path, data: &[u8]) -> String {
    let d = digest(data);
    let hex = d.trim_start_matches("sha256:");
    fs::write(dir.join("blobs/sha256").join(hex), data).expect("write blob");
    d
}

/// An image layout directory at `dir` around `layers`.
fn write_layout(dir: &Path, layers: &[&[u8]], gzip: bool) {
    fs::create_dir_all(dir.join("blobs/sha256")).expect("layout dirs");
    let media_type = if gzip {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    } else {
        "application/vnd.oci.image.layer.v1.tar"
    };
    let descriptors: Vec<_> = layers
        .iter()
        .map(|layer| {
            json!({
                "mediaType": media_type,
                "digest": write_blob(dir, layer),
                "size": layer.len(),
            })
        })
        .collect();
    // Right for plain layers; gzip'd ones fail their diff_id check, but
    // only once they are unpacked.
    let diff_ids: Vec<_> = layers.iter().map(|l| digest(l)).collect();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": write_blob(dir, config.as_bytes()),
            "size": config.len(),
        },
        "layers": descriptors,
    })
    .to_string();
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": write_blob(dir, manifest.as_bytes()),
            "size": manifest.len(),
        }],
    })
    .to_string();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    fs::write(dir.join("index.json"), index).expect("index.json");
}

/// Splits `data` into up to `count` layers, each but the last preceded by
/// its length.
fn split_layers(mut data: &[u8], count: usize) -> Vec<&[u8]> {
    let mut layers = Vec::new();
    while layers.len() + 1 < count {
        let [lo, hi, rest @ ..] = data else { break };
        let n = usize::from(u16::from_le_bytes([*lo, *hi])).min(rest.len());
        let (layer, rest) = rest.split_at(n);
        layers.push(layer);
        data = rest;
    }
    layers.push(data);
    layers
}

/// Gives back the owner's access to every directory under `dir` (a layer
/// may leave some unreadable), so that the run's directory can be removed.
fn open_up(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            open_up(&entry.path());
        }
    }
}

fn names(dir: &Path) -> Vec<PathBuf> {
    let mut names: Vec<PathBuf> = fs::read_dir(dir)
        .expect("list run directory")
        .map(|e| PathBuf::from(e.expect("entry").file_name()))
        .collect();
    names.sort();
    names
}

fuzz_target!(|data: &[u8]| {
    setup();
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let run = tempfile::tempdir_in(scratch()).expect("run directory");
    let canary = run.path().join("canary");
    fs::create_dir(&canary).expect("canary");
    let canary_time = UNIX_EPOCH + CANARY_TIME;
    File::open(&canary)
        .and_then(|d| d.set_times(FileTimes::new().set_modified(canary_time)))
        .expect("canary time");
    let staging = run.path().join("staging");
    fs::create_dir(&staging).expect("staging");

    let source = if control & 1 == 0 {
        let path = run.path().join("image.tar");
        fs::write(&path, rest).expect("archive");
        ImageSource {
            name: "fuzz".into(),
            path,
            format: SourceFormat::Archive,
        }
    } else {
        let path = run.path().join("image");
        let count = usize::from((control >> 1) & 3) + 1;
        write_layout(&path, &split_layers(rest, count), control & 8 != 0);
        ImageSource {
            name: "fuzz".into(),
            path,
            format: SourceFormat::Layout,
        }
    };
    let before = names(run.path());

    if let Ok(image) = open(&source) {
        let _ = image.chain_key();
        let _ = fuzz_unpack_layers(&image, &staging);
    }

    assert_eq!(
        names(run.path()),
        before,
        "something appeared beside the staging tree"
    );
    assert!(
        fs::read_dir(&canary).expect("canary").next().is_none(),
        "something was written into the canary"
    );
    let modified = fs::metadata(&canary)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    assert_eq!(modified, canary_time, "the canary's time changed");
    open_up(&staging);
});
