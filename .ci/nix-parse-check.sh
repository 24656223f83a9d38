#!/bin/sh
# Checks the Nix files without nixpkgs (which this project's machines cannot
# fetch): every .nix file must parse, and the parts that need only builtins
# are evaluated. Run from anywhere: sh .ci/nix-parse-check.sh
#
# What this does NOT check: anything that needs nixpkgs (the package build,
# the module's option types, the VM tests). That is `nix flake check` on a
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

if [ "$failed" -ne 0 ]; then
    echo "nix-parse-check: FAILED" >&2
    exit 1
fi
echo "nix-parse-check: $count files parsed, evaluations passed (nixpkgs not used: builds, option types and VM tests are not checked here)"
