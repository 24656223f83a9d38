#!/bin/sh
# Scores the sandbox of hypeman.service (nixos-module/hardening.nix) with
# `systemd-analyze security --offline`, without nixpkgs: the hardening file is
# plain Nix, evaluated here and rendered into a unit file the way NixOS renders
# serviceConfig (a list becomes one line per element, booleans true/false).
#
#   scripts/unit-security.sh [MAX]     # fails when the exposure is above MAX
#
# Prints the full table and then `exposure: N`. Needs nix-instantiate,
# systemd-analyze (systemd >= 250) and python3.
set -eu
max="${1:-}"
here="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

nix-instantiate --eval --strict --json "$here/nixos-module/hardening.nix" \
    --arg dataDir '"/var/lib/hypeman"' 2>/dev/null >"$work/hardening.json"

python3 - "$work/hardening.json" >"$work/hypeman.service" <<'PY'
import json, sys
keys = json.load(open(sys.argv[1]))
# What the module's serviceConfig sets besides the sandbox (see default.nix).
print("[Unit]\nDescription=hypeman microVM manager\nAfter=network.target\n")
print("[Service]")
print("Type=notify\nNotifyAccess=main")
print("ExecStart=/run/current-system/sw/bin/hypeman daemon --config-dir /etc/hypeman --data-dir /var/lib/hypeman")
print("KillMode=process\nRestart=on-failure\nLimitMEMLOCK=infinity\nLimitNOFILE=1048576")
print("StateDirectory=hypeman\nStateDirectoryMode=0700")
def render(v):
    return ("true" if v else "false") if isinstance(v, bool) else str(v)
for key, value in keys.items():
    for v in value if isinstance(value, list) else [value]:
        print(f"{key}={render(v)}")
print("\n[Install]\nWantedBy=multi-user.target")
PY

out="$(systemd-analyze security --offline=true --no-pager "$work/hypeman.service" 2>&1)" || {
    printf '%s\n' "$out" >&2
    exit 1
}
printf '%s\n' "$out"
score="$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')"
[ -n "$score" ] || { echo "no exposure level in the output" >&2; exit 1; }
echo "exposure: $score"
if [ -n "$max" ]; then
    python3 -c "import sys; sys.exit(0 if float('$score') <= float('$max') else 1)" || {
        echo "exposure $score is above $max" >&2
        exit 1
    }
fi
