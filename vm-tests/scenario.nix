# The shared NixOS VM test: one instance of a Nix-built busybox image that
# prints "COUNTER n" once a second, driven through its whole life by NixOS
# configuration switches, on the hypervisor given:
#
#   boot -> Running (the counter prints)
#   specialisation "standby" -> Standby (snapshot on disk, no VMM process)
#   back to the base configuration -> Running, restored: the counter
#     continues where it stopped instead of starting again at 1
#   systemctl restart hypeman -> the same VMM pid (the new daemon adopts it)
#   specialisation "removed" -> the instance and its data are deleted
#
# The test VM needs nested KVM: the builder needs the `kvm` and `nixos-test`
# system features and its CPU's kvm_intel/kvm_amd `nested=1`. `-cpu host`
# passes VMX/SVM through (microvm.nix #78: Cloud Hypervisor fails with
# "no supported hypervisor" under the default `kvm64` CPU model).
{
  pkgs,
  hypervisor,
  package ? null,
}:

let
  inherit (pkgs) lib;

  # The image, built with Nix, so the test needs no registry and no network.
  # dockerTools writes a docker-archive (the `docker save` format); hypeman
  # reads OCI layouts (`oci:` / `oci-archive:`), so skopeo converts it.
  # skopeo in the sandbox: --insecure-policy (no /etc/containers/policy.json),
  # HOME for its config lookups; it reads the gzip-compressed archive
  # buildLayeredImage produces.
  counterDockerImage = pkgs.dockerTools.buildLayeredImage {
    name = "hypeman-test-counter";
    tag = "latest";
    contents = [ pkgs.busybox ];
    config.Cmd = [
      "/bin/sh"
      "-c"
      ''i=0; while true; do i=$((i+1)); echo "COUNTER $i"; sleep 1; done''
    ];
  };

  counterImage =
    pkgs.runCommand "hypeman-test-counter.oci.tar" { nativeBuildInputs = [ pkgs.skopeo ]; }
      ''
        export HOME=$TMPDIR
        skopeo --insecure-policy copy --quiet \
          docker-archive:${counterDockerImage} oci-archive:$out:latest
      '';

  # How the VMM shows in `pgrep -f`. The bracket keeps the pattern from
  # matching a command line that contains the pattern itself.
  vmmPattern =
    {
      cloud-hypervisor = "[c]loud-hypervisor";
      qemu = "[q]emu-system-";
    }
    .${hypervisor};
in
{
  name = "hypeman-${hypervisor}";

  meta.timeout = 1800;

  nodes.machine =
    { lib, ... }:
    {
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
        instances.counter = {
          image = "oci-archive:${counterImage}:latest";
          inherit hypervisor;
          vcpus = 1;
          memory = "256MiB";
        };
      }
      // lib.optionalAttrs (package != null) { inherit package; };

      # Configuration changes are tested the way users make them: a switch.
      # Both inherit everything above and change one thing.
      specialisation.standby.configuration = {
        services.hypeman.instances.counter.state = lib.mkForce "standby";
      };
      specialisation.removed.configuration = {
        services.hypeman.instances = lib.mkForce { };
      };
    };

  testScript =
    { nodes, ... }:
    let
      toplevel = nodes.machine.system.build.toplevel;
    in
    ''
      import json
      import re

      BASE = "${toplevel}/bin/switch-to-configuration test"
      STANDBY = "${toplevel}/specialisation/standby/bin/switch-to-configuration test"
      REMOVED = "${toplevel}/specialisation/removed/bin/switch-to-configuration test"
      VMM = "${vmmPattern}"


      def status():
          return json.loads(machine.succeed("hypeman status counter --json"))


      def counters():
          """Every COUNTER value in the instance's console log, in order."""
          log = machine.succeed("hypeman logs counter --tail 1000000")
          return [int(n) for n in re.findall(r"COUNTER (\d+)", log)]


      def vmm_pids():
          out = machine.succeed(f"pgrep -f '{VMM}' || true")
          return out.split()


      start_all()
      machine.wait_for_unit("hypeman.service")
      machine.succeed("test -c /dev/kvm")  # no nested KVM: nothing below can work

      with subtest("the generated configuration is what the daemon reads"):
          machine.succeed("hypeman validate")
          machine.succeed("test -e /etc/hypeman/instances/counter.toml")

      with subtest("the instance boots and its counter runs"):
          machine.succeed("hypeman wait counter --state Running --timeout 300s")
          machine.wait_until_succeeds("hypeman logs counter | grep -q 'COUNTER 3'", timeout=120)
          assert len(vmm_pids()) == 1, f"expected one VMM, found {vmm_pids()}"

      with subtest("standby: a snapshot on disk and no VMM"):
          machine.succeed(STANDBY)
          machine.succeed("hypeman wait counter --state Standby --timeout 180s")
          machine.fail(f"pgrep -f '{VMM}'")
          assert status()["has_snapshot"], status()
          before = counters()
          last_before = before[-1]
          machine.log(f"last counter before standby: {last_before}")

      with subtest("running again: restored, the counter continues"):
          machine.succeed(BASE)
          machine.succeed("hypeman wait counter --state Running --timeout 180s")

          def printed_after_restore(_):
              now = counters()
              # The console log may have been appended to or started afresh.
              new = now[len(before):] if now[: len(before)] == before else now
              return len(new) >= 2

          retry(printed_after_restore, timeout=120)
          now = counters()
          new = now[len(before):] if now[: len(before)] == before else now
          assert new[0] > last_before, (
              f"counter restarted: {last_before} before standby, {new[0]} after"
              " (a cold boot, not a restore)"
          )

      with subtest("restarting the daemon adopts the running VMM"):
          pid = status()["pid"]
          assert pid, status()
          machine.succeed("systemctl restart hypeman.service")
          machine.wait_for_unit("hypeman.service")
          machine.succeed("hypeman wait counter --state Running --timeout 60s")
          machine.succeed(f"kill -0 {pid}")
          assert status()["pid"] == pid, f"VMM pid changed: {pid} -> {status()['pid']}"
          assert vmm_pids() == [str(pid)], f"expected only VMM {pid}, found {vmm_pids()}"

      with subtest("removing the declaration deletes the instance and its data"):
          machine.succeed(REMOVED)
          machine.wait_until_succeeds(
              "test -z \"$(ls -A /var/lib/hypeman/guests)\"", timeout=180
          )
          machine.fail(f"pgrep -f '{VMM}'")
          listed = json.loads(machine.succeed("hypeman status --json"))
          assert all(i["name"] != "counter" for i in listed), listed
    '';
}
