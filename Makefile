# capsid: every container in its own KVM microVM.
#
#   make demo      fresh machine → everything built and installed → a container runs
#   make test      what CI runs: lints, unit and end-to-end tests (QEMU-TCG, KVM tiny guests,
#                  containerd), then every fuzz target for FUZZ_SECONDS each
#   make lint      cargo fmt --check and clippy -D warnings over the whole workspace
#   make fuzz      every cargo-fuzz target for FUZZ_SECONDS (default 30) from fuzz/seeds
#   make install   binaries to $(PREFIX)/bin, guest assets to $(PREFIX)/share/capsid

PREFIX      ?= /usr/local
BUILD       := build
TARGET      := x86_64-unknown-linux-gnu
AGENT       := target/$(TARGET)/release/capsid-agent
CARGO       ?= cargo
BINARIES    := capsid capsid-balloond capsid-poold capsid-vmm capsid-vhost capsid-jail containerd-shim-capsid-v2

# Debian packages the build, the tests and the demo need (protobuf-compiler:
# protoc, which the CRI tests' client, the k8s-cri crate, is generated with).
APT_PACKAGES := build-essential pkg-config python3 cpio xz-utils \
	linux-source-6.1 flex bison bc libelf-dev libssl-dev \
	qemu-system-x86 busybox-static erofs-utils e2fsprogs libseccomp-dev libcap-ng-dev \
	containerd runc iproute2 containernetworking-plugins iptables nftables util-linux \
	fonts-dejavu-core protobuf-compiler

.PHONY: all deps virtiofsd kernel agent guest-tool initramfs images assets build release lint test fuzz install demo clean clients

all: build assets

# Installs missing Debian packages (apt-get update first, only when needed).
deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "[deps] installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "[deps] all packages present"; fi
	@$(MAKE) --no-print-directory virtiofsd

# virtiofsd (the virtio-fs project's vhost-user-fs daemon) serves volumes to
# the guest; Debian 12 has none, so it is built from crates.io into the
# prefix (cargo skips it when this version is installed there already).
VIRTIOFSD_VERSION := 1.14.0
# Its build is kept outside the clone, so another prefix (the test of this
# target) rebuilds nothing.
VIRTIOFSD_BUILD := /var/cache/capsid/virtiofsd-build
virtiofsd:
	@if [ "$$($(PREFIX)/bin/virtiofsd --version 2>/dev/null)" = "virtiofsd $(VIRTIOFSD_VERSION)" ]; then \
		echo "[deps] virtiofsd $(VIRTIOFSD_VERSION) present"; \
	else \
		echo "[deps] building virtiofsd $(VIRTIOFSD_VERSION) into $(PREFIX)/bin"; \
		CARGO_TARGET_DIR=$(VIRTIOFSD_BUILD) $(CARGO) install --locked --quiet --root $(PREFIX) \
			virtiofsd --version $(VIRTIOFSD_VERSION); \
	fi

kernel:
	bash kernel-config/build.sh $(BUILD)/kernel

# The agent is PID 1 of the guest: a static binary (gnu target, static CRT).
# libseccomp (OCI linux.seccomp) is linked statically from libseccomp-dev.
agent:
	CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
	LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/$$(gcc -print-multiarch) \
		$(CARGO) build --release --locked -p capsid-agent --target $(TARGET)

# Static helper for test guests (vsock client/server).
guest-tool:
	CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
		$(CARGO) build --release --locked -p capsid-guest-tool --target $(TARGET)

initramfs: agent
	python3 images/mkinitramfs.py --agent $(AGENT) --out $(BUILD)/initramfs.cpio.gz

images:
	python3 images/build-oci.py --out $(BUILD)/images

assets: kernel initramfs images

build:
	$(CARGO) build --locked --workspace

# What is installed: the test crate (and its protoc-built CRI client) is
# not built for it.
release:
	$(CARGO) build --locked --release --workspace --exclude capsid-tests

FUZZ_SECONDS ?= 30

# The workspace's deny lints hold by construction: CI fails on a warning.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# Docker Engine 26.1, containerd 1.7 (Debian 13) and containerd 2.x (Debian
# unstable), unpacked under /var/cache/capsid/clients, never installed.
clients:
	bash contrib/clients/fetch.sh trixie
	bash contrib/clients/fetch.sh sid

# The ctr suites and the CRI suite run again against containerd 1.7
# (Debian 13) and 2.1 (Debian unstable); the default run uses the system's 1.6.
CTR_SUITES := --test shim_tasks --test shim_faults --test net_containerd --test cri_pods --test cri_faults --test cri_streaming --test shim_pods --test shim_pool

test: deps lint build assets guest-tool clients
	$(CARGO) test --locked --workspace --no-fail-fast
	for suite in trixie sid; do \
		CAPSID_TEST_CONTAINERD_DIR=$$(bash contrib/clients/fetch.sh $$suite)/usr/bin \
			$(CARGO) test --locked -p capsid-tests --no-fail-fast $(CTR_SUITES) || exit 1; \
	done
	$(MAKE) fuzz

# Each target runs for a bounded time from the small corpus kept in
# fuzz/seeds; a crash fails the run (fuzz/run.sh prints execs and coverage).
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) bash fuzz/run.sh

install: release assets
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/capsid/images
	for b in $(BINARIES); do install -m 0755 target/release/$$b $(DESTDIR)$(PREFIX)/bin/; done
	install -m 0644 $(BUILD)/kernel/vmlinux $(BUILD)/kernel/bzImage $(BUILD)/initramfs.cpio.gz \
		$(DESTDIR)$(PREFIX)/share/capsid/
	install -m 0644 $(BUILD)/images/*.tar $(DESTDIR)$(PREFIX)/share/capsid/images/
	# The balloon coordinator's and the pool daemon's units, installed but not
	# enabled (docs/memory.md, docs/pool.md).
	install -d $(DESTDIR)$(PREFIX)/lib/systemd/system
	for u in capsid-balloond capsid-poold; do \
		sed 's|/usr/local/bin/|$(PREFIX)/bin/|' contrib/systemd/$$u.service \
			> $(DESTDIR)$(PREFIX)/lib/systemd/system/$$u.service || exit 1; \
	done

demo: deps install
	$(PREFIX)/bin/capsid check
	$(PREFIX)/bin/capsid run busybox -- sh -c 'echo hello from $$(hostname) in a microVM; uname -r'

clean:
	$(CARGO) clean
	rm -rf $(BUILD)
