# The same scenario as boot-standby-restore.nix, on QEMU (KVM, `accel =
# "auto"` picks it inside the nested test VM).
{ pkgs, package ? null }:
import ./scenario.nix {
  inherit pkgs package;
  hypervisor = "qemu";
}
