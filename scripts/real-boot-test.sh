#!/bin/sh
# Runs the gated real-VM boot test: fetches a Debian cloud guest kernel
# (without touching /boot), builds the static hypeman-init and boots it under
# QEMU TCG. Needs qemu-system-x86, busybox-static, erofs-utils, e2fsprogs.
#
# Usage: scripts/real-boot-test.sh [KERNEL_DIR]   (default: target/guest-kernel)
set -eu
cd "$(dirname "$0")/.."
kernel_dir=${1:-target/guest-kernel}
scripts/fetch-guest-kernel.sh "$kernel_dir"
RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --release -p hypeman-init --target x86_64-unknown-linux-gnu
HYPEMAN_REAL_VM=1 HYPEMAN_GUEST_KERNEL_DIR=$(realpath "$kernel_dir") \
    cargo test --test real_boot -- --nocapture --test-threads=1
