//! The host's `[vm.policy]` through containerd: a spec's `io.capsid.*`
//! annotations and sizes are the tenant's word, so what the policy does not
//! allow fails Create with one error naming it and leaves nothing behind,
//! and what it allows runs.

use std::path::PathBuf;

use capsid_tests::shim::{ShimHarness, BUSYBOX};

/// The harness's config with `[vm.policy]` appended; returns its path.
fn config_with_policy(h: &ShimHarness, name: &str, policy: &str) -> PathBuf {
    let text = std::fs::read_to_string(h.config()).expect("read the capsid config");
    let path = h.config().with_file_name(name);
    std::fs::write(&path, format!("{text}[vm.policy]\n{policy}\n")).expect("write the config");
    path
}

#[test]
fn annotations_and_sizes_obey_the_hosts_policy() {
    let h = ShimHarness::start();
    let cases: [(&str, Vec<&str>, &str); 5] = [
        (
            "p1",
            vec!["--annotation", "io.capsid.balloon.policy=off"],
            "annotation io.capsid.balloon.policy=\"off\" is not allowed by this host's \
             policy (allowed: io.capsid.vcpus, io.capsid.memory_mib): invalid argument",
        ),
        (
            "p2",
            vec!["--annotation", "io.capsid.vcpu=2"],
            "unknown annotation io.capsid.vcpu=\"2\" (capsid knows io.capsid.vcpus, \
             io.capsid.memory_mib, io.capsid.balloon.policy): invalid argument",
        ),
        (
            "p3",
            vec!["--annotation", "io.capsid.vcpus=9"],
            "the VM would have 9 vCPUs (from annotation io.capsid.vcpus=9), more than \
             this host's policy allows ([vm.policy] max_vcpus = 8): invalid argument",
        ),
        (
            "p4",
            vec!["--memory-limit", "17179869184"],
            "the VM would have 16448 MiB of RAM (from the OCI memory limit of 16384 MiB \
             and 64 MiB for the guest), more than this host's policy allows \
             ([vm.policy] max_memory_mib = 8192): invalid argument",
        ),
        (
            "p5",
            vec!["--annotation", "io.capsid.memory_mib=65536"],
            "([vm.policy] max_memory_mib = 8192): invalid argument",
        ),
    ];
    for (id, flags, expected) in &cases {
        let mut all = vec!["--rm"];
        all.extend(flags);
        let (code, out, err) = capsid_tests::run(&mut h.run_cmd(&all, BUSYBOX, id, &["true"]));
        assert_ne!(code, 0, "{id} ran: {out}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("ctr: ")).collect();
        assert_eq!(errors.len(), 1, "{id}: {err}");
        assert!(errors[0].ends_with(expected), "{id}: {err}");
    }
    let ids: Vec<&str> = cases.iter().map(|c| c.0).collect();
    h.assert_clean(&ids);
    let (_, out, _) = h.ctr(&["container", "ls", "-q"]);
    assert_eq!(out.trim(), "", "containers left: {out}");

    // Allowed by default: a size annotation within the maxima, and other
    // annotations, which are not capsid's business.
    let (code, out, err) = h.run_with(
        &[
            "--rm",
            "--annotation",
            "io.capsid.vcpus=2",
            "--annotation",
            "example.com/team=a",
        ],
        "ok1",
        &["nproc"],
    );
    assert_eq!(code, 0, "{err}\n{}", h.log_tail());
    assert_eq!(out.trim(), "2", "{err}");

    // An admin who allows the balloon opt-out says so.
    let relaxed = config_with_policy(
        &h,
        "relaxed.toml",
        "allowed_annotations = [\"io.capsid.vcpus\", \"io.capsid.memory_mib\", \
         \"io.capsid.balloon.policy\"]\n",
    );
    let relaxed = relaxed.display().to_string();
    let (code, out, err) = h.run_with(
        &[
            "--rm",
            "--runtime-config-path",
            &relaxed,
            "--annotation",
            "io.capsid.balloon.policy=off",
            "--annotation",
            "io.capsid.vcpus=2",
        ],
        "ok2",
        &["nproc"],
    );
    assert_eq!(code, 0, "{err}\n{}", h.log_tail());
    assert_eq!(out.trim(), "2", "{err}");

    // One who allows no annotation refuses even the size ones; a lower
    // maximum refuses what the default allowed.
    let strict = config_with_policy(&h, "strict.toml", "allowed_annotations = []\n");
    let small = config_with_policy(&h, "small.toml", "max_vcpus = 1\n");
    let (strict, small) = (strict.display().to_string(), small.display().to_string());
    let refusals = [
        (
            "p6",
            strict.as_str(),
            "io.capsid.memory_mib=256",
            "annotation io.capsid.memory_mib=\"256\" is not allowed by this host's policy \
             (allowed: none): invalid argument",
        ),
        (
            "p7",
            small.as_str(),
            "io.capsid.vcpus=2",
            "the VM would have 2 vCPUs (from annotation io.capsid.vcpus=2), more than \
             this host's policy allows ([vm.policy] max_vcpus = 1): invalid argument",
        ),
    ];
    for (id, config, annotation, expected) in refusals {
        let flags = [
            "--rm",
            "--runtime-config-path",
            config,
            "--annotation",
            annotation,
        ];
        let (code, _, err) = h.run_with(&flags, id, &["true"]);
        assert_ne!(code, 0, "{id} ran");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("ctr: ")).collect();
        assert_eq!(errors.len(), 1, "{id}: {err}");
        assert!(errors[0].ends_with(expected), "{id}: {err}");
    }
    h.assert_clean(&["p1", "p2", "p3", "p4", "p5", "p6", "p7", "ok1", "ok2"]);
}
