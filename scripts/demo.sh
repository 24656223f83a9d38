#!/bin/sh
# The main job: the hypeman daemon boots the bundled example
# (examples/instances/hello.toml) as a real microVM under QEMU, then puts it
# in standby and restores it, all by editing `state` in its declaration.
#
# Everything lives under target/demo (config dir, data dir, the example's
# OCI image built locally from busybox-static: no network needed). Run as
# root on Debian/Ubuntu; installs what is missing first (see setup.sh).
set -eu
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --quiet
hypeman=$(pwd)/target/debug/hypeman
demo=$(pwd)/target/demo
kernel=$(pwd)/target/guest-kernel
init=$(pwd)/target/x86_64-unknown-linux-gnu/release/hypeman-init
# VMMs run as their own unprivileged users, who must be able to pass
# through every directory above the data dir (as they can /var/lib). A
# checkout under a private directory (a 0700 home or mktemp dir) keeps its
# data dir in /var/tmp instead, which the demo says.
data=$demo/data
dir=$demo
while [ "$dir" != / ]; do
    dir=$(dirname "$dir")
    if [ -d "$dir" ] && [ $(( $(stat -c %a "$dir" | sed 's/.*\(.\)$/\1/') & 1 )) -eq 0 ]; then
        data=/var/tmp/hypeman-demo/data
        echo "demo: $dir is private (mode $(stat -c %a "$dir")), so the data dir is $data"
        break
    fi
done

# Leave nothing of an earlier run: its daemon and VMs go first.
pkill -f -- "--config-dir $demo/etc" 2>/dev/null || true
pkill -f "$data/guests/" 2>/dev/null || true
sleep 0.5
rm -rf "$demo" "$data"
mkdir -p "$demo/etc/instances" "$demo/rootfs/bin"

echo "== building the example image (busybox) as an OCI layout"
cp /bin/busybox "$demo/rootfs/bin/busybox"
for applet in sh sleep echo cat; do ln -s busybox "$demo/rootfs/bin/$applet"; done
umoci init --layout "$demo/oci" >/dev/null
umoci new --image "$demo/oci:busybox" >/dev/null
umoci insert --image "$demo/oci:busybox" "$demo/rootfs" / >/dev/null

cat > "$demo/etc/hypeman.toml" <<TOML
default_hypervisor = "qemu"
[guest]
kernel = "$kernel/vmlinuz"
modules_dir = "$kernel/lib/modules"
init = "$init"
[reconcile]
health_interval = "500ms"
stop_grace = "5s"
TOML
# The bundled example, pointed at the image built above.
sed "s|oci:/var/lib/hypeman/examples/busybox:latest|oci:$demo/oci:busybox|" \
    examples/instances/hello.toml > "$demo/etc/instances/hello.toml"

h() { "$hypeman" --config-dir "$demo/etc" --data-dir "$data" "$@"; }
set_state() {
    sed -i "s/^state = .*/state = \"$1\"/" "$demo/etc/instances/hello.toml"
}

echo "== hypeman validate"
h validate
echo "== starting the daemon (log: $demo/daemon.log)"
# Started directly (not through the function h) so $! is the daemon itself.
"$hypeman" --config-dir "$demo/etc" --data-dir "$data" daemon > "$demo/daemon.log" 2>&1 &
daemon=$!
# On exit the daemon stops; VMs outlive it by design, so the demo ends them.
trap 'kill $daemon 2>/dev/null || true; wait $daemon 2>/dev/null || true; pkill -f "$data/guests/" 2>/dev/null || true' EXIT

h wait hello --state Running --timeout 120s
# The app's first line, however long the boot takes on a busy machine.
wait_for_hello() {
    tries=0
    until h logs hello --tail 50 | tr -d '\r' | grep -q "$1"; do
        tries=$((tries + 1))
        if [ "$tries" -gt 240 ]; then
            echo "demo: the app never printed a line matching $1" >&2; exit 1
        fi
        sleep 0.5
    done
}
wait_for_hello '^hello [0-9]'
h status
echo "== hypeman logs hello --tail 3"
h logs hello --tail 3

echo "== state = \"standby\""
set_state standby
h wait hello --state Standby --timeout 60s
h status
if pgrep -f "$data/guests/.*/qmp.sock" >/dev/null; then
    echo "demo: a VMM is still running in standby" >&2; exit 1
fi
echo "no QEMU process is left; the snapshot is on disk:"
du -sh "$data"/guests/*/snapshots/snapshot-latest
before=$(h logs hello --tail 50 | tr -d '\r' | grep '^hello [0-9]' | tail -n 1)
echo "last line before standby: $before"

echo "== state = \"running\" (restore: the counter continues)"
set_state running
h wait hello --state Running --timeout 60s
n=${before#hello }
wait_for_hello "^hello $((n + 3))\$"
echo "lines since the restore (they continue after \"$before\"):"
h logs hello --tail 100 | tr -d '\r' | awk -v b="$before" 'seen && /^hello [0-9]/; $0 == b { seen = 1 }'


echo "== state = \"stopped\""
set_state stopped
h wait hello --state Stopped --timeout 60s
h status
echo "demo: done"
