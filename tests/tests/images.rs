//! The OCI archives built by images/build-oci.py import into containerd and
//! carry the layer semantics the rootfs tests rely on.

use capsid_tests::containerd::Containerd;
use capsid_tests::{artifact, run};

fn import(ctrd: &Containerd, name: &str) {
    let tar = artifact(&format!("images/{name}.tar"));
    let (code, out, err) = run(ctrd.ctr().args(["images", "import"]).arg(&tar));
    assert_eq!(code, 0, "import {name}: {out}{err}\n{}", ctrd.log());
}

#[test]
fn archives_import_and_run_with_runc() {
    let ctrd = Containerd::start();
    import(&ctrd, "busybox");
    import(&ctrd, "layered");

    let (code, out, _) = run(ctrd.ctr().args(["images", "ls", "-q"]));
    assert_eq!(code, 0);
    assert!(
        out.lines().any(|l| l == "docker.io/capsid/busybox:latest"),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l == "docker.io/capsid/layered:latest"),
        "{out}"
    );

    // The reference runtime sees the layer semantics: whiteout, opaque dir,
    // overwritten file.
    let (code, out, err) = run(ctrd.ctr().args([
        "run",
        "--rm",
        "docker.io/capsid/layered:latest",
        "capsid-images-layered",
        "sh",
        "-c",
        "ls /data; echo --; ls /opaque; echo --; cat /etc/layer",
    ]));
    assert_eq!(code, 0, "{out}{err}\n{}", ctrd.log());
    assert_eq!(out, "keep.txt\n--\nnew.txt\n--\n3\n");

    let (code, out, err) = run(ctrd.ctr().args([
        "run",
        "--rm",
        "docker.io/capsid/busybox:latest",
        "capsid-images-busybox",
        "sh",
        "-c",
        "echo hello; id -u",
    ]));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, "hello\n0\n");
}

#[test]
fn image_build_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let script = capsid_tests::repo_root().join("images/build-oci.py");
    let (code, out, err) = run(std::process::Command::new("python3")
        .arg(script)
        .args(["--only", "layered", "--out"])
        .arg(dir.path()));
    assert_eq!(code, 0, "{out}{err}");
    let again = std::fs::read(dir.path().join("layered.tar")).unwrap();
    let first = std::fs::read(artifact("images/layered.tar")).unwrap();
    assert!(again == first, "two builds of the layered image differ");
}
