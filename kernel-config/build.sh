#!/usr/bin/env bash
# Builds capsid's guest kernel (vmlinux + bzImage) from Debian's linux-source-6.1.
#
# The result is cached outside the checkout, keyed by a hash of the config
# fragment, this script and the source package version, so a second run with
# the same inputs only copies two files.
#
#   kernel-config/build.sh [OUT_DIR]        (default OUT_DIR: build/kernel)
#
# Environment: CAPSID_KERNEL_CACHE (default /var/cache/capsid/kernel).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../build/kernel}
cache_root=${CAPSID_KERNEL_CACHE:-/var/cache/capsid/kernel}
fragment=$here/microvm.fragment
pkg=linux-source-6.1
start=$(date +%s)

log() { printf '[kernel] %s\n' "$*" >&2; }

if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
  log "installing $pkg and build dependencies"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    "$pkg" build-essential flex bison bc libelf-dev libssl-dev xz-utils >/dev/null
fi
version=$(dpkg-query -W -f='${Version}' "$pkg")
key=$( { cat "$fragment" "$0"; echo "$pkg=$version"; } | sha256sum | cut -c1-16)
entry=$cache_root/$key
mkdir -p "$out"

if [ -f "$entry/vmlinux" ] && [ -f "$entry/bzImage" ]; then
  cp "$entry/vmlinux" "$entry/bzImage" "$entry/config" "$out/"
  log "cache hit $key ($pkg $version): $out ready in $(( $(date +%s) - start )) s"
  exit 0
fi

log "cache miss $key: building $pkg $version (about 8 minutes on 2 cores)"
work=$cache_root/src/$version
src=$work/linux-source-6.1
if [ ! -f "$src/Makefile" ]; then
  log "unpacking /usr/src/$pkg.tar.xz"
  rm -rf "$work" && mkdir -p "$work"
  tar -C "$work" -xf "/usr/src/$pkg.tar.xz"
fi

cd "$src"
make -s tinyconfig >/dev/null
# tinyconfig is 32-bit on x86: switch first so 64-bit-only symbols can merge.
./scripts/config --enable 64BIT
make -s olddefconfig >/dev/null
./scripts/kconfig/merge_config.sh -m .config "$fragment" >/dev/null
make -s olddefconfig >/dev/null

# merge_config only warns when a dependency drops a symbol: refuse instead.
missing=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*)
      grep -qxF "$line" .config || { log "fragment symbol not in final .config: $line"; missing=1; } ;;
    "# CONFIG_"*" is not set")
      sym=${line#\# }; sym=${sym%% *}
      if grep -q "^$sym=" .config; then log "fragment wants $sym off, but it is on"; missing=1; fi ;;
  esac
done <"$fragment"
[ "$missing" = 0 ] || { log "kernel config does not match the fragment"; exit 1; }

buildlog=$work/build.log
log "compiling (log: $buildlog)"
set +e
make -j"$(nproc)" vmlinux bzImage 2>&1 | tee "$buildlog" | {
  n=0
  while IFS= read -r line; do
    case "$line" in
      "  CC "*|"  AS "*|"  LD "*|"  AR "*)
        n=$((n + 1))
        [ $((n % 250)) = 0 ] && log "$n objects, $(( $(date +%s) - start )) s" ;;
    esac
  done
}
status=${PIPESTATUS[0]}
set -e
if [ "$status" != 0 ]; then
  tail -n 40 "$buildlog" >&2
  log "build failed"
  exit 1
fi

mkdir -p "$entry.tmp"
cp vmlinux "$entry.tmp/vmlinux"
cp arch/x86/boot/bzImage "$entry.tmp/bzImage"
cp .config "$entry.tmp/config"
rm -rf "$entry" && mv "$entry.tmp" "$entry"
cp "$entry/vmlinux" "$entry/bzImage" "$entry/config" "$out/"
log "built $key in $(( $(date +%s) - start )) s: $out/vmlinux, $out/bzImage"
