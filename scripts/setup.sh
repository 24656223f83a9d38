#!/bin/sh
# Everything a fresh Debian/Ubuntu machine needs before hypeman's tests or
# demo can run, installed idempotently (run as root):
#   - Debian packages: QEMU, erofs/ext4 tools, busybox-static for test
#     images, a local OCI registry with skopeo and umoci to fill it, and
#     nix-bin to parse-check the Nix files (nixpkgs is out of reach here);
#   - a Debian cloud guest kernel and its modules under target/guest-kernel
#     (downloaded as a .deb and unpacked: /boot is never touched);
#   - the static guest PID 1 (hypeman-init).
set -eu
cd "$(dirname "$0")/.."

packages="qemu-system-x86 busybox-static erofs-utils e2fsprogs lz4 cpio kmod iproute2 skopeo umoci docker-registry nix-bin"
missing=""
for p in $packages; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# The Debian registry package starts a system service on install; the tests
# run their own registries on free ports, so the shared one is not needed.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
    systemctl stop docker-registry || true
fi

scripts/fetch-guest-kernel.sh target/guest-kernel
RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --quiet --release -p hypeman-init --target x86_64-unknown-linux-gnu
echo "setup: done (kernel in target/guest-kernel, init in target/x86_64-unknown-linux-gnu/release/hypeman-init)"
