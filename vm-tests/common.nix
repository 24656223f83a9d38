# What the VM test scenarios (scenario.nix, network-scenario.nix) share:
# the guest image, the test machine's base configuration, and the Python
# helpers their test scripts start with.
{
  pkgs,
  hypervisor,
  package ? null,
}:

let
  inherit (pkgs) lib;

  # The image, built with Nix, so the tests need no registry and no network.
  # dockerTools writes a docker-archive (the `docker save` format); hypeman
  # reads OCI layouts (`oci:` / `oci-archive:`), so skopeo converts it.
  # skopeo in the sandbox: --insecure-policy (no /etc/containers/policy.json),
  # HOME for its config lookups; it reads the gzip-compressed archive
  # buildLayeredImage produces. Its default command prints "COUNTER n" once
  # a second; an instance's `cmd` replaces it.
  busyboxDockerImage = pkgs.dockerTools.buildLayeredImage {
    name = "hypeman-test-counter";
    tag = "latest";
    contents = [ pkgs.busybox ];
    config.Cmd = [
      "/bin/sh"
      "-c"
      ''i=0; while true; do i=$((i+1)); echo "COUNTER $i"; sleep 1; done''
    ];
  };
in
{
  image =
    pkgs.runCommand "hypeman-test-counter.oci.tar" { nativeBuildInputs = [ pkgs.skopeo ]; }
      ''
        export HOME=$TMPDIR
        skopeo --insecure-policy copy --quiet \
          docker-archive:${busyboxDockerImage} oci-archive:$out:latest
      '';

  # The machine that runs hypeman (the test VM needs nested KVM). `-cpu
  # host` passes VMX/SVM through (microvm.nix #78: Cloud Hypervisor fails
  # with "no supported hypervisor" under the default `kvm64` CPU model).
  machine = {
    imports = [ ../nixos-module ];

    virtualisation = {
      cores = 2;
      memorySize = 2048;
      diskSize = 4096;
      qemu.options = [ "-cpu host" ];
    };

    services.hypeman = {
      enable = true;
      # The NixOS kernel, whose vmlinux boots under both VMMs.
      guestKernel = pkgs.linuxPackages.kernel;
    }
    // lib.optionalAttrs (package != null) { inherit package; };
  };

  # status(name), app_log(name) and vmm_pids(). VMM is how the VMM shows in
  # `pgrep -f`; the bracket keeps the pattern from matching a command line
  # that contains the pattern itself.
  pythonHelpers = ''
    import json
    import re

    VMM = "${
      {
        cloud-hypervisor = "[c]loud-hypervisor";
        qemu = "[q]emu-system-";
      }
      .${hypervisor}
    }"


    def status(name):
        return json.loads(machine.succeed(f"hypeman status {name} --json"))


    def app_log(name):
        """The instance's whole console log."""
        return machine.succeed(f"hypeman logs {name} --tail 1000000")


    def vmm_pids():
        out = machine.succeed(f"pgrep -f '{VMM}' || true")
        return out.split()
  '';
}
