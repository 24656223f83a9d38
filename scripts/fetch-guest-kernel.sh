#!/bin/sh
# Fetch a Debian cloud guest kernel and its modules into DEST without touching
# /boot or the host's module tree: DEST/vmlinuz and DEST/lib/modules/<release>
# (with modules.dep from `depmod -b`, which the .deb does not ship).
#
# Idempotent: when DEST already holds a kernel and a modules.dep for the
# release apt currently points at, nothing is downloaded.
#
# Usage: scripts/fetch-guest-kernel.sh DEST
set -eu

if [ $# -ne 1 ]; then
    echo "usage: $0 DEST" >&2
    exit 2
fi
dest=$1

pkg=$(apt-cache depends linux-image-cloud-amd64 \
    | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$pkg" ]; then
    echo "$0: apt-cache knows no linux-image-cloud-amd64 (run apt-get update?)" >&2
    exit 1
fi
# The package name minus its prefix is the kernel release (e.g. 6.1.0-56-cloud-amd64).
release=${pkg#linux-image-}
# Some package names carry an "-unsigned" suffix that the release does not.
release=${release%-unsigned}

if [ -f "$dest/vmlinuz" ] && [ -f "$dest/lib/modules/$release/modules.dep" ]; then
    echo "$dest: kernel $release already present"
    exit 0
fi

mkdir -p "$dest"
work=$(mktemp -d "$dest/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

# As root, apt warns that it downloads "unsandboxed" into a directory its
# _apt user cannot write; that is harmless here.
(cd "$work" && apt-get download "$pkg")
deb=$(ls "$work"/*.deb)
dpkg-deb -x "$deb" "$work/root"

rm -rf "$dest/lib/modules/$release"
mkdir -p "$dest/lib/modules"
mv "$work/root/lib/modules/$release" "$dest/lib/modules/$release"
depmod -b "$dest" "$release"
# Copy the kernel last: its presence marks a complete fetch.
cp "$work/root/boot/vmlinuz-$release" "$dest/vmlinuz.tmp"
mv "$dest/vmlinuz.tmp" "$dest/vmlinuz"
echo "$dest: kernel $release"
