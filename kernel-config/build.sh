#!/usr/bin/env bash
# Builds capsid's guest kernel (vmlinux + bzImage) from Debian's linux-source-6.1.
#
# The result is cached outside the checkout, keyed by a hash of the config
# fragment, this script and the source's version, so a second run with the
# same inputs only copies three files.
#
#   kernel-config/build.sh [OUT_DIR]        (default OUT_DIR: build/kernel)
#
# OUT_DIR may be relative: it is taken from the directory the script is run
# in, before anything changes directory.
#
# Environment:
#   CAPSID_KERNEL_CACHE    cache root (default /var/cache/capsid/kernel)
#   CAPSID_KERNEL_SOURCE   a kernel source tarball to build instead of the
#                          installed linux-source-6.1 package; its version is
#                          its sha256 (used by the build's own test with a stub
#                          source tree, so the cache-miss path runs in seconds)
#
# A build that fails part-way (compiler error, full disk, interrupted) leaves
# no cache entry: the entry appears only by an atomic rename once its three
# files are complete, and the unpacked source tree likewise.
set -euo pipefail

log() { printf '[kernel] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

here=$(cd "$(dirname "$0")" && pwd)
script=$here/$(basename "$0")
out=${1:-$here/../build/kernel}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cache_root=${CAPSID_KERNEL_CACHE:-/var/cache/capsid/kernel}
mkdir -p "$cache_root"
cache_root=$(cd "$cache_root" && pwd)
fragment=$here/microvm.fragment
pkg=linux-source-6.1
start=$(date +%s)

if [ -n "${CAPSID_KERNEL_SOURCE:-}" ]; then
  [ -f "$CAPSID_KERNEL_SOURCE" ] || die "CAPSID_KERNEL_SOURCE=$CAPSID_KERNEL_SOURCE is not a file"
  tarball=$(cd "$(dirname "$CAPSID_KERNEL_SOURCE")" && pwd)/$(basename "$CAPSID_KERNEL_SOURCE")
  version=sha256-$(sha256sum "$tarball" | cut -c1-16)
  label="$(basename "$tarball") ($version)"
  estimate=
else
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    log "installing $pkg and build dependencies"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      "$pkg" build-essential flex bison bc libelf-dev libssl-dev xz-utils >/dev/null
  fi
  tarball=/usr/src/$pkg.tar.xz
  version=$(dpkg-query -W -f='${Version}' "$pkg")
  label="$pkg $version"
  estimate=" (about 8 minutes on 2 cores)"
fi
key=$( { cat "$fragment" "$script"; echo "source=$version"; } | sha256sum | cut -c1-16)
entry=$cache_root/$key

if [ -f "$entry/vmlinux" ] && [ -f "$entry/bzImage" ] && [ -f "$entry/config" ]; then
  cp "$entry/vmlinux" "$entry/bzImage" "$entry/config" "$out/"
  log "cache hit $key ($label): $out ready in $(( $(date +%s) - start )) s"
  exit 0
fi

log "cache miss $key: building $label$estimate"
work=$cache_root/src/$version
src=$work/tree
buildlog=$work/build.log
if [ ! -f "$src/.capsid-unpacked" ]; then
  log "unpacking $tarball"
  rm -rf "$work" && mkdir -p "$work/unpack.tmp"
  tar -C "$work/unpack.tmp" -xf "$tarball"
  # The tarball holds one top directory (linux-source-6.1/).
  top=$(find "$work/unpack.tmp" -mindepth 1 -maxdepth 1 -type d)
  [ "$(printf '%s\n' "$top" | wc -l)" = 1 ] && [ -f "$top/Makefile" ] \
    || die "$tarball does not hold one kernel source directory"
  touch "$top/.capsid-unpacked"
  mv "$top" "$src"
  rm -rf "$work/unpack.tmp"
fi
: >"$buildlog"
failed() { log "$1 (log: $buildlog)"; tail -n 40 "$buildlog" >&2; exit 1; }

cd "$src"
{
  make tinyconfig
  # tinyconfig is 32-bit on x86: switch first so 64-bit-only symbols can merge.
  ./scripts/config --enable 64BIT
  make olddefconfig
  ./scripts/kconfig/merge_config.sh -m .config "$fragment"
  make olddefconfig
} >>"$buildlog" 2>&1 || failed "configuring the kernel failed"

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
[ "$missing" = 0 ] || die "kernel config does not match the fragment $fragment"

log "compiling (log: $buildlog)"
set +e
make -j"$(nproc)" vmlinux bzImage 2>&1 | tee -a "$buildlog" | {
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
[ "$status" = 0 ] || failed "build failed"

# Fill a fresh temporary entry and rename it into place: a reader sees
# either no entry or a complete one.
tmp=$(mktemp -d "$cache_root/.$key.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cp vmlinux "$tmp/vmlinux"
cp arch/x86/boot/bzImage "$tmp/bzImage"
cp .config "$tmp/config"
chmod 0755 "$tmp"
rm -rf "$entry"
mv "$tmp" "$entry"
cp "$entry/vmlinux" "$entry/bzImage" "$entry/config" "$out/"
log "built $key in $(( $(date +%s) - start )) s: $out/vmlinux, $out/bzImage"
