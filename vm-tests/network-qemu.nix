# The same scenario as network.nix, on QEMU (KVM, `accel = "auto"` picks it
# inside the nested test VM).
{ pkgs, package ? null }:
import ./network-scenario.nix {
  inherit pkgs package;
  hypervisor = "qemu";
}
