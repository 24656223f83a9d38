#!/bin/sh
# The whole test suite, including the real-VM boots under QEMU and the pulls
# from a real local registry. Installs what it needs first (see setup.sh).
set -eu
cd "$(dirname "$0")/.."
scripts/setup.sh
# The Nix files cannot be built here (nixpkgs is unreachable); they are
# parsed and their builtins-only logic evaluated.
sh .ci/nix-parse-check.sh
export HYPEMAN_REAL_VM=1
# setup.sh installed every tool, so a test that would skip for a missing
# one fails instead (tests/support/gate.rs; CI=true does the same).
export HYPEMAN_REQUIRE_TOOLS=1
HYPEMAN_GUEST_KERNEL_DIR=$(realpath target/guest-kernel)
export HYPEMAN_GUEST_KERNEL_DIR
# The lint policy of Cargo.toml's [workspace.lints], warnings as errors.
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace -- --test-threads=2
