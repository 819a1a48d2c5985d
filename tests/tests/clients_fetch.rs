//! contrib/clients/fetch.sh from an empty cache, as on a fresh machine
//! (the cached copy the other tests use never takes this path): Debian
//! 13's packages are downloaded through a private apt directory, unpacked,
//! and the binaries run here; a second call is a cache hit.

use std::process::Command;

use capsid_tests::{repo_root, run};

#[test]
fn clients_are_fetched_into_an_empty_cache_and_then_reused() {
    let cache = tempfile::tempdir().unwrap();
    let script = repo_root().join("contrib/clients/fetch.sh");
    let fetch = || {
        run(Command::new("bash")
            .arg(&script)
            .arg("trixie")
            .env("CAPSID_CLIENTS_CACHE", cache.path()))
    };
    let (code, out, err) = fetch();
    assert_eq!(code, 0, "{err}");
    let root = std::path::PathBuf::from(out.trim());
    assert_eq!(root, cache.path().join("trixie"));
    for (program, want) in [
        ("usr/sbin/dockerd", "Docker version 26."),
        ("usr/bin/docker", "Docker version 26."),
        ("usr/bin/containerd", "containerd "),
    ] {
        let (code, out, err) = run(Command::new(root.join(program)).arg("--version"));
        assert_eq!(code, 0, "{program}: {err}");
        assert!(out.contains(want), "{program}: {out}");
    }
    let versions = std::fs::read_to_string(root.join(".capsid-versions")).unwrap();
    assert!(versions.contains("docker.io"), "{versions}");
    // Nothing of the private apt directory is left beside the result.
    let names: Vec<String> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["trixie"]);

    // A hit: same root, nothing downloaded (no apt output, no new files).
    let marker = std::fs::metadata(root.join(".capsid-complete")).unwrap();
    let (code, out, err) = fetch();
    assert_eq!((code, out.trim()), (0, root.to_str().unwrap()), "{err}");
    assert!(err.is_empty(), "{err}");
    let again = std::fs::metadata(root.join(".capsid-complete")).unwrap();
    assert_eq!(marker.modified().unwrap(), again.modified().unwrap());

    let (code, _, err) = run(Command::new("bash")
        .arg(&script)
        .arg("bookworm-nope")
        .env("CAPSID_CLIENTS_CACHE", cache.path()));
    assert_eq!(code, 2);
    assert!(err.contains("unknown suite 'bookworm-nope'"), "{err}");
}
