# Guest networking on Cloud Hypervisor: host <-> guest, guest <-> guest,
# the firewall on the bridge, NAT, standby and restore. The scenario is in
# network-scenario.nix, shared with network-qemu.nix.
{ pkgs, package ? null }:
import ./network-scenario.nix {
  inherit pkgs package;
  hypervisor = "cloud-hypervisor";
}
