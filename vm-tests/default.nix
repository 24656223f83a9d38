# The NixOS VM tests, as an attrset of derivations for the flake's `checks`
# (or: nix-build vm-tests -A qemu --arg pkgs 'import <nixpkgs> {}').
#
# x86_64-linux only: the QEMU backend uses the x86 `microvm` machine, and
# all the tests need nested KVM on the builder (`kvm` + `nixos-test` features).
{
  pkgs,
  # The hypeman package to test; null: the module's default (this repo).
  package ? null,
}:

pkgs.lib.optionalAttrs pkgs.stdenv.hostPlatform.isx86_64 {
  boot-standby-restore = pkgs.testers.runNixOSTest (import ./boot-standby-restore.nix { inherit pkgs package; });
  qemu = pkgs.testers.runNixOSTest (import ./qemu.nix { inherit pkgs package; });
  # Guest networking (services.hypeman.network); tests/e2e_network.rs is
  # its mirror under QEMU TCG.
  network = pkgs.testers.runNixOSTest (import ./network.nix { inherit pkgs package; });
  network-qemu = pkgs.testers.runNixOSTest (import ./network-qemu.nix { inherit pkgs package; });
}
