#!/bin/sh
# Host memory (PSS) of an idle Kubernetes pod run by capsid through
# containerd's CRI plugin: one-container and three-container pods, every
# host process of the pod (shim, VM, device backends, virtiofsd, jailers).
# Guest RAM is the memfd QEMU and the device backends share; the rest is
# the host processes' own. Uses containerd from CAPSID_TEST_CONTAINERD_DIR, else the system's.
set -eu
cd "$(dirname "$0")/.."
# Release binaries: what a host runs (the test finds them beside itself).
cargo build --release --workspace --exclude capsid-tests
exec cargo test --release -p capsid-tests --test cri_pod_memory -- --ignored --nocapture --test-threads 1 2>&1 \
    | grep -oE '(idle pod.*|^  .*)'
