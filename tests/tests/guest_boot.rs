//! The guest kernel built from kernel-config/ boots under QEMU microvm (TCG
//! here) into our initramfs, whose /init (capsid-agent) runs, mounts the
//! guest's filesystems and ends the VM when no host answers on vsock.

use std::time::Duration;

use capsid_tests::artifact;
use capsid_tests::qemu::Guest;

const TIMEOUT: Duration = Duration::from_secs(90);

fn boots_to_agent(kernel: &str) {
    let run = Guest::new(&artifact(kernel), &artifact("initramfs.cpio.gz")).run_to_exit(TIMEOUT);
    assert!(
        run.serial.contains("capsid-agent: ready version="),
        "no agent marker on the console of {kernel}:\n{}",
        run.serial
    );
    // The agent got as far as trying vsock, so every mount before it worked.
    assert!(
        run.serial
            .contains("cannot connect to host vsock port 1024"),
        "agent did not reach the vsock step:\n{}",
        run.serial
    );
    assert_eq!(
        run.exit_code,
        Some(0),
        "QEMU did not end by guest reboot:\n{}",
        run.serial
    );
    assert!(!run.serial.contains("Kernel panic"), "{}", run.serial);
    eprintln!(
        "{kernel}: booted to the agent and back in {:?}",
        run.elapsed
    );
}

#[test]
fn bzimage_boots_to_agent() {
    boots_to_agent("kernel/bzImage");
}

#[test]
fn vmlinux_boots_through_pvh() {
    boots_to_agent("kernel/vmlinux");
}

#[test]
fn agent_refuses_to_run_outside_the_guest() {
    let agent =
        capsid_tests::repo_root().join("target/x86_64-unknown-linux-gnu/release/capsid-agent");
    assert!(
        agent.exists(),
        "{} missing: run `make agent`",
        agent.display()
    );
    let (code, _, stderr) = capsid_tests::run(&mut std::process::Command::new(agent));
    assert_eq!(code, 2);
    assert!(stderr.contains("must run as PID 1"), "{stderr}");
}
