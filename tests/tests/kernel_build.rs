//! kernel-config/build.sh on its cache-miss path, every time: a stub kernel
//! source whose `make` writes a dummy vmlinux and bzImage in milliseconds
//! stands in for linux-source-6.1, so the path a fresh machine takes first
//! (unpack, configure, compile, fill the cache, copy out) is tested on
//! machines whose real kernel is long cached.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use capsid_tests::repo_root;
use sha2::{Digest, Sha256};

const MAKEFILE: &str = "\
.PHONY: tinyconfig olddefconfig
tinyconfig:
\t@echo '# stub tinyconfig' > .config
olddefconfig:
\t@true
vmlinux:
\t@echo '  CC      init/main.o'
\t@if [ -n \"$$STUB_COUNTER\" ]; then echo compiled >> \"$$STUB_COUNTER\"; fi
\t@if [ -n \"$$STUB_SLEEP\" ]; then sleep $$STUB_SLEEP; fi
\t@if [ -n \"$$STUB_FAIL\" ]; then echo 'init/main.c:1: error: stub failure' >&2; exit 2; fi
\t@echo 'stub vmlinux' > vmlinux
bzImage: vmlinux
\t@mkdir -p arch/x86/boot
\t@echo 'stub bzImage' > arch/x86/boot/bzImage
";

/// `scripts/config --enable SYM`, as far as build.sh uses it.
const SCRIPTS_CONFIG: &str =
    "#!/bin/sh\n[ \"$1\" = --enable ] && echo \"CONFIG_$2=y\" >> .config\n";

/// `merge_config.sh -m .config FRAGMENT`: every symbol the fragment sets.
const MERGE_CONFIG: &str = "#!/bin/sh\ngrep '^CONFIG_' \"$3\" >> \"$2\"\n";

/// A stub kernel source tarball with one top directory, as Debian ships it.
fn stub_source(dir: &Path) -> PathBuf {
    let path = dir.join("linux-stub.tar");
    let mut tar = tar::Builder::new(fs::File::create(&path).unwrap());
    let mut add = |name: &str, body: &str, mode: u32| {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        tar.append_data(&mut header, format!("linux-stub/{name}"), body.as_bytes())
            .unwrap();
    };
    add("Makefile", MAKEFILE, 0o644);
    add("scripts/config", SCRIPTS_CONFIG, 0o755);
    add("scripts/kconfig/merge_config.sh", MERGE_CONFIG, 0o755);
    tar.into_inner().unwrap().flush().unwrap();
    path
}

/// One scratch "machine": a working directory from which build.sh is run
/// with relative output and cache paths, and the stub source.
struct Scratch {
    dir: tempfile::TempDir,
    source: PathBuf,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let source = stub_source(dir.path());
        Scratch { dir, source }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// build.sh OUT with the cache at the relative path `cache`.
    fn command(&self, out: &str, env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join("kernel-config/build.sh"))
            .arg(out)
            .current_dir(self.dir.path())
            .env("CAPSID_KERNEL_CACHE", "cache")
            .env("CAPSID_KERNEL_SOURCE", &self.source)
            .env("STUB_COUNTER", self.path("compiled"))
            .env_remove("STUB_FAIL")
            .env_remove("STUB_SLEEP")
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    fn run(&self, out: &str, env: &[(&str, &str)]) -> Output {
        self.command(out, env).output().unwrap()
    }

    /// How many times the stub's compile step ran.
    fn compiles(&self) -> usize {
        fs::read_to_string(self.path("compiled"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// What the cache root holds besides the unpacked sources.
    fn cache_entries(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.path("cache"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "src")
            .collect();
        names.sort();
        names
    }

    /// The directory build.sh unpacks this stub source into.
    fn source_work_dir(&self) -> PathBuf {
        let digest = Sha256::digest(fs::read(&self.source).unwrap());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        self.path(&format!("cache/src/sha256-{}", &hex[..16]))
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_kernel_in(dir: &Path) {
    assert_eq!(
        fs::read_to_string(dir.join("vmlinux")).unwrap(),
        "stub vmlinux\n"
    );
    assert_eq!(
        fs::read_to_string(dir.join("bzImage")).unwrap(),
        "stub bzImage\n"
    );
    let config = fs::read_to_string(dir.join("config")).unwrap();
    assert!(config.contains("CONFIG_64BIT=y"), "{config}");
    assert!(config.contains("CONFIG_VIRTIO_BLK=y"), "{config}");
}

#[test]
fn cache_miss_builds_into_a_relative_output_then_hits() {
    let s = Scratch::new();
    let first = s.run("build/kernel", &[]);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stderr(&first).contains("cache miss"), "{}", stderr(&first));
    assert_kernel_in(&s.path("build/kernel"));
    assert_eq!(s.compiles(), 1);
    let entries = s.cache_entries();
    assert_eq!(
        entries.len(),
        1,
        "one complete entry, no temporary: {entries:?}"
    );
    assert_kernel_in(&s.path("cache").join(&entries[0]));

    let second = s.run("other/out", &[]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(stderr(&second).contains("cache hit"), "{}", stderr(&second));
    assert_kernel_in(&s.path("other/out"));
    assert_eq!(s.compiles(), 1, "a cache hit does not compile");
}

#[test]
fn failed_build_leaves_no_entry_and_names_its_log() {
    let s = Scratch::new();
    let failed = s.run("build/kernel", &[("STUB_FAIL", "1")]);
    assert!(!failed.status.success());
    let err = stderr(&failed);
    assert!(err.contains("build failed"), "{err}");
    assert!(
        err.contains("stub failure"),
        "the log's tail is shown: {err}"
    );
    let log = s.source_work_dir().join("build.log");
    assert!(
        err.contains(&format!("log: {}", log.display())),
        "names {}: {err}",
        log.display()
    );
    assert!(log.exists());
    assert!(s.cache_entries().is_empty(), "{:?}", s.cache_entries());
    assert!(!s.path("build/kernel/vmlinux").exists());

    // The next run is a miss again, and completes.
    let again = s.run("build/kernel", &[]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stderr(&again).contains("cache miss"), "{}", stderr(&again));
    assert_kernel_in(&s.path("build/kernel"));
}

#[test]
fn interrupted_build_leaves_no_entry() {
    use std::os::unix::process::CommandExt;
    let s = Scratch::new();
    let mut child = s
        .command("build/kernel", &[("STUB_SLEEP", "60")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.compiles() == 0 {
        assert!(Instant::now() < deadline, "the stub compile never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pgid = nix::unistd::Pid::from_raw(-(child.id() as i32));
    nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    assert!(s.cache_entries().is_empty(), "{:?}", s.cache_entries());

    let again = s.run("build/kernel", &[]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stderr(&again).contains("cache miss"), "{}", stderr(&again));
    assert_kernel_in(&s.path("build/kernel"));
}

#[test]
fn half_unpacked_source_is_unpacked_again() {
    let s = Scratch::new();
    // What an unpack cut short leaves: a tree without the completion marker
    // (here one whose Makefile cannot build anything).
    let tree = s.source_work_dir().join("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("Makefile"), "all:\n\tfalse\n").unwrap();
    let out = s.run("build/kernel", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("unpacking"), "{}", stderr(&out));
    assert_kernel_in(&s.path("build/kernel"));
}

#[test]
fn missing_source_is_named() {
    let s = Scratch::new();
    let out = s.run(
        "build/kernel",
        &[("CAPSID_KERNEL_SOURCE", "/nonexistent/linux.tar.xz")],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/linux.tar.xz"),
        "{}",
        stderr(&out)
    );
    assert!(s.cache_entries().is_empty());
}
