#!/usr/bin/env bash
# Fetches container clients newer than Debian 12 ships (Docker Engine 26.1,
# containerd 1.7, tini from Debian 13; containerd 2.x from Debian unstable)
# and unpacks them into a cache directory. Nothing is installed: the
# packages go through a private apt directory (own sources list, lists and
# archive cache) and are unpacked with `dpkg -x`, so the system's containerd
# stays as it is. The binaries need glibc >= 2.34, which Debian 12 has.
#
#   contrib/clients/fetch.sh trixie   -> $CACHE/trixie/usr/bin/{dockerd,docker,containerd,...}
#   contrib/clients/fetch.sh sid      -> $CACHE/sid/usr/bin/containerd (2.x)
#
# Prints the unpacked root on stdout. A finished root carries a marker and is
# reused; a half-finished one is replaced.
set -euo pipefail

suite="${1:?usage: fetch.sh trixie|sid}"
cache="${CAPSID_CLIENTS_CACHE:-/var/cache/capsid/clients}"
mirror="${CAPSID_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

case "$suite" in
  trixie) packages=(docker.io docker-cli containerd tini) ;;
  sid) packages=(containerd) ;;
  *) echo "fetch.sh: unknown suite '$suite' (trixie or sid)" >&2; exit 2 ;;
esac

root="$cache/$suite"
marker="$root/.capsid-complete"
if [[ -f "$marker" ]]; then
  echo "$root"
  exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/.fetch-$suite.XXXXXX")
trap 'rm -rf "$work"' EXIT
apt_dir="$work/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/etc" "$work/debs" "$work/root"
echo "deb $mirror $suite main" >"$apt_dir/etc/sources.list"
: >"$apt_dir/status"
opts=(
  -o "Dir::Etc::SourceList=$apt_dir/etc/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$apt_dir/lists"
  -o "Dir::State::Status=$apt_dir/status"
  -o "Dir::Cache=$apt_dir"
  -o "Dir::Cache::Archives=$apt_dir/archives"
  -o "APT::Architecture=amd64"
  -o "Debug::NoLocking=1"
  -o "APT::Sandbox::User=root"
)
apt-get "${opts[@]}" -qq update >&2
(cd "$work/debs" && apt-get "${opts[@]}" -qq download "${packages[@]}" >&2)
for deb in "$work/debs"/*.deb; do
  dpkg -x "$deb" "$work/root"
done
for deb in "$work/debs"/*.deb; do
  dpkg-deb -f "$deb" Package Version | paste -sd' ' 
done >"$work/root/.capsid-versions"
rm -rf "$root"
mv "$work/root" "$root"
touch "$marker"
echo "$root"
