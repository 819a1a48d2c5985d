//! Guest page cache on demand, for the memory tests and the over-assignment
//! demo: an erofs disk holding one file of pseudo-random bytes, and a
//! container that reads it (with the disk as an extra image layer) and
//! stays, keeping the pages cached.

use std::path::{Path, PathBuf};

use capsid_sandbox::container::LayerDisk;
use capsid_sandbox::sandbox::Sandbox;
use capsid_sandbox::stdio::StreamsWanted;

use crate::sandbox::{busybox_layer, create_on, sh};

/// Serial of the disk holding the file read into the page cache.
pub const CACHE_SERIAL: &str = "capsid-cachefill";

/// An erofs image holding one file, `/cachefill`, of `mib` MiB of
/// pseudo-random bytes (nothing a filesystem could store as holes or
/// compress).
pub fn random_file_erofs(dir: &Path, mib: usize) -> PathBuf {
    let staging = dir.join("cachefill.d");
    std::fs::create_dir_all(&staging).unwrap();
    let mut data = vec![0u8; mib << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in data.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(staging.join("cachefill"), &data).unwrap();
    let out = dir.join("cachefill.erofs");
    let st = std::process::Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&out)
        .arg(&staging)
        .status()
        .unwrap();
    assert!(st.success(), "mkfs.erofs failed");
    std::fs::remove_dir_all(&staging).unwrap();
    out
}

/// Starts container `id` running `script` in the background, with the
/// cache-fill disk as an extra image layer, and returns once the script
/// printed its first line, which must be `first_line`. The caller keeps
/// the returned stream open while the container runs.
pub async fn start_detached(
    sb: &Sandbox,
    id: &str,
    script: &str,
    first_line: &str,
) -> tokio::io::BufReader<tokio::net::UnixStream> {
    let layers = [
        busybox_layer(),
        LayerDisk {
            serial: CACHE_SERIAL.into(),
            fs_type: "erofs".into(),
        },
    ];
    let wanted = StreamsWanted {
        stdin: false,
        stdout: true,
        stderr: false,
        terminal: false,
    };
    let streams = create_on(sb, id, &sh(script), &layers, wanted)
        .await
        .unwrap()
        .streams;
    sb.start_init(id).await.unwrap();
    let mut stdout = tokio::io::BufReader::new(streams.stdout.unwrap());
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line)
        .await
        .unwrap();
    assert_eq!(line.trim_end(), first_line);
    stdout
}
