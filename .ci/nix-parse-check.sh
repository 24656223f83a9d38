#!/bin/sh
# Checks the Nix files without nixpkgs (which this project's machines cannot
# fetch): every .nix file must parse, and the parts that need only builtins
# are evaluated. Run from anywhere: sh .ci/nix-parse-check.sh
#
# What this does NOT check: anything that needs nixpkgs (the package build,
# the module's option types and merging, the VM tests). The module's
# network logic is evaluated against a stub lib (.ci/nix-network-module.nix). That is `nix flake check` on a
# machine with nixpkgs and nested KVM; see nixos-module/README.md.
set -eu
cd "$(dirname "$0")/.."

if ! command -v nix-instantiate >/dev/null 2>&1; then
    echo "nix-parse-check: nix-instantiate not found (apt-get install nix-bin)" >&2
    exit 1
fi

# nix-instantiate warns about a missing nixbld group on machines where nix is
# installed but not set up as a daemon; that is noise here.
nixi() { nix-instantiate "$@" 2> "$tmp/stderr" || { grep -v "build-users-group" "$tmp/stderr" >&2; return 1; }; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

failed=0

# 1. Every tracked (or, outside git, every) .nix file parses.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files --cached --others --exclude-standard -- '*.nix' > "$tmp/files"
else
    find . -name '*.nix' -not -path './target/*' -not -path './.git/*' | sed 's|^\./||' > "$tmp/files"
fi
count=0
while IFS= read -r f; do
    [ -f "$f" ] || continue
    count=$((count + 1))
    if nixi --parse "$f" > /dev/null; then
        echo "parse ok    $f"
    else
        echo "parse FAIL  $f" >&2
        failed=1
    fi
done < "$tmp/files"
if [ "$count" -eq 0 ]; then
    echo "nix-parse-check: no .nix files found" >&2
    exit 1
fi

# 2. Self-contained evaluations (builtins only, no nixpkgs).
check_eval() {
    what=$1
    expr=$2
    if out=$(nixi --eval --strict -E "$expr") && [ "$out" = "true" ]; then
        echo "eval ok     $what"
    else
        echo "eval FAIL   $what${out:+ (got $out)}" >&2
        failed=1
    fi
}

# The module's instance-name rule (nix/names.nix) agrees with the daemon's
# (^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$) on the edge cases.
check_eval "instance-name rule (nix/names.nix)" '
  let
    n = import ./nix/names.nix;
    s63 = "a" + builtins.concatStringsSep "" (builtins.genList (_: "b") 61) + "c";
    good = [ "a" "0" "web" "web-1" "a-b-c" "9lives" s63 ];
    bad = [ "" "-a" "a-" "Web" "web_1" "web.1" "a b" "é" (s63 + "d") ];
  in
    builtins.stringLength s63 == 63
    && builtins.all n.validName good
    && !(builtins.any n.validName bad)'

# The module's guest-network rules (nix/network.nix) agree with the
# daemon's (src/settings.rs, src/network/names.rs and ipam.rs): bridge
# names, subnets (with the daemon's reasons) and the gateway.
check_eval "guest-network rules (nix/network.nix)" '
  let
    n = import ./nix/network.nix;
    goodBridges = [ "hypeman0" "br-lan" "a" "x_1.2" "fifteen-chars-x" "vmbr0" ];
    badBridges = [ "" "sixteen-chars-xx" "a b" "a/b" "." ".." "hmbr" "hm" "ä" ];
    subnets = {
      "10.100.0.0/16" = null;
      "192.168.7.0/30" = null;
      "10.0.0.0/8" = null;
      "10.100.0.0" = "not an IPv4 subnet";
      "10.100.0.0/" = "not an IPv4 subnet";
      "10.100.0.0/+8" = "not an IPv4 subnet";
      "fd00::/64" = "not an IPv4 subnet";
      "010.0.0.0/8" = "not an IPv4 subnet";
      "256.0.0.0/8" = "not an IPv4 subnet";
      "10.100.0.0/31" = "between 8 and 30, not 31";
      "10.0.0.0/7" = "between 8 and 30, not 7";
      "10.100.0.1/16" = "write 10.100.0.0/16";
    };
    subnetOk = text: want:
      let got = n.subnetProblem text; in
      if want == null then got == null
      else got != null && builtins.match ".*${want}.*" got != null;
  in
    builtins.all (b: n.bridgeProblem b == null) goodBridges
    && builtins.all (b: n.bridgeProblem b != null) badBridges
    && builtins.all (t: subnetOk t subnets.${t}) (builtins.attrNames subnets)
    && n.gateway "10.100.0.0/16" == "10.100.0.1"
    && n.gateway "192.168.7.0/30" == "192.168.7.1"
    && n.gateway "10.77.0.0/24" == "10.77.0.1"
    && n.settingsTable { bridge = "b"; subnet = "10.1.0.0/16"; dns = [ "1.1.1.1" ]; }
       == { bridge = "b"; subnet = "10.1.0.0/16"; dns = [ "1.1.1.1" ]; }'

# services.hypeman.network (nixos-module/network.nix) against a stub lib
# and a hand-merged config: option -> hypeman.toml `[network]`, NAT,
# firewall, NetworkManager/networkd/dhcpcd, kernel modules, assertions and
# warnings. See the file for the checks.
check_eval "services.hypeman.network module logic (stub lib)" 'import ./.ci/nix-network-module.nix'

# Every example parses as TOML in Nix too: the flake check
# config-examples-validate reads them with builtins.fromTOML.
check_eval "examples parse with builtins.fromTOML" '
  let
    dir = ./examples/instances;
    files = builtins.filter (f: builtins.match ".*\\.toml" f != null)
      (builtins.attrNames (builtins.readDir dir));
    parsed = map (f: builtins.fromTOML (builtins.readFile (dir + "/${f}"))) files;
    settings = builtins.fromTOML (builtins.readFile ./examples/hypeman.toml);
  in
    builtins.length files >= 1
    && builtins.all (d: d ? image) parsed
    && settings ? guest'

# The flake'"'"'s shape, with a stub nixpkgs whose lib has only genAttrs:
# nixosModules and overlays are top level (not per system), the per-system
# outputs cover exactly the two systems, and the module and overlay are
# functions. Nothing per-system is forced, so nixpkgs is never needed.
check_eval "flake output shape (stub nixpkgs)" '
  let
    flake = import ./flake.nix;
    stubLib = {
      genAttrs = names: f: builtins.listToAttrs (map (name: { inherit name; value = f name; }) names);
    };
    nixpkgs = { lib = stubLib; legacyPackages = { }; };
    self = flake.outputs { inherit self nixpkgs; };
    systems = [ "aarch64-linux" "x86_64-linux" ];
  in
    builtins.attrNames flake.inputs == [ "nixpkgs" ]
    && builtins.isFunction self.nixosModules.default
    && builtins.isFunction self.overlays.default
    && builtins.attrNames self.packages == systems
    && builtins.attrNames self.checks == systems
    && builtins.attrNames self.devShells == systems
    && !(self.packages ? nixosModules)'

# 3. The VM tests' Python and the guests' shell, rendered with a stub nixpkgs
# (.ci/nix-vm-test-render.nix): the test script must compile and use no
# name the test driver does not give it; every instance command must pass
# `sh -n`. Nothing is run.
if command -v python3 >/dev/null 2>&1; then
    for test in scenario network-scenario; do
        for hypervisor in qemu cloud-hypervisor; do
            what="VM test script vm-tests/$test.nix ($hypervisor)"
            if ! nixi --eval --strict --json -E "import ./.ci/nix-vm-test-render.nix { file = ./vm-tests/$test.nix; hypervisor = \"$hypervisor\"; }" > "$tmp/rendered.json"; then
                echo "eval FAIL   $what" >&2
                failed=1
                continue
            fi
            if python3 - "$tmp/rendered.json" <<'PY'
import ast, builtins, json, subprocess, sys
rendered = json.load(open(sys.argv[1]))
tree = ast.parse(rendered["script"])
stored = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
stored |= {f.name for f in functions} | {a.arg for f in functions for a in f.args.args}
driver = {"machine", "outside", "start_all", "subtest", "retry", "json", "re"}
loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
unknown = sorted(loaded - stored - driver - set(dir(builtins)))
bad = [c for c in rendered["cmds"] if subprocess.run(["sh", "-n", "-c", c]).returncode != 0]
if unknown or bad:
    print(f"unknown names {unknown}; commands failing sh -n: {bad}", file=sys.stderr)
    sys.exit(1)
PY
            then
                echo "eval ok     $what"
            else
                echo "eval FAIL   $what" >&2
                failed=1
            fi
        done
    done
else
    echo "skipped     VM test scripts (no python3)"
fi

# 4. The service's sandbox (nixos-module/hardening.nix, plain Nix) rendered
# into a unit and scored by systemd-analyze, against the bound README and the
# VM test state.
if command -v systemd-analyze >/dev/null 2>&1 && command -v python3 >/dev/null 2>&1; then
    if sh scripts/unit-security.sh 4.5 > "$tmp/security" 2>&1; then
        echo "eval ok     hypeman.service sandbox, $(tail -n 1 "$tmp/security") (at most 4.5)"
    else
        cat "$tmp/security" >&2
        echo "eval FAIL   hypeman.service sandbox" >&2
        failed=1
    fi
else
    echo "skipped     hypeman.service sandbox score (no systemd-analyze or python3)"
fi

if [ "$failed" -ne 0 ]; then
    echo "nix-parse-check: FAILED" >&2
    exit 1
fi
echo "nix-parse-check: $count files parsed, evaluations passed (nixpkgs not used: builds, option types and VM tests are not checked here)"
