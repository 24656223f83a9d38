#!/bin/sh
# Boots the bundled busybox counter example as a real microVM under QEMU
# (TCG here, KVM where it works): hypeman's initrd builder, hypeman-init as
# PID 1, an erofs root disk, an erofs config disk and an ext4 overlay. The
# guest's console is printed as it boots.
set -eu
cd "$(dirname "$0")/.."
scripts/setup.sh
HYPEMAN_REAL_VM=1 HYPEMAN_GUEST_KERNEL_DIR=$(realpath target/guest-kernel) \
    cargo test --quiet --test real_boot -- --nocapture --test-threads=1
