# Instance names, as the daemon checks them (the declaration's file stem;
# src/declaration): lowercase letters, digits and inner dashes, 1 to 63
# characters. Builtins only, so .ci/nix-parse-check.sh can evaluate it
# without nixpkgs.
rec {
  # builtins.match anchors the whole string, as ^…$ does.
  nameRegex = "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?";
  validName = name: builtins.match nameRegex name != null;
}
