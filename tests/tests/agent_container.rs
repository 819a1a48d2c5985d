//! The guest agent runs OCI containers: a real guest under QEMU-TCG, the
//! busybox rootfs on our virtio-blk, stdio over our vsock.

use capsid_sandbox::spec::RunOptions;
use capsid_tests::sandbox::{busybox_sandbox, run_container};

fn cmd(args: &[&str]) -> RunOptions {
    RunOptions { command: args.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let sb = busybox_sandbox(dir.path(), "agent-echo").await;
    let out = run_container(&sb, "c1", &cmd(&["echo", "hello"]), b"").await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n", "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status, 0);
    sb.stop().await;
    assert!(!dir.path().join("run/agent-echo").exists(), "run dir left behind");
}
