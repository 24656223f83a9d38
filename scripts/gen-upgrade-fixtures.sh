#!/bin/sh
# Writes tests/fixtures/upgrade/{running,standby}-v<N>.json: the guest
# records a released hypeman writes, for tests/e2e_upgrade.rs and
# tests/upgrade_fake.rs. Run it with the `hypeman` binary of the release
# whose format they are (built from its commit in a separate worktree):
#
#   git worktree add --detach ../prev <commit>
#   (cd ../prev && cargo build --bin hypeman)
#   sh scripts/gen-upgrade-fixtures.sh ../prev/target/debug/hypeman 2
#
# It boots one real QEMU (TCG) guest named `counter`, declared exactly as
# tests/support/daemon.rs declares it, copies its record while it runs and
# again once it is in standby, and replaces what is particular to this run
# (IDs, pids, paths, the image, the QEMU version) by placeholders that the
# tests fill in.
set -eu
cd "$(dirname "$0")/.."
bin=$(realpath "$1")
version=$2
kernel_dir=${HYPEMAN_GUEST_KERNEL_DIR:-$(pwd)/target/guest-kernel}
init=${HYPEMAN_INIT_BINARY:-$(pwd)/target/x86_64-unknown-linux-gnu/release/hypeman-init}
out=tests/fixtures/upgrade
mkdir -p "$out"

work=$(mktemp -d)
daemon_pid=
cleanup() {
    [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
    # A QEMU left by a failed run: the one its record names, by pid.
    for meta in "$work"/data/guests/*/metadata.json; do
        [ -f "$meta" ] || continue
        pid=$(python3 -c 'import json,sys; v=json.load(open(sys.argv[1])).get("vmm"); print(v["pid"] if v else "")' "$meta")
        [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/etc/instances" "$work/rootfs/bin"
cat > "$work/etc/hypeman.toml" <<EOF
default_hypervisor = "qemu"
[guest]
kernel = "$kernel_dir/vmlinuz"
modules_dir = "$kernel_dir/lib/modules"
init = "$init"
[qemu]
accel = "tcg"
[reconcile]
resync_interval = "2s"
health_interval = "200ms"
backoff_initial = "200ms"
backoff_max = "2s"
stop_grace = "3s"
EOF

cp /bin/busybox "$work/rootfs/bin/busybox"
for applet in sh sleep echo cat; do ln -s busybox "$work/rootfs/bin/$applet"; done
umoci init --layout "$work/oci" >/dev/null
umoci new --image "$work/oci:busybox" >/dev/null
umoci insert --image "$work/oci:busybox" "$work/rootfs" / >/dev/null
image="oci:$work/oci:busybox"

counter='i=0; while true; do i=$((i+1)); echo COUNTER $i; sleep 0.2; done'
declare() {
    printf 'image = "%s"\nstate = "%s"\nmemory = "256MiB"\ncmd = ["sh", "-c", "%s"]\n' \
        "$image" "$1" "$counter" > "$work/etc/instances/.counter.tmp"
    mv "$work/etc/instances/.counter.tmp" "$work/etc/instances/counter.toml"
}
hm() { "$bin" --config-dir "$work/etc" --data-dir "$work/data" "$@"; }

"$bin" --config-dir "$work/etc" --data-dir "$work/data" daemon > "$work/daemon.log" 2>&1 &
daemon_pid=$!

# Writes the guest's record, sanitised, to $out/$1-v$version.json.
keep() {
    python3 - "$work" "$image" "$out/$1-v$version.json" <<'EOF'
import glob, json, sys
work, image, target = sys.argv[1:]
(path,) = glob.glob(f"{work}/data/guests/*/metadata.json")
m = json.load(open(path))
guest_dir = f"{work}/data/guests/{m['id']}"
text = json.dumps(m, indent=2)
text = text.replace(image, "@IMAGE@").replace(guest_dir, "@GUEST_DIR@").replace(m["id"], "@ID@")
m = json.loads(text)
if m.get("vmm"):
    m["vmm"]["pid"] = "@PID@"
    m["vmm"]["pid_start_time"] = "@PID_START_TIME@"
    m["vmm"]["version"] = "@VMM_VERSION@"
open(target, "w").write(json.dumps(m, indent=2) + "\n")
print(f"wrote {target}")
EOF
}

declare running
hm wait counter --state Running --timeout 90s
keep running
declare standby
hm wait counter --state Standby --timeout 90s
keep standby
hm status
