# Boot, standby, restore, daemon restart and removal on Cloud Hypervisor.
# The scenario is in scenario.nix, shared with qemu.nix.
{ pkgs, package ? null }:
import ./scenario.nix {
  inherit pkgs package;
  hypervisor = "cloud-hypervisor";
}
